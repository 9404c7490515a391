"""`EfficientNetLiteConfig`: the shape of an EfficientNet-Lite backbone (Tan & Le; TensorFlow's Lite models).

EfficientNet-Lite is EfficientNet-B0's network without squeeze-excitation, with ReLU6 and with a stem and
head that are not scaled. The variants are named by their width and depth coefficients
(`tensorflow/tpu` `models/official/efficientnet/lite/efficientnet_lite_builder.py`,
`efficientnet_lite_params`): lite0 (1.0, 1.0, 224 px), lite1 (1.0, 1.1, 240), lite2 (1.1, 1.2, 260), lite3
(1.2, 1.4, 280), lite4 (1.4, 1.8, 300). The config stores the resulting stages explicitly, so a converted
checkpoint's shapes are checked against it and nothing is recomputed on load;
`EfficientNetLiteConfig.from_variant` builds them.
"""

from __future__ import annotations

import math
from typing import Any

from .configuration_backbone import BackboneConfig
from .validation import CopaValueError, check_int

# EfficientNet-B0's seven stages (`efficientnet_builder.py`'s `_DEFAULT_BLOCKS_ARGS`, SE dropped for Lite):
# repeats, kernel size, stride, expansion ratio, output channels.
BASE_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# Variant -> (width coefficient, depth coefficient, the resolution it was trained at).
VARIANTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}
# The input side for few-shot tasks (the embedded default's, and `hf-copa convert`'s unless told): chosen by
# measurement, accuracy against time per episode on a CPU at 84, 128, 160 and 224 px (README, "The default
# model"); the variants were trained at their own, larger sizes (VARIANTS).
DEFAULT_IMAGE_SIZE = 128
STEM_SIZE = 32
HEAD_SIZE = 1280
DEPTH_DIVISOR = 8


def round_filters(filters: int, width_coefficient: float, divisor: int = DEPTH_DIVISOR) -> int:
    """Channels scaled by the width coefficient, rounded to a multiple of `divisor` (never down by >10%):
    `efficientnet_model.py::round_filters`."""
    scaled = filters * width_coefficient
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    """Blocks scaled by the depth coefficient, rounded up: `efficientnet_model.py::round_repeats`."""
    return int(math.ceil(depth_coefficient * repeats))


