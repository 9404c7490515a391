"""The adapted head: what adaptation learns for one task, and its artifact (save, load, push, card).

`AdaptedHead` scores query features against the task's prototypes. Like a PEFT adapter, its artifact is
small (a few MB for 512-d features) and names the backbone it was adapted on instead of holding it. A folder
(or Hub repo) holds:

- `head.safetensors`: `prototypes` [C, d], plus `image_projection` / `prototype_projection` [d, d] when the
  method learned them (stored once when they are equal, as URL's single head is), and for TSA methods the
  residual adapters inside the backbone as `adapters.<convolution>` [out, in, 1, 1];
- `config.json`: the base model's `CopaConfig` (so transformers' Auto classes and `pipeline` find the
  model), `id2label` / `label2id`, and the head's metadata under `copa_head` (labels with their JSON types,
  method, hyperparameters, scale, support shots, base model id + revision, hf_copa version);
- `preprocessor_config.json`: the image processor, so `pipeline` finds one;
- `README.md`: the model card.

This module knows nothing of `CopaForFewShotClassification`; the classifier's own methods call it.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ._version import __version__
from .files import save_safetensors, write_text_atomically
from .losses import cosine_scores
from .validation import CopaTypeError, CopaValueError, as_feature_matrix

if TYPE_CHECKING:
    from .configuration_copa import CopaConfig

HEAD_WEIGHTS_NAME = "head.safetensors"
CONFIG_NAME = "config.json"
PROCESSOR_NAME = "preprocessor_config.json"
CARD_NAME = "README.md"
HEAD_CONFIG_KEY = "copa_head"
# Format 2 adds adapters; heads without them are still written as format 1, so that older hf_copa releases
# keep reading them, while refusing (rather than silently misreading) heads that need adapters.
FORMAT_VERSION = 2
ADAPTER_PREFIX = "adapters."
ARTIFACT_FILES = (CONFIG_NAME, HEAD_WEIGHTS_NAME, PROCESSOR_NAME)
CARD_TEMPLATE = Path(__file__).parent / "assets" / "model_cards" / "adapted_head.md"
_JSON_LABEL_TYPES = (str, int, float, bool, type(None))


class AdaptedHead(nn.Module):
    """What adaptation learns for one task: logits = scale * cos(q A^T, P B^T).

    `prototypes` are the class means of the support features; `image_projection`
    (A) and `prototype_projection` (B) are d x d maps, None meaning identity
    (NCC). URL's single head is A = B; CoPA learns both.

    `adapters` (TSA, CoPA+TSA) are residual adapters inside the backbone, by
    convolution name (see `hf_copa.adapters`): the prototypes and the query
    features are then those of the backbone run with them,
    `backbone.extract_features(images, adapters=head.adapters)`.
    """

    def __init__(
        self,
        prototypes: torch.Tensor,
        image_projection: torch.Tensor | None = None,
        prototype_projection: torch.Tensor | None = None,
        scale: float = 10.0,
        method: str = "ncc",
        hyperparameters: dict[str, Any] | None = None,
        train_losses: Sequence[float] = (),
        adapters: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.register_buffer("image_projection", _detached(image_projection))
        self.register_buffer("prototype_projection", _detached(prototype_projection))
        # Not buffers: their names hold dots. `_apply` moves them with the module.
        self.adapters = {name: alpha.detach().clone() for name, alpha in (adapters or {}).items()}
        self.scale = float(scale)
        self.method = method
        self.hyperparameters = dict(hyperparameters or {})
        self.train_losses = [float(x) for x in train_losses]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> AdaptedHead:
        super()._apply(fn, recurse)
        self.adapters = {name: fn(alpha) for name, alpha in self.adapters.items()}
        return self

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.prototypes.shape[1]

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.image_projection is None else features @ self.image_projection.T

    def projected_prototypes(self) -> torch.Tensor:
        protos = self.prototypes
        return protos if self.prototype_projection is None else protos @ self.prototype_projection.T

    @torch.no_grad()
    def logits(self, query_features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[Nq, d] query features -> [Nq, C] logits."""
        query = as_feature_matrix(query_features, "query_features", self.feature_dim).to(self.prototypes)
        scores = cosine_scores(
            self.project_images(query).unsqueeze(0), self.projected_prototypes().unsqueeze(0), self.scale
        )
        return scores[0]

    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        return self.logits(query_features)

    def extra_repr(self) -> str:
        adapters = f", adapters={len(self.adapters)}" if self.adapters else ""
        return f"method={self.method!r}, classes={self.num_classes}, dim={self.feature_dim}{adapters}"


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone()


