"""LocalHub driven by the real ``huggingface_hub`` and ``transformers`` clients, over the Hub paths we use."""

import json
import math
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub as hfh
import pytest
import torch
import transformers
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.support.local_hub import LocalHub, local_hub_env

REPO = "test-user/tiny"


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch):
    """Refuse (and remember) any connection off 127.0.0.1: the local hub must be the only server reached."""
    attempts = []
    connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            attempts.append(address)
            raise OSError(f"test blocked a connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield
    assert attempts == []


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loopback_only):
    with local_hub_env(monkeypatch, tmp_path) as hub:
        yield hub


def _write_folder(folder: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 8}',
        "model.safetensors": os.urandom(3 * 1024 * 1024),  # a few MB: still sent inline, never via LFS/Xet
        "sub/notes.txt": b"first version",
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return files


def _snapshot_files(folder: str) -> dict[str, bytes]:
    root = Path(folder)
    files = root.rglob("*")
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in files if path.is_file()}


_OFFLINE_SCRIPT = """
import json, sys
from pathlib import Path
from huggingface_hub import constants, hf_hub_download, snapshot_download
repo, old = sys.argv[1], sys.argv[2]
snapshot = Path(snapshot_download(repo))
print(json.dumps({
    "offline": constants.HF_HUB_OFFLINE,
    "main_config": Path(hf_hub_download(repo, "config.json")).read_text(),
    "old_notes": Path(hf_hub_download(repo, "sub/notes.txt", revision=old)).read_text(),
    "snapshot": sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()),
}))
"""


def test_upload_download_pinned_revisions_and_offline_cache(hub: LocalHub, tmp_path: Path):
    assert hub.endpoint.startswith("http://127.0.0.1:")
    assert hfh.whoami()["name"] == hub.username
    assert hfh.create_repo(REPO).repo_id == REPO
    assert hfh.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as conflict:
        hfh.create_repo(REPO)
    assert conflict.value.response.status_code == 409

    folder = tmp_path / "upload"
    files = _write_folder(folder)
    first = hfh.upload_folder(repo_id=REPO, folder_path=folder)
    assert len(first.oid) == 40
    expected = sorted([".gitattributes", *files])
    assert sorted(hfh.list_repo_files(REPO)) == expected
    info = hfh.model_info(REPO)
    assert info.sha == first.oid
    assert sorted(sibling.rfilename for sibling in info.siblings) == expected
    paths = [request.path for request in hub.requests]
    assert f"/api/models/{REPO}/commit/main" in paths
    assert not any("lfs" in path or "xet" in path for path in paths)

    weights = Path(hfh.hf_hub_download(REPO, "model.safetensors")).read_bytes()
    assert weights == files["model.safetensors"]
    pinned_notes = hfh.hf_hub_download(REPO, "sub/notes.txt", revision=first.oid)
    assert Path(pinned_notes).read_bytes() == b"first version"
    snapshot = hfh.snapshot_download(REPO)
    assert {name: _snapshot_files(snapshot)[name] for name in files} == files

    # Re-uploading identical content creates no commit: the preupload answer carries each file's oid.
    assert hfh.upload_folder(repo_id=REPO, folder_path=folder).oid == first.oid

    second = hfh.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("config.json", b'{"hidden_size": 16}'),
            CommitOperationDelete("sub/notes.txt"),
        ],
        commit_message="second",
    )
    assert second.oid != first.oid
    assert sorted(hfh.list_repo_files(REPO)) == [".gitattributes", "config.json", "model.safetensors"]
    assert sorted(hfh.list_repo_files(REPO, revision=first.oid)) == expected
    assert hfh.model_info(REPO, revision=first.oid).sha == first.oid
    assert Path(hfh.hf_hub_download(REPO, "config.json")).read_bytes() == b'{"hidden_size": 16}'
    with pytest.raises(EntryNotFoundError):
        hfh.hf_hub_download(REPO, "sub/notes.txt")
    # A fresh cache proves the server itself resolves the old sha to the old files.
    fresh = tmp_path / "fresh-cache"
    old_config = hfh.hf_hub_download(REPO, "config.json", revision=first.oid, cache_dir=fresh)
    assert Path(old_config).read_bytes() == files["config.json"]
    assert sorted(_snapshot_files(hfh.snapshot_download(REPO))) == sorted(hfh.list_repo_files(REPO))

    # Offline, in a fresh interpreter that reads its constants from the environment at import.
    env = hub.client_env(tmp_path / "hf-home")
    env["HF_HUB_OFFLINE"] = "1"
    seen = len(hub.requests)
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, REPO, first.oid],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    offline = json.loads(result.stdout.strip().splitlines()[-1])
    assert offline == {
        "offline": True,
        "main_config": '{"hidden_size": 16}',
        "old_notes": "first version",
        "snapshot": [".gitattributes", "config.json", "model.safetensors"],
    }
    assert len(hub.requests) == seen


