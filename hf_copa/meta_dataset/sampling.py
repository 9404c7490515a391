"""Meta-Dataset's official test episodes, record for record, without TensorFlow.

Meta-Dataset's one-source episode pipeline (``pipeline.make_one_source_episode_pipeline``) combines an
``EpisodeDescriptionSampler``, which draws each episode's classes and shots with a numpy
``RandomState``, with ``reader.EpisodeReader``, which serves each class's records from its own repeated
(and, with a shuffle buffer, shuffled) ``tf.data`` stream. :class:`OfficialEpisodeSampler` reproduces
both, draw for draw and record for record, from the dataset specification alone, and maps each record
(class id, position in its ``.tfrecords`` file) to a row of a converted Hub dataset. Line numbers are those
of ``google-research/meta-dataset`` commit 167609505780a3dc604f50206253d65839093be9.

**Episode descriptions** (``meta_dataset/data/sampling.py``), with ``numpy.random.RandomState(seed)`` as the
sampler's random state, as CoPA's copy of Meta-Dataset sets it from ``random_seed=args['seed']`` (its
``sampling.py`` replaces l. 261-262 by ``np.random.RandomState(seed=random_seed)``; upstream seeds it
from the module-level ``RNG``, and URL passes no seed at all, so its episodes are not reproducible).
Each episode makes the same numpy calls in the same order (``RandomState`` is numpy's frozen legacy
generator, so its draws do not change with the numpy version):

- flat sources (l. 462-476): ``randint(min_ways, min(max_ways_upper_bound, classes) + 1)`` ways, then
  ``choice(classes, ways, replace=False)``, kept in the drawn (unsorted) order;
- bi-level sources (Omniglot, l. 436-459; the pipeline sets ``use_bilevel_hierarchy`` for them):
  ``choice([True, False], p=[1, 0])`` (a uniform draw even though its outcome is certain), one
  superclass ``choice(superclasses, 1)[0]``, ways ``randint(min_ways, min(max_ways, its classes) + 1)``,
  classes ``choice(its classes, ways, replace=False)``;
- hierarchical sources (ILSVRC-2012, l. 356-435; ``use_dag_hierarchy``): internal nodes of the split's
  DAG, sorted by WordNet id, are eligible when they span between ``min_ways`` and
  ``MAX_SPANNING_LEAVES_ELIGIBLE = 392`` leaves (l. 50, 394-397); each episode draws
  ``choice([True, False], p=[1, 0])``, then a node uniformly, then, when it spans more than
  ``max_ways_upper_bound`` leaves, ``choice(leaves, max_ways_upper_bound, replace=False)``. The node draw
  is ``rng.choice(span_leaves_rel)`` on a list of lists of different lengths (l. 424); numpy >= 1.24
  refuses to make that an array, while the numpy the code was written for made it a 1-D object array,
  for which ``choice`` is one ``randint(0, num_nodes)`` draw. That draw is what is reproduced here (as the
  oracle does), whatever the numpy version; on old numpy, lists that all had the same length (one
  eligible node, say) made a 2-D array on which ``choice`` raised, and here they simply work;
- then (l. 480-531) ``num_query`` (``compute_num_query``, l. 88-121), and the shots: fixed, or drawn as
  ``uniform()`` for the support-set size (l. 124-163) and ``uniform(log 0.5, log 2, ways)`` for the
  per-class weights (l. 166-214), with the same float64 arithmetic so that the floors agree.

The protocols are those of CoPA's and URL's ``data/meta_dataset_reader.py`` (``test_type``) on top of their
``data/meta_dataset_config.gin`` defaults, as :mod:`hf_copa.episodes` defines them for both samplers:
``"meta-dataset"`` (``'standard'``,
``EpisodeDescriptionConfig(None, None, None)``), ``"varying-way-5-shot"`` (``'5shot'``,
``EpisodeDescriptionConfig(None, 5, None)``) and ``"5-way-1-shot"`` (``'1shot'``,
``EpisodeDescriptionConfig(None, None, None, min_ways=5, max_ways_upper_bound=5, max_num_query=10,
max_support_size_contrib_per_class=1)``).

**Records** (``meta_dataset/data/reader.py``). Each class of the split is read in record order and
repeated (l. 290-312). ``episode_representation_generator`` (l. 59-178) keeps one cursor per class,
persistent across episodes: when a class's requested support + query exceeds what remains of its current
pass (its size in the spec minus its cursor), the remaining records are flushed (read and discarded) and
the cursor restarts at 0 (l. 150-153), so an episode never straddles two passes of a class; then the class
serves ``num_support`` then ``num_query`` consecutive records (l. 160-163). The episode's support set is
the support records of each class in description order, then its query set likewise:
``choose_from_datasets`` emits the flush, support and query chunks in that order (l. 173-177, 389-396), and
``pipeline.process_episode`` only drops the flush chunk and the placeholders (``flush_and_chunk_episode``,
``filter_placeholders``) and labels the classes with ``tf.unique`` (order of first appearance); nothing
reorders or shuffles the examples. So ``class_ids`` are in description order, not sorted (unlike what
the docstring of :class:`hf_copa.episodes.Episode` says of hf_copa's own episodes), and the labels are
0..C-1 in that order.

**Shuffle buffer.** ``shuffle_buffer_size=0`` (as the oracle, and URL's advice for reproducing its TSA
paper) is exact. With ``N > 1`` (Meta-Dataset's and CoPA/URL's 1000) the reader shuffles each class's
records with ``tf.data.Dataset.shuffle(min(n_c, N), reshuffle_each_iteration=True)`` before
``repeat()`` (l. 300-312): a buffer is filled with the first ``min(n_c, N)`` records, each draw takes a
uniformly chosen record out of it and refills the buffer with the next record of the pass, and every pass
has a new order. This is reproduced with hf_copa's own random numbers,
``numpy.random.default_rng([seed, class_id])`` per class: the same distribution as TensorFlow, not
TensorFlow's draws (which would need TensorFlow's Philox stream and its seeding of the shuffle op).
``N = 1`` means no shuffle, as in the reader (``if shuffle_buffer_size > 1``, l. 306); so does a class
of one record.

Other differences from the official code, on purpose: everything is computed up front from the spec
(``num_episodes`` episodes, a few ms to a few hundred ms), so a problem the official pipeline would only
raise at the episode that hits it (too few images in a class, l. 110-121, 503-511, 196-199, and
``reader.py`` l. 142-144) is raised at construction as a ``ValueError`` that names the episode and
class; bad arguments (unknown protocol, a non-integer seed, a negative shuffle buffer, which the official
reader treats as 0) raise ``ValueError`` too. ``num_unique_descriptions``,
``episode_description_switch_frequency``, ``use_all_classes`` and example-level pools (none of which
CoPA's or URL's test readers use) are not implemented.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hf_copa.episodes import Episode, EpisodeProtocol, canonical_protocol, get_protocol

from .specs import (
    SPEC_FILENAME,
    BiLevelDatasetSpecification,
    DatasetSpecification,
    HierarchicalDatasetSpecification,
    load_dataset_spec,
    normalize_split,
)

__all__ = [
    "MAX_SPANNING_LEAVES_ELIGIBLE",
    "ClassDraw",
    "OfficialEpisodeSampler",
    "official_sampler",
    "rows_from_columns",
]

MAX_SPANNING_LEAVES_ELIGIBLE = 392  # sampling.py l. 50
DEFAULT_NUM_EPISODES = 600


def _resolve_protocol(protocol: Any) -> tuple[str | None, EpisodeProtocol]:
    """A protocol name (also CoPA/URL's 'standard', '5shot', '1shot') or an `EpisodeProtocol`, which holds
    the fields of Meta-Dataset's `EpisodeDescriptionConfig` (`data/config.py` l. 97-225)."""
    if isinstance(protocol, EpisodeProtocol):
        return None, protocol
    if not isinstance(protocol, str):
        raise ValueError(f"protocol must be a protocol name or an EpisodeProtocol, got {protocol!r}.")
    return canonical_protocol(protocol), get_protocol(protocol)


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__}).")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}; got {value}.")
    return int(value)


