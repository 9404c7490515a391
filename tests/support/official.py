"""Plain transcriptions of the official TSA and CoPA+TSA loops, as independent oracles for fidelity checks.

They follow the official code's structure rather than hf_copa's (see ../shared/reference/README.md):
adapters are modules that replace the convolutions of a deep copy of the backbone, the heads are 1x1
convolutions, prototypes are per-class means, CoPA's loss builds the full N x N logit matrix, and the
optimisers get the official parameter groups. They run in the backbone's dtype; tests run both these
and the learners in float64, where round-off cannot steer the trajectories apart.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

COSINE_EPS = 1e-30  # the official scoring uses F.cosine_similarity(..., eps=1e-30)


class ResidualAdapterConv(nn.Module):
    """A frozen convolution plus its residual adapter alpha (1x1, same stride), alpha = 1e-4 * I."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        out_channels, in_channels = conv.weight.shape[:2]
        eye = torch.eye(out_channels, in_channels, dtype=conv.weight.dtype, device=conv.weight.device)
        self.alpha = nn.Parameter(1e-4 * eye[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + F.conv2d(x, self.alpha, stride=self.conv.stride)


def with_adapters(backbone: nn.Module, stages: list[str]) -> nn.Module:
    """A frozen eval-mode deep copy of `backbone` whose 3x3 block convolutions in `stages` carry adapters."""
    model = copy.deepcopy(backbone).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for stage in stages:
        for block in getattr(model, stage):
            for name in ("conv1", "conv2"):
                setattr(block, name, ResidualAdapterConv(getattr(block, name)))
    return model


def feature_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The official `embed(x, is_pooling=False)`: stem, then the four stages."""
    x = model.relu(model.bn1(model.conv1(images)))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, stage)(x)
    return x


def class_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class means, class by class (URL's `compute_prototypes`)."""
    return torch.stack([features[labels == c].mean(0) for c in range(int(labels.max()) + 1)])


def cosine_logits(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return 10 * F.cosine_similarity(queries.unsqueeze(1), prototypes.unsqueeze(0), dim=-1, eps=COSINE_EPS)


def head(features: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A d x d head as the official 1x1 convolution of [N, d] features."""
    return F.conv2d(features[:, :, None, None], kernel).flatten(1)


def official_tsa(
    backbone: nn.Module,
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    lr: float,
    lr_beta: float,
    steps: int = 40,
) -> torch.Tensor:
    """URL's `tsa` (alpha+beta, residual, matrix, eye init): returns the query logits [Q, C]."""
    model = with_adapters(backbone, ["layer1", "layer2", "layer3", "layer4"])
    dim = model.layer4[-1].bn2.num_features
    beta = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    alphas = [p for name, p in model.named_parameters() if "alpha" in name]
    optimizer = torch.optim.Adadelta([{"params": alphas}, {"params": [beta], "lr": lr_beta}], lr=lr)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return head(F.adaptive_avg_pool2d(feature_maps(model, images), 1).flatten(1), beta)

    for _ in range(steps):
        optimizer.zero_grad()
        aligned = embed(support)
        F.cross_entropy(cosine_logits(aligned, class_means(aligned, labels)), labels).backward()
        optimizer.step()
    with torch.no_grad():
        return cosine_logits(embed(query), class_means(embed(support), labels))


def symmetric_ce(embeddings: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, tau: float):
    """CoPA's `symmetric_CE` on the N x N matrix whose column j is the prototype of sample j's class."""
    embeddings = embeddings / embeddings.norm(dim=1, keepdim=True)
    prototypes = prototypes / prototypes.norm(dim=1, keepdim=True)
    expanded = F.one_hot(labels).to(prototypes.dtype) @ prototypes
    logits = torch.exp(torch.tensor(tau, dtype=embeddings.dtype)) * embeddings @ expanded.t()
    targets = torch.arange(len(labels))
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def official_copa_tsa(
    backbone: nn.Module,
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    lr: float,
    adapter_lr_scale: float,
    weight_decay: float,
    tau: float = 2.0,
    steps: int = 40,
) -> tuple[np.ndarray, torch.Tensor]:
    """CoPA's `tsa_adaptation` (adapters in stages 2 and 3, linear heads): (losses [steps], query logits)."""
    model = with_adapters(backbone, ["layer2", "layer3"])
    dim = model.layer4[-1].bn2.num_features
    theta_image = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    theta_proto = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    alphas = [p for name, p in model.named_parameters() if "alpha" in name]
    optimizer = torch.optim.Adam(
        [
            {"params": alphas, "lr": lr * adapter_lr_scale},
            {"params": [theta_image]},
            {"params": [theta_proto]},
        ],
        lr=lr,
        weight_decay=weight_decay,
    )

    def features_and_prototypes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = feature_maps(model, images)
        prototype_maps = class_means(maps, labels)  # means of the maps, pooled afterwards
        return F.adaptive_avg_pool2d(maps, 1).flatten(1), F.adaptive_avg_pool2d(prototype_maps, 1).flatten(1)

    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        features, prototypes = features_and_prototypes(support)
        loss = symmetric_ce(head(features, theta_image), head(prototypes, theta_proto), labels, tau)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, prototypes = features_and_prototypes(support)
        queries = F.adaptive_avg_pool2d(feature_maps(model, query), 1).flatten(1)
        return np.array(losses), cosine_logits(head(queries, theta_image), head(prototypes, theta_proto))
