"""The adapted head: what adaptation learns for one task, and its artifact (save, load, push, card).

A head scores query features by its method's rule: `AdaptedHead` is the cosine rule of NCC, URL, CoPA and
TSA (scale * cos(q A^T, P B^T)); `LinearHead` is a linear (or cosine) classifier with bias (Finetune,
fo-Proto-MAML); `MahalanobisHead` scores by per-class precision matrices (Simple CNAPS' classifier). Each
kind is registered here under its `scoring` name, which the artifact records. Like a PEFT adapter, the
artifact is small (a few MB for 512-d features) and names the backbone it was adapted on instead of holding
it. A folder (or Hub repo) holds:

- `head.safetensors`: `prototypes` [C, d] (the support set's class means), the rule's own tensors
  (`image_projection` / `prototype_projection` [d, d], stored once when they are equal as URL's single head
  is; `weight` [C, d] and `bias` [C]; `precisions` [C, d, d]), and what the head changes inside the backbone:
  TSA's residual adapters as `adapters.<convolution>` [out, in, 1, 1], fine-tuned backbone parameters as
  `backbone.<parameter>`;
- `config.json`: the base model's config (`CopaConfig`, `EfficientNetLiteConfig`, ...; so transformers'
  Auto classes and `pipeline` find the model), `id2label` / `label2id`, and the head's metadata under
  `copa_head` (labels with their JSON types, method, scoring rule, hyperparameters, scale, support shots,
  base model id + revision, hf_copa version);
- `preprocessor_config.json`: the image processor, so `pipeline` finds one;
- `README.md`: the model card.

Format versions: 1 is the cosine rule alone, 2 adds adapters, 3 adds the other scoring rules and
fine-tuned backbone parameters. A head is written with the lowest version that holds it, so older hf_copa
releases keep reading what they can score and refuse (rather than misread) what they cannot.

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
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ._version import __version__
from .files import save_safetensors, write_text_atomically
from .losses import (
    BACKBONE_COMBINATIONS,
    combine_backbones,
    combined_prototypes,
    cosine_matrix,
    cosine_scores,
    tf_l2_normalize,
)
from .validation import CopaTypeError, CopaValueError, as_feature_maps, as_feature_matrix, as_feature_stack

if TYPE_CHECKING:
    from .configuration_backbone import BackboneConfig

HEAD_WEIGHTS_NAME = "head.safetensors"
CONFIG_NAME = "config.json"
PROCESSOR_NAME = "preprocessor_config.json"
CARD_NAME = "README.md"
HEAD_CONFIG_KEY = "copa_head"
# 1: the cosine rule; 2: + adapters; 3: + other scoring rules and fine-tuned backbone parameters. Each head
# is written as the lowest version that holds it (see `format_version`).
FORMAT_VERSION = 3
ADAPTER_PREFIX = "adapters."
BACKBONE_PREFIX = "backbone."
ARTIFACT_FILES = (CONFIG_NAME, HEAD_WEIGHTS_NAME, PROCESSOR_NAME)
CARD_TEMPLATE = Path(__file__).parent / "assets" / "model_cards" / "adapted_head.md"
_JSON_LABEL_TYPES = (str, int, float, bool, type(None))


class AdaptedHead(nn.Module):
    """What adaptation learns for one task; this class is the cosine rule, logits = scale * cos(q A^T, P B^T).

    `prototypes` are the class means of the support features; `image_projection`
    (A) and `prototype_projection` (B) are d x d maps, None meaning identity
    (NCC). URL's single head is A = B; CoPA learns both. The other scoring rules
    are subclasses (`LinearHead`, `MahalanobisHead`), registered by `scoring`.

    What a head changes inside the backbone, the query features are those of the
    backbone run with it (`backbone.extract_features(images, **head.backbone_state())`):
    `adapters` (TSA, CoPA+TSA) are residual adapters by convolution name (see
    `hf_copa.adapters`); `backbone_weights` (methods that fine-tune all layers)
    replace backbone parameters by name, leaving the shared backbone untouched.
    """

    scoring: ClassVar[str] = "cosine"
    # What `logits` takes: pooled features [N, d], or feature maps [N, d, h, w] before pooling.
    feature_kind: ClassVar[str] = "pooled"
    # The tensors of the rule besides `prototypes`, as stored in head.safetensors.
    rule_tensor_names: ClassVar[tuple[str, ...]] = ("image_projection", "prototype_projection")

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
        backbone_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.register_buffer("image_projection", _detached(image_projection))
        self.register_buffer("prototype_projection", _detached(prototype_projection))
        # Not buffers: their names hold dots. `_apply` moves them with the module.
        self.adapters = {name: alpha.detach().clone() for name, alpha in (adapters or {}).items()}
        self.backbone_weights = {
            name: weight.detach().clone() for name, weight in (backbone_weights or {}).items()
        }
        self.scale = float(scale)
        self.method = method
        self.hyperparameters = dict(hyperparameters or {})
        self.train_losses = [float(x) for x in train_losses]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> AdaptedHead:
        super()._apply(fn, recurse)
        self.adapters = {name: fn(alpha) for name, alpha in self.adapters.items()}
        self.backbone_weights = {name: fn(weight) for name, weight in self.backbone_weights.items()}
        return self

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.prototypes.shape[1]

    @property
    def adapts_backbone(self) -> bool:
        """Whether the query features must come from the backbone run with this head's state."""
        return bool(self.adapters or self.backbone_weights)

    def backbone_state(self) -> dict[str, Mapping[str, torch.Tensor]]:
        """What this head changes inside the backbone, as keyword arguments of `CopaModel` and
        `extract_features`."""
        state: dict[str, Mapping[str, torch.Tensor]] = {}
        if self.adapters:
            state["adapters"] = self.adapters
        if self.backbone_weights:
            state["weights"] = self.backbone_weights
        return state

    def project_images(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.image_projection is None else features @ self.image_projection.T

    def projected_prototypes(self) -> torch.Tensor:
        protos = self.prototypes
        return protos if self.prototype_projection is None else protos @ self.prototype_projection.T

    @torch.no_grad()
    def logits(self, query_features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[Nq, d] query features -> [Nq, C] logits."""
        return self.score(self._query(query_features))

    def score(self, query: torch.Tensor) -> torch.Tensor:
        """The scoring rule on checked [Nq, d] query features of the prototypes' dtype."""
        scores = cosine_scores(
            self.project_images(query).unsqueeze(0), self.projected_prototypes().unsqueeze(0), self.scale
        )
        return scores[0]

    def _query(self, query_features: torch.Tensor | np.ndarray) -> torch.Tensor:
        return as_feature_matrix(query_features, "query_features", self.feature_dim).to(self.prototypes)

    def embedding_space(self) -> str:
        """In words, the space `view` maps to (the Space's "after adaptation" title)."""
        image, prototype = self.image_projection, self.prototype_projection
        if image is None and prototype is None:
            return "nothing learned, same space"
        if prototype is None or torch.equal(image, prototype):
            return "one map Θ for images and prototypes"
        return "Θ_I for images, Θ_P for prototypes"

    def view(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, prototypes) embedded where the rule compares them: [N, d'] and [C, d']."""
        return self.project_images(image_features.to(self.prototypes)), self.projected_prototypes()

    def rule_tensors(self) -> dict[str, torch.Tensor | None]:
        """The rule's tensors by stored name (None: absent)."""
        return {name: getattr(self, name) for name in self.rule_tensor_names}

    def rule_metadata(self) -> dict[str, Any]:
        """What the rule needs besides its tensors, stored in `copa_head` (JSON)."""
        return {}

    @classmethod
    def from_stored(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], **common: Any
    ) -> AdaptedHead:
        """The head from its stored rule tensors and metadata; `common` holds the shared fields."""
        image = tensors.get("image_projection")
        prototype = image if metadata.get("tied_projections") else tensors.get("prototype_projection")
        return cls(common.pop("prototypes"), image, prototype, **common)

    def shape_problem(self) -> str | None:
        """What is wrong with the tensors' shapes, or None (a loaded head must be scorable)."""
        if self.prototypes.ndim != 2:
            return "its prototypes are not a [classes, dim] matrix"
        square = (self.feature_dim, self.feature_dim)
        for tensor in (self.image_projection, self.prototype_projection):
            if tensor is not None and tuple(tensor.shape) != square:
                return f"a projection has shape {tuple(tensor.shape)}, not {square}"
        return None

    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        return self.logits(query_features)

    def extra_repr(self) -> str:
        adapters = f", adapters={len(self.adapters)}" if self.adapters else ""
        weights = f", backbone_weights={len(self.backbone_weights)}" if self.backbone_weights else ""
        return (
            f"method={self.method!r}, scoring={self.scoring!r}, classes={self.num_classes}, "
            f"dim={self.feature_dim}{adapters}{weights}"
        )


HEAD_KINDS: dict[str, type[AdaptedHead]] = {"cosine": AdaptedHead}


def register_head_kind(cls: type[AdaptedHead]) -> type[AdaptedHead]:
    """Class decorator: make a scoring rule loadable from artifacts by its `scoring` name."""
    if cls.scoring in HEAD_KINDS:
        raise ValueError(f"A head kind named {cls.scoring!r} is already registered.")
    HEAD_KINDS[cls.scoring] = cls
    return cls


@register_head_kind
class LinearHead(AdaptedHead):
    """A linear classifier, logits = q W^T + b (Finetune, fo-Proto-MAML), or with `cosine=True` Meta-Dataset's
    cosine classifier, logits = scale * (q / |q|) W^T (no bias; the weights are stored as it uses them, and
    the query is normalised as TensorFlow's `l2_normalize` with epsilon 1e-3 does).

    `prototypes` stay the support set's class means (for views and analyses); the rule is `weight` [C, d] and
    `bias` [C] (None: no bias).
    """

    scoring = "linear"
    rule_tensor_names = ("weight", "bias")

    def __init__(
        self,
        prototypes: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        cosine: bool = False,
        scale: float = 1.0,
        **common: Any,
    ) -> None:
        super().__init__(prototypes, scale=scale, **common)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", _detached(bias))
        self.cosine = bool(cosine)

    def score(self, query: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            return self.scale * tf_l2_normalize(query) @ self.weight.T
        logits = query @ self.weight.T
        return logits if self.bias is None else logits + self.bias

    def embedding_space(self) -> str:
        return "features unchanged; a class is its learned weight vector"

    def view(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image_features.to(self.prototypes), self.weight

    def rule_metadata(self) -> dict[str, Any]:
        return {"cosine": self.cosine}

    @classmethod
    def from_stored(cls, tensors, metadata, **common):
        return cls(
            common.pop("prototypes"),
            tensors["weight"],
            tensors.get("bias"),
            cosine=bool(metadata.get("cosine", False)),
            **common,
        )

    def shape_problem(self) -> str | None:
        expected = (self.num_classes, self.feature_dim)
        if self.prototypes.ndim != 2 or tuple(self.weight.shape) != expected:
            return f"its weight has shape {tuple(self.weight.shape)}, not {expected}"
        if self.bias is not None and tuple(self.bias.shape) != (self.num_classes,):
            return f"its bias has shape {tuple(self.bias.shape)}, not ({self.num_classes},)"
        return None


@register_head_kind
class MahalanobisHead(AdaptedHead):
    """Simple CNAPS' classifier: logits_k = -(q - mu_k)^T P_k (q - mu_k), with `prototypes` the class means
    mu_k and `precisions` [C, d, d] the per-class precision matrices P_k = Q_k^-1 (`learners.mahalanobis`).

    Stored in float32, a 50-way head on 512-d features is 50 x 512 x 512 x 4 bytes = 52.4 MB.
    """

    scoring = "mahalanobis"
    rule_tensor_names = ("precisions",)

    def __init__(self, prototypes: torch.Tensor, precisions: torch.Tensor, **common: Any) -> None:
        common.setdefault("scale", 1.0)
        super().__init__(prototypes, **common)
        self.register_buffer("precisions", precisions.detach().clone())

    def score(self, query: torch.Tensor) -> torch.Tensor:
        difference = self.prototypes.unsqueeze(0) - query.unsqueeze(1)  # [Nq, C, d]
        weighted = torch.einsum("qcd,cde->qce", difference, self.precisions)
        return -(weighted * difference).sum(-1)

    def embedding_space(self) -> str:
        return "features unchanged; each class measures distance by its own covariance"

    def view(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image_features.to(self.prototypes), self.prototypes

    @classmethod
    def from_stored(cls, tensors, metadata, **common):
        return cls(common.pop("prototypes"), tensors["precisions"], **common)

    def shape_problem(self) -> str | None:
        expected = (self.num_classes, self.feature_dim, self.feature_dim)
        if self.prototypes.ndim != 2 or tuple(self.precisions.shape) != expected:
            return f"its precisions have shape {tuple(self.precisions.shape)}, not {expected}"
        return None


@register_head_kind
class TransformerHead(AdaptedHead):
    """CoPA's transformer head (App. E.4): logits = scale * cos(E_I(query maps), P), with E_I the image
    encoder (`hf_copa.prototype_transformer`) over each query's [d, h, w] feature map and P [C, d] the
    prototype encoder's outputs for the class-mean maps, fixed once adapted.

    Its queries are feature maps before pooling (`feature_kind = "maps"`); `prototypes` stay the class means
    of the pooled support features. Stored: `prototype_embeddings` and the image encoder's tensors as
    `image_encoder.<name>` (about 4 d^2 values: 4.2 MB at d = 512).
    """

    scoring = "transformer"
    feature_kind = "maps"
    ENCODER_PREFIX = "image_encoder."

    def __init__(
        self,
        prototypes: torch.Tensor,
        prototype_embeddings: torch.Tensor,
        image_encoder: Mapping[str, torch.Tensor],
        heads: int,
        map_shape: Sequence[int],
        **common: Any,
    ) -> None:
        super().__init__(prototypes, **common)
        self.register_buffer("prototype_embeddings", prototype_embeddings.detach().clone())
        self.image_encoder = {name: tensor.detach().clone() for name, tensor in image_encoder.items()}
        self.heads = int(heads)
        self.map_shape = tuple(int(n) for n in map_shape)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TransformerHead:
        super()._apply(fn, recurse)
        self.image_encoder = {name: fn(tensor) for name, tensor in self.image_encoder.items()}
        return self

    def _query(self, query_features: torch.Tensor | np.ndarray) -> torch.Tensor:
        return as_feature_maps(query_features, "query_features", self.map_shape).to(self.prototypes)

    def embed_images(self, maps: torch.Tensor) -> torch.Tensor:
        from .prototype_transformer import encode

        return encode(self.image_encoder, maps.to(self.prototypes), self.heads)

    def score(self, query: torch.Tensor) -> torch.Tensor:
        embedded = self.embed_images(query).unsqueeze(0)
        return cosine_scores(embedded, self.prototype_embeddings.unsqueeze(0), self.scale)[0]

    def embedding_space(self) -> str:
        return "a transformer over each image's feature map, another over each class's mean map"

    def view(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_images(image_features), self.prototype_embeddings

    def rule_tensors(self) -> dict[str, torch.Tensor | None]:
        tensors = {self.ENCODER_PREFIX + name: tensor for name, tensor in self.image_encoder.items()}
        return {"prototype_embeddings": self.prototype_embeddings, **tensors}

    def rule_metadata(self) -> dict[str, Any]:
        return {"heads": self.heads, "map_shape": list(self.map_shape)}

    @classmethod
    def from_stored(cls, tensors, metadata, **common):
        encoder = _prefixed(tensors, cls.ENCODER_PREFIX)
        return cls(
            common.pop("prototypes"),
            tensors["prototype_embeddings"],
            encoder,
            heads=metadata["heads"],
            map_shape=metadata["map_shape"],
            **common,
        )

    def shape_problem(self) -> str | None:
        dim = self.feature_dim
        if self.prototypes.ndim != 2 or tuple(self.prototype_embeddings.shape) != (self.num_classes, dim):
            return f"its prototype embeddings have shape {tuple(self.prototype_embeddings.shape)}"
        if len(self.map_shape) != 3 or self.map_shape[0] != dim or self.heads < 1 or dim % self.heads:
            return f"its map shape {self.map_shape} or head count {self.heads} do not fit {dim}-d features"
        positions = 1 + self.map_shape[1] * self.map_shape[2]
        expected = {"cls_token": (dim,), "position_embeddings": (positions, dim)}
        blocks = {name.split(".")[1] for name in self.image_encoder if name.startswith("blocks.")}
        for b in blocks:
            for name in ("query", "key", "value", "output"):
                expected[f"blocks.{b}.{name}.weight"] = (dim, dim)
                expected[f"blocks.{b}.{name}.bias"] = (dim,)
            expected[f"blocks.{b}.norm.weight"] = expected[f"blocks.{b}.norm.bias"] = (dim,)
        shapes = {name: tuple(tensor.shape) for name, tensor in self.image_encoder.items()}
        if not blocks or shapes != expected:
            return "its image encoder's tensors are not those of a transformer for these maps"
        return None


@register_head_kind
class BackboneWeightsHead(AdaptedHead):
    """Weights over several backbones' features, then a cosine prototype classifier: SUR's and URT's rule.

    Queries are a `CopaBackboneSet`'s features [N, B, d] (`feature_kind = "backbones"`). `selection` [B, H]
    weighs the backbones (SUR: H = 1, sigmoid of the fitted lambdas; URT: the layer's H heads' scores),
    `combination` says how (`hf_copa.losses.combine_backbones`), and the logits are scale * cos(combined
    query, prototype) with each norm floored at `cosine_eps` (SUR 1e-30, URT PyTorch's default 1e-8).
    `prototypes` are the class means of the combined support features. `backbone_set` records the set's
    `identity()` (names and weight fingerprints) when a set adapted the head, so that no other set scores it.
    """

    scoring = "backbone-weights"
    feature_kind = "backbones"
    rule_tensor_names = ("selection",)

    def __init__(
        self,
        prototypes: torch.Tensor,
        selection: torch.Tensor,
        combination: str,
        cosine_eps: float,
        backbone_set: Mapping[str, Any] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(prototypes, **common)
        self.register_buffer("selection", selection.detach().clone())
        self.combination = combination
        self.cosine_eps = float(cosine_eps)
        self.backbone_set = None if backbone_set is None else dict(backbone_set)

    @classmethod
    def fitted(
        cls,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        selection: torch.Tensor,
        combination: str,
        cosine_eps: float,
        **common: Any,
    ) -> BackboneWeightsHead:
        """The head whose prototypes are the class means of the combined support features [N, B, d]."""
        _, prototypes = combined_prototypes(support, support_labels, selection, combination)
        return cls(prototypes, selection, combination, cosine_eps, **common)

    @property
    def num_backbones(self) -> int:
        return self.selection.shape[0]

    @property
    def backbone_dim(self) -> int:
        """d, each backbone's feature size."""
        parts = self.num_backbones if self.combination == "concatenate" else self.selection.shape[1]
        return self.feature_dim // parts

    def _query(self, query_features: torch.Tensor | np.ndarray) -> torch.Tensor:
        expected = (self.num_backbones, self.backbone_dim)
        return as_feature_stack(query_features, "query_features", expected).to(self.prototypes)

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        return combine_backbones(features.to(self.prototypes), self.selection, self.combination)

    def score(self, query: torch.Tensor) -> torch.Tensor:
        return self.scale * cosine_matrix(self.combine(query), self.prototypes, self.cosine_eps)

    def embedding_space(self) -> str:
        return "the backbones' normalised features, weighted and " + (
            "concatenated" if self.combination == "concatenate" else "summed per head"
        )

    def view(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.combine(image_features), self.prototypes

    def rule_metadata(self) -> dict[str, Any]:
        return {
            "combination": self.combination,
            "cosine_eps": self.cosine_eps,
            "backbone_set": self.backbone_set,
        }

    @classmethod
    def from_stored(cls, tensors, metadata, **common):
        return cls(
            common.pop("prototypes"),
            tensors["selection"],
            combination=metadata["combination"],
            cosine_eps=metadata["cosine_eps"],
            backbone_set=metadata.get("backbone_set"),
            **common,
        )

    def shape_problem(self) -> str | None:
        if self.combination not in BACKBONE_COMBINATIONS:
            return f"its combination {self.combination!r} is not one of {BACKBONE_COMBINATIONS}"
        if self.prototypes.ndim != 2 or self.selection.ndim != 2:
            return "its prototypes or selection are not matrices"
        parts = self.num_backbones if self.combination == "concatenate" else self.selection.shape[1]
        if self.combination == "concatenate" and self.selection.shape[1] != 1:
            return f"a concatenating selection has shape {tuple(self.selection.shape)}, not [backbones, 1]"
        if self.feature_dim % parts:
            return f"its {self.feature_dim}-d prototypes do not split into {parts} equal parts"
        return None


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
    config: BackboneConfig
    folder: Path

    @property
    def base_model(self) -> BaseModelReference:
        return BaseModelReference(self.metadata.get("base_model"), self.metadata.get("base_model_revision"))

    def image_processor(self) -> Any:
        """The processor saved with the head, of its backbone family's class (its defaults where none was)."""
        from .model_sources import backbone_class

        processor_class = backbone_class(self.config.model_type).image_processor_class
        if (self.folder / PROCESSOR_NAME).is_file():
            try:
                return processor_class.from_pretrained(self.folder)
            except (OSError, ValueError, TypeError) as err:
                raise _damaged(self.folder / PROCESSOR_NAME, f"it cannot be read ({err})") from None
        return processor_class.from_copa_config(self.config)


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
    rule = {name: tensor for name, tensor in head.rule_tensors().items() if tensor is not None}
    image, prototype = rule.get("image_projection"), rule.get("prototype_projection")
    tied = image is not None and prototype is not None and torch.equal(image, prototype)
    if tied:
        del rule["prototype_projection"]
    tensors.update(rule)
    tensors.update({ADAPTER_PREFIX + name: alpha for name, alpha in head.adapters.items()})
    tensors.update({BACKBONE_PREFIX + name: weight for name, weight in head.backbone_weights.items()})
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, tied


def format_version(head: AdaptedHead) -> int:
    """The lowest format that holds `head`: 1 (cosine rule), 2 (+ adapters), 3 (+ other rules, backbone
    parameters). Older readers refuse a newer format instead of scoring it wrongly."""
    if head.scoring != "cosine" or head.backbone_weights:
        return 3
    return 2 if head.adapters else 1


def head_metadata(
    head: AdaptedHead,
    labels: Sequence[Hashable],
    support_counts: Sequence[int] | None,
    base_model: BaseModelReference,
    tied_projections: bool,
) -> dict[str, Any]:
    version = format_version(head)
    metadata = {
        "format_version": version,
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
    if version >= 3:  # format 1 and 2 readers know neither key
        metadata["scoring"] = head.scoring
        metadata["backbone_weights"] = sorted(head.backbone_weights)
        metadata.update(head.rule_metadata())
    return metadata


def write_artifact(
    folder: str | Path,
    head: AdaptedHead,
    labels: Sequence[Hashable],
    backbone_config: BackboneConfig,
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
    from .model_sources import BACKBONE_FAMILIES, backbone_class

    known = isinstance(raw, dict) and raw.get("model_type") in BACKBONE_FAMILIES
    if not known or not isinstance(metadata, dict):
        copa = known
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
    scoring = metadata.get("scoring", "cosine")
    if scoring not in HEAD_KINDS:
        raise CopaValueError(
            f"{str(folder)!r} holds a CoPA head scored by {scoring!r}, which this hf_copa does not know "
            f"(it knows {sorted(HEAD_KINDS)}); upgrade hf_copa."
        )
    kind = HEAD_KINDS[scoring]
    adapters = _prefixed(tensors, ADAPTER_PREFIX)
    backbone_weights = _prefixed(tensors, BACKBONE_PREFIX)
    for listed, found, what in (
        (metadata.get("adapters", []), adapters, "adapters"),
        (metadata.get("backbone_weights", []), backbone_weights, "backbone parameters"),
    ):
        missing = sorted(set(listed) - set(found))
        if missing:
            shown = missing if len(missing) <= 5 else [*missing[:5], f"... {len(missing) - 5} more"]
            raise _damaged(weights_path, f"it lacks the {what} {shown} that {CONFIG_NAME} lists")
    try:
        head = kind.from_stored(
            tensors,
            metadata,
            prototypes=tensors["prototypes"],
            scale=metadata["scale"],
            method=metadata["method"],
            hyperparameters=metadata.get("hyperparameters"),
            train_losses=metadata.get("train_losses", ()),
            adapters=adapters,
            backbone_weights=backbone_weights,
        )
    except KeyError as err:
        problem = f"it holds no {err.args[0]!r} tensor, which a {scoring} head needs"
        raise _damaged(weights_path, problem) from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise _damaged(weights_path, f"its tensors do not form a head ({err})") from None
    problem = head.shape_problem()
    if problem is not None:
        raise _damaged(weights_path, f"its tensors have shapes no head has ({problem})")
    labels = metadata["labels"]
    if len(labels) != head.num_classes:
        raise _damaged(config_path, f"it lists {len(labels)} labels for a head of {head.num_classes} classes")
    config_dict = {k: v for k, v in raw.items() if k != HEAD_CONFIG_KEY}
    try:
        config = backbone_class(raw["model_type"]).config_class.from_dict(config_dict)
    except (TypeError, ValueError) as err:
        raise _damaged(config_path, f"its backbone configuration is invalid ({err})") from None
    return HeadArtifact(head, list(labels), metadata, config, folder)


_REQUIRED_METADATA = {"labels": list, "method": str, "scale": (int, float)}


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): tensor for name, tensor in tensors.items() if name.startswith(prefix)}


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
    "BackboneWeightsHead",
    "HEAD_KINDS",
    "LinearHead",
    "MahalanobisHead",
    "TransformerHead",
    "register_head_kind",
    "format_version",
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
