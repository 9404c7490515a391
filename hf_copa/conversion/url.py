"""Convert URL's released checkpoints (`model_best.pth.tar`) into model folders, optionally pushed.

Two layouts, both saved by URL's `models/model_utils.py::CheckPointer.save_checkpoint` as {'epoch', 'args',
'state_dict', 'best_val_acc', 'best_val_loss'}: the multi-domain network (`url`, `models/resnet18_mdl.py`:
eight heads `cls_fn.{0..7}`), and the single-domain (`sdl`) networks of `scripts/train_resnet18_sdl.sh`
(`models/resnet18.py`: one head `cls_fn`, a linear layer, or `CosineClassifier` with `weight` [512, C] and
`scale`), whose source is `args['data.train']`. The config's `training_domains` names what the backbone was
trained on.

The folder is what `CopaModel.from_pretrained` and the Auto classes read: `config.json`,
`model.safetensors` (the backbone only), `preprocessor_config.json` and a `README.md` model card. URL's
eight domain classifiers (`cls_fn.*`) are not part of `CopaModel`; on request they go to a separate
`domain_classifiers.safetensors`, their output sizes and domains recorded in `config.json`.

Every check runs before anything is written, so a bad checkpoint leaves no half-written folder behind.

`convert_urt_checkpoint` does the same for a URT layer saved by liulu112601/URT's `urt-avg-head.py`: it
becomes the folder `hf-copa train-urt` writes, pinned to the backbone set it was trained for.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..configuration_copa import CopaConfig
from ..files import check_output_folder, match_umask, save_safetensors, write_text_atomically
from ..image_processing_copa import CopaImageProcessor
from ..modeling_copa import CopaModel
from ..quiet import quiet_transformers
from ..validation import CopaValueError

# URL's training domains, in the order of its `cls_fn.{0..7}` heads (Meta-Dataset's eight training sources).
URL_TRAINING_DOMAINS = (
    "ilsvrc_2012",
    "omniglot",
    "aircraft",
    "cu_birds",
    "dtd",
    "quickdraw",
    "fungi",
    "vgg_flower",
)
URL_DOMAIN_CLASSIFIER_SIZES = (712, 883, 70, 140, 33, 241, 994, 71)
DOMAIN_CLASSIFIER_PREFIX = "cls_fn."
DOMAIN_CLASSIFIERS_FILE = "domain_classifiers.safetensors"
MODEL_CARD_TEMPLATE = "base_model.md"
DEFAULT_COMMIT_MESSAGE = "Add the URL ResNet-18 backbone converted by hf-copa convert"

URT_CHECKPOINT_KEY = "URT_model"  # liulu112601/URT urt-avg-head.py l. 219-223
URT_CHECKPOINT_ARGS = (
    "urt.head",
    "urt.penalty_coef",
    "train.max_iter",
    "train.learning_rate",
    "train.weight_decay",
)
_URT_KEY = re.compile(r"layers\.(\d+)\.(linear_q|linear_k)\.(weight|bias)")
_URT_UNUSED = re.compile(r"layers\.\d+\.linear_v_w")  # only URTPropagation.forward_transform uses it

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_PICKLE_MAGIC = b"\x80\x02"  # torch.save before torch 1.6
_DOMAIN_KEY = re.compile(r"cls_fn\.(\d+)\.(weight|bias)")


@dataclass(frozen=True)
class UrlCheckpoint:
    """What a conversion keeps of URL's checkpoint: the backbone, the domain heads and the provenance."""

    backbone: dict[str, torch.Tensor]
    domain_classifiers: dict[str, torch.Tensor]  # `cls_fn.{i}.{weight,bias}`, URL's names
    domain_classifier_sizes: list[int]
    epoch: int | None
    best_val_acc: float | None
    best_val_loss: float | None
    source_name: str
    source_sha256: str
    training_domains: tuple[str, ...] = URL_TRAINING_DOMAINS


def converted_files(keep_domain_classifiers: bool = False) -> list[str]:
    """The files `convert_url_checkpoint` writes into its output folder, exactly."""
    files = ["config.json", "model.safetensors", "preprocessor_config.json", "README.md"]
    return files + ([DOMAIN_CLASSIFIERS_FILE] if keep_domain_classifiers else [])


