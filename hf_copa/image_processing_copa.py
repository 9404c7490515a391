"""`CopaImageProcessor`: any image -> 8-bit RGB -> bilinear resize to 84x84 -> pixels in [-1, 1].

The URL backbone was trained on 84x84 RGB images scaled as `2 * (x / 255 - 0.5)`; this processor is that
input contract, written declaratively like transformers' own `*ImageProcessorPil` classes (rescale by 1/255,
then normalize with mean 0.5 / std 0.5).

**One image or many.** A list or tuple (or a `datasets` image column) is a batch: each element is one
image. An array or tensor is read by its number of axes, numpy arrays channels-last and torch tensors
channels-first (the conventions of each library, and of `datasets`' torch format):

| input | read as |
| --- | --- |
| 2-D `[H, W]` | one grey image |
| 3-D numpy `[H, W, C]`, C in 1, 3, 4 | one image |
| 3-D numpy `[N, H, W]`, N not 3 or 4 | N grey images (e.g. `np.stack(grey_images)`) |
| 3-D numpy `[3 or 4, H, W]` | refused: CHW colour or 3 / 4 grey images? (the error says how to pass each) |
| 3-D torch `[C, H, W]`, C in 1, 3, 4; else `[H, W, C]` | one image |
| 3-D torch `[N, H, W]` otherwise | N grey images |
| 4-D `[N, H, W, C]` (numpy) or `[N, C, H, W]` (torch), either layout when only one fits | N images |

**Every image becomes 8-bit RGB by one policy**, so that a picture gives the same pixels whatever container
it arrives in:

- PIL images of any mode: RGB as is; 1, L, P, CMYK, YCbCr, LAB, HSV, ... through Pillow's own conversion;
  16-bit (`I;16*`), 32-bit integer (`I`) and float (`F`) modes by the array rules below (Pillow's own
  conversion would clip them).
- Transparency (alpha channels, palette or colour-key transparency) is composited on a white background.
- Pixel ranges by dtype: bool -> {0, 255}; uint8 as is; uint16 -> 0..65535 mapped to 0..255; other integer
  dtypes (e.g. int64 from `np.array` of Python ints, PIL `I`) -> 0..255 if every value fits, else 0..65535;
  floats must lie in [0, 1]. Anything else (negative integers, floats outside [0, 1], NaN) is an error rather
  than a silent guess.
- Strings and `os.PathLike` objects are paths to image files opened with PIL (URLs are not fetched);
  `bytes` and `datasets` image dicts `{"bytes": ..., "path": ...}` (from `Image(decode=False)`) are encoded
  image files.

**`decoder="meta-dataset"`** gives the pixels of Meta-Dataset's test-time `ImageDecoder`
(`meta_dataset/data/decoder.py`, see `hf_copa.meta_dataset.decoder`): encoded images (bytes, image dicts,
paths) are decoded as TensorFlow decodes them (libjpeg's fast integer IDCT with fancy upsampling), resized
bilinearly with `align_corners=True` and no antialiasing, then scaled to [-1, 1]. Already decoded images
(PIL images, arrays) get the same resize and scaling, but their decode was the caller's: a PIL-decoded JPEG
is not TensorFlow's pixels. The setting is saved in `preprocessor_config.json`; the default, `"pil"`, is
the policy above with PIL's bilinear resize.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs

from .configuration_backbone import BackboneConfig
from .validation import CopaTypeError, CopaValueError

ACCEPTED_INPUTS = (
    "a PIL image (any mode), a numpy array or torch tensor of one image (HW, HWC or CHW with 1, 3 or 4 "
    "channels) or a batch of them (NHWC / NCHW, or a stack of grey images NHW), of dtype uint8, uint16, "
    "other non-negative integers, bool, or floats in [0, 1]; a path to an image file; encoded image bytes or "
    "a `datasets` image dict; or a flat list/tuple (or a `datasets` column) of these"
)
DECODERS = ("pil", "meta-dataset")

_CHANNEL_COUNTS = (1, 3, 4)
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_FLOAT_TOLERANCE = 1e-3  # floats this far outside [0, 1] (rounding noise) are clipped, not rejected


class CopaImageProcessorKwargs(ImagesKwargs, total=False):
    decoder: str  # "pil" (default) or "meta-dataset": see the module docstring


class CopaImageProcessor(PilBackend):
    """The URL / CoPA input contract: 8-bit RGB, bilinear resize to `size`, then `2 * (x / 255 - 0.5)`.

    `processor(images)["pixel_values"]` is a float32 torch tensor [N, 3, height, width]; pass
    `return_tensors="np"` for numpy. See the module docstring for what is one image and what is a batch,
    how each kind of input becomes RGB, and `decoder="meta-dataset"` (TensorFlow's Meta-Dataset pixels).
    """

    valid_kwargs = CopaImageProcessorKwargs
    decoder = "pil"

    resample = PILImageResampling.BILINEAR
    size = {"height": 84, "width": 84}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    return_tensors = "pt"

    @classmethod
    def from_copa_config(cls, config: BackboneConfig, **kwargs: Any) -> CopaImageProcessor:
        """The processor matching a backbone config's input contract (a square `config.image_size` input)."""
        if not isinstance(config, BackboneConfig):
            raise CopaTypeError(
                f"from_copa_config expects a backbone config (CopaConfig, ...), got {type(config).__name__}."
            )
        kwargs.setdefault("size", {"height": config.image_size, "width": config.image_size})
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """As `ImageProcessingMixin.from_pretrained`; `hf_copa.DEFAULT_MODEL` reads the bundled model."""
        from .bundled import bundled_model_path

        bundled = bundled_model_path(pretrained_model_name_or_path)
        return super().from_pretrained(bundled or pretrained_model_name_or_path, *args, **kwargs)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.decoder not in DECODERS:
            raise CopaValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}.")

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        decoder = kwargs.get("decoder") or self.decoder
        if decoder == "meta-dataset":
            return self._meta_dataset_preprocess(
                images, kwargs.get("return_tensors", self.return_tensors), kwargs
            )
        return super().preprocess(images, *args, **kwargs)

    def _meta_dataset_preprocess(self, images: Any, return_tensors: Any, kwargs: dict) -> BatchFeature:
        """TensorFlow's Meta-Dataset pixels (see the module docstring); encoded inputs decoded as TF does."""
        from .meta_dataset.decoder import meta_dataset_pixels

        size = kwargs.get("size") or self.size
        items = [
            item if _is_encoded(item) else np.asarray(to_rgb_image(item, name))
            for name, item in split_images(images)
        ]
        pixel_values = meta_dataset_pixels(items, (size["height"], size["width"]))
        mean, std = kwargs.get("image_mean") or self.image_mean, kwargs.get("image_std") or self.image_std
        if tuple(mean) != (0.5, 0.5, 0.5) or tuple(std) != (0.5, 0.5, 0.5):
            # Meta-Dataset's pixels are 2 * (x / 255 - 0.5); another backbone normalises x / 255 its own way.
            mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
            pixel_values = ((pixel_values + 1) / 2 - mean) / std
        data = {"pixel_values": pixel_values if return_tensors == "pt" else pixel_values.numpy()}
        return BatchFeature(data=data, tensor_type=return_tensors if return_tensors != "pt" else None)

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[PIL.Image.Image]:
        # The one hook between raw inputs and the backend: every input becomes 8-bit RGB here, with errors
        # that name the offending list index, before `process_image` makes it a CHW array.
        return to_rgb_images(images)


