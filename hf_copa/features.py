"""Batched, cached feature extraction over a dataset split: one frozen-backbone pass per image.

Everything downstream of the backbone (episodes, learners, evaluation) works on features looked up by
dataset row, so each image is embedded once and episodes index the features. `extract_row_features` embeds
only the rows a run needs (the rows its episodes touch: QuickDraw's test split holds millions of images,
600 Meta-Dataset episodes a few hundred thousand of them); `extract_dataset_features` embeds a whole split.
A cache entry holds the rows embedded so far, and a later run asking for more rows embeds only the new ones.

The optional disk cache is keyed by everything that changes the features: the model (name, revision,
architecture config and a fingerprint of its weights), the image processor config, the dataset fingerprint
and image column, and the autocast dtype. Entries are written atomically and carry a checksum, so an
interrupted or damaged entry is recomputed (with a warning) instead of silently reused.

The dataset's format or transform (`with_transform`, `set_format`) is ignored: images are read raw (see
`hf_copa.splits.RawImages`). Use `dataset.map(...)`, which does change the fingerprint, to alter images
before extraction.

Measured on 2 CPU cores (MNIST test split, full-size URL ResNet-18, 84x84 inputs): decoding and
preprocessing run at ~1,200 images/s and the backbone at ~25, so images are prepared in the main process by
default (`num_workers=0`; a worker process gained nothing there). Workers (`num_workers > 0`) pay off on a
GPU, where the backbone outruns one core's preprocessing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .files import save_safetensors, write_atomically
from .frozen import frozen_backbone, model_device
from .splits import RawImages
from .validation import CopaTypeError, CopaValueError, check_int

__all__ = [
    "CorruptFeatureCacheWarning",
    "RowFeatures",
    "default_cache_dir",
    "extract_dataset_features",
    "extract_row_features",
    "feature_cache_key",
    "weights_fingerprint",
]

CACHE_FORMAT_VERSION = 2  # 2: entries hold a subset of rows ("rows" beside "features")
WEIGHT_SAMPLE_SIZE = 1024  # elements hashed per state_dict tensor (plus its last one)
_FEATURES_TENSOR = "features"
_ROWS_TENSOR = "rows"
# Entries of `config.to_dict()` / `processor.to_dict()` that do not change the features.
_CONFIG_KEYS_WITHOUT_EFFECT = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "adaptation",
        "architectures",
        "id2label",
        "label2id",
        "problem_type",
        "dtype",  # the weights' dtypes are in the weight fingerprint
        "domain_classifier_sizes",
        "domain_classifier_domains",
        "copa_head",
    }
)
_PROCESSOR_KEYS_WITHOUT_EFFECT = frozenset({"return_tensors"})


class CorruptFeatureCacheWarning(UserWarning):
    """A cached feature file could not be trusted (unreadable, truncated, wrong shape or checksum)."""


def default_cache_dir() -> Path:
    """`$HF_COPA_CACHE` if set, else `~/.cache/hf_copa/features` (read at call time)."""
    configured = os.environ.get("HF_COPA_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "hf_copa" / "features"


class RowFeatures:
    """Features of some rows of a split: `features[i]` belongs to dataset row `rows[i]` (sorted, unique).

    Index it with dataset rows (`row_features[support_rows]`, an array or tensor of row numbers) to get
    their [len(rows), d] features.
    """

    def __init__(self, rows: torch.Tensor, features: torch.Tensor) -> None:
        self.rows = rows
        self.features = features

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, dataset_rows: Any) -> torch.Tensor:
        wanted = torch.as_tensor(np.asarray(dataset_rows), dtype=torch.long).reshape(-1)
        positions = torch.searchsorted(self.rows, wanted).clamp(max=max(len(self.rows) - 1, 0))
        if len(self.rows) == 0 or not torch.equal(self.rows[positions], wanted):
            missing = (
                wanted[self.rows[positions] != wanted][:5].tolist() if len(self.rows) else wanted[:5].tolist()
            )
            raise CopaValueError(
                f"No features were extracted for dataset rows {missing}; extract them first."
            )
        return self.features[positions]


def extract_dataset_features(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    image_processor: Any = None,
    image_column: str = "image",
    batch_size: int = 128,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int = 0,
    mixed_precision: bool = True,
    spatial: bool = False,
) -> torch.Tensor:
    """Backbone features of every row of `dataset`: a [len(dataset), d] float32 CPU tensor, row i = row i
    (with `spatial=True`, the last stage's maps before pooling, [len(dataset), d, h, w]).

    Args:
        model: A frozen backbone with `extract_features(pixel_values, batch_size=...)`, e.g. `CopaModel`.
            It runs in eval mode (BatchNorm uses its running statistics); its training flag and device are
            restored afterwards.
        dataset: One split (a `datasets.Dataset`, not a `DatasetDict`).
        image_processor: Turns images into pixel values; default `model.default_image_processor()`. With
            `decoder="meta-dataset"` the image column is read undecoded and its bytes go to the processor,
            so that the pixels are TensorFlow's Meta-Dataset pixels.
        image_column: The column holding the images (PIL images, arrays, paths or encoded bytes).
        batch_size: Images per backbone pass.
        cache_dir: Where to cache the features on disk (e.g. `default_cache_dir()`); None disables caching.
        device: Where the backbone runs; default the model's device. On CUDA it runs under bf16 autocast
            (fp16 where bf16 is unsupported); elsewhere in the model's dtype.
        progress: Show a tqdm progress bar (counting images) while extracting.
        num_workers: Processes decoding and preprocessing images in parallel with the backbone (0: in the
            main process, the fastest choice on a few CPU cores; more keep a GPU fed).
        mixed_precision: On CUDA, run under bf16 autocast (fp16 where bf16 is unsupported); False keeps
            float32 there too, as the official test scripts run. No effect on CPU.
        spatial: Feature maps [d, h, w] per image instead of pooled vectors (for learners with
            `feature_kind="maps"`): d*h*w*4 bytes an image, 72 KiB for URL's ResNet-18 at 84 pixels. They are
            cached apart from the pooled features.
    """
    rows = np.arange(len(dataset)) if isinstance(dataset, datasets.Dataset) else None
    return extract_row_features(
        model,
        dataset,
        rows,
        image_processor,
        image_column,
        batch_size,
        cache_dir,
        device,
        progress,
        num_workers,
        mixed_precision,
        spatial,
    ).features


def extract_row_features(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    rows: Any,
    image_processor: Any = None,
    image_column: str = "image",
    batch_size: int = 128,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int = 0,
    mixed_precision: bool = True,
    spatial: bool = False,
) -> RowFeatures:
    """Backbone features of the dataset rows `rows` (any order, repeats allowed), as `RowFeatures`.

    Arguments as for `extract_dataset_features`. With a cache, the rows already cached for this model,
    processor and dataset are read back and only the others are embedded; the entry then holds both.

    A model with several backbones (`CopaBackboneSet`, which has `feature_members()`) gives [len(rows), B, d]:
    each member is extracted (and cached under its own key) in turn, so only one backbone runs at a time.
    """
    members = getattr(model, "feature_members", None)
    if callable(members):
        if spatial:
            raise CopaValueError(
                "A backbone set gives pooled features [N, B, d] only; feature maps come from one backbone."
            )
        processor = _resolve_processor(model, image_processor)
        parts = [
            extract_row_features(
                member,
                dataset,
                rows,
                processor,
                image_column,
                batch_size,
                cache_dir,
                device,
                progress,
                num_workers,
                mixed_precision,
            )
            for _, member in members()
        ]
        return RowFeatures(parts[0].rows, torch.stack([part.features for part in parts], dim=1))
    _check_model(model)
    _check_dataset(dataset, image_column)
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
    wanted = _check_rows(rows, len(dataset))
    processor = _resolve_processor(model, image_processor)
    run_device = _resolve_device(model, device)
    autocast_dtype = _autocast_dtype(run_device) if mixed_precision else None
    if dataset.format["type"] == "custom":
        warnings.warn(
            "The dataset's transform is ignored: features are computed from the raw images (a transform does "
            "not change the dataset fingerprint, so cached features would go stale). Use dataset.map(...).",
            stacklevel=2,
        )

    cache_paths, key_parts = None, None
    cached = RowFeatures(torch.empty(0, dtype=torch.long), torch.empty(0, 0))
    if cache_dir is not None:
        key_parts = _cache_key_parts(model, dataset, processor, image_column, autocast_dtype, spatial)
        if key_parts is not None:
            key = _hash_json(key_parts)
            cache_paths = _CachePaths(Path(cache_dir).expanduser(), key)
            cached = _load_cached(cache_paths, len(dataset), 4 if spatial else 2) or cached
    missing = wanted[~torch.isin(wanted, cached.rows)]
    if len(missing) == 0:
        return _subset(cached, wanted)
    computed = _extract(
        model,
        dataset,
        missing,
        processor,
        image_column,
        batch_size,
        run_device,
        autocast_dtype,
        progress,
        num_workers,
        spatial,
    )
    merged = _merge(cached, RowFeatures(missing, computed))
    if cache_paths is not None:
        _save_cached(cache_paths, key_parts, merged)
    return _subset(merged, wanted)


def _check_rows(rows: Any, num_rows: int) -> torch.Tensor:
    """Sorted unique int64 rows, each within the split."""
    array = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
    if array.size and (array[0] < 0 or array[-1] >= num_rows):
        bad = array[(array < 0) | (array >= num_rows)][:5].tolist()
        raise CopaValueError(f"Rows {bad} are outside the split's {num_rows} rows.")
    return torch.from_numpy(array)


def _merge(first: RowFeatures, second: RowFeatures) -> RowFeatures:
    if len(first) == 0:
        return second
    rows = torch.cat([first.rows, second.rows])
    order = torch.argsort(rows)
    return RowFeatures(rows[order], torch.cat([first.features, second.features])[order])


def _subset(available: RowFeatures, rows: torch.Tensor) -> RowFeatures:
    if len(available) == len(rows):
        return available
    return RowFeatures(rows, available[rows])


def feature_cache_key(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    image_processor: Any = None,
    image_column: str = "image",
    device: str | torch.device | None = None,
) -> str | None:
    """The cache key `extract_dataset_features` would use (None when the dataset has no fingerprint)."""
    _check_model(model)
    _check_dataset(dataset, image_column)
    processor = _resolve_processor(model, image_processor)
    run_device = _resolve_device(model, device)
    parts = _cache_key_parts(model, dataset, processor, image_column, _autocast_dtype(run_device))
    return None if parts is None else _hash_json(parts)


def weights_fingerprint(model: torch.nn.Module, sample_size: int = WEIGHT_SAMPLE_SIZE) -> str:
    """A cheap hash of a model's state_dict: every tensor's name, dtype and shape plus a strided sample.

    Hashing all weights would cost a full read of them (tens of MB for ResNet-18, far more for larger
    backbones) on every call, cache hits included. Sampling `sample_size` evenly spaced elements of each
    tensor (and its last one) instead costs a few milliseconds and still tells apart any two models whose
    weights were initialised, trained or loaded differently, since those differ in virtually every element
    of every tensor (BatchNorm running statistics included). It would miss a hand edit of a single
    unsampled element: clear the cache (or use another `cache_dir`) after such surgery.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel() == 0:
            continue
        flat = tensor.reshape(-1)
        step = -(-flat.numel() // sample_size)  # ceil division
        sample = flat[::step] if step == 1 else torch.cat([flat[::step], flat[-1:]])
        digest.update(sample.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Validation


def _check_model(model: Any) -> None:
    if not callable(getattr(model, "extract_features", None)):
        hint = " (for a CopaForFewShotClassification, pass its `.copa`)" if hasattr(model, "copa") else ""
        raise CopaTypeError(
            f"model must have an `extract_features(pixel_values, batch_size=...)` method, like CopaModel; "
            f"got a {type(model).__name__} without one{hint}."
        )
    if not isinstance(model, torch.nn.Module):
        raise CopaTypeError(
            f"model must be a torch.nn.Module (e.g. CopaModel), got a {type(model).__name__}."
        )


def _check_dataset(dataset: Any, image_column: str) -> None:
    if isinstance(dataset, datasets.DatasetDict):
        example = f", e.g. dataset[{next(iter(dataset))!r}]" if len(dataset) else ""
        raise CopaTypeError(f"Got a DatasetDict with splits {list(dataset)}; pass one split{example}.")
    if not isinstance(dataset, datasets.Dataset):
        raise CopaTypeError(
            "dataset must be a datasets.Dataset (one split with random access), "
            f"got a {type(dataset).__name__}."
        )
    if image_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no column {image_column!r}; its columns are {dataset.column_names}. "
            "Pass image_column=<the column holding the images>."
        )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there are no images to extract features from.")


def _resolve_processor(model: torch.nn.Module, image_processor: Any) -> Any:
    if image_processor is not None:
        return image_processor
    if not callable(getattr(model, "default_image_processor", None)):
        raise CopaTypeError(
            f"{type(model).__name__} has no default_image_processor(); pass image_processor=... explicitly."
        )
    return model.default_image_processor()


# --------------------------------------------------------------------------------------------------------
# Extraction


def _resolve_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    resolved = torch.device(device) if device is not None else model_device(model)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (fp16 on GPUs without bf16); None (no autocast, full precision) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class _PixelBatches(torch.utils.data.Dataset):
    """Batch b of the requested rows' images as pixel values; picklable, so DataLoader workers can run it."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        rows: torch.Tensor,
        processor: Any,
        image_column: str,
        batch_size: int,
    ) -> None:
        # The other columns are never decoded; encoded bytes for the Meta-Dataset decoder.
        self.images = RawImages(
            dataset, image_column, encoded=getattr(processor, "decoder", None) == "meta-dataset"
        )
        self.rows = rows.numpy()
        self.contiguous = len(self.rows) > 0 and self.rows[-1] - self.rows[0] + 1 == len(self.rows)
        self.processor = processor
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        rows = self.rows[index * self.batch_size : (index + 1) * self.batch_size]
        images = (
            self.images.span(int(rows[0]), int(rows[-1]) + 1) if self.contiguous else self.images.rows(rows)
        )
        try:
            pixel_values = self.processor(images, return_tensors="pt")["pixel_values"]
        except (TypeError, ValueError) as err:
            raise type(err)(
                f"Could not preprocess rows {int(rows[0])}..{int(rows[-1])} of column "
                f"{self.images.image_column!r}: {err}"
            ) from err
        # Channels-last (NHWC) inputs make the convolutions pick faster kernels: ~25% more images/s for
        # the ResNet-18 on CPU, with identical results; the model's own weights are left untouched.
        return pixel_values.contiguous(memory_format=torch.channels_last)


def _extract(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    rows: torch.Tensor,
    processor: Any,
    image_column: str,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    num_workers: int,
    spatial: bool = False,
) -> torch.Tensor:
    loader = DataLoader(
        _PixelBatches(dataset, rows, processor, image_column, batch_size),
        batch_size=None,  # each item already is a batch
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    features: torch.Tensor | None = None
    start = 0
    bar = tqdm(total=len(rows), unit="img", desc="Extracting features", disable=not progress)
    with bar, frozen_backbone(model, device), torch.inference_mode(), autocast:
        for pixel_values in loader:
            count = len(pixel_values)
            pixel_values = pixel_values.to(device, non_blocking=True)
            kind = {"spatial": True} if spatial else {}
            batch = model.extract_features(pixel_values, batch_size=count, **kind)
            if batch.ndim != (4 if spatial else 2) or len(batch) != count:
                expected = "[num_images, feature_dim, h, w]" if spatial else "[num_images, feature_dim]"
                raise ValueError(
                    f"model.extract_features returned shape {tuple(batch.shape)} for {count} images; "
                    f"expected {expected}."
                )
            if features is None:
                with torch.inference_mode(False):  # learners need an ordinary (autograd-able) tensor
                    features = torch.empty(len(rows), *batch.shape[1:], dtype=torch.float32)
            features[start : start + count].copy_(batch)
            start += count
            bar.update(count)
    return features


# --------------------------------------------------------------------------------------------------------
# The disk cache


class _CachePaths:
    def __init__(self, directory: Path, key: str) -> None:
        self.directory = directory
        self.key = key
        self.features = directory / f"{key}.safetensors"
        self.description = directory / f"{key}.json"


def _cache_key_parts(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    processor: Any,
    image_column: str,
    autocast_dtype: torch.dtype | None,
    spatial: bool = False,
) -> dict[str, Any] | None:
    """Everything the features depend on, as JSON; None when the dataset cannot be identified."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        warnings.warn(
            "The dataset has no fingerprint, so its features cannot be cached; extracting without cache.",
            stacklevel=3,
        )
        return None
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    processor_dict = processor.to_dict() if hasattr(processor, "to_dict") else {"repr": repr(processor)}
    processor_dict = {k: v for k, v in processor_dict.items() if k not in _PROCESSOR_KEYS_WITHOUT_EFFECT}
    parts = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "name_or_path": getattr(config, "_name_or_path", None),
            "commit_hash": getattr(config, "_commit_hash", None),
            "config": {k: v for k, v in config_dict.items() if k not in _CONFIG_KEYS_WITHOUT_EFFECT},
            "weights": weights_fingerprint(model),
        },
        "image_processor": processor_dict,
        "dataset": {"fingerprint": fingerprint, "num_rows": len(dataset), "image_column": image_column},
        "autocast_dtype": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
    }
    if spatial:  # only then, so the keys of pooled features stay what they were
        parts["output"] = "feature maps"
    return json.loads(_canonical_json(parts))  # plain JSON types from here on


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _hash_json(value: Any) -> str:
    return hashlib.sha256(_canonical_json(value).encode()).hexdigest()[:32]