def convert_url_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    keep_domain_classifiers: bool = False,
    push_to_hub: str | None = None,
    token: str | bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    stem_padding: int = 1,
    overwrite: bool = False,
    trained_on: str | None = None,
) -> Path:
    """Write a model folder for URL's `model_best.pth.tar` (plain or `.xz`) and optionally push it.

    A single-domain checkpoint names its source in `args['data.train']`; `trained_on` gives it where the
    checkpoint does not (and must agree where it does).

    `stem_padding` is the stem convolution's padding: 1 (the default) as every official test script
    builds the network it loads this checkpoint into (URL's `test_extractor_pa.py` / `test_extractor_tsa.py`,
    CoPA's `copa_pa.py` / `copa_tsa.py`, all through `models/resnet18.py`), so the converted model gives
    the features behind the published numbers; 2 as URL trained it (`models/resnet18_mdl.py`). The card
    says which. A non-empty `output_dir` is refused unless `overwrite`, which replaces only the files
    `converted_files` names (other files are kept). `push_to_hub="org/name"` creates the repo if needed and
    uploads those files in one commit. Raises `ValueError` naming the problem for a file that is not URL's
    checkpoint; every check runs before anything is written.
    """
    if stem_padding not in (1, 2):
        raise CopaValueError(f"stem_padding must be 1 or 2 (see the docstring), got {stem_padding!r}.")
    written = converted_files(keep_domain_classifiers)
    output = check_output_folder(output_dir, written, overwrite)
    checkpoint = load_url_checkpoint(checkpoint_path, trained_on)
    if keep_domain_classifiers and not checkpoint.domain_classifiers:
        raise CopaValueError(
            f"{checkpoint_path}: the checkpoint has no linear domain classifiers (cls_fn.*) to keep; "
            "convert without keep_domain_classifiers."
        )
    config = CopaConfig(
        stem_padding=stem_padding,
        training_domains=list(checkpoint.training_domains),
        **backbone_widths(checkpoint.backbone),
    )
    model = _backbone_model(config, checkpoint.backbone)
    if keep_domain_classifiers:
        config.domain_classifier_sizes = list(checkpoint.domain_classifier_sizes)
        config.domain_classifier_domains = (
            list(checkpoint.training_domains)
            if len(checkpoint.training_domains) == 1
            else _domain_names(checkpoint.domain_classifier_sizes)
        )

    output.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(output)
    match_umask(output / "model.safetensors")
    CopaImageProcessor.from_copa_config(config).save_pretrained(output)
    stale = output / DOMAIN_CLASSIFIERS_FILE
    if keep_domain_classifiers:
        save_safetensors(
            {name: tensor.contiguous() for name, tensor in checkpoint.domain_classifiers.items()},
            stale,
            metadata={"format": "pt", "domains": ",".join(config.domain_classifier_domains)},
        )
    elif stale.exists():
        stale.unlink()  # left by an earlier conversion that kept them; it would contradict config.json
    repo_id = push_to_hub or output.resolve().name
    write_text_atomically(output / "README.md", str(render_model_card(config, checkpoint, repo_id)))

    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(
            repo_id=push_to_hub, folder_path=output, allow_patterns=written, commit_message=commit_message
        )
    return output


