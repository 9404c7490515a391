"""Checks of what users pass in, and the errors that say what is wrong and what to do.

Every public entry point validates its inputs here, so a mistake is reported once, in words a user can act
on, before any work is done. `CopaError` marks these errors as hf_copa's own: the `hf-copa` command turns
them (and `ValueError`s from bad input) into a one-line message and exit status 2, while anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch


class CopaError(Exception):
    """Base of the errors hf_copa raises about what it was given (never about its own bugs)."""


class CopaValueError(CopaError, ValueError):
    """An input has the right type but an unusable value."""


class CopaTypeError(CopaError, TypeError):
    """An input has the wrong type."""


class CopaMissingDependency(CopaError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra."""


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int if it is an integer (not a bool) >= `minimum`, else a `CopaValueError`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise CopaValueError(f"{name} must be {kind}, got {value!r}.")
    return int(value)


def check_number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    """`value` as a float if it is a finite number (not a bool), > 0 when `positive`, >= `minimum`."""
    number = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    if (
        not number
        or not math.isfinite(value)
        or (positive and value <= 0)
        or (minimum is not None and value < minimum)
    ):
        kind = (
            "a positive number"
            if positive
            else f"a number >= {minimum:g}"
            if minimum is not None
            else "a finite number"
        )
        raise CopaValueError(f"{name} must be {kind}, got {value!r}.")
    return float(value)


def _as_tensor(value: Any, name: str, shape: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise CopaTypeError(
            f"{name} must be a torch.Tensor or numpy array of shape {shape}, got {type(value).__name__}."
        )
    return value


def _usable(value: torch.Tensor, name: str, empty: str) -> torch.Tensor:
    """Non-empty, autograd-able (not an inference tensor), floating point."""
    if value.shape[0] == 0:
        raise CopaValueError(f"{name} is empty: {empty}.")
    if value.is_inference():
        value = value.clone()  # inference tensors cannot take part in autograd
    return value if value.is_floating_point() else value.to(torch.float32)


def _check_finite(value: torch.Tensor, name: str, items: str, advice: str) -> torch.Tensor:
    if not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).flatten(1).any(dim=1).sum())
        raise CopaValueError(f"{name} contain NaN or infinite values in {bad} {items}; {advice}.")
    return value


def as_feature_matrix(features: Any, name: str, expected_dim: int | None = None) -> torch.Tensor:
    """Check a [N, d] float feature matrix and return it as a tensor."""
    features = _as_tensor(features, name, "[N, d]")
    if features.ndim != 2:
        raise CopaValueError(f"{name} must have shape [N, d], got shape {tuple(features.shape)}.")
    features = _usable(features, name, "give at least one feature vector")
    if expected_dim is not None and features.shape[1] != expected_dim:
        raise CopaValueError(
            f"{name} have dimension {features.shape[1]} but the head was fitted on {expected_dim}-d "
            "features; use features from the same backbone."
        )
    return _check_finite(features, name, "row(s)", "check the feature extractor")


