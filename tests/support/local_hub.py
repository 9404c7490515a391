"""An on-disk stand-in for the Hugging Face Hub HTTP API, so Hub code paths run in offline tests.

No Hub is reachable from CI, yet ``push_to_hub``, ``from_pretrained("user/name")``, ``hf_hub_download`` and
``snapshot_download`` must be exercised with the *real* ``huggingface_hub`` client. :class:`LocalHub` serves,
on 127.0.0.1 only, the part of the Hub API that this client calls:

=========================================================  ============================================
route                                                      client calls
=========================================================  ============================================
``GET  /api/whoami-v2``                                    ``whoami`` (token check)
``POST /api/repos/create``, ``DELETE /api/repos/delete``   ``create_repo(exist_ok=...)``, ``delete_repo``
``GET  /api/{models,datasets}/{repo}[/revision/{rev}]``    ``repo_info`` / ``model_info`` (sha, siblings)
``GET  /api/.../tree/{rev}[/{path}]``                      ``list_repo_tree`` / ``list_repo_files`` (paged)
``POST /api/.../paths-info/{rev}``                         ``get_paths_info``
``POST /api/.../preupload/{rev}``                          upload mode of each file: always "regular"
``POST /api/.../commit/{rev}``                             ``create_commit``/``upload_file``/``upload_folder``
``POST /api/validate-yaml``                                README.md metadata check before a commit
``GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}``       ``hf_hub_download``, ``snapshot_download``
=========================================================  ============================================

Why "regular" everywhere: the client asks the preupload endpoint how to send each file and goes through
LFS/Xet only for files the server marks "lfs". Answering "regular" makes every file travel inline (base64 in
the NDJSON commit body), so no LFS batch or Xet storage endpoint is needed, whatever the file size. Downloads
are served directly (no CDN redirect) with the headers the client reads: ``ETag`` (the git blob sha1),
``X-Repo-Commit`` and ``Content-Length``. Errors carry the Hub's ``{"error": ...}`` body and the
``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that the client maps to
``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``RemoteEntryNotFoundError``.

Revisions are the ``main`` branch plus every commit sha: each commit is an immutable manifest, so a pinned
sha keeps resolving to its own files after later commits. Repos live under the directory given at start-up.

Pointing the client at the server
---------------------------------
``huggingface_hub`` copies ``HF_ENDPOINT`` and the cache paths into ``huggingface_hub.constants`` when it is
imported, and the module-level ``huggingface_hub.hf_api.api`` (behind ``huggingface_hub.create_repo``,
``upload_folder``, ...) keeps the endpoint it was built with. Hence:

* a subprocess: pass ``env=hub.client_env(home_dir)`` so the variables exist before it imports anything;
* in-process (pytest): ``with local_hub_env(monkeypatch, tmp_path) as hub: ...`` sets the same variables
  (inherited by subprocesses started inside the block) and patches the values already copied at import.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

if TYPE_CHECKING:
    import pytest

__all__ = ["CLIENT_ENV_VARS_TO_UNSET", "LocalHub", "RecordedRequest", "local_hub_env", "point_client_at"]

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"  # the Hub's rule: \w at both ends
_NAME_RE = re.compile(_NAME)
_COMMIT_SHA_RE = re.compile(r"[0-9a-f]{40}")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/"}
_INJECTABLE_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE"})
# What the Hub puts in the first commit of every new repo.
_INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

# Variables that would override or bypass the local hub if inherited from the caller's environment.
CLIENT_ENV_VARS_TO_UNSET = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HF_OIDC_RESOURCE",
    "HUGGINGFACE_CO_STAGING",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_ASSETS_CACHE",
)


# Variables client_env() sets; point_client_at() sets them in this process too.
_CLIENT_ENV_VARS = (
    "NO_PROXY",
    "no_proxy",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_HUB_DISABLE_TELEMETRY",
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered, so tests can assert which endpoints the client used."""

    method: str
    path: str
    query: str
    status: int


