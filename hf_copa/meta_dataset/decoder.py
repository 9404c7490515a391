"""Meta-Dataset's test-time pixels without TensorFlow.

What Meta-Dataset computes (``meta_dataset/data/decoder.py`` at commit
167609505780a3dc604f50206253d65839093be9, ``ImageDecoder.decode_with_label``, lines 81-110, with
``read_example_and_parse_image``, lines 31-37)::

    image = tf.image.decode_image(example["image"], channels=3)          # uint8 HWC
    image = tf.image.resize_images(image, [size, size], method=BILINEAR, align_corners=True)   # float32
    image = 2 * (tf.cast(image, tf.float32) / 255.0 - 0.5)                # [-1, 1]

(``data_augmentation`` is None at test time, lines 112-122 do not apply.) Reproduced here:

1. **Decode** (:func:`decode_image`), as TensorFlow's ``DecodeImageV2`` kernel does with ``channels=3``:

   * JPEG (data starting ``FF D8 FF``): libjpeg-turbo through ``simplejpeg`` with the fast integer IDCT and
     fancy upsampling (``fastdct=True, fastupsample=False``), output RGB; greyscale JPEGs come out replicated
     to three channels, as libjpeg's ``JCS_GRAYSCALE -> JCS_RGB`` does for TensorFlow. PIL is *not* used: its
     accurate IDCT differs from TensorFlow's by up to 5 grey levels (the oracle's README; checked by the
     tests). CMYK/YCCK JPEGs are decoded to CMYK and converted as TensorFlow's
     ``tensorflow/core/lib/jpeg/jpeg_mem.cc`` does (``r = k*c/255`` when the file has an Adobe APP14 marker,
     ``(255-k)*(255-c)/255`` otherwise, integer division). A truncated JPEG is an error, as in TensorFlow
     (``try_recover_truncated=False``); other libjpeg warnings (e.g. extraneous bytes before a marker) are
     not, as in TensorFlow.
   * PNG, GIF, BMP and anything else PIL opens: decoded by PIL and brought to RGB with TensorFlow's rules
     (``tensorflow/core/lib/png/png_io.cc``, ``CommonInitDecode``): alpha and tRNS transparency are *stripped*
     (no compositing), palettes expanded, grey replicated, 16-bit samples reduced to their high byte
     (``png_set_strip_16``), 1/2/4-bit grey scaled to 0..255.

2. **Resize** (:func:`meta_dataset_pixels`) to ``size`` with bilinear interpolation, ``align_corners=True``
   and no antialiasing (``tf.compat.v1.image.resize_images`` -> ``resize_bilinear(align_corners=True,
   half_pixel_centers=False)``), in float32: ``torch.nn.functional.interpolate(mode="bilinear",
   align_corners=True)``. Then ``2 * (x / 255 - 0.5)``. The result is NCHW float32 (TensorFlow's is NHWC).

Measured against ``decoded.npz`` (TensorFlow 2.21's ``ImageDecoder(image_size=84)`` on 120 reference records):
within 1e-5 everywhere (see ``tests/test_meta_dataset_decoder.py``; the oracle's maker measured 3.6e-7).

Where this differs from TensorFlow, and why:

* GIF: TensorFlow's ``decode_image`` returns all frames of a GIF (a 4-D tensor), on which Meta-Dataset's
  pipeline fails; here the first frame is used. Meta-Dataset's converter re-encodes every non-JPEG source to
  JPEG (``dataset_conversion/dataset_to_records.py``, lines 346-365), so its records hold no GIFs.
* Formats TensorFlow does not decode (TIFF, ...): TensorFlow raises; here PIL decodes them.
* The PIL paths (non-JPEG) are not checked against TensorFlow by the oracle (which holds JPEG records only);
  they follow the libpng transformations TensorFlow requests, listed above.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ImageDecodeError", "decode_image", "meta_dataset_pixels", "resize_and_scale", "to_rgb_array"]

_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageDecodeError(ValueError):
    """Encoded image data that cannot be decoded; ``index`` is the image's position in the batch (or None)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        self.index = index
        super().__init__(message if index is None else f"image {index}: {message}")


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Encoded image bytes -> uint8 HWC RGB array, as ``tf.image.decode_image(data, channels=3)`` (see
    module)."""
    data = bytes(data)
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    if data.startswith(_JPEG_MAGIC):
        return _decode_jpeg(data)
    return _decode_with_pil(data)


def _decode_jpeg(data: bytes) -> np.ndarray:
    import simplejpeg

    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as error:
        raise ImageDecodeError(f"not a decodable JPEG ({error})") from None
    cmyk = colorspace in ("CMYK", "YCCK")
    target = "CMYK" if cmyk else "RGB"
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace=target, fastdct=True, fastupsample=False, strict=True
        )
    except ValueError as error:
        # libjpeg's JWRN_JPEG_EOF: the data ends before the image does. TensorFlow fails here too (no
        # truncated-JPEG recovery); "premature end of data segment" (JWRN_HIT_MARKER) it tolerates.
        if "premature end of jpeg file" in str(error).lower():
            raise ImageDecodeError(f"truncated JPEG ({error})") from None
        try:  # a libjpeg warning that TensorFlow tolerates (strict=True makes every warning an error)
            pixels = simplejpeg.decode_jpeg(
                data, colorspace=target, fastdct=True, fastupsample=False, strict=False
            )
        except ValueError as fatal:
            raise ImageDecodeError(f"not a decodable JPEG ({fatal})") from None
    if cmyk:
        pixels = _cmyk_to_rgb(pixels, _has_adobe_marker(data))
    return pixels


def _cmyk_to_rgb(cmyk: np.ndarray, adobe: bool) -> np.ndarray:
    """tensorflow/core/lib/jpeg/jpeg_mem.cc, ``UncompressLow``: CMYK scanlines to RGB, integer arithmetic."""
    values = cmyk.astype(np.int32)
    c, k = values[..., :3], values[..., 3:4]
    rgb = (k * c) // 255 if adobe else ((255 - k) * (255 - c)) // 255
    return np.ascontiguousarray(rgb.astype(np.uint8))


def _has_adobe_marker(data: bytes) -> bool:
    """Whether libjpeg sets ``saw_Adobe_marker``: an APP14 segment of at least 12 data bytes starting 'Adobe'
    before the first scan (libjpeg's ``jdmarker.c``, ``examine_app14``)."""
    pos = 2
    size = len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more header markers
            return False
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xEE and length - 2 >= 12 and data[pos + 4 : pos + 9] == b"Adobe":
            return True
        pos += 2 + length
    return False


def _decode_with_pil(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # the first frame of an animation
            return to_rgb_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        head = data[:8].hex(" ")
        raise ImageDecodeError(
            f"cannot decode {len(data)} bytes starting {head} as an image (JPEG, PNG, GIF, BMP, ...): {error}"
        ) from None


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or a uint8 array (HW, HWC with 1-4 channels) -> uint8 HWC RGB, with TensorFlow's
    ``channels=3`` rules: alpha dropped without compositing, grey replicated, palettes expanded, 16-bit
    samples reduced to their high byte."""
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    mode = image.mode
    if mode == "RGB":
        array = np.asarray(image)
    elif mode in ("RGBA", "RGBX"):
        array = np.asarray(image)[..., :3]
    elif mode == "L":
        array = np.asarray(image)
    elif mode == "LA":
        array = np.asarray(image)[..., 0]
    elif mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG): libpng's strip_16 keeps the high byte of each sample.
        array = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    elif mode in ("P", "PA"):  # palette colours; transparency dropped
        array = np.asarray(image.convert("RGBA"))[..., :3]
    else:  # "1", "La", "RGBa", CMYK TIFF, ...: PIL's own conversion
        array = np.asarray(image.convert("RGB"))
    return _array_to_rgb(array)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageDecodeError(f"decoded images must be uint8 arrays, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or 0 in array.shape[:2]:
        raise ImageDecodeError(
            f"decoded images must be HW or HWC (C in 1..4) arrays, got shape {array.shape}"
        )
    channels = array.shape[2]
    if channels in (1, 2):  # grey (+ alpha): drop alpha, replicate
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def _image_from_item(item: Any, index: int) -> np.ndarray:
    from PIL import Image

    try:
        if isinstance(item, (bytes, bytearray, memoryview)):
            return decode_image(item)
        if isinstance(item, dict):
            data = item.get("bytes")
            if data is None:
                path = item.get("path")
                if path is None:
                    raise ImageDecodeError("an image dict with neither 'bytes' nor 'path'")
                with open(path, "rb") as file:
                    data = file.read()
            return decode_image(data)
        if isinstance(item, (str, os.PathLike)):
            with open(item, "rb") as file:
                return decode_image(file.read())
        if isinstance(item, (np.ndarray, Image.Image)):
            return to_rgb_array(item)
    except ImageDecodeError as error:
        raise ImageDecodeError(str(error), index) from None
    raise ImageDecodeError(
        f"expected encoded bytes, a datasets image dict {{'bytes', 'path'}}, a path, a uint8 array or a PIL "
        f"image, got {type(item).__name__}",
        index,
    )


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    else:
        pair = tuple(int(value) for value in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def resize_and_scale(images: Sequence[np.ndarray], size: int | Sequence[int]):
    """uint8 HWC RGB arrays -> [N, 3, H, W] float32 tensor: bilinear, ``align_corners=True``, no antialias,
    then ``2 * (x / 255 - 0.5)`` (steps 2-3 of Meta-Dataset's ``ImageDecoder``)."""
    import torch
    import torch.nn.functional as F

    height, width = _size_pair(size)
    out = torch.empty((len(images), 3, height, width), dtype=torch.float32)
    for i, array in enumerate(images):
        pixels = (
            torch.from_numpy(np.require(array, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))
            .permute(2, 0, 1)
            .unsqueeze(0)
            .to(torch.float32)
        )
        if pixels.shape[2:] == (height, width):
            out[i] = pixels[0]  # what resize_images does at the same size (and what bilinear gives anyway)
        else:
            out[i] = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=True)[0]
    return (out / 255.0 - 0.5) * 2.0


def meta_dataset_pixels(images: Sequence[Any], size: int | Sequence[int] = 84):
    """Meta-Dataset's test-time pixels of a batch: a ``torch.Tensor`` [N, 3, H, W], float32, in [-1, 1].

    ``images``: encoded image bytes (e.g. a record's ``image``), ``datasets`` image dicts ``{"bytes": ...,
    "path": ...}`` (from ``dataset.cast_column("image", datasets.Image(decode=False))``; read from ``path``
    when ``bytes`` is None), file paths, or already decoded images: uint8 HW/HWC arrays or PIL images. Encoded
    inputs are decoded as TensorFlow decodes them (:func:`decode_image`); for decoded inputs only the resize
    and scaling apply, and the decode was the caller's (a PIL-decoded JPEG is *not* TensorFlow's pixels).
    A uint8 NHWC array counts as a list of HWC arrays. ``size``: an int (square) or (height, width).
    Undecodable data raises :class:`ImageDecodeError` naming the image's index.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)  # a uint8 NHWC batch
    elif isinstance(images, (bytes, bytearray, memoryview, dict, str, np.ndarray)):
        raise TypeError("meta_dataset_pixels takes a list of images; wrap a single image in a list")
    arrays = [_image_from_item(item, index) for index, item in enumerate(images)]
    return resize_and_scale(arrays, size)
