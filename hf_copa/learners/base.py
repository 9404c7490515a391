"""The learner contract, the adapted head it produces, and the registry of learners by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..adapters import frozen_backbone
from ..configuration_copa import ADAPTATION_DEFAULTS, resolve_hyperparameters
from ..losses import cosine_scores

_LEARNERS: dict[str, type[Learner]] = {}

# Batched support sets are padded to these multiples (rows, classes), and batches only group
# episodes of one padded shape, so an episode's float32 arithmetic, and hence its result, does not
# depend on which episodes share its batch: a different padded size changes how the matrix
# products block their sums, and adaptation amplifies such round-off into different predictions.
ROW_MULTIPLE = 64
CLASS_MULTIPLE = 16


def padded_size(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def pad_support_sets(
    support_sets: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[(features [N_i, d], labels [N_i])] -> features [B, N, d], labels [B, N] (-1 = padding), classes C.

    N and C are the largest sizes rounded up to ROW_MULTIPLE and CLASS_MULTIPLE.
    """
    first = support_sets[0][0]
    rows = padded_size(max(len(f) for f, _ in support_sets), ROW_MULTIPLE)
    classes = padded_size(max(int(labels.max()) + 1 for _, labels in support_sets), CLASS_MULTIPLE)
    features = first.new_zeros(len(support_sets), rows, first.shape[1])
    labels = torch.full((len(support_sets), rows), -1, dtype=torch.long, device=first.device)
    for b, (episode_features, episode_labels) in enumerate(support_sets):
        features[b, : len(episode_features)] = episode_features
        labels[b, : len(episode_labels)] = episode_labels
    return features, labels, classes


