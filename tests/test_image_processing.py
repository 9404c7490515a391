"""CopaImageProcessor: the URL input contract, the RGB conversion policy, errors and serialization."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from hf_copa.configuration_copa import CopaConfig
from hf_copa.image_processing_copa import CopaImageProcessor, to_rgb_image

SIDE = 84


@pytest.fixture(scope="module")
def processor() -> CopaImageProcessor:
    return CopaImageProcessor()


@pytest.fixture(scope="module")
def rgb_array() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)


def pixels(processor: CopaImageProcessor, images) -> np.ndarray:
    return processor(images)["pixel_values"].numpy()


def expected_pixels(rgb: np.ndarray) -> np.ndarray:
    """The URL contract 2 * (x / 255 - 0.5), as a [1, 3, H, W] batch."""
    return (2 * (rgb.astype(np.float64) / 255 - 0.5)).transpose(2, 0, 1)[None]


# --- the numeric contract ---------------------------------------------------------------------------------


def test_scaling_is_exactly_the_url_contract(processor, rgb_array):
    output = processor(PIL.Image.fromarray(rgb_array))["pixel_values"]
    assert isinstance(output, torch.Tensor)
    assert output.dtype == torch.float32
    assert output.shape == (1, 3, SIDE, SIDE)
    np.testing.assert_allclose(output.numpy(), expected_pixels(rgb_array), rtol=0, atol=1e-6)
    assert output.min() >= -1 and output.max() <= 1


def test_return_tensors_np_gives_the_same_values(processor, rgb_array):
    output = processor(rgb_array, return_tensors="np")["pixel_values"]
    assert isinstance(output, np.ndarray) and output.dtype == np.float32
    np.testing.assert_allclose(output, expected_pixels(rgb_array), rtol=0, atol=1e-6)


def test_resize_is_bilinear_to_the_configured_size():
    rgb = np.random.default_rng(1).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    processor = CopaImageProcessor.from_copa_config(CopaConfig(image_size=40))
    output = pixels(processor, PIL.Image.fromarray(rgb))
    assert output.shape == (1, 3, 40, 40)
    resized = np.asarray(PIL.Image.fromarray(rgb).resize((40, 40), PIL.Image.Resampling.BILINEAR))
    np.testing.assert_allclose(output, expected_pixels(resized), rtol=0, atol=1e-6)


def test_default_size_is_84(processor):
    assert processor.size.height == SIDE and processor.size.width == SIDE
    assert pixels(processor, np.zeros((10, 20, 3), dtype=np.uint8)).shape == (1, 3, SIDE, SIDE)


# --- PIL modes ----------------------------------------------------------------------------------------------

PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"]
HIGH_BIT_DEPTH_MODES = ["I", "I;16", "I;16B", "F"]


def random_image(mode: str, size=(12, 9)) -> PIL.Image.Image:
    rng = np.random.default_rng(2)
    if mode == "F":
        return PIL.Image.fromarray(rng.random(size[::-1]).astype(np.float32))
    if mode in HIGH_BIT_DEPTH_MODES:
        return PIL.Image.fromarray(rng.integers(0, 65536, size[::-1]).astype(np.uint16)).convert(mode)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", PIL_MODES + HIGH_BIT_DEPTH_MODES)
def test_every_pil_mode_gives_a_finite_rgb_batch(processor, mode):
    image = random_image(mode)
    assert image.mode == mode
    output = processor(image)["pixel_values"]
    assert output.shape == (1, 3, SIDE, SIDE) and output.dtype == torch.float32
    assert torch.isfinite(output).all()
    assert output.min() >= -1 and output.max() <= 1


def test_palette_with_transparency_is_composited_on_white(processor):
    image = PIL.Image.new("P", (SIDE, SIDE), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.paste(1, (0, 0, SIDE // 2, SIDE))
    image.info["transparency"] = 0  # palette index 0 (black) is transparent
    output = pixels(processor, image)[0]
    np.testing.assert_allclose(output[:, :, SIDE // 2 :], 1.0, atol=1e-6)  # transparent -> white
    np.testing.assert_allclose(output[:, 0, 0], 2 * (np.array([200, 10, 10]) / 255 - 0.5), atol=1e-6)


def test_rgba_alpha_blends_with_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = [10, 100, 200]
    rgba[..., 3] = [[0, 255, 51], [0, 255, 51]]
    rgb = np.asarray(to_rgb_image(PIL.Image.fromarray(rgba)))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [10, 100, 200]
    expected = np.rint(np.array([10, 100, 200]) * 0.2 + 255 * 0.8)
    assert rgb[0, 2].tolist() == expected.tolist()


def test_grayscale_equals_its_replicated_rgb(processor):
    gray = np.random.default_rng(3).integers(0, 256, size=(20, 16), dtype=np.uint8)
    replicated = PIL.Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(pixels(processor, PIL.Image.fromarray(gray)), pixels(processor, replicated))


def test_sixteen_bit_and_float_modes_are_rescaled_not_clipped():
    sixteen_bit = PIL.Image.fromarray(np.array([[0, 128 * 257, 65535]], dtype=np.uint16))
    assert sixteen_bit.mode == "I;16"
    assert np.asarray(to_rgb_image(sixteen_bit))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(to_rgb_image(sixteen_bit.convert("I")))[0, :, 0].tolist() == [0, 128, 255]
    small_ints = PIL.Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32))
    assert small_ints.mode == "I"
    assert np.asarray(to_rgb_image(small_ints))[0, :, 0].tolist() == [0, 128, 255]
    floats = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb_image(floats))[0, :, 0].tolist() == [0, 128, 255]


# --- arrays, tensors, paths, batches -----------------------------------------------------------------------


def test_numpy_inputs_match_the_equivalent_pil_image(processor, rgb_array):
    gray = rgb_array[:, :, 0]
    from_pil_rgb = pixels(processor, PIL.Image.fromarray(rgb_array))
    from_pil_gray = pixels(processor, PIL.Image.fromarray(gray))
    np.testing.assert_array_equal(pixels(processor, rgb_array), from_pil_rgb)
    np.testing.assert_array_equal(pixels(processor, gray), from_pil_gray)
    np.testing.assert_array_equal(pixels(processor, gray[:, :, None]), from_pil_gray)
    np.testing.assert_array_equal(pixels(processor, rgb_array.astype(np.float32) / 255), from_pil_rgb)
    np.testing.assert_array_equal(pixels(processor, gray.astype(np.float64) / 255), from_pil_gray)
    with pytest.raises(ValueError, match=r"CHW\) or 3 grey images"):  # numpy CHW: ambiguous, refused
        pixels(processor, rgb_array.transpose(2, 0, 1))


def test_numpy_rgba_matches_pil_rgba(processor):
    rgba = np.random.default_rng(4).integers(0, 256, size=(10, 12, 4), dtype=np.uint8)
    np.testing.assert_array_equal(pixels(processor, rgba), pixels(processor, PIL.Image.fromarray(rgba)))


def test_integer_dtypes_follow_their_range(processor, rgb_array):
    from_uint8 = pixels(processor, rgb_array)
    np.testing.assert_array_equal(pixels(processor, rgb_array.astype(np.int64)), from_uint8)
    np.testing.assert_array_equal(pixels(processor, rgb_array.astype(np.uint16) * 257), from_uint8)
    np.testing.assert_array_equal(pixels(processor, rgb_array.astype(np.int32) * 257), from_uint8)
    mask = rgb_array[:, :, 0] > 127
    np.testing.assert_array_equal(pixels(processor, mask), pixels(processor, mask.astype(np.uint8) * 255))


def test_torch_tensors_match_the_equivalent_pil_image(processor, rgb_array):
    from_pil = pixels(processor, PIL.Image.fromarray(rgb_array))
    chw = torch.from_numpy(rgb_array).permute(2, 0, 1)
    np.testing.assert_array_equal(pixels(processor, chw), from_pil)
    np.testing.assert_array_equal(pixels(processor, chw.float() / 255), from_pil)
    np.testing.assert_array_equal(pixels(processor, torch.from_numpy(rgb_array)), from_pil)  # HWC
    np.testing.assert_array_equal(pixels(processor, (chw.float() / 255).requires_grad_()), from_pil)


def test_ambiguous_axes_follow_each_library_convention():
    array = np.random.default_rng(5).integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    assert to_rgb_image(array).size == (5, 3)  # numpy: HWC -> 3 rows, 5 columns
    assert to_rgb_image(torch.from_numpy(array)).size == (3, 5)  # torch: CHW -> 5 rows, 3 columns


def test_paths_are_opened_with_pil(processor, tmp_path, rgb_array):
    path = tmp_path / "image.png"
    PIL.Image.fromarray(rgb_array).save(path)
    from_pil = pixels(processor, PIL.Image.fromarray(rgb_array))
    np.testing.assert_array_equal(pixels(processor, path), from_pil)
    np.testing.assert_array_equal(pixels(processor, str(path)), from_pil)


def test_a_mixed_list_is_one_batch_in_order(processor, tmp_path, rgb_array):
    gray = PIL.Image.fromarray(rgb_array[:, :, 1])
    path = tmp_path / "image.png"
    PIL.Image.fromarray(rgb_array).save(path)
    images = [rgb_array, gray, torch.from_numpy(rgb_array).permute(2, 0, 1), str(path), random_image("P")]
    batch = pixels(processor, images)
    assert batch.shape == (len(images), 3, SIDE, SIDE)
    for index, image in enumerate(images):
        np.testing.assert_array_equal(batch[index], pixels(processor, image)[0])
    np.testing.assert_array_equal(pixels(processor, tuple(images)), batch)


# --- errors -------------------------------------------------------------------------------------------------


def write_text_file(tmp_path) -> str:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    return str(path)


BAD_INPUTS = {
    "int": (lambda tmp: 3, TypeError, "not an image"),
    "dict": (lambda tmp: {"bytes": b"", "path": None}, ValueError, "not an image"),
    "dict_without_data": (lambda tmp: {"bytes": None, "path": None}, ValueError, "neither bytes nor a path"),
    "garbage_bytes": (lambda tmp: b"\x00not an image", ValueError, "not an image file"),
    "none": (lambda tmp: None, TypeError, "not an image"),
    "missing_path": (lambda tmp: str(tmp / "missing.png"), ValueError, "does not exist"),
    "directory": (lambda tmp: tmp, ValueError, "is a directory"),
    "not_an_image_file": (write_text_file, ValueError, "not an image file"),
    "batch_in_a_list": (lambda tmp: np.zeros((2, 8, 8, 3), dtype=np.uint8), ValueError, "batch of images"),
    "five_dims": (lambda tmp: np.zeros((1, 2, 8, 8, 3), dtype=np.uint8), ValueError, "neither one image"),
    "one_dim": (lambda tmp: np.zeros(8, dtype=np.uint8), ValueError, "neither one image"),
    "zero_size": (lambda tmp: np.zeros((0, 8, 3), dtype=np.uint8), ValueError, "no pixels"),
    "five_channels": (lambda tmp: torch.zeros((2, 8, 8, 5), dtype=torch.uint8), ValueError, "channel axis"),
    "nan": (lambda tmp: np.full((8, 8, 3), np.nan, dtype=np.float32), ValueError, "NaN"),
    "float_0_255": (lambda tmp: np.full((8, 8, 3), 200.0), ValueError, "[0, 1]"),
    "negative_ints": (lambda tmp: np.full((8, 8), -1, dtype=np.int16), ValueError, "integer pixel values"),
    "complex": (lambda tmp: np.zeros((8, 8), dtype=np.complex64), TypeError, "dtype"),
    "nan_tensor": (lambda tmp: torch.full((3, 8, 8), float("nan")), ValueError, "NaN"),
    "nested_list": (lambda tmp: [np.zeros((8, 8), dtype=np.uint8)], TypeError, "nested"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_errors_name_the_list_index(processor, tmp_path, case):
    make, error, message = BAD_INPUTS[case]
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(error, match=r"images\[1\]") as raised:
        processor([good, make(tmp_path), good])
    assert message in str(raised.value)


@pytest.mark.parametrize("case", ["int", "missing_path", "five_dims", "nan"])
def test_bad_single_input_errors(processor, tmp_path, case):
    make, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match="image") as raised:
        processor(make(tmp_path))
    assert message in str(raised.value)


def test_type_errors_say_what_is_accepted(processor):
    with pytest.raises(TypeError, match="PIL image"):
        processor(object())


def test_empty_list_is_rejected(processor):
    with pytest.raises(ValueError, match="empty list"):
        processor([])


def test_from_copa_config_rejects_other_objects():
    with pytest.raises(TypeError, match="CopaConfig"):
        CopaImageProcessor.from_copa_config({"image_size": 84})


# --- serialization ------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, rgb_array):
    processor = CopaImageProcessor.from_copa_config(CopaConfig(image_size=32))
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CopaImageProcessor"
    assert saved["size"] == {"height": 32, "width": 32}
    assert saved["image_mean"] == [0.5, 0.5, 0.5] and saved["image_std"] == [0.5, 0.5, 0.5]
    loaded = CopaImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CopaImageProcessor)
    assert loaded.to_dict() == processor.to_dict()
    np.testing.assert_array_equal(pixels(loaded, rgb_array), pixels(processor, rgb_array))
    assert pixels(loaded, rgb_array).shape == (1, 3, 32, 32)


def test_a_datasets_image_column_is_a_list_of_images():
    import datasets

    arrays = [np.full((6, 5, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    dataset = datasets.Dataset.from_dict(
        {"image": arrays}, features=datasets.Features({"image": datasets.Image()})
    )
    processor = CopaImageProcessor()
    expected = processor(list(dataset["image"]))["pixel_values"]
    assert torch.equal(processor(dataset["image"])["pixel_values"], expected)
    assert expected.shape == (3, 3, 84, 84)
