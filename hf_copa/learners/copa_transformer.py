"""CoPA with transformer encoders (Tian et al., NeurIPS 2024, App. E.4): CoPA's symmetric contrastive loss
between a transformer over each support image's feature map and another over each class's mean map.

Official code (HongduanTian/CoPA, commit f829b529): `copa_pa.py` with `--encoder.type transformer` builds
two `Transformer(num_blocks=1, num_dim=512, is_simpleatten=True, init_mode='eye')` (l. 48-57; 8 heads, the
class default), one for the images (`feature_encoder`) and one for the prototypes, and feeds them the
backbone's maps before pooling (`model.embed(..., is_pooling=False)`, l. 83-84). `models/adaptation.py::
pa_adaptation` (l. 65-88, 109-175) then, for each task: resets both encoders (`reset_params`: identity maps,
new N(0, 0.02^2) position embeddings, the prototype encoder's drawn first), computes the class-mean maps
once (`compute_prototypes`, l. 18-32, 110), and takes 50 steps of Adam over both encoders (lr 1e-4 and
weight decay 0.1; lr 1e-3 without weight decay on MNIST and Traffic Sign) on `symmetric_CE(E_I(support
maps), E_P(class-mean maps))` with tau 2. Queries are scored by 10 * cos(E_I(query map), E_P(class-mean
maps)) (`symmetric_CE`'s accuracy, `models/losses.py` l. 294-300). The encoder maths is in
`hf_copa.prototype_transformer`.

Where hf_copa differs: the position embeddings are drawn from numpy's generator seeded with `seed` (the
prototype encoder's first), where the official code draws from torch's global generator; the query set is
scored once, after adaptation (the official loop scores it before every step too, without using it); the
loss is CoPA's [N, C] form (`hf_copa.losses.symmetric_contrastive_loss`) and the two encoders share one
Adam group (same lr and weight decay, so the same elementwise updates); position embeddings have one row per
map position of the backbone in use (the official table has 37, for 6 x 6 maps).

Cost: the maps cost d*h*w*4 bytes an image in float32: 73,728 (72 KiB) for URL's ResNet-18 at 84 pixels
(512 x 6 x 6), 16,384 for the bundled default (256 x 4 x 4).
"""

from __future__ import annotations

import numpy as np
import torch

from ..heads import TransformerHead
from ..losses import one_hot_labels, symmetric_contrastive_loss
from ..prototype_transformer import encode, identity_encoder, random_position_embeddings
from .base import Learner
from .optimization import run_steps
from .registry import register_learner


@register_learner("copa-transformer")
class CopaTransformerLearner(Learner):
    description = "CoPA with a transformer over image maps and one over class-mean maps (App. E.4; slower)"
    feature_kind = "maps"
    default_hyperparameters = {
        "steps": 50,
        "lr": 1e-4,
        "weight_decay": 0.1,
        "tau": 2.0,
        "scale": 10.0,
        "heads": 8,
        "blocks": 1,
        "seed": 0,
    }
    presets = {
        "default": {},
        "high-lr": {"lr": 1e-3, "weight_decay": 0.0},  # the official MNIST / Traffic Sign setting
    }

    def fit_batch(
        self, features: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> list[TransformerHead]:
        """Episodes one at a time: each has its own two encoders, so nothing is shared to batch."""
        return [
            self.fit_maps(features[b, labels[b] >= 0], labels[b, labels[b] >= 0]) for b in range(len(labels))
        ]

    def fit_maps(self, maps: torch.Tensor, labels: torch.Tensor) -> TransformerHead:
        hp = self.hyperparameters
        dim, height, width = maps.shape[1:]
        if dim % hp["heads"]:
            raise ValueError(
                f"copa-transformer: heads={hp['heads']} must divide the feature dimension {dim}."
            )
        one_hot = one_hot_labels(labels.unsqueeze(0), int(labels.max()) + 1, maps.dtype)
        counts = one_hot[0].sum(0)
        class_maps = (one_hot[0].T @ maps.flatten(1) / counts.unsqueeze(1)).view(-1, dim, height, width)
        rng = np.random.default_rng(hp["seed"])
        positions = height * width
        prototype_encoder = identity_encoder(
            dim, positions, hp["blocks"], random_position_embeddings(rng, positions, dim, maps)
        )
        image_encoder = identity_encoder(
            dim, positions, hp["blocks"], random_position_embeddings(rng, positions, dim, maps)
        )
        params = [*image_encoder.values(), *prototype_encoder.values()]
        for tensor in params:
            tensor.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=hp["lr"], weight_decay=hp["weight_decay"])

        def loss_fn() -> torch.Tensor:
            images = encode(image_encoder, maps, hp["heads"]).unsqueeze(0)
            prototypes = encode(prototype_encoder, class_maps, hp["heads"]).unsqueeze(0)
            return symmetric_contrastive_loss(images, prototypes, one_hot, hp["tau"])

        losses = run_steps(optimizer, loss_fn, hp["steps"], batch_size=1)
        with torch.no_grad():
            prototype_embeddings = encode(prototype_encoder, class_maps, hp["heads"])
        return TransformerHead(
            class_maps.mean(dim=(2, 3)),
            prototype_embeddings,
            image_encoder,
            heads=hp["heads"],
            map_shape=(dim, height, width),
            scale=hp["scale"],
            method=self.name,
            hyperparameters=hp,
            train_losses=losses[:, 0].tolist(),
        )
