"""`CopaConfig`: the backbone's shape, its input contract, its adaptation overrides, and what it carries.

Every field is declared here (or, where every backbone has it, in `BackboneConfig`) with its default and
checked at construction; nothing is attached to a config later. Each learner's own defaults and presets live
in its file under `hf_copa/learners/`; a model's `adaptation` field overrides them per method.
"""

from __future__ import annotations

from typing import Any

from .configuration_backbone import BackboneConfig
from .validation import CopaValueError, check_int


class CopaConfig(BackboneConfig):
    """Configuration of a URL-style ResNet-18 backbone and its few-shot adaptation.

    Args:
        embedding_size: Output channels of the stem convolution.
        stem_kernel_size, stem_stride, stem_padding: The stem convolution (URL: 5x5, stride 2, padding 2;
            the released code and checkpoint use padding 2, which `url_backbone_embeddings.npz` confirms).
        stem_pool: Whether a 3x3/2 max-pool follows the stem (URL: no).
        depths: BasicBlocks per stage.
        hidden_sizes: Output channels per stage; the last one is the feature dimension.
        batch_norm_eps, batch_norm_momentum: BatchNorm settings.
        num_channels, image_size, adaptation, domain_classifier_sizes, domain_classifier_domains,
            training_domains, copa_head: as every backbone's (`hf_copa.configuration_backbone`).
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
        self.embedding_size = embedding_size
        self.stem_kernel_size = stem_kernel_size
        self.stem_stride = stem_stride
        self.stem_padding = stem_padding
        self.stem_pool = stem_pool
        self.depths = list(depths)
        self.hidden_sizes = list(hidden_sizes)
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        super().__init__(
            num_channels=num_channels,
            image_size=image_size,
            adaptation=adaptation,
            domain_classifier_sizes=domain_classifier_sizes,
            domain_classifier_domains=domain_classifier_domains,
            training_domains=training_domains,
            copa_head=copa_head,
            **kwargs,
        )

    @property
    def feature_dim(self) -> int:
        return self.hidden_sizes[-1]

    def validate_copa(self) -> None:
        """Raise a `ValueError` naming the first invalid field."""
        for name in ("embedding_size", "stem_kernel_size", "stem_stride"):
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
        super().validate_copa()
        if self.image_size < 2 * self.stem_stride * 2 ** (len(self.depths) - 1):
            raise CopaValueError(
                f"CopaConfig.image_size={self.image_size} is too small for {len(self.depths)} stages "
                f"after a stride-{self.stem_stride} stem."
            )
        if not (self.batch_norm_eps > 0):
            raise CopaValueError(f"CopaConfig.batch_norm_eps must be > 0, got {self.batch_norm_eps!r}.")


def _register_with_auto_config() -> None:
    from transformers import AutoConfig

    AutoConfig.register(CopaConfig.model_type, CopaConfig, exist_ok=True)


_register_with_auto_config()  # so that AutoConfig.from_pretrained reads model_type "copa" (see hf_copa)
