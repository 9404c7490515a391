"""Task-specific residual adapters (TSA, Li, Liu & Bilen, CVPR 2022) for a frozen `CopaModel`.

An adapter belongs to one 3x3 convolution of a residual block and turns it into
`conv(x) + conv2d(x, alpha, stride=conv.stride)`, with `alpha` an [out, in, 1, 1]
matrix reset to 1e-4 * I for every task. Adapters are plain tensors keyed by the
convolution's parameter-style name (`"layer2.0.conv1"`) and passed to the
backbone's forward (`CopaModel(pixel_values, adapters=...)`): the pretrained
weights are never copied or modified, nothing is attached to the shared model,
and two tasks can use one backbone at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Residual adapters start as this multiple of the identity (URL's `eye` init for residual adapters).
ADAPTER_INIT_SCALE = 1e-4


def adapted_conv(conv: nn.Conv2d, hidden: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """`conv(hidden)`, plus the residual adapter `conv2d(hidden, alpha, stride)` when one is given."""
    out = conv(hidden)
    if alpha is None:
        return out
    return out + F.conv2d(hidden, alpha, stride=conv.stride)


def adapter_shapes(model: nn.Module, stages: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> alpha shape [out, in, 1, 1] of every adaptable (3x3 block) convolution in `stages`.

    Stages are numbered from 1 like their modules (`layer1`...); None means all of them.
    """
    names = list(model.stage_names)
    wanted = range(1, len(names) + 1) if stages is None else stages
    for stage in wanted:
        if not 1 <= stage <= len(names):
            raise ValueError(
                f"This backbone has stages 1..{len(names)}; adapters cannot go in stage {stage}."
            )
    shapes = {}
    for stage in sorted(set(wanted)):
        for index, block in enumerate(getattr(model, names[stage - 1])):
            for conv_name in ("conv1", "conv2"):
                weight = getattr(block, conv_name).weight
                shapes[f"{names[stage - 1]}.{index}.{conv_name}"] = (weight.shape[0], weight.shape[1], 1, 1)
    return shapes


def identity_adapters(model: nn.Module, stages: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Fresh trainable adapters, each 1e-4 * I, for the 3x3 convolutions of `stages` (None: all)."""
    reference = next(model.parameters())
    adapters = {}
    for name, (out_channels, in_channels, _, _) in adapter_shapes(model, stages).items():
        eye = torch.eye(out_channels, in_channels, dtype=reference.dtype, device=reference.device)
        adapters[name] = (ADAPTER_INIT_SCALE * eye)[:, :, None, None].requires_grad_(True)
    return adapters


def check_adapters(model: nn.Module, adapters: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError unless every adapter names a 3x3 block convolution of `model` with its shape."""
    shapes = adapter_shapes(model)
    for name, alpha in adapters.items():
        if name not in shapes:
            raise ValueError(
                f"Adapter {name!r} matches no 3x3 block convolution of this backbone (it has "
                f"{', '.join(list(shapes)[:3])}, ...); the adapters were made for another backbone."
            )
        if tuple(alpha.shape) != shapes[name]:
            raise ValueError(
                f"Adapter {name!r} has shape {tuple(alpha.shape)} but this backbone needs {shapes[name]}; "
                "the adapters were made for another backbone."
            )


def first_adapted_stage(model: nn.Module, adapters: Mapping[str, torch.Tensor]) -> int:
    """0-based index of the first stage with an adapter (len(stages) when there is none)."""
    names = list(model.stage_names)
    stages = [names.index(name.split(".", 1)[0]) for name in adapters]
    return min(stages, default=len(names))


def adapted_features(
    backbone: nn.Module, pixel_values: torch.Tensor, adapters: Mapping[str, torch.Tensor]
) -> Callable[[], torch.Tensor]:
    """A function giving the support features [1, N, d] through the backbone with `adapters`.

    The stages before the first adapter do not change during adaptation, so they run once, here.
    """
    start = first_adapted_stage(backbone, adapters)
    with torch.no_grad():
        frozen = backbone.run_stages(backbone.embed_stem(pixel_values), stop=start)

    def features() -> torch.Tensor:
        return backbone.pool(backbone.run_stages(frozen, adapters, start=start)).unsqueeze(0)

    return features
