"""Running a backbone frozen: BatchNorm on its running statistics, the pretrained weights untouched.

Feature extraction, the adaptation of TSA learners and evaluation all run the backbone through this one
context manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def frozen_backbone(model: nn.Module, device: str | torch.device | None = None) -> Iterator[nn.Module]:
    """Run `model` in eval mode (BatchNorm uses its running statistics), on `device` if given.

    What it guarantees: a model already in eval mode and on `device` (the state `load_model` and
    `from_pretrained(...).eval()` leave it in) is not modified at all, so several tasks may share one
    backbone at once, from several threads. Only a model in training mode (e.g. during `hf-copa train`'s
    validation) or on another device is switched for the duration and restored afterwards; such a model
    must not be used by anyone else meanwhile. Gradients are not switched off here: learners that
    backpropagate into adapters ask autograd for the adapters' gradients only (`backward(inputs=...)`), so
    the pretrained weights neither get nor accumulate gradients, and their `requires_grad` flags are never
    touched.
    """
    was_training, original_device = model.training, model_device(model)
    target = original_device if device is None else torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    moved = target != original_device
    if was_training:
        model.eval()
    if moved:
        model.to(target)
    try:
        yield model
    finally:
        if moved:
            model.to(original_device)
        if was_training:
            model.train()
