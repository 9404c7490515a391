"""Several backbones as one model: `CopaBackboneSet`, its features [N, B, d] and their cache, SUR and URT
end to end (heads, the URT layer and its training, 1 vs 2 processes), narrow single-domain checkpoints,
the CLI, and the errors for a set that does not match what was fitted on another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hf_copa
from hf_copa import CopaBackboneSet, CopaConfig, CopaForFewShotClassification, CopaModel
from hf_copa.cli import main
from hf_copa.conversion import convert_url_checkpoint
from hf_copa.evaluation import Domain, evaluate
from hf_copa.features import extract_row_features
from hf_copa.learners import get_learner
from hf_copa.learners.urt import URT_LAYER_CONFIG, URT_LAYER_WEIGHTS, load_urt_layer
from hf_copa.training.config import URTTrainingConfig
from hf_copa.training.urt import draw_training_episodes, train_urt
from hf_copa.validation import CopaValueError

from .conftest import REPO_ROOT, tiny_backbone
from .support.local_hub import local_hub_env
from .test_training import synthetic_domain

NAMES = ["ilsvrc_2012", "omniglot", "aircraft"]


DOMAINS = {"shapes": synthetic_domain(12, 10, seed=1), "colours": synthetic_domain(10, 10, seed=2)}


def load_synthetic(path: str, split: str):
    return DOMAINS[path]


def make_set(seeds=(0, 1, 2), names=NAMES) -> CopaBackboneSet:
    return CopaBackboneSet([(n, tiny_backbone(seed=s)) for n, s in zip(names, seeds, strict=True)])


@pytest.fixture(scope="module")
def backbone_set() -> CopaBackboneSet:
    return make_set()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [np.asarray(DOMAINS["shapes"][i]["image"]) for i in range(0, 120, 6)]


# --- the set and its features ----------------------------------------------------------------------------


def test_features_stack_the_members_features_in_order(backbone_set, images):
    features = backbone_set.extract_features(images)
    assert features.shape == (len(images), 3, backbone_set.feature_dim)
    for b, member in enumerate(backbone_set.members):
        assert torch.equal(features[:, b], member.extract_features(images))


def test_one_backbone_runs_at_a_time(backbone_set, images):
    """Every batch goes through one member before the next member starts: never B backbones' activations."""
    order = []
    hooks = [
        member.register_forward_hook(lambda module, args, out, b=b: order.append(b))
        for b, member in enumerate(backbone_set.members)
    ]
    try:
        backbone_set.extract_features(images, batch_size=4)
    finally:
        for hook in hooks:
            hook.remove()
    assert order == sorted(order) and order.count(0) == 5 and set(order) == {0, 1, 2}


