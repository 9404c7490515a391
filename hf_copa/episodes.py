"""Few-shot episodes sampled from a label column, reproducibly and without touching images.

Everything downstream of the backbone works on cached features, so an episode is only row indices:
support rows, query rows, their labels 0..C-1 and the original class ids. Episode ``i`` of seed ``s`` is
drawn from ``numpy.random.default_rng([s, i])`` and nothing else, so it is the same whatever the number of
processes, the order in which episodes are requested, or the machine (for a given numpy version: numpy
keeps ``Generator`` streams stable within a release line but does not promise it across all releases).

The protocols follow the published code, verified against it:

- ``"meta-dataset"``: the variable-way variable-shot protocol of Triantafillou et al., "Meta-Dataset"
  (ICLR 2020), as implemented in ``google-research/meta-dataset``, ``meta_dataset/data/sampling.py``
  (line numbers below are for commit 00ebaedcbdb8569fa4ef8be881b17cd11fa43e22) with the defaults of
  ``meta_dataset/learn/gin/setups/data_config_common.gin``.
- ``"varying-way-5-shot"`` and ``"5-way-1-shot"``: the two other settings of the CoPA paper, exactly as
  the CoPA and URL code builds them (``data/meta_dataset_reader.py``, ``test_type='5shot'`` and
  ``'1shot'``): ``EpisodeDescriptionConfig(None, 5, None)`` (5 support per class, queries computed as
  ``min(10, min_c n_c - 5)``) and ``EpisodeDescriptionConfig(None, None, None, min_ways=5,
  max_ways_upper_bound=5, max_num_query=10, max_support_size_contrib_per_class=1)`` (always 1 support per
  class and ``min(10, min_c floor(n_c / 2))`` queries: 10 whenever the chosen classes have 20+ examples,
  not the 15 of the miniImageNet convention; pass ``num_query=15`` for that).
- ``"fixed"``: plain N-way K-shot Q-query (``num_ways``, ``num_support``, ``num_query`` all required).

Where this module departs from the original, on purpose: classes too small for the protocol are skipped
with one warning instead of failing mid-run (the original raises in ``compute_num_query``), hierarchy nodes
with fewer classes than the minimum way are skipped instead of rejected (original l. 357-362), a hierarchy
may be combined with a fixed way (the original forbids it), examples are drawn uniformly without
replacement from each class (the original streams them through a 1000-example shuffle buffer), and the
ImageNet DAG ontology is not implemented (only the two-level, Omniglot-style one). For Meta-Dataset's own
test episodes, image for image, on a converted source, use :func:`hf_copa.meta_dataset.official_sampler`
(``hf-copa evaluate --sampling official``); both samplers share this module's protocol table.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .validation import CopaTypeError, check_int

__all__ = [
    "Episode",
    "EpisodeProtocol",
    "EpisodeSampler",
    "LabelIndex",
    "SkippedClassesWarning",
    "available_protocols",
    "canonical_protocol",
    "get_protocol",
    "make_sampler",
]

DEFAULT_NUM_EPISODES = 600  # Meta-Dataset and URL/CoPA evaluate 600 test episodes per domain.


class SkippedClassesWarning(UserWarning):
    """Some classes (or hierarchy nodes) are too small for the protocol and are never sampled."""


# --------------------------------------------------------------------------------------------------------
# The label index: class -> rows, read from the label column only.


def _as_1d_values(values: Any, what: str, *, allow_negative: bool) -> np.ndarray:
    """Normalise labels (or hierarchy nodes) to a 1-D integer or string array."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one value per row (1-D); got an array of shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{what} is empty: there are no rows to sample episodes from.")
    if array.dtype.kind == "O":
        if all(isinstance(value, str) for value in array):
            array = array.astype(str)
        elif all(isinstance(value, int | np.integer) and not isinstance(value, bool) for value in array):
            array = array.astype(np.int64)
    if array.dtype.kind in "iu":
        array = array.astype(np.int64)
        if not allow_negative and array.min() < 0:
            raise ValueError(
                f"{what} has {int((array < 0).sum())} rows with a negative label (-1 usually marks an "
                "unlabelled row); filter them out first, e.g. dataset.filter(lambda y: y >= 0, "
                "input_columns=label_column)."
            )
        return array
    if array.dtype.kind in "US":
        return array
    raise CopaTypeError(f"{what} must hold integers or strings; got values of dtype {array.dtype}.")


