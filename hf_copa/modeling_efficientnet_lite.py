"""EfficientNet-Lite as a few-shot backbone: ImageNet features [N, 1280] by global average pooling.

The network of TensorFlow's `efficientnet/lite` models (`tensorflow/tpu`
`models/official/efficientnet/efficientnet_model.py` with `lite/efficientnet_lite_builder.py`), as
`efficientnet-lite-pytorch` (`efficientnet_lite_pytorch/model.py`, after lukemelas' EfficientNet-PyTorch)
builds it: a 3x3 stride-2 stem, MBConv blocks (1x1 expansion, depthwise kxk, 1x1 projection, an identity
shortcut where stride is 1 and the width is unchanged), no squeeze-excitation, ReLU6, and a 1x1 head
convolution to 1280 channels. Features are the head's map averaged over space, before the ImageNet
classifier (`_fc`), which a backbone does not keep. Where `efficientnet-lite-pytorch` pads for a fixed
image size given at construction (its `Conv2dStaticSamePadding`), this network pads as TensorFlow's "same"
does for the size it is given, so one model serves every input size; the two agree wherever the reference
is built for the size it runs at (`tests/test_efficientnet_lite.py`).

Parameter names say what each layer is (`stem_conv`, `blocks.3.depthwise_conv`, `head_bn`);
`hf_copa.conversion.convert_efficientnet_lite_checkpoint` maps the reference layout onto them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_efficientnet_lite import EfficientNetLiteConfig
from .image_processing_efficientnet_lite import EfficientNetLiteImageProcessor
from .learners.base import FEATURES, MAPS
from .modeling_backbone import FewShotBackbone, init_convolutions_and_batch_norm
from .modeling_copa import CopaForFewShotClassification

__all__ = [
    "EfficientNetLiteForFewShotClassification",
    "EfficientNetLiteModel",
    "EfficientNetLitePreTrainedModel",
]


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "same": output size ceil(input / stride), the odd pixel of
    padding on the bottom and right (`Conv2dDynamicSamePadding` in the reference)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ):
        # At stride 1 an odd kernel pads (k - 1) / 2 on every side: nn.Conv2d's own padding does it.
        padding = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=False
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            hidden = F.pad(hidden, _same_padding(hidden.shape[-2:], self.kernel_size[0], self.stride[0]))
        return super().forward(hidden)


def _same_padding(size: torch.Size, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding for TensorFlow's "same" on an input of `size` (height, width)."""
    pads = []
    for length in (size[1], size[0]):
        total = max((math.ceil(length / stride) - 1) * stride + kernel - length, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: expand (1x1), depthwise (kxk), project (1x1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        eps: float,
        momentum: float,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand_conv = SameConv2d(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.expand_bn = nn.BatchNorm2d(hidden, eps=eps, momentum=momentum) if expand_ratio != 1 else None
        self.depthwise_conv = SameConv2d(hidden, hidden, kernel_size, stride, groups=hidden)
        self.depthwise_bn = nn.BatchNorm2d(hidden, eps=eps, momentum=momentum)
        self.project_conv = SameConv2d(hidden, out_channels, 1)
        self.project_bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.activation = nn.ReLU6()
        self.has_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = inputs
        if self.expand_conv is not None:
            hidden = self.activation(self.expand_bn(self.expand_conv(hidden)))
        hidden = self.activation(self.depthwise_bn(self.depthwise_conv(hidden)))
        hidden = self.project_bn(self.project_conv(hidden))
        return hidden + inputs if self.has_shortcut else hidden


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MBConvBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_convolutions_and_batch_norm(module)


class EfficientNetLiteModel(FewShotBackbone, EfficientNetLitePreTrainedModel):
    """Frozen ImageNet feature extractor: images -> 1280-d features, and `adapt` to a few-shot task.

    Loading, feature extraction and `adapt` are every backbone's (`hf_copa.modeling_backbone`). It offers
    pooled features and the head's feature maps, but no residual-adapter points: TSA and CoPA+TSA refuse it.
    """

    offers = frozenset({FEATURES, MAPS})
    image_processor_class = EfficientNetLiteImageProcessor
    family_name = "EfficientNet-Lite"

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        eps, momentum = config.batch_norm_eps, config.batch_norm_momentum
        self.stem_conv = SameConv2d(config.num_channels, config.stem_size, 3, stride=2)
        self.stem_bn = nn.BatchNorm2d(config.stem_size, eps=eps, momentum=momentum)
        blocks, in_channels = [], config.stem_size
        stages = zip(
            config.depths,
            config.kernel_sizes,
            config.strides,
            config.expand_ratios,
            config.hidden_sizes,
            strict=True,
        )
        for depth, kernel, stride, expand, width in stages:
            for index in range(depth):
                blocks.append(
                    MBConvBlock(
                        in_channels, width, kernel, stride if index == 0 else 1, expand, eps, momentum
                    )
                )
                in_channels = width
        self.blocks = nn.ModuleList(blocks)
        self.head_conv = SameConv2d(in_channels, config.head_size, 1)
        self.head_bn = nn.BatchNorm2d(config.head_size, eps=eps, momentum=momentum)
        self.activation = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def feature_map(
        self, pixel_values: torch.Tensor, adapters: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The head's map [N, 1280, h, w] (h = w = ceil(image_size / 32))."""
        hidden = self.activation(self.stem_bn(self.stem_conv(pixel_values)))
        for block in self.blocks:
            hidden = block(hidden)
        return self.activation(self.head_bn(self.head_conv(hidden)))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.avgpool(hidden).flatten(1)

    def classifier_class(self) -> type[EfficientNetLiteForFewShotClassification]:
        return EfficientNetLiteForFewShotClassification


class EfficientNetLiteForFewShotClassification(CopaForFewShotClassification):
    """`CopaForFewShotClassification` on an EfficientNet-Lite backbone: the class transformers' Auto classes
    and `pipeline` build for a head whose config is an `EfficientNetLiteConfig`."""

    config_class = EfficientNetLiteConfig
    _no_split_modules = ["MBConvBlock"]


def _register_with_auto_models() -> None:
    from transformers import AutoModel, AutoModelForImageClassification

    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
    AutoModelForImageClassification.register(
        EfficientNetLiteConfig, EfficientNetLiteForFewShotClassification, exist_ok=True
    )


_register_with_auto_models()  # so that the Auto model classes and pipeline find it (see hf_copa)