def register_learner(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator: make a learner available as `method=name` everywhere."""

    def decorate(cls: type[Learner]) -> type[Learner]:
        if name in _LEARNERS:
            raise ValueError(f"A learner named {name!r} is already registered.")
        cls.name = name
        _LEARNERS[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    return sorted(_LEARNERS)


def get_learner(
    method: str,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    **hyperparameters: Any,
) -> Learner:
    """The learner registered as `method`; hyperparameters: defaults < config_overrides < preset < kwargs."""
    if method not in _LEARNERS:
        raise ValueError(f"Unknown method {method!r}; choose one of {available_methods()}.")
    return _LEARNERS[method](preset=preset, config_overrides=config_overrides, **hyperparameters)


class AdaptedHead(nn.Module):
    """What adaptation learns for one task: logits = scale * cos(q A^T, P B^T).

    `prototypes` are the class means of the support features; `image_projection`
    (A) and `prototype_projection` (B) are d x d maps, None meaning identity
    (NCC). URL's single head is A = B; CoPA learns both.

    `adapters` (TSA, CoPA+TSA) are residual adapters inside the backbone, by
    convolution name (see `hf_copa.adapters`): the prototypes and the query
    features are then those of the backbone run with them,
    `backbone.extract_features(images, adapters=head.adapters)`.
    """

    def __init__(
        self,
        prototypes: torch.Tensor,
        image_projection: torch.Tensor | None = None,
        prototype_projection: torch.Tensor | None = None,
        scale: float = 10.0,
        method: str = "ncc",
        hyperparameters: dict[str, Any] | None = None,
        train_losses: Sequence[float] = (),
        adapters: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.register_buffer("image_projection", _detached(image_projection))
        self.register_buffer("prototype_projection", _detached(prototype_projection))
        # Not buffers: their names hold dots. `_apply` moves them with the module.
        self.adapters = {name: alpha.detach().clone() for name, alpha in (adapters or {}).items()}
        self.scale = float(scale)
        self.method = method
        self.hyperparameters = dict(hyperparameters or {})
        self.train_losses = [float(x) for x in train_losses]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> AdaptedHead:
        super()._apply(fn, recurse)
        self.adapters = {name: fn(alpha) for name, alpha in self.adapters.items()}
        return self

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.prototypes.shape[1]

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.image_projection is None else features @ self.image_projection.T

    def projected_prototypes(self) -> torch.Tensor:
        protos = self.prototypes
        return protos if self.prototype_projection is None else protos @ self.prototype_projection.T

    @torch.no_grad()
    def logits(self, query_features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[Nq, d] query features -> [Nq, C] logits."""
        query = as_feature_matrix(query_features, "query_features", self.feature_dim).to(self.prototypes)
        scores = cosine_scores(
            self.project_images(query).unsqueeze(0), self.projected_prototypes().unsqueeze(0), self.scale
        )
        return scores[0]

    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        return self.logits(query_features)

    def extra_repr(self) -> str:
        adapters = f", adapters={len(self.adapters)}" if self.adapters else ""
        return f"method={self.method!r}, classes={self.num_classes}, dim={self.feature_dim}{adapters}"


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


class Learner:
    """A per-task adaptation method over frozen features.

    Subclasses implement `fit_batch` over padded episodes; `fit` validates one
    episode and runs it as a batch of one, so both paths share the same maths.
    """

    name: ClassVar[str] = ""
    # True for learners that put parameters inside the backbone (TSA): they implement `fit_images`.
    needs_backbone: ClassVar[bool] = False

    # Learners registered outside hf_copa declare their defaults and presets here;
    # the built-in ones take theirs from configuration_copa (the one place for them).
    default_hyperparameters: ClassVar[dict[str, Any]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(
        self,
        preset: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        **hyperparameters: Any,
    ) -> None:
        builtin = self.name in ADAPTATION_DEFAULTS
        self.hyperparameters = resolve_hyperparameters(
            self.name,
            preset,
            config_overrides=config_overrides,
            defaults=None if builtin else self.default_hyperparameters,
            presets=None if builtin else self.presets,
            **hyperparameters,
        )

    def fit(self, support_features: torch.Tensor | np.ndarray, support_labels: Any) -> AdaptedHead:
        """Adapt to one support set (labels 0..C-1, every class present) and return its head."""
        features = as_feature_matrix(support_features, "support_features")
        labels = as_label_vector(support_labels, len(features))
        if features.dtype not in (torch.float32, torch.float64):
            features = features.to(torch.float32)
        # Unpadded: one episode runs exactly the official arithmetic (padding would shift its rounding).
        labels = labels.to(features.device)
        return self.fit_batch(features.unsqueeze(0), labels.unsqueeze(0), int(labels.max()) + 1)[0]

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[AdaptedHead]:
        """Adapt B padded episodes at once: features [B, N, d], labels [B, N] (-1 = padding)."""
        raise NotImplementedError

    def fit_images(self, backbone: nn.Module, pixel_values: torch.Tensor, support_labels: Any) -> AdaptedHead:
        """Adapt to one support set of images (learners with `needs_backbone`)."""
        raise TypeError(
            f"{self.name!r} adapts on features; use fit(backbone.extract_features(images), labels)."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hyperparameters})"


class BackboneLearner(Learner):
    """A learner that adapts parameters inside the backbone, so it needs the images, not cached features.

    Subclasses implement `fit_backbone`, which runs inside `frozen_backbone` (eval mode, no weight
    gradients) on validated pixel values and labels on the backbone's device and dtype.
    """

    needs_backbone = True

    def fit(self, support_features: Any, support_labels: Any) -> AdaptedHead:
        raise TypeError(
            f"{self.name!r} adapts the backbone itself, so it needs the support images, not features: use "
            f"CopaModel.adapt(images, labels, method={self.name!r}) or "
            f"get_learner({self.name!r}).fit_images(backbone, pixel_values, labels)."
        )

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[AdaptedHead]:
        return [self.fit(features, labels)]

    def fit_images(self, backbone: nn.Module, pixel_values: torch.Tensor, support_labels: Any) -> AdaptedHead:
        """Adapt `backbone` (a CopaModel, left unchanged) to pixel values [N, 3, H, W] with labels 0..C-1."""
        channels = backbone.config.num_channels
        if (
            not isinstance(pixel_values, torch.Tensor)
            or pixel_values.ndim != 4
            or pixel_values.shape[1] != channels
        ):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be a [N, {channels}, H, W] tensor (e.g. from CopaImageProcessor), "
                f"got {got}."
            )
        if len(pixel_values) == 0:
            raise ValueError("The support set is empty: give at least one image per class.")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values; check the image preprocessing.")
        labels = as_label_vector(support_labels, len(pixel_values), "support images")
        reference = next(backbone.parameters())
        pixel_values = pixel_values.to(
            reference.device, reference.dtype, memory_format=_adaptation_memory_format(backbone)
        )
        with frozen_backbone(backbone):
            return self.fit_backbone(backbone, pixel_values, labels.to(reference.device))

    def fit_backbone(
        self, backbone: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor
    ) -> AdaptedHead:
        raise NotImplementedError


