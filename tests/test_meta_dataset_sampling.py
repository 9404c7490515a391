"""The official Meta-Dataset episode sampler: TensorFlow's own episodes, record for record, and its rules."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hf_copa.episodes import Episode, EpisodeProtocol
from hf_copa.meta_dataset.sampling import (
    MAX_SPANNING_LEAVES_ELIGIBLE,
    OfficialEpisodeSampler,
    official_sampler,
    rows_from_columns,
)
from hf_copa.meta_dataset.specs import load_dataset_spec

# --------------------------------------------------------------------------------------------------------
# The oracle: episodes emitted by Meta-Dataset's pipeline on TensorFlow (see the README beside it).


@pytest.fixture(scope="module")
def oracle(reference_dir: Path) -> tuple[Path, dict]:
    folder = reference_dir / "meta_dataset"
    return folder / "records", json.loads((folder / "episodes.json").read_text())


ORACLE_CASES = [
    ("md_plain", "meta-dataset"),
    ("md_plain", "varying-way-5-shot"),
    ("md_plain", "5-way-1-shot"),
    ("md_bilevel", "meta-dataset"),
    ("md_dag", "meta-dataset"),
]


@pytest.mark.parametrize(("source", "protocol"), ORACLE_CASES)
def test_reproduces_the_official_episodes(oracle, source, protocol):
    records_dir, data = oracle
    assert data["seed"] == 0 and data["shuffle_buffer_size"] == 0
    expected = data["episodes"][source][protocol]
    assert len(expected) == 60
    spec = load_dataset_spec(records_dir / source)
    sampler = OfficialEpisodeSampler(spec, "test", protocol, seed=0, num_episodes=len(expected))
    test_classes = spec.get_classes("test")
    first_row = dict(
        zip(
            test_classes,
            np.cumsum([0] + [spec.images_in_class(c) for c in test_classes]).tolist(),
            strict=False,
        )
    )
    for i, want in enumerate(expected):
        support, query = sampler.records(i)
        assert support.tolist() == want["support"], f"episode {i}: support records"
        assert query.tolist() == want["query"], f"episode {i}: query records"
        episode = sampler.episode(i)
        assert isinstance(episode, Episode) and episode.index == i
        assert episode.support_labels.tolist() == want["support_labels"], f"episode {i}: support labels"
        assert episode.query_labels.tolist() == want["query_labels"], f"episode {i}: query labels"
        # class_ids in order of first appearance in the support set; rows in the converted layout.
        first_seen = list(dict.fromkeys(c for c, _ in want["support"]))
        assert episode.class_ids.tolist() == first_seen
        assert episode.support_indices.tolist() == [first_row[c] + r for c, r in want["support"]]
        assert episode.query_indices.tolist() == [first_row[c] + r for c, r in want["query"]]
        if source == "md_bilevel":
            assert {spec.superclass_of(c) for c in first_seen} == {episode.hierarchy_node}
        elif source == "md_dag":
            assert set(first_seen) <= set(spec.leaf_class_ids("test", episode.hierarchy_node))
        else:
            assert episode.hierarchy_node is None


def test_aliases_prefixes_and_seeds(oracle):
    records_dir, data = oracle
    spec = load_dataset_spec(records_dir / "md_plain")
    for alias, name in (
        ("standard", "meta-dataset"),
        ("5shot", "varying-way-5-shot"),
        ("1shot", "5-way-1-shot"),
    ):
        assert list(OfficialEpisodeSampler(spec, protocol=alias, num_episodes=20)) == list(
            OfficialEpisodeSampler(spec, protocol=name, num_episodes=20)
        )
        assert OfficialEpisodeSampler(spec, protocol=alias, num_episodes=1).protocol == name
    long = OfficialEpisodeSampler(spec, num_episodes=60)
    short = OfficialEpisodeSampler(spec, num_episodes=7)
    assert list(short) == list(long)[:7] and len(short) == 7 and short[3] == long.episode(3)
    other = OfficialEpisodeSampler(spec, seed=1, num_episodes=60)
    assert [e.support_indices.tolist() for e in other] != [e.support_indices.tolist() for e in long]
    expected_rows = set()
    for i in range(60):
        expected_rows.update(
            long.episode(i).support_indices.tolist() + long.episode(i).query_indices.tolist()
        )
    used = long.rows_used()
    assert used.dtype == np.int64 and used.tolist() == sorted(expected_rows)


# --------------------------------------------------------------------------------------------------------
# Generated specifications (no records needed).


def flat_spec(sizes_by_split: dict[str, list[int]], name: str = "gen") -> dict:
    sizes = sizes_by_split.get("TRAIN", []) + sizes_by_split.get("VALID", []) + sizes_by_split.get("TEST", [])
    return {
        "__class__": "DatasetSpecification",
        "name": name,
        "classes_per_split": {k: len(sizes_by_split.get(k, [])) for k in ("TRAIN", "VALID", "TEST")},
        "images_per_class": {str(c): n for c, n in enumerate(sizes)},
        "class_names": {str(c): f"class{c}" for c in range(len(sizes))},
        "path": "",
        "file_pattern": "{}.tfrecords",
    }


def bilevel_spec(superclass_sizes: list[int], images: int = 20) -> dict:
    """Train gets superclass 0, validation superclass 1, test the rest."""
    total = sum(superclass_sizes)
    return {
        "__class__": "BiLevelDatasetSpecification",
        "name": "gen_bilevel",
        "superclasses_per_split": {"TRAIN": 1, "VALID": 1, "TEST": len(superclass_sizes) - 2},
        "classes_per_superclass": {str(k): n for k, n in enumerate(superclass_sizes)},
        "images_per_class": {str(c): images + c % 7 for c in range(total)},
        "superclass_names": {str(k): f"alphabet{k}" for k in range(len(superclass_sizes))},
        "class_names": {str(c): f"char{c}" for c in range(total)},
        "path": "",
        "file_pattern": "{}.tfrecords",
    }


def _node(wn_id, children=(), parents=()):
    return {"wn_id": wn_id, "words": wn_id, "children_ids": sorted(children), "parents_ids": sorted(parents)}


def dag_spec() -> tuple[dict, dict[str, int]]:
    """A test DAG: root -> A (60 leaves), B (20 leaves, one shared with A), C (3 leaves), D (330 leaves,
    under D1 with 7 and D2 with 323). The root spans 412 > 392 leaves and C only 3 < 5: both ineligible."""
    groups = {"A": [f"a{i:03d}" for i in range(60)], "B": ["a000"] + [f"b{i:03d}" for i in range(19)]}
    groups["C"] = [f"c{i:03d}" for i in range(3)]
    groups["D1"] = [f"d{i:03d}" for i in range(7)]
    groups["D2"] = [f"d{i:03d}" for i in range(7, 330)]
    parents: dict[str, set[str]] = {}
    for group, leaves in groups.items():
        for leaf in leaves:
            parents.setdefault(leaf, set()).add(group)
    test = [_node("root", ["A", "B", "C", "D"])]
    test += [_node(g, groups[g], ["root"]) for g in ("A", "B", "C")]
    test += [_node("D", ["D1", "D2"], ["root"])] + [_node(g, groups[g], ["D"]) for g in ("D1", "D2")]
    test += [_node(leaf, (), ps) for leaf, ps in sorted(parents.items())]
    test_leaves = sorted(parents)
    train = [_node("t", ["t0", "t1"]), _node("t0", (), ["t"]), _node("t1", (), ["t"])]
    valid = [_node("v", ["v0", "v1"]), _node("v0", (), ["v"]), _node("v1", (), ["v"])]
    class_names = dict(enumerate(["t0", "t1", "v0", "v1"] + test_leaves))
    sizes = {leaf: 10 + (k % 5) for k, leaf in enumerate(test_leaves)}
    counts = {"t": 20, "t0": 10, "t1": 10, "v": 20, "v0": 10, "v1": 10}
    counts_test = dict(sizes)
    for group, leaves in groups.items():
        counts_test[group] = sum(sizes[leaf] for leaf in leaves)
    counts_test["D"] = counts_test["D1"] + counts_test["D2"]
    counts_test["root"] = sum(sizes.values())
    spec = {
        "__class__": "HierarchicalDatasetSpecification",
        "name": "gen_dag",
        "split_subgraphs": {"TRAIN": train, "VALID": valid, "TEST": test},
        "images_per_class": {
            "TRAIN": {k: counts[k] for k in ("t", "t0", "t1")},
            "VALID": {k: counts[k] for k in ("v", "v0", "v1")},
            "TEST": counts_test,
        },
        "class_names": {str(k): v for k, v in class_names.items()},
        "path": "",
        "file_pattern": "{}.tfrecords",
    }
    span = {g: len(set(v)) for g, v in groups.items()}
    span["D"], span["root"] = 330, len(test_leaves)
    return spec, span


def _no_record_twice(sampler: OfficialEpisodeSampler) -> None:
    for i in range(len(sampler)):
        support, query = sampler.records(i)
        pairs = [tuple(p) for p in np.concatenate([support, query]).tolist()]
        assert len(pairs) == len(set(pairs)), f"episode {i} uses a record twice"
        episode = sampler.episode(i)
        rows = np.concatenate([episode.support_indices, episode.query_indices])
        assert len(np.unique(rows)) == len(rows)


def test_bilevel_episodes_stay_in_one_superclass():
    spec = load_dataset_spec(bilevel_spec([6, 5, 5, 9, 14, 7]))
    sampler = OfficialEpisodeSampler(spec, num_episodes=300)
    assert sampler.hierarchy == "bilevel"
    seen = Counter()
    for episode in sampler:
        superclass = episode.hierarchy_node
        members = spec.classes_of_superclass(superclass)
        assert superclass in spec.get_superclasses("test")
        assert all(c in members for c in episode.class_ids.tolist())
        assert 5 <= episode.num_ways <= len(members)
        seen[superclass] += 1
    assert set(seen) == {2, 3, 4, 5}  # every test superclass is drawn
    _no_record_twice(sampler)
    flat = OfficialEpisodeSampler(spec, num_episodes=50, use_hierarchy=False)
    assert flat.hierarchy is None and all(e.hierarchy_node is None for e in flat)
    assert any(len({spec.superclass_of(c) for c in e.class_ids.tolist()}) > 1 for e in flat)


def test_dag_ways_are_the_leaves_of_an_eligible_node_capped_at_50():
    data, span = dag_spec()
    spec = load_dataset_spec(data)
    sampler = OfficialEpisodeSampler(spec, num_episodes=400)
    assert sampler.hierarchy == "dag"
    drawn = Counter()
    for episode in sampler:
        node = episode.hierarchy_node
        leaves = spec.leaf_class_ids("test", node)
        assert 5 <= len(leaves) <= MAX_SPANNING_LEAVES_ELIGIBLE and len(leaves) == span[node]
        assert set(episode.class_ids.tolist()) <= set(leaves)
        assert episode.num_ways == min(len(leaves), 50)
        if len(leaves) <= 50:  # not subsampled: the node's leaves, in WordNet-id order
            assert tuple(episode.class_ids.tolist()) == leaves
        drawn[node] += 1
    # Eligible: A (60), B (20), D (330), D1 (7), D2 (323); never the root (412 > 392) nor C (3 < 5).
    assert set(drawn) == {"A", "B", "D", "D1", "D2"}
    assert all(abs(count / 400 - 1 / 5) < 0.08 for count in drawn.values())  # one node uniformly
    _no_record_twice(sampler)


@pytest.mark.parametrize("protocol", ["meta-dataset", "varying-way-5-shot", "5-way-1-shot"])
@pytest.mark.parametrize("buffer", [0, 7])
def test_passes_and_flushes(protocol, buffer):
    """A class serves consecutive positions of its current pass; it is flushed and restarted exactly
    when the request exceeds what remains of the pass; with a buffer, a pass never repeats a record."""
    sizes = [12, 13, 15, 17, 20, 24, 31, 40, 55]
    spec = load_dataset_spec(flat_spec({"TEST": sizes}))
    sampler = OfficialEpisodeSampler(spec, protocol=protocol, num_episodes=150, shuffle_buffer_size=buffer)
    cursor = {c: 0 for c in spec.get_classes("test")}
    passes = {c: 0 for c in cursor}
    in_pass: dict[int, list[int]] = {c: [] for c in cursor}
    restarts = 0
    for i in range(len(sampler)):
        support, query = sampler.records(i)
        for draw in sampler.draws(i):
            n, requested = spec.images_in_class(draw.class_id), draw.num_support + draw.num_query
            if requested > n - cursor[draw.class_id]:
                assert draw.flushed == n - cursor[draw.class_id] and draw.start == 0
                assert draw.pass_index == passes[draw.class_id] + 1
                cursor[draw.class_id], in_pass[draw.class_id] = 0, []
                restarts += 1
            else:
                assert draw.flushed == 0 and draw.start == cursor[draw.class_id]
            passes[draw.class_id] = draw.pass_index
            cursor[draw.class_id] += requested
            assert cursor[draw.class_id] <= n
            taken = [r for c, r in np.concatenate([support, query]).tolist() if c == draw.class_id]
            if buffer == 0:
                assert taken == list(range(draw.start, draw.start + requested))
            assert all(0 <= r < n for r in taken)
            in_pass[draw.class_id] += taken
            assert len(set(in_pass[draw.class_id])) == len(in_pass[draw.class_id])
    assert restarts > 20
    _no_record_twice(sampler)


def _first_pass_positions(buffer: int, episodes: int) -> np.ndarray:
    """5 classes of 10 records, 5-way 1-shot: each episode takes 1 + 5 records of every class, which
    always starts a new pass (6 + 6 > 10). Returns counts[t, r]: record r served at step t of a pass."""
    spec = load_dataset_spec(flat_spec({"TEST": [10] * 5}))
    sampler = OfficialEpisodeSampler(
        spec, protocol="5-way-1-shot", num_episodes=episodes, shuffle_buffer_size=buffer, seed=3
    )
    counts = np.zeros((6, 10), dtype=np.int64)
    for i in range(episodes):
        support, query = sampler.records(i)
        assert all(d.start == 0 and d.num_support == 1 and d.num_query == 5 for d in sampler.draws(i))
        for class_id in range(5):
            taken = [r for c, r in np.concatenate([support, query]).tolist() if c == class_id]
            counts[np.arange(6), taken] += 1
    return counts


def _tf_shuffle_probabilities(n: int, buffer: int, steps: int) -> np.ndarray:
    """P[t, r] for tf.data's shuffle: record r enters the buffer after step r - buffer (0 for the first
    `buffer` records); while records remain, each step takes one of `buffer` uniformly."""
    p = np.zeros((steps, n))
    for t in range(steps):
        assert t <= n - buffer  # the formula holds while the buffer is full
        for r in range(n):
            enters = max(0, r - buffer + 1)
            if t >= enters:
                p[t, r] = (1 / buffer) * ((buffer - 1) / buffer) ** (t - enters)
    return p


def test_shuffle_buffer_distribution():
    episodes = 2000
    passes = episodes * 5
    for buffer, expected in ((4, _tf_shuffle_probabilities(10, 4, 6)), (16, np.full((6, 10), 0.1))):
        assert np.allclose(expected.sum(axis=1), 1)
        observed = _first_pass_positions(buffer, episodes) / passes
        impossible = expected == 0
        assert np.all(observed[impossible] == 0), f"buffer {buffer}: a record came out before it could enter"
        # Binomial standard error per cell; 5 sigma over 60 cells: a correct sampler fails with p < 1e-4,
        # while e.g. a full shuffle for buffer 4 is off by 0.15 (35 sigma) at the first step.
        sigma = np.sqrt(expected * (1 - expected) / passes)
        assert np.all(np.abs(observed - expected)[~impossible] <= 5 * sigma[~impossible] + 1e-12), buffer
    # A buffer of 1 is no shuffle (reader.py l. 306), as is 0.
    for buffer in (0, 1):
        counts = _first_pass_positions(buffer, 10)
        assert np.array_equal(counts, 50 * np.eye(6, 10, dtype=np.int64))


def test_shuffle_is_seeded_and_changes_each_pass():
    spec = load_dataset_spec(flat_spec({"TEST": [10] * 5}))
    one = OfficialEpisodeSampler(spec, protocol="5-way-1-shot", num_episodes=5, shuffle_buffer_size=1000)
    two = OfficialEpisodeSampler(spec, protocol="5-way-1-shot", num_episodes=5, shuffle_buffer_size=1000)
    assert list(one) == list(two)
    orders = {tuple(one.records(i)[1][:5, 1].tolist()) for i in range(5)}  # the first class's 5 queries
    assert len(orders) > 1  # a new order each pass
    plain = OfficialEpisodeSampler(spec, protocol="5-way-1-shot", num_episodes=5)
    assert [e.class_ids.tolist() for e in one] == [e.class_ids.tolist() for e in plain]  # same descriptions


# --------------------------------------------------------------------------------------------------------
# Converted (Hub-layout) folders.


def _write_converted(folder: Path, spec_dict: dict, *, order_seed: int = 0, drop: int | None = None) -> None:
    import datasets

    spec = load_dataset_spec(spec_dict)
    (folder / "data").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        pairs = [(c, r) for c in spec.get_classes(split) for r in range(spec.images_in_class(c))]
        if not pairs:
            continue
        if drop is not None:
            pairs = [p for p in pairs if p != (drop, 0)]
        # Rows deliberately not in (class, record) order: the sampler must map through the columns.
        pairs = [pairs[k] for k in np.random.default_rng(order_seed).permutation(len(pairs))]
        table = datasets.Dataset.from_dict(
            {
                "label": [c for c, _ in pairs],
                "record_index": [r for _, r in pairs],
                "image": ["x"] * len(pairs),
            }
        )
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    (folder / "dataset_spec.json").write_text(json.dumps(spec_dict))


def test_converted_folder(tmp_path):
    import datasets

    spec_dict = flat_spec({"TRAIN": [6, 7], "VALID": [5, 5, 6, 7, 8], "TEST": [9, 14, 11, 30, 12, 25]})
    _write_converted(tmp_path, spec_dict)
    sampler = official_sampler(tmp_path, num_episodes=40)
    reference = OfficialEpisodeSampler(spec_dict, num_episodes=40)
    table = datasets.load_dataset(str(tmp_path), split="test").select_columns(["label", "record_index"])
    labels, records = np.asarray(table["label"]), np.asarray(table["record_index"])
    for i in range(40):
        episode, expected = sampler.episode(i), reference.episode(i)
        assert episode.class_ids.tolist() == expected.class_ids.tolist()
        assert episode.support_labels.tolist() == expected.support_labels.tolist()
        support, query = reference.records(i)
        got_support = np.stack([labels[episode.support_indices], records[episode.support_indices]], axis=1)
        got_query = np.stack([labels[episode.query_indices], records[episode.query_indices]], axis=1)
        assert got_support.tolist() == support.tolist() and got_query.tolist() == query.tolist()
    assert episode.support_indices.tolist() != expected.support_indices.tolist()  # rows really remapped
    used = sampler.rows_used()
    assert set(used.tolist()) == {r for e in sampler for r in (*e.support_indices, *e.query_indices)}
    # The validation split, and an already-loaded split passed as `dataset`.
    validation = datasets.load_dataset(str(tmp_path), split="validation")
    again = official_sampler(tmp_path, split="valid", num_episodes=5, dataset=validation)
    assert again.split == "validation"
    assert all(set(e.class_ids.tolist()) <= set(range(2, 7)) for e in again)


def test_converted_folder_errors(tmp_path):
    import datasets

    spec_dict = flat_spec({"TEST": [9, 14, 11, 30, 12, 25]})
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub dataset id"):
        official_sampler(str(tmp_path / "missing" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no dataset_spec\.json.*Copy it there"):
        official_sampler(tmp_path / "empty")
    _write_converted(tmp_path / "dropped", spec_dict, drop=3)
    with pytest.raises(ValueError, match="class 3 has 29 rows but the spec says 30 images"):
        official_sampler(tmp_path / "dropped")
    folder = tmp_path / "spec_only"
    folder.mkdir()
    (folder / "dataset_spec.json").write_text(json.dumps(spec_dict))
    no_column = datasets.Dataset.from_dict({"label": [0, 1]})
    with pytest.raises(ValueError, match=r"no column\(s\) \['record_index'\]"):
        official_sampler(folder, dataset=no_column)

    spec = load_dataset_spec(spec_dict)
    labels = np.repeat(np.arange(6), [9, 14, 11, 30, 12, 25])
    records = np.concatenate([np.arange(n) for n in [9, 14, 11, 30, 12, 25]])
    rows = rows_from_columns(spec, "test", labels[::-1], records[::-1])
    assert rows[5].tolist() == list(range(24, -1, -1))
    duplicated = records.copy()
    duplicated[3] = 2
    with pytest.raises(ValueError, match=r"record_index values of class 0 are not 0..8"):
        rows_from_columns(spec, "test", labels, duplicated)
    with pytest.raises(ValueError, match="row 0 has label 7, which is not a class of the test split"):
        rows_from_columns(spec, "test", np.r_[7, labels[1:]], records)
    with pytest.raises(ValueError, match="must hold integers"):
        rows_from_columns(spec, "test", labels.astype(float), records)


# --------------------------------------------------------------------------------------------------------
# Bad arguments and sources the official code cannot sample from.


def test_bad_arguments():
    spec = flat_spec({"TEST": [20] * 6})
    with pytest.raises(ValueError, match="protocol 'fixed' needs integer num_ways"):
        OfficialEpisodeSampler(spec, protocol="fixed")
    for seed in ("0", 1.5, True, -1, 2**32):
        with pytest.raises(ValueError, match="seed must be"):
            OfficialEpisodeSampler(spec, seed=seed)
    with pytest.raises(ValueError, match="num_episodes must be >= 1"):
        OfficialEpisodeSampler(spec, num_episodes=0)
    with pytest.raises(ValueError, match="shuffle_buffer_size must be >= 0"):
        OfficialEpisodeSampler(spec, shuffle_buffer_size=-1)
    with pytest.raises(ValueError, match="unknown split"):
        OfficialEpisodeSampler(spec, split="dev")
    with pytest.raises(ValueError, match="protocol"):
        official_sampler("does-not/matter", protocol="nope")  # checked before anything is fetched
    sampler = OfficialEpisodeSampler(spec, num_episodes=3)
    with pytest.raises(IndexError, match="episodes 0..2"):
        sampler.episode(3)
    with pytest.raises(ValueError, match="must be an integer"):
        sampler.records("1")
    with pytest.raises(ValueError, match="rows_of must"):
        OfficialEpisodeSampler(spec, rows_of=[1, 2])
    with pytest.raises(ValueError, match=r"rows_of\[0\] must hold one integer row per record \(20\)"):
        OfficialEpisodeSampler(spec, rows_of={c: np.arange(3) for c in range(6)})
    custom = OfficialEpisodeSampler(spec, protocol=EpisodeProtocol(num_ways=5, num_support=2, num_query=3))
    assert all(
        e.num_ways == 5 and e.shots.tolist() == [2] * 5 and e.queries.tolist() == [3] * 5 for e in custom
    )


def test_sources_the_official_sampler_rejects():
    with pytest.raises(ValueError, match="has 4 classes .* fewer than the protocol's min_ways=5"):
        OfficialEpisodeSampler(flat_spec({"TRAIN": [20] * 8, "TEST": [20] * 4}))
    with pytest.raises(ValueError, match="has 0 classes"):
        OfficialEpisodeSampler(flat_spec({"TEST": [20] * 8}), split="train")
    with pytest.raises(
        ValueError, match=r"episode \d+ .* every class needs at least 2 images .* class, \d+, has 1"
    ):
        OfficialEpisodeSampler(flat_spec({"TEST": [20, 20, 20, 20, 1]}), num_episodes=5)
    with pytest.raises(ValueError, match="every class needs at least 6 images"):
        OfficialEpisodeSampler(flat_spec({"TEST": [20, 20, 20, 20, 5]}), protocol="varying-way-5-shot")
    with pytest.raises(ValueError, match="superclass 3 .* has 4 classes, fewer than min_ways=5"):
        OfficialEpisodeSampler(bilevel_spec([6, 5, 5, 4, 9]))
    data, _ = dag_spec()
    with pytest.raises(ValueError, match='use_dag_hierarchy.* incompatible with "num_ways"'):
        OfficialEpisodeSampler(data, protocol=EpisodeProtocol(num_ways=5))
    with pytest.raises(ValueError, match="no internal node of the DAG"):
        OfficialEpisodeSampler(data, protocol=EpisodeProtocol(min_ways=400, max_ways_upper_bound=400))
    with pytest.raises(ValueError, match="use_hierarchy=True needs"):
        OfficialEpisodeSampler(flat_spec({"TEST": [20] * 6}), use_hierarchy=True)
