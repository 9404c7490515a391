"""Multi-domain supervised training of the backbone (URL's "MDL" baseline), optionally with URL's
distillation from single-domain teachers.

One shared `CopaModel`, one linear classifier per domain; every step draws a batch from each domain.
A few classes of every training split are held out for a validation few-shot score (NCC on episodes of
those classes), so model selection never looks at a test split.

Batches depend only on (seed, domain, step, process): a resumed run sees exactly the batches the
interrupted one would have seen, and the data need no loader state in the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .configuration_copa import CopaConfig
from .conversion import DOMAIN_CLASSIFIER_PREFIX, DOMAIN_CLASSIFIERS_FILE
from .distributed import use_cpu
from .image_processing_copa import CopaImageProcessor
from .modeling_copa import CopaModel

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_LOG_FILE = "training_log.json"
MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
MIN_VAL_WAYS = 5  # Meta-Dataset episodes have 5 to 50 ways


@dataclass
class TrainingConfig:
    """Every training hyperparameter, with its default (the one place they live)."""

    datasets: list[str] = field(default_factory=list)  # PATH_OR_ID[:SPLIT], split "train" unless given
    output_dir: str = "copa-mdl"
    # Backbone shape (CopaConfig fields); None keeps CopaConfig's URL-size default.
    hidden_sizes: list[int] | None = None
    embedding_size: int | None = None
    image_size: int | None = None
    # Optimisation: SGD with Nesterov momentum, linear warm-up then cosine decay to 0.
    max_steps: int = 4000
    batch_size: int = 32  # images per domain per step per process
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 200
    label_smoothing: float = 0.0
    # Light augmentation: random translation by up to `crop_padding` * image_size pixels, horizontal flips.
    crop_padding: float = 0.125
    flip: bool = True
    # Validation: hold out this fraction of each domain's classes (at least `min_val_classes`).
    val_fraction: float = 0.1
    min_val_classes: int = 5
    val_images_per_class: int = 40
    val_episodes: int = 100
    val_every: int = 500
    # Checkpoints every `save_every` steps, keeping the newest `keep_checkpoints`.
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on GPU, none on CPU
    num_workers: int = 1
    save_dtype: str = "float32"  # float16 halves the shipped size
    # URL's distillation: DOMAIN=MODEL_FOLDER for each domain with a single-domain teacher.
    teachers: dict[str, str] = field(default_factory=dict)
    feature_distill_weight: float = 4.0
    logit_distill_weight: float = 1.0
    distill_temperature: float = 2.0
    command: str | None = None  # how the run was started, for the model card

    def check(self) -> None:
        """Clear errors for impossible settings, before any data is read."""
        if not self.datasets:
            raise ValueError("Give at least one training dataset (--dataset PATH_OR_ID[:SPLIT]).")
        positive = {
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "val_images_per_class": self.val_images_per_class,
            "val_every": self.val_every,
            "save_every": self.save_every,
            "keep_checkpoints": self.keep_checkpoints,
            "min_val_classes": self.min_val_classes,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "val_episodes", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        for name in ("lr", "distill_temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        for name in (
            "momentum",
            "weight_decay",
            "label_smoothing",
            "crop_padding",
            "feature_distill_weight",
            "logit_distill_weight",
        ):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}.")
        if self.min_val_classes < MIN_VAL_WAYS:
            raise ValueError(
                f"min_val_classes must be at least {MIN_VAL_WAYS}: validation samples Meta-Dataset episodes, "
                f"which have at least {MIN_VAL_WAYS} ways; got {self.min_val_classes}."
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}.")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}."
            )
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}.")
        names = [domain_name(spec) for spec in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"Two training datasets share a name: {names}; each domain needs its own.")
        unknown = sorted(set(self.teachers) - set(names))
        if unknown:
            raise ValueError(f"Teachers given for {unknown}, which are not training domains {names}.")

    def backbone_config(self) -> CopaConfig:
        shape = {
            "hidden_sizes": self.hidden_sizes,
            "embedding_size": self.embedding_size,
            "image_size": self.image_size,
        }
        return CopaConfig(**{key: value for key, value in shape.items() if value is not None})


def domain_name(spec: str) -> str:
    """`path/to/omniglot:train` -> `omniglot`."""
    path = spec if Path(spec).exists() else spec.partition(":")[0]
    return Path(path.rstrip("/")).name


def _split_spec(spec: str) -> tuple[str, str]:
    if Path(spec).exists():
        return spec, "train"
    path, _, split = spec.partition(":")
    return path, split or "train"


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass
class DomainData:
    """One training domain: its training rows (relabelled 0..K-1) and its held-out validation rows."""

    name: str
    dataset: Any  # datasets.Dataset of the whole split
    train_rows: np.ndarray
    train_labels: np.ndarray  # 0..K-1 per train row
    classes: list[int]  # original label of each of the K training classes
    val_rows: np.ndarray
    val_labels: np.ndarray  # original labels of the validation rows

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_domain(name: str, dataset: Any, config: TrainingConfig, label_column: str = "label") -> DomainData:
    """Hold out a seeded fraction of the classes for validation; relabel the rest 0..K-1."""
    labels = np.asarray(dataset[label_column], dtype=np.int64)
    classes = np.unique(labels)
    num_val = max(config.min_val_classes, round(config.val_fraction * len(classes)))
    if len(classes) - num_val < 2:
        raise ValueError(
            f"Domain {name!r} has {len(classes)} classes: too few to hold out {num_val} for validation and "
            "train on the rest. Use a dataset with more classes, or lower --val-fraction/--min-val-classes."
        )
    rng = np.random.default_rng([config.seed, _stable_hash(name)])
    val_classes = np.sort(rng.choice(classes, size=num_val, replace=False))
    train_classes = np.setdiff1d(classes, val_classes)
    is_val = np.isin(labels, val_classes)
    train_rows = np.flatnonzero(~is_val)
    lookup = {int(c): i for i, c in enumerate(train_classes)}
    val_rows = []
    for c in val_classes:
        rows = np.flatnonzero(labels == c)
        val_rows.append(np.sort(rng.permutation(rows)[: config.val_images_per_class]))
    val_rows = np.concatenate(val_rows)
    return DomainData(
        name=name,
        dataset=dataset,
        train_rows=train_rows,
        train_labels=np.array([lookup[int(c)] for c in labels[train_rows]], dtype=np.int64),
        classes=[int(c) for c in train_classes],
        val_rows=val_rows,
        val_labels=labels[val_rows],
    )


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % (2**31)


def batch_rows(
    num_rows: int, batch_size: int, step: int, seed: int, salt: int, rank: int = 0, world: int = 1
) -> np.ndarray:
    """Positions (into 0..num_rows-1) of this process's batch at `step`: epoch-wise shuffles, no repeats
    within an epoch, and a function of its arguments only (so resuming needs no sampler state)."""
    global_batch = batch_size * world
    start = step * global_batch
    positions = np.empty(global_batch, dtype=np.int64)
    filled = 0
    while filled < global_batch:
        epoch, offset = divmod(start + filled, num_rows)
        order = np.random.default_rng([seed, salt, epoch]).permutation(num_rows)
        take = min(global_batch - filled, num_rows - offset)
        positions[filled : filled + take] = order[offset : offset + take]
        filled += take
    return positions[rank * batch_size : (rank + 1) * batch_size]


class _StepBatches(torch.utils.data.Sampler):
    """Yields the dataset rows of this process's batch for steps start..max_steps-1."""

    def __init__(self, domain: DomainData, config: TrainingConfig, start: int, rank: int, world: int) -> None:
        self.domain, self.config, self.start, self.rank, self.world = domain, config, start, rank, world

    def __len__(self) -> int:
        return self.config.max_steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        salt = _stable_hash(self.domain.name)
        for step in range(self.start, self.config.max_steps):
            positions = batch_rows(
                len(self.domain.train_rows),
                self.config.batch_size,
                step,
                self.config.seed,
                salt,
                self.rank,
                self.world,
            )
            yield [int(row) for row in self.domain.train_rows[positions]]


