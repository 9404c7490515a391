"""What every few-shot backbone does, whatever its network: `FewShotBackbone`, and what a learner may ask.

A backbone family (URL's ResNet-18 in `modeling_copa.py`, EfficientNet-Lite in
`modeling_efficientnet_lite.py`) defines its network (`feature_map`) and inherits the rest from this mixin:
loading with the checks that refuse an incomplete or foreign checkpoint, features of any images in chunks,
and `adapt`. A learner asks a backbone what it `offers` (`learners.base`: `FEATURES`, `MAPS`,
`RESIDUAL_ADAPTERS`) and refuses one that lacks what it needs before any image is read
(`Learner.check_model`).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init
from transformers.utils import ModelOutput

from .adaptation import adapt_to_task
from .frozen import frozen_backbone
from .learners.base import FEATURES, MAPS
from .model_sources import check_backbone_config, check_loading_info, resolve_model_source
from .quiet import quiet_transformers
from .validation import CopaValueError, class_order

FEATURE_BATCH_SIZE = 64


@dataclass
class CopaModelOutput(ModelOutput):
    """Backbone outputs.

    Args:
        last_hidden_state: Feature map of the last stage, [N, feature_dim, h, w] (h = w = 6 for URL's
            ResNet-18 at 84x84).
        pooler_output: Globally average-pooled features, [N, feature_dim] (512 for URL's ResNet-18).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


class FewShotBackbone:
    """Mixin of every backbone family's model class (listed before its `PreTrainedModel` base).

    A family defines `feature_map(pixel_values, adapters)` (the network up to the last feature map),
    `classifier_class()`, `offers` and `image_processor_class`, and may override `check_adapters`.
    """

    offers: ClassVar[frozenset[str]] = frozenset({FEATURES, MAPS})
    image_processor_class: ClassVar[type]
    family_name: ClassVar[str] = "backbone"  # in messages: "URL's ResNet-18", "EfficientNet-Lite"

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        """As `PreTrainedModel.from_pretrained`, but refusing what is not a complete backbone of this family,
        and recording the Hub commit the weights came from (`hub_revision`; None for a local folder), which
        adapted heads pin as their base revision.

        A folder that does not exist, holds another model type, an adapted head, or no weights, and a
        checkpoint with missing, unexpected or wrongly shaped weights, each raise a `ValueError` that names
        what was found (transformers would instead build a partly random model). Bundled names such as
        `hf_copa.DEFAULT_MODEL` load the bundled folder and keep their name. `hf_copa.load_model` loads any
        family's backbone by what its config says.
        """
        expected = cls.config_class.model_type
        source = resolve_model_source(pretrained_model_name_or_path, expected)
        wants_info = kwargs.pop("output_loading_info", False)
        if not source.is_local and "config" not in kwargs:
            try:
                config, _ = PreTrainedConfig.get_config_dict(source.load_from, **hub_kwargs(kwargs))
            except OSError as err:
                raise OSError(
                    f"{source.load_from!r} is not a local folder, and no Hub repo of that name could be "
                    f"loaded: {err}"
                ) from err
            check_backbone_config(config, f"The Hub repo {source.load_from!r}", expected)
        where = f"{source.name!r}"
        with quiet_transformers():
            try:
                model, info = super().from_pretrained(
                    source.load_from, *args, output_loading_info=True, **kwargs
                )
            except SafetensorError as err:
                raise CopaValueError(
                    f"The weights of {where} cannot be read ({err}): the file is damaged or incomplete; "
                    "re-download or re-save the model."
                ) from None
        check_loading_info(info, where)
        model.config._name_or_path = source.name
        model.hub_revision = None if source.is_local else _resolved_commit(source.load_from, kwargs)
        return (model, info) if wants_info else model

    def forward(
        self,
        pixel_values: torch.Tensor,
        adapters: Mapping[str, torch.Tensor] | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> CopaModelOutput:
        """pixel_values [N, 3, H, W] (the image processor's output) -> feature map and pooled features.

        `adapters` (name -> alpha, e.g. a TSA head's) run the task-adapted backbone; see `hf_copa.adapters`.
        `weights` (parameter name -> tensor, e.g. a head fine-tuned on all layers) replace those parameters
        for this call only (`torch.func.functional_call`): the model's own weights are neither read nor
        changed for them, so one backbone serves any number of fine-tuned heads.
        """
        if adapters:
            self.check_adapters(adapters)
        if weights:
            check_backbone_weights(self, weights)
            return torch.func.functional_call(self, dict(weights), (pixel_values,), {"adapters": adapters})
        hidden = self.feature_map(pixel_values, adapters)
        return CopaModelOutput(last_hidden_state=hidden, pooler_output=self.pool(hidden))

    def feature_map(
        self, pixel_values: torch.Tensor, adapters: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The last feature map [N, feature_dim, h, w] of pixel values."""
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.mean(dim=(2, 3))

    def check_adapters(self, adapters: Mapping[str, torch.Tensor]) -> None:
        """Raise a ValueError unless this backbone has a place for each adapter (here: none)."""
        raise ValueError(
            f"This {self.family_name} backbone has no residual-adapter points, so adapters "
            f"({', '.join(list(adapters)[:3])}, ...) cannot run on it; they were made for URL's ResNet-18."
        )

    def default_image_processor(self) -> Any:
        """The image processor matching this model's input contract."""
        return self.image_processor_class.from_copa_config(self.config)

    @torch.no_grad()
    def extract_features(
        self,
        images: Any,
        image_processor: Any = None,
        batch_size: int = FEATURE_BATCH_SIZE,
        adapters: Mapping[str, torch.Tensor] | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
        spatial: bool = False,
    ) -> torch.Tensor:
        """Pooled features [N, feature_dim] of images (PIL / arrays / paths, or pixel_values [N, 3, H, W]);
        with `spatial=True` the last stage's maps before pooling, [N, feature_dim, h, w].

        BatchNorm always runs in eval mode here: the backbone is frozen (see `hf_copa.frozen`). (no_grad
        rather than inference_mode: learners that optimise on these features need ordinary tensors.)
        `adapters` and `weights` give the features of a task-adapted backbone (a head's `backbone_state()`).
        """
        pixel_values = self.to_pixel_values(images, image_processor)
        if adapters:
            adapters = {name: alpha.to(self.device, self.dtype) for name, alpha in adapters.items()}
        if weights:
            weights = {name: weight.to(self.device, self.dtype) for name, weight in weights.items()}
        output = "last_hidden_state" if spatial else "pooler_output"
        with frozen_backbone(self):
            chunks = [
                getattr(
                    self(
                        pixel_values[start : start + batch_size].to(
                            self.device, self.dtype, memory_format=torch.channels_last
                        ),
                        adapters=adapters,
                        weights=weights,
                    ),
                    output,
                )
                for start in range(0, len(pixel_values), batch_size)
            ]
        return torch.cat(chunks).float().contiguous()

    def to_pixel_values(self, images: Any, image_processor: Any = None) -> torch.Tensor:
        """Pixel values [N, 3, H, W] of images, through `image_processor` (default: this model's own).

        A float torch tensor [N, 3, H, W] is taken as pixel values already (what the processor returns, as
        `model(pixel_values)` takes them); everything else is images, one or a batch, by the processor's
        rules (see `hf_copa.image_processing_copa`). Float images in [0, 1] belong in a numpy array, a list,
        or the processor: such a tensor with no negative value gets a warning, because pixel values of real
        images almost always have some.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point():
            if images.shape[1] != self.config.num_channels:
                raise CopaValueError(
                    f"pixel_values must be [N, {self.config.num_channels}, H, W], got {tuple(images.shape)}; "
                    "images go in as PIL images, arrays, uint8 tensors or a list of them."
                )
            if len(images) and images.min() >= 0 and images.max() <= 1 and images.max() > 0:
                warnings.warn(
                    f"A float tensor of shape {tuple(images.shape)} with values in [0, 1] is taken as pixel "
                    "values, which are centred on 0; if these are images, pass them through the image "
                    "processor (or as uint8, or a list) instead.",
                    stacklevel=3,
                )
            pixel_values = images
        else:
            processor = image_processor or self.default_image_processor()
            pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        if len(pixel_values) == 0:
            raise CopaValueError("No images given: pass at least one image.")
        return pixel_values

    def adapt(
        self,
        support_images: Any,
        support_labels: Sequence[Hashable],
        method: str = "copa",
        preset: str | None = None,
        image_processor: Any = None,
        **hyperparameters: Any,
    ) -> Any:
        """Adapt to the classes of a support set and return a classifier for them (a
        `CopaForFewShotClassification`).

        Labels may be any hashable values; `.labels` of the result gives the class
        order (sorted when the labels are mutually comparable, else first appearance).
        Hyperparameters (`steps`, `lr`, `weight_decay`, `tau`, `scale`, and TSA's `lr_beta` /
        `adapter_lr_scale`) override this model's defaults for `method`; `preset` picks a named setting.
        """
        labels = (
            list(support_labels) if not isinstance(support_labels, torch.Tensor) else support_labels.tolist()
        )
        class_names = class_order(labels)
        index = {name: i for i, name in enumerate(class_names)}
        adapted = adapt_to_task(
            self,
            torch.tensor([index[label] for label in labels]),
            method,
            support_images=support_images,
            preset=preset,
            image_processor=image_processor,
            **hyperparameters,
        )
        return self.classifier_class().from_adapted(
            self, adapted.head, class_names, image_processor, support_labels=labels
        )

    def classifier_class(self) -> type:
        """The classifier class an adapted head on this family makes (the one registered for its config)."""
        raise NotImplementedError


@torch.no_grad()
def init_convolutions_and_batch_norm(module: nn.Module) -> None:
    """Every family's `_init_weights`: He-normal convolutions (fan out), BatchNorm as the identity."""
    if isinstance(module, nn.Conv2d):
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        init.zeros_(module.running_mean)
        init.ones_(module.running_var)
        if module.num_batches_tracked is not None:
            init.zeros_(module.num_batches_tracked)


def check_backbone_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError unless every entry names a parameter of `model` with its shape."""
    parameters = dict(model.named_parameters())
    for name, weight in weights.items():
        if name not in parameters:
            raise ValueError(
                f"Backbone parameter {name!r} is not a parameter of this backbone (it has "
                f"{', '.join(list(parameters)[:3])}, ...); the weights were fine-tuned on another backbone."
            )
        if tuple(weight.shape) != tuple(parameters[name].shape):
            raise ValueError(
                f"Backbone parameter {name!r} has shape {tuple(weight.shape)} but this backbone's is "
                f"{tuple(parameters[name].shape)}; the weights were fine-tuned on another backbone."
            )


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: kwargs[k]
        for k in ("revision", "cache_dir", "token", "subfolder", "local_files_only")
        if k in kwargs
    }


def _resolved_commit(name_or_path: str | Path, kwargs: dict[str, Any]) -> str | None:
    """The commit hash behind a Hub id's cached config (transformers 5 keeps none on the config)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    resolved = cached_file(
        str(name_or_path), "config.json", **{**hub_kwargs(kwargs), "local_files_only": True}
    )
    return extract_commit_hash(resolved, None)
