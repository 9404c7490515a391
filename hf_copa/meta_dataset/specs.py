"""Meta-Dataset's dataset specifications (``dataset_spec.json``), read without TensorFlow.

A converted Meta-Dataset source is a folder of ``<class_id>.tfrecords`` files described by a
``dataset_spec.json`` that Meta-Dataset writes with ``DatasetSpecification.to_dict()`` and reads back with
``dataset_spec.load_dataset_spec``. This module parses the three forms of that file (its ``__class__``
field) into frozen dataclasses with the same fields and the same class-id arithmetic. Line numbers are
those of ``google-research/meta-dataset`` commit 167609505780a3dc604f50206253d65839093be9:

- ``DatasetSpecification`` (``meta_dataset/data/dataset_spec.py`` l. 240-352): a flat source (DTD,
  Aircraft, CNAPS' mnist/cifar). The classes of a split are a contiguous range of ids: train first, then
  validation, then test (``get_classes``, l. 39-69).
- ``BiLevelDatasetSpecification`` (l. 355-550): Omniglot. Superclass (alphabet) ids are contiguous per
  split in the same way; the classes of a split are the classes of its superclasses, numbered
  superclass after superclass (``_get_split_offset`` l. 455-477, ``get_classes`` l. 479-501).
- ``HierarchicalDatasetSpecification`` (l. 553-697): ILSVRC-2012. Each split has its own WordNet DAG
  (``split_subgraphs``, exported by ``imagenet_specification.export_graph``, l. 835-874); its classes
  are the leaves of that DAG, so ``classes_per_split`` counts leaves (l. 611-625), and the class id of a
  leaf is whatever ``class_names`` (class id -> WordNet id) says. Meta-Dataset's ImageNet converter
  assigns them by sorting the leaf WordNet ids of train, then validation, then test
  (``dataset_conversion/dataset_to_records.py`` l. 1549-1581), which makes each split's leaves a
  contiguous range; this module checks that they are. ``images_per_class`` is stored per split and per
  WordNet id (internal nodes count the images they span); the number of images of a class is its leaf's
  count in its split (l. 595-602).

``load_dataset_spec`` differs from the original on purpose in one way: a malformed or inconsistent spec
(class counts that do not add up, a class missing from ``images_per_class``, a DAG whose leaves do not
map onto the split's class range, ...) raises a ``ValueError`` naming the file and the problem, where the
original raises a ``KeyError`` deep inside, or loads it and fails later. Like the original (l. 842-843),
the returned spec's ``path`` is the folder it was loaded from. Example-level splits ("pools", a dict of
counts per class) are not supported by Meta-Dataset's readers (``data.POOL_SUPPORTED`` is False), so they
are rejected here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "SPLITS",
    "BiLevelDatasetSpecification",
    "DatasetSpecification",
    "HierarchicalDatasetSpecification",
    "SplitGraph",
    "load_dataset_spec",
    "normalize_split",
]

SPLITS = ("train", "validation", "test")  # Meta-Dataset's Split.TRAIN, Split.VALID, Split.TEST
SPEC_FILENAME = "dataset_spec.json"

# The names Meta-Dataset's to_dict() writes for learning_spec.Split (its enum member names).
_JSON_SPLIT = {"train": "TRAIN", "validation": "VALID", "test": "TEST"}
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
    "TRAIN": "train",
    "VALID": "validation",
    "TEST": "test",
}
_FILE_PATTERNS = ("{}.tfrecords", "{}_{}.tfrecords")  # dataset_spec.py l. 282-284
_SPEC_CLASSES = ("DatasetSpecification", "BiLevelDatasetSpecification", "HierarchicalDatasetSpecification")


def normalize_split(split: Any) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for their usual spellings (``"valid"``, ``"TEST"``...)."""
    name = getattr(split, "name", split)  # also accepts Meta-Dataset's Split enum members
    if isinstance(name, str) and name in _SPLIT_ALIASES:
        return _SPLIT_ALIASES[name]
    raise ValueError(f"unknown split {split!r}; use one of {SPLITS}.")


