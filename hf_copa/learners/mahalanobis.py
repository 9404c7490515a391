"""Simple CNAPS' classifier (Bateni et al., CVPR 2020) on hf_copa's frozen features: class means and
regularised per-class covariances, queries scored by the Mahalanobis distance.

This is S-CNAPS' *classifier*, not S-CNAPS: the official model also adapts its feature extractor with FiLM
layers produced by a trained adaptation network, which hf_copa does not have, so these numbers are not the
table's Simple CNAPS row.

Official code (peymanbateni/simple-cnaps, commit 5c43a08b): `simple-cnaps-src/simple_cnaps.py`,
`_build_class_reps_and_covariance_estimates` (l. 132-159), `estimate_cov` (l. 161-197) and the logits in
`forward` (l. 82-87):
- mu_k: the mean of class k's support features;
- Sigma_task = estimate_cov(all support features), Sigma_k = estimate_cov(class k's features);
- Q_k = lambda_k Sigma_k + (1 - lambda_k) Sigma_task + beta I with lambda_k = n_k / (n_k + 1), beta = 1;
- logits_k(q) = -(mu_k - q)^T Q_k^-1 (mu_k - q), with `torch.inverse`.

`estimate_cov` is the unbiased estimator, 1 / (n - 1) times the centred scatter, for n >= 2 examples. For
a class with ONE example it differs from the textbook formula (which has no estimate there): the single row
is not transposed (`examples.size(0) != 1` fails, l. 189), so the function centres the vector over its own
d entries and returns the scalar s = sum_j (x_j - mean(x))^2 / (d - 1), and `lambda_k * s` is then added to
every entry of the d x d matrix (broadcast). hf_copa reproduces that exactly (`official_covariance`).
"""

from __future__ import annotations

import torch

from ..heads import MahalanobisHead
from ..losses import class_means, one_hot_labels
from .base import Learner
from .registry import register_learner


def official_covariance(examples: torch.Tensor) -> torch.Tensor:
    """`estimate_cov` of [n, d] examples: [d, d] for n >= 2; for n = 1, the scalar the official code gives
    (the variance of the vector's own entries, 1 / (d - 1)), as a 0-d tensor that broadcasts."""
    if len(examples) == 1:
        row = examples[0]
        centred = row - row.mean()
        return centred @ centred / (row.numel() - 1)
    centred = examples - examples.mean(dim=0, keepdim=True)
    return centred.T @ centred / (len(examples) - 1)


@register_learner("mahalanobis")
class MahalanobisLearner(Learner):
    description = "class means with regularised per-class covariances (Simple CNAPS' classifier)"
    # beta: the ridge on the mixed covariance (simple_cnaps.py l. 158-159: torch.eye).
    default_hyperparameters = {"beta": 1.0}
    presets = {"default": {}}

    def fit_batch(
        self, features: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> list[MahalanobisHead]:
        beta = self.hyperparameters["beta"]
        one_hot = one_hot_labels(labels, num_classes, features.dtype)
        means = class_means(features, one_hot)
        heads = []
        for b in range(features.shape[0]):
            valid = labels[b] >= 0
            episode, episode_labels = features[b, valid], labels[b, valid]
            task = official_covariance(episode)
            eye = beta * torch.eye(features.shape[-1], dtype=features.dtype, device=features.device)
            precisions = []
            for k in range(int(episode_labels.max()) + 1):
                members = episode[episode_labels == k]
                mix = len(members) / (len(members) + 1)
                precisions.append(torch.inverse(mix * official_covariance(members) + (1 - mix) * task + eye))
            heads.append(
                MahalanobisHead(
                    means[b, : len(precisions)],
                    torch.stack(precisions),
                    method=self.name,
                    hyperparameters=self.hyperparameters,
                )
            )
        return heads
