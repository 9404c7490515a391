"""Adaptation to a task: `adapt_to_task` on a backbone, and `adapt` on precomputed features.

`adapt_to_task` is the single entry point for adapting on a backbone.
`CopaModel.adapt`, evaluation and the Space all call it, so the choice between the two kinds of learner is
made here once: feature learners (NCC, URL, CoPA) fit on the backbone's features of the support images (or
on cached features), learners with `needs_backbone` (TSA, CoPA+TSA) adapt the backbone itself on the
images. Either way the result holds the head with the support and query features it used, so a caller
never embeds an image again to score or plot it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .heads import AdaptedHead
from .learners import Learner, get_learner
from .validation import CopaTypeError, CopaValueError


@dataclass
class TaskAdaptation:
    """What adapting to one task produced.

    Attributes:
        head: The adapted head.
        support_features: [N, d] support features the head was fitted on (for TSA learners: through the
            adapted backbone, the features its prototypes are the class means of; for learners with
            `feature_kind="maps"`: the maps [N, d, h, w]).
        query_features: [Nq, d] features of the query images as the head scores them (through the adapted
            backbone for TSA learners; maps for heads that score maps), or None when no queries were given.
        seconds: Wall time of the adaptation itself: support features plus fitting, not the queries.
    """

    head: AdaptedHead
    support_features: torch.Tensor
    query_features: torch.Tensor | None
    seconds: float

    def query_logits(self) -> torch.Tensor:
        """[Nq, C] logits of the queries."""
        if self.query_features is None:
            raise CopaValueError("No query images were given to adapt_to_task; pass query_images=...")
        return self.head.logits(self.query_features.to(self.head.prototypes))


def adapt_to_task(
    backbone: Any,
    support_labels: Any,
    method: str | Learner = "copa",
    *,
    support_images: Any = None,
    support_features: torch.Tensor | None = None,
    query_images: Any = None,
    query_features: torch.Tensor | None = None,
    preset: str | None = None,
    image_processor: Any = None,
    **hyperparameters: Any,
) -> TaskAdaptation:
    """Adapt `method` to one support set on `backbone` (a `CopaModel`); embed the queries as it scores them.

    Args:
        backbone: The frozen backbone; it is never modified.
        support_labels: Integer labels 0..C-1, one per support image.
        method: A registered method name, or a `Learner` (then give no `preset` or hyperparameters).
        support_images / support_features: The support set as images (anything `CopaImageProcessor` takes,
            or pixel values [N, 3, H, W]) or as cached features [N, d] of this backbone (feature learners
            only: TSA learners need the images).
        query_images / query_features: Optional queries, likewise (cached query features: feature learners
            only).
        preset, hyperparameters: As for `get_learner`, on top of `backbone.config.adaptation`.
        image_processor: Turns images into pixel values (default: the backbone's own).
    """
    learner = _resolve_learner(backbone, method, preset, hyperparameters)
    learner.check_model(backbone)
    if (support_images is None) == (support_features is None):
        raise CopaTypeError("Give the support set either as support_images or as support_features, not both.")
    if query_images is not None and query_features is not None:
        raise CopaTypeError("Give the queries either as query_images or as query_features, not both.")
    if learner.needs_backbone and (support_features is not None or query_features is not None):
        raise CopaTypeError(
            f"{learner.name!r} adapts the backbone itself, so it needs the support and query images "
            "(support_images=, query_images=), not cached features."
        )

    started = time.perf_counter()
    if learner.needs_backbone:
        pixel_values = backbone.to_pixel_values(support_images, image_processor)
        _check_counts(len(pixel_values), support_labels)
        head, support_features = learner.adapt_backbone(backbone, pixel_values, support_labels)
    else:
        if support_features is None:
            spatial = learner.feature_kind == "maps"
            support_features = backbone.extract_features(support_images, image_processor, spatial=spatial)
        _check_counts(len(support_features), support_labels)
        head = learner.fit(support_features, support_labels)
    seconds = time.perf_counter() - started

    if query_images is not None:
        query_features = backbone.extract_features(
            query_images, image_processor, spatial=head.feature_kind == "maps", **head.backbone_state()
        )
    return TaskAdaptation(head, support_features, query_features, seconds)


def _resolve_learner(
    backbone: Any, method: str | Learner, preset: str | None, hyperparameters: dict
) -> Learner:
    if isinstance(method, Learner):
        if preset is not None or hyperparameters:
            raise CopaTypeError("Pass either a Learner or a method name with its preset and hyperparameters.")
        return method
    config = getattr(backbone, "config", None)
    overrides = getattr(config, "adaptation", {}).get(method) if config is not None else None
    return get_learner(method, preset, config_overrides=overrides, **hyperparameters)


def _check_counts(num_images: int, labels: Any) -> None:
    if hasattr(labels, "__len__") and len(labels) != num_images:
        raise CopaValueError(
            f"Got {num_images} support images but {len(labels)} labels; give one label per image."
        )


def adapt(
    support_features: torch.Tensor | np.ndarray,
    support_labels: Any,
    method: str = "copa",
    preset: str | None = None,
    **hyperparameters: Any,
) -> AdaptedHead:
    """Fit `method` on support features [N, d] with labels 0..C-1; the head's `.logits(query)` gives [Nq, C].
    Several-backbone methods (`sur`, `urt`) take a `CopaBackboneSet`'s features [N, B, d] the same way.

    No backbone is needed. Hyperparameters (`steps`, `lr`, `weight_decay`, and `tau`, `scale` where they
    apply) override the method's defaults (`hf_copa.ADAPTATION_DEFAULTS`); `preset` names a setting from
    the papers (e.g. "high-lr" for CoPA, "seen" for URL).
    """
    return get_learner(method, preset=preset, **hyperparameters).fit(support_features, support_labels)
