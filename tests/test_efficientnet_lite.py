"""EfficientNet-Lite as a backbone: held to the reference code (`efficientnet-lite-pytorch`, a test-only
dependency) on real images, its converter's checks, the model's place among the families (loading, heads,
pipeline, the methods it serves and refuses), and its image processor."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
import transformers
from efficientnet_lite_pytorch import EfficientNet
from huggingface_hub import HfApi, ModelCard

import hf_copa
import hf_copa.bundled
from hf_copa import (
    CopaForFewShotClassification,
    CopaModel,
    EfficientNetLiteConfig,
    EfficientNetLiteImageProcessor,
    EfficientNetLiteModel,
)
from hf_copa.bundled import packaged_checkpoint
from hf_copa.cli import main
from hf_copa.configuration_efficientnet_lite import VARIANTS
from hf_copa.conversion import convert_efficientnet_lite_checkpoint, convert_url_checkpoint
from hf_copa.folders import load_class_folders, sample_task_dir
from tests.support.local_hub import local_hub_env

WEIGHTS = packaged_checkpoint("lite0")
REPO_ID = "test-user/efficientnet-lite0"
CONVERTED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}


def reference_network(image_size: int) -> EfficientNet:
    """The reference code's lite0 with the packaged weights, built for `image_size` (its padding is fixed at
    construction), in eval mode."""
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(WEIGHTS), image_size=image_size
    )
    return model.eval()


def reference_features(model: EfficientNet, pixel_values: torch.Tensor) -> torch.Tensor:
    """Global average pool of the reference's last map, before `_fc` (what `forward` pools and classifies)."""
    with torch.no_grad():
        return model._avg_pooling(model.extract_features(pixel_values)).flatten(1)


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLiteModel:
    return hf_copa.load_model(hf_copa.EFFICIENTNET_LITE0)


@pytest.fixture(scope="module")
def real_images(datasets_dir) -> list:
    """Natural and drawn images of several sizes and modes: CIFAR-10 (32 px RGB JPEG), Tiny ImageNet (64 px),
    Omniglot (105 px, mode L) and the bundled Quick, Draw! sample task."""
    images = []
    for name, count in (("cifar10", 6), ("tiny_imagenet", 6), ("omniglot", 4)):
        split = datasets.load_dataset(str(datasets_dir / name), split="test")
        images += list(split.select(range(count))["image"])
    paths, _ = load_class_folders(sample_task_dir() / "support")
    return images + paths[:4]


@pytest.mark.parametrize("image_size", [84, 224])
def test_pooled_features_equal_the_reference_codes_on_real_images(lite0, real_images, image_size):
    """Both networks on the same pixels in the same memory layout: NCHW through `forward`, and channels-last
    as `extract_features` runs it (whose kernels round differently from NCHW's, by ~2e-5)."""
    processor = EfficientNetLiteImageProcessor(size={"height": image_size, "width": image_size})
    pixel_values = processor(real_images)["pixel_values"]
    reference_model = reference_network(image_size)
    with torch.no_grad():
        ours = lite0(pixel_values).pooler_output
    reference = reference_features(reference_model, pixel_values)
    assert ours.shape == (len(real_images), 1280)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert reference.abs().max() > 1  # real, non-trivial features
    channels_last = pixel_values.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        lite0.extract_features(pixel_values),
        reference_features(reference_model, channels_last),
        rtol=0,
        atol=1e-5,
    )


def test_the_bundled_lite0_is_128_px_and_its_weights_are_the_packages(lite0):
    assert isinstance(lite0, EfficientNetLiteModel) and not lite0.training
    assert lite0.config._name_or_path == hf_copa.EFFICIENTNET_LITE0
    assert lite0.config.variant == "lite0" and lite0.config.image_size == 128
    assert lite0.config.training_domains == ["ilsvrc_2012"]
    state = torch.load(WEIGHTS, weights_only=True)
    ours = lite0.state_dict()
    assert torch.equal(ours["stem_conv.weight"], state["_conv_stem.weight"])
    assert torch.equal(ours["blocks.15.project_bn.running_var"], state["_blocks.15._bn2.running_var"])
    assert torch.equal(ours["head_bn.bias"], state["_bn1.bias"])
    assert len(ours) == len(state) - 2  # everything but the ImageNet classifier `_fc`


