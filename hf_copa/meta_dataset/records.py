"""Meta-Dataset's converted records without TensorFlow: TFRecord framing and ``tf.train.Example`` parsing.

A converted Meta-Dataset source is a folder with ``dataset_spec.json`` and one ``<class_id>.tfrecords`` file
per class (``dataset_spec.file_pattern``, ``"{}.tfrecords"``). Each file is a TFRecord stream; each record is
a serialized ``tf.train.Example`` with two features, ``image`` (one ``bytes``: the encoded image) and
``label`` (one ``int64``: the absolute class id). That is what Meta-Dataset writes
(``meta_dataset/dataset_conversion/dataset_to_records.py`` lines 136-198 at commit 1676095, ``make_example`` /
``write_example``) and what it reads back (``meta_dataset/data/decoder.py`` lines 21-28:
``tf.parse_single_example`` with ``FixedLenFeature([], tf.string)`` for ``image`` and
``FixedLenFeature([], tf.int64)`` for ``label``; ``meta_dataset/data/reader.py`` lines 268-291: one
``tf.data.TFRecordDataset`` per class file).

TFRecord framing (TensorFlow's ``core/lib/io/record_writer.cc``): per record, the data length as a
little-endian ``uint64``, the *masked* CRC-32C of those 8 bytes (``uint32``), the data, the masked CRC-32C of
the data. The mask is ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` modulo 2**32. Both CRCs are always checked
here (TensorFlow's reader checks them too, and stops with ``DataLossError``); the CRC itself is computed by
the ``crc32c`` package.

``tf.train.Example`` parsing (:func:`parse_example`): records laid out exactly as TensorFlow serializes
Meta-Dataset's two-feature Examples go through a direct wire-format decoder; everything else goes to
``protobuf`` (upb backend; the Example/Features/Feature/BytesList/FloatList/Int64List descriptors are built at
first use with ``descriptor_pb2`` + ``message_factory``: no generated ``_pb2`` module, no TensorFlow), so the
result is always protobuf's. The direct decoder is the faster: measured on a shared 2-core VM, one thread,
3.9 us per record against 6.8 us through protobuf on the 2,157 reference records (about 11 KB each), 3.2-3.6
against 6.0-6.1 us on 1.9 KB records (``scripts/benchmark_meta_dataset.py`` repeats the measurement).
Writing (:func:`encode_example`, :class:`RecordWriter`) uses protobuf, as TensorFlow does; the tests'
synthetic sources are written with it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import crc32c as _crc32c

__all__ = [
    "Example",
    "ExampleError",
    "RecordError",
    "RecordSpan",
    "RecordWriter",
    "count_records",
    "encode_example",
    "frame_record",
    "example_message_class",
    "iter_examples",
    "iter_records",
    "masked_crc32c",
    "parse_example",
    "parse_example_protobuf",
    "scan_records",
    "write_examples",
    "write_records",
]

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
_READ_BUFFER = 1 << 20
# A record longer than this is taken for a damaged length field: Meta-Dataset's records hold one image each.
MAX_RECORD_BYTES = 1 << 31

_DEFAULT_HINT = (
    "The class file is damaged or incomplete: re-download it, or re-convert this class with Meta-Dataset's "
    "converter (meta_dataset/dataset_conversion/convert_datasets_to_records.py)."
)


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord's masked CRC-32C of ``data``: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` mod 2**32."""
    crc = _crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


class ExampleError(ValueError):
    """A record's data is not the ``tf.train.Example`` Meta-Dataset writes (raised without file context)."""


