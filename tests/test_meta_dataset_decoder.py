"""Meta-Dataset's pixels without TensorFlow, against TensorFlow's ImageDecoder output (decoded.npz)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_copa.meta_dataset import records
from hf_copa.meta_dataset.decoder import ImageDecodeError, decode_image, meta_dataset_pixels, resize_and_scale

SOURCES = ("md_plain", "md_bilevel", "md_dag")


@pytest.fixture(scope="module")
def oracle(reference_dir: Path):
    """{source: (encoded images, TensorFlow's pixels [40, 84, 84, 3])} for the 40 records of each source."""
    root = reference_dir / "meta_dataset"
    decoded = np.load(root / "decoded.npz")
    out = {}
    for source in SOURCES:
        cache: dict[int, list[bytes]] = {}
        images = []
        for class_id, record_index in decoded[f"{source}_records"]:
            if class_id not in cache:
                path = root / "records" / source / f"{class_id}.tfrecords"
                cache[class_id] = [example.image for _, example in records.iter_examples(path)]
            images.append(cache[class_id][record_index])
        out[source] = (images, decoded[f"{source}_images"])
    return out


def _hwc(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("source", SOURCES)
def test_pixels_match_tensorflow(oracle, source, single_thread):
    images, expected = oracle[source]
    pixels = meta_dataset_pixels(images, 84)
    assert pixels.shape == (40, 3, 84, 84) and pixels.dtype == torch.float32
    assert np.abs(_hwc(pixels) - expected).max() <= 1e-5
    # datasets' image dicts (cast_column("image", Image(decode=False))) give the same pixels
    dicts = [{"bytes": image, "path": None} for image in images[:8]]
    assert torch.equal(meta_dataset_pixels(dicts, 84), pixels[:8])


@pytest.mark.parametrize("source", SOURCES)
def test_pil_decoding_would_not_match(oracle, source, single_thread):
    """The test above is meaningful: PIL's accurate IDCT (same resize) is off by more than 1e-5."""
    images, expected = oracle[source]
    pil = [Image.open(io.BytesIO(image)).convert("RGB") for image in images]
    assert np.abs(_hwc(meta_dataset_pixels(pil, 84)) - expected).max() > 1e-3


def test_decoded_inputs_are_only_resized_and_scaled(oracle, single_thread):
    images, expected = oracle["md_plain"]
    arrays = [decode_image(image) for image in images[:5]]
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in arrays)
    assert np.abs(_hwc(meta_dataset_pixels(arrays, 84)) - expected[:5]).max() <= 1e-5
    assert torch.equal(
        meta_dataset_pixels([Image.fromarray(a) for a in arrays], 84), resize_and_scale(arrays, 84)
    )


def test_resize_is_bilinear_with_aligned_corners(single_thread):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    out = meta_dataset_pixels([image], (5, 9))
    assert out.shape == (1, 3, 5, 9)
    scaled = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 * 2 - 1
    # align_corners=True: the output's corners are the input's corners, and the middle row/column is the
    # input's middle row/column (7 -> 5 rows: row 2 of 5 sits at input row 3)
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert torch.allclose(out[0, :, y, x], scaled[:, y, x], atol=1e-6)
    assert torch.allclose(out[0, :, 2, 0], scaled[:, 3, 0], atol=1e-6)
    # same size: unchanged pixels
    assert torch.allclose(meta_dataset_pixels([image], (7, 11))[0], scaled, atol=1e-6)


def _png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def test_png_channels_follow_tensorflow():
    # RGBA: alpha stripped, colour kept (no compositing onto a background)
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    assert (decode_image(_png(Image.fromarray(rgba, "RGBA")))[..., 0] == 200).all()
    # grey and grey+alpha: replicated
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    out = decode_image(_png(Image.fromarray(grey, "L")))
    assert out.shape == (2, 3, 3) and (out == grey[..., None]).all()
    la = Image.fromarray(np.stack([grey, np.zeros_like(grey)], -1), "LA")
    assert (decode_image(_png(la)) == grey[..., None]).all()
    # palette with a transparent entry: the palette colour
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    out = decode_image(_png(palette, transparency=0))
    assert out.tolist() == [[[10, 20, 30], [40, 50, 60]]]
    # 16-bit grey: the high byte (libpng's strip_16), not PIL's clipping to 255
    deep = Image.fromarray(np.array([[0x1234, 0xFF00, 0x00FF]], np.uint16))
    assert decode_image(_png(deep))[0, :, 0].tolist() == [0x12, 0xFF, 0x00]


def test_grey_and_cmyk_jpegs():
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 7, y * 7, 255 - x * 4], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(buffer, format="JPEG")
    grey = decode_image(buffer.getvalue())
    assert (
        grey.shape == (32, 32, 3)
        and (grey[..., 0] == grey[..., 1]).all()
        and (grey[..., 1] == grey[..., 2]).all()
    )
    # PIL writes Adobe (inverted) CMYK JPEGs; TensorFlow's CMYK->RGB gives back the colours
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=95)
    out = decode_image(buffer.getvalue())
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_undecodable_images_are_named(oracle):
    images, _ = oracle["md_plain"]
    with pytest.raises(ImageDecodeError, match=r"image 1: .*truncated JPEG"):
        meta_dataset_pixels([images[0], images[1][: len(images[1]) // 2]], 84)
    with pytest.raises(ImageDecodeError, match=r"image 2: cannot decode 9 bytes starting 6e 6f"):
        meta_dataset_pixels([images[0], images[1], b"not image"], 84)
    with pytest.raises(ImageDecodeError, match=r"image 0: empty"):
        meta_dataset_pixels([b""], 84)
    with pytest.raises(ImageDecodeError, match="image 0: expected encoded bytes"):
        meta_dataset_pixels([3.0], 84)
    with pytest.raises(TypeError, match="list of images"):
        meta_dataset_pixels(images[0], 84)