@dataclass(frozen=True, eq=False)
class LabelIndex:
    """The rows of every class (and, optionally, the hierarchy node of every class).

    ``class_ids`` is sorted; ``rows[k]`` holds the sorted row indices (int64) of ``class_ids[k]``;
    ``nodes[k]`` is the hierarchy node of ``class_ids[k]`` (None when no hierarchy was given).
    Sorting makes every episode independent of dict or file order.
    """

    class_ids: np.ndarray
    rows: tuple[np.ndarray, ...]
    nodes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.class_ids) != len(self.rows) or (
            self.nodes is not None and len(self.nodes) != len(self.rows)
        ):
            raise ValueError(
                "class_ids, rows and nodes must have one entry per class; use LabelIndex.from_labels."
            )
        if len(self.rows) == 0 or any(len(r) == 0 for r in self.rows):
            raise ValueError("every class needs at least one row; use LabelIndex.from_labels.")

    @property
    def counts(self) -> np.ndarray:
        """Number of rows of each class, aligned with ``class_ids``."""
        return np.array([len(r) for r in self.rows], dtype=np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def from_labels(cls, labels: Any, hierarchy: Any = None) -> LabelIndex:
        """Index a sequence of labels (ints or strings), with an optional node per row (e.g. alphabet)."""
        labels = _as_1d_values(labels, "labels", allow_negative=False)
        class_ids, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable").astype(np.int64)
        bounds = np.cumsum(np.bincount(inverse, minlength=len(class_ids)))[:-1]
        rows = tuple(np.split(order, bounds))
        nodes = None
        if hierarchy is not None:
            hierarchy = _as_1d_values(hierarchy, "hierarchy", allow_negative=True)
            if len(hierarchy) != len(labels):
                raise ValueError(
                    f"hierarchy has {len(hierarchy)} values but labels has {len(labels)}; "
                    "give one node per row."
                )
            nodes = hierarchy[[r[0] for r in rows]]
            mismatched = np.flatnonzero(hierarchy != nodes[inverse])
            if mismatched.size:
                row = int(mismatched[0])
                raise ValueError(
                    f"class {labels[row].item()!r} belongs to several hierarchy nodes "
                    f"({nodes[inverse[row]].item()!r} and {hierarchy[row].item()!r}, e.g. row {row}); "
                    "each class must sit under exactly one node."
                )
        return cls(class_ids=class_ids, rows=rows, nodes=nodes)

    @classmethod
    def from_dataset(
        cls, dataset: Any, label_column: str = "label", hierarchy_column: str | None = None
    ) -> LabelIndex:
        """Index a ``datasets.Dataset`` from its label column alone: no image is decoded."""
        import datasets

        if isinstance(dataset, datasets.DatasetDict):
            raise CopaTypeError(
                f"got a DatasetDict with splits {list(dataset)}; pass one split, e.g. dataset['test']."
            )
        if isinstance(dataset, datasets.IterableDataset):
            raise CopaTypeError(
                "episodes need random access to rows; got an IterableDataset (streaming). "
                "Load the split without streaming=True."
            )
        if not isinstance(dataset, datasets.Dataset):
            raise CopaTypeError(f"expected a datasets.Dataset; got {type(dataset).__name__}.")
        columns = [label_column] + ([hierarchy_column] if hierarchy_column is not None else [])
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"column(s) {missing} not in the dataset; its columns are {dataset.column_names}. "
                "Set label_column / hierarchy_column to the right names (hf-copa evaluate: --label-column)."
            )
        if len(dataset) == 0:
            raise ValueError("the dataset has no rows to sample episodes from.")
        table = dataset.select_columns(columns).with_format("numpy")[:]
        hierarchy = table[hierarchy_column] if hierarchy_column is not None else None
        return cls.from_labels(table[label_column], hierarchy=hierarchy)


# --------------------------------------------------------------------------------------------------------
# Protocols: Meta-Dataset's EpisodeDescriptionConfig, with its published defaults.


