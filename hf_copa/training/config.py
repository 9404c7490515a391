"""`TrainingConfig`: every training hyperparameter, with its default, checked before any data is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..splits import SplitSpec
from ..validation import CopaValueError, check_int, check_number

if TYPE_CHECKING:
    from ..configuration_copa import CopaConfig

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
MIN_VAL_WAYS = 5  # Meta-Dataset episodes have 5 to 50 ways


@dataclass
class TrainingConfig:
    """Every training hyperparameter, with its default (the one place they live)."""

    datasets: list[str] = field(default_factory=list)  # PATH_OR_ID[:SPLIT], split "train" unless given
    output_dir: str = "copa-mdl"
    # Backbone shape (CopaConfig fields); None keeps CopaConfig's URL-size default.
    hidden_sizes: list[int] | None = None
    embedding_size: int | None = None
    image_size: int | None = None
    # Optimisation: SGD with Nesterov momentum, linear warm-up then cosine decay to 0.
    max_steps: int = 4000
    batch_size: int = 32  # images per domain per step per process
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 200
    label_smoothing: float = 0.0
    # Light augmentation: random translation by up to `crop_padding` * image_size pixels, horizontal flips.
    crop_padding: float = 0.125
    flip: bool = True
    # Validation: hold out this fraction of each domain's classes (at least `min_val_classes`).
    val_fraction: float = 0.1
    min_val_classes: int = 5
    val_images_per_class: int = 40
    val_episodes: int = 100
    val_every: int = 500
    # Checkpoints every `save_every` steps, keeping the newest `keep_checkpoints`.
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on GPU, none on CPU
    num_workers: int = 1
    save_dtype: str = "float32"  # float16 halves the shipped size
    # URL's distillation: DOMAIN=MODEL_FOLDER for each domain with a single-domain teacher.
    teachers: dict[str, str] = field(default_factory=dict)
    feature_distill_weight: float = 4.0
    logit_distill_weight: float = 1.0
    distill_temperature: float = 2.0
    command: str | None = None  # how the run was started, for the model card

    def check(self) -> None:
        """Clear errors for impossible settings, before any data is read."""
        if not self.datasets:
            raise CopaValueError("Give at least one training dataset (--dataset PATH_OR_ID[:SPLIT]).")
        for name in (
            "max_steps",
            "batch_size",
            "val_images_per_class",
            "val_every",
            "save_every",
            "keep_checkpoints",
            "min_val_classes",
        ):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "val_episodes", "num_workers"):
            check_int(name, getattr(self, name), 0)
        for name in ("lr", "distill_temperature"):
            check_number(name, getattr(self, name), positive=True)
        for name in (
            "momentum",
            "weight_decay",
            "label_smoothing",
            "crop_padding",
            "feature_distill_weight",
            "logit_distill_weight",
        ):
            check_number(name, getattr(self, name), minimum=0.0)
        if self.min_val_classes < MIN_VAL_WAYS:
            raise CopaValueError(
                f"min_val_classes must be at least {MIN_VAL_WAYS}: validation samples Meta-Dataset episodes, "
                f"which have at least {MIN_VAL_WAYS} ways; got {self.min_val_classes}."
            )
        if not 0 < self.val_fraction < 1:
            raise CopaValueError(
                f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}."
            )
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise CopaValueError(
                f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}."
            )
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise CopaValueError(f"save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}.")
        names = [domain.name for domain in self.domains()]
        if len(set(names)) != len(names):
            raise CopaValueError(f"Two training datasets share a name: {names}; each domain needs its own.")
        unknown = sorted(set(self.teachers) - set(names))
        if unknown:
            raise CopaValueError(f"Teachers given for {unknown}, which are not training domains {names}.")

    def domains(self) -> list[SplitSpec]:
        """The training datasets, split "train" unless given."""
        return [SplitSpec.parse(spec, default_split="train") for spec in self.datasets]

    def backbone_config(self) -> CopaConfig:
        """The backbone's shape (imported here: the CLI reads this module for its flags, cheaply)."""
        from ..configuration_copa import CopaConfig

        shape = {
            "hidden_sizes": self.hidden_sizes,
            "embedding_size": self.embedding_size,
            "image_size": self.image_size,
        }
        return CopaConfig(**{key: value for key, value in shape.items() if value is not None})


URT_SAMPLINGS = ("independent", "official")
URT_DECODERS = ("model", "meta-dataset")


@dataclass
class URTTrainingConfig:
    """How URT's layer is trained (`hf_copa.training.urt`); the defaults are the official run's
    (liulu112601/URT fast-scripts/urt-avg-head.sh)."""

    sources: list[str] = field(
        default_factory=list
    )  # PATH_OR_ID[:SPLIT] (default split: train), first = ImageNet
    episodes: int = 10_000
    heads: int = 2
    hidden_dim: int = 1024
    penalty: float = 0.1
    lr: float = 1e-2
    weight_decay: float = 1e-5
    temperature: float = 10.0
    attention_temperature: float = 1.0
    protocol: str = "meta-dataset"
    sampling: str = "independent"  # or "official": Meta-Dataset's sampler on converted sources (ontologies)
    # official sampling's per-class buffer: URT's reader's (fast-exps/lib/data/meta_dataset_reader.py l. 146)
    shuffle_buffer_size: int = 1000
    decoder: str = "model"  # the backbones' processor, or "meta-dataset": TensorFlow's pixels
    first_source_probability: float = 0.5
    episodes_per_step: int = 1
    seed: int = 0
    log_every: int = 100
    image_column: str = "image"
    label_column: str = "label"

    def check(self) -> None:
        if len(self.sources) < 1:
            raise CopaValueError(
                "URT training needs at least one training source (--dataset PATH, or --benchmark "
                "meta-dataset --data-root CONVERTED)."
            )
        for name in ("episodes", "heads", "hidden_dim", "episodes_per_step", "log_every"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_int("shuffle_buffer_size", self.shuffle_buffer_size, 0)
        for name, value, choices in (
            ("sampling", self.sampling, URT_SAMPLINGS),
            ("decoder", self.decoder, URT_DECODERS),
        ):
            if value not in choices:
                raise CopaValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
        for name in ("lr", "temperature", "attention_temperature"):
            check_number(name, getattr(self, name), positive=True)
        for name in ("penalty", "weight_decay"):
            check_number(name, getattr(self, name), minimum=0.0)
        if not 0 <= self.first_source_probability <= 1:
            raise CopaValueError(
                f"first_source_probability must be in [0, 1], got {self.first_source_probability!r}."
            )
        if self.episodes % self.episodes_per_step:
            raise CopaValueError(
                f"episodes ({self.episodes}) must be a multiple of "
                f"episodes_per_step ({self.episodes_per_step})."
            )