def convert_urt_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    backbone_set: Any,
    temperature: float = 10.0,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Write the URT layer of a checkpoint that liulu112601/URT's `fast-exps/urt-avg-head.py` saved, for
    `evaluate --method urt --urt-head`, pinned to `backbone_set` (a `CopaBackboneSet`, the backbones whose
    cached features it was trained on, in that order).

    The checkpoint is `{'args', 'train_iter', 'optimizer', 'scheduler', 'URT_model'}` (l. 219-223), the model
    a `DataParallel(MultiHeadURT)` (l. 155-156: `module.layers.{h}.linear_q/linear_k.{weight,bias}` plus
    `linear_v_w`, which the avg head never uses and is dropped; attention temperature 1). The cosine
    temperature, a separate parameter (l. 158), is not saved there: `temperature` stands for it (its
    initial value by default). It scales every logit alike, so accuracies do not depend on it.
    """
    from ..learners.urt import URT_LAYER_CONFIG, URT_LAYER_WEIGHTS, URTLayer, push_urt_layer, save_urt_layer

    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise CopaValueError(f"temperature must be a positive number, got {temperature!r}.")
    output = check_output_folder(output_dir, [URT_LAYER_WEIGHTS, URT_LAYER_CONFIG, "README.md"], overwrite)
    path = Path(checkpoint_path)
    payload, sha256 = _read_checkpoint(path, "a checkpoint of URT's urt-avg-head.py (ckp-seed-*-iter-*.pth)")
    state = payload.get(URT_CHECKPOINT_KEY) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(map(str, payload))[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CopaValueError(
            f"{path}: expected URT's checkpoint, a dict whose {URT_CHECKPOINT_KEY!r} maps names to tensors, "
            f"but found {found}. A backbone checkpoint converts without --backbone-set."
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _URT_UNUSED.fullmatch(k)}
    unexpected = [k for k in state if not _URT_KEY.fullmatch(k)]
    firsts = [state.get("layers.0.linear_q.weight"), state.get("layers.0.linear_k.weight")]
    if unexpected or any(t is None or t.dim() != 2 for t in firsts):
        raise CopaValueError(
            f"{path}: not the parameters of URT's MultiHeadURT (layers.<head>.linear_q / linear_k)"
            + (f"; unexpected: {_listing(unexpected)}" if unexpected else "")
            + ". Only urt-avg-head.py's layer converts."
        )
    hidden, query_dim = state["layers.0.linear_q.weight"].shape
    key_dim = state["layers.0.linear_k.weight"].shape[1]
    members, feature_dim = backbone_set.num_backbones, backbone_set.feature_dim
    if (key_dim, query_dim) != (feature_dim, members * feature_dim):
        raise CopaValueError(
            f"{path}: the layer was trained for {query_dim // max(key_dim, 1)} backbones of {key_dim} "
            f"features, the set has {members} of {feature_dim}. Give the set it was trained on."
        )
    heads = len({k.split(".")[1] for k in state})
    layer = URTLayer(members, feature_dim, heads, hidden, attention_temperature=1.0, temperature=temperature)
    try:
        layer.load_state_dict({**state, "temperature": torch.tensor(float(temperature))}, strict=True)
    except RuntimeError as err:  # a head missing a tensor, or tensors of different sizes
        raise CopaValueError(
            f"{path}: URT's layer is incomplete or inconsistent ({' '.join(str(err).split())[:300]})."
        ) from None
    args = payload.get("args") if isinstance(payload.get("args"), dict) else {}
    training = {
        "converted_from": path.name,
        "source_sha256": sha256,
        "code": "liulu112601/URT fast-exps/urt-avg-head.py",
        "train_iter": _scalar(payload.get("train_iter"), int),
        **{k: args[k] for k in URT_CHECKPOINT_ARGS if isinstance(args.get(k), int | float | str)},
        "temperature": f"{float(temperature)} (not in the checkpoint; it scales the logits, not accuracies)",
        "backbone_set_name": getattr(backbone_set, "name_or_path", None),
        "backbone_set_revision": getattr(backbone_set, "revision", None),
    }
    save_urt_layer(layer, output, backbone_set.identity(), training)
    if push_to_hub:
        push_urt_layer(output, push_to_hub, token=token)
    return output


def load_url_checkpoint(checkpoint_path: str | Path, trained_on: str | None = None) -> UrlCheckpoint:
    """Read and check URL's checkpoint: every backbone tensor present, with the right shape, nothing else;
    a single-domain checkpoint's source from `args['data.train']` or `trained_on`."""
    path = Path(checkpoint_path)
    payload, sha256 = _read_checkpoint(path, "URL's model_best.pth.tar")
    if isinstance(payload, dict) and URT_CHECKPOINT_KEY in payload:
        raise CopaValueError(
            f"{path} is a URT layer's checkpoint (liulu112601/URT urt-avg-head.py), not a backbone: convert "
            "it with --backbone-set SET, the backbones it was trained on."
        )
    if not isinstance(payload, dict) or "state_dict" not in payload:
        found = sorted(map(str, payload))[:10] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path}: expected URL's checkpoint, a dict with a 'state_dict' entry (plus 'epoch', "
            f"'best_val_acc', ...), but found {found}. Pass the model_best.pth.tar file that URL released."
        )
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: 'state_dict' must map parameter names to tensors, got {type(state).__name__}."
        )
    backbone = {k: v for k, v in state.items() if not k.startswith(DOMAIN_CLASSIFIER_PREFIX)}
    heads = {k: v for k, v in state.items() if k.startswith(DOMAIN_CLASSIFIER_PREFIX)}
    _check_backbone(backbone, path)
    single = {name.removeprefix(DOMAIN_CLASSIFIER_PREFIX) for name in heads} <= {"weight", "bias", "scale"}
    if heads and single:
        heads = _single_domain_head(heads, path)
        training_domains = (_single_training_domain(payload.get("args"), trained_on, path),)
    else:
        if trained_on is not None:
            raise CopaValueError(
                f"{path} is URL's multi-domain checkpoint (trained on {', '.join(URL_TRAINING_DOMAINS)}); "
                "--trained-on applies to a single-domain (sdl) checkpoint only."
            )
        training_domains = URL_TRAINING_DOMAINS
    sizes = _check_domain_classifiers(heads, path, backbone_widths(backbone)["hidden_sizes"][-1])
    return UrlCheckpoint(
        backbone=backbone,
        domain_classifiers=heads,
        domain_classifier_sizes=sizes,
        epoch=_scalar(payload.get("epoch"), int),
        best_val_acc=_scalar(payload.get("best_val_acc"), float),
        best_val_loss=_scalar(payload.get("best_val_loss"), float),
        source_name=path.name,
        source_sha256=sha256,
        training_domains=training_domains,
    )


