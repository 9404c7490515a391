"""The inner loop every optimising learner shares, and the optimisers the official codes use."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def identity_head(features: torch.Tensor, stacked: int | None = None) -> torch.Tensor:
    """Trainable [B, d, d] identity matrices (or `stacked` of them: [stacked, B, d, d]) like `features`."""
    batch, _, dim = features.shape
    return identity_matrices(batch, dim, features, stacked)


def identity_matrices(batch: int, dim: int, like: torch.Tensor, stacked: int | None = None) -> torch.Tensor:
    """Trainable [batch, dim, dim] identities (or [stacked, batch, dim, dim]) of `like`'s dtype and device."""
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    shape = (batch, dim, dim) if stacked is None else (stacked, batch, dim, dim)
    return eye.expand(shape).clone().requires_grad_(True)


def fused_if_supported(tensor: torch.Tensor) -> bool | None:
    """Fused Adam is one pass over each head instead of several (4x faster on CPU)."""
    return True if tensor.device.type in ("cpu", "cuda") else None


def run_steps(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    batch_size: int,
    after_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Take `steps` optimiser steps on the summed per-episode losses; return losses [steps, B].

    Episodes are independent, so summing their losses gives each one exactly
    its own gradient. Each recorded loss is the one before its step. Gradients
    are computed for the optimised tensors only (`backward(inputs=...)`): a
    frozen backbone the loss runs through gets none, and its weights' flags are
    left alone (see `hf_copa.frozen`). `after_step(k)`, when given, is called
    before the first step (k = 0) and after each step k (a learner's
    `step_observer`, e.g. `hf_copa.analysis.GapTrace`).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history = []
    if after_step is not None:
        after_step(0)
    with torch.enable_grad():
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.sum().backward(inputs=params)
            optimizer.step()
            history.append(loss.detach())
            if after_step is not None:
                after_step(step + 1)
    if not history:
        return torch.empty(0, batch_size)
    return torch.stack(history)


def run_steps_with_grads(
    optimizer: torch.optim.Optimizer,
    loss_and_grads: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]],
    steps: int,
    batch_size: int,
    after_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """As `run_steps`, for losses whose gradients are computed by hand (no autograd graph)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history = []
    if after_step is not None:
        after_step(0)
    with torch.no_grad():
        for step in range(steps):
            loss, grads = loss_and_grads()
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            optimizer.step()
            history.append(loss)
            if after_step is not None:
                after_step(step + 1)
    if not history:
        return torch.empty(0, batch_size)
    return torch.stack(history)


class TensorFlowAdam(torch.optim.Optimizer):
    """`tf.compat.v1.train.AdamOptimizer`'s update (Meta-Dataset's within-episode optimiser).

    TensorFlow's Adam (`training_ops.ApplyAdam`) folds both bias corrections into the step size and adds
    epsilon to the square root of the *uncorrected* second moment:
    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t);  theta -= lr_t * m / (sqrt(v) + eps).
    `torch.optim.Adam` adds eps after correcting v instead, so the two differ wherever sqrt(v) is near eps.
    Defaults are TensorFlow's (beta1 0.9, beta2 0.999, eps 1e-8); no weight decay, as in Meta-Dataset.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        if closure is not None:
            raise ValueError("TensorFlowAdam takes no closure.")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(param)
                    state["v"] = torch.zeros_like(param)
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                param.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)


def within_episode_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Meta-Dataset's two within-episode optimisers: "adam" (TensorFlow's) or "gd" (plain gradient
    descent, `optimization_learners.gradient_descent_step`)."""
    if name == "adam":
        return TensorFlowAdam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)
