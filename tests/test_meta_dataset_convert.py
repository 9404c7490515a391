"""Meta-Dataset records -> Hub-layout parquet datasets: contents, checks, resumption, refusal, the Hub."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import crc32c
import datasets
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard, HfApi

from hf_copa.meta_dataset import convert
from hf_copa.meta_dataset.convert import STATE_FILENAME, OutputFolderError, convert_records, convert_source
from hf_copa.meta_dataset.records import RecordError
from hf_copa.meta_dataset.specs import SPLITS, load_dataset_spec
from tests.support.local_hub import local_hub_env
from tests.support.meta_dataset_fixtures import (
    flip_byte,
    remove_class_file,
    replace_record,
    set_count,
    truncate_record,
    write_source,
)

REFERENCE_SOURCES = ("md_bilevel", "md_dag", "md_plain")


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_tfrecord_examples(path: Path) -> list[tuple[bytes, int]]:
    """(image, label) of each record, read here without the package: struct framing, crc32c, a minimal
    protobuf walk of tf.train.Example{features{feature{key, value{bytes_list|int64_list{value}}}}}."""

    def varint(buf, pos):
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7

    def fields(buf):
        pos = 0
        while pos < len(buf):
            key, pos = varint(buf, pos)
            assert key & 7 in (0, 2)
            value, pos = varint(buf, pos)
            if key & 7 == 2:
                yield key >> 3, buf[pos : pos + value]
                pos += value
            else:
                yield key >> 3, value

    blob, out, offset = path.read_bytes(), [], 0
    while offset < len(blob):
        header = blob[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack_from("<I", blob, offset + 8)[0] == _mask(crc32c.crc32c(header))
        data = blob[offset + 12 : offset + 12 + length]
        assert struct.unpack_from("<I", blob, offset + 12 + length)[0] == _mask(crc32c.crc32c(data))
        features = {}
        for _, features_msg in fields(data):
            for _, entry in fields(features_msg):
                entry = dict(fields(entry))
                ((kind, values),) = fields(entry[2])
                ((_, value),) = fields(values)
                if kind == 3:  # int64_list: packed
                    value = varint(value, 0)[0] if isinstance(value, bytes) else value
                features[entry[1].decode()] = value
        out.append((features["image"], features["label"]))
        offset += 16 + length
    return out


@pytest.fixture(scope="module")
def reference_conversion(reference_dir: Path, tmp_path_factory):
    records = reference_dir / "meta_dataset" / "records"
    output = tmp_path_factory.mktemp("md-converted")
    results = convert_records(records, output, progress=False, max_shard_bytes=2_000_000)
    return records, output, {result.name: result for result in results}


def _load(folder: Path, split: str) -> datasets.Dataset:
    return datasets.load_dataset(str(folder), split=split)


@pytest.mark.parametrize("source", REFERENCE_SOURCES)
def test_reference_sources_convert_faithfully(reference_conversion, source):
    records, output, results = reference_conversion
    spec = load_dataset_spec(records / source)
    folder = output / source
    assert results[source].status == "converted"
    assert (folder / "dataset_spec.json").read_bytes() == (
        records / source / "dataset_spec.json"
    ).read_bytes()

    names = [spec.class_name(i) for i in range(spec.num_classes)]
    expected_features = {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=names),
        "record_index": datasets.Value("int64"),
    }
    if source == "md_bilevel":
        superclass_names = [spec.superclass_names[i] for i in range(len(spec.superclass_names))]
        expected_features["superclass"] = datasets.ClassLabel(names=superclass_names)
    for split in SPLITS:
        classes = spec.get_classes(split)
        assert len(classes) > 0  # the reference sources have all three splits
        table = _load(folder, split)
        assert table.features == datasets.Features(expected_features)
        assert len(table) == sum(spec.images_in_class(c) for c in classes)
        raw = table.cast_column("image", datasets.Image(decode=False))
        labels, indices = raw["label"], raw["record_index"]
        images = [image["bytes"] for image in raw["image"]]
        assert all(image["path"] is None for image in raw["image"])
        # classes in id order, records in file order, bytes unchanged
        expected_rows = [
            (class_id, index, image)
            for class_id in classes
            for index, (image, label) in enumerate(
                _read_tfrecord_examples(records / source / f"{class_id}.tfrecords")
            )
            if label == class_id
        ]
        assert list(zip(labels, indices, images, strict=True)) == expected_rows
        if source == "md_bilevel":
            assert raw["superclass"] == [spec.superclass_of(c) for c in labels]
        # every shard declares the features in its arrow schema too
        for file in results[source].splits[split].files:
            schema = pq.read_schema(folder / file)
            assert datasets.Features.from_arrow_schema(schema) == datasets.Features(expected_features)


def test_reference_card(reference_conversion):
    records, output, _ = reference_conversion
    card = DatasetCard.load(output / "md_bilevel" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "other"
    assert data["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": split, "path": f"data/{split}-*"} for split in SPLITS],
        }
    ]
    spec = load_dataset_spec(records / "md_bilevel")
    splits = {split["name"]: split["num_examples"] for split in data["dataset_info"]["splits"]}
    assert splits == {
        split: sum(spec.images_in_class(c) for c in spec.get_classes(split)) for split in SPLITS
    }
    from hf_copa import __version__

    text = card.text
    assert f"hf_copa {__version__}" in text and "UTC" in text and "convert_records(" in text
    assert "licence and terms" in text and "**private**" in text
    assert "| test | 23 | 22–44 | 460 |" in text  # classes, ids, images per split
    assert list((output / "md_bilevel" / "data").glob(".*")) == []


def test_rerun_skips_finished_sources(reference_conversion):
    records, output, _ = reference_conversion
    before = {path: path.stat().st_mtime_ns for path in output.rglob("*") if path.is_file()}
    again = convert_records(records, output, progress=False, max_shard_bytes=2_000_000)
    assert [result.status for result in again] == ["skipped"] * 3
    assert {path: path.stat().st_mtime_ns for path in output.rglob("*") if path.is_file()} == before


# --- synthetic sources ---------------------------------------------------------------------------------


def _shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "data").glob("*.parquet"))


def _hidden(folder: Path) -> list[Path]:
    return sorted(path for path in (folder / "data").glob(".*")) if (folder / "data").exists() else []


def _source(tmp_path: Path, name: str = "src", **kwargs) -> Path:
    kwargs.setdefault("classes_per_split", (2, 1, 3))
    kwargs.setdefault("images_per_class", lambda c: 5 + c)
    return write_source(tmp_path / "records" / name, seed=len(name), **kwargs)


SMALL_SHARDS = 4_000  # bytes of record data: a few records per shard


def test_shards_are_bounded_deterministic_and_loadable(tmp_path):
    source = _source(tmp_path)
    first = convert_source(source, tmp_path / "a", max_shard_bytes=SMALL_SHARDS, progress=False)
    convert_source(source, tmp_path / "b", max_shard_bytes=SMALL_SHARDS, progress=False, row_group_rows=2)
    for split, summary in first.splits.items():
        assert summary.num_shards > 1
        assert [Path(f).name for f in summary.files] == [
            f"{split}-{i:05d}-of-{summary.num_shards:05d}.parquet" for i in range(summary.num_shards)
        ]
    # shard sizes stay near the bound (one record of slack: a record is never split)
    for path in _shard_files(tmp_path / "a"):
        assert path.stat().st_size < SMALL_SHARDS + 6_000
    assert pq.ParquetFile(tmp_path / "b" / first.splits["test"].files[0]).metadata.num_row_groups > 1
    for split in SPLITS:
        rows_a, rows_b = _load(tmp_path / "a", split).to_dict(), _load(tmp_path / "b", split).to_dict()
        assert rows_a["label"] == rows_b["label"] and rows_a["record_index"] == rows_b["record_index"]
    # the same inputs and bound give byte-identical shards
    again = convert_source(source, tmp_path / "c", max_shard_bytes=SMALL_SHARDS, progress=False)
    assert again.splits == first.splits
    for path in _shard_files(tmp_path / "a"):
        assert (tmp_path / "c" / "data" / path.name).read_bytes() == path.read_bytes()


def test_cnaps_like_test_only_source(tmp_path):
    source = _source(tmp_path, "mnist", classes_per_split=(0, 0, 10), images_per_class=3)
    result = convert_records(source, tmp_path / "out", progress=False)[0]
    assert result.declared_splits == ["test"] and result.splits["train"].num_shards == 0
    folder = tmp_path / "out" / "mnist"
    assert [p.name for p in _shard_files(folder)] == ["test-00000-of-00001.parquet"]
    test = _load(folder, "test")
    assert len(test) == 30 and test["label"] == [c for c in range(10) for _ in range(3)]
    assert test.features["label"].names[3] == "mnist_class003"
    with pytest.raises(ValueError, match="train"):
        _load(folder, "train")
    card = DatasetCard.load(folder / "README.md").data.to_dict()
    assert [f["split"] for f in card["configs"][0]["data_files"]] == ["test"]
    assert "A split without images has no shards" in DatasetCard.load(folder / "README.md").text


def test_bilevel_synthetic_source_has_superclasses(tmp_path):
    source = _source(
        tmp_path,
        "omni",
        superclasses_per_split=(1, 1, 2),
        classes_per_superclass=(2, 1, 3, 2),
        images_per_class=2,
    )
    convert_records(source, tmp_path / "out", progress=False)
    test = _load(tmp_path / "out" / "omni", "test")
    assert test["label"] == [3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert test["superclass"] == [2] * 6 + [3] * 4
    assert test.features["superclass"].names == ["alphabet0", "alphabet1", "alphabet2", "alphabet3"]


def test_duplicate_class_names_get_their_id(tmp_path):
    source = _source(tmp_path, classes_per_split=(0, 0, 3), class_names=["a", "b", "a"], images_per_class=1)
    convert_records(source, tmp_path / "out", progress=False)
    assert _load(tmp_path / "out" / "src", "test").features["label"].names == ["a (0)", "b", "a (2)"]


# --- damage: each stops the source, names file and record, keeps finished work, leaves no partial shard ---


@pytest.fixture
def two_sources(tmp_path):
    """records/a_good (converted first) and records/b_bad (to be damaged); and an undamaged reference
    conversion of b_bad in reference/."""
    good = _source(tmp_path, "a_good")
    bad = _source(tmp_path, "b_bad")
    reference = tmp_path / "reference"
    convert_source(bad, reference / "b_bad", max_shard_bytes=SMALL_SHARDS, progress=False)
    return tmp_path / "records", good, bad, reference / "b_bad"


def _convert_expecting(records: Path, output: Path, match: str) -> RecordError:
    with pytest.raises(RecordError, match=match) as info:
        convert_records(records, output, progress=False, max_shard_bytes=SMALL_SHARDS)
    return info.value


def _check_after_failure(output: Path, reference: Path, error: RecordError, path: Path, index: int | None):
    assert error.path == str(path) and str(path) in str(error)
    if index is not None:
        assert error.index == index and f"record {index}" in str(error) and "byte offset" in str(error)
    folder = output / "b_bad"
    assert _hidden(folder) == []  # no partial shard
    assert not (folder / "README.md").exists()
    # finished shards are those of the undamaged conversion, byte for byte
    for shard in _shard_files(folder):
        assert shard.read_bytes() == (reference / "data" / shard.name).read_bytes()
    # the first source was finished and is recognised as such
    assert (
        convert_source(
            output.parent / "records" / "a_good",
            output / "a_good",
            progress=False,
            max_shard_bytes=SMALL_SHARDS,
        ).status
        == "skipped"
    )
    return _shard_files(folder)


def test_data_crc_mismatch_keeps_finished_shards_and_resumes(two_sources, tmp_path):
    records, _, bad, reference = two_sources
    path = bad / "5.tfrecords"  # a test-split class: train and validation shards are finished first
    original = path.read_bytes()
    offset = flip_byte(path, 3)
    error = _convert_expecting(records, tmp_path / "out", "data CRC mismatch")
    assert error.offset == offset
    finished = _check_after_failure(tmp_path / "out", reference, error, path, 3)
    assert {p.name.split("-")[0] for p in finished} >= {"train", "validation"}
    path.write_bytes(original)  # re-downloaded
    result = convert_records(records, tmp_path / "out", progress=False, max_shard_bytes=SMALL_SHARDS)[1]
    assert result.status == "resumed" and 0 < result.shards_written < len(_shard_files(reference))
    for shard in _shard_files(reference):
        assert (tmp_path / "out" / "b_bad" / "data" / shard.name).read_bytes() == shard.read_bytes()


def test_not_an_example_and_wrong_label_stop_the_source(two_sources, tmp_path):
    records, _, bad, reference = two_sources
    path = bad / "4.tfrecords"
    blob = path.read_bytes()
    replace_record(path, 2, b"\x0a\x05abc")  # same framing rules, not an Example
    error = _convert_expecting(records, tmp_path / "out", "not a tf.train.Example")
    _check_after_failure(tmp_path / "out", reference, error, path, 2)
    path.write_bytes(blob)
    from hf_copa.meta_dataset.records import encode_example, iter_examples

    image = next(iter_examples(path))[1].image
    replace_record(path, 1, encode_example(image, 0))  # same size, another class's label
    error = _convert_expecting(records, tmp_path / "out", "label 0 in the file of class 4")
    _check_after_failure(tmp_path / "out", reference, error, path, 1)


def test_truncated_file_is_refused_before_writing(two_sources, tmp_path):
    records, _, bad, reference = two_sources
    path = bad / "3.tfrecords"
    offset = truncate_record(path, 4)
    error = _convert_expecting(records, tmp_path / "out", "truncated data")
    assert error.offset == offset
    assert _check_after_failure(tmp_path / "out", reference, error, path, 4) == []


def test_count_mismatches(two_sources, tmp_path):
    records, _, bad, reference = two_sources
    set_count(bad, 2, 6)  # the file holds 7
    error = _convert_expecting(
        records, tmp_path / "out", "count mismatch: the file holds more records than the 6"
    )
    _check_after_failure(tmp_path / "out", reference, error, bad / "2.tfrecords", 6)
    set_count(bad, 2, 9)
    error = _convert_expecting(records, tmp_path / "out", "count mismatch: the file ends after 7 records")
    _check_after_failure(tmp_path / "out", reference, error, bad / "2.tfrecords", 7)


def test_missing_class_file(two_sources, tmp_path):
    records, _, bad, reference = two_sources
    path = remove_class_file(bad, 1)
    error = _convert_expecting(records, tmp_path / "out", "missing class file: class 1")
    _check_after_failure(tmp_path / "out", reference, error, path, None)


def test_damage_found_after_an_interruption_keeps_earlier_shards(two_sources, tmp_path, monkeypatch):
    """Interrupted, then a class file changes size (truncated): the re-plan fails and nothing is lost."""
    _, _, bad, reference = two_sources
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(_Interrupted):
        convert_source(bad, tmp_path / "out" / "b_bad", max_shard_bytes=SMALL_SHARDS, progress=False)
    monkeypatch.undo()
    truncate_record(bad / "5.tfrecords", 2)
    with pytest.raises(RecordError, match="truncated data") as info:
        convert_source(bad, tmp_path / "out" / "b_bad", max_shard_bytes=SMALL_SHARDS, progress=False)
    assert info.value.index == 2
    shards = _shard_files(tmp_path / "out" / "b_bad")
    assert len(shards) == 3 and _hidden(tmp_path / "out" / "b_bad") == []
    for shard in shards:
        assert shard.read_bytes() == (reference / "data" / shard.name).read_bytes()


# --- interruption and resumption ----------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, shards: int) -> None:
    real = convert._write_shard
    calls = {"n": 0}

    def write_shard(*args, **kwargs):
        if calls["n"] == shards:
            raise _Interrupted
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_write_shard", write_shard)


def _interrupt_inside_shard(monkeypatch, row_groups: int) -> None:
    real = convert._RowGroups.flush
    calls = {"n": 0}

    def flush(self):
        if self.images and calls["n"] == row_groups:
            raise _Interrupted
        calls["n"] += bool(self.images)
        return real(self)

    monkeypatch.setattr(convert._RowGroups, "flush", flush)


@pytest.mark.parametrize("where", ["between shards", "inside a shard"])
def test_interrupted_conversion_resumes_to_the_same_result(tmp_path, monkeypatch, where):
    source = _source(tmp_path)
    straight = convert_source(source, tmp_path / "straight", max_shard_bytes=SMALL_SHARDS, progress=False)
    options = {"max_shard_bytes": SMALL_SHARDS, "progress": False, "row_group_rows": 2}
    if where == "between shards":
        _interrupt_after(monkeypatch, 4)
    else:
        _interrupt_inside_shard(monkeypatch, 9)
    out = tmp_path / "resumed"
    with pytest.raises(_Interrupted):
        convert_source(source, out, **options)
    monkeypatch.undo()
    assert _hidden(out) == [] and not (out / "README.md").exists()
    finished = _shard_files(out)
    assert 0 < len(finished) < len(_shard_files(tmp_path / "straight"))
    mtimes = {path: path.stat().st_mtime_ns for path in finished}
    state = json.loads((out / STATE_FILENAME).read_text())
    assert state["complete"] is False and sorted(state["done"]) == sorted(f"data/{p.name}" for p in finished)

    (out / "data" / f".{finished[0].name}.{'0' * 32}.tmp").write_bytes(b"left by a killed run")
    resumed = convert_source(source, out, **options)
    assert resumed.status == "resumed" and resumed.shards_written == len(_shard_files(out)) - len(finished)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in mtimes.items())  # not rewritten
    assert _hidden(out) == []
    assert [p.name for p in _shard_files(out)] == [p.name for p in _shard_files(tmp_path / "straight")]
    for split in SPLITS:  # row for row (row groups differ: row_group_rows=2 here)
        assert _load(out, split).to_dict() == _load(tmp_path / "straight", split).to_dict()
    assert resumed.splits == straight.splits
    card, straight_card = (DatasetCard.load(p / "README.md").text for p in (out, tmp_path / "straight"))
    assert _without_date(card).replace("resumed", "straight") == _without_date(straight_card)


def _without_date(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("Converted on"))


# --- the output folder --------------------------------------------------------------------------------


def test_foreign_output_folder_is_refused(tmp_path):
    source = _source(tmp_path)
    out = tmp_path / "out"
    (out / "src").mkdir(parents=True)
    (out / "src" / "notes.txt").write_text("mine")
    (out / "src" / "README.md").write_text("my card")
    with pytest.raises(OutputFolderError, match="not an hf_copa conversion; nothing was changed"):
        convert_records(source, out, progress=False)
    assert sorted(p.name for p in (out / "src").iterdir()) == ["README.md", "notes.txt"]
    assert (out / "src" / "README.md").read_text() == "my card"
    convert_records(source, out, progress=False, overwrite=True)
    assert (out / "src" / "notes.txt").read_text() == "mine" and len(_load(out / "src", "test")) > 0

    # a conversion of other records under the same name is refused too
    other = write_source(tmp_path / "elsewhere" / "src", classes_per_split=(1, 1, 1), images_per_class=2)
    with pytest.raises(OutputFolderError, match="a conversion of other records"):
        convert_records(other, out, progress=False)
    with pytest.raises(OutputFolderError, match="records folder itself"):
        convert_source(source, source, progress=False)


# --- the Hub ------------------------------------------------------------------------------------------


def test_push_to_hub_and_load_back_by_repo_id(tmp_path, monkeypatch):
    records = tmp_path / "records"
    _source(tmp_path, "tiny", classes_per_split=(1, 1, 2), images_per_class=4)
    with local_hub_env(monkeypatch, tmp_path) as hub:
        results = convert_records(
            records,
            tmp_path / "out",
            push_to_hub="test-user/md",
            private=True,
            progress=False,
            max_shard_bytes=SMALL_SHARDS,
        )
        assert results[0].repo_id == "test-user/md-tiny"
        api = HfApi()
        assert api.repo_info("test-user/md-tiny", repo_type="dataset").private
        files = set(api.list_repo_files("test-user/md-tiny", repo_type="dataset"))
        local = {
            p.relative_to(tmp_path / "out" / "tiny").as_posix()
            for p in (tmp_path / "out" / "tiny").rglob("*")
        }
        assert files - {".gitattributes"} == {
            p for p in local if not p.startswith(".") and "." in p.split("/")[-1]
        }
        assert STATE_FILENAME not in files
        commits = [r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]
        assert len(commits) == 1
        remote = datasets.load_dataset("test-user/md-tiny", split="test")
        local_rows = _load(tmp_path / "out" / "tiny", "test")
        assert remote.features == local_rows.features
        raw = remote.cast_column("image", datasets.Image(decode=False))
        expected = [
            image for c in (2, 3) for image, _ in _read_tfrecord_examples(records / "tiny" / f"{c}.tfrecords")
        ]
        assert [image["bytes"] for image in raw["image"]] == expected
        assert remote["label"] == [2] * 4 + [3] * 4 and remote["record_index"] == [0, 1, 2, 3] * 2
        # a rerun skips the conversion and the upload changes nothing
        again = convert_records(
            records, tmp_path / "out", push_to_hub="test-user/md", private=True, progress=False
        )
        assert again[0].status == "skipped"
        assert len([r for r in hub.requests if r.method == "POST" and "/commit/" in r.path]) == 1

        # private=True never uploads into an existing public repo
        api.create_repo("test-user/md-public", repo_type="dataset")
        with pytest.raises(ValueError, match="is public; nothing was uploaded"):
            convert.push_source(tmp_path / "out" / "tiny", "test-user/md-public", private=True)
        assert api.list_repo_files("test-user/md-public", repo_type="dataset") == [".gitattributes"]


def test_no_tensorflow_was_imported(reference_conversion):
    import sys

    assert not [name for name in sys.modules if name == "tensorflow" or name.startswith("tensorflow.")]
