"""The registry of learners by name: the only list of methods.

A learner registers itself in the file that defines it (`@register_learner("copa")`), with its defaults, its
named presets and a one-line description declared beside its maths. Everything that lists or checks methods
asks this registry: `available_methods()`, the CLI's method choices and hyperparameter flags, the Space's
method list, the validation of `CopaConfig.adaptation`, and the read-only tables `ADAPTATION_DEFAULTS` /
`ADAPTATION_PRESETS`. This module imports no other part of hf_copa, so any module may ask it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from ..validation import CopaValueError

_LEARNERS: dict[str, type] = {}
DEFAULT_METHOD = "copa"


def register_learner(name: str) -> Callable[[type], type]:
    """Class decorator: make a `Learner` subclass available as `method=name` everywhere."""

    def decorate(cls: type) -> type:
        if name in _LEARNERS:
            raise ValueError(f"A learner named {name!r} is already registered.")
        cls.name = name
        _LEARNERS[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Every registered method, sorted."""
    return sorted(_LEARNERS)


def one_backbone_methods() -> list[str]:
    """Every registered method that adapts on one backbone (not on a `CopaBackboneSet`'s [N, B, d]), sorted:
    what a single `CopaModel`, the Space and `pipeline` can use."""
    return [m for m in available_methods() if getattr(_LEARNERS[m], "feature_kind", "pooled") != "backbones"]


def learner_class(method: str) -> type:
    """The class registered as `method`; a `CopaValueError` naming the known methods otherwise."""
    if method not in _LEARNERS:
        raise CopaValueError(f"Unknown method {method!r}; choose one of {available_methods()}.")
    return _LEARNERS[method]


def get_learner(
    method: str,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    **hyperparameters: Any,
) -> Any:
    """The learner registered as `method`; hyperparameters: defaults < config_overrides < preset < kwargs."""
    return learner_class(method)(preset=preset, config_overrides=config_overrides, **hyperparameters)


def method_descriptions(one_backbone: bool = False) -> dict[str, str]:
    """Method -> its one-line description, the default method first (the Space lists them so); with
    `one_backbone`, only the methods a single backbone serves."""
    names = one_backbone_methods() if one_backbone else list(_LEARNERS)
    order = sorted(names, key=lambda name: (name != DEFAULT_METHOD, name))
    return {name: getattr(_LEARNERS[name], "description", "") or name for name in order}


def hyperparameter_names() -> dict[str, dict[str, Any]]:
    """Hyperparameter -> {method: its default} over every registered method (the CLI's flags)."""
    names: dict[str, dict[str, Any]] = {}
    for method in available_methods():
        for name, value in _LEARNERS[method].default_hyperparameters.items():
            names.setdefault(name, {})[method] = value
    return dict(sorted(names.items()))


class _RegistryTable(Mapping):
    """A read-only, live view of one class attribute of every registered learner."""

    def __init__(self, attribute: str) -> None:
        self._attribute = attribute

    def __getitem__(self, method: str) -> Mapping[str, Any]:
        if method not in _LEARNERS:
            raise KeyError(method)
        return _frozen(getattr(_LEARNERS[method], self._attribute))

    def __iter__(self) -> Iterator[str]:
        return iter(available_methods())

    def __len__(self) -> int:
        return len(_LEARNERS)

    def __repr__(self) -> str:
        return repr({method: dict(self[method]) for method in self})


def _frozen(table: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({k: _frozen(v) if isinstance(v, Mapping) else v for k, v in table.items()})


# Each learner's defaults, and its named settings from the papers: read-only views of what the learners
# declare (edit a learner's file, or a model's `CopaConfig.adaptation`, to change them).
ADAPTATION_DEFAULTS: Mapping[str, Mapping[str, Any]] = _RegistryTable("default_hyperparameters")
ADAPTATION_PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = _RegistryTable("presets")


def shown_value(value: Any) -> str:
    """A hyperparameter as people write it: `true` / `false`, numbers in `%g`, words as they are."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, int | float) else str(value)
