"""`CopaConfig`: the backbone's shape, its input contract, and every adaptation default.

The adaptation hyperparameters live here and nowhere else: learners, the CLI,
evaluation and the Space all resolve them through `resolve_hyperparameters`.
Named presets replace the official code's branches on dataset names.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PreTrainedConfig

# Defaults of each learner, as in the official code (see ../shared/reference/README.md).
ADAPTATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "ncc": {"scale": 10.0},
    # URL's pre-classifier alignment (models/pa.py): 40 Adadelta steps, cosine NCC.
    "url": {"steps": 40, "lr": 1.0, "scale": 10.0},
    # CoPA (models/adaptation.py::pa_adaptation, linear heads): 50 Adam steps.
    "copa": {"steps": 50, "lr": 1e-3, "weight_decay": 0.1, "tau": 2.0, "scale": 10.0},
    # URL's TSA (models/tsa.py, `alpha+beta`, residual matrix adapters): 40 Adadelta steps, lr for the
    # adapters (alpha), lr_beta for the pre-classifier head (beta); the default is the unseen-domain setting.
    "tsa": {"steps": 40, "lr": 0.5, "lr_beta": 1.0, "scale": 10.0},
    # CoPA+TSA (models/adaptation.py::tsa_adaptation): 40 Adam steps, heads at lr, adapters at
    # lr * adapter_lr_scale, one weight decay for all.
    "copa+tsa": {
        "steps": 40,
        "lr": 1e-3,
        "adapter_lr_scale": 0.1,
        "weight_decay": 0.1,
        "tau": 2.0,
        "scale": 10.0,
    },
}

# Named settings from the papers. Each overrides some defaults of one method.
ADAPTATION_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "url": {
        "seen": {"lr": 0.1},  # domains the backbone was trained on
        "unseen": {"lr": 1.0},  # new domains (the default)
    },
    "copa": {
        "default": {},
        "high-lr": {"lr": 5e-3, "weight_decay": 0.0},  # the paper's MNIST / Traffic Sign setting
    },
    "ncc": {"default": {}},
    "tsa": {
        "seen": {"lr": 0.05, "lr_beta": 0.1},
        "unseen": {"lr": 0.5, "lr_beta": 1.0},  # the default
    },
    # The paper's settings; the official code picks them by dataset name and divides lr by 10 in the
    # 5-way 1-shot setting (the `*1-shot` presets).
    "copa+tsa": {
        "default": {},
        "high-lr": {"lr": 5e-3, "adapter_lr_scale": 0.5, "weight_decay": 0.0},  # MNIST, Traffic Sign
        "high-lr-wd": {"lr": 5e-3, "adapter_lr_scale": 0.5},  # CIFAR-10, CIFAR-100
        "1-shot": {"lr": 1e-4},
        "high-lr-1-shot": {"lr": 5e-4, "adapter_lr_scale": 0.5, "weight_decay": 0.0},
        "high-lr-wd-1-shot": {"lr": 5e-4, "adapter_lr_scale": 0.5},
    },
}


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
        adaptation: Per-method hyperparameter overrides on top of `ADAPTATION_DEFAULTS`.
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
        super().__init__(**kwargs)
        self.validate_copa()

    @property
    def feature_dim(self) -> int:
        return self.hidden_sizes[-1]

    def validate_copa(self) -> None:
        """Raise a `ValueError` naming the first invalid field."""
        for name in ("num_channels", "embedding_size", "stem_kernel_size", "stem_stride", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CopaConfig.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.stem_padding, int) or self.stem_padding < 0:
            raise ValueError(
                f"CopaConfig.stem_padding must be a non-negative integer, got {self.stem_padding!r}."
            )
        if not self.depths or any(not isinstance(d, int) or d < 1 for d in self.depths):
            raise ValueError(
                f"CopaConfig.depths must be a non-empty list of positive integers, got {self.depths!r}."
            )
        if len(self.hidden_sizes) != len(self.depths) or any(
            not isinstance(w, int) or w < 1 for w in self.hidden_sizes
        ):
            raise ValueError(
                "CopaConfig.hidden_sizes must hold one positive integer per stage "
                f"({len(self.depths)} stages), got {self.hidden_sizes!r}."
            )
        if self.image_size < 2 * self.stem_stride * 2 ** (len(self.depths) - 1):
            raise ValueError(
                f"CopaConfig.image_size={self.image_size} is too small for {len(self.depths)} stages "
                f"after a stride-{self.stem_stride} stem."
            )
        if not (self.batch_norm_eps > 0):
            raise ValueError(f"CopaConfig.batch_norm_eps must be > 0, got {self.batch_norm_eps!r}.")
        if not isinstance(self.adaptation, dict):
            raise ValueError(
                f"CopaConfig.adaptation must be a dict of method -> overrides, got {self.adaptation!r}."
            )
        for method, overrides in self.adaptation.items():
            if method not in ADAPTATION_DEFAULTS:
                raise ValueError(
                    f"CopaConfig.adaptation names unknown method {method!r}; "
                    f"known: {sorted(ADAPTATION_DEFAULTS)}."
                )
            unknown = set(overrides) - set(ADAPTATION_DEFAULTS[method])
            if unknown:
                raise ValueError(
                    f"CopaConfig.adaptation[{method!r}] has unknown hyperparameters {sorted(unknown)}; "
                    f"valid: {sorted(ADAPTATION_DEFAULTS[method])}."
                )
            try:
                check_hyperparameters(method, {**ADAPTATION_DEFAULTS[method], **overrides})
            except ValueError as err:
                raise ValueError(f"CopaConfig.adaptation[{method!r}]: {err}") from None

    def adaptation_hyperparameters(self, method: str, preset: str | None = None, **overrides: Any) -> dict:
        """The hyperparameters `method` runs with: defaults < this config < preset < explicit overrides."""
        return resolve_hyperparameters(
            method, preset, config_overrides=self.adaptation.get(method), **overrides
        )


def resolve_hyperparameters(
    method: str,
    preset: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    presets: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Merge defaults, config overrides, a named preset and keyword overrides, checking every name.

    `defaults` / `presets` serve learners registered outside this module; the
    built-in methods take theirs from the tables above.
    """
    if defaults is None:
        if method not in ADAPTATION_DEFAULTS:
            raise ValueError(f"Unknown method {method!r}; choose one of {sorted(ADAPTATION_DEFAULTS)}.")
        defaults = ADAPTATION_DEFAULTS[method]
    merged = dict(defaults)
    merged.update(config_overrides or {})
    if preset is not None:
        presets = ADAPTATION_PRESETS.get(method, {}) if presets is None else presets
        if preset not in presets:
            raise ValueError(
                f"Unknown preset {preset!r} for method {method!r}; choose one of {sorted(presets)}."
            )
        merged.update(presets[preset])
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(merged)
    if unknown:
        raise TypeError(
            f"Method {method!r} takes no hyperparameter(s) {sorted(unknown)}; valid: {sorted(merged)}."
        )
    merged.update(given)
    check_hyperparameters(method, merged)
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_hyperparameters(method: str, hp: dict[str, Any]) -> None:
    """Raise a `ValueError` naming the first hyperparameter with an unusable value."""
    steps = hp.get("steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{method}: steps must be a non-negative integer, got {steps!r}.")
    for name in ("lr", "lr_beta", "scale", "adapter_lr_scale"):
        if name in hp and not (_is_number(hp[name]) and hp[name] > 0):
            raise ValueError(f"{method}: {name} must be a finite positive number, got {hp[name]!r}.")
    if "weight_decay" in hp and not (_is_number(hp["weight_decay"]) and hp["weight_decay"] >= 0):
        raise ValueError(f"{method}: weight_decay must be a finite number >= 0, got {hp['weight_decay']!r}.")
    if "tau" in hp and not _is_number(hp["tau"]):
        raise ValueError(f"{method}: tau must be a finite number, got {hp['tau']!r}.")
