"""The URL ResNet-18 backbone as a `transformers` model, and the classifier an adapted head makes of any
backbone.

Parameter names follow torchvision / URL (`conv1`, `bn1`, `layer1.0.conv1`,
`layer2.0.downsample.0`, ...) so the released URL checkpoint loads 1:1.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from . import heads
from .adapters import adapted_conv, check_adapters
from .configuration_backbone import BackboneConfig
from .configuration_copa import CopaConfig
from .heads import AdaptedHead
from .image_processing_copa import CopaImageProcessor
from .learners.base import FEATURES, MAPS, RESIDUAL_ADAPTERS
from .model_sources import backbone_class
from .modeling_backbone import (
    FEATURE_BATCH_SIZE,
    CopaModelOutput,
    FewShotBackbone,
    check_backbone_weights,
    init_convolutions_and_batch_norm,
)
from .validation import CopaTypeError, CopaValueError

__all__ = [
    "FEATURE_BATCH_SIZE",
    "CopaForFewShotClassification",
    "CopaModel",
    "CopaModelOutput",
    "CopaPreTrainedModel",
]


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 convolutions and a residual connection."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum),
            )

    def forward(
        self, hidden: torch.Tensor, adapters: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    ) -> torch.Tensor:
        """`adapters`: residual adapters (alpha) for conv1 and conv2, or None (see `hf_copa.adapters`)."""
        residual = hidden if self.downsample is None else self.downsample(hidden)
        out = self.relu(self.bn1(adapted_conv(self.conv1, hidden, adapters[0])))
        out = self.bn2(adapted_conv(self.conv2, out, adapters[1]))
        return self.relu(out + residual)


class CopaPreTrainedModel(PreTrainedModel):
    config_class = CopaConfig
    config: CopaConfig
    base_model_prefix = "copa"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["BasicBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_convolutions_and_batch_norm(module)


class CopaModel(FewShotBackbone, CopaPreTrainedModel):
    """Frozen multi-domain feature extractor: images -> 512-d features, and `adapt` to a few-shot task.

    Loading, feature extraction and `adapt` are every backbone's (`hf_copa.modeling_backbone`); this class is
    the network, with TSA's residual-adapter points beside each 3x3 block convolution.
    """

    offers = frozenset({FEATURES, MAPS, RESIDUAL_ADAPTERS})
    image_processor_class = CopaImageProcessor
    family_name = "URL ResNet-18"

    def __init__(self, config: CopaConfig) -> None:
        super().__init__(config)
        eps, momentum = config.batch_norm_eps, config.batch_norm_momentum
        self.conv1 = nn.Conv2d(
            config.num_channels,
            config.embedding_size,
            config.stem_kernel_size,
            stride=config.stem_stride,
            padding=config.stem_padding,
            bias=False,
        )
        self.bn1 = nn.BatchNorm2d(config.embedding_size, eps=eps, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if config.stem_pool else nn.Identity()
        in_channels = config.embedding_size
        self.stage_names = []
        for index, (depth, width) in enumerate(zip(config.depths, config.hidden_sizes, strict=True)):
            blocks = []
            for block_index in range(depth):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride, eps, momentum))
                in_channels = width
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def feature_map(
        self, pixel_values: torch.Tensor, adapters: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The last stage's map [N, 512, h, w]; `adapters` (name -> alpha) run the task-adapted stages."""
        return self.run_stages(self.embed_stem(pixel_values), adapters)

    def check_adapters(self, adapters: Mapping[str, torch.Tensor]) -> None:
        check_adapters(self, adapters)

    def classifier_class(self) -> type[CopaForFewShotClassification]:
        return CopaForFewShotClassification

    def embed_stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(pixel_values))))

    def run_stages(
        self,
        hidden: torch.Tensor,
        adapters: Mapping[str, torch.Tensor] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Stages `start`..`stop`-1 (0-based) on a feature map, with adapters named after their convolutions.

        Learners that adapt later stages only run the frozen earlier ones once per task, then these.
        """
        adapters = adapters or {}
        for name in self.stage_names[start:stop]:
            for index, block in enumerate(getattr(self, name)):
                prefix = f"{name}.{index}."
                hidden = block(hidden, (adapters.get(prefix + "conv1"), adapters.get(prefix + "conv2")))
        return hidden

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.avgpool(hidden).flatten(1)


class CopaForFewShotClassification(CopaPreTrainedModel):
    """A frozen backbone plus an adapted head: a classifier for the support set's classes.

    `save_pretrained` / `push_to_hub` store only the head (see `hf_copa.heads`), pinned to its base model;
    `from_pretrained` reads it back and fetches that base model (or takes `base_model=`). The backbone may be
    of any family (`hf_copa.modeling_backbone`); the config is the backbone's, with the head's metadata.
    """

    def __init__(
        self, config: BackboneConfig, backbone: FewShotBackbone | None = None, head: AdaptedHead | None = None
    ) -> None:
        super().__init__(config)
        self.copa = backbone if backbone is not None else backbone_class(config.model_type)(config)
        self.head = head
        self.class_labels: list[Hashable] = [config.id2label[i] for i in range(len(config.id2label))]
        self.image_processor = None
        self.support_counts: list[int] | None = None
        self.base_model_reference: heads.BaseModelReference | None = None
        if backbone is None:
            self.post_init()

    @classmethod
    def from_adapted(
        cls,
        backbone: FewShotBackbone,
        head: AdaptedHead,
        class_names: Sequence[Hashable],
        image_processor: Any = None,
        support_labels: Sequence[Hashable] | None = None,
    ) -> CopaForFewShotClassification:
        config = type(backbone.config).from_dict(backbone.config.to_dict())
        config.id2label = {i: str(name) for i, name in enumerate(class_names)}
        config.label2id = {str(name): i for i, name in enumerate(class_names)}
        config.architectures = [cls.__name__]
        model = cls(config, backbone=backbone, head=head)
        model.class_labels = list(class_names)
        model.image_processor = image_processor
        if support_labels is not None:
            counts = Counter(support_labels)
            model.support_counts = [counts[name] for name in class_names]
        return model.eval()

    # --- the head as a Hub artifact ---------------------------------------------------------------------

    def _base_reference(self, base_model_id: str | None, base_model_revision: str | None):
        if base_model_id is not None:
            return heads.BaseModelReference(base_model_id, base_model_revision)
        reference = self.base_model_reference or heads.base_model_reference(self.copa)
        if base_model_revision is not None:
            return heads.BaseModelReference(reference.name_or_path, base_model_revision)
        return reference

    def _write_head(self, folder: Path, base: heads.BaseModelReference, model_id: str | None, eval_results):
        processor = self.image_processor or self.copa.default_image_processor()
        heads.write_artifact(
            folder,
            self._require_head(),
            self.class_labels,
            self.copa.config,
            processor,
            base,
            self.support_counts,
            model_id=model_id,
            eval_results=eval_results,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        base_model_id: str | None = None,
        base_model_revision: str | None = None,
        eval_results: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the head artifact (no backbone weights) and its model card to `save_directory`.

        The base model is recorded as its Hub id and cached commit, its local folder, or nothing for a
        random backbone; `base_model_id` / `base_model_revision` override that.
        """
        if kwargs:
            raise CopaTypeError(
                f"CopaForFewShotClassification.save_pretrained takes no {sorted(kwargs)}: it saves only the "
                "head; save the backbone with classifier.copa.save_pretrained."
            )
        base = self._base_reference(base_model_id, base_model_revision)
        self._write_head(Path(save_directory), base, None, eval_results)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        commit_message: str = "Upload CoPA adapted head",
        base_model_id: str | None = None,
        base_model_revision: str | None = None,
        eval_results: Sequence[Any] | None = None,
        revision: str | None = None,
    ):
        """Upload the head artifact and its model card to `repo_id` in one commit; returns its CommitInfo.

        The base model must be a Hub repo (loaded from the Hub, or named by `base_model_id`), so that the
        head can be loaded anywhere.
        """
        base = self._base_reference(base_model_id, base_model_revision)
        if not base.is_hub_id:
            where = (
                f"the local folder {base.name_or_path!r}" if base.name_or_path else "a random initialisation"
            )
            raise ValueError(
                f"The base model comes from {where}, which a Hub user cannot fetch. Push the backbone first "
                "(classifier.copa.push_to_hub(...)) and pass base_model_id=<its repo id> (and "
                "base_model_revision=<commit>) to push_to_hub."
            )
        heads.check_json_labels(self.class_labels)  # refuse before creating any repo
        self._require_head()
        return heads.push_artifact(
            repo_id,
            lambda folder, resolved_id: self._write_head(folder, base, resolved_id, eval_results),
            token=token,
            private=private,
            commit_message=commit_message,
            revision=revision,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        base_model: FewShotBackbone | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str = "",
        **kwargs: Any,
    ) -> CopaForFewShotClassification:
        """Load a head saved by `save_pretrained` / `push_to_hub` (a folder or Hub id) onto its base model.

        Without `base_model`, the pinned base model is fetched with its family's
        `from_pretrained(base_id, revision=base_revision)` (`CopaModel`, `EfficientNetLiteModel`, ...: the
        head's config names the family); remaining kwargs (e.g. `dtype`) go there. `revision` and the other
        hub arguments apply to the head's repo.
        """
        if model_args:
            raise CopaTypeError(
                "CopaForFewShotClassification.from_pretrained takes no positional model arguments."
            )
        for internal in _LOADER_INTERNAL_KWARGS:  # set by transformers' Auto classes and pipeline
            kwargs.pop(internal, None)
        hub = {"cache_dir": cache_dir, "force_download": force_download, "local_files_only": local_files_only}
        folder = heads.locate_artifact(
            pretrained_model_name_or_path, revision=revision, token=token, subfolder=subfolder, **hub
        )
        artifact = heads.read_artifact(folder)
        if artifact.head.feature_kind == "backbones":
            raise CopaValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {artifact.head.method} head for a set of "
                f"{artifact.head.num_backbones} backbones ({artifact.base_model.name_or_path!r}); load it "
                "with CopaBackboneSet.from_pretrained(...), then this head with its load_head(...)."
            )
        if base_model is None:
            base_model = _fetch_base_model(artifact, token=token, **hub, **kwargs)
        elif not isinstance(base_model, FewShotBackbone):
            raise CopaTypeError(
                f"base_model must be a backbone (CopaModel, EfficientNetLiteModel, ...), got "
                f"{type(base_model).__name__}."
            )
        elif base_model.config.model_type != artifact.config.model_type:
            raise CopaValueError(
                f"The head was adapted on a {artifact.config.model_type!r} backbone "
                f"({artifact.base_model.name_or_path!r}) but base_model is a "
                f"{base_model.config.model_type!r} one; pass the backbone the head was adapted on."
            )
        elif any(value not in (None, "auto") for value in kwargs.values()):
            raise CopaTypeError(
                f"{sorted(kwargs)} only apply when the base model is fetched (base_model=None)."
            )
        if base_model.feature_dim != artifact.head.feature_dim:
            raise ValueError(
                f"The head was adapted on {artifact.head.feature_dim}-d features but the base model gives "
                f"{base_model.feature_dim}-d ones; pass the backbone the head was adapted on "
                f"({artifact.base_model.name_or_path!r})."
            )
        if artifact.head.adapts_backbone:
            try:
                if artifact.head.adapters:
                    base_model.check_adapters(artifact.head.adapters)
                check_backbone_weights(base_model, artifact.head.backbone_weights)
            except ValueError as err:
                raise ValueError(
                    f"{err} Pass the backbone the head was adapted on ({artifact.base_model.name_or_path!r})."
                ) from None
        model = cls.from_adapted(base_model, artifact.head, artifact.labels, artifact.image_processor())
        shots = artifact.metadata.get("support_shots")
        model.support_counts = None if shots is None else list(shots)
        model.base_model_reference = artifact.base_model
        return model

    @property
    def labels(self) -> list[Hashable]:
        """The classes, in the order of the logits' columns."""
        return list(self.class_labels)

    def _require_head(self) -> AdaptedHead:
        if self.head is None:
            raise ValueError(
                "This classifier has no adapted head: build it with CopaModel.adapt(support_images, labels)."
            )
        return self.head

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.logits(pixel_values))

    @torch.no_grad()
    def logits(self, images: Any) -> torch.Tensor:
        """[N, C] logits (10 x cosine) of images, columns in the order of `labels`."""
        head = self._require_head()
        features = self.copa.extract_features(
            images, self.image_processor, spatial=head.feature_kind == "maps", **head.backbone_state()
        )
        return head.logits(features.to(head.prototypes))

    def predict(self, images: Any) -> list[list[dict[str, Any]]]:
        """For each image, every class with its probability, best first (as pipeline(..., top_k=None))."""
        probabilities = torch.softmax(self.logits(images), dim=-1)
        results = []
        for row in probabilities.tolist():
            order = sorted(range(len(row)), key=lambda i: -row[i])
            results.append([{"label": self.class_labels[i], "score": row[i]} for i in order])
        return results