@dataclass(frozen=True)
class EpisodeProtocol:
    """How episodes are composed; field names and defaults are Meta-Dataset's ``EpisodeDescriptionConfig``.

    ``None`` for ``num_ways`` / ``num_support`` / ``num_query`` means "sampled as Meta-Dataset does";
    ``num_support`` may also be an inclusive range ``(low, high)`` drawn once per episode, as in the original.
    """

    num_ways: int | None = None
    num_support: int | tuple[int, int] | None = None
    num_query: int | None = None
    min_ways: int = 5
    max_ways_upper_bound: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)
    min_examples_in_class: int = 0
    ignore_hierarchy_probability: float = 0.0
    # Meta-Dataset's switches for its two ontologies (the official sampler reads them; here a bi-level
    # hierarchy column is ignored when ignore_bilevel_ontology is set).
    ignore_dag_ontology: bool = False
    ignore_bilevel_ontology: bool = False

    def __post_init__(self) -> None:
        if self.num_ways is not None:
            check_int("num_ways", self.num_ways, 1)
        if isinstance(self.num_support, tuple | list):
            if len(self.num_support) != 2:
                raise ValueError(f"num_support as a range must be (low, high); got {self.num_support!r}.")
            low, high = self.num_support
            check_int("num_support low", low, 1)
            check_int("num_support high", high, low)
            object.__setattr__(self, "num_support", (int(low), int(high)))
        elif self.num_support is not None:
            check_int("num_support", self.num_support, 1)
        if self.num_query is not None:
            check_int("num_query", self.num_query, 1)
        check_int("min_ways", self.min_ways, 1)
        check_int("max_ways_upper_bound", self.max_ways_upper_bound, self.min_ways)
        check_int("max_num_query", self.max_num_query, 1)
        check_int("max_support_size_contrib_per_class", self.max_support_size_contrib_per_class, 1)
        check_int("min_examples_in_class", self.min_examples_in_class, 0)
        most_ways = self.num_ways if self.num_ways is not None else self.max_ways_upper_bound
        check_int("max_support_set_size", self.max_support_set_size, 1)
        if self.num_support is None and self.max_support_set_size < most_ways:
            raise ValueError(
                f"max_support_set_size={self.max_support_set_size} cannot hold one support example for each "
                f"of up to {most_ways} ways; raise it or lower the way."
            )
        if not (math.isfinite(self.min_log_weight) and math.isfinite(self.max_log_weight)) or (
            self.min_log_weight > self.max_log_weight
        ):
            raise ValueError(
                "need finite min_log_weight <= max_log_weight; "
                f"got {self.min_log_weight}, {self.max_log_weight}."
            )
        if not 0.0 <= self.ignore_hierarchy_probability <= 1.0:
            raise ValueError(
                f"ignore_hierarchy_probability must be in [0, 1]; got {self.ignore_hierarchy_probability}."
            )

    @property
    def required_ways(self) -> int:
        """The fewest classes an episode can have."""
        return self.num_ways if self.num_ways is not None else self.min_ways

    @property
    def min_class_size(self) -> int:
        """The fewest examples a class needs to take part (original: compute_num_query, l. 88-121)."""
        if self.num_support is None:
            support = 1
        elif isinstance(self.num_support, tuple):
            support = self.num_support[1]
        else:
            support = self.num_support
        query = self.num_query if self.num_query is not None else 1
        return max(self.min_examples_in_class, support + query)


_PROTOCOLS: dict[str, EpisodeProtocol] = {
    "meta-dataset": EpisodeProtocol(),
    "varying-way-5-shot": EpisodeProtocol(num_support=5),
    "5-way-1-shot": EpisodeProtocol(min_ways=5, max_ways_upper_bound=5, max_support_size_contrib_per_class=1),
    "fixed": EpisodeProtocol(),  # num_ways, num_support and num_query must be given
}
_ALIASES = {
    "standard": "meta-dataset",  # the names of URL/CoPA's --test.type
    "5shot": "varying-way-5-shot",
    "1shot": "5-way-1-shot",
    "varying-way-five-shot": "varying-way-5-shot",
    "five-way-one-shot": "5-way-1-shot",
}
_OPTION_NAMES = tuple(f.name for f in fields(EpisodeProtocol))


