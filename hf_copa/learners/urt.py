"""URT (Liu, Hamilton, Long, Jiang & Larochelle, ICLR 2021): a Universal Representation Transformer layer,
meta-trained on the training sources, weighs several backbones' features per task; then a cosine prototype
classifier with a learned temperature.

The layer and its use at test time follow the official code (liulu112601/URT):

- `fast-exps/lib/models/new_prop_prototype.py` `URTPropagation` / `MultiHeadURT`: per head, a query
  projection of the concatenated class prototype (B * d -> 1024) and a key projection of each backbone's
  part of it (d -> 1024), both `nn.Linear` with bias and weights drawn from N(0, 0.001^2) (biases keep
  PyTorch's default); the score is their dot product / sqrt(d), softmaxed over backbones (temperature 1,
  `att="dotproduct"`, as `urt-avg-head.py` builds it with `key_dim=512, query_dim=8*512, hid_dim=1024`);
- `get_lambda_urt_avg`: the class prototypes of the `F.normalize`d features, scored per class, averaged over
  classes: the weights [B, H] of this task;
- `apply_urt_avg_selection` (value="sum"): per head the weighted sum of the normalised features, heads side
  by side [N, H * d] (`hf_copa.losses.combine_backbones`);
- `urt-avg-head.py` `get_cosine_logits` / `test_all_dataset`: prototypes are the class means of the combined
  support features; logits = temperature * cos (PyTorch's eps, 1e-8), the temperature a trained parameter
  (initialised 10).

The official layer also holds `linear_v_w` (eight identity matrices) that only `forward_transform` uses; the
training script never calls it, so it is left out. The layer's training is `hf_copa.training.urt`; its
artifact (`save_urt_layer` / `load_urt_layer`) pins the backbone set it was trained on.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..files import save_safetensors, write_text_atomically
from ..heads import BackboneWeightsHead
from ..losses import class_means, combine_backbones, combined_prototypes, one_hot_labels
from ..validation import CopaValueError
from .base import Learner
from .registry import register_learner

URT_LAYER_WEIGHTS = "urt_layer.safetensors"
URT_LAYER_CONFIG = "urt_config.json"
URT_FORMAT_VERSION = 1
URT_COSINE_EPS = 1e-8  # F.cosine_similarity's default, which get_cosine_logits uses
WEIGHT_INIT_STD = 0.001  # URTPropagation.__init__: m.weight.data.normal_(0, 0.001)


class URTHead(nn.Module):
    """One head of the layer (`URTPropagation` with att="dotproduct"): [C, B, d] prototypes -> [C, B]."""

    def __init__(
        self, num_backbones: int, feature_dim: int, hidden_dim: int, attention_temperature: float
    ) -> None:
        super().__init__()
        self.linear_q = nn.Linear(num_backbones * feature_dim, hidden_dim)
        self.linear_k = nn.Linear(feature_dim, hidden_dim)
        self.attention_temperature = attention_temperature
        for linear in (self.linear_q, self.linear_k):
            linear.weight.data.normal_(0, WEIGHT_INIT_STD)

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        classes, _, feature_dim = prototypes.shape
        query = self.linear_q(prototypes.reshape(classes, -1))  # [C, hidden]
        keys = self.linear_k(prototypes)  # [C, B, hidden]
        raw = (query.unsqueeze(1) * keys).sum(-1) / math.sqrt(feature_dim)
        return F.softmax(self.attention_temperature * raw, dim=1)


class URTLayer(nn.Module):
    """URT's layer (`MultiHeadURT`) with the classifier's temperature: prototypes [C, B, d] -> scores
    [C, B, H]; `task_weights` gives a task's [B, H]."""

    def __init__(
        self,
        num_backbones: int,
        feature_dim: int,
        heads: int = 2,
        hidden_dim: int = 1024,
        attention_temperature: float = 1.0,
        temperature: float = 10.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [URTHead(num_backbones, feature_dim, hidden_dim, attention_temperature) for _ in range(heads)]
        )
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.shape = {
            "num_backbones": num_backbones,
            "feature_dim": feature_dim,
            "heads": heads,
            "hidden_dim": hidden_dim,
            "attention_temperature": attention_temperature,
        }

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(prototypes) for layer in self.layers], dim=-1)

    def task_weights(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`get_lambda_urt_avg`: [B, H] from support features [N, B, d] and labels 0..C-1."""
        unit = F.normalize(features, dim=-1)
        classes = int(labels.max()) + 1
        one_hot = one_hot_labels(labels.unsqueeze(0), classes, unit.dtype)
        prototypes = class_means(unit.flatten(1).unsqueeze(0), one_hot)[0].view(classes, *unit.shape[1:])
        return self(prototypes).mean(dim=0)

    def episode_logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query logits [M, C], task weights [B, H]) of one episode, differentiable (training)."""
        weights = self.task_weights(support, support_labels)
        _, prototypes = combined_prototypes(support, support_labels, weights, "sum")
        queries = combine_backbones(query, weights, "sum")
        cosine = F.cosine_similarity(queries.unsqueeze(1), prototypes.unsqueeze(0), dim=-1)
        return self.temperature * cosine, weights


def head_diversity_penalty(weights: torch.Tensor) -> torch.Tensor:
    """URT's regulariser ||Lambda^T Lambda - I||_F^2 of a task's weights [B, H] (`urt-avg-head.py` l. 196)."""
    gram = weights.T @ weights
    return torch.linalg.matrix_norm(
        gram - torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    ).square()


# --- the artifact --------------------------------------------------------------------------------------


def save_urt_layer(
    layer: URTLayer, folder: str | Path, backbone_set: Mapping[str, Any], training: Mapping[str, Any]
) -> Path:
    """Write a trained layer: tensors, shape, the backbone set it was trained on, how it was trained."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in layer.state_dict().items()}
    save_safetensors(tensors, folder / URT_LAYER_WEIGHTS, metadata={"format": "pt"})
    config = {
        "format_version": URT_FORMAT_VERSION,
        "method": "urt",
        **layer.shape,
        "temperature": float(layer.temperature.detach()),
        "backbone_set": dict(backbone_set),
        "training": dict(training),
    }
    write_text_atomically(folder / URT_LAYER_CONFIG, json.dumps(config, indent=2) + "\n")
    names = ", ".join(f"`{n}`" for n in backbone_set.get("backbones", []))
    if "converted_from" in training:
        origin = (
            f"Converted by `hf-copa convert` from `{training['converted_from']}`, a checkpoint of the "
            f"official `{training.get('code')}` (iteration {training.get('train_iter')}); temperature "
            f"{training.get('temperature')}. It weighs the features of {names}"
        )
    else:
        origin = (
            f"Trained by `hf-copa train-urt` on {training.get('episodes')} episodes of "
            f"{', '.join(training.get('sources', []))}, over the features of {names}"
        )
    write_text_atomically(
        folder / "README.md",
        "---\nlibrary_name: hf_copa\ntags:\n- hf_copa\n- few-shot\n- urt\n---\n\n"
        f"# A URT layer ({layer.shape['heads']} heads) for {layer.shape['num_backbones']} backbones\n\n"
        f"{origin} (set `{training.get('backbone_set_name')}`). Use it with that set only: "
        "`hf-copa evaluate --model SET --method urt --urt-head THIS`.\n",
    )
    return folder


def push_urt_layer(
    folder: str | Path, repo_id: str, token: str | bool | None = None, private: bool | None = None
):
    """Upload a trained layer to the Hub, one commit (`load_urt_layer("ORG/NAME@COMMIT")` reads it)."""
    from ..heads import push_artifact

    def copy(target: Path, _repo: str) -> None:
        for name in (URT_LAYER_WEIGHTS, URT_LAYER_CONFIG, "README.md"):
            (target / name).write_bytes((Path(folder) / name).read_bytes())

    return push_artifact(repo_id, copy, token=token, private=private, commit_message="Upload URT layer")


@functools.lru_cache(maxsize=8)
def _cached_layer(folder: str, modified: float) -> tuple[URTLayer, dict[str, Any]]:
    del modified  # part of the key only: a re-trained layer in the same folder is read again
    path = Path(folder)
    try:
        config = json.loads((path / URT_LAYER_CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CopaValueError(
            f"{str(path / URT_LAYER_CONFIG)!r} cannot be read ({err}); re-train or re-download."
        ) from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int) or version > URT_FORMAT_VERSION:
        raise CopaValueError(
            f"{str(path)!r} holds a URT layer of format {version!r}, which this hf_copa does not read."
        )
    from safetensors.torch import load_file

    try:
        layer = URTLayer(
            config["num_backbones"],
            config["feature_dim"],
            config["heads"],
            config["hidden_dim"],
            config["attention_temperature"],
        )
        layer.load_state_dict(load_file(path / URT_LAYER_WEIGHTS), strict=True)
    except (KeyError, OSError, RuntimeError, ValueError) as err:
        raise CopaValueError(
            f"The URT layer in {str(path)!r} is damaged ({type(err).__name__}: {err}); train it again."
        ) from None
    return layer.eval(), config


def load_urt_layer(name_or_path: str, revision: str | None = None) -> tuple[URTLayer, dict[str, Any]]:
    """(layer, its config) from a folder `hf-copa train-urt` wrote, or a Hub repo (`ID` or `ID@REVISION`)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        repo_id, _, pinned = str(name_or_path).partition("@")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            path = Path(snapshot_download(repo_id, revision=pinned or revision))
        except (HFValidationError, RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise CopaValueError(
                f"{str(name_or_path)!r} is neither a folder written by `hf-copa train-urt` nor a Hub repo "
                f"holding one ({type(err).__name__})."
            ) from None
    if not (path / URT_LAYER_CONFIG).is_file():
        raise CopaValueError(
            f"{str(name_or_path)!r} holds no URT layer (no {URT_LAYER_CONFIG}); see `hf-copa train-urt`."
        )
    return _cached_layer(
        str(path.resolve()),
        (path / URT_LAYER_WEIGHTS).stat().st_mtime if (path / URT_LAYER_WEIGHTS).exists() else 0.0,
    )


# --- the learner ---------------------------------------------------------------------------------------


@register_learner("urt")
class URTLearner(Learner):
    description = (
        "URT: a meta-trained layer weighs several backbones per task (needs a backbone set and --urt-head)"
    )
    feature_kind = "backbones"
    default_hyperparameters = {"urt_head": None}
    presets = {"default": {}}

    def layer(self) -> tuple[URTLayer, dict[str, Any]]:
        name = self.hyperparameters["urt_head"]
        if name is None:
            raise CopaValueError(
                "urt needs a trained URT layer: pass urt_head=PATH_OR_ID (--urt-head on the command line), "
                "written by `hf-copa train-urt` for this backbone set."
            )
        return load_urt_layer(name)

    def check_model(self, model: Any) -> None:
        super().check_model(model)
        _, config = self.layer()
        model.check_identity(config["backbone_set"], f"The URT layer {self.hyperparameters['urt_head']!r}")

    def fit_batch(
        self, features: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> list[BackboneWeightsHead]:
        layer, config = self.layer()
        expected = (config["num_backbones"], config["feature_dim"])
        if tuple(features.shape[2:]) != expected:
            raise CopaValueError(
                f"The URT layer {self.hyperparameters['urt_head']!r} was trained on {expected[0]} "
                f"x {expected[1]}-d features, these are {tuple(features.shape[2:])}; use the set it "
                "was trained on."
            )
        parameter = layer.temperature
        if (parameter.device, parameter.dtype) != (features.device, features.dtype):
            # A converted copy: the loaded layer is cached and shared, and must stay as it was read.
            layer = copy.deepcopy(layer).to(features.device, features.dtype)
        heads = []
        with torch.no_grad():
            for episode_features, episode_labels in zip(features, labels, strict=True):
                keep = episode_labels >= 0
                support, support_labels = episode_features[keep], episode_labels[keep]
                heads.append(
                    BackboneWeightsHead.fitted(
                        support,
                        support_labels,
                        layer.task_weights(support, support_labels),
                        combination="sum",
                        cosine_eps=URT_COSINE_EPS,
                        scale=float(layer.temperature.detach()),
                        method=self.name,
                        hyperparameters=self.hyperparameters,
                        backbone_set=config["backbone_set"],
                    )
                )
        return heads
