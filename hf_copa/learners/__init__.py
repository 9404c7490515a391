"""Per-task adaptation methods, registered by name."""

from . import copa, copa_tsa, ncc, tsa, url  # noqa: F401  (registration)
from .base import (
    AdaptedHead,
    BackboneLearner,
    Learner,
    available_methods,
    get_learner,
    register_learner,
)

__all__ = [
    "AdaptedHead",
    "BackboneLearner",
    "Learner",
    "available_methods",
    "get_learner",
    "register_learner",
]