def _single_domain_head(heads: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A single-domain network's `cls_fn`: a linear layer is kept as `cls_fn.0.*` (the layout of the
    domain classifiers file); a `CosineClassifier` (weight [512, C] and a scale) is not kept."""
    if f"{DOMAIN_CLASSIFIER_PREFIX}scale" in heads:
        return {}
    return {
        f"{DOMAIN_CLASSIFIER_PREFIX}0.{name.removeprefix(DOMAIN_CLASSIFIER_PREFIX)}": t
        for name, t in heads.items()
    }


def _single_training_domain(args: Any, trained_on: str | None, path: Path) -> str:
    """The source a single-domain checkpoint was trained on: URL's `args['data.train']` (train_net.py's
    `--data.train`, a list of one name), or `trained_on`."""
    recorded = args.get("data.train") if isinstance(args, dict) else None
    if isinstance(recorded, list | tuple) and len(recorded) == 1:
        recorded = recorded[0]
    if recorded is not None and not isinstance(recorded, str):
        raise CopaValueError(
            f"{path}: a single-domain checkpoint should be trained on one source, but its args['data.train'] "
            f"is {recorded!r}."
        )
    if recorded is not None and trained_on is not None and recorded != trained_on:
        raise CopaValueError(
            f"{path} records that it was trained on {recorded!r}, not {trained_on!r}; drop --trained-on."
        )
    domain = recorded or trained_on
    if domain is None:
        raise CopaValueError(
            f"{path} is a single-domain (sdl) checkpoint that does not record its source (no "
            "args['data.train']); name it with --trained-on SOURCE (e.g. ilsvrc_2012)."
        )
    if domain not in URL_TRAINING_DOMAINS:
        raise CopaValueError(
            f"{path}: single-domain source {domain!r} is not one of URL's training sources "
            f"({', '.join(URL_TRAINING_DOMAINS)})."
        )
    return domain


def load_url_backbone(checkpoint_path: str | Path, stem_padding: int = 1) -> CopaModel:
    """URL's checkpoint as a `CopaModel` in eval mode, without writing anything.

    `stem_padding=1` builds the network URL's and CoPA's test scripts load the checkpoint into
    (`models/resnet18.py`); 2 is the network URL trained it in (`models/resnet18_mdl.py`); see
    `../shared/reference/README.md`.
    """
    backbone = load_url_checkpoint(checkpoint_path).backbone
    return _backbone_model(CopaConfig(stem_padding=stem_padding, **backbone_widths(backbone)), backbone)


def render_model_card(config: CopaConfig, checkpoint: UrlCheckpoint, repo_id: str):
    """The model card (`huggingface_hub.ModelCard`) from the packaged `base_model.md` template."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="transformers",
        license="mit",
        pipeline_tag="image-feature-extraction",
        tags=["hf_copa", "copa", "url", "few-shot-learning", "meta-dataset", "resnet-18"],
        model_name=repo_id,
    )
    final_map = (
        config.image_size + 2 * config.stem_padding - config.stem_kernel_size
    ) // config.stem_stride + 1
    for _ in config.depths[1:]:
        final_map = (final_map - 1) // 2 + 1  # each later stage opens with a stride-2, padding-1 3x3 conv
    template = resources.files("hf_copa") / "assets" / "model_cards" / MODEL_CARD_TEMPLATE
    return ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        model_name=repo_id,
        repo_id=repo_id,
        depths=", ".join(map(str, config.depths)),
        hidden_sizes=", ".join(map(str, config.hidden_sizes)),
        stem_kernel_size=config.stem_kernel_size,
        stem_stride=config.stem_stride,
        stem_padding=config.stem_padding,
        feature_dim=config.feature_dim,
        image_size=config.image_size,
        final_map_size=final_map,
        training_domains=checkpoint.training_domains,
        source_name=checkpoint.source_name,
        source_sha256=checkpoint.source_sha256,
        epoch=checkpoint.epoch,
        best_val_acc=checkpoint.best_val_acc,
        best_val_loss=checkpoint.best_val_loss,
        domain_classifier_sizes=config.domain_classifier_sizes,
    )


