"""The trained default backbone that ships inside the package, and the name that loads it.

`CopaModel.from_pretrained(DEFAULT_MODEL)` (and `CopaImageProcessor.from_pretrained`) read the bundled
folder: no download, works offline. The name has a colon, which no Hub repo id can have, so it never
shadows a Hub model; adapted heads record it as their base model and load it back the same way.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "hf_copa:copa-mdl-small"
_BUNDLED_MODELS = {DEFAULT_MODEL: "copa-mdl-small"}
_MODELS_DIR = Path(__file__).parent / "assets" / "models"


def bundled_model_path(name_or_path: object) -> Path | None:
    """The folder of a bundled model's name, or None for anything else (a path or Hub id)."""
    if not isinstance(name_or_path, str) or name_or_path not in _BUNDLED_MODELS:
        return None
    folder = _MODELS_DIR / _BUNDLED_MODELS[name_or_path]
    if not (folder / "config.json").is_file():
        raise OSError(
            f"The bundled model {name_or_path!r} is missing from this installation ({folder}); "
            "reinstall hf-copa (pip install --force-reinstall hf-copa)."
        )
    return folder


def bundled_name_of(folder: str | Path) -> str | None:
    """The bundled name of a folder that is a bundled model (e.g. `default_model_path()`), else None."""
    resolved = Path(folder).expanduser().resolve()
    for name, sub in _BUNDLED_MODELS.items():
        if (_MODELS_DIR / sub).resolve() == resolved:
            return name
    return None


def default_model_path() -> Path:
    """The folder of `DEFAULT_MODEL`, for tools that want a path: transformers' Auto classes resolve names
    themselves and cannot know the bundled name, so use `AutoModel.from_pretrained(default_model_path())`.
    A model loaded from this folder still records `DEFAULT_MODEL` as its name."""
    folder = bundled_model_path(DEFAULT_MODEL)
    assert folder is not None
    return folder
