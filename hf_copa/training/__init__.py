"""Multi-domain training of the backbone (URL's "MDL" baseline), optionally with URL's distillation.

`config` holds every hyperparameter, `data` the class splits, batches and augmentation, `networks` the
multi-domain network, teachers and distillation losses, `checkpoints` what is written, `loop` the loop.
Names are imported from their module on first use, so that `hf_copa.training.config` (which the `hf-copa`
command reads for its flags) costs no import of the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CHECKPOINTS_DIR": "checkpoints",
    "MIXED_PRECISION_CHOICES": "config",
    "TRAINING_LOG_FILE": "checkpoints",
    "TrainingConfig": "config",
    "TrainingResult": "loop",
    "URTTrainingConfig": "config",
    "train_urt": "urt",
    "augment": "data",
    "batch_rows": "data",
    "cka_loss": "networks",
    "load_trained_classifiers": "checkpoints",
    "logit_distillation_loss": "networks",
    "save_trained_model": "checkpoints",
    "split_domain": "data",
    "train": "loop",
    "validate": "loop",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'hf_copa.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
