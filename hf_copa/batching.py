"""Support sets of many episodes adapted together: padding to fixed multiples, and chunks of one shape.

Batched support sets are padded to multiples of `ROW_MULTIPLE` rows and `CLASS_MULTIPLE` classes, and a
batch only groups episodes of one padded shape. So an episode's float32 arithmetic, and hence its result,
does not depend on which episodes share its batch: a different padded size changes how the matrix products
block their sums, and adaptation amplifies such round-off into different predictions. A single episode
(`Learner.fit`) runs unpadded, exactly the official arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ROW_MULTIPLE = 64
CLASS_MULTIPLE = 16
# Episodes adapted together: at most this many, and at most this many padded support rows in all.
# On CPU, chunks of 4-8 run 1.3x faster than one-by-one; larger ones lose it to memory traffic
# (each episode brings its own d x d heads and Adam states).
MAX_EPISODES_PER_CHUNK = 8
MAX_SUPPORT_ROWS_PER_CHUNK = 8192


def padded_size(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def padded_shape(num_support: int, num_classes: int) -> tuple[int, int]:
    """(rows, classes) a support set of that size is padded to."""
    return padded_size(num_support, ROW_MULTIPLE), padded_size(num_classes, CLASS_MULTIPLE)


def pad_support_sets(
    support_sets: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[(features [N_i, ...], labels [N_i])] -> features [B, N, ...], labels [B, N] (-1 = padding), classes C.

    N and C are the largest sizes rounded up to ROW_MULTIPLE and CLASS_MULTIPLE; features are vectors
    [N_i, d] or feature maps [N_i, d, h, w].
    """
    first = support_sets[0][0]
    rows = padded_size(max(len(f) for f, _ in support_sets), ROW_MULTIPLE)
    classes = padded_size(max(int(labels.max()) + 1 for _, labels in support_sets), CLASS_MULTIPLE)
    features = first.new_zeros(len(support_sets), rows, *first.shape[1:])
    labels = torch.full((len(support_sets), rows), -1, dtype=torch.long, device=first.device)
    for b, (episode_features, episode_labels) in enumerate(support_sets):
        features[b, : len(episode_features)] = episode_features
        labels[b, : len(episode_labels)] = episode_labels
    return features, labels, classes


def episode_chunks(episodes: Sequence[Any]) -> list[list[int]]:
    """Fixed chunks of episode positions that share a padded shape, bounded in count and rows.

    `episodes` are `hf_copa.episodes.Episode`s. They are sorted by support size; a chunk never mixes padded
    shapes, so batching changes no episode's arithmetic.
    """
    shapes = [
        padded_shape(len(episode.support_indices), int(episode.support_labels.max()) + 1)
        for episode in episodes
    ]
    order = sorted(range(len(episodes)), key=lambda i: (shapes[i], i))
    chunks: list[list[int]] = []
    current: list[int] = []
    for position in order:
        shape = shapes[position]
        if current and (
            shape != shapes[current[0]]
            or len(current) >= MAX_EPISODES_PER_CHUNK
            or shape[0] * (len(current) + 1) > MAX_SUPPORT_ROWS_PER_CHUNK
        ):
            chunks.append(current)
            current = []
        current.append(position)
    if current:
        chunks.append(current)
    return chunks


def largest_first(episodes: Sequence[Any]) -> list[int]:
    """Episode positions, largest support set first: dealt to processes in turn, they share the work."""
    return sorted(range(len(episodes)), key=lambda i: (-len(episodes[i].support_indices), i))


def pad_episodes(features: torch.Tensor, episodes: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Support sets of `episodes` as padded [B, N, d] features, [B, N] labels (-1 = padding), C classes."""
    return pad_support_sets(
        [
            (
                features[torch.as_tensor(e.support_indices)],
                torch.as_tensor(e.support_labels, dtype=torch.long),
            )
            for e in episodes
        ]
    )
