"""URL's TSA (Li, Liu & Bilen, CVPR 2022; URL's `models/tsa.py::tsa`, `alpha+beta`, residual matrix adapters).

Residual adapters (alpha, 1e-4 * I) on every 3x3 convolution of all four
stages, plus a d x d pre-classifier head beta (identity), trained with Adadelta
(alpha at lr, beta at lr_beta) on the support set's cosine-NCC loss, its
features recomputed through the adapted backbone at every step. Queries are
scored by cosine NCC of beta(features) against the class means of
beta(support features) from the adapted backbone.
"""

from __future__ import annotations

import torch

from ..adapters import adapted_features, identity_adapters
from ..heads import AdaptedHead
from ..losses import class_means, cosine_scores, ncc_loss, one_hot_labels
from .base import RESIDUAL_ADAPTERS, BackboneLearner
from .optimization import identity_matrices, run_steps
from .registry import register_learner


@register_learner("tsa")
class TSALearner(BackboneLearner):
    description = "also adapts the backbone, with residual adapters in every stage, plus one map (slower)"
    # models/tsa.py: 40 Adadelta steps, lr for the adapters (alpha), lr_beta for the head (beta).
    linear_maps = "shared"
    requires = frozenset({RESIDUAL_ADAPTERS})  # URL's ResNet-18 has them; EfficientNet-Lite has none
    default_hyperparameters = {"steps": 40, "lr": 0.5, "lr_beta": 1.0, "scale": 10.0}
    presets = {
        "seen": {"lr": 0.05, "lr_beta": 0.1},
        "unseen": {"lr": 0.5, "lr_beta": 1.0},  # the default
    }
    adapter_stages: tuple[int, ...] | None = None  # every stage

    def fit_backbone(
        self, backbone, pixel_values: torch.Tensor, labels: torch.Tensor
    ) -> tuple[AdaptedHead, torch.Tensor]:
        hp = self.hyperparameters
        one_hot = one_hot_labels(labels.unsqueeze(0), int(labels.max()) + 1, pixel_values.dtype)
        adapters = identity_adapters(backbone, self.adapter_stages)
        beta = identity_matrices(1, backbone.config.feature_dim, pixel_values)
        optimizer = torch.optim.Adadelta(
            [{"params": list(adapters.values())}, {"params": [beta], "lr": hp["lr_beta"]}], lr=hp["lr"]
        )
        features_of = adapted_features(backbone, pixel_values, adapters)

        def loss_fn() -> torch.Tensor:
            z = features_of() @ beta.mT
            return ncc_loss(cosine_scores(z, class_means(z, one_hot), hp["scale"]), one_hot)

        losses = run_steps(optimizer, loss_fn, hp["steps"], batch_size=1)
        with torch.no_grad():
            features = features_of()
            prototypes = class_means(features, one_hot)[0]
        head = AdaptedHead(
            prototypes, beta[0], beta[0], hp["scale"], self.name, hp, losses[:, 0].tolist(), adapters
        )
        return head, features[0]