class _Collate:
    """Decoded images -> pixel values; original labels -> training class indices (picklable for workers)."""

    def __init__(
        self, processor: CopaImageProcessor, classes: list[int], image_column: str, label_column: str
    ):
        self.processor = processor
        self.lookup = {label: index for index, label in enumerate(classes)}
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.processor([row[self.image_column] for row in rows], return_tensors="pt")["pixel_values"]
        labels = torch.tensor([self.lookup[int(row[self.label_column])] for row in rows])
        return pixels, labels


def augment(pixels: torch.Tensor, config: TrainingConfig, generator: torch.Generator) -> torch.Tensor:
    """Random translation (edge-replicating pad, then crop back) and horizontal flips."""
    batch, _, height, width = pixels.shape
    pad = round(config.crop_padding * height)
    if pad > 0:
        padded = F.pad(pixels, (pad, pad, pad, pad), mode="replicate")
        top = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        left = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = (top[:, None] + torch.arange(height))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width))[:, None, None, :]
        pixels = padded[
            torch.arange(batch)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols
        ]
    if config.flip:
        flip = torch.rand(batch, generator=generator) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return pixels.contiguous()


# ---------------------------------------------------------------------------------------------------------
# Model


class MultiDomainNetwork(nn.Module):
    """The shared backbone, one linear classifier per domain (URL's `cls_fn`) and, for each distilled
    domain, the linear adapter that maps student features into its teacher's feature space."""

    def __init__(
        self, backbone: CopaModel, num_classes: Sequence[int], adapter_dims: dict[str, int] | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifiers = nn.ModuleList(nn.Linear(backbone.feature_dim, n) for n in num_classes)
        self.adapters = nn.ModuleDict()
        for name, dim in (adapter_dims or {}).items():
            adapter = nn.Linear(backbone.feature_dim, dim, bias=False)
            with torch.no_grad():
                adapter.weight.copy_(torch.eye(dim, backbone.feature_dim))  # start as the identity
            self.adapters[name] = adapter

    def forward(self, pixels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One backbone pass over all domains' batches -> per-domain (features, logits)."""
        features = self.backbone(torch.cat(list(pixels))).pooler_output
        per_domain = features.split([len(p) for p in pixels])
        return list(per_domain), [head(f) for head, f in zip(self.classifiers, per_domain, strict=True)]


class Teacher(nn.Module):
    """A frozen single-domain backbone and its classifier: the targets of URL's distillation."""

    def __init__(self, backbone: CopaModel, classifier: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.classifier = classifier.eval().requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @torch.no_grad()
    def targets(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(pixels).pooler_output
        return features, self.classifier(features)


def cka_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - linear CKA between two batches of features (URL's feature alignment)."""
    student = student - student.mean(0, keepdim=True)
    teacher = teacher - teacher.mean(0, keepdim=True)
    cross = (student.T @ teacher).pow(2).sum()
    norms = (student.T @ student).pow(2).sum().sqrt() * (teacher.T @ teacher).pow(2).sum().sqrt()
    return 1 - cross / norms.clamp_min(1e-12)


def logit_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened class probabilities, scaled by T^2."""
    return (
        F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def load_teacher(path: str, domain: DomainData) -> Teacher:
    """A model folder written by `train` on `domain` alone; its classes must be the student's."""
    backbone = CopaModel.from_pretrained(path)
    heads, classes = load_trained_classifiers(path)
    if domain.name not in heads:
        raise ValueError(
            f"Teacher {path} has no classifier for domain {domain.name!r} (it has {sorted(heads)})."
        )
    if classes.get(domain.name) != domain.classes:
        raise ValueError(
            f"Teacher {path} was trained on other {domain.name!r} classes than this run holds out for "
            "training; train teachers with the same --seed, --val-fraction and --min-val-classes."
        )
    return Teacher(backbone, heads[domain.name])


# ---------------------------------------------------------------------------------------------------------
# Saving


def save_trained_model(
    network: MultiDomainNetwork, domains: Sequence[DomainData], folder: str | Path, save_dtype: str
) -> None:
    """A `from_pretrained` folder: backbone, image processor, and the domain classifiers beside them."""
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
    from safetensors import safe_open

    from .conversion import load_domain_classifiers

    heads = load_domain_classifiers(path)
    file = Path(path) / DOMAIN_CLASSIFIERS_FILE
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "classes" not in metadata:
        raise ValueError(f"{file} does not record its classes; it was not written by hf-copa train.")
    return heads, json.loads(metadata["classes"])


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainingResult:
    output_dir: Path
    steps: int
    seconds: float
    history: list[dict[str, Any]]


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
    load_dataset = load_dataset or _load_split
    domains = []
    for spec in config.datasets:
        path, split = _split_spec(spec)
        domains.append(split_domain(domain_name(spec), load_dataset(path, split), config))

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
    checkpoint = _find_checkpoint(output_dir, resume)
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
                batch_sampler=_StepBatches(
                    d, config, start_step, accelerator.process_index, accelerator.num_processes
                ),
                collate_fn=_Collate(processor, d.classes, "image", "label"),
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
            _save_checkpoint(accelerator, output_dir, done, history, time.perf_counter() - started, config)

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
            "domains": [domain_summary(d, spec) for d, spec in zip(domains, config.datasets, strict=True)],
            "history": history,
        }
        (output_dir / TRAINING_LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
        from .model_cards import write_trained_model_card

        write_trained_model_card(output_dir)
    accelerator.wait_for_everyone()
    return TrainingResult(output_dir, config.max_steps, seconds, history)


def domain_summary(domain: DomainData, spec: str) -> dict[str, Any]:
    """What the model card says about one training domain."""
    path, split = _split_spec(spec)
    return {
        "name": domain.name,
        "path": path,
        "split": split,
        "train_classes": domain.num_classes,
        "train_images": len(domain.train_rows),
        "val_classes": len(np.unique(domain.val_labels)),
    }


@torch.no_grad()
def validate(
    backbone: CopaModel,
    domains: Sequence[DomainData],
    val_pixels: Sequence[torch.Tensor],
    config: TrainingConfig,
) -> dict[str, float]:
    """NCC accuracy on Meta-Dataset episodes of each domain's held-out classes."""
    from .episodes import make_sampler
    from .evaluation import adapt_and_score, episode_chunks

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


def _find_checkpoint(output_dir: Path, resume: str | bool | None) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, str | os.PathLike) and not isinstance(resume, bool):
        path = Path(resume)
        if not (path / TRAINER_STATE_FILE).is_file():
            raise ValueError(f"--resume {path}: not a training checkpoint (no {TRAINER_STATE_FILE} in it).")
        return path
    found = sorted((output_dir / CHECKPOINTS_DIR).glob("step-*/" + TRAINER_STATE_FILE))
    return found[-1].parent if found else None


def _save_checkpoint(
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


def _load_split(path: str, split: str) -> Any:
    """`datasets.load_dataset(path, split=split)`, with evaluation's clear error for a missing split."""
    from .evaluation import Domain, load_split

    return load_split(Domain(name=Path(path).name, path=path, split=split))


__all__ = [
    "TrainingConfig",
    "TrainingResult",
    "train",
    "load_trained_classifiers",
    "save_trained_model",
    "batch_rows",
    "split_domain",
    "augment",
    "cka_loss",
    "logit_distillation_loss",
]
