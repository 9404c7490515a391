"""hf_copa: CoPA few-shot image classification as a Hugging Face transformers model."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .api import adapt
from .bundled import DEFAULT_MODEL, default_model_path
from .configuration_copa import ADAPTATION_DEFAULTS, ADAPTATION_PRESETS, CopaConfig
from .image_processing_copa import CopaImageProcessor
from .learners import AdaptedHead, Learner, available_methods, get_learner, register_learner
from .modeling_copa import CopaForFewShotClassification, CopaModel, CopaModelOutput, CopaPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(CopaConfig.model_type, CopaConfig, exist_ok=True)
AutoModel.register(CopaConfig, CopaModel, exist_ok=True)
AutoModelForImageClassification.register(CopaConfig, CopaForFewShotClassification, exist_ok=True)
AutoImageProcessor.register(CopaConfig, image_processor_classes={"pil": CopaImageProcessor}, exist_ok=True)

__all__ = [
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
    "available_methods",
    "get_learner",
    "register_learner",
]
