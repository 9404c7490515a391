"""The networks of multi-domain training and URL's distillation losses.

One shared `CopaModel` with one linear classifier per domain (URL's `cls_fn`) and, for each distilled
domain, a linear adapter into its single-domain teacher's feature space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_copa import CopaModel
from ..validation import CopaValueError
from .checkpoints import load_trained_classifiers
from .data import DomainData


class MultiDomainNetwork(nn.Module):
    """The shared backbone, one linear classifier per domain (URL's `cls_fn`) and, for each distilled
    domain, the linear adapter that maps student features into its teacher's feature space."""

    def __init__(
        self, backbone: CopaModel, num_classes: Sequence[int], adapter_dims: dict[str, int] | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifiers = nn.ModuleList(nn.Linear(backbone.feature_dim, n) for n in num_classes)
        self.adapters = nn.ModuleDict()
        for name, dim in (adapter_dims or {}).items():
            adapter = nn.Linear(backbone.feature_dim, dim, bias=False)
            with torch.no_grad():
                adapter.weight.copy_(torch.eye(dim, backbone.feature_dim))  # start as the identity
            self.adapters[name] = adapter

    def forward(self, pixels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One backbone pass over all domains' batches -> per-domain (features, logits)."""
        features = self.backbone(torch.cat(list(pixels))).pooler_output
        per_domain = features.split([len(p) for p in pixels])
        return list(per_domain), [head(f) for head, f in zip(self.classifiers, per_domain, strict=True)]


class Teacher(nn.Module):
    """A frozen single-domain backbone and its classifier: the targets of URL's distillation."""

    def __init__(self, backbone: CopaModel, classifier: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.classifier = classifier.eval().requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @torch.no_grad()
    def targets(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(pixels).pooler_output
        return features, self.classifier(features)


def cka_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - linear CKA between two batches of features (URL's feature alignment)."""
    student = student - student.mean(0, keepdim=True)
    teacher = teacher - teacher.mean(0, keepdim=True)
    cross = (student.T @ teacher).pow(2).sum()
    norms = (student.T @ student).pow(2).sum().sqrt() * (teacher.T @ teacher).pow(2).sum().sqrt()
    return 1 - cross / norms.clamp_min(1e-12)


def logit_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened class probabilities, scaled by T^2."""
    return (
        F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def load_teacher(path: str, domain: DomainData) -> Teacher:
    """A model folder written by `train` on `domain` alone; its classes must be the student's."""
    backbone = CopaModel.from_pretrained(path)
    heads, classes = load_trained_classifiers(path)
    if domain.name not in heads:
        raise CopaValueError(
            f"Teacher {path} has no classifier for domain {domain.name!r} (it has {sorted(heads)})."
        )
    if classes.get(domain.name) != domain.classes:
        raise CopaValueError(
            f"Teacher {path} was trained on other {domain.name!r} classes than this run holds out for "
            "training; train teachers with the same --seed, --val-fraction and --min-val-classes."
        )
    return Teacher(backbone, heads[domain.name])