def to_rgb_images(images: Any) -> list[PIL.Image.Image]:
    """One image or a batch (see the module docstring) -> a list of 8-bit RGB PIL images."""
    return [to_rgb_image(image, name) for name, image in split_images(images)]


def split_images(images: Any) -> list[tuple[str, Any]]:
    """(name for errors, one image) for each image of `images`, by the module's one-or-many rules."""
    if _is_image_column(images):  # e.g. `dataset["image"]`, a lazy `datasets` Column
        images = list(images)
    if isinstance(images, list | tuple):
        if not images:
            raise CopaValueError(
                f"Got an empty list of images; pass at least one image. Accepted: {ACCEPTED_INPUTS}."
            )
        return [
            (f"images[{index}]", _one_image(image, f"images[{index}]")) for index, image in enumerate(images)
        ]
    if isinstance(images, np.ndarray | torch.Tensor):
        arrays = _split_array(images)
        if len(arrays) == 1 and images.ndim < 4:
            return [("image", arrays[0])]
        return [(f"images[{index}]", array) for index, array in enumerate(arrays)]
    return [("image", images)]


def _one_image(image: Any, name: str) -> Any:
    """An element of a list must be one image, not a batch."""
    if isinstance(image, np.ndarray | torch.Tensor) and len(_split_array(image, name)) != 1:
        raise CopaValueError(
            f"{name} is a batch of images (shape {tuple(image.shape)}) inside a list; pass one flat list of "
            "images, or the batch array itself."
        )
    if isinstance(image, list | tuple):
        raise CopaTypeError(
            f"{name} is a {type(image).__name__}; nested lists are not accepted, pass a flat list."
        )
    return image


