"""The prototype–image gap, its bound under a linear map, its course along adaptation, and the gap-enlarging
experiment (CoPA, Tian et al., NeurIPS 2024, Sections 3 and 5).

Conventions are the paper's: embeddings are rows, a transformation Θ [d, d] maps them as Z = X Θ, and Θʲ is
its j-th column. hf_copa's heads store the map they apply as `features @ A.T`, so Θ = A.T (`head_maps`).
Everything is computed in float64.

What the official code computes, and where this module differs, is said at each function; the official code
is the notebook `visualization/motivation_modality_gap/visualization.ipynb` of HongduanTian/CoPA (functions
`draw_gap_map`, `plot_gap_changes`) and `visualization/param_norms/visualization.ipynb`. No script that
wrote their `.npy` inputs is published.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..heads import AdaptedHead
from ..losses import NORM_EPS, class_means, one_hot_labels
from ..validation import CopaValueError, as_feature_matrix

# The scales of the gap-enlarging experiment: each side moves by scale/2 of the gap (0: as adapted, -1: the
# centres meet, 1: the gap doubled). The official notebook sweeps -3..3 in steps of 0.05.
ENLARGING_SCALES = tuple(round(float(s), 2) for s in np.arange(-3.0, 3.0001, 0.1))


def _matrix(x: Any, name: str, dim: int | None = None) -> torch.Tensor:
    return as_feature_matrix(x, name, dim).detach().to("cpu", torch.float64)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (an all-zero row stays zero), as the classifier and the paper's figures
    see them."""
    return F.normalize(x.to(torch.float64), dim=-1, eps=NORM_EPS)


def gap_vector(image_embeddings: Any, prototype_embeddings: Any, *, normalize: bool = True) -> torch.Tensor:
    """Δ = mean of the image embeddings − mean of the prototype embeddings, [d] (float64)."""
    images = _matrix(image_embeddings, "image_embeddings")
    prototypes = _matrix(prototype_embeddings, "prototype_embeddings", images.shape[1])
    if normalize:
        images, prototypes = unit_rows(images), unit_rows(prototypes)
    return images.mean(0) - prototypes.mean(0)


def prototype_image_gap(image_embeddings: Any, prototype_embeddings: Any, *, normalize: bool = True) -> float:
    """The paper's gap ‖mean of image embeddings − mean of prototype embeddings‖₂ for [N, d] images and [C, d]
    prototypes.

    `normalize=True` (the default) L2-normalises every row first: this is what the paper plots (the notebook's
    `draw_gap_map` divides by the norm + 1e-12) and the space a cosine classifier compares in. Without it the
    gap of class-mean prototypes is degenerate: weighted by the shots, the mean of the class means *is* the
    mean of the images, so the raw gap is 0 before adaptation and stays 0 under any shared linear map.

    The notebook pairs each support image with its own class prototype (its prototype array has N rows, so a
    class weighs by its number of shots); pass `prototypes[labels]` to get that, as `episode_gap` does.
    With [C, d] prototypes every class weighs the same; the two agree when every class has the same shots.
    """
    return float(
        torch.linalg.vector_norm(gap_vector(image_embeddings, prototype_embeddings, normalize=normalize))
    )


def gap_bound(delta: Any, theta: Any) -> tuple[float, float]:
    """(bound, coefficient) for the gap after a linear map Θ [d, d]: ‖Δ Θ‖₂ ≤ bound = coefficient · ‖Δ‖₂, with

        coefficient = max_j |cos(Δ, Θʲ)| · ‖Θ‖_F      (Θʲ the j-th column of Θ).

    Why it holds: (Δ Θ)_j = ‖Δ‖ ‖Θʲ‖ cos(Δ, Θʲ), so ‖Δ Θ‖² = ‖Δ‖² Σ_j ‖Θʲ‖² cos² ≤ ‖Δ‖² max_j cos² ‖Θ‖_F².
    The paper writes max_j cos(Δ, Θʲ) without the absolute value; that is no bound when the cosines are
    negative (Θ = −I: every cosine is ≤ 0 while ‖ΔΘ‖ = ‖Δ‖ > 0), so the absolute value is used here. A zero
    column has cosine 0; Δ = 0 gives (0, 0). For the identity, where every learner starts,
    coefficient = √d · max_j |Δ_j| / ‖Δ‖₂ ≥ 1.
    """
    delta = torch.as_tensor(delta).detach().to("cpu", torch.float64)
    theta = torch.as_tensor(theta).detach().to("cpu", torch.float64)
    if delta.ndim != 1 or theta.ndim != 2 or theta.shape[0] != delta.shape[0]:
        raise CopaValueError(
            f"gap_bound takes delta [d] and theta [d, d'] (Z = X Θ), got shapes {tuple(delta.shape)} and "
            f"{tuple(theta.shape)}."
        )
    if not (torch.isfinite(delta).all() and torch.isfinite(theta).all()):
        raise CopaValueError("gap_bound: delta or theta holds NaN or infinite values.")
    delta_norm = torch.linalg.vector_norm(delta)
    if delta_norm == 0:
        return 0.0, 0.0
    column_norms = torch.linalg.vector_norm(theta, dim=0)
    cosines = (delta @ theta) / (delta_norm * column_norms).clamp_min(torch.finfo(torch.float64).tiny)
    coefficient = float(cosines.abs().max() * torch.linalg.matrix_norm(theta))
    return coefficient * float(delta_norm), coefficient