@dataclass
class BaseModelReference:
    """Where the backbone a head was adapted on comes from: a Hub id (+ commit) or a local folder."""

    name_or_path: str | None
    revision: str | None = None

    @property
    def is_hub_id(self) -> bool:
        return bool(self.name_or_path) and not Path(self.name_or_path).exists()


@dataclass
class HeadArtifact:
    """A head read back from a folder: everything except the backbone."""

    head: AdaptedHead
    labels: list[Hashable]
    metadata: dict[str, Any]
    config: CopaConfig
    folder: Path

    @property
    def base_model(self) -> BaseModelReference:
        return BaseModelReference(self.metadata.get("base_model"), self.metadata.get("base_model_revision"))

    def image_processor(self) -> Any:
        from .image_processing_copa import CopaImageProcessor

        if (self.folder / PROCESSOR_NAME).is_file():
            try:
                return CopaImageProcessor.from_pretrained(self.folder)
            except (OSError, ValueError, TypeError) as err:
                raise _damaged(self.folder / PROCESSOR_NAME, f"it cannot be read ({err})") from None
        return CopaImageProcessor.from_copa_config(self.config)


# --- labels ----------------------------------------------------------------------------------------------


def check_json_labels(labels: Sequence[Hashable]) -> list[Hashable]:
    """The labels as a list if each is a str, int, finite float, bool or None (JSON keeps these types)."""
    for index, label in enumerate(labels):
        if type(label) not in _JSON_LABEL_TYPES:
            raise CopaTypeError(
                f"Label {label!r} (class {index}) is a {type(label).__name__}; a saved head keeps only "
                "str, int, float, bool or None labels. Relabel the support set with such values "
                "(e.g. str(label)) and adapt again."
            )
        if isinstance(label, float) and not math.isfinite(label):
            raise ValueError(f"Label {label!r} (class {index}) is not a finite number; JSON cannot store it.")
    return list(labels)


# --- the base model's pin --------------------------------------------------------------------------------


def base_model_reference(backbone: torch.nn.Module) -> BaseModelReference:
    """Where this backbone was loaded from: its Hub id and commit (`CopaModel.hub_revision`), a local
    folder's absolute path, or nothing for a backbone that was never saved (a random one)."""
    name = getattr(backbone.config, "_name_or_path", "") or ""
    if not name:
        return BaseModelReference(None)
    if Path(name).exists():
        return BaseModelReference(str(Path(name).resolve()))
    return BaseModelReference(name, getattr(backbone, "hub_revision", None))


# --- writing ---------------------------------------------------------------------------------------------


