"""Mistakes a user makes, each caught at its root: no wrong answer with exit status 0, no lost work, no raw
traceback. One test per finding of issue 14 (the Space's are in test_space_app.py), driving the real entry
point: the `hf-copa` command (in a subprocess where that is how a user meets it) or the Python API."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import hf_copa
from hf_copa.cli import main
from hf_copa.folders import SkippedFilesWarning, load_class_folders, query_images

from .conftest import REPO_ROOT, tiny_backbone

SAMPLES = REPO_ROOT / "hf_copa" / "assets" / "samples" / "quickdraw"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hf_copa.cli", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


# --- 1. a model that is not a CoPA backbone ------------------------------------------------------------


@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("models")
    vit = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16
    )
    ViTModel(vit).save_pretrained(root / "vit")
    ResNetModel(ResNetConfig(hidden_sizes=[8, 8, 8, 8], embedding_size=8)).save_pretrained(root / "resnet")
    copa = tiny_backbone()
    copa.save_pretrained(root / "copa")
    (root / "config_only").mkdir()
    copa.config.save_pretrained(root / "config_only")
    (root / "missing_weights").mkdir()
    copa.config.save_pretrained(root / "missing_weights")
    weights = load_file(root / "copa" / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("layer4")}
    save_file(kept, root / "missing_weights" / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.mark.parametrize(
    ("folder", "phrases"),
    [
        ("vit", ["'vit' model", "ViTModel", "not a CoPA backbone"]),
        ("resnet", ["'resnet' model", "not a CoPA backbone"]),
        (
            "missing_weights",
            ["not a complete CoPA backbone", "weights are missing", "layer4.0.bn1.bias", "more"],
        ),
        ("config_only", ["There are no weights in", "config_only"]),
        ("does/not/exist", ["does not exist"]),
    ],
)
def test_classify_refuses_what_is_not_a_copa_backbone(other_models, folder, phrases):
    model = str(other_models / folder)
    completed = run_cli(
        "classify", "--model", model, str(SAMPLES / "support"), str(SAMPLES / "query" / "fish")
    )
    assert completed.returncode == 2, completed.stdout
    message = completed.stderr
    assert message.startswith("hf-copa: error:") and "Traceback" not in message
    assert all(p in message for p in phrases), message
    assert "MISSING" not in message and "->" not in completed.stdout  # no predictions


def test_evaluate_refuses_another_model_type_before_any_episode(other_models, tiny_domain, capsys):
    _, dataset = tiny_domain
    assert main(evaluate_arguments(other_models / "vit", dataset)) == 2
    captured = capsys.readouterr()
    assert "'vit' model" in captured.err and "| domain |" not in captured.out


def test_the_python_api_refuses_them_too(other_models):
    with pytest.raises(ValueError, match="'vit' model"):
        hf_copa.CopaModel.from_pretrained(other_models / "vit")
    with pytest.raises(ValueError, match="missing"):
        hf_copa.CopaModel.from_pretrained(other_models / "missing_weights")
    assert isinstance(hf_copa.CopaModel.from_pretrained(other_models / "copa"), hf_copa.CopaModel)


def test_the_default_model_loads_through_its_folder_and_keeps_its_name():
    from transformers import AutoModel

    hf_copa.register_auto_classes()
    model = AutoModel.from_pretrained(hf_copa.default_model_path())
    assert model.config._name_or_path == hf_copa.DEFAULT_MODEL
    paths, labels = load_class_folders(SAMPLES / "support")
    classifier = model.adapt(paths, labels, method="ncc")
    from hf_copa.heads import base_model_reference

    assert base_model_reference(classifier.copa).name_or_path == hf_copa.DEFAULT_MODEL  # not an install path


# --- 2. support and query folders --------------------------------------------------------------------------


def write_png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def test_hidden_folders_are_no_class_and_are_reported(tmp_path):
    for name in ("cat", "dog"):
        write_png(tmp_path / name / "a.png")
    write_png(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    write_png(tmp_path / "cat" / ".hidden" / "b.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.warns(SkippedFilesWarning) as caught:
        paths, labels = load_class_folders(tmp_path)
    assert sorted(set(labels)) == ["cat", "dog"] and len(paths) == 2
    messages = " ".join(str(w.message) for w in caught)
    assert ".ipynb_checkpoints" in messages and ".hidden" in messages and "notes.txt" in messages


def test_class_and_query_folders_are_read_at_any_depth(tmp_path):
    write_png(tmp_path / "support" / "cat" / "more" / "deep.png")
    write_png(tmp_path / "support" / "dog" / "a.png")
    write_png(tmp_path / "query" / "x.png")
    write_png(tmp_path / "query" / "sub" / "y.png")
    paths, labels = load_class_folders(tmp_path / "support")
    assert labels == ["cat", "dog"]
    assert [p.name for p in query_images([tmp_path / "query"])] == ["y.png", "x.png"]


def test_classify_reads_nested_queries_and_says_what_it_skipped(tmp_path, capsys):
    support = tmp_path / "support"
    for index, name in enumerate(("dark", "light")):
        for shot in range(2):
            write_png(support / name / f"{shot}.png", value=40 + 170 * index + shot)
    write_png(support / ".ipynb_checkpoints" / "dark" / "0.png")
    write_png(tmp_path / "query" / "one" / "q.png", 45)
    write_png(tmp_path / "query" / "two" / "r.png", 210)
    arguments = ["classify", str(support), str(tmp_path / "query"), "--method", "ncc", "--json"]
    assert main(arguments) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 2
    assert "note: Not read under" in captured.err and ".ipynb_checkpoints" in captured.err


# --- 4. no lost work ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_domain(tmp_path_factory, datasets_dir) -> tuple[Path, Path]:
    import datasets

    root = tmp_path_factory.mktemp("domain")
    tiny_backbone().save_pretrained(root / "model")
    split = datasets.load_dataset(str(datasets_dir / "mnist"), split="test")
    labels = np.asarray(split["label"])
    rows = [int(r) for c in range(6) for r in np.flatnonzero(labels == c)[:8]]
    (root / "mnist_small" / "data").mkdir(parents=True)
    split.select(rows).to_parquet(str(root / "mnist_small" / "data" / "test-00000-of-00001.parquet"))
    return root / "model", root / "mnist_small"


def evaluate_arguments(model: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--episodes",
        "3",
        "--method",
        "ncc",
        "--cache-dir",
        "none",
        "--no-progress",
        *extra,
    ]


def test_evaluate_creates_the_output_folder_and_writes_the_json_atomically(tiny_domain, tmp_path, capsys):
    model, dataset = tiny_domain
    output = tmp_path / "dir" / "that" / "does" / "not" / "exist" / "results.json"
    assert main(evaluate_arguments(model, dataset, "--output", str(output))) == 0
    assert json.loads(output.read_text())["results"]["mnist_small"]["ncc"]["episodes"] == 3
    assert [p.name for p in output.parent.iterdir()] == ["results.json"]  # no temporary file left


def test_an_unwritable_output_fails_before_any_work(tiny_domain, tmp_path, capsys, monkeypatch):
    import hf_copa.evaluation as evaluation

    model, dataset = tiny_domain
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluation ran"))
    assert main(evaluate_arguments(model, dataset, "--output", str(blocker / "results.json"))) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert main(evaluate_arguments(model, dataset, "--output", str(tmp_path))) == 2
    assert "is a folder" in capsys.readouterr().err


def test_training_refuses_a_non_empty_output_folder(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    assert main(["train", "--dataset", "x", "--output-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err
    assert (folder / "README.md").read_text() == "my notes"


# --- 5. damaged artifacts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("head") / "head"
    backbone = tiny_backbone()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    backbone.adapt(images, ["a", "b", "c"] * 2, method="copa", steps=2).save_pretrained(folder)
    return folder


def damaged_copies(folder: Path, root: Path):
    """(name, folder) for each corruption: truncations, flipped bytes, dropped keys, bad JSON."""
    import shutil

    weights = (folder / "head.safetensors").read_bytes()
    config = json.loads((folder / "config.json").read_text())
    cases = {}

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(folder, target)
        cases[name] = target
        return target

    for cut in (0, 7, 64, len(weights) // 2, len(weights) - 1):
        (copy(f"truncated-{cut}") / "head.safetensors").write_bytes(weights[:cut])
    for position in (9, 40, len(weights) // 2, len(weights) - 3):
        flipped = bytearray(weights)
        flipped[position] ^= 0xFF
        (copy(f"flipped-{position}") / "head.safetensors").write_bytes(bytes(flipped))
    for key in ("method", "labels", "scale"):
        broken = json.loads(json.dumps(config))
        del broken["copa_head"][key]
        (copy(f"no-{key}") / "config.json").write_text(json.dumps(broken))
    (copy("bad-json") / "config.json").write_text("{not json")
    (copy("bad-processor") / "preprocessor_config.json").write_text("{not json")
    return cases


def test_every_damaged_head_is_a_clear_error_naming_its_file(head_folder, tmp_path):
    from hf_copa import CopaForFewShotClassification

    base = tiny_backbone()
    for name, folder in damaged_copies(head_folder, tmp_path).items():
        try:
            classifier = CopaForFewShotClassification.from_pretrained(folder, base_model=base)
            classifier.image_processor  # noqa: B018
        except ValueError as err:
            message = str(err)
            assert str(folder) in message and ("re-save" in message.lower() or "re-download" in message), (
                name,
                message,
            )
            continue
        pytest.fail(f"{name}: a damaged head loaded")


def test_a_damaged_head_through_pipeline_and_the_cli_names_the_file(head_folder, tmp_path):
    import shutil

    from transformers import pipeline

    broken = tmp_path / "broken"
    shutil.copytree(head_folder, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["copa_head"]["method"]
    (broken / "config.json").write_text(json.dumps(config))
    hf_copa.register_auto_classes()
    with pytest.raises(ValueError, match="lacks 'method'"):
        pipeline("image-classification", model=str(broken))


def test_damaged_model_weights_name_the_model(other_models, tmp_path):
    import shutil

    broken = tmp_path / "copa"
    shutil.copytree(other_models / "copa", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="damaged or incomplete"):
        hf_copa.CopaModel.from_pretrained(broken)
    (broken / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf_copa.CopaModel.from_pretrained(broken)


# --- 6. smaller mistakes ------------------------------------------------------------------------------------


def test_an_override_for_a_method_not_evaluated_is_refused(tiny_domain, capsys):
    model, dataset = tiny_domain
    assert main(evaluate_arguments(model, dataset, "--override", "url:lr=0.5")) == 2
    assert "'url', which is not among --method" in capsys.readouterr().err


def test_the_label_and_image_columns_can_be_named_on_the_command_line(tiny_domain, tmp_path, capsys):
    import datasets

    model, dataset = tiny_domain
    renamed = tmp_path / "renamed"
    split = datasets.load_dataset(str(dataset), split="test").rename_columns(
        {"label": "digit", "image": "picture"}
    )
    (renamed / "data").mkdir(parents=True)
    split.to_parquet(str(renamed / "data" / "test-00000-of-00001.parquet"))
    assert main(evaluate_arguments(model, renamed)) == 2
    err = capsys.readouterr().err
    assert "--label-column" in err or "--image-column" in err
    arguments = evaluate_arguments(model, renamed, "--label-column", "digit", "--image-column", "picture")
    assert main(arguments) == 0


def test_safetensors_files_get_the_users_permissions(head_folder, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    for path in head_folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_a_head_card_is_titled_with_the_folder_name_not_its_path(head_folder):
    card = (head_folder / "README.md").read_text()
    assert "# head\n" in card and str(head_folder.parent) not in card.split("\n---\n", 1)[1].split("\n")[1]


# --- 7. first impressions -----------------------------------------------------------------------------------


def test_commands_print_no_weight_loading_bars_and_take_threads():
    completed = run_cli("demo", "--method", "ncc", "--threads", "1")
    assert completed.returncode == 0, completed.stderr
    assert "Loading weights" not in completed.stderr and "accuracy:" in completed.stdout
    assert run_cli("demo", "--threads", "0").returncode == 2


def test_importing_hf_copa_does_not_import_transformers():
    code = "import sys, hf_copa; print('transformers' in sys.modules, 'torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert completed.stdout.split() == ["False", "False"], completed.stderr