class RecordError(ValueError):
    """A record that cannot be used, with the file, the record index, its byte offset, what is wrong and what
    to do. Attributes: ``path``, ``index`` (from 0, or None for the whole file), ``offset``, ``problem``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        *,
        index: int | None = None,
        offset: int | None = None,
        hint: str | None = _DEFAULT_HINT,
    ) -> None:
        self.path = str(path)
        self.index = index
        self.offset = offset
        self.problem = problem
        where = self.path
        if index is not None:
            where += f": record {index}"
        if offset is not None:
            where += f" (byte offset {offset})"
        message = f"{where}: {problem}"
        if hint:
            message += f". {hint}"
        super().__init__(message)

    def __reduce__(self):  # picklable across DataLoader workers / processes
        return (_rebuild_record_error, (self.path, self.problem, self.index, self.offset, str(self)))


def _rebuild_record_error(path, problem, index, offset, message):
    error = RecordError.__new__(RecordError)
    ValueError.__init__(error, message)
    error.path, error.problem, error.index, error.offset = path, problem, index, offset
    return error


# --- framing --------------------------------------------------------------------------------------------


class RecordSpan(NamedTuple):
    """Where a record lies in its file: ``offset`` of its 12-byte header, ``length`` of its data."""

    index: int
    offset: int
    length: int

    @property
    def data_offset(self) -> int:
        return self.offset + 12

    @property
    def end(self) -> int:
        """Offset just past the record (its data CRC included)."""
        return self.offset + 16 + self.length


def _read_header(file: BinaryIO, path: str | os.PathLike[str], index: int, offset: int) -> int | None:
    """The data length of the record starting at ``offset``, None at a clean end of file."""
    header = file.read(12)
    if not header:
        return None
    if len(header) < 12:
        raise RecordError(
            path,
            f"truncated length field: {len(header)} of 12 header bytes before the end of the file",
            index=index,
            offset=offset,
        )
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise RecordError(
            path,
            "length CRC mismatch (the record's length field is corrupt, or this is not a TFRecord file)",
            index=index,
            offset=offset,
        )
    if length > MAX_RECORD_BYTES:
        raise RecordError(path, f"implausible record length {length} bytes", index=index, offset=offset)
    return length


def scan_records(path: str | os.PathLike[str]) -> Iterator[RecordSpan]:
    """Where each record of a TFRecord file lies, without reading or checking the data (cheap: 12 bytes read
    and one seek per record). The length CRC is checked, and a record running past the end of the file is
    reported as truncated; the data CRC is not (:func:`iter_records` checks it)."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as file:
        offset = index = 0
        while True:
            file.seek(offset)
            length = _read_header(file, path, index, offset)
            if length is None:
                return
            span = RecordSpan(index, offset, length)
            if span.end > size:
                raise RecordError(
                    path,
                    f"truncated data: the record needs {length + 4} bytes after its header, "
                    f"the file holds {max(size - span.data_offset, 0)}",
                    index=index,
                    offset=offset,
                )
            yield span
            offset, index = span.end, index + 1


def count_records(path: str | os.PathLike[str]) -> int:
    """The number of records in a TFRecord file (framing only, see :func:`scan_records`)."""
    return sum(1 for _ in scan_records(path))


def iter_records(
    path: str | os.PathLike[str], *, start: int = 0, first_index: int = 0, buffer_size: int = _READ_BUFFER
) -> Iterator[bytes]:
    """The data of each record of a TFRecord file, in order, both CRCs checked, the file streamed (one record
    in memory at a time). ``start`` (a record's header offset, e.g. a :class:`RecordSpan`'s ``offset``) begins
    mid-file; ``first_index`` is that record's index, for error messages."""
    with open(path, "rb", buffering=buffer_size) as file:
        file.seek(start)
        offset, index = start, first_index
        while True:
            length = _read_header(file, path, index, offset)
            if length is None:
                return
            data = file.read(length)
            footer = file.read(4)
            if len(data) < length or len(footer) < 4:
                got = len(data) + len(footer)
                raise RecordError(
                    path,
                    f"truncated data: the record needs {length + 4} bytes after its header, "
                    f"the file holds {got}",
                    index=index,
                    offset=offset,
                )
            if masked_crc32c(data) != _CRC.unpack(footer)[0]:
                raise RecordError(
                    path, "data CRC mismatch (the record's bytes are corrupt)", index=index, offset=offset
                )
            yield data
            offset += 16 + length
            index += 1


def frame_record(data: bytes | bytearray | memoryview) -> bytes:
    """One record as TFRecord frames it: length, masked length CRC, data, masked data CRC."""
    length = _LENGTH.pack(len(data))
    return b"".join((length, _CRC.pack(masked_crc32c(length)), bytes(data), _CRC.pack(masked_crc32c(data))))


