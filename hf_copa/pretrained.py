"""Which backbone to load when none is named (or any backbone by name, whatever its family), and a seeded
random baseline of any backbone's shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .bundled import DEFAULT_MODEL
from .model_sources import backbone_class, check_backbone_config, resolve_model_source

RANDOM_INIT_SEED = 0


def load_model(name_or_path: str | Path | None = None, **kwargs: Any) -> Any:
    """The backbone at `name_or_path` (a bundled name, a folder or a Hub id) in eval mode, as the class of
    the family its config names (`CopaModel`, `EfficientNetLiteModel`); `hf_copa.DEFAULT_MODEL` when None.
    `kwargs` (`revision`, `token`, `dtype`, ...) go to that class's `from_pretrained`."""
    name = name_or_path or DEFAULT_MODEL
    source = resolve_model_source(name)
    if source.is_local:
        config = json.loads((Path(source.load_from) / "config.json").read_text())
    else:
        from transformers import PreTrainedConfig

        from .modeling_backbone import hub_kwargs

        try:
            config, _ = PreTrainedConfig.get_config_dict(source.load_from, **hub_kwargs(kwargs))
        except OSError as err:
            raise OSError(
                f"{source.load_from!r} is not a local folder, and no Hub repo of that name could be loaded: "
                f"{err}"
            ) from err
        check_backbone_config(config, f"The Hub repo {source.load_from!r}")
    return backbone_class(config["model_type"]).from_pretrained(name, **kwargs).eval()


def random_backbone(like: Any, seed: int = RANDOM_INIT_SEED) -> Any:
    """A backbone of `like`'s shape (a backbone or its config) with seeded random weights: the baseline a
    trained one must beat.

    It records no source (`_name_or_path` is empty), so a head adapted on it never claims a base model.
    """
    config = getattr(like, "config", like)
    config = type(config).from_dict(config.to_dict())
    config._name_or_path = ""
    config.domain_classifier_sizes = config.domain_classifier_domains = None  # it has no classifiers
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = backbone_class(config.model_type)(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