def load_domain_classifiers(model_path_or_id: str | Path, **hub_kwargs: Any) -> dict[str, torch.nn.Linear]:
    """URL's domain classifiers kept by `convert_url_checkpoint(..., keep_domain_classifiers=True)`.

    Returns one `nn.Linear(feature_dim, classes)` per training domain, keyed by domain name in URL's
    order. `hub_kwargs` (`revision`, `token`, ...) go to `hf_hub_download` for a Hub id.
    """
    config = CopaConfig.from_pretrained(model_path_or_id, **hub_kwargs)
    sizes = config.domain_classifier_sizes
    if not sizes:
        raise ValueError(
            f"{model_path_or_id} has no domain classifiers (no domain_classifier_sizes in config.json); "
            "convert with keep_domain_classifiers=True (hf-copa convert --keep-domain-classifiers)."
        )
    folder = Path(model_path_or_id)
    if folder.is_dir():
        file = folder / DOMAIN_CLASSIFIERS_FILE
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(str(model_path_or_id), DOMAIN_CLASSIFIERS_FILE, **hub_kwargs))
    tensors = load_file(file)
    domains = config.domain_classifier_domains or _domain_names(sizes)
    heads = {}
    for index, (domain, size) in enumerate(zip(domains, sizes, strict=True)):
        head = torch.nn.Linear(config.feature_dim, size)
        head.load_state_dict(
            {name: tensors[f"{DOMAIN_CLASSIFIER_PREFIX}{index}.{name}"] for name in ("weight", "bias")}
        )
        heads[domain] = head
    return heads


def _read_checkpoint(path: Path, expected: str) -> tuple[Any, str]:
    """(the unpickled payload, the file's sha256) of a plain or `.xz` `torch.save` file."""
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"The checkpoint path {str(path)!r} {reason}; give {expected}.")
    raw = path.read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    if raw.startswith(_XZ_MAGIC) or path.suffix == ".xz":
        raw = _decompress_xz(raw, path)
    return _torch_load(raw, path, expected), sha256


def _decompress_xz(raw: bytes, path: Path) -> bytes:
    try:
        return lzma.decompress(raw)
    except (lzma.LZMAError, EOFError) as err:
        raise ValueError(
            f"{path}: the xz-compressed data is corrupt or truncated ({err}); download the checkpoint again."
        ) from None


def _torch_load(raw: bytes, path: Path, expected: str) -> Any:
    if not raw.startswith((_ZIP_MAGIC, _LEGACY_PICKLE_MAGIC)):
        raise ValueError(
            f"{path}: not a PyTorch checkpoint (it starts with bytes {raw[:8]!r}, neither a torch.save zip "
            f"archive nor a legacy pickle). Pass {expected} (or its .xz)."
        )
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: the checkpoint holds Python objects that safe loading (weights_only=True) refuses: "
            f"{first_line}. Re-save only tensors and plain values."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(
            f"{path}: the PyTorch archive is corrupt or truncated ({str(err).strip()[:200]}); "
            "download the checkpoint again."
        ) from None