def test_tree_listing_is_paged_like_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loopback_only):
    names = ["a/x.txt", "a/b/y.txt", "a/b/z.txt", "c/w.txt", "top.txt"]
    with local_hub_env(monkeypatch, tmp_path, tree_page_size=2) as hub:
        hfh.create_repo(REPO)
        operations = [CommitOperationAdd(name, name.encode()) for name in names]
        hfh.create_commit(REPO, operations=operations, commit_message="many files")
        assert sorted(hfh.list_repo_files(REPO)) == sorted([".gitattributes", *names])
        entries = len(names) + 1 + 3  # files, .gitattributes and the folders a, a/b, c
        tree_calls = [request for request in hub.requests if "/tree/" in request.path]
        assert len(tree_calls) == math.ceil(entries / 2)

        children = {entry.path: type(entry).__name__ for entry in hfh.list_repo_tree(REPO, path_in_repo="a")}
        assert children == {"a/b": "RepoFolder", "a/x.txt": "RepoFile"}
        infos = HfApi().get_paths_info(REPO, ["a/b", "top.txt", "missing.txt"])
        kinds = {info.path: type(info).__name__ for info in infos}
        assert kinds == {"a/b": "RepoFolder", "top.txt": "RepoFile"}


def test_missing_repo_revision_and_file_map_to_client_errors(hub: LocalHub):
    with pytest.raises(RepositoryNotFoundError):
        hfh.model_info("test-user/missing")
    with pytest.raises(RepositoryNotFoundError):
        hfh.hf_hub_download("test-user/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        hfh.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="test-user/missing")
    assert not hfh.repo_exists("test-user/missing")

    hfh.create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        hfh.hf_hub_download(REPO, "config.json")
    with pytest.raises(RevisionNotFoundError):
        hfh.hf_hub_download(REPO, ".gitattributes", revision="0" * 40)
    assert hfh.file_exists(REPO, ".gitattributes")
    assert not hfh.file_exists(REPO, "config.json")


def test_writes_and_whoami_need_the_token(hub: LocalHub, monkeypatch: pytest.MonkeyPatch):
    hfh.create_repo(REPO)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as refused:
        anonymous.create_repo("test-user/other")
    assert refused.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as refused:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert refused.value.response.status_code == 401
    assert not hfh.repo_exists("test-user/other")
    assert anonymous.list_repo_files(REPO) == [".gitattributes"]  # reading a public repo needs no token

    with pytest.raises(HfHubHTTPError, match="Invalid user token") as refused:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").whoami()
    assert refused.value.response.status_code == 401
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LocalTokenNotFoundError):
        HfApi(endpoint=hub.endpoint).whoami()


