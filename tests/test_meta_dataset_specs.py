"""Meta-Dataset dataset specifications: the reference specs, checked against their raw JSON; bad specs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hf_copa.meta_dataset.specs import (
    SPLITS,
    BiLevelDatasetSpecification,
    DatasetSpecification,
    HierarchicalDatasetSpecification,
    load_dataset_spec,
    normalize_split,
)

JSON_SPLITS = ("TRAIN", "VALID", "TEST")


@pytest.fixture(scope="module")
def records_dir(reference_dir: Path) -> Path:
    return reference_dir / "meta_dataset" / "records"


def raw(records_dir: Path, source: str) -> dict:
    return json.loads((records_dir / source / "dataset_spec.json").read_text())


# --------------------------------------------------------------------------------------------------------
# The reference specs.


def test_flat_reference_spec(records_dir):
    data = raw(records_dir, "md_plain")
    spec = load_dataset_spec(records_dir / "md_plain")
    assert type(spec) is DatasetSpecification
    assert spec.name == "md_plain" and spec.file_pattern == "{}.tfrecords"
    assert spec.path == str(records_dir / "md_plain")  # replaced by where it was found, as Meta-Dataset does
    assert dict(spec.classes_per_split) == {"train": 6, "validation": 3, "test": 8}
    assert [spec.get_classes(s) for s in SPLITS] == [range(0, 6), range(6, 9), range(9, 17)]
    assert spec.num_classes == 17
    assert [spec.images_in_class(c) for c in range(17)] == [
        data["images_per_class"][str(c)] for c in range(17)
    ]
    assert [spec.images_in_class(c) for c in spec.get_classes("test")] == [34, 15, 55, 55, 140, 34, 34, 55]
    assert spec.class_name(13) == "class_13"
    assert spec.superclass_of(13) is None
    assert spec.split_of(8) == "validation" and spec.split_of(9) == "test"
    assert spec.record_file(12) == str(records_dir / "md_plain" / "12.tfrecords")
    assert spec.to_dict() == {**data, "path": spec.path}


def test_bilevel_reference_spec(records_dir):
    data = raw(records_dir, "md_bilevel")
    spec = load_dataset_spec(records_dir / "md_bilevel" / "dataset_spec.json")  # the file itself
    assert type(spec) is BiLevelDatasetSpecification
    assert [spec.get_superclasses(s) for s in SPLITS] == [range(0, 2), range(2, 3), range(3, 6)]
    # Classes per split are the sums of their superclasses' classes: 7+8, 7, 9+9+5.
    assert dict(spec.classes_per_split) == {"train": 15, "validation": 7, "test": 23}
    assert [spec.get_classes(s) for s in SPLITS] == [range(0, 15), range(15, 22), range(22, 45)]
    assert [spec.classes_of_superclass(k) for k in range(6)] == [
        range(0, 7), range(7, 15), range(15, 22), range(22, 31), range(31, 40), range(40, 45)
    ]  # fmt: skip
    for class_id in range(45):  # the class names say which alphabet each character belongs to
        assert spec.class_name(class_id).startswith(spec.superclass_name(spec.superclass_of(class_id)) + "_")
    assert all(spec.images_in_class(c) == 20 for c in range(45))
    assert spec.superclass_names[5] == "alphabet5"
    assert spec.to_dict() == {**data, "path": spec.path}


def _leaves_and_descendants(nodes: list[dict]) -> tuple[list[str], dict[str, set[str]]]:
    """An independent reading of one exported split graph: its leaves and each node's spanned leaves."""
    children = {n["wn_id"]: n["children_ids"] for n in nodes}
    leaves = sorted(w for w, c in children.items() if not c)

    def spanned(wn_id: str) -> set[str]:
        return {wn_id} if not children[wn_id] else set().union(*(spanned(c) for c in children[wn_id]))

    return leaves, {w: spanned(w) for w in children}