def test_the_processor_scales_as_lite_was_trained_and_resizes_bicubically():
    processor = EfficientNetLiteImageProcessor(size={"height": 8, "width": 8})
    flat = np.zeros((8, 8, 3), np.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 0, 127, 255
    pixels = processor(flat)["pixel_values"][0]
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]), rtol=0, atol=1e-6)
    assert processor.resample == 3  # PIL's BICUBIC
    # The meta-dataset decoder gives TensorFlow's pixels in this backbone's scaling too.
    md = EfficientNetLiteImageProcessor(size={"height": 8, "width": 8}, decoder="meta-dataset")
    torch.testing.assert_close(md(flat)["pixel_values"][0], pixels, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["lite1", "lite2", "lite4"])
def test_each_variants_stages_have_the_reference_networks_shapes(variant):
    """`from_variant`'s widths and depths against the reference code's own network (no weights needed)."""
    reference = EfficientNet.from_name(f"efficientnet-{variant}")
    expected = {
        name: tuple(tensor.shape)
        for name, tensor in reference.state_dict().items()
        if not name.startswith("_fc.")
    }
    with torch.device("meta"):
        ours = EfficientNetLiteModel(EfficientNetLiteConfig.from_variant(variant))
    assert len(ours.state_dict()) == len(expected)
    assert sorted(tuple(t.shape) for t in ours.state_dict().values()) == sorted(expected.values())
    assert VARIANTS[variant][2] == EfficientNet.get_image_size(f"efficientnet-{variant}")


def test_a_converted_state_dict_of_another_variant_is_found_by_its_shapes(tmp_path):
    state = {k: v for k, v in EfficientNet.from_name("efficientnet-lite2").state_dict().items()}
    torch.save(state, tmp_path / "lite2.pth")
    folder = convert_efficientnet_lite_checkpoint(tmp_path / "lite2.pth", tmp_path / "out", image_size=96)
    model = EfficientNetLiteModel.from_pretrained(folder)
    assert model.config.variant == "lite2" and model.config.image_size == 96
    assert model.extract_features(torch.zeros(1, 3, 96, 96)).shape == (1, 1280)


# --- conversion -----------------------------------------------------------------------------------------


def test_convert_writes_a_folder_the_families_door_and_the_auto_classes_load(tmp_path, lite0):
    assert main(["convert", "efficientnet-lite0", str(tmp_path / "lite0"), "--image-size", "96"]) == 0
    folder = tmp_path / "lite0"
    assert {p.name for p in folder.iterdir()} == CONVERTED_FILES
    model = hf_copa.load_model(folder)
    assert isinstance(model, EfficientNetLiteModel) and model.config.image_size == 96
    for name, tensor in lite0.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    auto = transformers.AutoModel.from_pretrained(folder)
    assert type(auto) is EfficientNetLiteModel
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is EfficientNetLiteImageProcessor and processor.size["height"] == 96
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and "efficientnet-lite" in card.data.tags
    assert "96×96" in card.text and "(x − 127) / 128" in card.text and WEIGHTS.name in card.text
    assert "{{" not in card.text
    # A path to the same file converts the same; the CLI finds the layout by itself.
    assert main(["convert", str(WEIGHTS), str(tmp_path / "by-path"), "--image-size", "96"]) == 0
    assert (tmp_path / "by-path" / "model.safetensors").read_bytes() == (
        folder / "model.safetensors"
    ).read_bytes()


