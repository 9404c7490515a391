"""The learner contract: what every method declares, and the two ways it adapts (features or backbone).

A learner file holds the whole truth about its method: its maths (`fit_batch`, or `fit_backbone` for
methods that adapt the backbone itself), `default_hyperparameters`, named `presets` (the papers' settings)
and a one-line `description`, and it registers itself with `@register_learner(name)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..frozen import frozen_backbone
from ..heads import AdaptedHead, LinearHead
from ..validation import (
    CopaTypeError,
    CopaValueError,
    as_feature_maps,
    as_feature_matrix,
    as_feature_stack,
    as_label_vector,
    as_pixel_values,
)

SMALL_RESNET_NAME = "hf_copa:copa-mdl-small"  # `hf_copa.bundled.SMALL_RESNET` (bundled imports no learner)

# What a backbone can give a learner (`FewShotBackbone.offers`; a backbone set offers its members' features).
FEATURES = "features"  # pooled features [N, d]
MAPS = "maps"  # the last feature map before pooling [N, d, h, w]
RESIDUAL_ADAPTERS = "residual-adapters"  # TSA's 1x1 adapters beside the 3x3 block convolutions of a ResNet
CAPABILITY_WORDS = {
    FEATURES: "pooled features",
    MAPS: "feature maps before pooling",
    RESIDUAL_ADAPTERS: "residual-adapter points (TSA's adapters beside a ResNet's 3x3 block convolutions)",
}

# What a hyperparameter of a given name must be, whichever learner declares it.
HYPERPARAMETER_RULES: dict[str, str] = {
    "steps": "a non-negative integer",
    "seed": "a non-negative integer",
    "heads": "a positive integer",
    "blocks": "a positive integer",
    "lr": "a finite positive number",
    "lr_beta": "a finite positive number",
    "lr_times_classes": "a finite positive number",
    "scale": "a finite positive number",
    "adapter_lr_scale": "a finite positive number",
    "beta": "a finite positive number",
    "weight_decay": "a finite number >= 0",
    "tau": "a finite number",
    "optimizer": "one of 'adam', 'gd'",
    "classifier": "one of 'linear', 'cosine'",
    "weight_norm": "true or false",
    "urt_head": "a folder or Hub id (a string)",
}


def _obeys(rule: str, value: Any) -> bool:
    if rule.startswith("one of "):
        return isinstance(value, str) and f"'{value}'" in rule.removeprefix("one of ").split(", ")
    if rule == "true or false":
        return isinstance(value, bool)
    if rule == "a folder or Hub id (a string)":
        return value is None or (isinstance(value, str) and bool(value))  # None: required when fitting
    integer = isinstance(value, int) and not isinstance(value, bool)
    if rule == "a non-negative integer":
        return integer and value >= 0
    if rule == "a positive integer":
        return integer and value > 0
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if rule == "a finite positive number":
        return number and value > 0
    if rule == "a finite number >= 0":
        return number and value >= 0
    return number


class Learner:
    """A per-task adaptation method over frozen features.

    Subclasses implement `fit_batch` over padded episodes; `fit` validates one episode and runs it as a
    batch of one, so both paths share the same maths. They declare `default_hyperparameters`, `presets`
    (named overrides of some defaults) and a one-line `description`; hyperparameters resolve as
    defaults < a model's `CopaConfig.adaptation` < preset < keyword arguments, every name and value checked.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_hyperparameters: ClassVar[dict[str, Any]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # True for learners that put parameters inside the backbone (TSA): they adapt on images.
    needs_backbone: ClassVar[bool] = False
    # What the backbone must offer beyond pooled features (`RESIDUAL_ADAPTERS` for TSA); a learner with
    # `feature_kind = "maps"` needs `MAPS` too.
    requires: ClassVar[frozenset[str]] = frozenset()
    # What a feature learner fits on: "pooled" features [N, d], the last stage's "maps" [N, d, h, w]
    # before pooling (CoPA's transformer head; evaluation extracts and caches maps only for it), or
    # "backbones": a `CopaBackboneSet`'s [N, B, d] (SUR, URT).
    feature_kind: ClassVar[str] = "pooled"
    # The linear maps the head applies before its cosine rule: "shared" (one Θ for images and prototypes),
    # "separate" (Θ_I and Θ_P), or None (no learned map); what `hf_copa.analysis` can analyse.
    linear_maps: ClassVar[str | None] = None
    # Called as observer(step, image_map, prototype_map) with the [B, d, d] maps before the first step and
    # after each one, by learners that can report them (url, copa); None (the default) costs nothing.
    step_observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def __init__(
        self,
        preset: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        **hyperparameters: Any,
    ) -> None:
        self.hyperparameters = self.resolve_hyperparameters(preset, config_overrides, **hyperparameters)

    @classmethod
    def resolve_hyperparameters(
        cls, preset: str | None = None, config_overrides: Mapping[str, Any] | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """Merge defaults, config overrides, a named preset and keyword overrides, checking every name."""
        merged = dict(cls.default_hyperparameters)
        merged.update(config_overrides or {})
        if preset is not None:
            if preset not in cls.presets:
                raise CopaValueError(
                    f"Unknown preset {preset!r} for method {cls.name!r}; choose one of {sorted(cls.presets)}."
                )
            merged.update(cls.presets[preset])
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - set(merged)
        if unknown:
            raise CopaTypeError(
                f"Method {cls.name!r} takes no hyperparameter(s) {sorted(unknown)}; valid: {sorted(merged)}."
            )
        merged.update(given)
        cls.check_hyperparameters(merged)
        return merged

    @classmethod
    def check_hyperparameters(cls, hyperparameters: Mapping[str, Any]) -> None:
        """Raise a `CopaValueError` naming the first hyperparameter with an unusable value."""
        for name, value in hyperparameters.items():
            rule = HYPERPARAMETER_RULES.get(name)
            if rule is not None and not _obeys(rule, value):
                raise CopaValueError(f"{cls.name}: {name} must be {rule}, got {value!r}.")

    @classmethod
    def check_overrides(cls, overrides: Any) -> None:
        """Check a model's `CopaConfig.adaptation[name]`: known hyperparameters with usable values."""
        if not isinstance(overrides, Mapping):
            raise CopaValueError(f"must map hyperparameter names to values, got {overrides!r}.")
        unknown = set(overrides) - set(cls.default_hyperparameters)
        if unknown:
            raise CopaValueError(
                f"has unknown hyperparameters {sorted(unknown)}; "
                f"valid: {sorted(cls.default_hyperparameters)}."
            )
        cls.check_hyperparameters({**cls.default_hyperparameters, **overrides})

    def fit(self, support_features: torch.Tensor | np.ndarray, support_labels: Any) -> AdaptedHead:
        """Adapt to one support set (labels 0..C-1, every class present) and return its head."""
        features = self.check_features(support_features, "support_features")
        labels = as_label_vector(support_labels, len(features))
        if features.dtype not in (torch.float32, torch.float64):
            features = features.to(torch.float32)
        # Unpadded: one episode runs exactly the official arithmetic (padding would shift its rounding).
        labels = labels.to(features.device)
        head = self.fit_batch(features.unsqueeze(0), labels.unsqueeze(0), int(labels.max()) + 1)[0]
        return self.check_converged([head])[0]

    def check_model(self, model: Any) -> None:
        """Refuse a model this learner cannot use, before any image is read: a backbone set for a one-backbone
        method, one backbone for a method that combines several, and a backbone that lacks what the method
        needs (`requires`: TSA's residual adapters on EfficientNet-Lite). URT also checks its layer's set."""
        problem = self.model_problem(model)
        if problem is not None:
            raise CopaValueError(problem)

    @classmethod
    def model_problem(cls, model: Any) -> str | None:
        """Why this method cannot run on `model` (a backbone or a backbone set), or None when it can."""
        several = callable(getattr(model, "feature_members", None))
        if several and cls.feature_kind != "backbones":
            return (
                f"{cls.name!r} works on one backbone, but the model is a set of "
                f"{len(model.feature_members())} backbones; use a several-backbone method (sur, urt) on the "
                "set, or pass one of its backbones."
            )
        if not several and cls.feature_kind == "backbones":
            return (
                f"{cls.name!r} combines several backbones, but the model is one backbone; pass a backbone "
                "set (CopaBackboneSet, written by `hf-copa bundle`)."
            )
        missing = cls.missing_capabilities(model)
        if missing:
            family = getattr(model, "family_name", type(model).__name__)
            return (
                f"{cls.name!r} needs a backbone with {' and '.join(CAPABILITY_WORDS[m] for m in missing)}, "
                f"which this {family} backbone does not have; run it on URL's ResNet-18 (hf-copa convert "
                f"of URL's checkpoint, or {SMALL_RESNET_NAME}), or choose a method this backbone serves "
                f"({', '.join(methods_for(model))})."
            )
        return None

    @classmethod
    def missing_capabilities(cls, model: Any) -> list[str]:
        """What this method needs that `model` does not offer (`FewShotBackbone.offers`)."""
        needed = set(cls.requires) | ({MAPS} if cls.feature_kind == "maps" else set())
        return sorted(needed - set(getattr(model, "offers", needed)))

    def observed(self, image_map: torch.Tensor, prototype_map: torch.Tensor) -> Callable[[int], None] | None:
        """`run_steps`' `after_step` that shows these maps to `step_observer`, or None without one."""
        observer = self.step_observer
        if observer is None:
            return None
        return lambda step: observer(step, image_map.detach(), prototype_map.detach())

    def check_converged(self, heads: list[AdaptedHead]) -> list[AdaptedHead]:
        """Refuse heads whose optimisation diverged (a non-finite loss or parameter), naming the fix, rather
        than return a classifier that answers NaN. An official learning rate tuned for another backbone can
        do this (fo-Proto-MAML's all-layers inner loop on the bundled model, for one)."""
        for head in heads:
            losses = np.asarray(head.train_losses, dtype=float)
            bad_step = int(np.flatnonzero(~np.isfinite(losses))[0]) if not np.isfinite(losses).all() else None
            tensors = [head.prototypes, *head.rule_tensors().values(), *head.backbone_weights.values()]
            tensors += list(head.adapters.values())
            if bad_step is None and all(t is None or bool(torch.isfinite(t).all()) for t in tensors):
                continue
            where = (
                f"its support loss became {losses[bad_step]} at step {bad_step + 1} of {len(losses)}"
                if bad_step is not None
                else "its parameters became NaN or infinite"
            )
            lr = self.hyperparameters.get("lr")
            advice = (
                f"the learning rate (lr={lr:g}) is too high for these features; pass a lower one (lr=..., "
                "--lr on the command line)"
                if lr is not None
                else "check the support features"
            )
            raise CopaValueError(f"{self.name} diverged: {where}; {advice}.")
        return heads

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[AdaptedHead]:
        """Adapt B padded episodes at once: features [B, N, d] (maps: [B, N, d, h, w]), labels [B, N]
        (-1 = padding)."""
        raise NotImplementedError

    @classmethod
    def check_features(
        cls, features: Any, name: str, expected: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """The features this learner fits on, checked: [N, d], maps [N, d, h, w] (feature_kind "maps"), or
        several backbones' [N, B, d] (feature_kind "backbones")."""
        if cls.feature_kind == "maps":
            return as_feature_maps(features, name, expected)
        if cls.feature_kind == "backbones":
            return as_feature_stack(features, name, expected)
        return as_feature_matrix(features, name, None if expected is None else expected[0])

    def fit_images(self, backbone: nn.Module, pixel_values: torch.Tensor, support_labels: Any) -> AdaptedHead:
        """Adapt to one support set of images (learners with `needs_backbone`)."""
        raise CopaTypeError(
            f"{self.name!r} adapts on features; use fit(backbone.extract_features(images), labels)."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hyperparameters})"


class BackboneLearner(Learner):
    """A learner that adapts parameters inside the backbone, so it needs the images, not cached features.

    Subclasses implement `fit_backbone`, which runs inside `frozen_backbone` (BatchNorm on its running
    statistics) on validated pixel values and labels on the backbone's device and dtype, and returns the head
    with the support features of the adapted backbone it computed its prototypes from. The pretrained
    weights are never changed and get no gradients: the optimisers step the adapters and heads only.
    """

    needs_backbone = True

    def fit(self, support_features: Any, support_labels: Any) -> AdaptedHead:
        raise CopaTypeError(
            f"{self.name!r} adapts the backbone itself, so it needs the support images, not features: use "
            f"CopaModel.adapt(images, labels, method={self.name!r}) or "
            f"get_learner({self.name!r}).fit_images(backbone, pixel_values, labels)."
        )

    def fit_batch(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[AdaptedHead]:
        return [self.fit(features, labels)]

    def fit_images(self, backbone: nn.Module, pixel_values: torch.Tensor, support_labels: Any) -> AdaptedHead:
        """Adapt `backbone` (a CopaModel, left unchanged) to pixel values [N, 3, H, W] with labels 0..C-1."""
        return self.adapt_backbone(backbone, pixel_values, support_labels)[0]

    def adapt_backbone(
        self, backbone: nn.Module, pixel_values: torch.Tensor, support_labels: Any
    ) -> tuple[AdaptedHead, torch.Tensor]:
        """As `fit_images`, also returning the support features [N, d] of the adapted backbone."""
        pixel_values = as_pixel_values(pixel_values, backbone.config.num_channels)
        labels = as_label_vector(support_labels, len(pixel_values), "support images")
        reference = next(backbone.parameters())
        pixel_values = pixel_values.to(
            reference.device, reference.dtype, memory_format=_adaptation_memory_format(backbone)
        )
        with frozen_backbone(backbone):
            head, features = self.fit_backbone(backbone, pixel_values, labels.to(reference.device))
        self.check_converged([head])
        return head, features.detach()

    def fit_backbone(
        self, backbone: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor
    ) -> tuple[AdaptedHead, torch.Tensor]:
        raise NotImplementedError


def methods_for(model: Any) -> list[str]:
    """The registered methods `model` (a backbone or a backbone set) can run, sorted."""
    from .registry import available_methods, learner_class

    several = callable(getattr(model, "feature_members", None))
    return [
        method
        for method in available_methods()
        if (learner_class(method).feature_kind == "backbones") == several
        and not learner_class(method).missing_capabilities(model)
    ]


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


def trainable_copies(backbone: torch.nn.Module, exclude: tuple[type, ...] = ()) -> dict[str, torch.Tensor]:
    """Detached trainable copies of the backbone's parameters by name (those of `exclude` modules left out):
    what a learner that fine-tunes the backbone optimises and passes as `weights=`."""
    skipped = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in backbone.named_modules()
        if isinstance(module, exclude)
        for name, _ in module.named_parameters(recurse=False)
    }
    return {
        name: parameter.detach().clone().requires_grad_(True)
        for name, parameter in backbone.named_parameters()
        if name not in skipped
    }


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


def split_linear_heads(
    learner: Learner,
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    losses: torch.Tensor,
    **rule: Any,
) -> list[LinearHead]:
    """As `split_heads`, for linear classifiers: weight [B, C, d], bias [B, C] (None: none); `rule` holds
    `LinearHead`'s other arguments (cosine, scale, backbone_weights)."""
    heads = []
    for b in range(prototypes.shape[0]):
        num_classes = int(labels[b].max()) + 1
        heads.append(
            LinearHead(
                prototypes[b, :num_classes],
                weight[b, :num_classes],
                None if bias is None else bias[b, :num_classes],
                method=learner.name,
                hyperparameters=learner.hyperparameters,
                train_losses=losses[:, b].tolist(),
                **rule,
            )
        )
    return heads


__all__ = [
    "CAPABILITY_WORDS",
    "FEATURES",
    "HYPERPARAMETER_RULES",
    "MAPS",
    "RESIDUAL_ADAPTERS",
    "BackboneLearner",
    "Learner",
    "methods_for",
    "split_heads",
    "split_linear_heads",
]