def available_protocols() -> list[str]:
    """Canonical protocol names accepted by :func:`make_sampler`."""
    return sorted(_PROTOCOLS)


def canonical_protocol(name: str) -> str:
    """A protocol's canonical name (CoPA/URL's 'standard', '5shot', '1shot' are aliases)."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _PROTOCOLS:
        raise ValueError(
            f"unknown episode protocol {name!r}; choose one of {available_protocols()} "
            f"(aliases: {sorted(_ALIASES)})."
        )
    return canonical


def get_protocol(name: str, **options: Any) -> EpisodeProtocol:
    """The named protocol, with ``options`` overriding its :class:`EpisodeProtocol` fields."""
    canonical = canonical_protocol(name)
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise CopaTypeError(f"unknown episode option(s) {unknown}; valid options are {list(_OPTION_NAMES)}.")
    protocol = replace(_PROTOCOLS[canonical], **options)
    if canonical == "fixed":
        missing = [n for n in ("num_ways", "num_support", "num_query") if getattr(protocol, n) is None]
        if missing or isinstance(protocol.num_support, tuple):
            raise ValueError(
                f"protocol 'fixed' needs integer num_ways, num_support and num_query (missing: {missing}), "
                "e.g. make_sampler('fixed', labels, num_ways=5, num_support=1, num_query=15)."
            )
    return protocol


# --------------------------------------------------------------------------------------------------------
# Episodes.


@dataclass(frozen=True, eq=False)
class Episode:
    """One few-shot task as row indices into the dataset (or feature cache) it was sampled from.

    Labels are 0..C-1 in the order of ``class_ids``: sorted for this module's samplers (rows grouped by
    label), in order of first appearance for the official Meta-Dataset episodes
    (:mod:`hf_copa.meta_dataset.sampling`, rows in the order its pipeline emits them).
    """

    index: int
    class_ids: np.ndarray
    support_indices: np.ndarray
    support_labels: np.ndarray
    query_indices: np.ndarray
    query_labels: np.ndarray
    hierarchy_node: Any = None

    @property
    def num_ways(self) -> int:
        return len(self.class_ids)

    @property
    def shots(self) -> np.ndarray:
        """Support examples per class, aligned with ``class_ids``."""
        return np.bincount(self.support_labels, minlength=self.num_ways)

    @property
    def queries(self) -> np.ndarray:
        """Query examples per class, aligned with ``class_ids``."""
        return np.bincount(self.query_labels, minlength=self.num_ways)

    def take(self, rows: Any) -> tuple[Any, Any]:
        """Support and query rows of any indexable array (numpy, torch) aligned with the dataset's rows."""
        return rows[self.support_indices], rows[self.query_indices]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Episode):
            return NotImplemented
        arrays = ("class_ids", "support_indices", "support_labels", "query_indices", "query_labels")
        return (
            self.index == other.index
            and self.hierarchy_node == other.hierarchy_node
            and all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays)
        )

    __hash__ = None  # type: ignore[assignment]


