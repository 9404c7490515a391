"""Per-task adaptation methods, one file each, registered by name (see `registry`)."""

from . import (  # noqa: F401  (each registers itself)
    copa,
    copa_transformer,
    copa_tsa,
    finetune,
    mahalanobis,
    ncc,
    proto_maml,
    sur,
    tsa,
    url,
    urt,
)
from .base import BackboneLearner, Learner
from .registry import (
    ADAPTATION_DEFAULTS,
    ADAPTATION_PRESETS,
    available_methods,
    get_learner,
    learner_class,
    one_backbone_methods,
    register_learner,
)

__all__ = [
    "ADAPTATION_DEFAULTS",
    "ADAPTATION_PRESETS",
    "BackboneLearner",
    "Learner",
    "available_methods",
    "get_learner",
    "learner_class",
    "one_backbone_methods",
    "register_learner",
]