def head_tensors(head: AdaptedHead) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors to store, and whether the two projections are one (stored once as `image_projection`)."""
    tensors = {"prototypes": head.prototypes}
    image, prototype = head.image_projection, head.prototype_projection
    tied = image is not None and prototype is not None and torch.equal(image, prototype)
    if image is not None:
        tensors["image_projection"] = image
    if prototype is not None and not tied:
        tensors["prototype_projection"] = prototype
    tensors.update({ADAPTER_PREFIX + name: alpha for name, alpha in head.adapters.items()})
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, tied


def head_metadata(
    head: AdaptedHead,
    labels: Sequence[Hashable],
    support_counts: Sequence[int] | None,
    base_model: BaseModelReference,
    tied_projections: bool,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION if head.adapters else 1,
        "weights": HEAD_WEIGHTS_NAME,
        "labels": check_json_labels(labels),
        "method": head.method,
        "hyperparameters": dict(head.hyperparameters),
        "scale": head.scale,
        "feature_dim": head.feature_dim,
        "num_classes": head.num_classes,
        "support_shots": None if support_counts is None else [int(n) for n in support_counts],
        "tied_projections": tied_projections,
        "adapters": sorted(head.adapters),
        "train_losses": list(head.train_losses),
        "base_model": base_model.name_or_path,
        "base_model_revision": base_model.revision,
        "hf_copa_version": __version__,
    }


def write_artifact(
    folder: str | Path,
    head: AdaptedHead,
    labels: Sequence[Hashable],
    backbone_config: CopaConfig,
    image_processor: Any,
    base_model: BaseModelReference,
    support_counts: Sequence[int] | None = None,
    model_id: str | None = None,
    eval_results: Sequence[Any] | None = None,
) -> Path:
    """Write head, config, processor and card into `folder`; labels are checked before anything is written."""
    labels = check_json_labels(labels)
    if len(labels) != head.num_classes:
        raise ValueError(f"The head has {head.num_classes} classes but {len(labels)} labels were given.")
    tensors, tied = head_tensors(head)
    metadata = head_metadata(head, labels, support_counts, base_model, tied)
    folder = Path(folder)
    card = render_model_card(metadata, model_id or folder.resolve().name, eval_results)

    folder.mkdir(parents=True, exist_ok=True)
    weights_metadata = {"format": "pt", "method": head.method, "sha256": tensors_checksum(tensors)}
    save_safetensors(tensors, folder / HEAD_WEIGHTS_NAME, metadata=weights_metadata)
    config = type(backbone_config).from_dict(backbone_config.to_dict())
    config.architectures = ["CopaForFewShotClassification"]
    config.id2label = {i: str(label) for i, label in enumerate(labels)}
    config.label2id = {str(label): i for i, label in enumerate(labels)}
    config.copa_head = metadata
    config._name_or_path = ""
    write_text_atomically(folder / CONFIG_NAME, config.to_json_string())
    write_text_atomically(folder / PROCESSOR_NAME, image_processor.to_json_string())
    write_text_atomically(folder / CARD_NAME, str(card))
    return folder


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: a damaged head file fails to load."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --- the model card --------------------------------------------------------------------------------------


def render_model_card(metadata: Mapping[str, Any], model_id: str, eval_results: Sequence[Any] | None = None):
    """The model card (a `huggingface_hub.ModelCard`) rendered from `assets/model_cards/adapted_head.md`."""
    from huggingface_hub import ModelCard, ModelCardData

    results = [_as_eval_result(result) for result in (eval_results or [])]
    base = metadata["base_model"]
    hub_base = base if base and not Path(base).exists() else None
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys(["hf_copa", "copa", "few-shot", "image-classification", metadata["method"]])),
        model_name=model_id,
        eval_results=results or None,
    )
    shots = metadata["support_shots"]
    classes = [
        {"label": json.dumps(label), "shots": "?" if shots is None else shots[i]}
        for i, label in enumerate(metadata["labels"])
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_id=model_id,
        base_model_id=base,
        base_model_is_hub=hub_base is not None,
        base_model_revision=metadata["base_model_revision"],
        classes=classes,
        method=metadata["method"],
        hyperparameters=metadata["hyperparameters"],
        scale=metadata["scale"],
        feature_dim=metadata["feature_dim"],
        adapters=metadata.get("adapters", []),
        hf_copa_version=metadata["hf_copa_version"],
        results=results,
    )


def _as_eval_result(result: Any):
    from huggingface_hub import EvalResult

    if isinstance(result, EvalResult):
        return result
    if isinstance(result, Mapping):
        try:
            return EvalResult(**{"task_type": "image-classification", **result})
        except TypeError as err:
            raise CopaTypeError(
                f"eval_results entries must be huggingface_hub.EvalResult or dicts of its fields "
                f"(dataset_type, dataset_name, metric_type, metric_value, ...): {err}"
            ) from None
    raise CopaTypeError(f"eval_results entries must be EvalResult or dict, got {type(result).__name__}.")


# --- reading ---------------------------------------------------------------------------------------------


def locate_artifact(
    name_or_path: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
) -> Path:
    """The local folder holding a head artifact: `name_or_path` itself, or a cached Hub snapshot of it.

    Hub downloads honour `revision`, the cache and HF_HUB_OFFLINE; only the artifact's files are fetched.
    """
    local = Path(name_or_path) / subfolder
    if local.is_dir():
        return local
    if Path(name_or_path).exists():
        raise ValueError(f"{str(name_or_path)!r} is a file; pass the folder of a saved CoPA head.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=[prefix + name for name in (*ARTIFACT_FILES, CARD_NAME)],
        )
    except HFValidationError as err:
        raise ValueError(
            f"{str(name_or_path)!r} is neither a local folder nor a valid Hub repo id: {err}"
        ) from None
    except RepositoryNotFoundError as err:
        raise ValueError(
            f"{str(name_or_path)!r} is not a local folder, and no Hub repo of that name was found "
            "(or it is private: pass token=)."
        ) from err
    except RevisionNotFoundError as err:
        raise ValueError(f"The Hub repo {str(name_or_path)!r} has no revision {revision!r}.") from err
    return Path(snapshot) / subfolder


def read_artifact(folder: str | Path) -> HeadArtifact:
    """Read a head artifact folder. A folder without one, or with a damaged file, gets a `ValueError` that
    names the file, what is wrong with it, and what to do."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / HEAD_WEIGHTS_NAME
    if not config_path.is_file():
        raise CopaValueError(
            f"{str(folder)!r} holds no CoPA head: it has no {CONFIG_NAME}. Save one with "
            "CopaModel.adapt(...).save_pretrained(folder)."
        )
    try:
        raw = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise _damaged(config_path, f"it is not valid JSON ({err})") from None
    metadata = raw.get(HEAD_CONFIG_KEY) if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or raw.get("model_type") != "copa" or not isinstance(metadata, dict):
        copa = isinstance(raw, dict) and raw.get("model_type") == "copa"
        kind = "a CoPA backbone" if copa else "not a CoPA model"
        raise CopaValueError(
            f"{str(folder)!r} holds no CoPA head ({kind}: its {CONFIG_NAME} has no {HEAD_CONFIG_KEY!r} "
            "entry). Load a backbone with CopaModel.from_pretrained, or pass the folder / repo of a head "
            "saved by CopaForFewShotClassification.save_pretrained / push_to_hub."
        )
    version = metadata.get("format_version", 0)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CopaValueError(
            f"{str(folder)!r} holds a CoPA head of format {version}, newer than this hf_copa reads "
            f"({FORMAT_VERSION}); upgrade hf_copa."
        )
    _check_metadata(metadata, config_path)
    if not weights_path.is_file():
        raise CopaValueError(
            f"{str(folder)!r} has a CoPA head config but no {HEAD_WEIGHTS_NAME}; re-save the head, or "
            "re-download it (all of its files)."
        )
    tensors = _read_head_tensors(weights_path)
    if "prototypes" not in tensors:
        raise _damaged(weights_path, "it holds no 'prototypes' tensor")
    image = tensors.get("image_projection")
    prototype = image if metadata.get("tied_projections") else tensors.get("prototype_projection")
    adapters = {
        name.removeprefix(ADAPTER_PREFIX): tensor
        for name, tensor in tensors.items()
        if name.startswith(ADAPTER_PREFIX)
    }
    missing = sorted(set(metadata.get("adapters", [])) - set(adapters))
    if missing:
        raise _damaged(weights_path, f"it lacks the adapters {missing} that {CONFIG_NAME} lists")
    try:
        head = AdaptedHead(
            tensors["prototypes"],
            image,
            prototype,
            scale=metadata["scale"],
            method=metadata["method"],
            hyperparameters=metadata.get("hyperparameters"),
            train_losses=metadata.get("train_losses", ()),
            adapters=adapters,
        )
    except (TypeError, ValueError, RuntimeError) as err:
        raise _damaged(weights_path, f"its tensors do not form a head ({err})") from None
    if head.prototypes.ndim != 2 or any(
        t is not None and tuple(t.shape) != (head.feature_dim, head.feature_dim) for t in (image, prototype)
    ):
        raise _damaged(weights_path, "its tensors have shapes no head has")
    labels = metadata["labels"]
    if len(labels) != head.num_classes:
        raise _damaged(config_path, f"it lists {len(labels)} labels for a head of {head.num_classes} classes")
    from .configuration_copa import CopaConfig

    config_dict = {k: v for k, v in raw.items() if k != HEAD_CONFIG_KEY}
    try:
        config = CopaConfig.from_dict(config_dict)
    except (TypeError, ValueError) as err:
        raise _damaged(config_path, f"its backbone configuration is invalid ({err})") from None
    return HeadArtifact(head, list(labels), metadata, config, folder)