class _HubError(Exception):
    """An HTTP error answered in the Hub's shape: ``{"error": message}`` plus ``X-Error-*`` headers."""

    def __init__(
        self, status: int, message: str, error_code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


@dataclass
class _Request:
    method: str
    path: str  # still percent-encoded, so "%2F" inside a revision or a path stays in its segment
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes

    def param(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as error:
            raise _HubError(400, f"Request body is not valid JSON: {error}", "BadRequest") from error


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
        return cls(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )


@dataclass(frozen=True)
class _Commit:
    oid: str
    title: str
    date: str
    files: dict[str, dict[str, Any]]  # path -> {"oid": git blob sha1, "size": bytes}


def _git_blob_oid(content: bytes) -> str:
    """The id git (and the Hub's ETag) gives a regular file's content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _validate_path_in_repo(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise _HubError(400, f"Invalid path in repo: {path!r}.", "BadRequest")
    return path


class _RepoStore:
    """Repositories on disk: content-addressed blobs plus one immutable JSON manifest per commit.

    Layout: ``<root>/<type>s/<namespace>/<name>/{repo.json, commits/<sha>.json, blobs/<git oid>}``.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock = threading.Lock()

    def _dir(self, repo_type: str, repo_id: str) -> Path:
        return self._root / f"{repo_type}s" / repo_id

    def _write_json(self, path: Path, payload: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)

    def meta(self, repo_type: str, repo_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self._dir(repo_type, repo_id) / "repo.json").read_text())
        except FileNotFoundError:
            return None

    def create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create the repo with the Hub's initial ``.gitattributes`` commit; False if it already exists."""
        with self._lock:
            if self.meta(repo_type, repo_id) is not None:
                return False
            repo_dir = self._dir(repo_type, repo_id)
            commit = self._write_commit(
                repo_dir, None, "initial commit", {".gitattributes": _INITIAL_GITATTRIBUTES}
            )
            meta = {"private": private, "createdAt": commit.date, "refs": {"main": commit.oid}}
            self._write_json(repo_dir / "repo.json", meta)
            return True

    def delete(self, repo_type: str, repo_id: str) -> bool:
        with self._lock:
            if self.meta(repo_type, repo_id) is None:
                return False
            shutil.rmtree(self._dir(repo_type, repo_id))
            return True

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> _Commit | None:
        """The commit a branch name or a full commit sha points to, or None if there is none."""
        meta = self.meta(repo_type, repo_id)
        if meta is None:
            return None
        oid = meta["refs"].get(revision)
        if oid is None and not _COMMIT_SHA_RE.fullmatch(revision):
            return None
        return self._read_commit(self._dir(repo_type, repo_id), oid or revision)

    def blob(self, repo_type: str, repo_id: str, oid: str) -> bytes:
        return (self._dir(repo_type, repo_id) / "blobs" / oid).read_bytes()

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        *,
        title: str,
        parent_commit: str | None,
        additions: dict[str, bytes],
        deleted_files: list[str],
        deleted_folders: list[str],
    ) -> _Commit:
        with self._lock:
            repo_dir = self._dir(repo_type, repo_id)
            meta = self.meta(repo_type, repo_id)
            if meta is None:
                raise _HubError(404, "Repository not found", "RepoNotFound")
            head = meta["refs"].get(branch)
            if head is None:
                if self.resolve(repo_type, repo_id, branch) is not None:
                    raise _HubError(
                        400, f"Cannot commit to {branch!r}: commits go to a branch.", "BadRequest"
                    )
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit is not None and not head.startswith(parent_commit):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(self._read_commit(repo_dir, head).files)
            for path in deleted_files:
                if files.pop(path, None) is None:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                doomed = [path for path in files if path.startswith(prefix)]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for path in doomed:
                    del files[path]
            commit = self._write_commit(repo_dir, head, title, additions, files)
            meta["refs"][branch] = commit.oid
            self._write_json(repo_dir / "repo.json", meta)
            return commit

    def _write_commit(
        self,
        repo_dir: Path,
        parent: str | None,
        title: str,
        additions: dict[str, bytes],
        files: dict[str, dict[str, Any]] | None = None,
    ) -> _Commit:
        files = dict(files or {})
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        for path, content in additions.items():
            oid = _git_blob_oid(content)
            blob = repo_dir / "blobs" / oid
            if not blob.exists():
                tmp = blob.with_name(f".{oid}.{uuid.uuid4().hex}.tmp")
                tmp.write_bytes(content)
                os.replace(tmp, blob)
            files[path] = {"oid": oid, "size": len(content)}
        date = _now()
        # A fresh uuid makes every commit's sha unique, even for identical content, like distinct git commits.
        seed = json.dumps([parent, title, date, uuid.uuid4().hex, sorted(files.items())]).encode()
        commit = _Commit(hashlib.sha1(seed, usedforsecurity=False).hexdigest(), title, date, files)
        payload = {"id": commit.oid, "parent": parent, "title": title, "date": date, "files": files}
        self._write_json(repo_dir / "commits" / f"{commit.oid}.json", payload)
        return commit

    def _read_commit(self, repo_dir: Path, oid: str) -> _Commit | None:
        try:
            payload = json.loads((repo_dir / "commits" / f"{oid}.json").read_text())
        except FileNotFoundError:
            return None
        return _Commit(payload["id"], payload["title"], payload["date"], payload["files"])