def test_injected_server_error_fails_the_commit_and_a_retry_succeeds(hub: LocalHub):
    hfh.create_repo(REPO)
    before = hfh.model_info(REPO).sha
    hub.fail_next("POST", r"/commit/main$", status=500)
    with pytest.raises(HfHubHTTPError) as failed:
        hfh.upload_file(path_or_fileobj=b"weights", path_in_repo="weights.bin", repo_id=REPO)
    assert failed.value.response.status_code == 500
    assert hfh.model_info(REPO).sha == before

    retried = hfh.upload_file(path_or_fileobj=b"weights", path_in_repo="weights.bin", repo_id=REPO)
    assert hfh.model_info(REPO).sha == retried.oid != before
    assert Path(hfh.hf_hub_download(REPO, "weights.bin")).read_bytes() == b"weights"
    commit_statuses = [request.status for request in hub.requests if request.path.endswith("/commit/main")]
    assert commit_statuses == [500, 200]


def test_transformers_push_to_hub_and_from_pretrained_round_trip(hub: LocalHub, monkeypatch):
    config = transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, vocab_size=10
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    commit = model.push_to_hub("tiny-bert")  # no namespace: the server puts it under the token's user
    repo_id = f"{hub.username}/tiny-bert"
    assert {"config.json", "model.safetensors", "README.md"} <= set(hfh.list_repo_files(repo_id))

    def assert_same_weights(loaded: torch.nn.Module) -> None:
        expected, actual = model.state_dict(), loaded.state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[name], actual[name]) for name in expected)

    assert_same_weights(transformers.BertModel.from_pretrained(repo_id))
    assert_same_weights(transformers.BertModel.from_pretrained(repo_id, revision=commit.oid))

    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_same_weights(transformers.BertModel.from_pretrained(repo_id))
    assert len(hub.requests) == seen


def test_server_shuts_down_cleanly_and_keeps_repos_on_disk(tmp_path: Path):
    root = tmp_path / "hub"
    with LocalHub(root, token="hf_secret") as hub:
        port = int(hub.endpoint.rsplit(":", 1)[1])
        HfApi(endpoint=hub.endpoint, token="hf_secret").create_repo(REPO)
    assert not hub.running
    with pytest.raises(RuntimeError):
        _ = hub.endpoint
    names = [thread.name for thread in threading.enumerate()]
    assert not [name for name in names if name == "local-hub" or "process_request_thread" in name]
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass

    with LocalHub(root, token="hf_secret") as restarted:
        assert HfApi(endpoint=restarted.endpoint).list_repo_files(REPO) == [".gitattributes"]


def test_resolve_serves_byte_ranges_and_hub_error_headers(tmp_path: Path):
    content = bytes(range(100))
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo(REPO)
        commit = api.upload_file(path_or_fileobj=content, path_in_repo="data.bin", repo_id=REPO)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"{hub.endpoint}/{REPO}/resolve/main/data.bin"
        with opener.open(urllib.request.Request(url, headers={"Range": "bytes=2-5"})) as response:
            assert (response.status, response.read()) == (206, content[2:6])
            assert response.headers["Content-Range"] == "bytes 2-5/100"
        with pytest.raises(urllib.error.HTTPError) as missing:
            opener.open(urllib.request.Request(url.replace("data.bin", "nope.bin"), method="HEAD"))
        missing.value.close()
        assert missing.value.code == 404
        assert missing.value.headers["X-Error-Code"] == "EntryNotFound"
        assert missing.value.headers["X-Repo-Commit"] == commit.oid


@pytest.mark.parametrize(
    "kwargs",
    [{"token": ""}, {"token": "has space"}, {"username": "bad/name"}, {"tree_page_size": 0}],
)
def test_bad_settings_are_rejected(tmp_path: Path, kwargs: dict):
    with pytest.raises(ValueError):
        LocalHub(tmp_path, **kwargs)


@pytest.mark.parametrize(
    "args",
    [("FETCH", "/commit/"), ("POST", "(unclosed"), ("POST", "/commit/", 200), ("POST", "/commit/", 500, 0)],
)
def test_bad_failure_injections_are_rejected(tmp_path: Path, args: tuple):
    with pytest.raises(ValueError):
        LocalHub(tmp_path).fail_next(*args)
