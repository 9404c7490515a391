"""NCC: no adaptation, query scored by cosine to the class means of the support features."""

from __future__ import annotations

import torch

from ..heads import AdaptedHead
from ..losses import class_means, one_hot_labels
from .base import Learner, split_heads
from .registry import register_learner


@register_learner("ncc")
class NCCLearner(Learner):
    description = "learns nothing (cosine to the class means)"
    default_hyperparameters = {"scale": 10.0}
    presets = {"default": {}}

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[AdaptedHead]:
        prototypes = class_means(features, one_hot_labels(labels, num_classes, features.dtype))
        return split_heads(self, prototypes, labels)