def backbone_widths(backbone: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The stem and stage widths of a ResNet-18 state_dict in URL's naming: URL's 64 / 64-128-256-512, or a
    narrower network of the same layout (the stand-ins `scripts/make_sdl_standins.py` writes); a tensor
    that is absent leaves URL's width, and `_check_backbone` then names what is missing or misshapen."""
    defaults = CopaConfig()
    stem = backbone.get("conv1.weight")
    stages = [backbone.get(f"layer{i}.0.conv1.weight") for i in range(1, 5)]
    return {
        "embedding_size": int(stem.shape[0]) if stem is not None and stem.ndim else defaults.embedding_size,
        "hidden_sizes": [
            int(t.shape[0]) if t is not None and t.ndim else width
            for t, width in zip(stages, defaults.hidden_sizes, strict=True)
        ],
    }


def _check_backbone(backbone: dict[str, torch.Tensor], path: Path) -> None:
    with torch.device("meta"):
        expected = CopaModel(CopaConfig(**backbone_widths(backbone))).state_dict()
    missing = [name for name in expected if name not in backbone]
    unexpected = [name for name in backbone if name not in expected]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} backbone tensor(s) of URL's ResNet-18 are missing: {_listing(missing)}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) belong neither to URL's ResNet-18 backbone nor to its cls_fn "
            f"domain classifiers: {_listing(unexpected)}"
        )
    if problems:
        raise ValueError(
            f"{path}: the state_dict is not URL's ResNet-18 (BasicBlock [2, 2, 2, 2], widths 64-128-256-512 "
            f"or a narrower network of that layout, 5x5 stem): "
            + "; ".join(problems)
            + ". Pass the checkpoint of URL's resnet18 backbone."
        )
    wrong = [
        f"{name} is {tuple(backbone[name].shape)}, expected {tuple(reference.shape)}"
        for name, reference in expected.items()
        if backbone[name].shape != reference.shape
    ]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} backbone tensor(s) have the wrong shape: {_listing(wrong)}.")
    for name, tensor in backbone.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: the backbone tensor {name} holds NaN or infinite values.")


def _check_domain_classifiers(heads: dict[str, torch.Tensor], path: Path, feature_dim: int) -> list[int]:
    """Output sizes of `cls_fn.0..K-1`, checking each is a complete [classes, 512] linear layer."""
    indices: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in heads.items():
        match = _DOMAIN_KEY.fullmatch(name)
        if match is None:
            raise ValueError(
                f"{path}: unexpected domain classifier tensor {name}; expected cls_fn.<i>.weight/bias."
            )
        indices.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if sorted(indices) != list(range(len(indices))):
        raise ValueError(f"{path}: the domain classifiers are numbered {sorted(indices)}, expected 0..K-1.")
    sizes = []
    for index in range(len(indices)):
        parts = indices[index]
        weight, bias = parts.get("weight"), parts.get("bias")
        if weight is None or bias is None:
            raise ValueError(f"{path}: cls_fn.{index} lacks its {'weight' if weight is None else 'bias'}.")
        if weight.ndim != 2 or weight.shape[1] != feature_dim or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{path}: cls_fn.{index} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}; "
                f"expected [classes, {feature_dim}] and [classes]."
            )
        sizes.append(int(weight.shape[0]))
    return sizes


def _backbone_model(config: CopaConfig, backbone: dict[str, torch.Tensor]) -> CopaModel:
    model = CopaModel(config)
    model.load_state_dict(backbone, strict=True)  # already checked; strict guards the invariant
    return model.eval()


def _domain_names(sizes: list[int]) -> list[str]:
    if tuple(sizes) == URL_DOMAIN_CLASSIFIER_SIZES:
        return list(URL_TRAINING_DOMAINS)
    return [f"domain_{index}" for index in range(len(sizes))]


def _scalar(value: Any, kind: type) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return kind(value)
    return None


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


__all__ = [
    "DOMAIN_CLASSIFIERS_FILE",
    "URL_TRAINING_DOMAINS",
    "UrlCheckpoint",
    "convert_url_checkpoint",
    "convert_urt_checkpoint",
    "converted_files",
    "load_domain_classifiers",
    "load_url_backbone",
    "load_url_checkpoint",
    "render_model_card",
]
