"""TFRecord framing and tf.train.Example parsing without TensorFlow, against files TensorFlow wrote."""

from __future__ import annotations

import pickle
import random
import struct
from pathlib import Path

import pytest

from hf_copa.meta_dataset import records
from hf_copa.meta_dataset.records import RecordError
from tests.support.meta_dataset_fixtures import flip_byte, replace_record, truncate_record, write_source

SOURCES = ("md_plain", "md_bilevel", "md_dag")


@pytest.fixture(scope="module")
def md_records(reference_dir: Path) -> Path:
    return reference_dir / "meta_dataset" / "records"


def _tf_files(md_records: Path) -> list[Path]:
    return sorted(md_records.glob("*/*.tfrecords"))


def _frames(path: Path) -> list[tuple[int, bytes]]:
    """(offset, data) of each record, read here with struct alone (no CRC checks)."""
    blob, out, offset = path.read_bytes(), [], 0
    while offset < len(blob):
        (length,) = struct.unpack_from("<Q", blob, offset)
        out.append((offset, blob[offset + 12 : offset + 12 + length]))
        offset += 16 + length
    return out


def test_masked_crc_matches_the_crc32c_check_value_and_tensorflow_files(md_records):
    # CRC-32C's standard check value, then the mask TFRecord applies.
    crc = 0xE3069283
    assert (
        records.masked_crc32c(b"123456789")
        == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % 2**32
    )
    # Every CRC in TensorFlow-written files is reproduced: re-framing the records gives the files exactly.
    for path in _tf_files(md_records)[:12]:
        data = [d for _, d in _frames(path)]
        assert b"".join(records.frame_record(d) for d in data) == path.read_bytes()


def test_iter_and_scan_agree_with_the_files(md_records):
    for path in _tf_files(md_records)[:20]:
        frames = _frames(path)
        assert list(records.iter_records(path)) == [d for _, d in frames]
        spans = list(records.scan_records(path))
        assert [(s.index, s.offset, s.length) for s in spans] == [
            (i, o, len(d)) for i, (o, d) in enumerate(frames)
        ]
        assert records.count_records(path) == len(frames)
        if len(frames) > 2:  # starting mid-file at a span's offset
            tail = list(records.iter_records(path, start=spans[2].offset, first_index=2))
            assert tail == [d for _, d in frames[2:]]


def test_examples_parse_to_image_and_label(md_records):
    for source in SOURCES:
        for path in sorted((md_records / source).glob("*.tfrecords"))[:6]:
            class_id = int(path.stem)
            for (_, example), (_, data) in zip(
                records.iter_examples(path, expected_label=class_id), _frames(path), strict=True
            ):
                assert example.label == class_id
                assert example.image.startswith(b"\xff\xd8\xff")  # Meta-Dataset's records hold JPEG
                assert data.find(example.image) > 0 and len(data) - len(example.image) < 64
                assert records.parse_example_protobuf(data) == example
                # protobuf re-serializes Meta-Dataset's Example exactly as TensorFlow did
                assert records.encode_example(example.image, example.label) == data


def test_fast_parser_agrees_with_protobuf_on_damaged_examples():
    """The direct decoder must give protobuf's answer (the same Example, or an ExampleError) on anything."""
    rng = random.Random(0)
    bases = [
        records.encode_example(rng.randbytes(rng.randrange(0, 30)), rng.choice([0, 7, 300, -1, 2**40]))
        for _ in range(20)
    ]
    accepted = 0
    for _ in range(3000):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randrange(1, 3)):
            op = rng.randrange(3)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1 and data:
                del data[rng.randrange(len(data))]
            else:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        outcomes = []
        for parse in (records.parse_example, records.parse_example_protobuf):
            try:
                outcomes.append(parse(bytes(data)))
            except records.ExampleError:
                outcomes.append("error")
        assert outcomes[0] == outcomes[1], bytes(data)
        accepted += outcomes[0] != "error"
    assert 50 < accepted < 2900  # both outcomes were exercised