def as_feature_maps(maps: Any, name: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
    """Check [N, d, h, w] float feature maps (a backbone's last stage before pooling); `expected` is
    (d, h, w) when a head was fitted on maps of that shape."""
    maps = _as_tensor(maps, name, "[N, d, h, w]")
    if maps.ndim != 4:
        hint = " (pooled features; this method needs the maps before pooling)" if maps.ndim == 2 else ""
        raise CopaValueError(
            f"{name} must be feature maps of shape [N, d, h, w]{hint}, got shape {tuple(maps.shape)}; "
            "extract them with CopaModel.extract_features(images, spatial=True)."
        )
    maps = _usable(maps, name, "give at least one feature map")
    if expected is not None and tuple(maps.shape[1:]) != tuple(expected):
        raise CopaValueError(
            f"{name} have shape {tuple(maps.shape[1:])} per image but the head was fitted on maps of shape "
            f"{tuple(expected)}; use maps from the same backbone at the same image size."
        )
    return _check_finite(maps, name, "map(s)", "check the extractor")


def as_feature_stack(features: Any, name: str, expected: tuple[int, int] | None = None) -> torch.Tensor:
    """Check [N, B, d] float features of B backbones (a `CopaBackboneSet`'s); `expected` is (B, d) when a
    head was fitted on features of that shape."""
    features = _as_tensor(features, name, "[N, B, d]")
    if features.ndim != 3:
        hint = " (one backbone's features; this method combines several)" if features.ndim == 2 else ""
        raise CopaValueError(
            f"{name} must be features of several backbones, shape [N, B, d]{hint}, got shape "
            f"{tuple(features.shape)}; extract them with CopaBackboneSet.extract_features(images)."
        )
    features = _usable(features, name, "give at least one image's features")
    if expected is not None and tuple(features.shape[1:]) != tuple(expected):
        raise CopaValueError(
            f"{name} have shape {tuple(features.shape[1:])} per image (backbones, dim), the head was fitted "
            f"on {tuple(expected)}; use features of the same backbone set."
        )
    return _check_finite(features, name, "row(s)", "check the extractor")


def as_label_vector(labels: Any, num_examples: int, examples: str = "support features") -> torch.Tensor:
    """Check integer labels 0..C-1 (C >= 2, every class present) for `num_examples` `examples`."""
    if isinstance(labels, np.ndarray | list | tuple):
        try:
            labels = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError) as err:
            raise CopaTypeError(f"support_labels must be integers 0..C-1: {err}") from None
    if not isinstance(labels, torch.Tensor):
        raise CopaTypeError(
            f"support_labels must be a sequence or tensor of integers, got {type(labels).__name__}."
        )
    if labels.ndim != 1:
        raise CopaValueError(f"support_labels must be 1-D, got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise CopaTypeError(
            f"support_labels must be integers 0..C-1, got dtype {labels.dtype}; "
            "map other label values to indices first (CopaModel.adapt does this for you)."
        )
    if len(labels) != num_examples:
        raise CopaValueError(f"Got {num_examples} {examples} but {len(labels)} labels; they must match.")
    labels = labels.to(torch.long)
    if labels.min() < 0:
        raise CopaValueError(f"support_labels must be in 0..C-1, found {int(labels.min())}.")
    num_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise CopaValueError(
            f"support_labels must cover every class 0..{num_classes - 1}, but classes {missing} have no "
            "support example; relabel the classes consecutively."
        )
    if num_classes < 2:
        raise CopaValueError(
            "The support set has a single class; few-shot classification needs at least 2 classes."
        )
    return labels


def as_pixel_values(pixel_values: Any, channels: int) -> torch.Tensor:
    """Check support pixel values: a non-empty, finite float [N, channels, H, W] tensor (as from
    `CopaImageProcessor`)."""
    if (
        not isinstance(pixel_values, torch.Tensor)
        or pixel_values.ndim != 4
        or pixel_values.shape[1] != channels
        or not pixel_values.is_floating_point()
    ):
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise CopaValueError(
            f"pixel_values must be a float [N, {channels}, H, W] tensor (e.g. from CopaImageProcessor), "
            f"got {got}."
        )
    if len(pixel_values) == 0:
        raise CopaValueError("The support set is empty: give at least one image per class.")
    if not torch.isfinite(pixel_values).all():
        raise CopaValueError("pixel_values contain NaN or infinite values; check the image preprocessing.")
    return pixel_values


def class_order(labels: Sequence[Hashable]) -> list[Hashable]:
    """The distinct labels of a support set, sorted when comparable, else in order of first appearance."""
    if len(labels) == 0:
        raise CopaValueError("The support set is empty: give at least one image per class.")
    try:
        distinct = list(dict.fromkeys(labels))
    except TypeError as err:
        raise CopaTypeError(f"Support labels must be hashable (str, int, ...): {err}") from None
    try:
        if len({type(label) for label in distinct}) == 1:
            distinct = sorted(distinct)
    except TypeError:
        pass
    if len(distinct) < 2:
        raise CopaValueError(
            f"The support set has a single class ({distinct[0]!r}); few-shot classification needs at least 2."
        )
    return distinct
