"""`BackboneConfig`: what every few-shot backbone's config declares, whatever its network.

A backbone family (URL's ResNet-18 in `configuration_copa.py`, EfficientNet-Lite in
`configuration_efficientnet_lite.py`) subclasses it with its network's shape. The fields here are the ones the
rest of hf_copa reads from any backbone: the input contract, the per-method adaptation overrides, the
domain classifiers kept beside the weights, the training sources, and an adapted head's metadata.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

from .validation import CopaValueError, check_int


class BackboneConfig(PreTrainedConfig):
    """The fields shared by every few-shot backbone family.

    Args:
        num_channels: Channels of the input images (RGB).
        image_size: Side of the square network input; the image processor resizes to it.
        adaptation: Per-method hyperparameter overrides on top of each learner's defaults, e.g.
            `{"copa": {"lr": 0.002}}`; checked against the learner registry.
        domain_classifier_sizes: Output sizes of the per-domain linear classifiers kept beside the backbone in
            `domain_classifiers.safetensors` (URL's `cls_fn`, or those `hf-copa train` learns); None when the
            model keeps none.
        domain_classifier_domains: The domain of each of those classifiers, in the same order.
        training_domains: The sources the backbone was trained on (URL's multi-domain network: its eight;
            a single-domain network: its one; an ImageNet network: `ilsvrc_2012`); None where unknown.
        copa_head: The metadata of an adapted head (method, labels, hyperparameters, base model pin: see
            `hf_copa.heads`) when this config belongs to a saved head; None for a backbone.
    """

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 84,
        adaptation: dict[str, dict[str, Any]] | None = None,
        domain_classifier_sizes: list[int] | None = None,
        domain_classifier_domains: list[str] | None = None,
        training_domains: list[str] | None = None,
        copa_head: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_channels = num_channels
        self.image_size = image_size
        self.adaptation = copy.deepcopy(adaptation) if adaptation else {}
        self.domain_classifier_sizes = (
            None if domain_classifier_sizes is None else list(domain_classifier_sizes)
        )
        self.domain_classifier_domains = (
            None if domain_classifier_domains is None else list(domain_classifier_domains)
        )
        self.training_domains = None if training_domains is None else list(training_domains)
        self.copa_head = copy.deepcopy(copa_head)
        super().__init__(**kwargs)
        self.validate_copa()

    @property
    def feature_dim(self) -> int:
        """The size of the pooled features the backbone gives."""
        raise NotImplementedError

    def validate_copa(self) -> None:
        """Raise a `ValueError` naming the first invalid field; families extend it with their own fields."""
        name = type(self).__name__
        for field in ("num_channels", "image_size"):
            check_int(f"{name}.{field}", getattr(self, field), 1)
        self._validate_adaptation()
        sizes, domains = self.domain_classifier_sizes, self.domain_classifier_domains
        for size in sizes or []:
            check_int(f"{name}.domain_classifier_sizes (each)", size, 1)
        if domains is not None and (
            sizes is None or len(domains) != len(sizes) or not all(isinstance(d, str) and d for d in domains)
        ):
            raise CopaValueError(
                f"{name}.domain_classifier_domains must name each of the domain_classifier_sizes "
                f"({sizes!r}), got {domains!r}."
            )
        if self.training_domains is not None and not (
            self.training_domains and all(isinstance(d, str) and d for d in self.training_domains)
        ):
            raise CopaValueError(
                f"{name}.training_domains must be a non-empty list of source names, got "
                f"{self.training_domains!r}."
            )
        if self.copa_head is not None and not isinstance(self.copa_head, dict):
            raise CopaValueError(f"{name}.copa_head must be a dict or None, got {self.copa_head!r}.")

    def _validate_adaptation(self) -> None:
        from .learners.registry import learner_class

        if not isinstance(self.adaptation, dict):
            raise CopaValueError(
                f"{type(self).__name__}.adaptation must be a dict of method -> overrides, got "
                f"{self.adaptation!r}."
            )
        for method, overrides in self.adaptation.items():
            try:
                learner_class(method).check_overrides(overrides)
            except CopaValueError as err:
                raise CopaValueError(f"{type(self).__name__}.adaptation[{method!r}]: {err}") from None

    def adaptation_hyperparameters(self, method: str, preset: str | None = None, **overrides: Any) -> dict:
        """The hyperparameters `method` runs with: defaults < this config < preset < explicit overrides."""
        from .learners.registry import learner_class

        return learner_class(method).resolve_hyperparameters(preset, self.adaptation.get(method), **overrides)
