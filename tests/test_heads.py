"""The adapted-head artifact: save / load / push without the backbone, pinned to its base model."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import huggingface_hub as hfh
import numpy as np
import pytest
import torch
import transformers
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import hf_copa
from hf_copa import CopaForFewShotClassification, CopaModel
from hf_copa.adapters import adapter_shapes
from hf_copa.heads import HEAD_WEIGHTS_NAME
from hf_copa.learners import one_backbone_methods
from tests.support.local_hub import LocalHub, local_hub_env

from .conftest import tiny_backbone

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 230, 40), (200, 40, 200)]
FAST = {
    method: {"steps": 2} if "steps" in hf_copa.ADAPTATION_DEFAULTS[method] else {}
    for method in hf_copa.available_methods()
}
# What each method's artifact stores besides `prototypes` (backbone.* / adapters.* counted apart).
STORED_RULE = {
    "ncc": set(),
    "url": {"image_projection"},
    "copa": {"image_projection", "prototype_projection"},
    "tsa": {"image_projection"},
    "copa+tsa": {"image_projection", "prototype_projection"},
    "finetune": {"weight", "bias"},
    "finetune-all": {"weight", "bias"},
    "proto-maml": {"weight", "bias"},
    "proto-maml-all": {"weight", "bias"},
    "mahalanobis": {"precisions"},
    "copa-transformer": {"prototype_embeddings"},
}
ARTIFACT = {"config.json", HEAD_WEIGHTS_NAME, "preprocessor_config.json", "README.md"}

pytestmark = pytest.mark.usefixtures("single_thread")


def images(colours, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for colour in colours:
        noise = rng.integers(-25, 25, (32, 32, 3))
        out.append(Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)))
    return out


def support(labels, colours=COLOURS):
    """Two images per class, class i coloured colours[i]."""
    return images([colours[i] for i in range(len(labels))] * 2, seed=1), list(labels) * 2


QUERIES = images(COLOURS[:3] * 2, seed=9)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    tiny_backbone().save_pretrained(folder)
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with local_hub_env(monkeypatch, tmp_path) as hub:
        yield hub


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / HEAD_WEIGHTS_NAME), framework="pt") as stored:
        return {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118


def assert_same_classifier(loaded, original) -> None:
    assert loaded.labels == original.labels
    assert [type(label) for label in loaded.labels] == [type(label) for label in original.labels]
    assert torch.equal(loaded.logits(QUERIES), original.logits(QUERIES))
    assert loaded.predict(QUERIES) == original.predict(QUERIES)


# --- folders --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "stored"),
    [
        ("ncc", {"prototypes"}),
        ("url", {"prototypes", "image_projection"}),  # A == B: stored once
        ("copa", {"prototypes", "image_projection", "prototype_projection"}),
    ],
)
def test_save_and_load_a_folder_gives_identical_logits(base_folder, tmp_path, method, stored):
    classifier = CopaModel.from_pretrained(base_folder).adapt(
        *support(["b", "a", "c"]), method=method, **FAST[method]
    )
    classifier.save_pretrained(tmp_path / "head")
    assert {path.name for path in (tmp_path / "head").iterdir()} == ARTIFACT
    assert set(stored_tensors(tmp_path / "head")) == stored

    metadata = json.loads((tmp_path / "head" / "config.json").read_text())["copa_head"]
    assert metadata["method"] == method
    assert metadata["labels"] == ["a", "b", "c"]
    assert metadata["support_shots"] == [2, 2, 2]
    assert metadata["hyperparameters"] == classifier.head.hyperparameters
    assert metadata["base_model"] == str(base_folder.resolve())
    assert metadata["base_model_revision"] is None

    fetched = CopaForFewShotClassification.from_pretrained(tmp_path / "head")  # base from its recorded folder
    assert_same_classifier(fetched, classifier)
    assert fetched.head.method == method
    for name in ("prototypes", "image_projection", "prototype_projection"):
        original, loaded = getattr(classifier.head, name), getattr(fetched.head, name)
        assert (original is None and loaded is None) or torch.equal(original, loaded)
    explicit = CopaForFewShotClassification.from_pretrained(tmp_path / "head", base_model=classifier.copa)
    assert_same_classifier(explicit, classifier)


@pytest.mark.parametrize(("method", "stages"), [("tsa", {1, 2, 3, 4}), ("copa+tsa", {2, 3})])
def test_tsa_heads_store_their_adapters_and_load_back_identical(base_folder, tmp_path, method, stages):
    base = CopaModel.from_pretrained(base_folder)
    classifier = base.adapt(*support(["b", "a", "c"]), method=method, **FAST[method])
    classifier.save_pretrained(tmp_path / "head")
    adapters = {name for name in adapter_shapes(base) if int(name[5]) in stages}
    projections = {"image_projection"} if method == "tsa" else {"image_projection", "prototype_projection"}
    tensors = stored_tensors(tmp_path / "head")
    assert set(tensors) == {"prototypes"} | projections | {f"adapters.{name}" for name in adapters}
    for name in adapters:
        assert torch.equal(tensors[f"adapters.{name}"], classifier.head.adapters[name])
    assert not set(tensors) & set(base.state_dict())
    metadata = json.loads((tmp_path / "head" / "config.json").read_text())["copa_head"]
    assert metadata["format_version"] == 2 and metadata["adapters"] == sorted(adapters)
    assert "residual adapters" in (tmp_path / "head" / "README.md").read_text()

    loaded = CopaForFewShotClassification.from_pretrained(tmp_path / "head")
    assert_same_classifier(loaded, classifier)
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "head"))
    ranking = classify(QUERIES[0], top_k=None)
    expected = classifier.predict(QUERIES[:1])[0]
    assert [entry["label"] for entry in ranking] == [entry["label"] for entry in expected]
    assert ranking[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)


@pytest.mark.parametrize("method", one_backbone_methods())  # sur, urt: test_backbone_set.py
def test_every_method_saves_loads_and_serves_the_pipeline_identically(base_folder, tmp_path, method):
    classifier = CopaModel.from_pretrained(base_folder).adapt(
        *support(["b", "a", "c"]), method=method, **FAST[method]
    )
    classifier.save_pretrained(tmp_path)
    tensors = stored_tensors(tmp_path)
    backbone = {name for name in tensors if name.startswith(("backbone.", "adapters.", "image_encoder."))}
    assert set(tensors) - backbone == {"prototypes"} | STORED_RULE[method]
    metadata = json.loads((tmp_path / "config.json").read_text())["copa_head"]
    assert metadata["method"] == method
    assert metadata.get("scoring", "cosine") == classifier.head.scoring  # formats 1, 2: always cosine
    # Heads older hf_copa can score keep their old format; a new rule or fine-tuned backbone weights need 3,
    # which a release that reads format 2 refuses ("upgrade hf_copa") instead of misreading.
    expected_version = 3 if classifier.head.scoring != "cosine" or classifier.head.backbone_weights else None
    if expected_version:
        assert metadata["format_version"] == expected_version
    else:
        assert metadata["format_version"] in (1, 2)
    if method.endswith("-all"):
        assert metadata["backbone_weights"] == sorted(classifier.head.backbone_weights)
        assert {name.removeprefix("backbone.") for name in backbone} == set(classifier.head.backbone_weights)

    loaded = CopaForFewShotClassification.from_pretrained(tmp_path)
    assert_same_classifier(loaded, classifier)
    classify = transformers.pipeline("image-classification", model=str(tmp_path))
    for image, expected in zip(QUERIES, classifier.predict(QUERIES), strict=True):
        ranking = classify(image, top_k=None)
        assert [entry["label"] for entry in ranking] == [str(entry["label"]) for entry in expected]
        assert ranking[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)


def test_a_head_of_a_newer_format_is_refused_with_upgrade_advice(base_folder, tmp_path):
    CopaModel.from_pretrained(base_folder).adapt(*support(["a", "b"]), method="mahalanobis").save_pretrained(
        tmp_path
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config["copa_head"]["format_version"] = hf_copa.heads.FORMAT_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade hf_copa"):
        CopaForFewShotClassification.from_pretrained(tmp_path)


def test_a_head_of_an_unknown_scoring_rule_is_refused_not_scored_as_cosine(base_folder, tmp_path):
    CopaModel.from_pretrained(base_folder).adapt(
        *support(["a", "b"]), method="finetune", steps=1
    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["copa_head"]["scoring"] = "hyperbolic"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hyperbolic"):
        CopaForFewShotClassification.from_pretrained(tmp_path)


def test_a_fifty_way_mahalanobis_head_on_512d_features_stays_under_60_mb(tmp_path):
    backbone = tiny_backbone(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 512])
    pictures = images([COLOURS[i % len(COLOURS)] for i in range(50)] * 2, seed=3)
    classifier = backbone.adapt(pictures, list(range(50)) * 2, method="mahalanobis")
    classifier.save_pretrained(tmp_path)
    assert stored_tensors(tmp_path)["precisions"].shape == (50, 512, 512)
    weights = (tmp_path / HEAD_WEIGHTS_NAME).stat().st_size
    payload = (50 * 512 * 512 + 50 * 512) * 4  # float32 precisions and prototypes: 52.5 MB
    assert payload <= weights < payload + 4096
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) < 60e6


def test_heads_without_adapters_keep_format_1_so_older_readers_still_load_them(base_folder, tmp_path):
    CopaModel.from_pretrained(base_folder).adapt(
        *support(["a", "b"]), method="copa", steps=1
    ).save_pretrained(tmp_path)
    metadata = json.loads((tmp_path / "config.json").read_text())["copa_head"]
    assert metadata["format_version"] == 1 and metadata["adapters"] == []


def test_a_head_missing_an_adapter_it_lists_is_refused(base_folder, tmp_path):
    classifier = CopaModel.from_pretrained(base_folder).adapt(*support(["a", "b"]), method="tsa", steps=1)
    classifier.save_pretrained(tmp_path)
    tensors = stored_tensors(tmp_path)
    del tensors["adapters.layer4.1.conv2"]
    save_file(tensors, str(tmp_path / HEAD_WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"lacks the adapters \['layer4.1.conv2'\]"):
        CopaForFewShotClassification.from_pretrained(tmp_path)


def test_the_artifact_holds_no_backbone_weights_and_is_a_few_mb_at_512d(tmp_path):
    backbone = tiny_backbone(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 512])
    classifier = backbone.adapt(*support(list(range(5))), method="copa", steps=1)
    classifier.save_pretrained(tmp_path)
    tensors = stored_tensors(tmp_path)
    assert set(tensors) == {"prototypes", "image_projection", "prototype_projection"}
    assert not set(tensors) & set(backbone.state_dict())
    assert tensors["prototypes"].shape == (5, 512)
    assert tensors["image_projection"].shape == tensors["prototype_projection"].shape == (512, 512)
    payload = (2 * 512 * 512 + 5 * 512) * 4
    weights = (tmp_path / HEAD_WEIGHTS_NAME).stat().st_size
    assert payload < weights < payload + 1024
    total = sum(path.stat().st_size for path in tmp_path.iterdir())
    assert total < payload + 32 * 1024
    backbone_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    assert total < backbone_bytes / 4


def test_labels_of_mixed_types_round_trip(base_folder, tmp_path):
    labels = ["cat", 7, 2.5, False, None]
    classifier = CopaModel.from_pretrained(base_folder).adapt(*support(labels), method="ncc")
    classifier.save_pretrained(tmp_path)
    loaded = CopaForFewShotClassification.from_pretrained(tmp_path)
    assert loaded.labels == labels
    assert [type(label) for label in loaded.labels] == [str, int, float, bool, type(None)]
    assert_same_classifier(loaded, classifier)
    assert loaded.config.id2label == {0: "cat", 1: "7", 2: "2.5", 3: "False", 4: "None"}


@pytest.mark.parametrize("bad_label", [("a", 1), np.int64(3)])
def test_labels_json_cannot_keep_are_refused_before_writing(base_folder, tmp_path, bad_label):
    classifier = CopaModel.from_pretrained(base_folder).adapt(*support(["x", bad_label]), method="ncc")
    with pytest.raises(TypeError, match="str, int, float, bool or None"):
        classifier.save_pretrained(tmp_path / "head")
    assert not (tmp_path / "head").exists()


def test_auto_class_and_pipeline_load_the_head_folder(base_folder, tmp_path):
    classifier = CopaModel.from_pretrained(base_folder).adapt(*support(["b", 1, 0.5]), method="copa", steps=2)
    classifier.save_pretrained(tmp_path)
    auto = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(auto, CopaForFewShotClassification)
    assert_same_classifier(auto, classifier)

    classify = transformers.pipeline("image-classification", model=str(tmp_path))
    for image, expected in zip(QUERIES, classifier.predict(QUERIES), strict=True):
        ranking = classify(image, top_k=None)
        assert [entry["label"] for entry in ranking] == [str(entry["label"]) for entry in expected]
        assert sum(entry["score"] for entry in ranking) == pytest.approx(1.0, abs=1e-5)
        assert ranking[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)


def test_a_folder_without_a_head_is_a_clear_error(base_folder, tmp_path):
    with pytest.raises(ValueError, match="holds no CoPA head.*a CoPA backbone"):
        CopaForFewShotClassification.from_pretrained(base_folder)
    with pytest.raises(ValueError, match="holds no CoPA head"):
        transformers.AutoModelForImageClassification.from_pretrained(base_folder)
    with pytest.raises(ValueError, match="no config.json"):
        CopaForFewShotClassification.from_pretrained(tmp_path)


def test_a_head_on_a_random_backbone_needs_its_base_model_passed(tmp_path):
    backbone = tiny_backbone(seed=5)
    classifier = backbone.adapt(*support(["a", "b"]), method="ncc")
    classifier.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["copa_head"]["base_model"] is None
    with pytest.raises(ValueError, match="records no base model.*base_model="):
        CopaForFewShotClassification.from_pretrained(tmp_path)
    assert_same_classifier(
        CopaForFewShotClassification.from_pretrained(tmp_path, base_model=backbone), classifier
    )
    with pytest.raises(ValueError, match="adapted on 16-d features"):
        CopaForFewShotClassification.from_pretrained(
            tmp_path, base_model=tiny_backbone(hidden_sizes=[8, 8, 16, 8])
        )
    with pytest.raises(ValueError, match="random initialisation.*base_model_id="):
        classifier.push_to_hub("test-user/heads")


# --- the Hub --------------------------------------------------------------------------------------------


def push_base(seed: int) -> str:
    return tiny_backbone(seed).push_to_hub("test-user/base").oid


@pytest.mark.parametrize("method", ["copa", "copa+tsa"])
def test_hub_round_trip_pins_the_base_model_revision(hub: LocalHub, monkeypatch, method):
    first = push_base(0)
    classifier = CopaModel.from_pretrained("test-user/base").adapt(
        *support(["b", "a", "c"]), method=method, steps=2
    )
    commits_before = len([r for r in hub.requests if r.path.endswith("/commit/main")])
    results = [
        {"dataset_type": "mnist", "dataset_name": "MNIST", "metric_type": "accuracy", "metric_value": 0.9}
    ]
    classifier.push_to_hub("test-user/heads", eval_results=results)
    head_commits = [r for r in hub.requests if r.path == "/api/models/test-user/heads/commit/main"]
    assert (
        len(head_commits)
        == 1
        == len([r for r in hub.requests if r.path.endswith("/commit/main")]) - commits_before
    )
    assert set(hfh.list_repo_files("test-user/heads")) == ARTIFACT | {".gitattributes"}

    card = hfh.ModelCard.load("test-user/heads")
    assert card.data.base_model == "test-user/base"
    assert card.data.eval_results[0].metric_value == 0.9
    assert "test-user/base" in card.text and first in card.text
    config = json.loads(Path(hfh.hf_hub_download("test-user/heads", "config.json")).read_text())
    assert (config["copa_head"]["base_model"], config["copa_head"]["base_model_revision"]) == (
        "test-user/base",
        first,
    )

    assert push_base(1) != first  # main of the base now holds other weights
    loaded = CopaForFewShotClassification.from_pretrained("test-user/heads")
    assert_same_classifier(loaded, classifier)
    newer = CopaModel.from_pretrained("test-user/base")
    assert not torch.equal(newer.extract_features(QUERIES), classifier.copa.extract_features(QUERIES))

    seen = len(hub.requests)
    monkeypatch.setattr(hfh.constants, "HF_HUB_OFFLINE", True)
    assert_same_classifier(CopaForFewShotClassification.from_pretrained("test-user/heads"), classifier)
    assert len(hub.requests) == seen  # head and pinned base both from the cache
    monkeypatch.setattr(hfh.constants, "HF_HUB_OFFLINE", False)

    classify = transformers.pipeline("image-classification", model="test-user/heads")
    ranking = classify(QUERIES[0], top_k=None)
    assert [entry["label"] for entry in ranking] == [
        entry["label"] for entry in classifier.predict(QUERIES[:1])[0]
    ]
    assert sum(entry["score"] for entry in ranking) == pytest.approx(1.0, abs=1e-5)


def test_a_failed_heads_commit_is_a_clear_error_and_a_retry_succeeds(hub: LocalHub, monkeypatch, tmp_path):
    push_base(0)
    classifier = CopaModel.from_pretrained("test-user/base").adapt(*support(["a", "b"]), method="ncc")
    classifier.save_pretrained(tmp_path / "local")
    local_before = {path.name: path.read_bytes() for path in (tmp_path / "local").iterdir()}
    hfh.create_repo("test-user/heads")
    before = hfh.model_info("test-user/heads").sha

    # upload_folder retries a failing commit 5 times with 1-8 s sleeps: fail all 6 tries, without the waits.
    from huggingface_hub.utils import _http

    fast_time = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    fast_time.sleep = lambda seconds: None
    monkeypatch.setattr(_http, "time", fast_time)
    hub.fail_next("POST", r"/test-user/heads/commit/main$", status=500, times=6)
    with pytest.raises(HfHubHTTPError) as failed:
        classifier.push_to_hub("test-user/heads")
    assert failed.value.response.status_code == 500
    assert "repo is unchanged" in "\n".join(getattr(failed.value, "__notes__", []))
    assert hfh.model_info("test-user/heads").sha == before
    assert hfh.list_repo_files("test-user/heads") == [".gitattributes"]
    assert {path.name: path.read_bytes() for path in (tmp_path / "local").iterdir()} == local_before

    commit = classifier.push_to_hub("test-user/heads")
    assert hfh.model_info("test-user/heads").sha == commit.oid != before
    statuses = [r.status for r in hub.requests if r.path == "/api/models/test-user/heads/commit/main"]
    assert statuses == [500] * 6 + [200]
    assert set(hfh.list_repo_files("test-user/heads")) == ARTIFACT | {".gitattributes"}
    assert_same_classifier(CopaForFewShotClassification.from_pretrained("test-user/heads"), classifier)


def test_push_without_a_token_says_how_to_give_one(hub: LocalHub, monkeypatch, base_folder):
    classifier = CopaModel.from_pretrained(base_folder).adapt(*support(["a", "b"]), method="ncc")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="needs a Hugging Face token.*HF_TOKEN"):
        classifier.push_to_hub("test-user/heads", base_model_id="test-user/base")
    assert not hfh.repo_exists("test-user/heads")


def test_a_local_base_needs_an_explicit_hub_id_to_push(hub: LocalHub, base_folder):
    classifier = CopaModel.from_pretrained(base_folder).adapt(*support(["a", "b"]), method="ncc")
    with pytest.raises(ValueError, match="local folder.*base_model_id="):
        classifier.push_to_hub("test-user/heads")
    push_base(0)
    revision = hfh.model_info("test-user/base").sha
    classifier.push_to_hub("test-user/heads", base_model_id="test-user/base", base_model_revision=revision)
    loaded = CopaForFewShotClassification.from_pretrained("test-user/heads")
    assert loaded.base_model_reference.revision == revision
    assert_same_classifier(loaded, classifier)


def test_a_hub_repo_without_a_head_is_a_clear_error(hub: LocalHub):
    push_base(0)
    with pytest.raises(ValueError, match="holds no CoPA head"):
        CopaForFewShotClassification.from_pretrained("test-user/base")
    hfh.create_repo("test-user/random")
    hfh.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="test-user/random")
    with pytest.raises(ValueError, match="no config.json"):
        CopaForFewShotClassification.from_pretrained("test-user/random")
    with pytest.raises(ValueError, match="no Hub repo of that name"):
        CopaForFewShotClassification.from_pretrained("test-user/missing")
