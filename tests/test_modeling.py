"""CopaModel (the URL ResNet-18 backbone) and the classifier that `CopaModel.adapt` builds from it."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

import hf_copa
from hf_copa import CopaConfig, CopaForFewShotClassification, CopaImageProcessor, CopaModel
from hf_copa.learners import one_backbone_methods

from .conftest import TINY_CONFIG, tiny_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD_BUFFERS = {"prototypes", "image_projection", "prototype_projection"}


@pytest.fixture(scope="module")
def model(tiny_model) -> CopaModel:
    return tiny_model


def coloured_image(colour: tuple[int, int, int], seed: int, side: int = 16) -> PIL.Image.Image:
    """A small noisy image of one dominant colour: images of one colour look alike to any backbone."""
    noise = np.random.default_rng(seed).integers(-20, 21, size=(side, side, 3))
    return PIL.Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


def support_set(colours: list[tuple[int, int, int]], seed: int = 0) -> list[PIL.Image.Image]:
    return [coloured_image(colour, seed + i) for i, colour in enumerate(colours)]


# --- the backbone ---------------------------------------------------------------------------------------


def test_forward_gives_feature_map_and_pooled_features(model):
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    output = model(pixel_values)
    # 32 -> stem stride 2 -> 16 -> stages 2..4 halve it -> 2
    assert output.last_hidden_state.shape == (3, 16, 2, 2)
    assert output.pooler_output.shape == (3, model.feature_dim) == (3, 16)
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def default_model() -> CopaModel:
    return CopaModel(CopaConfig())


def test_default_parameter_names_follow_url(default_model):
    names = set(default_model.state_dict())
    for expected in (
        "conv1.weight",
        "bn1.weight",
        "bn1.running_mean",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.conv2.weight",
    ):
        assert expected in names, expected
    assert not any(name.startswith("layer1.0.downsample") for name in names)
    assert not any(name.startswith(("fc.", "layer5")) for name in names)
    assert default_model.conv1.weight.shape == (64, 3, 5, 5)


def test_default_model_is_urls_resnet18_without_classifier(default_model):
    # torchvision's resnet18 has 11,689,512 parameters; minus the fc layer (513,000) and with a 5x5 instead
    # of 7x7 stem (3 * 64 * (49 - 25) = 4,608 fewer) that is URL's backbone.
    assert sum(p.numel() for p in default_model.parameters()) == 11_689_512 - 513_000 - 4_608
    output = default_model(torch.zeros(1, 3, 84, 84))
    assert output.last_hidden_state.shape == (1, 512, 6, 6)
    assert output.pooler_output.shape == (1, 512)


def test_save_and_load_round_trip_exactly(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    loaded = CopaModel.from_pretrained(tmp_path).eval()
    ignored = {"transformers_version": None, "_name_or_path": None}
    assert loaded.config.to_dict() | ignored == model.config.to_dict() | ignored
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).pooler_output, model(pixel_values).pooler_output)
        assert torch.equal(loaded(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)


def test_auto_classes_resolve_copa_without_remote_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    CopaImageProcessor.from_copa_config(model.config).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, CopaConfig)
    assert isinstance(AutoConfig.for_model("copa"), CopaConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), CopaModel)
    assert isinstance(AutoModel.from_config(config), CopaModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), CopaForFewShotClassification)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, CopaImageProcessor)
    assert (processor.size.height, processor.size.width) == (32, 32)


# --- feature extraction ---------------------------------------------------------------------------------


def test_extract_features_keeps_the_training_flag_and_uses_eval_batch_norm():
    model = tiny_backbone(seed=3)
    images = support_set([RED, BLUE, GREEN])
    in_eval = model.eval().extract_features(images)
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    in_train = model.train().extract_features(images)
    assert model.training
    torch.testing.assert_close(in_train, in_eval, rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state_before[name]), f"{name} changed during extract_features"
    model.eval().extract_features(images)
    assert not model.training


def test_extract_features_accepts_pixel_values_directly(model):
    images = support_set([RED, BLUE, GREEN])
    pixel_values = model.default_image_processor()(images)["pixel_values"]
    features = model.extract_features(pixel_values)
    assert features.shape == (3, 16)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, model.extract_features(images), rtol=0, atol=0)


def test_extract_features_batches_give_the_same_features(model):
    images = support_set([RED, BLUE, GREEN, RED, BLUE])
    torch.testing.assert_close(
        model.extract_features(images, batch_size=2), model.extract_features(images), rtol=0, atol=1e-6
    )


# --- CopaModel.adapt and the classifier -----------------------------------------------------------------


def test_adapt_with_string_labels(model):
    images = support_set([RED, BLUE, RED, BLUE, GREEN, GREEN])
    labels = ["red", "blue", "red", "blue", "green", "green"]
    classifier = model.adapt(images, labels, method="copa", steps=3)
    assert isinstance(classifier, CopaForFewShotClassification)
    assert classifier.labels == ["blue", "green", "red"]
    logits = classifier.logits(support_set([GREEN, RED], seed=50))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert [classifier.labels[i] for i in logits.argmax(dim=1).tolist()] == ["green", "red"]


@pytest.mark.parametrize("method", one_backbone_methods())
def test_adapt_works_with_every_method(model, method):
    hyperparameters = {"steps": 2} if "steps" in hf_copa.ADAPTATION_DEFAULTS.get(method, {}) else {}
    classifier = model.adapt(
        support_set([RED, BLUE, RED, BLUE]), ["r", "b", "r", "b"], method=method, **hyperparameters
    )
    assert classifier.head.method == method
    assert classifier.logits(support_set([BLUE], seed=40)).shape == (1, 2)


def test_adapt_with_unordered_int_labels_sorts_them(model):
    classifier = model.adapt(support_set([RED, BLUE, RED, BLUE]), [3, 1, 3, 1], method="ncc")
    assert classifier.labels == [1, 3]
    predictions = classifier.predict(support_set([RED, BLUE], seed=60))
    assert [ranking[0]["label"] for ranking in predictions] == [3, 1]


def test_adapt_with_tensor_labels(model):
    classifier = model.adapt(support_set([RED, BLUE, RED, BLUE]), torch.tensor([5, 2, 5, 2]), method="ncc")
    assert classifier.labels == [2, 5]


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["cat", 1, "cat", 1], ["cat", 1]),
        ([1, "cat", 1, "cat"], [1, "cat"]),
        ([None, 2.5, 2.5, None], [None, 2.5]),
    ],
)
def test_adapt_with_mixed_type_labels_keeps_first_appearance_order(model, labels, expected):
    classifier = model.adapt(support_set([RED, BLUE, RED, BLUE]), labels, method="ncc")
    assert classifier.labels == expected
    predictions = classifier.predict(support_set([RED, BLUE], seed=70))
    assert [ranking[0]["label"] for ranking in predictions] == [labels[0], labels[1]]


def test_predict_ranks_every_class_with_probabilities(model):
    classifier = model.adapt(support_set([RED, BLUE, GREEN, RED]), [10, "b", 3.5, 10], method="copa", steps=3)
    queries = support_set([BLUE, GREEN, RED], seed=80)
    predictions = classifier.predict(queries)
    probabilities = torch.softmax(classifier.logits(queries), dim=-1)
    assert len(predictions) == 3
    for ranking, row in zip(predictions, probabilities, strict=True):
        assert len(ranking) == 3
        assert {type(entry["label"]) for entry in ranking} == {int, str, float}
        assert {entry["label"] for entry in ranking} == {10, "b", 3.5}
        scores = [entry["score"] for entry in ranking]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)
        for entry in ranking:
            assert entry["score"] == pytest.approx(
                float(row[classifier.labels.index(entry["label"])]), abs=1e-6
            )
    assert [ranking[0]["label"] for ranking in predictions] == ["b", 3.5, 10]


def test_adapt_accepts_pixel_values(model):
    images = support_set([RED, BLUE, RED, BLUE])
    pixel_values = model.default_image_processor()(images)["pixel_values"]
    from_pixels = model.adapt(pixel_values, ["r", "b", "r", "b"], method="ncc")
    from_images = model.adapt(images, ["r", "b", "r", "b"], method="ncc")
    torch.testing.assert_close(from_pixels.logits(pixel_values), from_images.logits(images), rtol=0, atol=0)


def test_adapt_uses_the_configs_adaptation_defaults():
    model = tiny_backbone(adaptation={"copa": {"steps": 2, "lr": 0.01}})
    classifier = model.adapt(support_set([RED, BLUE, RED, BLUE]), [0, 1, 0, 1])
    assert classifier.head.hyperparameters["steps"] == 2
    assert classifier.head.hyperparameters["lr"] == 0.01
    assert len(classifier.head.train_losses) == 2
    high_lr = model.adapt(support_set([RED, BLUE, RED, BLUE]), [0, 1, 0, 1], preset="high-lr", steps=1)
    assert high_lr.head.hyperparameters["lr"] == 5e-3
    assert high_lr.head.hyperparameters["steps"] == 1


def test_the_head_holds_no_backbone_weights(model):
    for method, hyperparameters in (("copa", {"steps": 2}), ("ncc", {})):
        classifier = model.adapt(
            support_set([RED, BLUE, RED, BLUE]), ["r", "b", "r", "b"], method=method, **hyperparameters
        )
        keys = set(classifier.head.state_dict())
        assert "prototypes" in keys
        assert keys <= HEAD_BUFFERS, keys
        assert classifier.head.prototypes.shape == (2, model.feature_dim)


def test_the_classifier_leaves_the_backbone_frozen_and_in_eval_mode(model):
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    classifier = model.adapt(
        support_set([RED, BLUE, RED, BLUE]), ["r", "b", "r", "b"], method="copa", steps=3
    )
    assert not classifier.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --- errors ---------------------------------------------------------------------------------------------


def test_adapt_rejects_a_single_class(model):
    with pytest.raises(ValueError, match="single class"):
        model.adapt(support_set([RED, RED, RED]), ["red"] * 3, method="ncc")


def test_adapt_rejects_an_empty_support_set(model):
    with pytest.raises(ValueError, match="empty"):
        model.adapt([], [], method="ncc")


@pytest.mark.parametrize("num_labels", [3, 5])
def test_adapt_rejects_labels_and_images_of_different_lengths(model, num_labels):
    labels = ["r", "b", "r", "b", "r"][:num_labels]
    with pytest.raises(ValueError, match=f"4 support images but {num_labels} labels"):
        model.adapt(support_set([RED, BLUE, RED, BLUE]), labels, method="ncc")


def test_adapt_rejects_an_unreadable_image_naming_it(model):
    images = support_set([RED, BLUE, RED, BLUE])
    images[2] = 7
    with pytest.raises(TypeError, match=r"images\[2\] is a int"):
        model.adapt(images, ["r", "b", "r", "b"], method="ncc")


def test_adapt_rejects_unhashable_labels(model):
    with pytest.raises(TypeError, match="hashable"):
        model.adapt(support_set([RED, BLUE]), [["r"], ["b"]], method="ncc")


def test_adapt_rejects_unknown_methods_and_hyperparameters(model):
    images = support_set([RED, BLUE])
    with pytest.raises(ValueError, match="maml"):
        model.adapt(images, ["r", "b"], method="maml")
    with pytest.raises(TypeError, match="learning_rate"):
        model.adapt(images, ["r", "b"], method="copa", learning_rate=0.1)


def test_logits_reject_an_unreadable_image(model):
    classifier = model.adapt(support_set([RED, BLUE]), ["r", "b"], method="ncc")
    with pytest.raises(TypeError, match=r"images\[1\]"):
        classifier.logits([coloured_image(RED, 1), object()])
    with pytest.raises(ValueError, match="empty"):
        classifier.logits([])


def test_pixel_values_with_the_wrong_channel_count_are_rejected(model):
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model.extract_features(torch.zeros(2, 1, 32, 32))


def test_a_classifier_without_head_says_how_to_build_one():
    classifier = CopaForFewShotClassification(CopaConfig(**TINY_CONFIG))
    with pytest.raises(ValueError, match="CopaModel.adapt"):
        classifier.logits([coloured_image(RED, 0)])


def test_the_package_exports_the_model_api():
    for name in ("CopaModel", "CopaForFewShotClassification", "CopaImageProcessor", "adapt"):
        assert hasattr(hf_copa, name)
