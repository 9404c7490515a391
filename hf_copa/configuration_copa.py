"""`CopaConfig`: the backbone's shape, its input contract, its adaptation overrides, and what it carries.

Every field is declared here with its default and checked at construction; nothing is attached to a config
later. Each learner's own defaults and presets live in its file under `hf_copa/learners/`; a model's
`adaptation` field overrides them per method.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

from .validation import CopaValueError, check_int


class CopaConfig(PreTrainedConfig):
    """Configuration of a URL-style ResNet-18 backbone and its few-shot adaptation.

    Args:
        num_channels: Channels of the input images (RGB).
        embedding_size: Output channels of the stem convolution.
        stem_kernel_size, stem_stride, stem_padding: The stem convolution (URL: 5x5, stride 2, padding 2;
            the released code and checkpoint use padding 2, which `url_backbone_embeddings.npz` confirms).
        stem_pool: Whether a 3x3/2 max-pool follows the stem (URL: no).
        depths: BasicBlocks per stage.
        hidden_sizes: Output channels per stage; the last one is the feature dimension.
        image_size: Side of the square network input.
        batch_norm_eps, batch_norm_momentum: BatchNorm settings.
        adaptation: Per-method hyperparameter overrides on top of each learner's defaults, e.g.
            `{"copa": {"lr": 0.002}}`; checked against the learner registry.
        domain_classifier_sizes: Output sizes of the per-domain linear classifiers kept beside the backbone in
            `domain_classifiers.safetensors` (URL's `cls_fn`, or those `hf-copa train` learns); None when the
            model keeps none.
        domain_classifier_domains: The domain of each of those classifiers, in the same order.
        training_domains: The sources the backbone was trained on (URL's multi-domain network: its eight;
            a single-domain network: its one); None where unknown.
        copa_head: The metadata of an adapted head (method, labels, hyperparameters, base model pin: see
            `hf_copa.heads`) when this config belongs to a saved head; None for a backbone.
    """

    model_type = "copa"

    def __init__(
        self,
        num_channels: int = 3,
        embedding_size: int = 64,
        stem_kernel_size: int = 5,
        stem_stride: int = 2,
        stem_padding: int = 2,
        stem_pool: bool = False,
        depths: list[int] | tuple[int, ...] = (2, 2, 2, 2),
        hidden_sizes: list[int] | tuple[int, ...] = (64, 128, 256, 512),
        image_size: int = 84,
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float = 0.1,
        adaptation: dict[str, dict[str, Any]] | None = None,
        domain_classifier_sizes: list[int] | None = None,
        domain_classifier_domains: list[str] | None = None,
        training_domains: list[str] | None = None,
        copa_head: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_channels = num_channels
        self.embedding_size = embedding_size
        self.stem_kernel_size = stem_kernel_size
        self.stem_stride = stem_stride
        self.stem_padding = stem_padding
        self.stem_pool = stem_pool
        self.depths = list(depths)
        self.hidden_sizes = list(hidden_sizes)
        self.image_size = image_size
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
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
        return self.hidden_sizes[-1]

    def validate_copa(self) -> None:
        """Raise a `ValueError` naming the first invalid field."""
        for name in ("num_channels", "embedding_size", "stem_kernel_size", "stem_stride", "image_size"):
            check_int(f"CopaConfig.{name}", getattr(self, name), 1)
        check_int("CopaConfig.stem_padding", self.stem_padding, 0)
        for name in ("depths", "hidden_sizes"):
            values = getattr(self, name)
            if len(values) != len(self.depths) or not values:
                raise CopaValueError(
                    f"CopaConfig.{name} must hold one positive integer per stage, got {values!r}."
                )
            for value in values:
                check_int(f"CopaConfig.{name} (each)", value, 1)
        if self.image_size < 2 * self.stem_stride * 2 ** (len(self.depths) - 1):
            raise CopaValueError(
                f"CopaConfig.image_size={self.image_size} is too small for {len(self.depths)} stages "
                f"after a stride-{self.stem_stride} stem."
            )
        if not (self.batch_norm_eps > 0):
            raise CopaValueError(f"CopaConfig.batch_norm_eps must be > 0, got {self.batch_norm_eps!r}.")
        self._validate_adaptation()
        sizes, domains = self.domain_classifier_sizes, self.domain_classifier_domains
        for size in sizes or []:
            check_int("CopaConfig.domain_classifier_sizes (each)", size, 1)
        if domains is not None and (
            sizes is None or len(domains) != len(sizes) or not all(isinstance(d, str) and d for d in domains)
        ):
            raise CopaValueError(
                "CopaConfig.domain_classifier_domains must name each of the domain_classifier_sizes "
                f"({sizes!r}), got {domains!r}."
            )
        if self.training_domains is not None and not (
            self.training_domains and all(isinstance(d, str) and d for d in self.training_domains)
        ):
            raise CopaValueError(
                f"CopaConfig.training_domains must be a non-empty list of source names, got "
                f"{self.training_domains!r}."
            )
        if self.copa_head is not None and not isinstance(self.copa_head, dict):
            raise CopaValueError(f"CopaConfig.copa_head must be a dict or None, got {self.copa_head!r}.")

    def _validate_adaptation(self) -> None:
        from .learners.registry import learner_class

        if not isinstance(self.adaptation, dict):
            raise CopaValueError(
                f"CopaConfig.adaptation must be a dict of method -> overrides, got {self.adaptation!r}."
            )
        for method, overrides in self.adaptation.items():
            try:
                learner_class(method).check_overrides(overrides)
            except CopaValueError as err:
                raise CopaValueError(f"CopaConfig.adaptation[{method!r}]: {err}") from None

    def adaptation_hyperparameters(self, method: str, preset: str | None = None, **overrides: Any) -> dict:
        """The hyperparameters `method` runs with: defaults < this config < preset < explicit overrides."""
        from .learners.registry import learner_class

        return learner_class(method).resolve_hyperparameters(preset, self.adaptation.get(method), **overrides)


def _register_with_auto_config() -> None:
    from transformers import AutoConfig

    AutoConfig.register(CopaConfig.model_type, CopaConfig, exist_ok=True)


_register_with_auto_config()  # so that AutoConfig.from_pretrained reads model_type "copa" (see hf_copa)