def _split_array(array: np.ndarray | torch.Tensor, name: str = "image") -> list[Any]:
    """The images of an array or tensor: [itself] for one image, or its slices for a batch."""
    torch_layout = isinstance(array, torch.Tensor)
    shape = tuple(array.shape)
    channels = _CHANNEL_COUNTS
    if array.ndim == 2:
        return [array]
    if array.ndim == 3:
        first, last = shape[0] in channels, shape[-1] in channels
        if torch_layout and first or (last and not (torch_layout and first)):
            return [array]
        if not torch_layout and shape[0] in (3, 4):
            raise CopaValueError(
                f"{name}: a numpy array of shape {shape} could be one colour image with {shape[0]} channels "
                f"first (CHW) or {shape[0]} grey images; pass a colour image as HWC (np.moveaxis(x, 0, -1)) "
                "or as a torch tensor, and grey images as a list (list(x))."
            )
        return list(array)  # a stack of grey images [N, H, W]
    if array.ndim == 4:
        middle, last = shape[1] in channels, shape[-1] in channels
        if (torch_layout and middle) or (not torch_layout and not last and middle):
            return [image for image in array]  # NCHW: each CHW image
        if last:
            return [image.permute(2, 0, 1) if torch_layout else image for image in array]  # NHWC
        raise CopaValueError(
            f"{name}: a batch of shape {shape} has no channel axis of size 1, 3 or 4 after the batch axis "
            "(NCHW) or last (NHWC)."
        )
    raise CopaValueError(
        f"{name}: an array of shape {shape} is neither one image (HW, HWC, CHW) nor a batch of images "
        "(NHW, NHWC, NCHW); pass images with 2, 3 or 4 axes, or a list of images."
    )


def _is_image_column(images: Any) -> bool:
    module = type(images).__module__ or ""
    return module.startswith("datasets.") and hasattr(images, "__iter__") and hasattr(images, "__len__")


def _is_encoded(image: Any) -> bool:
    return isinstance(image, bytes | bytearray | memoryview | dict | str | os.PathLike)


def to_rgb_image(image: Any, name: str = "image") -> PIL.Image.Image:
    """One image of any accepted kind -> an 8-bit RGB PIL image; `name` labels it in error messages."""
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image, name)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, name, channels_first=False)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.float()  # numpy has no bfloat16
        return _array_to_rgb(tensor.numpy(), name, channels_first=True)
    if isinstance(image, str | os.PathLike):
        return _open_image_file(Path(image), name)
    if isinstance(image, bytes | bytearray | memoryview):
        return _decode_bytes(bytes(image), name)
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        if image.get("bytes") is not None:
            return _decode_bytes(bytes(image["bytes"]), name)
        if image.get("path"):
            return _open_image_file(Path(image["path"]), name)
        raise CopaValueError(f"{name}: an image dict with neither bytes nor a path.")
    if isinstance(image, list | tuple):
        raise CopaTypeError(
            f"{name} is a {type(image).__name__}; nested lists are not accepted, pass a flat list."
        )
    raise CopaTypeError(
        f"{name} is a {type(image).__name__}, which is not an image. Accepted: {ACCEPTED_INPUTS}."
    )


def _decode_bytes(data: bytes, name: str) -> PIL.Image.Image:
    import io

    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return _pil_to_rgb(opened, name)
    except PIL.UnidentifiedImageError as err:
        raise CopaValueError(f"{name}: the {len(data)} bytes are not an image file PIL can read.") from err
    except OSError as err:
        raise CopaValueError(f"{name}: could not decode the image bytes: {err}") from err


def _open_image_file(path: Path, name: str) -> PIL.Image.Image:
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "does not exist"
        raise CopaValueError(f"{name}: the path {str(path)!r} {reason}; pass the path of an image file.")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return _pil_to_rgb(opened, name)
    except PIL.UnidentifiedImageError as err:
        raise CopaValueError(f"{name}: {str(path)!r} is not an image file PIL can read.") from err
    except OSError as err:  # truncated or corrupt data
        raise CopaValueError(f"{name}: could not read the image file {str(path)!r}: {err}") from err


