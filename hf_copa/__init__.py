"""hf_copa: CoPA few-shot image classification as a Hugging Face transformers model.

`import hf_copa` is cheap: each public name is imported from its module when first used, so that the
`hf-copa` command and code that needs one part do not pay for all of transformers. hf_copa's classes
register `model_type="copa"` with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoImageProcessor`) when they are first used; to use the Auto classes or
`pipeline` before touching any hf_copa class, call `hf_copa.register_auto_classes()` first.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# Public name -> the module that defines it.
_HOMES = {
    "ADAPTATION_DEFAULTS": "learners",
    "ADAPTATION_PRESETS": "learners",
    "AdaptedHead": "heads",
    "CopaBackboneSet": "modeling_backbone_set",
    "CopaConfig": "configuration_copa",
    "CopaForFewShotClassification": "modeling_copa",
    "CopaImageProcessor": "image_processing_copa",
    "CopaModel": "modeling_copa",
    "CopaModelOutput": "modeling_copa",
    "CopaPreTrainedModel": "modeling_copa",
    "DEFAULT_MODEL": "bundled",
    "Learner": "learners",
    "adapt": "adaptation",
    "adapt_to_task": "adaptation",
    "available_methods": "learners",
    "default_model_path": "bundled",
    "get_learner": "learners",
    "register_learner": "learners",
}
# Names whose use means transformers is in play: they register hf_copa with its Auto classes.
_TRANSFORMERS_NAMES = {
    "CopaBackboneSet",
    "CopaConfig",
    "CopaForFewShotClassification",
    "CopaImageProcessor",
    "CopaModel",
    "CopaModelOutput",
    "CopaPreTrainedModel",
}

__all__ = ["__version__", "register_auto_classes", *sorted(_HOMES)]


def register_auto_classes() -> None:
    """Make transformers' Auto classes and `pipeline` know `model_type="copa"` (no `trust_remote_code`).

    Importing `hf_copa.modeling_copa` (which any use of `CopaModel` or `CopaConfig` does) registers them;
    this function only does that import, so calling it again costs nothing.
    """
    importlib.import_module(".modeling_copa", __name__)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'hf_copa' has no attribute {name!r}")
    if name in _TRANSFORMERS_NAMES:
        register_auto_classes()
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
