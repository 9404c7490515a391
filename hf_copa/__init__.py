"""hf_copa: CoPA few-shot image classification as a Hugging Face transformers model."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from ._version import __version__
from .adaptation import adapt, adapt_to_task
from .bundled import DEFAULT_MODEL, default_model_path
from .configuration_copa import CopaConfig
from .heads import AdaptedHead
from .image_processing_copa import CopaImageProcessor
from .learners import (
    ADAPTATION_DEFAULTS,
    ADAPTATION_PRESETS,
    Learner,
    available_methods,
    get_learner,
    register_learner,
)
from .modeling_copa import CopaForFewShotClassification, CopaModel, CopaModelOutput, CopaPreTrainedModel

AutoConfig.register(CopaConfig.model_type, CopaConfig, exist_ok=True)
AutoModel.register(CopaConfig, CopaModel, exist_ok=True)
AutoModelForImageClassification.register(CopaConfig, CopaForFewShotClassification, exist_ok=True)
AutoImageProcessor.register(CopaConfig, image_processor_classes={"pil": CopaImageProcessor}, exist_ok=True)

__all__ = [
    "__version__",
    "DEFAULT_MODEL",
    "default_model_path",
    "ADAPTATION_DEFAULTS",
    "ADAPTATION_PRESETS",
    "AdaptedHead",
    "CopaConfig",
    "CopaForFewShotClassification",
    "CopaImageProcessor",
    "CopaModel",
    "CopaModelOutput",
    "CopaPreTrainedModel",
    "Learner",
    "adapt",
    "adapt_to_task",
    "available_methods",
    "get_learner",
    "register_learner",
]
