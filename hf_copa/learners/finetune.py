"""Finetune: Meta-Dataset's test-time fine-tuning baseline (Triantafillou et al., ICLR 2020), the `Finetune`
row of the CoPA paper's ImageNet-only table.

Official code (google-research/meta-dataset, commit 16760950): `learners/optimization_learners.py`
`BaselineFinetuneLearner.compute_logits` (l. 186-345) and `_get_finetune_op` (l. 347-375), the classifier
`models/functional_classifiers.py::linear_classifier` (l. 66-156) and `linear_classifier_forward_pass`
(l. 27-62). For each task a new classifier over the `way` classes starts from a random initialisation and
is trained for `steps` steps on the whole support set, by TensorFlow's Adam or by plain gradient descent
(`gradient_descent_step`, l. 118-145), on the support cross-entropy *summed* over the examples (the loss is
a per-example vector, whose gradient `tf.gradients` sums). `finetune` trains the classifier alone on cached
features; `finetune-all` (`finetune_all_layers=True`, the official best setting) also trains every
parameter of the backbone, through `CopaModel(pixel_values, weights=...)`, leaving the shared backbone
untouched.

The classifier, as `linear_classifier` builds it:
- `weight_norm=True` (the best setting): W_k = g_k v_k / |v_k| with v_k ~ N(0, 0.05^2), g_k = 1, bias 0;
  v, g and the bias are what the optimiser trains;
- `weight_norm=False`: W_k ~ truncated N(0, 0.1^2) (re-drawn beyond two standard deviations), bias 0.1;
- `classifier="cosine"`: logits = scale * q / |q| . W_k (no bias), with W_k also L2-normalised unless
  weight norm is on; TensorFlow's `l2_normalize` floors the squared norm at 1e-3.

Defaults are the best configuration of both `learn/gin/best/baselinefinetune_all.gin` and
`baselinefinetune_imagenet.gin` (identical for these fields): 200 steps of Adam at lr 0.01, a linear
classifier with weight norm, all layers (the head-only `finetune` keeps the rest of that setting). The
presets are the other official settings.

Where hf_copa differs, and why:
- The backbone is URL's, run as URL's and CoPA's test scripts run it (BatchNorm on its running statistics,
  `hf_copa.frozen`); Meta-Dataset's own backbones normalise with the support set's batch moments.
- `linear_classifier`'s data-dependent initialisation of g and the bias (l. 114-134) runs at most once per
  TensorFlow session: its flag `data_dependent_init_done` is not among the variables reset for each
  episode (l. 237-238), so every episode after the first starts from g = 1, bias 0, as hf_copa starts all.
- The random initialisation is drawn from numpy's generator seeded with `seed`, class by class, so a
  class's initial weights depend only on (seed, class index, dimension), not on which episodes share a
  batch; TensorFlow draws from its own generator.
- Official logits have `logit_dim` (the largest way) columns of which the first `way` are used; only those
  are built here.
- `train_losses` records the mean support cross-entropy before each step (the optimiser sees the sum).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..heads import LinearHead
from ..losses import class_means, one_hot_labels, summed_cross_entropy, tf_l2_normalize
from .base import BackboneLearner, Learner, split_linear_heads, trainable_copies
from .optimization import run_steps, within_episode_optimizer
from .registry import register_learner

WEIGHT_NORM_INIT_STD = 0.05  # tf.random_normal_initializer(0, 0.05), functional_classifiers.py l. 97-100
TRUNCATED_INIT_STD = 0.1  # functional_backbones.weight_variable: truncated_normal(stddev=0.1)
BIAS_INIT = 0.1  # functional_backbones.bias_variable: constant(0.1)

DEFAULTS = {
    "steps": 200,
    "lr": 0.01,
    "optimizer": "adam",
    "classifier": "linear",
    "weight_norm": True,
    "scale": 1.0,  # cosine_logits_multiplier (used by the cosine classifier only)
    "seed": 0,
}
PRESETS = {
    # learn/gin/best/baselinefinetune_all.gin and baselinefinetune_imagenet.gin (the defaults)
    "default": {},
    # learn/gin/best/baselinefinetune_mini_imagenet_{oneshot,fiveshot}.gin
    "mini-imagenet": {"optimizer": "gd", "weight_norm": False},
    # learn/gin/best/baselinefinetune_cosine_mini_imagenet_{oneshot,fiveshot}.gin
    "cosine-mini-imagenet": {"optimizer": "gd", "classifier": "cosine", "weight_norm": False, "scale": 10.0},
    # learn/gin/learners/baselinefinetune_config.gin (the learner's base configuration)
    "base-config": {"steps": 5, "lr": 1e-4, "optimizer": "gd", "weight_norm": False},
}


def initial_weights(num_classes: int, dim: int, seed: int, truncated: bool) -> np.ndarray:
    """[num_classes, dim] float64 initial class weights (unit std), class by class from one seeded generator.

    `truncated`: TensorFlow's truncated normal, values beyond two standard deviations re-drawn.
    """
    rng = np.random.default_rng(seed)
    rows = np.empty((num_classes, dim))
    for k in range(num_classes):
        row = rng.standard_normal(dim)
        while truncated and (outside := np.abs(row) > 2).any():
            row[outside] = rng.standard_normal(int(outside.sum()))
        rows[k] = row
    return rows


class FinetuneClassifier:
    """The per-task classifier of `linear_classifier`: its trainable tensors for B episodes, its logits."""

    def __init__(
        self, hyperparameters: dict[str, Any], batch: int, num_classes: int, dim: int, like: torch.Tensor
    ):
        """`like`: a tensor whose dtype and device the classifier takes."""
        hp = self.hyperparameters = hyperparameters
        self.cosine = hp["classifier"] == "cosine"
        self.weight_norm = hp["weight_norm"]
        std = WEIGHT_NORM_INIT_STD if self.weight_norm else TRUNCATED_INIT_STD
        init = initial_weights(num_classes, dim, hp["seed"], truncated=not self.weight_norm)
        weights = torch.as_tensor(std * init, dtype=like.dtype, device=like.device)
        self.direction = weights.expand(batch, -1, -1).clone().requires_grad_(True)  # [B, C, d]
        self.params = [self.direction]
        self.gain = self.bias = None
        if self.weight_norm:
            self.gain = like.new_ones(batch, num_classes).requires_grad_(True)
            self.params.append(self.gain)
        if not self.cosine:
            self.bias = like.new_full((batch, num_classes), 0.0 if self.weight_norm else BIAS_INIT)
            self.params.append(self.bias.requires_grad_(True))

    def weight(self) -> torch.Tensor:
        """The effective class weights [B, C, d]: weight-normalised, or L2-normalised (plain cosine)."""
        if self.weight_norm:
            return self.direction * (self.gain / self.direction.square().sum(-1).sqrt()).unsqueeze(-1)
        return tf_l2_normalize(self.direction) if self.cosine else self.direction

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N, d] -> [B, N, C]."""
        weight = self.weight()
        if self.cosine:
            return self.hyperparameters["scale"] * tf_l2_normalize(features) @ weight.mT
        return features @ weight.mT + self.bias.unsqueeze(1)

    def heads(
        self, learner: Learner, prototypes: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, **common
    ) -> list[LinearHead]:
        with torch.no_grad():
            weight = self.weight()
        bias = None if self.bias is None else self.bias.detach()
        return split_linear_heads(
            learner,
            prototypes,
            weight,
            bias,
            labels,
            losses,
            cosine=self.cosine,
            scale=learner.hyperparameters["scale"],
            **common,
        )