class RecordWriter:
    """Writes a TFRecord file (uncompressed), like ``tf.io.TFRecordWriter``. A context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise ValueError(f"RecordWriter for {self.path} is closed.")
        self._file.write(frame_record(data))
        self.count += 1

    def write_example(self, image: bytes, label: int) -> None:
        self.write(encode_example(image, label))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_records(path: str | os.PathLike[str], records: Iterable[bytes]) -> int:
    """Write ``records`` (raw data) to a TFRecord file; the number written."""
    with RecordWriter(path) as writer:
        for data in records:
            writer.write(data)
        return writer.count


def write_examples(path: str | os.PathLike[str], examples: Iterable[tuple[bytes, int]]) -> int:
    """Write ``(image_bytes, label)`` pairs as Meta-Dataset's ``tf.train.Example`` records; the number
    written."""
    with RecordWriter(path) as writer:
        for image, label in examples:
            writer.write_example(image, label)
        return writer.count


# --- tf.train.Example ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A Meta-Dataset record: the encoded image and the absolute class id."""

    image: bytes
    label: int


@lru_cache(maxsize=1)
def example_message_class() -> type:
    """The ``tf.train.Example`` message class, built from a descriptor at first use (no TensorFlow, no
    generated ``_pb2``). Field numbers and names are those of
    tensorflow/core/example/{example,feature}.proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="hf_copa/meta_dataset/tf_example.proto", package="tensorflow", syntax="proto3"
    )

    def message(name: str, *fields: tuple[str, int, int, int, str | None], oneof: str | None = None):
        proto = file.message_type.add(name=name)
        if oneof:
            proto.oneof_decl.add(name=oneof)
        for field_name, number, kind, label, type_name in fields:
            field = proto.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
            if oneof:
                field.oneof_index = 0
        return proto

    rep, opt = fdp.LABEL_REPEATED, fdp.LABEL_OPTIONAL
    message("BytesList", ("value", 1, fdp.TYPE_BYTES, rep, None))
    message("FloatList", ("value", 1, fdp.TYPE_FLOAT, rep, None))
    message("Int64List", ("value", 1, fdp.TYPE_INT64, rep, None))
    message(
        "Feature",
        ("bytes_list", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
        ("float_list", 2, fdp.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
        ("int64_list", 3, fdp.TYPE_MESSAGE, opt, ".tensorflow.Int64List"),
        oneof="kind",
    )
    features = message("Features", ("feature", 1, fdp.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=fdp.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=fdp.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    message("Example", ("features", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.Features"))

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def encode_example(image: bytes, label: int) -> bytes:
    """Meta-Dataset's record for one image: ``tf.train.Example`` with ``image`` (bytes) and ``label``
    (int64)."""
    example = example_message_class()()
    feature = example.features.feature
    feature["image"].bytes_list.value.append(bytes(image))
    feature["label"].int64_list.value.append(int(label))
    return example.SerializeToString(deterministic=True)


def _require(features: dict[str, tuple[str, list[Any]]]) -> Example:
    """The checks ``tf.parse_single_example`` makes for FixedLenFeature([]) of string / int64."""
    image = features.get("image")
    label = features.get("label")
    if image is None:
        raise ExampleError("missing 'image' feature (a tf.train.Example without the encoded image)")
    if label is None:
        raise ExampleError("missing 'label' feature (a tf.train.Example without the class id)")
    if image[0] != "bytes_list" or len(image[1]) != 1:
        raise ExampleError(f"'image' feature is not exactly one bytes value (got {len(image[1])} {image[0]})")
    if label[0] != "int64_list" or len(label[1]) != 1:
        raise ExampleError(f"'label' feature is not exactly one int64 value (got {len(label[1])} {label[0]})")
    return Example(bytes(image[1][0]), int(label[1][0]))


def parse_example_protobuf(data: bytes) -> Example:
    """:func:`parse_example` through ``protobuf`` alone (the general path; about 2x slower)."""
    from google.protobuf.message import DecodeError

    message = example_message_class()()
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as error:
        raise ExampleError(f"not a tf.train.Example ({error})") from None
    features = {}
    for key, feature in message.features.feature.items():
        kind = feature.WhichOneof("kind")
        features[key] = (kind, list(getattr(feature, kind).value) if kind else [])
    return _require(features)


def parse_example(data: bytes) -> Example:
    """The ``image`` bytes and ``label`` of a Meta-Dataset record, or :class:`ExampleError` (not an Example,
    missing feature, not exactly one value of the right type).

    Records laid out as TensorFlow serializes Meta-Dataset's Examples (one ``features`` field holding the
    ``image`` and ``label`` entries, in either order, each a one-value list) are read by a direct wire-format
    decoder; anything else (extra features, merged or repeated fields, unknown fields, damage) goes to
    protobuf, so the result is always protobuf's."""
    try:
        result = _parse_canonical(data)
    except (IndexError, _Unusual):
        result = None
    return result if result is not None else parse_example_protobuf(data)


