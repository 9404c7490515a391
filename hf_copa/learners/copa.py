"""CoPA (Tian et al., NeurIPS 2024; `models/adaptation.py::pa_adaptation`, linear heads).

Two d x d heads, Theta_I for image features and Theta_P for class prototypes,
initialised to the identity and trained with Adam on the symmetric contrastive
loss between each support image and its class prototype. Prototypes are the
class means of the frozen support features, computed once.
"""

from __future__ import annotations

import torch

from ..heads import AdaptedHead
from ..losses import class_means, one_hot_labels, symmetric_contrastive_loss_and_grads
from .base import Learner, split_heads
from .optimization import fused_if_supported, identity_head, run_steps_with_grads
from .registry import register_learner


@register_learner("copa")
class CopaLearner(Learner):
    description = "learns Θ_I for images and Θ_P for prototypes (symmetric contrastive loss)"
    # models/adaptation.py::pa_adaptation: 50 Adam steps, coupled L2 weight decay, tau = 2.
    default_hyperparameters = {"steps": 50, "lr": 1e-3, "weight_decay": 0.1, "tau": 2.0, "scale": 10.0}
    linear_maps = "separate"
    # The official code picks these by dataset name; here they are named settings.
    presets = {
        "default": {},
        "high-lr": {"lr": 5e-3, "weight_decay": 0.0},  # the paper's MNIST / Traffic Sign setting
    }

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[AdaptedHead]:
        hp = self.hyperparameters
        one_hot = one_hot_labels(labels, num_classes, features.dtype)
        prototypes = class_means(features, one_hot)
        # Both heads in one [2, B, d, d] tensor: the official code's two Adam groups share lr and weight
        # decay, and Adam is elementwise, so one group gives identical updates with half the overhead.
        theta = identity_head(features, stacked=2)
        theta_image, theta_proto = theta[0], theta[1]
        optimizer = torch.optim.Adam(
            [theta], lr=hp["lr"], weight_decay=hp["weight_decay"], fused=fused_if_supported(features)
        )

        grad = torch.empty_like(theta)

        def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
            loss, _, _ = symmetric_contrastive_loss_and_grads(
                features, prototypes, theta_image, theta_proto, one_hot, hp["tau"], out=(grad[0], grad[1])
            )
            return loss, [grad]

        losses = run_steps_with_grads(
            optimizer,
            loss_and_grads,
            hp["steps"],
            batch_size=len(features),
            after_step=self.observed(theta_image, theta_proto),
        )
        return split_heads(self, prototypes, labels, theta_image, theta_proto, losses)