def test_the_cache_holds_each_backbone_once_and_a_member_alone_reuses_it(backbone_set, tmp_path):
    dataset = DOMAINS["shapes"]
    rows = np.arange(0, 60, 3)
    stacked = extract_row_features(backbone_set, dataset, rows, cache_dir=tmp_path, progress=False)
    assert stacked[rows].shape == (len(rows), 3, backbone_set.feature_dim)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # one entry per backbone
    alone = extract_row_features(backbone_set.members[1], dataset, rows, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert torch.equal(alone[rows], stacked[rows][:, 1])
    again = extract_row_features(backbone_set, dataset, rows, cache_dir=tmp_path, progress=False)
    assert torch.equal(again.features, stacked.features)
    with pytest.raises(CopaValueError, match="pooled features"):
        extract_row_features(backbone_set, dataset, rows, spatial=True, progress=False)


def test_a_bundled_set_round_trips_and_a_changed_member_is_refused(backbone_set, images, tmp_path):
    folder = backbone_set.save_pretrained(tmp_path / "set")
    manifest = json.loads((folder / "backbone_set.json").read_text())
    assert [e["name"] for e in manifest["backbones"]] == NAMES
    loaded = CopaBackboneSet.from_pretrained(folder)
    assert loaded.names == NAMES and loaded.identity() == backbone_set.identity()
    assert torch.equal(loaded.extract_features(images), backbone_set.extract_features(images))
    assert "3 CoPA backbones" in (folder / "README.md").read_text()
    # A member's weights replaced behind the manifest's back: the fingerprints no longer match.
    other = tiny_backbone(seed=7)
    other.save_pretrained(folder / manifest["backbones"][1]["path"])
    with pytest.raises(CopaValueError, match=r"weights of \['omniglot'\] differ"):
        CopaBackboneSet.from_pretrained(folder)


def test_a_set_of_hub_members_is_saved_by_reference_and_pushed(backbone_set, images, tmp_path, monkeypatch):
    with local_hub_env(monkeypatch, tmp_path) as hub:
        for name, member in backbone_set.feature_members():
            member.push_to_hub(f"{hub.username}/{name}")
        members = [(n, CopaModel.from_pretrained(f"{hub.username}/{n}")) for n in NAMES]
        referenced = CopaBackboneSet(members).save_pretrained(tmp_path / "referenced", bundle=False)
        entries = json.loads((referenced / "backbone_set.json").read_text())["backbones"]
        assert all(len(e["revision"]) == 40 and e["repo_id"].endswith(e["name"]) for e in entries)
        assert not (referenced / "backbones").exists()
        loaded = CopaBackboneSet.from_pretrained(referenced)
        assert torch.equal(loaded.extract_features(images), backbone_set.extract_features(images))
        backbone_set.push_to_hub(f"{hub.username}/the-set")
        from_hub = CopaBackboneSet.from_pretrained(f"{hub.username}/the-set")
        assert from_hub.identity() == backbone_set.identity() and len(from_hub.revision) == 40
    with pytest.raises(CopaValueError, match="not loaded from the Hub"):
        backbone_set.save_pretrained(tmp_path / "local-members", bundle=False)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (lambda: [("a", tiny_backbone())], "at least two backbones"),
        (lambda: [("a", tiny_backbone()), ("a", tiny_backbone(1))], r"unique; \['a'\]"),
        (lambda: [("a", tiny_backbone()), ("b", tiny_backbone(1, hidden_sizes=[8, 8, 16, 8]))], "same d"),
        (
            lambda: [("a", tiny_backbone()), ("b", tiny_backbone(1, image_size=48))],
            "prepare images differently",
        ),
        (lambda: [("a", tiny_backbone()), ("b/c", tiny_backbone(1))], "without '/'"),
        (lambda: [("a", tiny_backbone()), ("b", torch.nn.Linear(2, 2))], "a set holds backbones"),
    ],
)
def test_a_set_that_cannot_stack_its_features_is_refused(members, message):
    with pytest.raises((CopaValueError, TypeError), match=message):
        CopaBackboneSet(members())


def test_damaged_set_folders_are_clear_errors(backbone_set, tmp_path):
    with pytest.raises(CopaValueError, match="no backbone_set.json"):
        CopaBackboneSet.from_pretrained(tmp_path)
    folder = backbone_set.save_pretrained(tmp_path / "set")
    (folder / "backbone_set.json").write_text("{not json")
    with pytest.raises(CopaValueError, match="not valid JSON"):
        CopaBackboneSet.from_pretrained(folder)
    (folder / "backbone_set.json").write_text(json.dumps({"format_version": 1, "backbones": [{"name": 3}]}))
    with pytest.raises(CopaValueError, match="must list"):
        CopaBackboneSet.from_pretrained(folder)
    folder = backbone_set.save_pretrained(tmp_path / "set2")
    manifest = json.loads((folder / "backbone_set.json").read_text())
    manifest["backbones"][2]["path"] = "backbones/missing"
    (folder / "backbone_set.json").write_text(json.dumps(manifest))
    with pytest.raises(CopaValueError, match="which it does not hold"):
        CopaBackboneSet.from_pretrained(folder)


# --- SUR -------------------------------------------------------------------------------------------------