_REQUIRED_METADATA = {"labels": list, "method": str, "scale": (int, float)}


def _check_metadata(metadata: Mapping[str, Any], config_path: Path) -> None:
    for key, kind in _REQUIRED_METADATA.items():
        if key not in metadata:
            raise _damaged(config_path, f"its {HEAD_CONFIG_KEY!r} entry lacks {key!r}")
        if not isinstance(metadata[key], kind) or isinstance(metadata[key], bool):
            raise _damaged(config_path, f"its {HEAD_CONFIG_KEY}[{key!r}] is {metadata[key]!r}")


def _read_head_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(weights_path), framework="pt") as stored:
            tensors = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118
            stored_checksum = (stored.metadata() or {}).get("sha256")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _damaged(weights_path, f"it cannot be read ({err})") from None
    if stored_checksum is not None and stored_checksum != tensors_checksum(tensors):
        raise _damaged(weights_path, "its contents do not match the checksum it was saved with")
    return tensors


def _damaged(path: Path, problem: str) -> CopaValueError:
    return CopaValueError(
        f"The head file {str(path)!r} is damaged: {problem}. Re-save the head (save_pretrained), or "
        "re-download it (for a Hub repo: from_pretrained(..., force_download=True))."
    )


# --- pushing ---------------------------------------------------------------------------------------------


