"""Training data: each domain's class split (held-out validation classes), step batches, augmentation.

Batches depend only on (seed, domain, step, process): a resumed run sees exactly the batches the
interrupted one would have seen, and the data need no loader state in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..image_processing_copa import CopaImageProcessor
from ..splits import SplitSpec
from ..validation import CopaValueError
from .config import TrainingConfig


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
        raise CopaValueError(
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


class StepBatches(torch.utils.data.Sampler):
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


class StepCollate:
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


def domain_summary(domain: DomainData, split: SplitSpec) -> dict[str, Any]:
    """What the model card says about one training domain."""
    return {
        "name": domain.name,
        "path": split.path,
        "split": split.split,
        "train_classes": domain.num_classes,
        "train_images": len(domain.train_rows),
        "val_classes": len(np.unique(domain.val_labels)),
    }