class ClassDraw(NamedTuple):
    """One class of an episode: what the description asked for and where its class stream stood.

    ``start`` is the position within pass ``pass_index`` (from 0) of the class's stream at which the
    support records begin; ``flushed`` is how many records of the previous pass were flushed first.
    """

    class_id: int
    num_support: int
    num_query: int
    pass_index: int
    start: int
    flushed: int


# --------------------------------------------------------------------------------------------------------
# Episode descriptions: sampling.py's EpisodeDescriptionSampler.


class _DescriptionSampler:
    """sampling.py l. 217-531, for one split of one source, drawing from ``rng`` (a RandomState)."""

    def __init__(
        self,
        spec: DatasetSpecification,
        split: str,
        config: EpisodeProtocol,
        rng: np.random.RandomState,
        use_hierarchy: bool | None,
    ) -> None:
        self.spec, self.split, self.config, self.rng = spec, split, config, rng
        self.class_set = spec.get_classes(split)
        self.counts = np.array([spec.images_in_class(c) for c in self.class_set], dtype=np.int64)
        where = f"the {split} split of {spec.name!r}"
        # l. 283-314: classes with fewer than min_examples_in_class examples are left out.
        self.filtered = [c for c in self.class_set if spec.images_in_class(c) >= config.min_examples_in_class]
        if config.min_ways and len(self.filtered) < config.min_ways:
            raise ValueError(
                f"{where} has {len(self.filtered)} classes with at least {config.min_examples_in_class} "
                f"examples ({len(self.class_set)} in all), fewer than the protocol's min_ways="
                f"{config.min_ways}: no episode can be made (the official sampler raises too). Use another "
                "split or protocol."
            )
        # l. 324-328 and the pipeline's use_bilevel_ontology / use_dag_ontology for omniglot / ilsvrc_2012.
        bilevel = isinstance(spec, BiLevelDatasetSpecification) and not config.ignore_bilevel_ontology
        dag = isinstance(spec, HierarchicalDatasetSpecification) and not config.ignore_dag_ontology
        if use_hierarchy is False:
            bilevel = dag = False
        elif use_hierarchy and not (bilevel or dag):
            raise ValueError(
                f"use_hierarchy=True needs a bi-level (Omniglot-like) or hierarchical (ImageNet-like) spec; "
                f"{spec.name!r} is a {type(spec).__name__}"
                + (
                    " whose ontology the config says to ignore."
                    if isinstance(spec, BiLevelDatasetSpecification | HierarchicalDatasetSpecification)
                    else "."
                )  # fmt: skip
            )
        self.hierarchy = "bilevel" if bilevel else "dag" if dag else None
        if self.hierarchy is not None and config.num_ways is not None:
            raise ValueError(
                f'"use_{self.hierarchy}_hierarchy" is incompatible with "num_ways" (l. 332, 357).'
            )
        if bilevel:
            if config.min_examples_in_class > 0:
                raise ValueError(
                    '"use_bilevel_hierarchy" is incompatible with "min_examples_in_class" (l. 335).'
                )
            self.superclasses = list(spec.get_superclasses(split))
            for superclass in self.superclasses:  # l. 349-354
                if spec.classes_per_superclass[superclass] < config.min_ways:
                    raise ValueError(
                        f"superclass {superclass} ({spec.superclass_names[superclass]!r}) of {where} has "
                        f"{spec.classes_per_superclass[superclass]} classes, fewer than min_ways="
                        f"{config.min_ways}; the official sampler raises on this."
                    )
        elif dag:
            graph = spec.graph(split)
            allowed = set(self.filtered)
            self.node_ids: list[str] = []
            self.node_leaves: list[np.ndarray] = []
            for node in graph.internal_nodes:  # sorted by WordNet id, leaves too (l. 380-397)
                rel = [
                    spec.class_id_of(leaf) - self.class_set.start
                    for leaf in graph.spanning_leaves[node]
                    if spec.class_id_of(leaf) in allowed
                ]
                if config.min_ways <= len(rel) <= MAX_SPANNING_LEAVES_ELIGIBLE:
                    self.node_ids.append(node)
                    self.node_leaves.append(np.array(rel, dtype=np.int64))
            if not self.node_ids:
                raise ValueError(
                    f"no internal node of the DAG of {where} spans between min_ways={config.min_ways} and "
                    f"{MAX_SPANNING_LEAVES_ELIGIBLE} classes, so no episode can be made (l. 399-404)."
                )

    def _uniform_ways(self, available: int) -> int:
        """sample_num_ways_uniformly, l. 53-70."""
        top = min(self.config.max_ways_upper_bound, available)
        return self.rng.randint(low=self.config.min_ways, high=top + 1)

    def _sample_classes(self) -> tuple[np.ndarray, Any]:
        """sample_class_ids, l. 406-478: relative class ids in drawn order, and the node drawn."""
        config, rng = self.config, self.rng
        prob = [1.0, 0.0]
        if config.ignore_hierarchy_probability:
            prob = [1.0 - config.ignore_hierarchy_probability, config.ignore_hierarchy_probability]
        if self.hierarchy == "dag" and rng.choice([True, False], p=prob):
            k = rng.randint(0, len(self.node_ids))  # rng.choice(span_leaves_rel) as a 1-D object array
            chosen = self.node_leaves[k]
            if len(chosen) > config.max_ways_upper_bound:
                chosen = rng.choice(chosen, size=[config.max_ways_upper_bound], replace=False)
            return np.asarray(chosen, dtype=np.int64), self.node_ids[k]
        if self.hierarchy == "bilevel" and rng.choice([True, False], p=prob):
            superclass = int(rng.choice(self.superclasses, 1)[0])
            size = self.spec.classes_per_superclass[superclass]
            ways = self._uniform_ways(size)
            inds = rng.choice(size, ways, replace=False)
            first = self.spec.superclass_offset(superclass) - self.class_set.start
            return first + np.asarray(inds, dtype=np.int64), superclass
        ways = config.num_ways if config.num_ways is not None else self._uniform_ways(len(self.filtered))
        rel = [c - self.class_set.start for c in self.filtered]
        return np.asarray(rng.choice(rel, ways, replace=False), dtype=np.int64), None

    def sample(self, episode: int) -> tuple[np.ndarray, np.ndarray, int, Any]:
        """sample_episode_description, l. 480-531: (relative classes, shots, num_query, node)."""
        config, rng = self.config, self.rng
        rel, node = self._sample_classes()
        counts = self.counts[rel]

        def fail(problem: str) -> ValueError:
            smallest = int(np.argmin(counts))
            return ValueError(
                f"episode {episode} of the {self.split} split of {self.spec.name!r}: {problem} (its smallest "
                f"class, {self.class_set[rel[smallest]]}, has {int(counts[smallest])} images). The official "
                "pipeline raises on this episode too; use a protocol with fewer shots or queries."
            )

        if config.num_query is not None:
            num_query = config.num_query
        elif config.num_support is None:  # compute_num_query, l. 110-113
            if counts.min() < 2:
                raise fail("every class needs at least 2 images")
            num_query = np.minimum(config.max_num_query, (counts // 2).min())
        else:  # l. 114-121
            largest = config.num_support if isinstance(config.num_support, int) else config.num_support[1]
            if (counts - largest).min() < 1:
                raise fail(f"every class needs at least {largest + 1} images")
            num_query = np.minimum(config.max_num_query, counts.min() - largest)
        num_query = int(num_query)

        if config.num_support is not None:
            if isinstance(config.num_support, int):  # l. 502-505
                if np.any(config.num_support + num_query > counts):
                    raise fail(
                        f"{config.num_support} support + {num_query} query images per class do not fit"
                    )
                shots = np.full(len(rel), config.num_support, dtype=np.int64)
            else:  # l. 506-512
                low, high = config.num_support
                if np.any(high + num_query > counts):
                    raise fail(f"up to {high} support + {num_query} query images per class do not fit")
                shots = np.full(len(rel), rng.randint(low=low, high=high + 1), dtype=np.int64)
            return rel, shots, num_query, node

        remaining = counts - num_query
        # sample_support_set_size, l. 124-163.
        if config.max_support_set_size < len(remaining):
            raise fail(f"max_support_set_size={config.max_support_set_size} is below the {len(rel)} ways")
        beta = rng.uniform()
        contributions = np.minimum(config.max_support_size_contrib_per_class, remaining)
        support_set_size = np.minimum(np.floor(beta * contributions + 1).sum(), config.max_support_set_size)
        # sample_num_support_per_class, l. 166-214 (same float64 operations, so the same floors).
        if support_set_size < len(remaining):
            raise fail("the support set is smaller than the number of ways")
        if np.min(remaining) < 1:
            raise fail(f"no image is left for the support set after {num_query} queries")
        extra = support_set_size - len(remaining)
        weights = counts * np.exp(
            rng.uniform(config.min_log_weight, config.max_log_weight, size=counts.shape)
        )
        proportions = weights / weights.sum()
        desired = np.floor(proportions * extra).astype("int32") + 1
        shots = np.minimum(desired, remaining).astype(np.int64)
        return rel, shots, num_query, node


# --------------------------------------------------------------------------------------------------------
# Class streams: reader.py's per-class datasets, with or without a shuffle buffer.


class _ShuffledPass:
    """One pass over a class through ``tf.data``'s shuffle buffer, generated lazily as it is read.

    A buffer of ``b = min(n, N)`` records; each draw takes a uniformly chosen record out of the buffer and
    puts the pass's next record in its slot (or shrinks the buffer once the pass is exhausted).
    """

    __slots__ = ("_buffer", "_next", "_out", "_rng", "n", "size")

    def __init__(self, n: int, size: int, rng: np.random.Generator) -> None:
        self.n, self.size, self._rng = n, size, rng
        if size >= n:  # the whole class in the buffer: a uniformly random order
            self._out = rng.permutation(n).tolist()
            self._buffer, self._next = [], n
        else:
            self._out, self._buffer, self._next = [], list(range(size)), size

    def take(self, start: int, stop: int) -> list[int]:
        out = self._out
        if stop > len(out):
            steps = np.arange(len(out), stop)
            picks = self._rng.integers(0, np.minimum(self.size, self.n - steps)).tolist()
            buffer, n = self._buffer, self.n
            for j in picks:
                out.append(buffer[j])
                if self._next < n:
                    buffer[j] = self._next
                    self._next += 1
                else:
                    last = buffer.pop()
                    if j < len(buffer):
                        buffer[j] = last
        return out[start:stop]


# --------------------------------------------------------------------------------------------------------
# The sampler.


class OfficialEpisodeSampler:
    """All ``num_episodes`` official test episodes of one split of one source, computed up front.

    ``spec`` is a :class:`~hf_copa.meta_dataset.specs.DatasetSpecification` (or anything
    :func:`~hf_copa.meta_dataset.specs.load_dataset_spec` reads). ``rows_of`` maps each class id of the split
    to the dataset rows of its records (an int array, one entry per record index); by default, the layout of
    a converted split: rows ordered by class id, then record index. ``protocol`` is a name of
    :func:`hf_copa.episodes.available_protocols` (or CoPA/URL's ``'standard'``, ``'5shot'``,
    ``'1shot'``) or an :class:`hf_copa.episodes.EpisodeProtocol`. ``use_hierarchy`` (default: by spec
    class, as the pipeline does for omniglot and ilsvrc_2012) turns the bi-level or DAG ontology off
    (False) or insists on it (True).

    Episodes are :class:`hf_copa.episodes.Episode`: rows in the order the official pipeline emits them,
    labels 0..C-1 by first appearance (``tf.unique``), ``class_ids`` in that order (not sorted), and
    ``hierarchy_node`` the superclass id (bi-level) or WordNet id (DAG) drawn, else None.
    """

    def __init__(
        self,
        spec: Any,
        split: str = "test",
        protocol: Any = "meta-dataset",
        seed: int = 0,
        num_episodes: int = DEFAULT_NUM_EPISODES,
        shuffle_buffer_size: int = 0,
        rows_of: Mapping[int, Any] | None = None,
        *,
        use_hierarchy: bool | None = None,
    ) -> None:
        self.protocol, self.config = _resolve_protocol(protocol)
        self.seed = _check_int("seed", seed, 0, 2**32 - 1)  # numpy.random.RandomState's range
        self.num_episodes = _check_int("num_episodes", num_episodes, 1)
        self.shuffle_buffer_size = _check_int("shuffle_buffer_size", shuffle_buffer_size, 0)
        if use_hierarchy is not None and not isinstance(use_hierarchy, bool):
            raise ValueError(f"use_hierarchy must be None, True or False; got {use_hierarchy!r}.")
        self.spec = load_dataset_spec(spec)
        self.split = normalize_split(split)
        class_set = self.spec.get_classes(self.split)
        self.rows_of = self._check_rows(rows_of, class_set)
        describer = _DescriptionSampler(
            self.spec, self.split, self.config, np.random.RandomState(self.seed), use_hierarchy
        )
        self.hierarchy = describer.hierarchy
        self._episodes: list[Episode] = []
        self._records: list[tuple[np.ndarray, np.ndarray]] = []
        self._draws: list[tuple[ClassDraw, ...]] = []
        self._generate(describer, class_set)

    def _check_rows(self, rows_of: Mapping[int, Any] | None, class_set: range) -> dict[int, np.ndarray]:
        if rows_of is None:
            rows, start = {}, 0
            for class_id in class_set:
                n = self.spec.images_in_class(class_id)
                rows[class_id] = np.arange(start, start + n, dtype=np.int64)
                start += n
            return rows
        if not isinstance(rows_of, Mapping):
            raise ValueError(f"rows_of must map each class id to its rows; got {type(rows_of).__name__}.")
        rows = {}
        for class_id in class_set:
            if class_id not in rows_of:
                raise ValueError(f"rows_of has no rows for class {class_id} of the {self.split} split.")
            array = np.asarray(rows_of[class_id])
            n = self.spec.images_in_class(class_id)
            if array.shape != (n,) or (n and array.dtype.kind not in "iu"):
                raise ValueError(
                    f"rows_of[{class_id}] must hold one integer row per record ({n}); got shape "
                    f"{array.shape} and dtype {array.dtype}."
                )
            rows[class_id] = array.astype(np.int64)
        return rows

    def _generate(self, describer: _DescriptionSampler, class_set: range) -> None:
        counts = describer.counts
        cursors = np.zeros(len(class_set), dtype=np.int64).tolist()
        passes = [0] * len(class_set)
        shuffled: dict[int, _ShuffledPass] = {}
        streams: dict[int, np.random.Generator] = {}
        buffer = self.shuffle_buffer_size
        for index in range(self.num_episodes):
            rel, shots, num_query, node = describer.sample(index)
            draws, support, query, support_rows, query_rows = [], [], [], [], []
            for r, s in zip(rel.tolist(), shots.tolist(), strict=True):
                n, class_id = int(counts[r]), class_set[r]
                requested = s + num_query
                if requested > n:  # reader.py l. 142-144
                    raise ValueError(
                        f"episode {index}: class {class_id} of {self.spec.name!r} has {n} images but the "
                        f"description asks for {s} support + {num_query} query; the official reader raises "
                        "too."
                    )
                flushed = 0
                if requested > n - cursors[r]:  # reader.py l. 150-153: flush the rest of the pass
                    flushed = n - cursors[r]
                    cursors[r] = 0
                    passes[r] += 1
                    shuffled.pop(r, None)
                start = cursors[r]
                cursors[r] += requested
                if buffer > 1 and n > 1:
                    if r not in shuffled:
                        if r not in streams:
                            streams[r] = np.random.default_rng([self.seed, class_id])
                        shuffled[r] = _ShuffledPass(n, min(n, buffer), streams[r])
                    records = np.array(shuffled[r].take(start, start + requested), dtype=np.int64)
                else:
                    records = np.arange(start, start + requested, dtype=np.int64)
                rows = self.rows_of[class_id][records]
                support.append(records[:s])
                query.append(records[s:])
                support_rows.append(rows[:s])
                query_rows.append(rows[s:])
                draws.append(ClassDraw(class_id, s, num_query, passes[r], start, flushed))
            class_ids = np.asarray([class_set[r] for r in rel.tolist()], dtype=np.int64)
            ways = len(class_ids)
            shots_arr = np.asarray(shots, dtype=np.int64)
            support_labels = np.repeat(np.arange(ways, dtype=np.int64), shots_arr)
            query_labels = np.repeat(np.arange(ways, dtype=np.int64), num_query)
            self._records.append(
                (
                    np.stack([np.repeat(class_ids, shots_arr), np.concatenate(support)], axis=1),
                    np.stack([np.repeat(class_ids, num_query), np.concatenate(query)], axis=1),
                )
            )
            self._episodes.append(
                Episode(
                    index=index,
                    class_ids=class_ids,
                    support_indices=np.concatenate(support_rows),
                    support_labels=support_labels,
                    query_indices=np.concatenate(query_rows),
                    query_labels=query_labels,
                    hierarchy_node=node,
                )
            )
            self._draws.append(tuple(draws))

    # -- access ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[Episode]:
        return iter(self._episodes)

    def _check_index(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise ValueError(f"an episode index must be an integer; got {index!r}.")
        if not 0 <= index < self.num_episodes:
            raise IndexError(
                f"episode {index} is out of range: this sampler has episodes 0..{self.num_episodes - 1}."
            )
        return int(index)

    def episode(self, index: int) -> Episode:
        """Episode ``index`` (0-based, in the order the official pipeline emits them)."""
        return self._episodes[self._check_index(index)]

    __getitem__ = episode

    def records(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Support and query records of episode ``index``: int64 arrays of (class_id, record_index) rows."""
        return self._records[self._check_index(index)]

    def draws(self, index: int) -> tuple[ClassDraw, ...]:
        """Per class of episode ``index``, in description order: shots, queries and stream position."""
        return self._draws[self._check_index(index)]

    def rows_used(self) -> np.ndarray:
        """Sorted unique dataset rows (int64) that any episode uses: the only images to embed."""
        parts = [a for e in self._episodes for a in (e.support_indices, e.query_indices)]
        return np.unique(np.concatenate(parts)).astype(np.int64)

    def __repr__(self) -> str:
        protocol = self.protocol if self.protocol is not None else self.config
        return (
            f"{type(self).__name__}({self.spec.name!r}, split={self.split!r}, protocol={protocol!r}, "
            f"seed={self.seed}, num_episodes={self.num_episodes}, "
            f"shuffle_buffer_size={self.shuffle_buffer_size}, hierarchy={self.hierarchy!r})"
        )


# --------------------------------------------------------------------------------------------------------
# Converted sources: local Hub-layout folders and Hub datasets.


def rows_from_columns(
    spec: DatasetSpecification, split: str, labels: Any, record_index: Any, where: str = "the dataset"
) -> dict[int, np.ndarray]:
    """Map each class of ``split`` to its rows, by record index, from a split's ``label`` and
    ``record_index`` columns; checks that they hold every record of every class of the split once."""
    split = normalize_split(split)
    labels = np.asarray(labels)
    record_index = np.asarray(record_index)
    if labels.ndim != 1 or record_index.shape != labels.shape:
        raise ValueError(f"{where}: 'label' and 'record_index' must be two columns of the same length.")
    for name, column in (("label", labels), ("record_index", record_index)):
        if column.size and column.dtype.kind not in "iu":
            raise ValueError(f"{where}: the {name!r} column must hold integers; it holds {column.dtype}.")
    labels, record_index = labels.astype(np.int64), record_index.astype(np.int64)
    classes = spec.get_classes(split)
    outside = np.flatnonzero((labels < classes.start) | (labels >= classes.stop))
    if outside.size:
        row = int(outside[0])
        raise ValueError(
            f"{where}: row {row} has label {int(labels[row])}, which is not a class of the {split} split of "
            f"{spec.name!r} (classes {classes.start}..{classes.stop - 1}; {outside.size} such rows). Is this "
            f"the right split, and the dataset_spec.json of this source?"
        )
    expected = np.array([spec.images_in_class(c) for c in classes], dtype=np.int64)
    found = np.bincount(labels - classes.start, minlength=len(classes))
    wrong = np.flatnonzero(found != expected)
    if wrong.size:
        k = int(wrong[0])
        raise ValueError(
            f"{where}: class {classes[k]} has {int(found[k])} rows but the spec says {int(expected[k])} "
            f"images ({wrong.size} classes of the {split} split disagree); the converted split must hold "
            "every record of every class exactly once."
        )
    order = np.lexsort((record_index, labels))
    starts = np.concatenate([[0], np.cumsum(expected)])
    wanted = np.arange(len(labels), dtype=np.int64) - np.repeat(starts[:-1], expected)
    bad = np.flatnonzero(record_index[order] != wanted)
    if bad.size:
        k = int(np.searchsorted(starts, bad[0], side="right") - 1)
        raise ValueError(
            f"{where}: the record_index values of class {classes[k]} are not 0..{int(expected[k]) - 1} "
            f"(each once); found {int(record_index[order][bad[0]])} where {int(wanted[bad[0]])} was expected."
        )
    return {c: order[starts[k] : starts[k + 1]].astype(np.int64) for k, c in enumerate(classes)}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _open_source(source: Any, split: str, dataset: Any) -> tuple[DatasetSpecification, Any, str]:
    """The spec and the split's ``datasets.Dataset`` of a converted folder or a Hub dataset id."""
    import datasets

    if isinstance(source, str | os.PathLike) and Path(source).exists():
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is a file; pass the converted source folder (holding data/ and {SPEC_FILENAME})."
            )
        if not (folder / SPEC_FILENAME).is_file():
            raise ValueError(
                f"{folder} has no {SPEC_FILENAME}: a converted Meta-Dataset source keeps the records' "
                f"{SPEC_FILENAME} unchanged beside data/. Copy it there from the records folder (or convert "
                "the source again)."
            )
        spec = load_dataset_spec(folder)
        where = str(folder)
        if dataset is None:
            try:
                dataset = datasets.load_dataset(str(folder), split=split)
            except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as error:
                raise ValueError(
                    f"{folder}: cannot load its {split!r} split with datasets.load_dataset ({error}); a "
                    f"converted source holds data/{split}-000NN-of-000MM.parquet shards."
                ) from None
        return spec, dataset, where
    if isinstance(source, str) and _HUB_ID.match(source):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            spec_file = hf_hub_download(source, SPEC_FILENAME, repo_type="dataset")
        except LocalEntryNotFoundError as error:  # offline, or the Hub unreachable, and nothing cached
            raise ValueError(
                f"cannot fetch {SPEC_FILENAME} of the Hub dataset {source!r}: not cached and the Hub cannot "
                f"be reached ({error}). Connect, or pass a local converted folder."
            ) from None
        except EntryNotFoundError:
            raise ValueError(
                f"the Hub dataset {source!r} has no {SPEC_FILENAME}; a converted Meta-Dataset source must "
                "ship it beside data/."
            ) from None
        except RepositoryNotFoundError:
            raise ValueError(f"no Hub dataset {source!r} (nor a local folder of that name).") from None
        spec = load_dataset_spec(spec_file)
        if dataset is None:
            dataset = datasets.load_dataset(source, split=split)
        return spec, dataset, f"the Hub dataset {source!r}"
    raise ValueError(
        f"{source!r} is neither an existing folder nor a Hub dataset id ('owner/name'); pass a converted "
        f"Meta-Dataset source (a folder with data/*.parquet and {SPEC_FILENAME}) or its Hub id."
    )


def official_sampler(
    source: Any,
    split: str = "test",
    protocol: Any = "meta-dataset",
    seed: int = 0,
    num_episodes: int = DEFAULT_NUM_EPISODES,
    shuffle_buffer_size: int = 0,
    *,
    use_hierarchy: bool | None = None,
    dataset: Any = None,
) -> OfficialEpisodeSampler:
    """The official episodes of a converted source: a local Hub-layout folder or a Hub dataset id.

    Reads ``dataset_spec.json`` and only the ``label`` and ``record_index`` columns of ``split`` (no image
    is decoded), checks them against the spec, and returns an :class:`OfficialEpisodeSampler` whose
    episodes index that split's rows (as ``datasets.load_dataset(source, split=split)`` orders them).
    Pass ``dataset`` (that split, already loaded) to avoid loading it again.
    """
    # Cheap argument checks first, before anything is loaded.
    _resolve_protocol(protocol)
    _check_int("seed", seed, 0, 2**32 - 1)
    _check_int("num_episodes", num_episodes, 1)
    _check_int("shuffle_buffer_size", shuffle_buffer_size, 0)
    split = normalize_split(split)
    spec, dataset, where = _open_source(source, split, dataset)
    columns = ["label", "record_index"]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where}: the {split} split has no column(s) {missing} (columns: {dataset.column_names}); a "
            "converted Meta-Dataset split needs 'label' (the class id) and 'record_index'."
        )
    table = dataset.select_columns(columns).with_format("numpy")[:]
    rows_of = rows_from_columns(
        spec, split, table["label"], table["record_index"], where=f"{where} ({split})"
    )
    return OfficialEpisodeSampler(
        spec,
        split,
        protocol,
        seed=seed,
        num_episodes=num_episodes,
        shuffle_buffer_size=shuffle_buffer_size,
        rows_of=rows_of,
        use_hierarchy=use_hierarchy,
    )
