"""fo-Proto-MAML's test-time part (Triantafillou et al., ICLR 2020): a linear classifier initialised from the
prototypes, then a few plain gradient-descent steps on the support cross-entropy.

Official code (google-research/meta-dataset, commit 16760950): `learners/optimization_learners.py`
`MAMLLearner.forward_pass` (l. 469-623) with `proto_maml_fc_weights` / `proto_maml_fc_bias` (l. 434-467):
W_k = 2 mu_k and b_k = -|mu_k|^2 from the class means mu_k of the support embeddings (l. 565-579), which
makes the initial logits 2 mu_k.q - |mu_k|^2 = |q|^2 - |q - mu_k|^2: the ProtoNet classifier with squared
Euclidean distance (the same softmax; with `steps=0` the same predictions). At test time the inner loop
runs `num_update_steps + additional_evaluation_update_steps` steps (l. 510-515) of `gradient_descent_step`
(l. 118-145, theta -= alpha * grad) on `tf.losses.softmax_cross_entropy` of the support set (its default
reduction: the mean over the examples, l. 534-535); the query logits use the updated layer (l. 620-621).

The official inner loop updates the backbone too (every embedding variable but BatchNorm's scale and
offset, `adapt_batch_norm=False` in `learn/gin/learners/maml_init_with_proto_config.gin`); `proto-maml`
updates the linear layer alone on cached features, `proto-maml-all` also every backbone parameter except
BatchNorm's weight and bias, through `CopaModel(pixel_values, weights=...)`, leaving the shared backbone
untouched. Defaults: `learn/gin/best/maml_init_with_proto_all.gin` (1 + 5 steps, alpha 0.01988), the
setting of the all-sources table; preset `imagenet`: `maml_init_with_proto_imagenet.gin` (6 + 0 steps,
alpha 0.005435). The backbone runs as URL's test scripts run it (BatchNorm on its running statistics);
Meta-Dataset's backbones use the support set's batch moments. First-order or not makes no difference at
test time: there is no outer loop.
"""

from __future__ import annotations

import torch
from torch import nn

from ..heads import LinearHead
from ..losses import class_means, ncc_loss, one_hot_labels
from .base import BackboneLearner, Learner, split_linear_heads, trainable_copies
from .optimization import run_steps
from .registry import register_learner

DEFAULTS = {"steps": 6, "lr": 0.01988024603751885}
PRESETS = {
    "all": {},  # learn/gin/best/maml_init_with_proto_all.gin: 1 + 5 evaluation steps
    "imagenet": {"steps": 6, "lr": 0.005435022808033229},  # maml_init_with_proto_imagenet.gin: 6 + 0
}


def prototype_layer(prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`proto_maml_fc_layer_init`: trainable W = 2 mu [B, C, d] and b = -|mu|^2 [B, C]."""
    weight = (2 * prototypes).detach().clone().requires_grad_(True)
    bias = (-prototypes.square().sum(-1)).detach().clone().requires_grad_(True)
    return weight, bias


@register_learner("proto-maml")
class ProtoMAMLLearner(Learner):
    description = "a linear layer initialised from the prototypes, then a few gradient steps (fo-Proto-MAML)"
    default_hyperparameters = DEFAULTS
    presets = PRESETS

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[LinearHead]:
        hp = self.hyperparameters
        one_hot = one_hot_labels(labels, num_classes, features.dtype)
        prototypes = class_means(features, one_hot)
        weight, bias = prototype_layer(prototypes)
        optimizer = torch.optim.SGD([weight, bias], lr=hp["lr"])

        def loss_fn() -> torch.Tensor:
            return ncc_loss(features @ weight.mT + bias.unsqueeze(1), one_hot)

        losses = run_steps(optimizer, loss_fn, hp["steps"], batch_size=len(features))
        return split_linear_heads(self, prototypes, weight.detach(), bias.detach(), labels, losses)


@register_learner("proto-maml-all")
class ProtoMAMLAllLayersLearner(BackboneLearner):
    description = "fo-Proto-MAML's inner loop through every backbone layer but BatchNorm (slower)"
    default_hyperparameters = DEFAULTS
    presets = PRESETS

    def fit_backbone(self, backbone, pixel_values: torch.Tensor, labels: torch.Tensor):
        hp = self.hyperparameters
        one_hot = one_hot_labels(labels.unsqueeze(0), int(labels.max()) + 1, pixel_values.dtype)
        weights = trainable_copies(backbone, exclude=(nn.BatchNorm2d,))  # adapt_batch_norm=False

        def features_of() -> torch.Tensor:
            return backbone(pixel_values, weights=weights).pooler_output.unsqueeze(0)

        with torch.no_grad():
            weight, bias = prototype_layer(class_means(features_of(), one_hot))
        optimizer = torch.optim.SGD([*weights.values(), weight, bias], lr=hp["lr"])

        def loss_fn() -> torch.Tensor:
            return ncc_loss(features_of() @ weight.mT + bias.unsqueeze(1), one_hot)

        losses = run_steps(optimizer, loss_fn, hp["steps"], batch_size=1)
        with torch.no_grad():
            features = features_of()
        head = split_linear_heads(
            self,
            class_means(features, one_hot),
            weight.detach(),
            bias.detach(),
            labels.unsqueeze(0),
            losses,
            backbone_weights=weights,
        )[0]
        return head, features[0]