def _offsets(counts_in_order: list[int]) -> list[int]:
    """Start of each block of a contiguous numbering (dataset_spec.py l. 56-69)."""
    starts, total = [], 0
    for count in counts_in_order:
        starts.append(total)
        total += count
    return starts


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


# --------------------------------------------------------------------------------------------------------
# Flat specification.


@dataclass(frozen=True, eq=False, kw_only=True)
class DatasetSpecification:
    """A flat Meta-Dataset source: ``dataset_spec.py`` l. 240-352.

    ``classes_per_split`` maps ``"train"``/``"validation"``/``"test"`` to a number of classes;
    ``images_per_class`` and ``class_names`` are keyed by absolute class id (0..num_classes-1).
    ``source`` only says where the spec was read from (used in error messages).
    """

    name: str
    classes_per_split: Mapping[str, int]
    images_per_class: Mapping[int, int]
    class_names: Mapping[int, str]
    path: str
    file_pattern: str
    source: str = field(default="<spec>", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes_per_split", _frozen(self.classes_per_split))
        object.__setattr__(self, "images_per_class", _frozen(self.images_per_class))
        object.__setattr__(self, "class_names", _frozen(self.class_names))
        self._validate()

    # -- validation ------------------------------------------------------------------------------------
    def _fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.source}: invalid {type(self).__name__}: {problem}")

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise self._fail(f"'name' must be a non-empty string; got {self.name!r}.")
        if not isinstance(self.path, str):
            raise self._fail(f"'path' must be a string; got {self.path!r}.")
        if self.file_pattern not in _FILE_PATTERNS:
            raise self._fail(
                f"'file_pattern' must be one of {list(_FILE_PATTERNS)} (as Meta-Dataset requires); "
                f"got {self.file_pattern!r}."
            )
        if set(self.classes_per_split) != set(SPLITS):
            raise self._fail(
                f"'classes_per_split' must have the splits {SPLITS}; got {list(self.classes_per_split)}."
            )
        for split, count in self.classes_per_split.items():
            if not _is_count(count):
                raise self._fail(f"classes_per_split[{split!r}] must be an integer >= 0; got {count!r}.")
        self._check_per_class("images_per_class", self.images_per_class, self.num_classes, counts=True)
        self._check_per_class("class_names", self.class_names, self.num_classes, counts=False)

    def _check_per_class(self, what: str, mapping: Mapping, num_classes: int, *, counts: bool) -> None:
        expected = set(range(num_classes))
        keys = set(mapping)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
            raise self._fail(f"'{what}' must be keyed by integer class ids.")
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no entry for class(es) {_few(missing)}")
            if extra:
                parts.append(f"entries for class(es) {_few(extra)} beyond the {num_classes} classes")
            raise self._fail(
                f"'{what}' does not match the {num_classes} classes that {self._count_origin()} add up to: "
                + " and ".join(parts)
                + "."
            )
        for class_id, value in mapping.items():
            if counts and isinstance(value, Mapping):
                raise self._fail(
                    f"images_per_class[{class_id}] is a dict of example-level splits ('pools'), which "
                    "Meta-Dataset's readers do not support (data.POOL_SUPPORTED is False)."
                )
            if counts and not _is_count(value):
                raise self._fail(f"images_per_class[{class_id}] must be an integer >= 0; got {value!r}.")
            if not counts and not isinstance(value, str):
                raise self._fail(f"class_names[{class_id}] must be a string; got {value!r}.")

    def _count_origin(self) -> str:
        return "'classes_per_split'"

    # -- the interface ---------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes over all splits."""
        return sum(self.classes_per_split[s] for s in SPLITS)

    def get_classes(self, split: str) -> range:
        """Absolute class ids of ``split``: contiguous, train then validation then test (l. 39-69)."""
        split = normalize_split(split)
        starts = _offsets([self.classes_per_split[s] for s in SPLITS])
        k = SPLITS.index(split)
        return range(starts[k], starts[k] + self.classes_per_split[split])

    def split_of(self, class_id: int) -> str:
        """The split holding ``class_id``."""
        self._check_class(class_id)
        return next(s for s in SPLITS if class_id in self.get_classes(s))

    def images_in_class(self, class_id: int) -> int:
        """Number of images (records) of ``class_id`` (``get_total_images_per_class``, l. 103-142)."""
        self._check_class(class_id)
        return self.images_per_class[class_id]

    def class_name(self, class_id: int) -> str:
        self._check_class(class_id)
        return self.class_names[class_id]

    def superclass_of(self, class_id: int) -> int | None:
        """The superclass of ``class_id``: None for flat and hierarchical specifications."""
        self._check_class(class_id)
        return None

    def record_file(self, class_id: int) -> str:
        """Path of the ``.tfrecords`` file of ``class_id`` (``reader.py`` l. 279-288; shards unsupported)."""
        self._check_class(class_id)
        if self.file_pattern != "{}.tfrecords":
            raise ValueError(
                f"{self.source}: file_pattern {self.file_pattern!r} (sharded classes) is not supported by "
                "Meta-Dataset's reader either; it expects one '{}.tfrecords' file per class."
            )
        return os.path.join(self.path, self.file_pattern.format(class_id))

    def _check_class(self, class_id: Any) -> None:
        if isinstance(class_id, bool) or not hasattr(class_id, "__index__"):
            raise ValueError(f"a class id must be an integer; got {class_id!r}.")
        if not 0 <= int(class_id) < self.num_classes:
            raise ValueError(
                f"class id {class_id} is not in {self.name!r}, whose classes are 0..{self.num_classes - 1}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form Meta-Dataset writes (``to_dict``, l. 328-352)."""
        return {
            "name": self.name,
            "classes_per_split": {_JSON_SPLIT[s]: self.classes_per_split[s] for s in SPLITS},
            "images_per_class": {str(k): v for k, v in sorted(self.images_per_class.items())},
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())},
            "path": self.path,
            "file_pattern": self.file_pattern,
            "__class__": "DatasetSpecification",
        }

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------------------
# Bi-level specification (Omniglot).


