"""What training writes: resumable checkpoints, and the final `from_pretrained` model folder."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..conversion import DOMAIN_CLASSIFIER_PREFIX, DOMAIN_CLASSIFIERS_FILE, load_domain_classifiers
from ..image_processing_copa import CopaImageProcessor
from ..validation import CopaValueError
from .config import TrainingConfig
from .data import DomainData

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_LOG_FILE = "training_log.json"


def save_trained_model(
    network: nn.Module, domains: Sequence[DomainData], folder: str | Path, save_dtype: str
) -> None:
    """A `from_pretrained` folder: backbone, image processor, and the domain classifiers beside them.

    `network` is the trained `MultiDomainNetwork` (its `backbone` and one classifier per domain).
    """
    folder = Path(folder)
    backbone = network.backbone
    backbone.config.domain_classifier_sizes = [d.num_classes for d in domains]
    backbone.config.domain_classifier_domains = [d.name for d in domains]
    dtype = getattr(torch, save_dtype)
    state = {name: tensor.detach().cpu() for name, tensor in backbone.state_dict().items()}
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    backbone.save_pretrained(folder, state_dict=state)
    CopaImageProcessor.from_copa_config(backbone.config).save_pretrained(folder)
    tensors = {}
    for index, head in enumerate(network.classifiers):
        tensors[f"{DOMAIN_CLASSIFIER_PREFIX}{index}.weight"] = head.weight.detach().cpu().contiguous()
        tensors[f"{DOMAIN_CLASSIFIER_PREFIX}{index}.bias"] = head.bias.detach().cpu().contiguous()
    metadata = {
        "format": "pt",
        "domains": ",".join(d.name for d in domains),
        "classes": json.dumps({d.name: d.classes for d in domains}),
    }
    save_file(tensors, str(folder / DOMAIN_CLASSIFIERS_FILE), metadata=metadata)


def load_trained_classifiers(path: str | Path) -> tuple[dict[str, nn.Linear], dict[str, list[int]]]:
    """The domain classifiers of a trained model folder and the original class id of each output."""
    heads = load_domain_classifiers(path)
    file = Path(path) / DOMAIN_CLASSIFIERS_FILE
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "classes" not in metadata:
        raise CopaValueError(f"{file} does not record its classes; it was not written by hf-copa train.")
    return heads, json.loads(metadata["classes"])


def find_checkpoint(output_dir: Path, resume: str | bool | None) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, str | os.PathLike) and not isinstance(resume, bool):
        path = Path(resume)
        if not (path / TRAINER_STATE_FILE).is_file():
            raise CopaValueError(
                f"--resume {path}: not a training checkpoint (no {TRAINER_STATE_FILE} in it)."
            )
        return path
    found = sorted((output_dir / CHECKPOINTS_DIR).glob("step-*/" + TRAINER_STATE_FILE))
    return found[-1].parent if found else None


def save_checkpoint(
    accelerator: Any, output_dir: Path, step: int, history: list, seconds: float, config: TrainingConfig
) -> None:
    folder = output_dir / CHECKPOINTS_DIR / f"step-{step:07d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        state = {"step": step, "seconds": seconds, "history": history, "config": asdict(config)}
        tmp = folder / (TRAINER_STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(folder / TRAINER_STATE_FILE)  # the marker of a complete checkpoint, written last
        complete = sorted((output_dir / CHECKPOINTS_DIR).glob("step-*/" + TRAINER_STATE_FILE))
        for old in complete[: -config.keep_checkpoints]:
            shutil.rmtree(old.parent, ignore_errors=True)
    accelerator.wait_for_everyone()
