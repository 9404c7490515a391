"""URL's pre-classifier alignment (Li, Liu & Bilen, ICCV 2021; `models/pa.py::pa`).

One d x d head, initialised to the identity, trained with Adadelta on the
support set's cosine-NCC loss (the support set scored against the class means
of its own transformed features).
"""

from __future__ import annotations

import torch

from ..heads import AdaptedHead
from ..losses import class_means, cosine_scores, ncc_loss, one_hot_labels
from .base import Learner, split_heads
from .optimization import identity_head, run_steps
from .registry import register_learner


@register_learner("url")
class URLLearner(Learner):
    description = "learns one map for both (nearest-centroid loss)"
    # models/pa.py: 40 Adadelta steps, cosine NCC scaled by 10.
    default_hyperparameters = {"steps": 40, "lr": 1.0, "scale": 10.0}
    linear_maps = "shared"
    presets = {
        "seen": {"lr": 0.1},  # domains the backbone was trained on
        "unseen": {"lr": 1.0},  # new domains (the default)
    }

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[AdaptedHead]:
        hp = self.hyperparameters
        one_hot = one_hot_labels(labels, num_classes, features.dtype)
        theta = identity_head(features)
        optimizer = torch.optim.Adadelta([theta], lr=hp["lr"])

        def loss_fn() -> torch.Tensor:
            z = features @ theta.mT
            return ncc_loss(cosine_scores(z, class_means(z, one_hot), hp["scale"]), one_hot)

        losses = run_steps(
            optimizer, loss_fn, hp["steps"], batch_size=len(features), after_step=self.observed(theta, theta)
        )
        prototypes = class_means(features, one_hot)
        return split_heads(self, prototypes, labels, theta, theta, losses)