@dataclass
class _InjectedFailure:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int


def _tree_entries(commit: _Commit, prefix: str, recursive: bool) -> list[dict[str, Any]] | None:
    """Tree API entries under ``prefix`` (folders first, like the Hub), or None if ``prefix`` is no folder."""
    base = f"{prefix}/" if prefix else ""
    folders: set[str] = set()
    files: list[dict[str, Any]] = []
    for path in sorted(commit.files):
        if not path.startswith(base):
            continue
        parts = path[len(base) :].split("/")
        if recursive:
            folders.update(base + "/".join(parts[:depth]) for depth in range(1, len(parts)))
        elif len(parts) > 1:
            folders.add(base + parts[0])
            continue
        files.append({"type": "file", "path": path, **commit.files[path]})
    if prefix and not files and not folders:
        return None
    folder_entries = [
        {"type": "directory", "path": path, "size": 0, "oid": _folder_oid(commit, path)}
        for path in sorted(folders)
    ]
    return folder_entries + files


def _folder_oid(commit: _Commit, folder: str) -> str:
    listing = [
        (path, info["oid"]) for path, info in sorted(commit.files.items()) if path.startswith(folder + "/")
    ]
    return hashlib.sha1(json.dumps(listing).encode(), usedforsecurity=False).hexdigest()


_Handler = Callable[[_Request, dict[str, str], bool], _Response]


