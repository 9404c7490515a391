"""What is one image and what is a batch, at every entry point (processor, adapt, predict, logits), and the
Meta-Dataset decoder setting of the processor."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import PIL.Image
import pytest
import torch

from hf_copa import CopaImageProcessor
from hf_copa.image_processing_copa import split_images
from hf_copa.meta_dataset import iter_examples

from .conftest import tiny_backbone

SIDE = 32


@pytest.fixture(scope="module")
def processor() -> CopaImageProcessor:
    return CopaImageProcessor(size={"height": SIDE, "width": SIDE})


def grey_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(count)]


def colour_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8) for _ in range(count)]


def as_list(processor, images) -> np.ndarray:
    return processor(list(images))["pixel_values"].numpy()


# (description, input, expected images as a list, or an error phrase), built from the documented table.
def cases():
    grey, colour = grey_images(5), colour_images(4)
    numpy_nhwc, torch_nchw = np.stack(colour), torch.from_numpy(np.stack(colour)).permute(0, 3, 1, 2)
    return {
        "numpy HW": (grey[0], [grey[0]]),
        "numpy HWC": (colour[0], [colour[0]]),
        "numpy NHW, 5 grey": (np.stack(grey), grey),
        "numpy NHW, 2 grey": (np.stack(grey[:2]), grey[:2]),
        "numpy 1HW": (np.stack(grey[:1]), grey[:1]),
        "numpy NHW, 3 grey (ambiguous)": (np.stack(grey[:3]), r"CHW\) or 3 grey images"),
        "numpy CHW (ambiguous)": (colour[0].transpose(2, 0, 1).copy(), "grey images as a list"),
        "numpy NHWC": (numpy_nhwc, colour),
        "numpy NCHW": (numpy_nhwc.transpose(0, 3, 1, 2).copy(), colour),
        "torch CHW": (torch.from_numpy(colour[0]).permute(2, 0, 1), [colour[0]]),
        "torch HWC": (torch.from_numpy(colour[0]), [colour[0]]),
        "torch NHW, 5 grey": (torch.from_numpy(np.stack(grey)), grey),
        "torch 3HW is CHW": (torch.from_numpy(np.stack(grey[:3])), [np.stack(grey[:3], axis=-1)]),
        "torch NCHW uint8": (torch_nchw, colour),
        "torch NHWC uint8": (torch.from_numpy(numpy_nhwc), colour),
        "numpy NCHW float": (numpy_nhwc.transpose(0, 3, 1, 2) / 255.0, colour),
        "five axes": (np.zeros((1, 2, 8, 8, 3), np.uint8), "neither one image"),
        "one axis": (np.zeros(8, np.uint8), "neither one image"),
        "batch without channels": (torch.zeros(2, 8, 8, 8, dtype=torch.uint8), "channel axis"),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_each_shape_is_read_as_documented_or_refused_naming_the_shape(processor, name):
    images, expected = cases()[name]
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected) as raised:
            processor(images)
        assert str(tuple(images.shape)) in str(raised.value) or "shape" in str(raised.value)
        return
    got = processor(images)["pixel_values"].numpy()
    np.testing.assert_array_equal(got, as_list(processor, expected))


def test_a_fuzz_of_shapes_and_dtypes_never_guesses_silently(processor):
    """Every array of 1 to 5 axes of small sizes, uint8 / float / bool, numpy or torch: the result has as many
    images as the documented rule says, or a ValueError names the shape; nothing else escapes."""
    sizes = (1, 3, 4, 6)
    for ndim in range(1, 6):
        for shape in itertools.product(sizes, repeat=ndim):
            for kind in ("uint8", "float", "bool"):
                for library in ("numpy", "torch"):
                    array = np.ones(shape, dtype=np.uint8)
                    array = {"uint8": array, "float": array * 0.5, "bool": array.astype(bool)}[kind]
                    images = torch.from_numpy(array) if library == "torch" else array
                    try:
                        count = len(processor(images)["pixel_values"])
                    except ValueError as err:
                        assert "shape" in str(err) or str(shape) in str(err) or "channel" in str(err), err
                        continue
                    assert count == len(split_images(images)), (library, shape, kind)
                    assert count == (
                        1 if ndim <= 2 or (ndim == 3 and _one_image(shape, library)) else shape[0]
                    )


def _one_image(shape: tuple[int, ...], library: str) -> bool:
    channels = (1, 3, 4)
    if library == "torch":
        return shape[0] in channels or shape[-1] in channels
    return shape[-1] in channels or shape[0] == 1


def test_model_entry_points_follow_the_same_rule(tiny_model):
    grey = grey_images(5, seed=1)
    support = grey[:4] + grey_images(4, seed=2)
    labels = ["a"] * 4 + ["b"] * 4
    classifier = tiny_model.adapt(np.stack(support), labels, method="ncc")
    assert len(classifier.predict(np.stack(grey))) == 5  # a numpy stack of grey images is a batch
    batch = torch.from_numpy(np.stack(colour_images(6))).permute(0, 3, 1, 2)  # uint8 NCHW
    assert len(classifier.predict(batch)) == 6 and classifier.logits(batch).shape == (6, 2)
    with pytest.raises(ValueError, match="3 grey images"):
        classifier.predict(np.stack(grey[:3]))
    pixel_values = CopaImageProcessor(size={"height": SIDE, "width": SIDE})(list(batch))["pixel_values"]
    torch.testing.assert_close(classifier.logits(pixel_values), classifier.logits(batch), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="values in \\[0, 1\\] is taken as pixel values"):
        classifier.logits(batch.float() / 255)


# --- decoder="meta-dataset" -------------------------------------------------------------------------------


def reference_images(reference_dir, source: str):
    decoded = np.load(reference_dir / "meta_dataset" / "decoded.npz")
    records = decoded[f"{source}_records"]
    folder = reference_dir / "meta_dataset" / "records" / source
    wanted = {(int(c), int(r)) for c, r in records}
    found = {}
    for class_id in sorted({int(c) for c, _ in records}):
        for index, example in iter_examples(folder / f"{class_id}.tfrecords", expected_label=class_id):
            if (class_id, index) in wanted:
                found[(class_id, index)] = example.image
    data = [found[(int(c), int(r))] for c, r in records]
    return data, torch.from_numpy(decoded[f"{source}_images"]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("source", ["md_plain", "md_bilevel", "md_dag"])
def test_the_meta_dataset_decoder_gives_tensorflows_pixels(reference_dir, source):
    data, expected = reference_images(reference_dir, source)
    processor = CopaImageProcessor(decoder="meta-dataset")
    from_bytes = processor(data)["pixel_values"]
    torch.testing.assert_close(from_bytes, expected, rtol=0, atol=1e-5)
    from_dicts = processor([{"bytes": b, "path": None} for b in data])["pixel_values"]
    torch.testing.assert_close(from_dicts, expected, rtol=0, atol=1e-5)
    default = CopaImageProcessor()(data)["pixel_values"]
    assert (default - expected).abs().max() > 1e-3  # PIL's decode and resize are not TensorFlow's


def test_the_decoder_setting_is_saved_and_loaded_and_checked(tmp_path, reference_dir):
    CopaImageProcessor(decoder="meta-dataset", size={"height": 40, "width": 40}).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["decoder"] == "meta-dataset"
    loaded = CopaImageProcessor.from_pretrained(tmp_path)
    assert loaded.decoder == "meta-dataset"
    data, _ = reference_images(reference_dir, "md_plain")
    assert loaded(data[:2])["pixel_values"].shape == (2, 3, 40, 40)
    assert CopaImageProcessor().decoder == "pil"
    with pytest.raises(ValueError, match="decoder must be one of"):
        CopaImageProcessor(decoder="tensorflow")


def test_decoded_inputs_get_the_meta_dataset_resize_and_scaling():
    image = np.random.default_rng(3).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    processor = CopaImageProcessor(decoder="meta-dataset", size={"height": 21, "width": 21})
    from_array = processor(image)["pixel_values"]
    from_pil = processor(PIL.Image.fromarray(image))["pixel_values"]
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(),
        size=(21, 21),
        mode="bilinear",
        align_corners=True,
    )
    torch.testing.assert_close(from_array, (expected / 255 - 0.5) * 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_pil, from_array, rtol=0, atol=0)
    png = io.BytesIO()
    PIL.Image.fromarray(image).save(png, format="PNG")
    torch.testing.assert_close(processor(png.getvalue())["pixel_values"], from_array, rtol=0, atol=0)
    assert processor(image, return_tensors="np")["pixel_values"].dtype == np.float32
    assert tiny_backbone().extract_features(processor([image] * 2)["pixel_values"]).shape == (2, 16)