@register_learner("finetune")
class FinetuneLearner(Learner):
    description = "trains a new linear classifier on the support set (Meta-Dataset's Finetune baseline)"
    default_hyperparameters = DEFAULTS
    presets = PRESETS

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[LinearHead]:
        hp = self.hyperparameters
        one_hot = one_hot_labels(labels, num_classes, features.dtype)
        classifier = FinetuneClassifier(hp, features.shape[0], num_classes, features.shape[-1], features)
        optimizer = within_episode_optimizer(hp["optimizer"], classifier.params, hp["lr"])

        def loss_fn() -> torch.Tensor:
            return summed_cross_entropy(classifier.logits(features), one_hot)

        losses = run_steps(optimizer, loss_fn, hp["steps"], batch_size=len(features))
        losses = losses / one_hot.sum(dim=(1, 2)).to(losses)
        return classifier.heads(self, class_means(features, one_hot), labels, losses)


@register_learner("finetune-all")
class FinetuneAllLayersLearner(BackboneLearner):
    description = "fine-tunes every backbone layer with a new linear classifier (Finetune, all layers; slow)"
    default_hyperparameters = DEFAULTS
    presets = PRESETS

    def fit_backbone(self, backbone, pixel_values: torch.Tensor, labels: torch.Tensor):
        hp = self.hyperparameters
        one_hot = one_hot_labels(labels.unsqueeze(0), int(labels.max()) + 1, pixel_values.dtype)
        weights = trainable_copies(backbone)
        classifier = FinetuneClassifier(hp, 1, one_hot.shape[-1], backbone.config.feature_dim, pixel_values)
        optimizer = within_episode_optimizer(
            hp["optimizer"], classifier.params + list(weights.values()), hp["lr"]
        )

        def features_of() -> torch.Tensor:
            return backbone(pixel_values, weights=weights).pooler_output.unsqueeze(0)

        def loss_fn() -> torch.Tensor:
            return summed_cross_entropy(classifier.logits(features_of()), one_hot)

        losses = run_steps(optimizer, loss_fn, hp["steps"], batch_size=1) / len(labels)
        with torch.no_grad():
            features = features_of()
        head = classifier.heads(
            self, class_means(features, one_hot), labels.unsqueeze(0), losses, backbone_weights=weights
        )[0]
        return head, features[0]
