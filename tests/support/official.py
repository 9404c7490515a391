"""Plain transcriptions of the official CoPA, TSA and CoPA+TSA loops: oracles for fidelity checks, and the
speed baseline of `scripts/benchmark_adaptation.py`.

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


def official_url(
    support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, lr: float, steps: int = 40
) -> torch.Tensor:
    """URL's `pa` on features: one d x d map (identity init), Adadelta on the support set's cosine-NCC loss
    against its own class means; returns the query logits [Q, C]. Runs in the features' dtype."""
    theta = torch.eye(support.shape[1], dtype=support.dtype, requires_grad=True)
    optimizer = torch.optim.Adadelta([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        transformed = support @ theta.T
        F.cross_entropy(cosine_logits(transformed, class_means(transformed, labels)), labels).backward()
        optimizer.step()
    with torch.no_grad():
        return cosine_logits(query @ theta.T, class_means(support @ theta.T, labels))


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


def official_copa(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    lr: float,
    weight_decay: float,
    tau: float = 2.0,
    steps: int = 50,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """CoPA's `pa_adaptation` (linear heads) on features, shaped like the official code: 1x1-convolution
    heads, the N x N loss by autograd, two Adam groups, and the query set scored (loss and accuracy read back
    with `.item()`) before every step and after the last. Returns (query logits [Q, C], history)."""
    dim = support.shape[1]
    theta_image = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    theta_proto = torch.eye(dim, dtype=support.dtype)[:, :, None, None].requires_grad_(True)
    optimizer = torch.optim.Adam(
        [{"params": [theta_image]}, {"params": [theta_proto]}], lr=lr, weight_decay=weight_decay
    )
    prototypes = class_means(support, support_labels)
    history: dict[str, list[float]] = {"train_losses": [], "train_accs": [], "val_losses": [], "val_accs": []}

    def record(
        kind: str, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        projected = head(prototypes, theta_proto)
        loss = symmetric_ce(embeddings, projected, labels, tau)
        logits = cosine_logits(embeddings, projected)
        history[f"{kind}_losses"].append(loss.item())
        history[f"{kind}_accs"].append((logits.argmax(1) == labels).float().mean().item())
        return loss, logits

    def score_query() -> torch.Tensor:
        with torch.no_grad():
            return record("val", head(query, theta_image), query_labels)[1]

    for _ in range(steps):
        score_query()
        optimizer.zero_grad()
        loss, _ = record("train", head(support, theta_image), support_labels)
        loss.backward()
        optimizer.step()
    return score_query(), history
