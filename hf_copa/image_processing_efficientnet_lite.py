"""`EfficientNetLiteImageProcessor`: any image -> 8-bit RGB -> bicubic resize -> `(x - 127) / 128`.

EfficientNet-Lite was trained on ImageNet with the input scaled as `(x - MEAN_RGB) / STDDEV_RGB`, 127 and 128
for every channel (`tensorflow/tpu` `models/official/efficientnet/lite/efficientnet_lite_builder.py`), and
its evaluation resizes bicubically (`preprocessing.py`). Everything else (what is one image, how any input
becomes RGB, the `meta-dataset` decoder) is `CopaImageProcessor`'s; only the resize filter and the
normalisation differ.
"""

from __future__ import annotations

from transformers.image_utils import PILImageResampling

from .image_processing_copa import CopaImageProcessor

__all__ = ["EfficientNetLiteImageProcessor"]


class EfficientNetLiteImageProcessor(CopaImageProcessor):
    """EfficientNet-Lite's input contract: 8-bit RGB, bicubic resize to `size`, then `(x - 127) / 128`."""

    resample = PILImageResampling.BICUBIC
    size = {"height": 224, "width": 224}
    image_mean = (127 / 255, 127 / 255, 127 / 255)
    image_std = (128 / 255, 128 / 255, 128 / 255)


def _register_with_auto_image_processor() -> None:
    from transformers import AutoImageProcessor

    from .configuration_efficientnet_lite import EfficientNetLiteConfig

    AutoImageProcessor.register(
        EfficientNetLiteConfig, image_processor_classes={"pil": EfficientNetLiteImageProcessor}, exist_ok=True
    )


_register_with_auto_image_processor()  # so that AutoImageProcessor and pipeline find it (see hf_copa)
