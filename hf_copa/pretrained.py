"""Which backbone to load when none is named, and a seeded random baseline of any backbone's shape."""

from __future__ import annotations

import torch

from .bundled import DEFAULT_MODEL
from .configuration_copa import CopaConfig
from .modeling_copa import CopaModel

RANDOM_INIT_SEED = 0


def load_model(name_or_path: str | None = None, **kwargs) -> CopaModel:
    """`CopaModel.from_pretrained(name_or_path)` in eval mode; the bundled default when None."""
    return CopaModel.from_pretrained(name_or_path or DEFAULT_MODEL, **kwargs).eval()


def random_backbone(like: CopaModel | CopaConfig, seed: int = RANDOM_INIT_SEED) -> CopaModel:
    """A backbone of `like`'s shape with seeded random weights: the baseline a trained one must beat.

    It records no source (`_name_or_path` is empty), so a head adapted on it never claims a base model.
    """
    config = like.config if isinstance(like, CopaModel) else like
    config = CopaConfig.from_dict(config.to_dict())
    config._name_or_path = ""
    config.domain_classifier_sizes = config.domain_classifier_domains = None  # it has no classifiers
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CopaModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
