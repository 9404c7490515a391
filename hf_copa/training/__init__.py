"""Multi-domain training of the backbone (URL's "MDL" baseline), optionally with URL's distillation.

`config` holds every hyperparameter, `data` the class splits, batches and augmentation, `networks` the
multi-domain network, teachers and distillation losses, `checkpoints` what is written, `loop` the loop.
"""

from .checkpoints import (
    CHECKPOINTS_DIR,
    TRAINING_LOG_FILE,
    load_trained_classifiers,
    save_trained_model,
)
from .config import MIXED_PRECISION_CHOICES, TrainingConfig
from .data import augment, batch_rows, split_domain
from .loop import TrainingResult, train, validate
from .networks import cka_loss, logit_distillation_loss

__all__ = [
    "CHECKPOINTS_DIR",
    "MIXED_PRECISION_CHOICES",
    "TRAINING_LOG_FILE",
    "TrainingConfig",
    "TrainingResult",
    "augment",
    "batch_rows",
    "cka_loss",
    "load_trained_classifiers",
    "logit_distillation_loss",
    "save_trained_model",
    "split_domain",
    "train",
    "validate",
]