def test_hierarchical_reference_spec(records_dir):
    data = raw(records_dir, "md_dag")
    spec = load_dataset_spec(data)  # an already-parsed dict keeps its stored path
    assert type(spec) is HierarchicalDatasetSpecification
    assert spec.path == data["path"]
    all_leaves, start = [], 0
    for split, key in zip(SPLITS, JSON_SPLITS, strict=True):
        leaves, spanned = _leaves_and_descendants(data["split_subgraphs"][key])
        assert spec.classes_per_split[split] == len(leaves)
        assert spec.get_classes(split) == range(start, start + len(leaves))
        start += len(leaves)
        all_leaves += leaves
        graph = spec.graph(split)
        assert graph.leaves == tuple(leaves)
        assert graph.nodes == tuple(sorted(spanned))
        assert graph.internal_nodes == tuple(sorted(set(spanned) - set(leaves)))
        for node, expected in spanned.items():
            assert graph.spanning_leaves[node] == tuple(sorted(expected))
            assert spec.leaf_class_ids(split, node) == tuple(spec.class_id_of(w) for w in sorted(expected))
        for leaf in leaves:
            assert spec.images_in_class(spec.class_id_of(leaf)) == data["images_per_class"][key][leaf]
    # Meta-Dataset's ImageNet converter: class ids follow sorted leaves of train, then valid, then test.
    assert [spec.class_name(c) for c in range(spec.num_classes)] == all_leaves
    assert dict(spec.classes_per_split) == {"train": 6, "validation": 5, "test": 31}
    test_graph = spec.graph("test")
    assert len(test_graph.spanning_leaves["n00000018"]) == 31  # the test root spans every test leaf
    assert {len(test_graph.spanning_leaves[n]) for n in test_graph.internal_nodes} == {2, 3, 4, 6, 7, 9, 31}
    assert spec.superclass_of(20) is None
    assert spec.to_dict() == data


