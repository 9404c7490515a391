"""The training loop: multi-domain supervised training (URL's "MDL"), optionally distilled, under Accelerate.

Every step draws a batch from each domain, all in one forward pass through the shared backbone. A few
classes of every training split are held out for a validation few-shot score (NCC on episodes of those
classes), so model selection never looks at a test split. The caller writes the model card afterwards
(`hf_copa.model_cards.write_trained_model_card`), as `hf-copa train` does.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..batching import episode_chunks
from ..distributed import use_cpu
from ..episodes import make_sampler
from ..evaluation import adapt_and_score
from ..image_processing_copa import CopaImageProcessor
from ..modeling_copa import CopaModel
from ..splits import load_split
from .checkpoints import (
    CHECKPOINTS_DIR,
    TRAINER_STATE_FILE,
    TRAINING_LOG_FILE,
    find_checkpoint,
    save_checkpoint,
    save_trained_model,
)
from .config import TrainingConfig
from .data import DomainData, StepBatches, StepCollate, augment, domain_summary, split_domain
from .networks import MultiDomainNetwork, cka_loss, load_teacher, logit_distillation_loss


@dataclass
class TrainingResult:
    output_dir: Path
    steps: int
    seconds: float
    history: list[dict[str, Any]]
    is_main_process: bool = True  # under several processes, the one that wrote the folder


def train(
    config: TrainingConfig,
    resume: str | bool | None = None,
    load_dataset: Callable[[str, str], Any] | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train a multi-domain backbone; write checkpoints, then a `from_pretrained` model folder.

    `resume`: True for the newest checkpoint in `output_dir`, or a checkpoint folder.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    config.check()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=_mixed_precision(config.mixed_precision), cpu=use_cpu())
    set_seed(config.seed)
    load_dataset = load_dataset or load_split
    splits = config.domains()
    domains = [split_domain(s.name, load_dataset(s.path, s.split), config) for s in splits]

    backbone = CopaModel(config.backbone_config())
    processor = CopaImageProcessor.from_copa_config(backbone.config)
    teachers = {
        d.name: load_teacher(config.teachers[d.name], d) for d in domains if d.name in config.teachers
    }
    network = MultiDomainNetwork(
        backbone, [d.num_classes for d in domains], {name: t.feature_dim for name, t in teachers.items()}
    )
    optimizer = torch.optim.SGD(
        network.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    network, optimizer, scheduler = accelerator.prepare(network, optimizer, scheduler)
    teachers = {name: teacher.to(accelerator.device) for name, teacher in teachers.items()}

    start_step, history, elapsed = 0, [], 0.0
    checkpoint = find_checkpoint(output_dir, resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
        start_step, history, elapsed = state["step"], state["history"], state["seconds"]
        accelerator.print(f"Resuming from {checkpoint} at step {start_step}.", flush=True)
    elif resume:
        raise ValueError(f"--resume: no checkpoint found in {output_dir / CHECKPOINTS_DIR}.")

    loaders = [
        iter(
            torch.utils.data.DataLoader(
                d.dataset,
                batch_sampler=StepBatches(
                    d, config, start_step, accelerator.process_index, accelerator.num_processes
                ),
                collate_fn=StepCollate(processor, d.classes, "image", "label"),
                num_workers=config.num_workers,
                persistent_workers=False,
            )
        )
        for d in domains
    ]
    val_pixels = [
        processor([d.dataset[int(r)]["image"] for r in d.val_rows])["pixel_values"] for d in domains
    ]

    started = time.perf_counter() - elapsed
    bar = tqdm(
        range(start_step, config.max_steps),
        initial=start_step,
        total=config.max_steps,
        desc="train",
        disable=not (progress and accelerator.is_main_process),
    )
    network.train()
    running = []
    for step in bar:
        batches = [next(loader) for loader in loaders]
        generator = torch.Generator().manual_seed(
            config.seed * 1_000_003 + step * 1009 + accelerator.process_index
        )
        pixels = [augment(p, config, generator).to(accelerator.device) for p, _ in batches]
        labels = [y.to(accelerator.device) for _, y in batches]
        with accelerator.autocast():
            features, logits = network(pixels)
            losses = [
                F.cross_entropy(lg, y, label_smoothing=config.label_smoothing)
                for lg, y in zip(logits, labels, strict=True)
            ]
            loss = torch.stack(losses).mean()
            for index, domain in enumerate(domains):
                if domain.name in teachers:
                    target_features, target_logits = teachers[domain.name].targets(pixels[index])
                    adapted = accelerator.unwrap_model(network).adapters[domain.name](features[index])
                    loss = loss + (
                        config.feature_distill_weight * cka_loss(adapted, target_features)
                        + config.logit_distill_weight
                        * logit_distillation_loss(logits[index], target_logits, config.distill_temperature)
                    ) / len(domains)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The training loss became {loss.item()} at step {step}; lower --lr (now {config.lr}) "
                "and resume from the last checkpoint with --resume."
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        running.append([loss.item()] + [x.item() for x in losses])
        done = step + 1
        if done % 20 == 0 or done == config.max_steps:
            bar.set_postfix(
                loss=f"{np.mean([r[0] for r in running[-20:]]):.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}"
            )
        if done % config.val_every == 0 or done == config.max_steps:
            record = {
                "step": done,
                "seconds": round(time.perf_counter() - started, 1),
                "lr": scheduler.get_last_lr()[0],
                "train_loss": float(np.mean([r[0] for r in running])),
            }
            for index, domain in enumerate(domains):
                record[f"train_loss/{domain.name}"] = float(np.mean([r[index + 1] for r in running]))
            running = []
            record.update(validate(accelerator.unwrap_model(network).backbone, domains, val_pixels, config))
            network.train()
            history.append(record)
            accelerator.print(json.dumps(record), flush=True)  # a line per validation, even when piped
        if done % config.save_every == 0 and done < config.max_steps:
            save_checkpoint(accelerator, output_dir, done, history, time.perf_counter() - started, config)

    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        network_cpu = accelerator.unwrap_model(network)
        save_trained_model(network_cpu, domains, output_dir, config.save_dtype)
        log = {
            "config": asdict(config),
            "steps": config.max_steps,
            "seconds": round(seconds, 1),
            "processes": accelerator.num_processes,
            "device": _describe_device(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "domains": [domain_summary(d, split) for d, split in zip(domains, splits, strict=True)],
            "history": history,
        }
        (output_dir / TRAINING_LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return TrainingResult(output_dir, config.max_steps, seconds, history, accelerator.is_main_process)


@torch.no_grad()
def validate(
    backbone: CopaModel,
    domains: Sequence[DomainData],
    val_pixels: Sequence[torch.Tensor],
    config: TrainingConfig,
) -> dict[str, float]:
    """NCC accuracy on Meta-Dataset episodes of each domain's held-out classes."""
    scores = {}
    if config.val_episodes == 0:
        return scores
    for domain, pixels in zip(domains, val_pixels, strict=True):
        features = backbone.extract_features(pixels.to(backbone.device)).cpu()
        sampler = make_sampler(
            "meta-dataset", domain.val_labels, seed=config.seed, num_episodes=config.val_episodes
        )
        episodes = [sampler.episode(i) for i in range(config.val_episodes)]
        accuracies = []
        for chunk in episode_chunks(episodes):
            accuracies += adapt_and_score(features, [episodes[i] for i in chunk], "ncc", {})
        scores[f"val_ncc/{domain.name}"] = round(100 * float(np.mean(accuracies)), 2)
    scores["val_ncc/mean"] = round(float(np.mean(list(scores.values()))), 2)
    return scores


def _lr_factor(step: int, config: TrainingConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