class EpisodeSampler:
    """Draws episode ``i`` from ``default_rng([seed, i])``; iterating yields episodes ``0..num_episodes-1``.

    Classes with fewer than ``protocol.min_class_size`` examples are skipped (one warning). With a
    hierarchy in the label index, each episode first picks one node uniformly, then its classes within
    that node (Meta-Dataset's bi-level sampling for Omniglot, original l. 444-468).
    """

    def __init__(
        self,
        index: LabelIndex,
        protocol: EpisodeProtocol | None = None,
        *,
        seed: int = 0,
        num_episodes: int = DEFAULT_NUM_EPISODES,
    ) -> None:
        if not isinstance(index, LabelIndex):
            raise CopaTypeError(f"index must be a LabelIndex; got {type(index).__name__}.")
        check_int("seed", seed, 0)
        check_int("num_episodes", num_episodes, 0)
        self.index = index
        self.protocol = protocol if protocol is not None else EpisodeProtocol()
        self.seed = int(seed)
        self.num_episodes = int(num_episodes)
        self._counts = index.counts
        self._eligible, self._node_values, self._node_members = self._eligible_classes()

    def _eligible_classes(self) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...]]:
        """Classes big enough for the protocol and, with a hierarchy, nodes holding enough of them."""
        counts, nodes = self._counts, self.index.nodes
        min_size, ways = self.protocol.min_class_size, self.protocol.required_ways
        eligible = np.flatnonzero(counts >= min_size)
        found = (
            f"found {len(eligible)} classes with at least {min_size} examples "
            f"({len(counts)} classes in total, sizes {int(counts.min())}..{int(counts.max())})"
        )
        if len(eligible) < ways:
            raise ValueError(
                f"cannot sample episodes: the protocol needs at least {ways} classes with at least "
                f"{min_size} examples, but {found}. Use a larger split, fewer ways or fewer shots/queries."
            )
        skipped = []
        if len(eligible) < len(counts):
            skipped.append(
                f"{len(counts) - len(eligible)} of {len(counts)} classes (fewer than {min_size} examples)"
            )
        node_values, node_members = None, ()
        if nodes is not None:
            values, inverse = np.unique(nodes[eligible], return_inverse=True)
            members = [eligible[inverse == k] for k in range(len(values))]
            keep = [k for k, m in enumerate(members) if len(m) >= ways]
            if not keep:
                raise ValueError(
                    f"cannot sample episodes: each episode stays within one hierarchy node, which needs at "
                    f"least {ways} classes with at least {min_size} examples; {found}, but no node has "
                    f"{ways} of them (the largest has {max(len(m) for m in members)})."
                )
            num_nodes = len(np.unique(nodes))
            if len(keep) < num_nodes:
                skipped.append(
                    f"{num_nodes - len(keep)} of {num_nodes} hierarchy nodes (fewer than {ways} such classes)"
                )
            node_values, node_members = values[keep], tuple(members[k] for k in keep)
        if skipped:
            warnings.warn(
                "skipping what is too small for the episode protocol: " + "; ".join(skipped) + ".",
                SkippedClassesWarning,
                stacklevel=3,
            )
        return eligible, node_values, node_members

    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[Episode]:
        for i in range(self.num_episodes):
            yield self.episode(i)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.protocol}, seed={self.seed}, num_episodes={self.num_episodes}, "
            f"classes={len(self._eligible)}/{len(self._counts)})"
        )

    def episode(self, index: int) -> Episode:
        """Episode ``index``: a pure function of (label index, protocol, seed, index)."""
        check_int("episode index", index, 0)
        rng = np.random.default_rng([self.seed, int(index)])
        chosen, node = self._sample_classes(rng)
        counts = self._counts[chosen]
        num_query = self._num_query(counts)
        shots = self._num_support(rng, counts, num_query)
        support, query, support_labels, query_labels = [], [], [], []
        for label, (position, num_support) in enumerate(zip(chosen, shots, strict=True)):
            picked = rng.choice(self.index.rows[position], size=int(num_support) + num_query, replace=False)
            support.append(picked[:num_support])
            query.append(picked[num_support:])
            support_labels.append(np.full(num_support, label, dtype=np.int64))
            query_labels.append(np.full(num_query, label, dtype=np.int64))
        return Episode(
            index=int(index),
            class_ids=self.index.class_ids[chosen],
            support_indices=np.concatenate(support).astype(np.int64),
            support_labels=np.concatenate(support_labels),
            query_indices=np.concatenate(query).astype(np.int64),
            query_labels=np.concatenate(query_labels),
            hierarchy_node=None if node is None else node.item(),
        )

    def _sample_ways(self, rng: np.random.Generator, available: int) -> int:
        """Original l. 53-70: ways ~ U{min_ways, ..., min(max_ways_upper_bound, available)}."""
        protocol = self.protocol
        if protocol.num_ways is not None:
            return protocol.num_ways
        return int(rng.integers(protocol.min_ways, min(protocol.max_ways_upper_bound, available) + 1))

    def _sample_classes(self, rng: np.random.Generator) -> tuple[np.ndarray, np.generic | None]:
        """Original l. 414-486: a node uniformly, then ways, then classes uniformly without replacement."""
        candidates, node = self._eligible, None
        use_hierarchy = (
            self._node_values is not None
            and not self.protocol.ignore_bilevel_ontology
            and (
                self.protocol.ignore_hierarchy_probability == 0.0
                or rng.random() >= self.protocol.ignore_hierarchy_probability
            )
        )
        if use_hierarchy:
            k = int(rng.integers(len(self._node_values)))
            candidates, node = self._node_members[k], self._node_values[k]
        ways = self._sample_ways(rng, len(candidates))
        return np.sort(rng.choice(candidates, size=ways, replace=False)), node

    def _num_query(self, counts: np.ndarray) -> int:
        """Original l. 88-121 (compute_num_query): balanced queries, capped by max_num_query."""
        protocol = self.protocol
        if protocol.num_query is not None:
            return protocol.num_query
        if protocol.num_support is None:
            return int(min(protocol.max_num_query, (counts // 2).min()))
        largest = protocol.num_support[1] if isinstance(protocol.num_support, tuple) else protocol.num_support
        return int(min(protocol.max_num_query, counts.min() - largest))

    def _num_support(self, rng: np.random.Generator, counts: np.ndarray, num_query: int) -> np.ndarray:
        """Original l. 509-535: fixed or ranged shots, else Meta-Dataset's imbalanced support set."""
        protocol = self.protocol
        if isinstance(protocol.num_support, tuple):
            low, high = protocol.num_support
            return np.full(len(counts), int(rng.integers(low, high + 1)), dtype=np.int64)
        if protocol.num_support is not None:
            return np.full(len(counts), protocol.num_support, dtype=np.int64)
        remaining = counts - num_query
        # Original l. 154-163 (sample_support_set_size): beta ~ U[0, 1),
        # size = min(sum_c floor(beta * min(max_contrib, remaining_c) + 1), max_support_set_size).
        beta = rng.random()
        contributions = np.minimum(protocol.max_support_size_contrib_per_class, remaining)
        size = int(min(np.floor(beta * contributions + 1).sum(), protocol.max_support_set_size))
        # Original l. 203-214 (sample_num_support_per_class): weights n_c * exp(U(min_log_w, max_log_w)),
        # shots_c = min(floor(p_c * (size - ways)) + 1, remaining_c).
        weights = counts * np.exp(rng.uniform(protocol.min_log_weight, protocol.max_log_weight, len(counts)))
        desired = np.floor(weights / weights.sum() * (size - len(counts))).astype(np.int64) + 1
        return np.minimum(desired, remaining)


def make_sampler(
    protocol: str,
    labels_or_dataset: Any,
    label_column: str = "label",
    *,
    hierarchy_column: str | None = None,
    seed: int = 0,
    num_episodes: int = DEFAULT_NUM_EPISODES,
    **options: Any,
) -> EpisodeSampler:
    """An episode sampler for a named protocol over a ``datasets.Dataset``, a label sequence or a LabelIndex.

    ``options`` override :class:`EpisodeProtocol` fields (e.g. ``num_query=15``; ``fixed`` needs
    ``num_ways``, ``num_support`` and ``num_query``). ``hierarchy_column`` names a dataset column (e.g. an
    Omniglot alphabet); for plain label arrays build ``LabelIndex.from_labels(labels, hierarchy=...)``.
    """
    episode_protocol = get_protocol(protocol, **options)
    if isinstance(labels_or_dataset, LabelIndex):
        if hierarchy_column is not None:
            raise ValueError(
                "hierarchy_column applies to a datasets.Dataset; this LabelIndex is already built."
            )
        index = labels_or_dataset
    elif _is_hf_dataset(labels_or_dataset):
        index = LabelIndex.from_dataset(labels_or_dataset, label_column, hierarchy_column)
    else:
        if hierarchy_column is not None:
            raise ValueError(
                "hierarchy_column names a dataset column, but plain labels were given; use "
                "make_sampler(protocol, LabelIndex.from_labels(labels, hierarchy=nodes_per_row))."
            )
        index = LabelIndex.from_labels(labels_or_dataset)
    return EpisodeSampler(index, episode_protocol, seed=seed, num_episodes=num_episodes)


def _is_hf_dataset(obj: Any) -> bool:
    """True for any ``datasets`` container, so LabelIndex.from_dataset can explain what is wrong with it."""
    datasets = sys.modules.get("datasets")  # an object of that library implies it is imported
    if datasets is None:
        return False
    kinds = (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)
    return isinstance(obj, kinds)