def head_maps(head: AdaptedHead) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(Θ_I, Θ_P) in the paper's convention (Z = X Θ) for a head whose rule is the cosine of linearly mapped
    images and prototypes (URL, TSA: one map, Θ_I = Θ_P; CoPA, CoPA+TSA: two), else None."""
    if type(head) is not AdaptedHead or head.image_projection is None:
        return None
    image = head.image_projection.detach().to("cpu", torch.float64).T
    prototype = head.prototype_projection
    prototype = image if prototype is None else prototype.detach().to("cpu", torch.float64).T
    return image, prototype


def paired_prototypes(prototypes: torch.Tensor, labels: Any) -> torch.Tensor:
    """Each image's own class prototype, [N, d]: the pairing of the official gap figures."""
    return prototypes[torch.as_tensor(np.asarray(labels), dtype=torch.long)]


@dataclass
class EpisodeGap:
    """The gap of one episode's support set before and after a head's maps (all L2-normalised, float64).

    `before`: plain backbone features and their class means. `input`: the features the maps act on (the same
    for feature learners; the adapted backbone's for TSA and CoPA+TSA). `after`: images through Θ_I and
    prototypes through Θ_P, what the classifier compares. For one shared map, `mapped` = ‖Δ_input Θ‖ (the
    normalised gap pushed through Θ, not normalised again) is what `bound` bounds; `coefficient` is Θ's.
    For two maps, `coefficient_images` / `coefficient_prototypes` are those of Θ_I and Θ_P against Δ_input.
    Where every class has one shot the support gap is 0 by definition (each prototype is its image), so the
    gaps are 0 and the coefficients None (undefined).
    """

    before: float
    input: float
    after: float
    mapped: float | None = None
    bound: float | None = None
    coefficient: float | None = None
    coefficient_images: float | None = None
    coefficient_prototypes: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {
            f"gap_{k}" if k in ("before", "input", "after", "mapped") else k: v for k, v in vars(self).items()
        }


def episode_gap(
    head: AdaptedHead,
    support_features: Any,
    support_labels: Any,
    plain_support_features: Any | None = None,
) -> EpisodeGap:
    """The gap of an adapted head's episode (see `EpisodeGap`). `support_features` are those the head's maps
    act on; `plain_support_features` the plain backbone's, when they differ (heads with adapters)."""
    maps = head_maps(head)
    if maps is None:
        raise CopaValueError(
            f"A {head.method} head learns no linear map of images and prototypes, so it has no gap to "
            "analyse; analyse url, copa, tsa or copa+tsa."
        )
    image_map, prototype_map = maps
    features = _matrix(support_features, "support_features", image_map.shape[0])
    labels = torch.as_tensor(np.asarray(support_labels), dtype=torch.long)
    if labels.ndim != 1 or len(labels) != len(features):
        raise CopaValueError(
            f"Got {len(features)} support features but {len(labels)} labels; they must match."
        )
    plain = features if plain_support_features is None else _matrix(plain_support_features, "plain features")
    before = _class_mean_gap_vector(plain, labels)
    prototypes = _class_means(features, labels)
    delta = gap_vector(features, paired_prototypes(prototypes, labels))
    after = prototype_image_gap(features @ image_map, paired_prototypes(prototypes @ prototype_map, labels))
    gap = EpisodeGap(
        before=float(torch.linalg.vector_norm(before)),
        input=float(torch.linalg.vector_norm(delta)),
        after=after,
    )
    if gap.input == 0:  # every class one shot: each prototype is its image, any coefficient bounds 0
        gap.mapped, gap.bound = (0.0, 0.0) if torch.equal(image_map, prototype_map) else (None, None)
        return gap
    if torch.equal(image_map, prototype_map):
        gap.mapped = float(torch.linalg.vector_norm(delta @ image_map))
        gap.bound, gap.coefficient = gap_bound(delta, image_map)
    else:
        gap.coefficient_images = gap_bound(delta, image_map)[1]
        gap.coefficient_prototypes = gap_bound(delta, prototype_map)[1]
    return gap


