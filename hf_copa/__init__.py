"""hf_copa: CoPA few-shot image classification as a Hugging Face transformers model.

`import hf_copa` is cheap: each public name is imported from its module when first used, so that the
`hf-copa` command and code that needs one part do not pay for all of transformers. hf_copa's classes
register their model types (`copa`, `efficientnet_lite`) with transformers' Auto classes (`AutoConfig`,
`AutoModel`, `AutoModelForImageClassification`, `AutoImageProcessor`) when they are first used; to use the
Auto classes or `pipeline` before touching any hf_copa class, call `hf_copa.register_auto_classes()` first.
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
    "EfficientNetLiteConfig": "configuration_efficientnet_lite",
    "EfficientNetLiteForFewShotClassification": "modeling_efficientnet_lite",
    "EfficientNetLiteImageProcessor": "image_processing_efficientnet_lite",
    "EfficientNetLiteModel": "modeling_efficientnet_lite",
    "SMALL_RESNET": "bundled",
    "EFFICIENTNET_LITE0": "bundled",
    "Learner": "learners",
    "adapt": "adaptation",
    "adapt_to_task": "adaptation",
    "available_methods": "learners",
    "default_model_path": "bundled",
    "get_learner": "learners",
    "load_model": "pretrained",
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
    "EfficientNetLiteConfig",
    "EfficientNetLiteForFewShotClassification",
    "EfficientNetLiteImageProcessor",
    "EfficientNetLiteModel",
    "load_model",
}

__all__ = ["__version__", "register_auto_classes", *sorted(_HOMES)]


def register_auto_classes() -> None:
    """Make transformers' Auto classes and `pipeline` know hf_copa's model types (`copa`, `efficientnet_lite`;
    no `trust_remote_code`).

    Importing each family's modeling module (which any use of its classes does) registers it; this function
    only does those imports, so calling it again costs nothing.
    """
    importlib.import_module(".modeling_copa", __name__)
    importlib.import_module(".modeling_efficientnet_lite", __name__)


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