class EfficientNetLiteConfig(BackboneConfig):
    """Configuration of an EfficientNet-Lite backbone: features [N, head_size] by global average pooling.

    Args:
        stem_size: Output channels of the 3x3 stride-2 stem convolution (Lite: 32 for every variant).
        depths: MBConv blocks per stage.
        kernel_sizes: Depthwise kernel size per stage.
        strides: Stride of each stage's first block.
        expand_ratios: Expansion ratio of each stage's blocks (1: no expansion convolution).
        hidden_sizes: Output channels per stage.
        head_size: Output channels of the final 1x1 convolution, the feature dimension (Lite: 1280).
        batch_norm_eps, batch_norm_momentum: BatchNorm settings (TensorFlow's 1e-3 and decay 0.99, that is
            PyTorch momentum 0.01).
        variant: The variant the stages were built from (`lite0`...), for cards and messages; None for
            a custom shape.
        num_channels, image_size, adaptation, domain_classifier_sizes, domain_classifier_domains,
            training_domains, copa_head: as every backbone's (`hf_copa.configuration_backbone`).

    The input normalisation, Lite's `(x - 127) / 128`, is the image processor's
    (`EfficientNetLiteImageProcessor`). Convolutions pad as TensorFlow's "same" does (more on the bottom and
    right when the total is odd), for any input size. There is no dropout or drop-connect: the backbone is
    only ever run frozen.
    """

    model_type = "efficientnet_lite"

    def __init__(
        self,
        num_channels: int = 3,
        stem_size: int = STEM_SIZE,
        depths: list[int] | tuple[int, ...] = tuple(stage[0] for stage in BASE_STAGES),
        kernel_sizes: list[int] | tuple[int, ...] = tuple(stage[1] for stage in BASE_STAGES),
        strides: list[int] | tuple[int, ...] = tuple(stage[2] for stage in BASE_STAGES),
        expand_ratios: list[int] | tuple[int, ...] = tuple(stage[3] for stage in BASE_STAGES),
        hidden_sizes: list[int] | tuple[int, ...] = tuple(stage[4] for stage in BASE_STAGES),
        head_size: int = HEAD_SIZE,
        image_size: int = DEFAULT_IMAGE_SIZE,
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.01,
        variant: str | None = "lite0",
        adaptation: dict[str, dict[str, Any]] | None = None,
        domain_classifier_sizes: list[int] | None = None,
        domain_classifier_domains: list[str] | None = None,
        training_domains: list[str] | None = None,
        copa_head: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.stem_size = stem_size
        self.depths = list(depths)
        self.kernel_sizes = list(kernel_sizes)
        self.strides = list(strides)
        self.expand_ratios = list(expand_ratios)
        self.hidden_sizes = list(hidden_sizes)
        self.head_size = head_size
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.variant = variant
        super().__init__(
            num_channels=num_channels,
            image_size=image_size,
            adaptation=adaptation,
            domain_classifier_sizes=domain_classifier_sizes,
            domain_classifier_domains=domain_classifier_domains,
            training_domains=training_domains,
            copa_head=copa_head,
            **kwargs,
        )

    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> EfficientNetLiteConfig:
        """The stages of a named variant (`lite0`..`lite4`): widths by `round_filters`, depths by
        `round_repeats` except the first and last stage, which Lite keeps (`fix_head_stem`)."""
        if variant not in VARIANTS:
            raise CopaValueError(
                f"Unknown EfficientNet-Lite variant {variant!r}; choose one of {list(VARIANTS)}."
            )
        width, depth, _ = VARIANTS[variant]
        last = len(BASE_STAGES) - 1
        stages = {
            "depths": [
                repeats if index in (0, last) else round_repeats(repeats, depth)
                for index, (repeats, *_) in enumerate(BASE_STAGES)
            ],
            "kernel_sizes": [stage[1] for stage in BASE_STAGES],
            "strides": [stage[2] for stage in BASE_STAGES],
            "expand_ratios": [stage[3] for stage in BASE_STAGES],
            "hidden_sizes": [round_filters(stage[4], width) for stage in BASE_STAGES],
        }
        return cls(**{**stages, "variant": variant, **kwargs})

    @property
    def feature_dim(self) -> int:
        return self.head_size

    def validate_copa(self) -> None:
        """Raise a `ValueError` naming the first invalid field."""
        for name in ("stem_size", "head_size"):
            check_int(f"EfficientNetLiteConfig.{name}", getattr(self, name), 1)
        fields = ("depths", "kernel_sizes", "strides", "expand_ratios", "hidden_sizes")
        for name in fields:
            values = getattr(self, name)
            if len(values) != len(self.depths) or not values:
                raise CopaValueError(
                    f"EfficientNetLiteConfig.{name} must hold one positive integer per stage "
                    f"({len(self.depths)} stages), got {values!r}."
                )
            for value in values:
                check_int(f"EfficientNetLiteConfig.{name} (each)", value, 1)
        for kernel in self.kernel_sizes:
            if kernel % 2 == 0:
                raise CopaValueError(
                    f"EfficientNetLiteConfig.kernel_sizes must be odd, got {self.kernel_sizes}."
                )
        if self.variant is not None and self.variant not in VARIANTS:
            raise CopaValueError(
                f"EfficientNetLiteConfig.variant must be one of {list(VARIANTS)} or None, got "
                f"{self.variant!r}."
            )
        if not (self.batch_norm_eps > 0):
            raise CopaValueError(
                f"EfficientNetLiteConfig.batch_norm_eps must be > 0, got {self.batch_norm_eps!r}."
            )
        super().validate_copa()


def _register_with_auto_config() -> None:
    from transformers import AutoConfig

    AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)


_register_with_auto_config()  # so that AutoConfig.from_pretrained reads model_type "efficientnet_lite"