def _adaptation_memory_format(backbone: nn.Module) -> torch.memory_format:
    """Channels-last inputs make the convolutions pick faster kernels (~20% per step on CPU), except where
    oneDNN crashes: on AVX-512 CPUs its multi-threaded backward of a channels-last 1x1 convolution (the
    adapters) with fewer than 16 channels segfaults the process (torch 2.13, measured on AMD EPYC with odd
    support-set sizes). Such narrow backbones (test-sized ones) backpropagate through NCHW inputs instead."""
    narrow = any(
        min(module.in_channels, module.out_channels) < 16
        for module in backbone.modules()
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)
    )
    cpu = next(backbone.parameters()).device.type == "cpu"
    return torch.contiguous_format if cpu and narrow else torch.channels_last


def split_heads(
    learner: Learner,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    image_projection: torch.Tensor | None = None,
    prototype_projection: torch.Tensor | None = None,
    losses: torch.Tensor | None = None,
) -> list[AdaptedHead]:
    """One head per episode of a batch ([B, ...] tensors), trimmed to the classes that episode has."""
    heads = []
    for b in range(prototypes.shape[0]):
        num_classes = int(labels[b].max()) + 1
        heads.append(
            AdaptedHead(
                prototypes[b, :num_classes],
                None if image_projection is None else image_projection[b],
                None if prototype_projection is None else prototype_projection[b],
                scale=learner.hyperparameters["scale"],
                method=learner.name,
                hyperparameters=learner.hyperparameters,
                train_losses=() if losses is None else losses[:, b].tolist(),
            )
        )
    return heads


def as_feature_matrix(features: Any, name: str, expected_dim: int | None = None) -> torch.Tensor:
    """Check a [N, d] float feature matrix and return it as a tensor."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(features)
    if not isinstance(features, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape [N, d], got {type(features).__name__}."
        )
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape [N, d], got shape {tuple(features.shape)}.")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is empty: give at least one feature vector.")
    if features.is_inference():
        features = features.clone()  # inference tensors cannot take part in autograd
    if not features.is_floating_point():
        features = features.to(torch.float32)
    if expected_dim is not None and features.shape[1] != expected_dim:
        raise ValueError(
            f"{name} have dimension {features.shape[1]} but the head was fitted on "
            f"{expected_dim}-d features; "
            "use features from the same backbone."
        )
    if not torch.isfinite(features).all():
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise ValueError(
            f"{name} contain NaN or infinite values in {bad} row(s); check the feature extractor."
        )
    return features


def as_label_vector(labels: Any, num_examples: int, examples: str = "support features") -> torch.Tensor:
    """Check integer labels 0..C-1 (C >= 2, every class present) for `num_examples` `examples`."""
    if isinstance(labels, np.ndarray | list | tuple):
        try:
            labels = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError) as err:
            raise TypeError(f"support_labels must be integers 0..C-1: {err}") from None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"support_labels must be a sequence or tensor of integers, got {type(labels).__name__}."
        )
    if labels.ndim != 1:
        raise ValueError(f"support_labels must be 1-D, got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(
            f"support_labels must be integers 0..C-1, got dtype {labels.dtype}; "
            "map other label values to indices first (CopaModel.adapt does this for you)."
        )
    if len(labels) != num_examples:
        raise ValueError(f"Got {num_examples} {examples} but {len(labels)} labels; they must match.")
    labels = labels.to(torch.long)
    if labels.min() < 0:
        raise ValueError(f"support_labels must be in 0..C-1, found {int(labels.min())}.")
    num_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"support_labels must cover every class 0..{num_classes - 1}, but classes {missing} have no "
            "support example; relabel the classes consecutively."
        )
    if num_classes < 2:
        raise ValueError(
            "The support set has a single class; few-shot classification needs at least 2 classes."
        )
    return labels