# Keyword arguments transformers' Auto classes and pipeline pass to from_pretrained that a head ignores.
_LOADER_INTERNAL_KWARGS = (
    "config",
    "_from_auto",
    "_from_pipeline",
    "trust_remote_code",
    "adapter_kwargs",
    "code_revision",
    "_commit_hash",
    "proxies",
)


def _fetch_base_model(artifact: heads.HeadArtifact, **kwargs: Any) -> FewShotBackbone:
    """The base model a head pins: its family's `from_pretrained(id, revision=commit)`."""
    reference = artifact.base_model
    if not reference.name_or_path:
        raise ValueError(
            f"The head in {str(artifact.folder)!r} records no base model (it was adapted on a random "
            "backbone); pass base_model=<that backbone>."
        )
    if kwargs.get("dtype") == "auto":
        kwargs.pop("dtype")
    if kwargs.get("device_map") is None:
        kwargs.pop("device_map", None)
    try:
        family = backbone_class(artifact.config.model_type)
        backbone = family.from_pretrained(reference.name_or_path, revision=reference.revision, **kwargs)
    except OSError as err:
        raise ValueError(
            f"Could not load the head's base model {reference.name_or_path!r} (revision "
            f"{reference.revision!r}): {err}. Pass base_model=<a backbone> to use one you have."
        ) from err
    return backbone.eval()


def _register_with_auto_models() -> None:
    from transformers import AutoModel, AutoModelForImageClassification

    AutoModel.register(CopaConfig, CopaModel, exist_ok=True)
    AutoModelForImageClassification.register(CopaConfig, CopaForFewShotClassification, exist_ok=True)


_register_with_auto_models()  # so that the Auto model classes and pipeline find it (see hf_copa)