def test_examples_with_extra_features_or_other_layouts_go_through_protobuf():
    message = records.example_message_class()()
    feature = message.features.feature
    feature["label"].int64_list.value.append(5)
    feature["other"].float_list.value.extend([1.0, 2.0])
    feature["image"].bytes_list.value.append(b"\xff\xd8\xffabc")
    assert records.parse_example(message.SerializeToString()) == records.Example(b"\xff\xd8\xffabc", 5)
    # built by hand: the label as an unpacked int64 (field 1, varint), image entry first
    entry_label = b"\n\x05label\x12\x04\x1a\x02\x08\x05"
    entry_image = b"\n\x05image\x12\x05\n\x03\n\x01x"
    body = b"\n" + bytes([len(entry_image)]) + entry_image + b"\n" + bytes([len(entry_label)]) + entry_label
    data = b"\n" + bytes([len(body)]) + body
    assert records.parse_example(data) == records.Example(b"x", 5) == records.parse_example_protobuf(data)


@pytest.mark.parametrize(
    ("features", "problem"),
    [
        ({"label": 3}, "missing 'image'"),
        ({"image": b"x"}, "missing 'label'"),
        ({"image": [b"a", b"b"], "label": 3}, "'image' feature is not exactly one bytes value"),
        ({"image": b"x", "label": [1, 2]}, "'label' feature is not exactly one int64 value"),
    ],
)
def test_examples_without_meta_dataset_features_are_refused(features, problem):
    message = records.example_message_class()()
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(values[0], bytes):
            message.features.feature[key].bytes_list.value.extend(values)
        else:
            message.features.feature[key].int64_list.value.extend(values)
    with pytest.raises(records.ExampleError, match=problem):
        records.parse_example(message.SerializeToString())
    with pytest.raises(records.ExampleError, match="not a tf.train.Example"):
        records.parse_example(b"\x0a\xff\xff")


@pytest.fixture
def class_file(tmp_path: Path) -> Path:
    folder = write_source(tmp_path / "src", classes_per_split=(0, 0, 1), images_per_class=6)
    return folder / "0.tfrecords"


def _error(path: Path, **kwargs) -> RecordError:
    with pytest.raises(RecordError) as info:
        list(records.iter_examples(path, **kwargs))
    return info.value


def test_truncated_data_names_file_record_and_offset(class_file):
    offset = truncate_record(class_file, 3)
    error = _error(class_file)
    assert (error.index, error.offset) == (3, offset)
    message = str(error)
    assert str(class_file) in message and "record 3" in message and f"byte offset {offset}" in message
    assert "truncated data" in message and "re-download" in message
    with pytest.raises(RecordError, match="truncated data"):  # the cheap scan sees it too
        list(records.scan_records(class_file))


def test_truncated_length_field(class_file):
    offset = truncate_record(class_file, 2, keep=-7)  # 5 of the 12 header bytes left
    error = _error(class_file)
    assert (error.index, error.offset) == (2, offset) and "truncated length field" in str(error)


def test_data_crc_mismatch(class_file):
    offset = flip_byte(class_file, 4)
    error = _error(class_file)
    assert (error.index, error.offset) == (4, offset) and "data CRC mismatch" in str(error)
    assert records.count_records(class_file) == 6  # the scan does not read data


def test_length_crc_mismatch(class_file):
    offset = flip_byte(class_file, 1, where="length")
    error = _error(class_file)
    assert (error.index, error.offset) == (1, offset) and "length CRC mismatch" in str(error)


def test_not_an_example_and_wrong_label(class_file):
    offset = replace_record(class_file, 2, b"\x0a\xff\xff not protobuf")
    error = _error(class_file)
    assert (error.index, error.offset) == (2, offset) and "not a tf.train.Example" in str(error)

    replace_record(class_file, 2, records.encode_example(b"\xff\xd8\xff", 9))
    error = _error(class_file, expected_label=0)
    assert error.index == 2 and "label 9 in the file of class 0" in str(error)


def test_record_error_pickles(class_file):
    flip_byte(class_file, 0)
    error = _error(class_file)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.index, copy.offset) == (
        str(error),
        error.path,
        error.index,
        error.offset,
    )


def test_writer_round_trip(tmp_path):
    items = [(bytes([i]) * i, i - 3) for i in range(9)]
    assert records.write_examples(tmp_path / "x.tfrecords", items) == 9
    assert [(e.image, e.label) for _, e in records.iter_examples(tmp_path / "x.tfrecords")] == items