def test_splits_and_ids():
    assert [normalize_split(s) for s in ("train", "valid", "val", "VALID", "validation", "TEST")] == [
        "train", "validation", "validation", "validation", "validation", "test"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        normalize_split("dev")
    spec = load_dataset_spec(_flat())
    assert spec.get_classes("valid") == range(2, 3)
    with pytest.raises(ValueError, match="not in 'toy'"):
        spec.images_in_class(7)
    with pytest.raises(ValueError, match="must be an integer"):
        spec.images_in_class("3")


# --------------------------------------------------------------------------------------------------------
# Bad specs.


def _flat() -> dict:
    return {
        "name": "toy",
        "classes_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 3},
        "images_per_class": {str(c): 10 + c for c in range(6)},
        "class_names": {str(c): f"c{c}" for c in range(6)},
        "path": "/nowhere",
        "file_pattern": "{}.tfrecords",
        "__class__": "DatasetSpecification",
    }


def _bilevel() -> dict:
    return {
        "name": "toy_bilevel",
        "superclasses_per_split": {"TRAIN": 1, "VALID": 1, "TEST": 1},
        "classes_per_superclass": {"0": 2, "1": 3, "2": 5},
        "images_per_class": {str(c): 20 for c in range(10)},
        "superclass_names": {"0": "a", "1": "b", "2": "c"},
        "class_names": {str(c): f"x{c}" for c in range(10)},
        "path": "/nowhere",
        "file_pattern": "{}.tfrecords",
        "__class__": "BiLevelDatasetSpecification",
    }


def _node(wn_id, children=(), parents=()):
    return {"wn_id": wn_id, "words": wn_id, "children_ids": list(children), "parents_ids": list(parents)}


def _dag() -> dict:
    """Train: r0 -> {a, b}; valid: r1 -> {c, d}; test: r2 -> {e, f, g}."""
    graphs = {
        "TRAIN": [_node("r0", ["a", "b"]), _node("a", parents=["r0"]), _node("b", parents=["r0"])],
        "VALID": [_node("r1", ["c", "d"]), _node("c", parents=["r1"]), _node("d", parents=["r1"])],
        "TEST": [_node("r2", ["e", "f", "g"])] + [_node(x, parents=["r2"]) for x in "efg"],
    }
    counts = {
        "TRAIN": {"r0": 3, "a": 1, "b": 2},
        "VALID": {"r1": 7, "c": 3, "d": 4},
        "TEST": {"r2": 18, "e": 5, "f": 6, "g": 7},
    }
    return {
        "name": "toy_dag",
        "split_subgraphs": graphs,
        "images_per_class": counts,
        "class_names": {str(k): w for k, w in enumerate("abcdefg")},
        "path": "/nowhere",
        "file_pattern": "{}.tfrecords",
        "__class__": "HierarchicalDatasetSpecification",
    }


def test_generated_specs_load():
    assert load_dataset_spec(_flat()).get_classes("test") == range(3, 6)
    bilevel = load_dataset_spec(_bilevel())
    assert bilevel.get_classes("test") == range(5, 10) and bilevel.superclass_of(4) == 1
    dag = load_dataset_spec(_dag())
    assert dag.get_classes("test") == range(4, 7) and dag.images_in_class(6) == 7
    assert dag.leaf_class_ids("test", "r2") == (4, 5, 6)


def _mutate(make, change):
    data = make()
    change(data)
    return data


BAD_SPECS = {
    "counts do not add up": (
        _flat,
        lambda d: d["classes_per_split"].update(TEST=4),
        r"'images_per_class' does not match the 7 classes.*no entry for class\(es\) 6",
    ),
    "missing class": (_flat, lambda d: d["images_per_class"].pop("4"), r"no entry for class\(es\) 4"),
    "extra class": (
        _flat,
        lambda d: d["images_per_class"].update({"6": 3}),
        r"entries for class\(es\) 6 beyond the 6 classes",
    ),
    "missing name": (_flat, lambda d: d["class_names"].pop("0"), r"'class_names' does not match"),
    "negative count": (_flat, lambda d: d["images_per_class"].update({"2": -1}), r"images_per_class\[2\]"),
    "string count": (_flat, lambda d: d["images_per_class"].update({"2": "12"}), r"images_per_class\[2\]"),
    "pools": (_flat, lambda d: d["images_per_class"].update({"2": {"train": 3}}), "pools"),
    "non-integer key": (_flat, lambda d: d["images_per_class"].update({"x": 3}), "not an integer id"),
    "bad split key": (
        _flat,
        lambda d: d.update(classes_per_split={"TRAIN": 2, "VAL": 1, "TEST": 3}),
        r"unknown \['VAL'\]; missing \['VALID'\]",
    ),
    "bad file pattern": (_flat, lambda d: d.update(file_pattern="{}.tfrec"), "file_pattern"),
    "unknown class": (_flat, lambda d: d.update(__class__="Spec"), "'__class__' must be one of"),
    "missing field": (
        _flat,
        lambda d: d.pop("images_per_class"),
        r"needs the field\(s\) \['images_per_class'\]",
    ),
    "superclass missing": (
        _bilevel,
        lambda d: d["classes_per_superclass"].pop("2"),
        r"'classes_per_superclass' must have one entry .* 3 superclasses.*missing 2",
    ),
    "superclass counts do not add up": (
        _bilevel,
        lambda d: d["classes_per_superclass"].update({"2": 6}),
        r"no entry for class\(es\) 10",
    ),
    "leaf without count": (_dag, lambda d: d["images_per_class"]["TEST"].pop("f"), "no count for leaf"),
    "unknown counted node": (
        _dag,
        lambda d: d["images_per_class"]["TEST"].update(zz=1),
        "not nodes of the test subgraph",
    ),
    "child outside graph": (
        _dag,
        lambda d: d["split_subgraphs"]["TEST"][0]["children_ids"].append("zz"),
        "has child 'zz', which is not a node",
    ),
    "one-sided link": (
        _dag,
        lambda d: d["split_subgraphs"]["TEST"][1]["parents_ids"].clear(),
        "does not list it as a parent",
    ),
    "cycle": (
        _dag,
        lambda d: (
            d["split_subgraphs"]["TEST"][1]["children_ids"].append("r2"),
            d["split_subgraphs"]["TEST"][0]["parents_ids"].append("e"),
        ),
        "cycle",
    ),
    "node in two splits": (
        _dag,
        lambda d: (
            d["split_subgraphs"]["VALID"].append(_node("a", parents=["r1"])),
            d["split_subgraphs"]["VALID"][0]["children_ids"].append("a"),
        ),
        "in both the train and validation subgraphs",
    ),
    "leaf ids outside the split's range": (
        _dag,
        lambda d: d["class_names"].update({"1": "e", "4": "b"}),
        r"leaves of the train subgraph have class ids 0, 4 .* numbers that split's classes 0..1",
    ),
    "leaf without class id": (_dag, lambda d: d["class_names"].pop("6"), "no class id for leaf g"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_raises_value_error_naming_the_file(case, tmp_path):
    make, change, message = BAD_SPECS[case]
    data = _mutate(make, change)
    with pytest.raises(ValueError, match=message):
        load_dataset_spec(copy.deepcopy(data))
    (tmp_path / "dataset_spec.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        load_dataset_spec(tmp_path)
    assert str(error.value).startswith(str(tmp_path / "dataset_spec.json") + ":")


def test_unreadable_or_missing_spec(tmp_path):
    with pytest.raises(ValueError, match=r"no dataset_spec\.json found at the folder"):
        load_dataset_spec(tmp_path)
    (tmp_path / "dataset_spec.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON dataset specification") as error:
        load_dataset_spec(tmp_path)
    assert str(tmp_path) in str(error.value)
    (tmp_path / "dataset_spec.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_dataset_spec(tmp_path)
    with pytest.raises(TypeError):
        load_dataset_spec(3)


def test_derived_fields_must_agree():
    spec = load_dataset_spec(_bilevel())
    with pytest.raises(ValueError, match="disagrees with the superclass counts"):
        BiLevelDatasetSpecification(
            name=spec.name,
            superclasses_per_split=spec.superclasses_per_split,
            classes_per_superclass=spec.classes_per_superclass,
            superclass_names=spec.superclass_names,
            classes_per_split={"train": 2, "validation": 3, "test": 4},
            images_per_class=spec.images_per_class,
            class_names=spec.class_names,
            path="",
            file_pattern="{}.tfrecords",
        )