@dataclass(frozen=True, eq=False, kw_only=True)
class BiLevelDatasetSpecification(DatasetSpecification):
    """Omniglot's two-level specification: ``dataset_spec.py`` l. 355-550.

    ``superclasses_per_split`` gives the number of superclasses of each split (contiguous ids, train
    first); ``classes_per_superclass`` the number of classes of each superclass. ``classes_per_split`` is
    derived from them (pass it or leave it out; a given value must agree).
    """

    superclasses_per_split: Mapping[str, int]
    classes_per_superclass: Mapping[int, int]
    superclass_names: Mapping[int, str]
    classes_per_split: Mapping[str, int] = None  # type: ignore[assignment]  # derived

    def __post_init__(self) -> None:
        object.__setattr__(self, "superclasses_per_split", _frozen(self.superclasses_per_split))
        object.__setattr__(self, "classes_per_superclass", _frozen(self.classes_per_superclass))
        object.__setattr__(self, "superclass_names", _frozen(self.superclass_names))
        if set(self.superclasses_per_split) != set(SPLITS):
            raise self._fail(
                f"'superclasses_per_split' must have the splits {SPLITS}; "
                f"got {list(self.superclasses_per_split)}."
            )
        for split, count in self.superclasses_per_split.items():
            if not _is_count(count):
                raise self._fail(f"superclasses_per_split[{split!r}] must be an integer >= 0; got {count!r}.")
        num_superclasses = sum(self.superclasses_per_split.values())
        expected = set(range(num_superclasses))
        for what, mapping in (("classes_per_superclass", self.classes_per_superclass),
                              ("superclass_names", self.superclass_names)):  # fmt: skip
            keys = set(mapping)
            if keys != expected:
                missing, extra = sorted(expected - keys), sorted(keys - expected)
                raise self._fail(
                    f"'{what}' must have one entry for each of the {num_superclasses} superclasses that "
                    f"'superclasses_per_split' adds up to"
                    + (f"; missing {_few(missing)}" if missing else "")
                    + (f"; unexpected {_few(extra)}" if extra else "")
                    + "."
                )
        for sc, count in self.classes_per_superclass.items():
            if not _is_count(count):
                raise self._fail(f"classes_per_superclass[{sc}] must be an integer >= 0; got {count!r}.")
        for sc, value in self.superclass_names.items():
            if not isinstance(value, str):
                raise self._fail(f"superclass_names[{sc}] must be a string; got {value!r}.")
        derived = {s: sum(self.classes_per_superclass[i] for i in self.get_superclasses(s)) for s in SPLITS}
        if self.classes_per_split is not None and dict(self.classes_per_split) != derived:
            raise self._fail(
                f"classes_per_split {dict(self.classes_per_split)} disagrees with the superclass counts, "
                f"which give {derived}."
            )
        object.__setattr__(self, "classes_per_split", derived)
        super().__post_init__()

    def _count_origin(self) -> str:
        return "'classes_per_superclass'"

    @property
    def num_superclasses(self) -> int:
        return sum(self.superclasses_per_split[s] for s in SPLITS)

    def get_superclasses(self, split: str) -> range:
        """Superclass ids of ``split``, contiguous, train then validation then test (l. 433-447)."""
        split = normalize_split(split)
        starts = _offsets([self.superclasses_per_split[s] for s in SPLITS])
        k = SPLITS.index(split)
        return range(starts[k], starts[k] + self.superclasses_per_split[split])

    def superclass_offset(self, superclass_id: int) -> int:
        """Class id of the first class of ``superclass_id`` (l. 519-522)."""
        if not 0 <= int(superclass_id) < self.num_superclasses:
            raise ValueError(f"superclass id {superclass_id} is not in 0..{self.num_superclasses - 1}.")
        return sum(self.classes_per_superclass[i] for i in range(int(superclass_id)))

    def classes_of_superclass(self, superclass_id: int) -> range:
        """Absolute class ids of ``superclass_id``."""
        start = self.superclass_offset(superclass_id)
        return range(start, start + self.classes_per_superclass[int(superclass_id)])

    def superclass_of(self, class_id: int) -> int:
        self._check_class(class_id)
        start = 0
        for superclass_id in range(self.num_superclasses):
            start += self.classes_per_superclass[superclass_id]
            if class_id < start:
                return superclass_id
        raise AssertionError("unreachable: class ids and superclass counts were validated")

    def superclass_name(self, superclass_id: int) -> str:
        self.superclass_offset(superclass_id)  # validates the id
        return self.superclass_names[int(superclass_id)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form Meta-Dataset writes (``to_dict``, l. 535-550)."""
        return {
            "name": self.name,
            "superclasses_per_split": {_JSON_SPLIT[s]: self.superclasses_per_split[s] for s in SPLITS},
            "classes_per_superclass": {str(k): v for k, v in sorted(self.classes_per_superclass.items())},
            "images_per_class": {str(k): v for k, v in sorted(self.images_per_class.items())},
            "superclass_names": {str(k): v for k, v in sorted(self.superclass_names.items())},
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())},
            "path": self.path,
            "file_pattern": self.file_pattern,
            "__class__": "BiLevelDatasetSpecification",
        }


# --------------------------------------------------------------------------------------------------------
# Hierarchical specification (ILSVRC-2012).


@dataclass(frozen=True, eq=False)
class SplitGraph:
    """One split's WordNet DAG, with everything the DAG episode sampler needs, in Meta-Dataset's order.

    All tuples are sorted by WordNet id, the order ``sampling.py`` l. 380-392 imposes. ``spanning_leaves``
    maps every node to the leaves it spans (``imagenet_specification.get_spanning_leaves``, l. 216-242:
    its descendants through parent links, a leaf spanning itself).
    """

    nodes: tuple[str, ...]
    words: Mapping[str, str]
    children: Mapping[str, tuple[str, ...]]
    parents: Mapping[str, tuple[str, ...]]
    leaves: tuple[str, ...]
    internal_nodes: tuple[str, ...]
    spanning_leaves: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, eq=False, kw_only=True)
class HierarchicalDatasetSpecification(DatasetSpecification):
    """ILSVRC-2012's specification: ``dataset_spec.py`` l. 553-697.

    ``split_subgraphs`` holds each split's node list as stored in the JSON (dicts with ``wn_id``,
    ``words``, ``children_ids``, ``parents_ids``); ``images_per_node`` each split's stored
    ``images_per_class`` (WordNet id -> images spanned). ``classes_per_split`` (leaf counts) and
    ``images_per_class`` (class id -> its leaf's count) are derived (pass them or leave them out; given
    values must agree). ``class_names`` maps class ids to leaf WordNet ids.
    """

    split_subgraphs: Mapping[str, tuple[Mapping[str, Any], ...]]
    images_per_node: Mapping[str, Mapping[str, int]]
    classes_per_split: Mapping[str, int] = None  # type: ignore[assignment]  # derived
    images_per_class: Mapping[int, int] = None  # type: ignore[assignment]  # derived
    _graphs: Mapping[str, SplitGraph] = field(init=False, repr=False)
    _class_ids: Mapping[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for what, mapping in (
            ("split_subgraphs", self.split_subgraphs),
            ("images_per_class", self.images_per_node),
        ):
            if not isinstance(mapping, Mapping) or set(mapping) != set(SPLITS):
                got = list(mapping) if isinstance(mapping, Mapping) else type(mapping).__name__
                raise self._fail(f"'{what}' must map each of the splits {SPLITS} to its entries; got {got}.")
        graphs = {split: self._build_graph(split, self.split_subgraphs[split]) for split in SPLITS}
        seen: dict[str, str] = {}
        for split in SPLITS:
            for wn_id in graphs[split].nodes:
                if wn_id in seen:
                    # dataset_spec.py l. 767-775 raises on this too: counts are looked up by WordNet id.
                    raise self._fail(
                        f"WordNet id {wn_id!r} is in both the {seen[wn_id]} and {split} subgraphs."
                    )
                seen[wn_id] = split
        object.__setattr__(
            self, "split_subgraphs", _frozen({s: tuple(self.split_subgraphs[s]) for s in SPLITS})
        )
        counts: dict[str, Mapping[str, int]] = {}
        for split in SPLITS:
            stored = self.images_per_node[split]
            if not isinstance(stored, Mapping):
                raise self._fail(
                    f"images_per_class[{_JSON_SPLIT[split]!r}] must be a dict of WordNet id -> count."
                )
            unknown = sorted(set(stored) - set(graphs[split].nodes))
            if unknown:
                raise self._fail(
                    f"images_per_class[{_JSON_SPLIT[split]!r}] counts WordNet id(s) {_few(unknown)} that are "
                    f"not nodes of the {split} subgraph."
                )
            missing = [leaf for leaf in graphs[split].leaves if leaf not in stored]
            if missing:
                raise self._fail(
                    f"images_per_class[{_JSON_SPLIT[split]!r}] has no count for leaf (class) {_few(missing)} "
                    f"of the {split} subgraph."
                )
            for wn_id, count in stored.items():
                if not _is_count(count):
                    raise self._fail(
                        f"images_per_class[{_JSON_SPLIT[split]!r}][{wn_id!r}] must be an integer >= 0; "
                        f"got {count!r}."
                    )
            counts[split] = _frozen(stored)
        object.__setattr__(self, "images_per_node", _frozen(counts))

        # Leaf -> class id through class_names (the inverse dict, dataset_spec.py l. 588-590).
        if not isinstance(self.class_names, Mapping) or not all(
            isinstance(k, int) and not isinstance(k, bool) and isinstance(v, str)
            for k, v in self.class_names.items()
        ):
            raise self._fail("'class_names' must map integer class ids to WordNet ids (strings).")
        class_ids: dict[str, int] = {}
        for class_id, wn_id in self.class_names.items():
            if wn_id in class_ids:
                raise self._fail(
                    f"class_names gives WordNet id {wn_id!r} to classes {class_ids[wn_id]} and {class_id}."
                )
            class_ids[wn_id] = class_id
        derived_classes = {s: len(graphs[s].leaves) for s in SPLITS}
        starts = _offsets([derived_classes[s] for s in SPLITS])
        derived_images: dict[int, int] = {}
        for k, split in enumerate(SPLITS):
            expected = range(starts[k], starts[k] + derived_classes[split])
            unnamed = [leaf for leaf in graphs[split].leaves if leaf not in class_ids]
            if unnamed:
                raise self._fail(
                    f"class_names has no class id for leaf {_few(unnamed)} of the {split} subgraph."
                )
            ids = sorted(class_ids[leaf] for leaf in graphs[split].leaves)
            if ids != list(expected):
                raise self._fail(
                    f"the {len(ids)} leaves of the {split} subgraph have class ids {_few(ids)} in "
                    "class_names, "
                    f"but Meta-Dataset numbers that split's classes {expected.start}..{expected.stop - 1} "
                    "(train leaves, then validation, then test, each sorted by WordNet id)."
                )
            for leaf in graphs[split].leaves:
                derived_images[class_ids[leaf]] = counts[split][leaf]
        extra = sorted(set(self.class_names) - set(derived_images))
        if extra:
            raise self._fail(f"class_names has class id(s) {_few(extra)} that are not leaves of any split.")
        for what, given, derived in (
            ("classes_per_split", self.classes_per_split, derived_classes),
            ("images_per_class", self.images_per_class, derived_images),
        ):
            if given is not None and dict(given) != derived:
                raise self._fail(f"{what} disagrees with what the split subgraphs and their counts give.")
        object.__setattr__(self, "classes_per_split", derived_classes)
        object.__setattr__(self, "images_per_class", derived_images)
        object.__setattr__(self, "_graphs", _frozen(graphs))
        object.__setattr__(self, "_class_ids", _frozen(class_ids))
        super().__post_init__()

    def _build_graph(self, split: str, node_list: Any) -> SplitGraph:
        label = f"split_subgraphs[{_JSON_SPLIT[split]!r}]"
        if isinstance(node_list, str | bytes) or not hasattr(node_list, "__iter__"):
            raise self._fail(f"{label} must be a list of nodes.")
        words: dict[str, str] = {}
        children: dict[str, tuple[str, ...]] = {}
        parents: dict[str, tuple[str, ...]] = {}
        for position, node in enumerate(node_list):
            if not isinstance(node, Mapping) or not {"wn_id", "children_ids", "parents_ids"} <= set(node):
                raise self._fail(
                    f"{label}[{position}] must be a dict with 'wn_id', 'words', 'children_ids' and "
                    "'parents_ids'."
                )
            wn_id = node["wn_id"]
            if not isinstance(wn_id, str):
                raise self._fail(f"{label}[{position}] has a non-string wn_id {wn_id!r}.")
            if wn_id in words:
                raise self._fail(f"{label} lists WordNet id {wn_id!r} twice.")
            words[wn_id] = str(node.get("words", ""))
            for what, store in (("children_ids", children), ("parents_ids", parents)):
                ids = node[what]
                if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
                    raise self._fail(
                        f"{label}[{position}] ({wn_id}): '{what}' must be a list of WordNet ids."
                    )
                store[wn_id] = tuple(sorted(set(ids)))
        if not words:
            raise self._fail(f"{label} is empty.")
        for wn_id in words:
            for child in children[wn_id]:
                if child not in words:
                    raise self._fail(
                        f"{label}: {wn_id} has child {child!r}, which is not a node of that subgraph."
                    )
                if wn_id not in parents[child]:
                    raise self._fail(
                        f"{label}: {wn_id} lists child {child} but {child} does not list it as a parent."
                    )
            for parent in parents[wn_id]:
                if parent not in words:
                    raise self._fail(
                        f"{label}: {wn_id} has parent {parent!r}, which is not a node of that subgraph."
                    )
                if wn_id not in children[parent]:
                    raise self._fail(
                        f"{label}: {wn_id} lists parent {parent} but {parent} does not list it as a child."
                    )
        # Ancestors through parent links (imagenet_specification.is_descendent, l. 626-638), cycle-checked.
        ancestors: dict[str, frozenset[str]] = {}
        for start in sorted(words):
            stack, on_path = [(start, iter(parents[start]))], {start}
            while stack:
                node, pending = stack[-1]
                parent = next(pending, None)
                if parent is None:
                    stack.pop()
                    on_path.discard(node)
                    ancestors[node] = frozenset().union(*((p, *ancestors[p]) for p in parents[node]))
                elif parent in on_path:
                    raise self._fail(f"{label} has a cycle through {parent}; it must be a DAG.")
                elif parent not in ancestors:
                    stack.append((parent, iter(parents[parent])))
                    on_path.add(parent)
        nodes = tuple(sorted(words))
        leaves = tuple(n for n in nodes if not children[n])
        spanning: dict[str, list[str]] = {n: [] for n in nodes}
        for leaf in leaves:  # in WordNet-id order, so each list comes out sorted
            spanning[leaf].append(leaf)
            for ancestor in ancestors[leaf]:
                spanning[ancestor].append(leaf)
        return SplitGraph(
            nodes=nodes,
            words=_frozen(words),
            children=_frozen(children),
            parents=_frozen(parents),
            leaves=leaves,
            internal_nodes=tuple(n for n in nodes if children[n]),
            spanning_leaves=_frozen({n: tuple(v) for n, v in spanning.items()}),
        )

    def _count_origin(self) -> str:
        return "the split subgraphs' leaves"

    def graph(self, split: str) -> SplitGraph:
        """The DAG of ``split`` (``get_split_subgraph``, l. 627-633)."""
        return self._graphs[normalize_split(split)]

    def class_id_of(self, wn_id: str) -> int:
        """The class id of a leaf WordNet id (``class_names_to_ids``)."""
        try:
            return self._class_ids[wn_id]
        except KeyError:
            raise ValueError(f"{wn_id!r} is not a class (leaf WordNet id) of {self.name!r}.") from None

    def leaf_class_ids(self, split: str, wn_id: str) -> tuple[int, ...]:
        """Class ids of the leaves ``wn_id`` spans in ``split``, in WordNet-id order."""
        graph = self.graph(split)
        if wn_id not in graph.spanning_leaves:
            raise ValueError(
                f"{wn_id!r} is not a node of the {normalize_split(split)} subgraph of {self.name!r}."
            )
        return tuple(self._class_ids[leaf] for leaf in graph.spanning_leaves[wn_id])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form Meta-Dataset writes (``to_dict``, l. 672-697)."""
        return {
            "name": self.name,
            "split_subgraphs": {_JSON_SPLIT[s]: [dict(n) for n in self.split_subgraphs[s]] for s in SPLITS},
            "images_per_class": {_JSON_SPLIT[s]: dict(self.images_per_node[s]) for s in SPLITS},
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())},
            "path": self.path,
            "file_pattern": self.file_pattern,
            "__class__": "HierarchicalDatasetSpecification",
        }