class _Unusual(Exception):
    """The fast decoder met something it leaves to protobuf."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos + 1
        shift += 7
        if shift > 63:
            raise _Unusual


def _parse_canonical(data: bytes) -> Example | None:
    """Example{features(1): Features{feature(1): entry{key(1), value(2): Feature{bytes_list(1)|int64_list(3):
    {value(1)}}}*}} with exactly the entries ``image`` (one bytes) and ``label`` (one int64, packed or not);
    None (or an exception) for anything else. Later entries of the same key win, as protobuf's map does."""
    size = len(data)
    if data[0] != 0x0A:  # field 1, wire type 2
        return None
    length, pos = _varint(data, 1)
    if pos + length != size:
        return None
    image = label = None
    while pos < size:
        if data[pos] != 0x0A:
            return None
        length, pos = _varint(data, pos + 1)
        entry_end = pos + length
        if entry_end > size or data[pos] != 0x0A:
            return None
        length, pos = _varint(data, pos + 1)
        key = data[pos : pos + length]
        pos += length
        if pos >= entry_end or data[pos] != 0x12:
            return None
        length, pos = _varint(data, pos + 1)
        if pos + length != entry_end:
            return None
        tag = data[pos]
        length, pos = _varint(data, pos + 1)
        if pos + length != entry_end or pos >= entry_end:
            return None
        if key == b"image" and tag == 0x0A and data[pos] == 0x0A:  # bytes_list.value
            length, pos = _varint(data, pos + 1)
            if pos + length != entry_end:
                return None
            image = data[pos:entry_end]
        elif key == b"label" and tag == 0x1A:  # int64_list.value
            if data[pos] == 0x0A:  # packed
                length, pos = _varint(data, pos + 1)
                if pos + length != entry_end:
                    return None
            elif data[pos] != 0x08:
                return None
            else:
                pos += 1
            value, pos = _varint(data, pos)
            if pos != entry_end:
                return None
            value &= 0xFFFFFFFFFFFFFFFF  # protobuf keeps the low 64 bits of an over-long varint
            label = value - (1 << 64) if value >= 1 << 63 else value
        else:
            return None
        pos = entry_end
    if image is None or label is None:
        return None
    return Example(bytes(image), label)


def iter_examples(
    path: str | os.PathLike[str],
    *,
    expected_label: int | None = None,
    start: int = 0,
    first_index: int = 0,
) -> Iterator[tuple[int, Example]]:
    """``(record_index, Example)`` for each record of a class file, checked: CRCs, parse, and, when
    ``expected_label`` is given, that ``label`` equals it. Errors are :class:`RecordError` naming the record.
    ``start``/``first_index``: begin at that byte offset, which holds record ``first_index``."""
    offset = start
    for index, data in enumerate(iter_records(path, start=start, first_index=first_index), first_index):
        try:
            example = parse_example(data)
        except ExampleError as error:
            raise RecordError(path, str(error), index=index, offset=offset) from None
        if expected_label is not None and example.label != expected_label:
            raise RecordError(
                path,
                f"label {example.label} in the file of class {expected_label} "
                "(records of one class file must all carry its class id)",
                index=index,
                offset=offset,
            )
        yield index, example
        offset += 16 + len(data)
