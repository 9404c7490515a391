"""SUR (Dvornik, Schmid & Mairal, ECCV 2020): weights over several backbones' features fitted on the support
set, then a cosine prototype classifier on the weighted, concatenated features.

The official code, reproduced step for step (dvornikita/SUR, `models/sur.py` `sur` and `apply_selection`,
`models/losses.py` `prototype_loss`, `test.py` l. 58-64):

- one selection parameter per backbone, lambda = 0 at the start, squashed by a sigmoid (`sur.py` l. 25-26);
- each backbone's features divided by their norm, multiplied by sigmoid(lambda), concatenated in the set's
  order as `torch.stack(features, -1).reshape(n, -1)` interleaves them (`apply_selection`, l. 9-19; SUR's
  order is Meta-Dataset's: ilsvrc_2012, omniglot, aircraft, cu_birds, dtd, quickdraw, fungi, vgg_flower);
- the loss is the support set scored against its own class means, 10 * cos with eps 1e-30, cross-entropy
  averaged over the support images (`prototype_loss(selected, labels, selected, labels)`);
- Adadelta (rho 0.9, eps 1e-6, PyTorch's defaults) with learning rate 3000 / number of classes, 40 steps
  (`sur.py` l. 28, `test.py` l. 58: `max_iter=40`);
- queries are scored by the same cosine classifier on the features selected with the final lambdas.

Two differences, neither changing a result beyond round-off: the features are normalised once, not at every
step (the same values), and the cosine is a normalised matrix product (`losses.cosine_matrix`) rather than
`F.cosine_similarity` over a [queries, classes, features] broadcast. VICO-UoE/URL carries no SUR of its own
(its `models/pa.py` borrows the name `apply_selection` for URL's linear map), so there is no URL preset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..heads import BackboneWeightsHead
from ..losses import combined_prototypes, cosine_matrix
from .base import Learner
from .registry import register_learner

SUR_COSINE_EPS = 1e-30  # models/losses.py prototype_loss: F.cosine_similarity(..., eps=1e-30)


def fit_selection(
    features: torch.Tensor, labels: torch.Tensor, steps: int, lr_times_classes: float, scale: float
) -> tuple[torch.Tensor, list[float]]:
    """SUR's lambdas [B] for one support set (features [N, B, d], labels 0..C-1), and the loss per step."""
    num_classes = int(labels.unique().numel())
    lambdas = torch.zeros(features.shape[1], 1, dtype=features.dtype, device=features.device)
    lambdas.requires_grad_(True)
    optimizer = torch.optim.Adadelta([lambdas], lr=lr_times_classes / num_classes)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        selected, prototypes = combined_prototypes(features, labels, torch.sigmoid(lambdas), "concatenate")
        logits = scale * cosine_matrix(selected, prototypes, SUR_COSINE_EPS)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return lambdas.detach()[:, 0], [float(x) for x in losses]


@register_learner("sur")
class SURLearner(Learner):
    description = (
        "SUR: sigmoid weights over several backbones, fitted on the support set (needs a backbone set)"
    )
    feature_kind = "backbones"
    default_hyperparameters = {"steps": 40, "lr_times_classes": 3000.0, "scale": 10.0}
    presets = {"default": {}}

    def fit_batch(
        self, features: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> list[BackboneWeightsHead]:
        """Each episode on its own: SUR's learning rate depends on its number of classes."""
        hp = self.hyperparameters
        heads = []
        for episode_features, episode_labels in zip(features, labels, strict=True):
            keep = episode_labels >= 0
            support, support_labels = episode_features[keep], episode_labels[keep]
            with torch.enable_grad():
                lambdas, losses = fit_selection(
                    support, support_labels, hp["steps"], hp["lr_times_classes"], hp["scale"]
                )
            heads.append(
                BackboneWeightsHead.fitted(
                    support,
                    support_labels,
                    torch.sigmoid(lambdas).unsqueeze(1),
                    combination="concatenate",
                    cosine_eps=SUR_COSINE_EPS,
                    scale=hp["scale"],
                    method=self.name,
                    hyperparameters=hp,
                    train_losses=losses,
                )
            )
        return heads