def _pil_to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    if image.width == 0 or image.height == 0:
        raise CopaValueError(f"{name}: the PIL image is empty ({image.width}x{image.height}).")
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _array_to_rgb(np.asarray(image), name, channels_first=False)
    if _has_transparency(image):
        if image.mode == "La":  # premultiplied; Pillow converts it to RGBA only via LA
            image = image.convert("LA")
        return _array_to_rgb(np.asarray(image.convert("RGBA")), name, channels_first=False)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise CopaValueError(f"{name}: Pillow cannot convert mode {image.mode!r} to RGB ({err}).") from err


def _has_transparency(image: PIL.Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _array_to_rgb(array: np.ndarray, name: str, channels_first: bool) -> PIL.Image.Image:
    if array.size == 0:
        raise CopaValueError(f"{name}: the array has shape {array.shape}, with no pixels.")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = _to_channels_last(array, name, channels_first)
    else:
        raise CopaValueError(
            f"{name}: an array of shape {tuple(array.shape)} is not one image; expected HW, HWC or CHW "
            f"with 1, 3 or 4 channels (a batch goes in as a list, or as one NHWC / NCHW array)."
        )
    values = _to_0_255(array, name)
    if values.shape[-1] == 4:
        alpha = values[..., 3:] / 255.0
        values = values[..., :3] * alpha + 255.0 * (1.0 - alpha)  # composite on white
    elif values.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    return PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _to_channels_last(array: np.ndarray, name: str, channels_first: bool) -> np.ndarray:
    first_fits = array.shape[0] in _CHANNEL_COUNTS
    last_fits = array.shape[-1] in _CHANNEL_COUNTS
    if first_fits and (channels_first or not last_fits):
        return np.moveaxis(array, 0, -1)
    if last_fits:
        return array
    raise CopaValueError(
        f"{name}: an array of shape {tuple(array.shape)} has no channel axis of size 1, 3 or 4 "
        "first (CHW) or last (HWC)."
    )


def _to_0_255(array: np.ndarray, name: str) -> np.ndarray:
    """Pixel values as float64 on the 0..255 scale, by the module's dtype rules."""
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.float64) * 255.0
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if kind in "ui":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise CopaValueError(
                f"{name}: integer pixel values span [{low}, {high}], outside 0..255 and 0..65535; "
                "convert to uint8 or to floats in [0, 1]."
            )
        values = array.astype(np.float64)
        sixteen_bit = array.dtype == np.uint16 or high > 255
        return values * (255.0 / 65535.0) if sixteen_bit else values
    if kind == "f":
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise CopaValueError(f"{name}: the float array holds NaN or infinite values.")
        low, high = float(values.min()), float(values.max())
        if low < -_FLOAT_TOLERANCE or high > 1.0 + _FLOAT_TOLERANCE:
            raise CopaValueError(
                f"{name}: float pixel values must lie in [0, 1], got [{low:g}, {high:g}]; "
                "divide 0..255 data by 255, or pass uint8."
            )
        return np.clip(values, 0.0, 1.0) * 255.0
    raise CopaTypeError(
        f"{name}: arrays of dtype {array.dtype} are not images; use uint8, uint16, bool or float."
    )


def _register_with_auto_image_processor() -> None:
    from transformers import AutoImageProcessor

    from .configuration_copa import CopaConfig

    AutoImageProcessor.register(
        CopaConfig, image_processor_classes={"pil": CopaImageProcessor}, exist_ok=True
    )


_register_with_auto_image_processor()  # so that AutoImageProcessor and pipeline find it (see hf_copa)


def meta_dataset_processor(model: Any) -> CopaImageProcessor:
    """The processor of `model` (a backbone, or a backbone set: its first member's contract) set to
    Meta-Dataset's decoder, as the benchmark embeds the official episodes."""
    backbone = model.members[0] if hasattr(model, "feature_members") else model
    return backbone.image_processor_class.from_copa_config(backbone.config, decoder="meta-dataset")


__all__ = [
    "ACCEPTED_INPUTS",
    "DECODERS",
    "CopaImageProcessor",
    "split_images",
    "to_rgb_image",
    "to_rgb_images",
]