def test_sur_heads_record_their_set_and_refuse_another(backbone_set, images, tmp_path):
    labels = [i % 4 for i in range(len(images))]
    head = backbone_set.adapt(images, labels, method="sur")
    assert head.selection.shape == (3, 1) and len(head.train_losses) == 40
    assert head.backbone_set == backbone_set.identity()
    logits = backbone_set.logits(head, images)
    assert logits.shape == (len(images), 4)
    folder = backbone_set.save_head(head, ["a", "b", "c", "d"], tmp_path / "head")
    loaded, names = backbone_set.load_head(folder)
    assert names == ["a", "b", "c", "d"] and torch.equal(loaded.selection, head.selection)
    assert torch.allclose(backbone_set.logits(loaded, images), logits)
    other = make_set(seeds=(0, 1, 3))
    with pytest.raises(CopaValueError, match=r"weights of \['aircraft'\] differ"):
        other.load_head(folder)
    with pytest.raises(
        CopaValueError, match=r"fitted on backbones \['ilsvrc_2012', 'omniglot', 'aircraft'\]"
    ):
        make_set(names=["a", "b", "c"]).logits(loaded, images)
    with pytest.raises(CopaValueError, match="load_head"):
        CopaForFewShotClassification.from_pretrained(folder)


def test_sur_refuses_one_backbones_features_and_one_backbone_methods_refuse_a_set(backbone_set):
    with pytest.raises(CopaValueError, match=r"shape \[N, B, d\] \(one backbone's features"):
        hf_copa.adapt(torch.randn(10, 8), torch.arange(10) % 2, method="sur")
    with pytest.raises(CopaValueError, match="works on one backbone"):
        get_learner("copa").check_model(backbone_set)
    with pytest.raises(CopaValueError, match="pass a backbone set"):
        get_learner("sur").check_model(tiny_backbone())
    head = hf_copa.adapt(torch.randn(10, 3, 8), torch.arange(10) % 2, method="sur")
    with pytest.raises(CopaValueError, match=r"fitted on \(3, 8\)"):
        head.logits(torch.randn(4, 2, 8))


# --- URT -------------------------------------------------------------------------------------------------