def _class_means(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[C, d] class means of one episode, by the learners' own `losses.class_means`."""
    one_hot = one_hot_labels(labels.unsqueeze(0), int(labels.max()) + 1, features.dtype)
    return class_means(features.unsqueeze(0), one_hot)[0]


def _class_mean_gap_vector(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return gap_vector(features, paired_prototypes(_class_means(features, labels), labels))


class GapTrace:
    """A learner's `step_observer` that records the gap (and coefficients) after every step of adaptation.

    Set it on a feature learner that declares `linear_maps` (url, copa) and fit one episode:
    `learner.step_observer = trace = GapTrace(features, labels); learner.fit(features, labels)`; then
    `trace.gaps[k]` is the L2-normalised gap after k steps (k = 0: the identity start) and
    `trace.coefficients` the coefficient of Θ (shared map) or of Θ_I (two maps) against the gap before
    adaptation. Off by default: learners without an observer do no extra work.
    """

    def __init__(self, support_features: Any, support_labels: Any) -> None:
        self.features = _matrix(support_features, "support_features")
        self.labels = torch.as_tensor(np.asarray(support_labels), dtype=torch.long)
        self.prototypes = _class_means(self.features, self.labels)
        self.delta = _class_mean_gap_vector(self.features, self.labels)
        self.gaps: list[float] = []
        self.coefficients: list[float] = []

    def __call__(self, step: int, image_map: torch.Tensor, prototype_map: torch.Tensor) -> None:
        """`image_map` / `prototype_map`: the learner's [1, d, d] maps A (features @ A.T), one episode."""
        if image_map.shape[0] != 1:
            raise CopaValueError("GapTrace follows one episode at a time; fit episodes one by one.")
        theta_image = image_map[0].detach().to("cpu", torch.float64).T
        theta_proto = prototype_map[0].detach().to("cpu", torch.float64).T
        images = self.features @ theta_image
        prototypes = paired_prototypes(self.prototypes @ theta_proto, self.labels)
        self.gaps.append(prototype_image_gap(images, prototypes))
        self.coefficients.append(gap_bound(self.delta, theta_image)[1])


@dataclass
class EnlargingCurve:
    """The gap-enlarging experiment on one episode: per scale, the signed gap and the validation loss and
    accuracy on the queries (see `gap_enlarging_curve`)."""

    scales: list[float]
    gaps: list[float]
    losses: list[float]
    accuracies: list[float]
    original_gap: float
    best_scale: float = field(init=False)

    def __post_init__(self) -> None:
        self.best_scale = self.scales[int(np.nanargmin(self.losses))]


def gap_enlarging_curve(
    support_images: Any,
    support_labels: Any,
    prototypes: Any,
    query_images: Any,
    query_labels: Any,
    scale: float = 10.0,
    scales: Sequence[float] = ENLARGING_SCALES,
) -> EnlargingCurve:
    """Move images and prototypes apart along their gap and measure the validation loss (Figure 2(c)).

    Inputs are embeddings where the classifier compares them (a head's `view`). With Δ the L2-normalised
    support gap, for each s every image moves by +s/2·Δ and every prototype by −s/2·Δ, then all are
    L2-normalised again; the gap (signed: negative once the two sides have crossed) is that of the support
    set, and the loss is the cross-entropy of `scale`·cos(query, prototype) on the query set, the held-out
    images: the "validation loss" of the paper.

    The official notebook (`plot_gap_changes`) differs in three ways we read as slips, not as the experiment:
    it adds the *scalar* ‖Δ‖·s/2 to every coordinate (a move along the all-ones vector, not along the gap), it
    scores the support ("context") set, and for NCC/URL its "loss" is −mean(argmax·label), not a
    cross-entropy (CoPA's is its symmetric loss at temperature e²). Here the move is along Δ, the loss is
    the queries' cross-entropy for every method, and so one curve compares methods.
    """
    support = unit_rows(_matrix(support_images, "support_images"))
    labels = torch.as_tensor(np.asarray(support_labels), dtype=torch.long)
    protos = unit_rows(_matrix(prototypes, "prototypes", support.shape[1]))
    queries = unit_rows(_matrix(query_images, "query_images", support.shape[1]))
    truth = torch.as_tensor(np.asarray(query_labels), dtype=torch.long)
    delta = support.mean(0) - paired_prototypes(protos, labels).mean(0)
    direction = delta / torch.linalg.vector_norm(delta).clamp_min(NORM_EPS)
    gaps, losses, accuracies = [], [], []
    for s in scales:
        moved_support = unit_rows(support + s / 2 * delta)
        moved_protos = unit_rows(protos - s / 2 * delta)
        moved_queries = unit_rows(queries + s / 2 * delta)
        gap = moved_support.mean(0) - paired_prototypes(moved_protos, labels).mean(0)
        gaps.append(float(torch.sign(gap @ direction) * torch.linalg.vector_norm(gap)))
        logits = scale * moved_queries @ moved_protos.T
        losses.append(float(F.cross_entropy(logits, truth)))
        accuracies.append(float((logits.argmax(1) == truth).double().mean()))
    return EnlargingCurve(
        [float(s) for s in scales], gaps, losses, accuracies, float(torch.linalg.vector_norm(delta))
    )
