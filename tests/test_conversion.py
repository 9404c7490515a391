"""Converting URL's released checkpoint (the reference copy) to a model folder, a card and a Hub repo."""

from __future__ import annotations

import io
import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open

import hf_copa
from hf_copa.cli import main
from hf_copa.conversion import (
    DOMAIN_CLASSIFIERS_FILE,
    URL_TRAINING_DOMAINS,
    convert_url_checkpoint,
    load_domain_classifiers,
)
from tests.support.local_hub import local_hub_env

FOLDER_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
DOMAIN_SIZES = [712, 883, 70, 140, 33, 241, 994, 71]
REPO_ID = "test-user/copa-url"


@pytest.fixture(scope="module")
def checkpoint_path(reference_dir: Path) -> Path:
    return reference_dir / "url_checkpoint.pth.tar.xz"


@pytest.fixture(scope="module")
def checkpoint_bytes(checkpoint_path: Path) -> bytes:
    """The uncompressed torch.save archive."""
    return lzma.decompress(checkpoint_path.read_bytes())


@pytest.fixture(scope="module")
def checkpoint(checkpoint_bytes: bytes) -> dict:
    return torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)


@pytest.fixture(scope="module")
def converted(checkpoint_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted as URL trained it (stem padding 2): what url_backbone_embeddings.npz was made with."""
    return convert_url_checkpoint(
        checkpoint_path, tmp_path_factory.mktemp("conversion") / "copa-url", stem_padding=2
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def test_folder_loads_through_copa_and_auto_classes_and_embeds_like_the_official_code(
    converted: Path, checkpoint: dict, reference_dir: Path
):
    assert {path.name for path in converted.iterdir()} == FOLDER_FILES
    with safe_open(converted / "model.safetensors", "pt") as weights:
        stored = set(weights.keys())
    backbone = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("cls_fn.")}
    assert stored == set(backbone)  # every backbone tensor, 1:1 names, no domain classifiers

    model = hf_copa.CopaModel.from_pretrained(converted)
    auto_model = transformers.AutoModel.from_pretrained(converted)
    assert type(auto_model) is hf_copa.CopaModel
    for name, tensor in backbone.items():
        assert torch.equal(_weights(model)[name], tensor), name
        assert torch.equal(_weights(auto_model)[name], tensor), name

    processor = transformers.AutoImageProcessor.from_pretrained(converted)
    assert isinstance(processor, hf_copa.CopaImageProcessor)
    reference = np.load(reference_dir / "url_backbone_embeddings.npz")
    pixel_values = processor(list(reference["images_uint8"]))["pixel_values"]
    features = model.extract_features(pixel_values)
    np.testing.assert_allclose(features.numpy(), reference["embeddings"], rtol=0, atol=1e-4)


def test_model_card_has_its_sections_and_the_checkpoint_provenance(converted: Path):
    card = ModelCard.load(converted / "README.md")
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert {"hf_copa", "copa", "few-shot-learning"} <= set(card.data.tags)
    text = card.text
    for section in ("## Architecture", "## Input contract", "## Training data", "## Usage", "## Licence"):
        assert section in text
    assert all(domain in text for domain in URL_TRAINING_DOMAINS)
    assert "84×84" in text and "[-1, 1]" in text and "padding 2" in text and "Why padding 2" in text
    assert "512×6×6" in text  # the feature map of an 84x84 input
    assert "MIT" in text and "URL authors" in text
    assert "- Training step (`epoch` in the checkpoint): 240000" in text
    assert "Best validation accuracy recorded in the checkpoint: 0.5" in text
    for citation in ("tian2024copa", "li2021universal", "triantafillou2020metadataset"):
        assert f"@inproceedings{{{citation}," in text
    assert 'CopaModel.from_pretrained("copa-url")' in text and "model.adapt(" in text
    assert "cls_fn.*`) are not included" in text
    assert "{{" not in text and "{%" not in text


def test_keep_domain_classifiers_stores_the_eight_heads_beside_the_backbone(
    checkpoint_path: Path, checkpoint: dict, tmp_path: Path
):
    folder = convert_url_checkpoint(checkpoint_path, tmp_path / "with-heads", keep_domain_classifiers=True)
    assert {path.name for path in folder.iterdir()} == FOLDER_FILES | {DOMAIN_CLASSIFIERS_FILE}
    config = json.loads((folder / "config.json").read_text())
    assert config["domain_classifier_sizes"] == DOMAIN_SIZES
    assert config["domain_classifier_domains"] == list(URL_TRAINING_DOMAINS)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        names = weights.keys()
    assert not [name for name in names if name.startswith("cls_fn.")]

    heads = load_domain_classifiers(folder)
    assert list(heads) == list(URL_TRAINING_DOMAINS)
    assert [head.out_features for head in heads.values()] == DOMAIN_SIZES
    for index, head in enumerate(heads.values()):
        assert head.in_features == 512
        assert torch.equal(head.weight, checkpoint["state_dict"][f"cls_fn.{index}.weight"])
        assert torch.equal(head.bias, checkpoint["state_dict"][f"cls_fn.{index}.bias"])
    assert "712, 883, 70, 140, 33, 241, 994, 71 outputs" in (folder / "README.md").read_text()
    assert type(hf_copa.CopaModel.from_pretrained(folder)) is hf_copa.CopaModel

    # Re-converting without the heads into the same folder (asked for) removes the now-stale heads file.
    convert_url_checkpoint(checkpoint_path, folder, overwrite=True)
    assert {path.name for path in folder.iterdir()} == FOLDER_FILES
    assert json.loads((folder / "config.json").read_text())["domain_classifier_sizes"] is None
    with pytest.raises(ValueError, match="no domain classifiers"):
        load_domain_classifiers(folder)


def _bad_checkpoints(checkpoint_path: Path, checkpoint_bytes: bytes, checkpoint: dict, folder: Path):
    """Each a file plus a regex its error must match."""
    folder.mkdir()
    state = checkpoint["state_dict"]

    def save(name: str, payload: object) -> Path:
        torch.save(payload, folder / name)
        return folder / name

    missing = {k: v for k, v in state.items() if k not in ("conv1.weight", "layer4.1.bn2.running_var")}
    wrong_shape = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    extra = {**state, "fc.weight": torch.zeros(10, 512)}
    (folder / "garbage.pth.tar").write_bytes(b"this is not a checkpoint at all")
    xz = checkpoint_path.read_bytes()
    (folder / "truncated.pth.tar.xz").write_bytes(xz[: len(xz) // 2])
    (folder / "truncated.pth.tar").write_bytes(checkpoint_bytes[: len(checkpoint_bytes) // 2])
    return {
        "garbage": (folder / "garbage.pth.tar", r"not a PyTorch checkpoint"),
        "truncated xz": (folder / "truncated.pth.tar.xz", r"xz-compressed data is corrupt or truncated"),
        "truncated zip": (folder / "truncated.pth.tar", r"archive is corrupt or truncated"),
        "no state_dict": (save("weights.pth", {"model": state}), r"'state_dict' entry .* found \['model'\]"),
        "bare tensor": (save("tensor.pth", torch.zeros(3)), r"found Tensor"),
        "missing keys": (
            save("missing.pth", {"state_dict": missing}),
            r"2 backbone tensor\(s\) of URL's ResNet-18 are missing: "
            r"conv1\.weight, layer4\.1\.bn2\.running_var",
        ),
        "unexpected key": (save("extra.pth", {"state_dict": extra}), r"neither to URL's .*: fc\.weight"),
        "wrong shape": (
            save("shape.pth", {"state_dict": wrong_shape}),
            r"conv1\.weight is \(64, 3, 3, 3\), expected \(64, 3, 5, 5\)",
        ),
    }


def test_the_default_conversion_has_the_stem_padding_of_the_official_test_scripts(checkpoint_path, tmp_path):
    folder = convert_url_checkpoint(checkpoint_path, tmp_path / "default")
    assert hf_copa.CopaConfig.from_pretrained(folder).stem_padding == 1
    card = (folder / "README.md").read_text()
    assert "padding 1" in card and "Why padding 1" in card and "test_extractor_pa.py" in card
    with pytest.raises(ValueError, match="stem_padding must be 1 or 2"):
        convert_url_checkpoint(checkpoint_path, tmp_path / "bad", stem_padding=3)


def test_a_non_empty_output_folder_is_refused_and_overwrite_replaces_only_the_converters_files(
    checkpoint_path, tmp_path, capsys
):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "domain_classifiers.safetensors").write_bytes(b"not the converter's")
    (folder / "keep.txt").write_text("unrelated")
    assert main(["convert", str(checkpoint_path), str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "README.md" in err and "--overwrite" in err
    assert (folder / "README.md").read_text() == "my notes" and len(list(folder.iterdir())) == 3

    assert main(["convert", str(checkpoint_path), str(folder), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "wrote " in out and "config.json" in out and "keep.txt" not in out
    assert "removed domain_classifiers.safetensors" in out  # it would contradict config.json
    assert (folder / "keep.txt").read_text() == "unrelated"
    assert not (folder / "domain_classifiers.safetensors").exists()
    assert (folder / "README.md").read_text() != "my notes"


def test_bad_checkpoints_raise_value_errors_that_name_the_problem_and_write_nothing(
    checkpoint_path: Path, checkpoint_bytes: bytes, checkpoint: dict, tmp_path: Path
):
    cases = _bad_checkpoints(checkpoint_path, checkpoint_bytes, checkpoint, tmp_path / "bad")
    for case, (path, message) in cases.items():
        output = tmp_path / f"out-{case.replace(' ', '-')}"
        with pytest.raises(ValueError, match=message):
            convert_url_checkpoint(path, output)
        assert not output.exists(), case
    with pytest.raises(ValueError, match="does not exist"):
        convert_url_checkpoint(tmp_path / "nope.pth.tar", tmp_path / "out")


def test_cli_converts_and_reports_errors_with_exit_code_2(
    checkpoint_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    output = tmp_path / "cli-out"
    assert main(["convert", str(checkpoint_path), str(output), "--keep-domain-classifiers"]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    assert {path.name for path in output.iterdir()} == FOLDER_FILES | {DOMAIN_CLASSIFIERS_FILE}

    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"\x00" * 64)
    assert main(["convert", str(garbage), str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-copa: error: ") and "not a PyTorch checkpoint" in err
    assert not (tmp_path / "never").exists()


_OFFLINE_LOAD = """
import json, sys
import torch
from huggingface_hub import constants
import transformers
import hf_copa
model = hf_copa.CopaModel.from_pretrained(sys.argv[1])
state = model.state_dict()
auto = transformers.AutoModel.from_pretrained(sys.argv[1])
processor = transformers.AutoImageProcessor.from_pretrained(sys.argv[1])
print(json.dumps({"offline": constants.HF_HUB_OFFLINE,
                  "auto_classes": [type(auto).__name__, type(processor).__name__],
                  "auto_equal": all(torch.equal(v, state[k]) for k, v in auto.state_dict().items()),
                  "sums": {k: float(v.double().sum()) for k, v in state.items()}}))
"""


def test_push_to_hub_uploads_one_commit_that_loads_online_and_then_offline(
    checkpoint_path: Path, converted: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    expected = hf_copa.CopaModel.from_pretrained(converted).state_dict()
    with local_hub_env(monkeypatch, tmp_path) as hub:
        convert_url_checkpoint(checkpoint_path, tmp_path / "push", push_to_hub=REPO_ID)
        commits = [r for r in hub.requests if r.method == "POST" and r.path.endswith("/commit/main")]
        assert len(commits) == 1  # weights, config, processor and card in one commit
        assert set(HfApi().list_repo_files(REPO_ID)) == FOLDER_FILES | {".gitattributes"}
        card = ModelCard.load(REPO_ID)
        assert f'CopaModel.from_pretrained("{REPO_ID}")' in card.text

        loaded_model = hf_copa.CopaModel.from_pretrained(REPO_ID)
        loaded = loaded_model.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[name], expected[name]) for name in expected)
        assert loaded_model.hub_revision == HfApi().model_info(REPO_ID).sha  # pinned by adapted heads
        auto = transformers.AutoModel.from_pretrained(REPO_ID)
        assert isinstance(auto, hf_copa.CopaModel)
        assert all(torch.equal(v, expected[k]) for k, v in auto.state_dict().items())
        processor = transformers.AutoImageProcessor.from_pretrained(REPO_ID)
        assert isinstance(processor, hf_copa.CopaImageProcessor)

        env = hub.client_env(tmp_path / "hf-home")
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONPATH"] = str(Path(hf_copa.__file__).resolve().parents[1])
        seen = len(hub.requests)
        result = subprocess.run(
            [sys.executable, "-c", _OFFLINE_LOAD, REPO_ID],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert len(hub.requests) == seen  # nothing asked of the server: it came from the cache
    offline = json.loads(result.stdout.strip().splitlines()[-1])
    assert offline["offline"] is True
    assert offline["auto_classes"] == ["CopaModel", "CopaImageProcessor"] and offline["auto_equal"]
    assert offline["sums"] == pytest.approx({k: float(v.double().sum()) for k, v in expected.items()})


# --- URL's single-domain (sdl) networks ----------------------------------------------------------------


def sdl_checkpoint(checkpoint: dict, folder: Path, source: str | None, cosine: bool = False, **extra) -> Path:
    """A checkpoint in the layout of URL's `scripts/train_resnet18_sdl.sh` networks: `models/resnet18.py`'s
    state_dict (the backbone plus one `cls_fn`, nn.Linear or `CosineClassifier`) saved by
    `CheckPointer.save_checkpoint` with the run's `args` (whose `data.train` names the source)."""
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("cls_fn.")}
    generator = torch.Generator().manual_seed(0)
    if cosine:
        state["cls_fn.scale"] = torch.tensor(10.0)
        state["cls_fn.weight"] = torch.randn(512, 7, generator=generator)
    else:
        state["cls_fn.weight"] = torch.randn(7, 512, generator=generator)
        state["cls_fn.bias"] = torch.randn(7, generator=generator)
    args = {"model.name": "imagenet-net", "model.classifier": "cosine" if cosine else "linear"}
    if source is not None:
        args["data.train"] = [source]
    payload = {"epoch": 3, "args": args, "state_dict": state, "best_val_acc": 0.5, "best_val_loss": 1.5}
    path = folder / "model_best.pth.tar"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({**payload, **extra}, path)
    return path