def urt_config(**overrides) -> URTTrainingConfig:
    settings = {"sources": ["shapes", "colours"], "episodes": 8, "hidden_dim": 16, "protocol": "5-way-1-shot"}
    return URTTrainingConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def urt_layer(backbone_set, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("urt")
    train_urt(backbone_set, urt_config(log_every=4), folder, progress=False, load_dataset=load_synthetic)
    return folder


def test_training_episodes_follow_the_official_source_mix():
    config = urt_config(episodes=2000)
    episodes = draw_training_episodes([DOMAINS["shapes"], DOMAINS["colours"], DOMAINS["shapes"]], config)
    sources = np.bincount([s for s, _ in episodes], minlength=3) / 2000
    assert abs(sources[0] - 0.5) < 0.05 and abs(sources[1] - 0.25) < 0.05 and abs(sources[2] - 0.25) < 0.05
    assert [s for s, _ in draw_training_episodes(list(DOMAINS.values()), urt_config())] == [
        s for s, _ in draw_training_episodes(list(DOMAINS.values()), urt_config())
    ]


def test_a_trained_urt_layer_pins_its_set_and_is_used_like_any_learner(backbone_set, urt_layer, images):
    config = json.loads((urt_layer / URT_LAYER_CONFIG).read_text())
    assert config["backbone_set"] == backbone_set.identity() and config["heads"] == 2
    assert config["training"]["episodes"] == 8 and config["training"]["penalty"] == 0.1
    log = json.loads((urt_layer / "urt_training_log.json").read_text())
    assert [r["step"] for r in log["history"]] == [4, 8]
    layer, _ = load_urt_layer(str(urt_layer))
    stored = load_file(urt_layer / URT_LAYER_WEIGHTS)
    assert not torch.equal(stored["temperature"], torch.tensor(10.0))  # it trained
    labels = [i % 4 for i in range(len(images))]
    head = backbone_set.adapt(images, labels, method="urt", urt_head=str(urt_layer))
    assert head.selection.shape == (3, 2) and head.scale == pytest.approx(float(stored["temperature"]))
    assert torch.allclose(head.selection.sum(0), torch.ones(2))  # a softmax over backbones, per head
    assert backbone_set.logits(head, images).shape == (len(images), 4)
    with pytest.raises(CopaValueError, match=r"URT layer .* does not match this backbone set"):
        make_set(seeds=(3, 1, 2)).adapt(images, labels, method="urt", urt_head=str(urt_layer))
    with pytest.raises(CopaValueError, match="urt needs a trained URT layer"):
        backbone_set.adapt(images, labels, method="urt")
    with pytest.raises(CopaValueError, match="holds no URT layer"):
        get_learner("urt", urt_head=str(urt_layer.parent)).layer()


def test_a_urt_layer_goes_to_the_hub_and_back_pinned_to_its_commit(urt_layer, tmp_path, monkeypatch):
    from hf_copa.learners.urt import push_urt_layer

    with local_hub_env(monkeypatch, tmp_path) as hub:
        commit = push_urt_layer(urt_layer, f"{hub.username}/urt")
        for name in (f"{hub.username}/urt", f"{hub.username}/urt@{commit.oid}"):
            layer, config = load_urt_layer(name)
            assert config == json.loads((urt_layer / URT_LAYER_CONFIG).read_text())
            assert torch.equal(layer.temperature, load_file(urt_layer / URT_LAYER_WEIGHTS)["temperature"])
        with pytest.raises(CopaValueError, match="neither a folder written by"):
            load_urt_layer(f"{hub.username}/no-such-layer")


def test_evaluate_runs_sur_and_urt_on_a_set_and_refuses_a_mismatch(backbone_set, urt_layer):
    domain = Domain("colours", "colours", "test")
    overrides = {"urt": {"urt_head": str(urt_layer)}}
    result = evaluate(
        backbone_set,
        [domain],
        methods=("sur", "urt"),
        protocol="5-way-1-shot",
        num_episodes=4,
        overrides=overrides,
        progress=False,
        load_dataset=lambda d: DOMAINS[d.path],
    )
    for method in ("sur", "urt"):
        assert len(result.episode_accuracies["colours"][method]) == 4
        assert 0 <= result.results["colours"][method]["mean"] <= 100
    with pytest.raises(CopaValueError, match="does not match this backbone set"):
        evaluate(
            make_set(seeds=(0, 5, 2)),
            [domain],
            methods=("urt",),
            protocol="5-way-1-shot",
            num_episodes=2,
            overrides=overrides,
            progress=False,
            load_dataset=lambda d: DOMAINS[d.path],
        )


def test_bad_urt_training_settings_are_clear_errors(backbone_set, tmp_path):
    for overrides, message in (
        ({"sources": []}, "at least one training source"),
        ({"episodes": 5, "episodes_per_step": 2}, "multiple of"),
        ({"first_source_probability": 1.5}, r"in \[0, 1\]"),
        ({"lr": 0.0}, "lr"),
    ):
        with pytest.raises(CopaValueError, match=message):
            train_urt(
                backbone_set, urt_config(**overrides), tmp_path, progress=False, load_dataset=load_synthetic
            )


def test_urt_trains_the_same_layer_on_one_and_two_processes(tmp_path):
    """torchrun, 2 CPU processes: each takes one of every step's 2 episodes; gradients averaged."""
    for name, dataset in DOMAINS.items():
        dataset.to_parquet(str(tmp_path / name / "data" / "train-00000-of-00001.parquet"))
    make_set().save_pretrained(tmp_path / "set")
    args = [
        "train-urt", "--model", str(tmp_path / "set"), "--dataset", str(tmp_path / "shapes"),
        "--dataset", str(tmp_path / "colours"), "--episodes", "8", "--episodes-per-step", "2",
        "--hidden-dim", "16", "--protocol", "5-way-1-shot", "--log-every", "2", "--no-progress",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    one = subprocess.run(
        [sys.executable, "-m", "hf_copa.cli", *args, "--output", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hf_copa.cli",
    ]
    two = subprocess.run(
        [*launch, *args, "--output", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [json.loads((tmp_path / run / "urt_training_log.json").read_text()) for run in ("one", "two")]
    assert [log["processes"] for log in logs] == [1, 2]
    for first, second in zip(logs[0]["history"], logs[1]["history"], strict=True):
        assert first["loss"] == pytest.approx(second["loss"], rel=1e-5, abs=1e-6)
    layers = [load_file(tmp_path / run / URT_LAYER_WEIGHTS) for run in ("one", "two")]
    assert layers[0].keys() == layers[1].keys()
    for name in layers[0]:
        torch.testing.assert_close(layers[0][name], layers[1][name], rtol=1e-5, atol=1e-6)


# --- URL's single-domain networks at any width, the CLI ----------------------------------------------------


def narrow_sdl_checkpoint(folder: Path, source: str | None, width: int = 4, seed: int = 0) -> Path:
    """URL's sdl layout (models/resnet18.py's state_dict + a linear cls_fn, CheckPointer's dict), width W."""
    torch.manual_seed(seed)
    model = CopaModel(CopaConfig(embedding_size=width, hidden_sizes=[width, 2 * width, 4 * width, 8 * width]))
    state = dict(model.state_dict())
    state["cls_fn.weight"], state["cls_fn.bias"] = torch.randn(5, 8 * width), torch.randn(5)
    args = {"model.name": "net"} | ({"data.train": [source]} if source else {})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "args": args, "state_dict": state}, folder / "model_best.pth.tar")
    return folder / "model_best.pth.tar"


def test_a_narrow_single_domain_checkpoint_converts_with_its_widths(tmp_path, images):
    path = narrow_sdl_checkpoint(tmp_path / "ckpt", "dtd")
    folder = convert_url_checkpoint(path, tmp_path / "dtd")
    config = CopaConfig.from_pretrained(folder)
    assert (config.embedding_size, config.hidden_sizes, config.training_domains) == (
        4,
        [4, 8, 16, 32],
        ["dtd"],
    )
    state = torch.load(path, weights_only=True)["state_dict"]
    loaded = CopaModel.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items() if not k.startswith("cls_fn"))
    state["layer3.1.conv2.weight"] = torch.zeros(16, 8, 3, 3)
    torch.save({"epoch": 1, "args": {"data.train": ["dtd"]}, "state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(
        ValueError, match=r"layer3\.1\.conv2\.weight is \(16, 8, 3, 3\), expected \(16, 16, 3, 3\)"
    ):
        convert_url_checkpoint(tmp_path / "bad.pth.tar", tmp_path / "bad")


def test_cli_bundles_converted_networks_and_evaluates_sur(tmp_path, capsys):
    datasets_dir = tmp_path / "data"
    DOMAINS["shapes"].to_parquet(str(datasets_dir / "shapes" / "data" / "test-00000-of-00001.parquet"))
    members = []
    for index, source in enumerate(("ilsvrc_2012", "omniglot", "fungi")):
        path = narrow_sdl_checkpoint(tmp_path / "ckpt" / source, source, seed=index)
        assert main(["convert", str(path), str(tmp_path / "models" / source)]) == 0
        members.append(str(tmp_path / "models" / source))
    assert main(["bundle", *members, "--output", str(tmp_path / "set")]) == 0
    assert "3 backbones (ilsvrc_2012, omniglot, fungi)" in capsys.readouterr().out
    common = ["--dataset", str(datasets_dir / "shapes"), "--protocol", "5-way-1-shot", "--episodes", "3"]
    common += ["--no-progress", "--cache-dir", "none"]
    assert main(["evaluate", "--model", str(tmp_path / "set"), "--method", "sur", *common]) == 0
    assert "| shapes |  |" in capsys.readouterr().out
    for argv, message in (
        (["evaluate", "--model", str(tmp_path / "set"), "--method", "ncc", *common], "works on one backbone"),
        (["evaluate", "--method", "sur", *common], "pass --model SET"),
        (["evaluate", "--model", members[0], "--method", "sur", *common], "holds no backbone set"),
        (
            ["evaluate", "--model", str(tmp_path / "set"), "--method", "sur", "--urt-head", "x", *common],
            "--urt-head",
        ),
        (["bundle", "a=" + members[0], "--output", str(tmp_path / "set")], "not empty|non-empty|already"),
    ):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert any(m in error for m in message.split("|")), error
    CopaModel(CopaConfig(embedding_size=4, hidden_sizes=[4, 8, 16, 32])).save_pretrained(tmp_path / "anon")
    assert main(["bundle", members[0], str(tmp_path / "anon"), "--output", str(tmp_path / "set3")]) == 2
    assert "give the member as NAME=MODEL" in capsys.readouterr().err