def push_artifact(
    repo_id: str,
    write: Any,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str = "Upload CoPA adapted head",
    revision: str | None = None,
):
    """Create the repo if needed and upload everything `write(folder, repo_id)` writes, in ONE commit.

    A failed commit leaves the repo unchanged; the error says so and that calling again retries.
    """
    from huggingface_hub import HfApi, get_token

    if token is False or (token is None and get_token() is None):
        raise ValueError(
            "push_to_hub needs a Hugging Face token with write access: pass token=..., set HF_TOKEN, "
            "or run `hf auth login`."
        )
    api = HfApi(token=token if isinstance(token, str) else None)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="copa-head-") as folder:
        write(Path(folder), repo.repo_id)
        try:
            return api.upload_folder(
                repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message, revision=revision
            )
        except Exception as err:
            err.add_note(
                f"hf_copa: the head was not pushed to {repo.repo_id!r}; the upload is a single commit, so "
                "the repo is unchanged and nothing local was modified. Call push_to_hub again to retry."
            )
            raise


__all__ = [
    "ARTIFACT_FILES",
    "AdaptedHead",
    "HEAD_CONFIG_KEY",
    "HEAD_WEIGHTS_NAME",
    "BaseModelReference",
    "HeadArtifact",
    "base_model_reference",
    "check_json_labels",
    "locate_artifact",
    "push_artifact",
    "read_artifact",
    "render_model_card",
    "write_artifact",
]