def test_a_single_domain_checkpoint_converts_with_its_source_and_its_head(checkpoint, tmp_path):
    path = sdl_checkpoint(checkpoint, tmp_path / "sdl", "ilsvrc_2012")
    folder = convert_url_checkpoint(path, tmp_path / "imagenet-net", keep_domain_classifiers=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["training_domains"] == ["ilsvrc_2012"]
    assert config["domain_classifier_sizes"] == [7] and config["domain_classifier_domains"] == ["ilsvrc_2012"]
    head = load_domain_classifiers(folder)["ilsvrc_2012"]
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(head.weight, saved["cls_fn.weight"]) and torch.equal(head.bias, saved["cls_fn.bias"])
    card = (folder / "README.md").read_text()
    assert "single-domain (sdl) networks, trained by its authors on ilsvrc_2012" in card
    model = hf_copa.CopaModel.from_pretrained(folder)
    assert model.config.training_domains == ["ilsvrc_2012"]
    assert torch.equal(model.state_dict()["conv1.weight"], checkpoint["state_dict"]["conv1.weight"])
    # The multi-domain checkpoint names its eight.
    multi = convert_url_checkpoint(saved_multi_domain(checkpoint, tmp_path), tmp_path / "multi")
    assert json.loads((multi / "config.json").read_text())["training_domains"] == list(URL_TRAINING_DOMAINS)


def test_surs_own_networks_convert_as_urls_do(checkpoint, tmp_path):
    """SUR's eight networks (dvornikita/SUR at 2c3c5781, the `all_weights.zip` that URT also builds on) come
    from the same `models/resnet18.py` (names, stem 5x5 / stride 2 / padding 1) and the same
    `CheckPointer.save_checkpoint` (`models/model_utils.py` l. 98-114); `config.py` makes the cosine head
    the default and `data.train` a list (l. 5, 18); `models/models_dict.py` names the folders."""
    path = sdl_checkpoint(checkpoint, tmp_path / "weights" / "birds-net", "cu_birds", cosine=True)
    folder = convert_url_checkpoint(path, tmp_path / "birds")
    model = hf_copa.CopaModel.from_pretrained(folder)
    assert model.config.training_domains == ["cu_birds"]
    assert torch.equal(
        model.state_dict()["layer4.1.bn2.running_var"], checkpoint["state_dict"]["layer4.1.bn2.running_var"]
    )


def saved_multi_domain(checkpoint: dict, tmp_path: Path) -> Path:
    path = tmp_path / "url.pth.tar"
    torch.save(checkpoint, path)
    return path


def test_single_domain_checkpoints_without_a_source_or_with_a_cosine_head(checkpoint, tmp_path, capsys):
    unnamed = sdl_checkpoint(checkpoint, tmp_path / "unnamed", None)
    with pytest.raises(ValueError, match=r"does not record its source .* --trained-on SOURCE"):
        convert_url_checkpoint(unnamed, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert main(["convert", str(unnamed), str(tmp_path / "named"), "--trained-on", "omniglot"]) == 0
    assert json.loads((tmp_path / "named" / "config.json").read_text())["training_domains"] == ["omniglot"]
    named = sdl_checkpoint(checkpoint, tmp_path / "named-ckpt", "dtd")
    with pytest.raises(ValueError, match="records that it was trained on 'dtd', not 'omniglot'"):
        convert_url_checkpoint(named, tmp_path / "never", trained_on="omniglot")
    with pytest.raises(ValueError, match="multi-domain checkpoint .* --trained-on applies"):
        convert_url_checkpoint(saved_multi_domain(checkpoint, tmp_path), tmp_path / "never", trained_on="dtd")
    foreign = sdl_checkpoint(checkpoint, tmp_path / "foreign", "mnist")
    with pytest.raises(ValueError, match="'mnist' is not one of URL's training sources"):
        convert_url_checkpoint(foreign, tmp_path / "never")
    cosine = sdl_checkpoint(checkpoint, tmp_path / "cosine", "fungi", cosine=True)
    folder = convert_url_checkpoint(cosine, tmp_path / "fungi-net")  # the backbone converts
    assert json.loads((folder / "config.json").read_text())["training_domains"] == ["fungi"]
    with pytest.raises(ValueError, match="no linear domain classifiers"):
        convert_url_checkpoint(cosine, tmp_path / "never", keep_domain_classifiers=True)
    assert not (tmp_path / "never").exists()
