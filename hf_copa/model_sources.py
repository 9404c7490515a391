"""Where a model comes from (the bundled name, a local folder, or a Hub id), which backbone families there
are, and the checks that say plainly when a name or folder holds no usable backbone, before transformers would
load it anyway.

transformers instantiates any `config.json` into the class it is asked for: a ViT or ResNet folder becomes a
randomly initialised CoPA backbone with a list of "MISSING" keys, and a path that does not exist is reported
as a malformed repo id. hf_copa refuses each case with an error that names what was found and what to do.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundled import bundled_model_path, bundled_name_of
from .validation import CopaValueError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_LISTED = 5  # missing or unexpected weights named in an error, before "and N more"

# The backbone families: config `model_type` -> (module, model class). The only list of them; each module
# defines its config, its network and registers both with transformers' Auto classes.
BACKBONE_FAMILIES = {
    "copa": ("modeling_copa", "CopaModel"),
    "efficientnet_lite": ("modeling_efficientnet_lite", "EfficientNetLiteModel"),
}


def backbone_class(model_type: str) -> type:
    """The model class of a backbone family (`CopaModel` for "copa"), imported when first asked for."""
    if model_type not in BACKBONE_FAMILIES:
        raise CopaValueError(
            f"{model_type!r} is not a backbone family hf_copa knows ({', '.join(BACKBONE_FAMILIES)})."
        )
    module, name = BACKBONE_FAMILIES[model_type]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` was given, resolved: what to load, and the name to record (`_name_or_path`)."""

    load_from: str  # a local folder or a Hub id
    name: str  # what heads pin as their base model: the bundled name, the folder, or the Hub id
    is_local: bool


def resolve_model_source(name_or_path: Any, expected_type: str | None = None) -> ModelSource:
    """The bundled name, an existing folder (checked to hold a backbone, of `expected_type` if given), or a
    Hub id.

    A folder of the bundled model (`hf_copa.default_model_path()`) keeps the bundled name, so heads adapted
    on it pin `hf_copa.DEFAULT_MODEL`, not an install path.
    """
    bundled = bundled_model_path(name_or_path)
    if bundled is not None:
        check_model_folder(bundled, expected_type)
        return ModelSource(str(bundled), str(name_or_path), is_local=True)
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        check_model_folder(path, expected_type)
        return ModelSource(str(path), bundled_name_of(path) or text, is_local=True)
    if looks_like_a_path(text):
        raise CopaValueError(
            f"The model folder {text!r} does not exist. Give an existing folder (one written by "
            "save_pretrained, hf-copa convert or hf-copa train), a Hub repo id such as ORG/copa-url, or "
            "nothing for the bundled default."
        )
    return ModelSource(text, text, is_local=False)


def looks_like_a_path(text: str) -> bool:
    """True for what can only be meant as a local path: a Hub id is `name` or `namespace/name`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text or text.endswith("/"):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def check_model_folder(folder: Path, expected_type: str | None = None) -> None:
    """A folder must hold a backbone's `config.json` (of `expected_type` if given) and weights."""
    if not folder.is_dir():
        raise CopaValueError(
            f"{str(folder)!r} is a file; pass the folder that holds config.json and the weights."
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CopaValueError(
            f"{str(folder)!r} holds no model: it has no config.json. Pass a folder written by "
            "save_pretrained, hf-copa convert or hf-copa train."
        )
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CopaValueError(
            f"{str(config_file)!r} is not valid JSON ({err}); the file is damaged: re-save or re-download "
            "the model."
        ) from None
    check_backbone_config(config, str(folder), expected_type)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise CopaValueError(
            f"There are no weights in {str(folder)!r}: it has a config.json but none of "
            f"{', '.join(WEIGHT_FILES)}. Save the model with save_pretrained (or re-download it) so that its "
            "weights are there too."
        )


def check_backbone_config(config: Any, where: str, expected_type: str | None = None) -> None:
    """The `config.json` contents of a backbone of a known family (of `expected_type` if given), and not an
    adapted head."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in BACKBONE_FAMILIES and expected_type is not None and model_type != expected_type:
        found, wanted = BACKBONE_FAMILIES[model_type][1], BACKBONE_FAMILIES[expected_type][1]
        raise CopaValueError(
            f"{where} holds a {model_type!r} backbone, which {found} loads, not {wanted}; load it with "
            f"hf_copa.load_model(...) (any backbone family) or {found}.from_pretrained(...)."
        )
    if model_type not in BACKBONE_FAMILIES:
        kind = f"a {model_type!r} model" if model_type else "a config.json without a model_type"
        architectures = config.get("architectures") if isinstance(config, dict) else None
        named = f" ({', '.join(architectures)})" if architectures else ""
        raise CopaValueError(
            f"{where} holds {kind}{named}, not a CoPA backbone; hf_copa cannot use its weights. Pass a CoPA "
            "model: the bundled default (no --model), a folder written by hf-copa convert or hf-copa train, "
            "or a Hub repo of one."
        )
    if config.get("copa_head"):
        raise CopaValueError(
            f"{where} holds an adapted CoPA head, not a backbone; load it with "
            "hf_copa.CopaForFewShotClassification.from_pretrained (or pipeline('image-classification'))."
        )


def check_loading_info(info: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose weights do not fit the backbone exactly (missing, unexpected, misshapen)."""
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("num_batches_tracked")]
    unexpected = list(info.get("unexpected_keys", []))
    mismatched = [
        str(item[0]) if isinstance(item, tuple | list) else str(item)
        for item in info.get("mismatched_keys", [])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the backbone's weights are missing ({listing(sorted(missing))})")
    if unexpected:
        problems.append(
            f"it holds {len(unexpected)} weights a CoPA backbone has no place for "
            f"({listing(sorted(unexpected))})"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} weights have the wrong shape ({listing(sorted(mismatched))})")
    if problems:
        raise CopaValueError(
            f"{where} is not a complete CoPA backbone: " + "; ".join(problems) + ". A model used with these "
            "weights would be partly random. Re-download it, or re-convert it with hf-copa convert."
        )


def listing(names: list[str], limit: int = _LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")