# --------------------------------------------------------------------------------------------------------
# Loading.


def load_dataset_spec(path: Any) -> DatasetSpecification:
    """Read a ``dataset_spec.json``: a folder holding one, the file itself, or its already-parsed dict.

    Returns a :class:`DatasetSpecification`, :class:`BiLevelDatasetSpecification` or
    :class:`HierarchicalDatasetSpecification` according to the ``__class__`` field
    (``dataset_spec.as_dataset_spec``, l. 700-794). Raises ``ValueError`` naming the file and the problem
    if it is malformed or inconsistent.
    """
    if isinstance(path, DatasetSpecification):
        return path
    if isinstance(path, Mapping):
        return _spec_from_dict(path, source="<dict>", folder=None)
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"expected a folder, a dataset_spec.json path or a dict; got {type(path).__name__}.")
    path = Path(path)
    file = path / SPEC_FILENAME if path.is_dir() else path
    if not file.is_file():
        where = f"the folder {path}" if path.is_dir() else str(path)
        raise ValueError(
            f"no {SPEC_FILENAME} found at {where}: pass a converted Meta-Dataset source folder (the one "
            f"holding {SPEC_FILENAME} and the <class_id>.tfrecords files) or the json file itself."
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not a valid JSON dataset specification ({error}).") from None
    return _spec_from_dict(data, source=str(file), folder=str(file.parent))


def _spec_from_dict(data: Any, *, source: str, folder: str | None) -> DatasetSpecification:
    def fail(problem: str) -> ValueError:
        return ValueError(f"{source}: invalid dataset specification: {problem}")

    if not isinstance(data, Mapping):
        raise fail(f"expected a JSON object; got {type(data).__name__}.")
    kind = data.get("__class__")
    if kind not in _SPEC_CLASSES:
        raise fail(f"'__class__' must be one of {list(_SPEC_CLASSES)}; got {kind!r}.")
    required = {
        "DatasetSpecification": ("classes_per_split", "images_per_class"),
        "BiLevelDatasetSpecification": (
            "superclasses_per_split",
            "classes_per_superclass",
            "images_per_class",
            "superclass_names",
        ),
        "HierarchicalDatasetSpecification": ("split_subgraphs", "images_per_class"),
    }[kind] + ("name", "class_names", "path", "file_pattern")
    missing = [key for key in required if key not in data]
    if missing:
        raise fail(f"a {kind} needs the field(s) {missing}.")
    common = dict(
        name=data["name"],
        class_names=_int_keys(data["class_names"], "class_names", fail),
        # Like load_dataset_spec (l. 842-843): the records are where the spec was found.
        path=folder if folder is not None else data["path"],
        file_pattern=data["file_pattern"],
        source=source,
    )
    if kind == "DatasetSpecification":
        return DatasetSpecification(
            classes_per_split=_split_keys(data["classes_per_split"], "classes_per_split", fail),
            images_per_class=_int_keys(data["images_per_class"], "images_per_class", fail),
            **common,
        )
    if kind == "BiLevelDatasetSpecification":
        return BiLevelDatasetSpecification(
            superclasses_per_split=_split_keys(
                data["superclasses_per_split"], "superclasses_per_split", fail
            ),
            classes_per_superclass=_int_keys(data["classes_per_superclass"], "classes_per_superclass", fail),
            superclass_names=_int_keys(data["superclass_names"], "superclass_names", fail),
            images_per_class=_int_keys(data["images_per_class"], "images_per_class", fail),
            **common,
        )
    return HierarchicalDatasetSpecification(
        split_subgraphs=_split_keys(data["split_subgraphs"], "split_subgraphs", fail),
        images_per_node=_split_keys(data["images_per_class"], "images_per_class", fail),
        **common,
    )


def _int_keys(mapping: Any, what: str, fail: Any) -> dict[int, Any]:
    if not isinstance(mapping, Mapping):
        raise fail(f"'{what}' must be a JSON object keyed by integer ids; got {type(mapping).__name__}.")
    result = {}
    for key, value in mapping.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise fail(f"'{what}' has a key {key!r} that is not an integer id.") from None
        if number in result:
            raise fail(f"'{what}' has the id {number} twice.")
        result[number] = value
    return result


def _split_keys(mapping: Any, what: str, fail: Any) -> dict[str, Any]:
    if not isinstance(mapping, Mapping):
        raise fail(f"'{what}' must be a JSON object keyed by TRAIN, VALID and TEST.")
    inverse = {v: k for k, v in _JSON_SPLIT.items()}
    unknown = [key for key in mapping if key not in inverse]
    missing = [v for v in _JSON_SPLIT.values() if v not in mapping]
    if unknown or missing:
        raise fail(
            f"'{what}' must be keyed by exactly TRAIN, VALID and TEST"
            + (f"; unknown {unknown}" if unknown else "")
            + (f"; missing {missing}" if missing else "")
            + "."
        )
    return {inverse[key]: value for key, value in mapping.items()}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _few(values: list, limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