def _state() -> dict[str, torch.Tensor]:
    return torch.load(WEIGHTS, weights_only=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("_blocks.3._depthwise_conv.weight"), "fit no EfficientNet-Lite variant"),
        (lambda s: s.__setitem__("_conv_head.weight", torch.zeros(1280, 321, 1, 1)), "misshapen"),
        (
            lambda s: s.__setitem__("_blocks.0._se_reduce.weight", torch.zeros(8, 32, 1, 1)),
            "squeeze-excitation",
        ),
        (lambda s: s.__setitem__("_extra.weight", torch.zeros(1)), "not in the EfficientNet-Lite layout"),
    ],
)
def test_a_wrong_layout_is_one_line_and_writes_nothing(tmp_path, capsys, damage, message):
    state = _state()
    damage(state)
    torch.save(state, tmp_path / "bad.pth")
    assert main(["convert", str(tmp_path / "bad.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_state_dict_of_one_variant_is_refused_as_another(tmp_path):
    with pytest.raises(ValueError, match="lite2: .*misshapen"):
        convert_efficientnet_lite_checkpoint(WEIGHTS, tmp_path / "out", variant="lite2")
    assert not (tmp_path / "out").exists()


def test_truncated_weights_and_url_only_flags_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "cut.pth").write_bytes(WEIGHTS.read_bytes()[: 1 << 20])
    assert main(["convert", str(tmp_path / "cut.pth"), str(tmp_path / "out")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert main(["convert", "efficientnet-lite0", str(tmp_path / "out"), "--stem-padding", "2"]) == 2
    assert "--stem-padding: for URL's ResNet-18" in capsys.readouterr().err
    assert main(["convert", "efficientnet-lite0", str(tmp_path / "out"), "--image-size", "8"]) == 2
    assert "--image-size must be an integer >= 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_urls_checkpoint_still_converts_and_refuses_an_image_size(reference_dir, tmp_path, capsys):
    checkpoint = reference_dir / "url_checkpoint.pth.tar.xz"
    assert main(["convert", str(checkpoint), str(tmp_path / "url"), "--image-size", "128"]) == 2
    assert "--image-size is for an EfficientNet-Lite checkpoint" in capsys.readouterr().err
    assert main(["convert", str(checkpoint), str(tmp_path / "url")]) == 0
    assert isinstance(hf_copa.load_model(tmp_path / "url"), CopaModel)


def test_push_to_hub_uploads_one_commit_that_loads_back_by_id(monkeypatch, tmp_path, lite0):
    with local_hub_env(monkeypatch, tmp_path) as hub:
        convert_efficientnet_lite_checkpoint(WEIGHTS, tmp_path / "push", push_to_hub=REPO_ID)
        commits = [r for r in hub.requests if r.method == "POST" and r.path.endswith("/commit/main")]
        assert len(commits) == 1
        assert set(HfApi().list_repo_files(REPO_ID)) == CONVERTED_FILES | {".gitattributes"}
        loaded = hf_copa.load_model(REPO_ID)
        assert isinstance(loaded, EfficientNetLiteModel)
        assert loaded.hub_revision == HfApi().model_info(REPO_ID).sha
        assert torch.equal(loaded.state_dict()["head_conv.weight"], lite0.state_dict()["head_conv.weight"])
        assert f'hf_copa.load_model("{REPO_ID}")' in ModelCard.load(REPO_ID).text


# --- among the families ----------------------------------------------------------------------------------


def test_each_familys_class_refuses_the_others_folder_and_says_which_loads_it(tmp_path, reference_dir):
    with pytest.raises(ValueError, match=r"EfficientNetLiteModel loads, not CopaModel; load it with"):
        CopaModel.from_pretrained(hf_copa.EFFICIENTNET_LITE0)
    convert_url_checkpoint(reference_dir / "url_checkpoint.pth.tar.xz", tmp_path / "url")
    with pytest.raises(ValueError, match=r"CopaModel loads, not EfficientNetLiteModel"):
        EfficientNetLiteModel.from_pretrained(tmp_path / "url")


@pytest.mark.parametrize("method", ["tsa", "copa+tsa"])
def test_residual_adapter_methods_refuse_it_before_reading_any_image(lite0, method, capsys):
    with pytest.raises(ValueError, match="residual-adapter points.*EfficientNet-Lite backbone does not have"):
        lite0.adapt(["no/such/image.png"] * 2, ["a", "b"], method=method)
    sample = str(sample_task_dir())
    assert (
        main(
            [
                "classify",
                f"{sample}/support",
                f"{sample}/query",
                "--method",
                method,
                "--model",
                hf_copa.EFFICIENTNET_LITE0,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "EfficientNet-Lite" in err and "copa" in err and len(err.strip().splitlines()) == 1


def test_the_methods_it_serves_are_every_one_backbone_method_without_adapters(lite0):
    from hf_copa.interactive import methods
    from hf_copa.learners.base import methods_for

    served = set(methods_for(lite0))
    assert served == set(hf_copa.learners.one_backbone_methods()) - {"tsa", "copa+tsa"}
    assert set(methods(lite0)) == served  # what the Space offers
    assert {"tsa", "copa+tsa"} <= set(methods_for(hf_copa.load_model(hf_copa.SMALL_RESNET)))


def test_a_head_on_it_saves_pins_the_default_and_loads_through_pipeline(lite0, tmp_path):
    paths, labels = load_class_folders(sample_task_dir() / "support")
    queries, truth = load_class_folders(sample_task_dir() / "query")
    classifier = lite0.adapt(paths, labels, method="copa")
    classifier.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["model_type"] == "efficientnet_lite"
    assert config["copa_head"]["base_model"] == hf_copa.EFFICIENTNET_LITE0
    loaded = CopaForFewShotClassification.from_pretrained(tmp_path / "head")
    torch.testing.assert_close(loaded.logits(queries), classifier.logits(queries))
    hf_copa.register_auto_classes()
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "head"))
    assert type(classify.model).__name__ == "EfficientNetLiteForFewShotClassification"
    predictions = [result[0]["label"] for result in classify([str(q) for q in queries])]
    assert predictions == [item[0]["label"] for item in classifier.predict(queries)]
    assert np.mean([p == t for p, t in zip(predictions, truth, strict=True)]) >= 8 / 9
    with pytest.raises(ValueError, match="adapted on a 'efficientnet_lite' backbone"):
        CopaForFewShotClassification.from_pretrained(
            tmp_path / "head", base_model=hf_copa.load_model(hf_copa.SMALL_RESNET)
        )


def test_lite0_is_converted_once_atomically_into_the_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COPA_MODEL_CACHE", str(tmp_path / "models"))
    folder = hf_copa.bundled.bundled_model_path(hf_copa.EFFICIENTNET_LITE0)
    assert folder.parent == (tmp_path / "models").resolve() and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert hf_copa.load_model(hf_copa.EFFICIENTNET_LITE0).config._name_or_path == hf_copa.EFFICIENTNET_LITE0
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # read, not converted again
    card = (folder / "README.md").read_text()
    assert f"# {hf_copa.EFFICIENTNET_LITE0}" in card


def test_the_old_default_stays_loadable_by_name():
    model = hf_copa.load_model(hf_copa.SMALL_RESNET)
    assert isinstance(model, CopaModel) and model.config._name_or_path == "hf_copa:copa-mdl-small"
    assert model.config.image_size == 64


def test_random_init_of_it_keeps_the_shape_and_drops_the_weights(lite0):
    from hf_copa.pretrained import random_backbone

    random = random_backbone(lite0)
    assert type(random) is EfficientNetLiteModel and random.config._name_or_path == ""
    assert not torch.equal(random.state_dict()["stem_conv.weight"], lite0.state_dict()["stem_conv.weight"])