def _checksum(rows: torch.Tensor, features: torch.Tensor) -> str:
    digest = hashlib.sha256(rows.contiguous().numpy().data)
    digest.update(features.contiguous().numpy().data)
    return digest.hexdigest()


def _load_cached(paths: _CachePaths, num_rows: int, ndim: int = 2) -> RowFeatures | None:
    """The cached rows if the entry exists and checks out, else None (warning when it is damaged)."""
    if not paths.features.exists():
        return None
    try:
        with safe_open(str(paths.features), framework="pt") as handle:
            metadata = handle.metadata() or {}
            features = handle.get_tensor(_FEATURES_TENSOR).clone()
            rows = handle.get_tensor(_ROWS_TENSOR).clone()
        problem = _cache_entry_problem(rows, features, metadata, paths.key, num_rows, ndim)
    except Exception as err:  # safetensors reports damage with several error types
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    if problem is None:
        return RowFeatures(rows, features)
    warnings.warn(
        f"Ignoring the cached features {paths.features}: {problem}. Recomputing them.",
        CorruptFeatureCacheWarning,
        stacklevel=3,
    )
    return None


def _cache_entry_problem(
    rows: torch.Tensor,
    features: torch.Tensor,
    metadata: dict[str, str],
    key: str,
    num_rows: int,
    ndim: int = 2,
) -> str | None:
    if metadata.get("key") != key:
        return "its key does not match its file name"
    if features.dtype != torch.float32 or features.ndim != ndim or len(features) != len(rows):
        shape, wanted = tuple(features.shape), "d" if ndim == 2 else "d, h, w"
        return f"it holds a {features.dtype} tensor of shape {shape}, not [{len(rows)}, {wanted}] float32"
    if rows.dtype != torch.int64 or rows.ndim != 1 or (len(rows) and (rows[0] < 0 or rows[-1] >= num_rows)):
        return f"its rows are not row numbers of a {num_rows}-row split"
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
        return "its rows are not sorted and unique"
    if metadata.get("sha256") != _checksum(rows, features):
        return "its checksum does not match its contents"
    return None


def _save_cached(paths: _CachePaths, key_parts: dict[str, Any], entry: RowFeatures) -> None:
    """Write the description, then the features, each atomically; a failure only costs the cache."""
    metadata = {
        "key": paths.key,
        "sha256": _checksum(entry.rows, entry.features),
        "format_version": str(CACHE_FORMAT_VERSION),
    }
    description = {
        "key": paths.key,
        "rows": len(entry),
        "dim": entry.features.shape[1],
        "shape": list(entry.features.shape[1:]),
        "parts": key_parts,
    }
    try:
        paths.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(
            paths.description, lambda tmp: tmp.write_text(json.dumps(description, indent=2, sort_keys=True))
        )
        tensors = {_FEATURES_TENSOR: entry.features.contiguous(), _ROWS_TENSOR: entry.rows.contiguous()}
        save_safetensors(tensors, paths.features, metadata=metadata)
    except OSError as err:
        warnings.warn(f"Could not write the feature cache in {paths.directory}: {err}", stacklevel=3)