class _HubApp:
    """The Hub API over a :class:`_RepoStore`: routing, auth and the JSON shapes the client parses."""

    def __init__(self, store: _RepoStore, *, token: str, username: str, tree_page_size: int) -> None:
        self.store = store
        self.token = token
        self.username = username
        self.tree_page_size = tree_page_size
        self.base_url = ""  # set once the server knows its port
        self._failures: list[_InjectedFailure] = []
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        repo = rf"(?P<plural>models|datasets)/(?P<repo_id>{_NAME}/{_NAME})"
        self._routes: list[tuple[frozenset[str], re.Pattern[str], _Handler]] = [
            (frozenset({"GET"}), re.compile(r"/api/whoami-v2"), self._whoami),
            (frozenset({"POST"}), re.compile(r"/api/repos/create"), self._create_repo),
            (frozenset({"DELETE"}), re.compile(r"/api/repos/delete"), self._delete_repo),
            (frozenset({"POST"}), re.compile(r"/api/validate-yaml"), self._validate_yaml),
            (frozenset({"GET"}), re.compile(rf"/api/{repo}(?:/revision/(?P<rev>[^/]+))?"), self._repo_info),
            (
                frozenset({"GET"}),
                re.compile(rf"/api/{repo}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
                self._tree,
            ),
            (frozenset({"POST"}), re.compile(rf"/api/{repo}/paths-info/(?P<rev>[^/]+)"), self._paths_info),
            (frozenset({"POST"}), re.compile(rf"/api/{repo}/preupload/(?P<rev>[^/]+)"), self._preupload),
            (frozenset({"POST"}), re.compile(rf"/api/{repo}/commit/(?P<rev>[^/]+)"), self._commit),
            (
                frozenset({"GET", "HEAD"}),
                re.compile(
                    rf"/(?:(?P<plural>datasets)/)?(?P<repo_id>{_NAME}/{_NAME})/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
                ),
                self._resolve,
            ),
        ]

    # -- test controls --

    def add_failure(self, failure: _InjectedFailure) -> None:
        with self._lock:
            self._failures.append(failure)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    # -- dispatch --

    def handle(self, request: _Request) -> _Response:
        try:
            response = self._dispatch(request)
        except _HubError as error:
            response = self._error_response(error)
        except Exception:  # a server bug must reach the client as a 500, not as a dropped connection
            logger.exception("LocalHub failed on %s %s", request.method, request.path)
            response = self._error_response(_HubError(500, "Internal error in LocalHub (see the test log)."))
        with self._lock:
            query = urlencode(request.query, doseq=True)
            self._requests.append(
                RecordedRequest(request.method, unquote(request.path), query, response.status)
            )
        return response

    def _dispatch(self, request: _Request) -> _Response:
        self._raise_injected_failure(request)
        authenticated = self._authenticate(request)
        for methods, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match:
                if request.method not in methods:
                    raise _HubError(405, f"Method {request.method} is not allowed on {request.path}.")
                groups = {
                    key: unquote(value) for key, value in match.groupdict().items() if value is not None
                }
                return handler(request, groups, authenticated)
        raise _HubError(404, f"LocalHub does not serve {request.method} {request.path}.")

    def _raise_injected_failure(self, request: _Request) -> None:
        path = unquote(request.path)
        with self._lock:
            for failure in self._failures:
                if failure.method == request.method and failure.pattern.search(path):
                    failure.remaining -= 1
                    if failure.remaining == 0:
                        self._failures.remove(failure)
                    raise _HubError(
                        failure.status, f"Injected failure ({failure.status}) for {request.method} {path}"
                    )

    def _authenticate(self, request: _Request) -> bool:
        """True for the hub's token, False without credentials; a wrong token is refused like the Hub does."""
        header = request.headers.get("Authorization")
        if header is None:
            return False
        if header != f"Bearer {self.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        return True

    @staticmethod
    def _require_auth(authenticated: bool) -> None:
        if not authenticated:
            raise _HubError(401, "Authentication required: send an 'Authorization: Bearer <token>' header.")

    @staticmethod
    def _error_response(error: _HubError) -> _Response:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.error_code is not None:
            headers["X-Error-Code"] = error.error_code
        return _Response.json({"error": error.message}, error.status, headers)

    def _commit_at(self, repo_type: str, repo_id: str, revision: str, authenticated: bool) -> _Commit:
        """The commit to read, with the Hub's 404s; private repos are invisible without the token."""
        meta = self.store.meta(repo_type, repo_id)
        if meta is None or (meta["private"] and not authenticated):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        commit = self.store.resolve(repo_type, repo_id, revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.base_url}/{_URL_PREFIXES[repo_type]}{repo_id}"

    # -- endpoints --

    def _whoami(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        self._require_auth(authenticated)
        return _Response.json(
            {
                "type": "user",
                "id": f"local-{self.username}",
                "name": self.username,
                "fullname": self.username,
                "email": f"{self.username}@localhost",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": "write"},
                },
            }
        )

    def _repo_from_payload(self, payload: Any) -> tuple[str, str]:
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise _HubError(400, "Expected a JSON object with a 'name'.", "BadRequest")
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise _HubError(400, f"LocalHub serves model and dataset repos, not {repo_type!r}.", "BadRequest")
        namespace, name = payload.get("organization") or self.username, payload["name"]
        if not (_NAME_RE.fullmatch(namespace) and _NAME_RE.fullmatch(name)) or "--" in name or ".." in name:
            raise _HubError(400, f"Invalid repo name {namespace}/{name}.", "BadRequest")
        return repo_type, f"{namespace}/{name}"

    def _create_repo(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        self._require_auth(authenticated)
        payload = request.json()
        repo_type, repo_id = self._repo_from_payload(payload)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = self._repo_url(repo_type, repo_id)
        if not self.store.create(repo_type, repo_id, private):
            message = f"You already created this {repo_type} repo"
            return _Response.json({"error": message, "url": url}, 409, {"X-Error-Message": message})
        return _Response.json({"url": url, "name": repo_id, "id": f"local-{repo_id}"})

    def _delete_repo(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        self._require_auth(authenticated)
        repo_type, repo_id = self._repo_from_payload(request.json())
        if not self.store.delete(repo_type, repo_id):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return _Response.json({})

    def _validate_yaml(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        return _Response.json({"errors": [], "warnings": []})

    def _repo_info(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        repo_type, repo_id = _REPO_TYPES[groups["plural"]], groups["repo_id"]
        commit = self._commit_at(repo_type, repo_id, groups.get("rev", "main"), authenticated)
        meta = self.store.meta(repo_type, repo_id) or {}
        with_blobs = request.param("blobs").lower() in ("1", "true")
        siblings = [
            {"rfilename": path, **({"size": info["size"], "blobId": info["oid"]} if with_blobs else {})}
            for path, info in sorted(commit.files.items())
        ]
        info = {
            "_id": f"local-{repo_id}",
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": meta.get("createdAt", commit.date),
            "private": meta.get("private", False),
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _Response.json(info)

    def _tree(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        repo_type, repo_id = _REPO_TYPES[groups["plural"]], groups["repo_id"]
        commit = self._commit_at(repo_type, repo_id, groups["rev"], authenticated)
        prefix = groups.get("path", "").strip("/")
        entries = _tree_entries(commit, prefix, recursive=request.param("recursive").lower() in ("1", "true"))
        if entries is None:
            raise _HubError(404, f"{prefix} does not exist on {groups['rev']}", "EntryNotFound")
        try:
            start = int(request.param("cursor", "0"))
        except ValueError as error:
            raise _HubError(400, "Invalid cursor.", "BadRequest") from error
        end = start + self.tree_page_size
        headers = {}
        if end < len(entries):  # cursor paging with a GitHub-style Link header, as the client follows it
            query = {key: values for key, values in request.query.items() if key != "cursor"}
            next_url = (
                f"{self.base_url}{request.path}?{urlencode({**query, 'cursor': [str(end)]}, doseq=True)}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        return _Response.json(entries[start:end], headers=headers)

    def _paths_info(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        repo_type, repo_id = _REPO_TYPES[groups["plural"]], groups["repo_id"]
        commit = self._commit_at(repo_type, repo_id, groups["rev"], authenticated)
        form = parse_qs(request.body.decode())
        found = []
        for path in dict.fromkeys(path.strip("/") for path in form.get("paths", [])):
            if path in commit.files:
                found.append({"type": "file", "path": path, **commit.files[path]})
            elif any(other.startswith(path + "/") for other in commit.files):
                found.append({"type": "directory", "path": path, "size": 0, "oid": _folder_oid(commit, path)})
        return _Response.json(found)

    def _preupload(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        self._require_auth(authenticated)
        repo_type, repo_id = _REPO_TYPES[groups["plural"]], groups["repo_id"]
        commit = self._commit_at(repo_type, repo_id, groups["rev"], authenticated)
        payload = request.json()
        files = payload.get("files") if isinstance(payload, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, dict) and "path" in f for f in files):
            raise _HubError(400, "Expected {'files': [{'path': ...}, ...]}.", "BadRequest")
        answers = []
        for file in files:
            answer = {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
            if file["path"] in commit.files:  # lets the client skip files that did not change
                answer["oid"] = commit.files[file["path"]]["oid"]
            answers.append(answer)
        return _Response.json({"files": answers, "commitOid": commit.oid})

    def _commit(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        self._require_auth(authenticated)
        repo_type, repo_id = _REPO_TYPES[groups["plural"]], groups["repo_id"]
        self._commit_at(repo_type, repo_id, groups["rev"], authenticated)
        if request.param("create_pr") in ("1", "true"):
            raise _HubError(400, "LocalHub does not support pull requests (create_pr).", "BadRequest")
        try:
            lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        except ValueError as error:
            raise _HubError(400, f"Commit body is not NDJSON: {error}", "BadRequest") from error
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "A commit starts with a 'header' line.", "BadRequest")
        header = lines[0].get("value") or {}
        additions: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = _validate_path_in_repo(str(value.get("path", "")))
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"Unsupported encoding for {path}.", "BadRequest")
                try:
                    additions[path] = base64.b64decode(value.get("content", ""), validate=True)
                except ValueError as error:
                    raise _HubError(400, f"Invalid base64 content for {path}.", "BadRequest") from error
            elif key == "deletedFile":
                deleted_files.append(path)
            elif key == "deletedFolder":
                deleted_folders.append(path)
            elif key == "lfsFile":
                raise _HubError(
                    400, f"LocalHub stores files inline only; got an LFS pointer for {path}.", "BadRequest"
                )
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}.", "BadRequest")
        commit = self.store.commit(
            repo_type,
            repo_id,
            groups["rev"],
            title=str(header.get("summary") or "Commit"),
            parent_commit=header.get("parentCommit"),
            additions=additions,
            deleted_files=deleted_files,
            deleted_folders=deleted_folders,
        )
        return _Response.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, request: _Request, groups: dict[str, str], authenticated: bool) -> _Response:
        repo_type = _REPO_TYPES[groups.get("plural", "models")]
        commit = self._commit_at(repo_type, groups["repo_id"], groups["rev"], authenticated)
        info = commit.files.get(groups["path"])
        if info is None:  # X-Repo-Commit lets the client cache the file's absence for this commit
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = self.store.blob(repo_type, groups["repo_id"], info["oid"])
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{info["oid"]}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        byte_range = request.headers.get("Range")
        if byte_range is None:
            return _Response(200, content, headers)
        start, end = _parse_range(byte_range, len(content))
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return _Response(206, content[start : end + 1], headers)


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """Inclusive byte bounds of a single ``Range: bytes=a-b`` request, or a 416 error."""
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None or match.groups() == ("", ""):
        raise _HubError(416, f"Unsupported Range {header!r}.", headers={"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    else:
        start, end = max(size - int(last), 0), size - 1
    if start > end or start >= size:
        raise _HubError(
            416, f"Range {header!r} outside 0..{size}.", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end


class _HTTPHandler(BaseHTTPRequestHandler):
    """HTTP/1.0 plumbing around :class:`_HubApp`: one request per connection, so no idle keep-alive thread."""

    server: _HubHTTPServer
    timeout = 30  # seconds a stalled client may hold a handler thread; bounds the join at shutdown

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("LocalHub: " + format, *args)

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            response = _HubApp._error_response(
                _HubError(411, "LocalHub needs a Content-Length on request bodies.")
            )
        else:
            # The body is always read first: answering early would break the client's upload mid-stream.
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            split = urlsplit(self.path)
            request = _Request(self.command, split.path, parse_qs(split.query), self.headers, body)
            response = self.server.app.handle(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # handler threads are joined by server_close(): nothing outlives stop()
    block_on_close = True
    request_queue_size = 64  # snapshot_download opens several connections at once

    def __init__(self, app: _HubApp) -> None:
        super().__init__((_HOST, 0), _HTTPHandler)
        self.app = app


class LocalHub:
    """A Hugging Face Hub API server on 127.0.0.1 (random free port) storing repos under ``root_dir``.

    Use as a context manager: ``with LocalHub(tmp_path / "hub") as hub: HfApi(endpoint=hub.endpoint, ...)``.
    Only ``token`` authenticates; reads need no token (private repos aside); writes and ``whoami`` do. Repos
    created without an organization go to ``username``. ``tree_page_size`` is the number of tree entries
    per page (the Hub uses 1000); lower it to exercise the client's paging.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        *,
        token: str = "hf_test_token",
        username: str = "test-user",
        tree_page_size: int = 1000,
    ) -> None:
        if not isinstance(token, str) or not token or any(char.isspace() for char in token):
            raise ValueError(f"token must be a non-empty string without whitespace, got {token!r}.")
        if not isinstance(username, str) or not _NAME_RE.fullmatch(username):
            raise ValueError(
                f"username must be a valid Hub name (letters, digits, '-', '_', '.'), got {username!r}."
            )
        if isinstance(tree_page_size, bool) or not isinstance(tree_page_size, int) or tree_page_size < 1:
            raise ValueError(f"tree_page_size must be a positive int, got {tree_page_size!r}.")
        self.root_dir = Path(root_dir)
        self.token = token
        self.username = username
        self._app = _HubApp(
            _RepoStore(self.root_dir), token=token, username=username, tree_page_size=tree_page_size
        )
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalHub:
        if self._server is not None:
            raise RuntimeError("LocalHub is already running; call stop() before starting it again.")
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self._server = _HubHTTPServer(self._app)
        self._app.base_url = f"http://{_HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and join the server thread and every request thread; safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:41234``."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running: use it as a context manager or call start() first.")
        return self._app.base_url

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered so far (unquoted path), in arrival order."""
        return self._app.requests

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests whose method matches and whose path matches ``path_regex``
        (``re.search`` on the unquoted path, e.g. ``r"/commit/"``) with ``status`` and a Hub-style error body.

        The client retries some calls itself on 408/429/5xx, sleeping 1, 2, 4, 8, 8 s between 6 attempts: the
        preupload POST, tree pages, and the commit POST of ``upload_folder`` (its pipelined path, taken when
        ``hf_xet`` is installed). The commit POST of ``create_commit``/``upload_file``/``push_to_hub`` is sent
        once, so ``fail_next("POST", r"/commit/")`` makes those raise ``HfHubHTTPError`` at once.
        """
        method = method.upper() if isinstance(method, str) else method
        if method not in _INJECTABLE_METHODS:
            raise ValueError(f"method must be one of {sorted(_INJECTABLE_METHODS)}, got {method!r}.")
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error code (400-599), got {status!r}.")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int, got {times!r}.")
        try:
            pattern = re.compile(path_regex)
        except (re.error, TypeError) as error:
            raise ValueError(
                f"path_regex must be a valid regular expression, got {path_regex!r}: {error}"
            ) from error
        self._app.add_failure(_InjectedFailure(method, pattern, status, times))

    def client_env(
        self, home_dir: str | os.PathLike[str], base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """A full environment for a subprocess whose Hub client must use this server and ``home_dir`` caches.

        ``base`` defaults to ``os.environ``; variables that would bypass the server (offline flags, other
        tokens, staging) are removed. The child reads them at import, so no patching is needed there.
        """
        home = Path(home_dir)
        env = {key: value for key, value in (os.environ if base is None else base).items()}
        for name in CLIENT_ENV_VARS_TO_UNSET:
            env.pop(name, None)
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), _HOST, "localhost"]))
        env.update(
            {
                "NO_PROXY": no_proxy,  # a proxy from the environment must not intercept 127.0.0.1
                "no_proxy": no_proxy,
                "HF_ENDPOINT": self.endpoint,
                "HF_TOKEN": self.token,
                "HF_HOME": str(home),
                "HF_HUB_CACHE": str(home / "hub"),
                "HF_XET_CACHE": str(home / "xet"),
                "HF_TOKEN_PATH": str(home / "token"),
                "HF_HUB_DISABLE_TELEMETRY": "1",
            }
        )
        return env


def point_client_at(hub: LocalHub, monkeypatch: pytest.MonkeyPatch, home_dir: str | os.PathLike[str]) -> None:
    """Make this process's ``huggingface_hub`` (and an already imported transformers/datasets) use ``hub``.

    Sets the environment variables of :meth:`LocalHub.client_env` (so subprocesses inherit them) and patches
    the copies ``huggingface_hub`` made at import time: ``constants.ENDPOINT``, the resolve-URL template,
    cache/token paths, the offline flag, and the endpoint of the module-level ``huggingface_hub.hf_api.api``.
    ``monkeypatch`` undoes all of it at teardown.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    env = hub.client_env(home_dir)
    for name in CLIENT_ENV_VARS_TO_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name in _CLIENT_ENV_VARS:
        monkeypatch.setenv(name, env[name])

    home = Path(home_dir)
    required = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_TOKEN_PATH": env["HF_TOKEN_PATH"],
        "HF_HUB_OFFLINE": False,
    }
    for name, value in required.items():  # raising=True: a renamed constant must fail loudly, not be missed
        monkeypatch.setattr(constants, name, value)
    optional = {
        "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", frozenset()) | {_HOST}),
    }
    for name, value in optional.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    # Origins whose redirects keep the token: LocalHub never redirects, but it should count as a Hub.
    if hasattr(_http, "_HUB_ORIGINS"):
        origin = ("http", _HOST, int(hub.endpoint.rsplit(":", 1)[1]))
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {origin}))

    # transformers caches an HfApi built from constants.ENDPOINT; drop it so the next call rebuilds it.
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and hasattr(datasets_config, "HF_ENDPOINT"):
        monkeypatch.setattr(datasets_config, "HF_ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            datasets_config,
            "HUB_DATASETS_URL",
            hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        )
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False, raising=False)


@contextmanager
def local_hub_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: str | os.PathLike[str], **hub_kwargs: Any
) -> Iterator[LocalHub]:
    """Start a :class:`LocalHub` and point this process's Hub client at it, for the duration of the block.

    Repos are stored in ``tmp_path/"local-hub"``; ``HF_HOME`` (caches, token file) is ``tmp_path/"hf-home"``.
    ``hub_kwargs`` go to :class:`LocalHub` (``token``, ``username``, ``tree_page_size``). Typical fixture::

        @pytest.fixture
        def hub(monkeypatch, tmp_path):
            with local_hub_env(monkeypatch, tmp_path) as hub:
                yield hub

    Import transformers/datasets before entering if the test uses them: their import-time copies of the
    endpoint are patched only when already imported. A subprocess started inside the block inherits the
    environment (or use ``hub.client_env(home)`` explicitly).
    """
    from huggingface_hub import close_session

    tmp = Path(tmp_path)
    with LocalHub(tmp / "local-hub", **hub_kwargs) as hub:
        point_client_at(hub, monkeypatch, tmp / "hf-home")
        close_session()  # the shared HTTP client is rebuilt with the environment above (proxy settings)
        try:
            yield hub
        finally:
            close_session()  # drop pooled connections to the server about to stop
            transformers_hub = sys.modules.get("transformers.utils.hub")
            if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
                # Built during the block with our endpoint: drop it rather than leak a dead endpoint.
                transformers_hub._hf_api = None
