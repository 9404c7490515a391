"""Meta-Dataset's converted records -> Hugging Face datasets (Hub-layout parquet folders), without TensorFlow.

For each source folder (``dataset_spec.json`` + one ``<class_id>.tfrecords`` per class), ``OUTPUT/<source>/``
becomes a dataset folder that ``datasets.load_dataset(str(OUTPUT / source), split=...)`` loads::

    OUTPUT/<source>/README.md                  dataset card: YAML configs (data_files per split), dataset_info
    OUTPUT/<source>/dataset_spec.json          copied byte for byte (Meta-Dataset's samplers need it)
    OUTPUT/<source>/data/<split>-00000-of-000NN.parquet
    OUTPUT/<source>/.hf_copa_conversion.json   the converter's state (plan, finished shards); not uploaded

Splits ``train``/``validation``/``test`` are the spec's class ranges (``spec.get_classes``); a split without
records has no shards and is not declared. Columns: ``image`` (``datasets.Image()``: each record's encoded
bytes, unchanged, ``path`` None), ``label`` (``ClassLabel`` over all the source's classes: the value is
Meta-Dataset's absolute class id, the names the spec's class names), ``record_index`` (int64, the record's
position from 0 in its class file), and for bilevel specs (Omniglot) ``superclass`` (``ClassLabel`` over the
superclass names). Rows are in record order within a class, classes in id order: the order Meta-Dataset's
reader sees them in with ``shuffle_buffer_size=0`` (``meta_dataset/data/reader.py`` lines 268-291 at commit
1676095: one ``TFRecordDataset`` per class file, in class-id order). The features are declared twice,
consistently: in each shard's arrow schema metadata (``huggingface`` key, read by
``Features.from_arrow_schema``) and in the card's ``dataset_info`` (read by ``load_dataset`` from the README's
YAML).

How a source is converted:

1. *Check the folder and plan.* Every class file must exist. A cheap scan (:func:`~.records.scan_records`:
   12 bytes read per record, no data) checks the framing and that each file holds the spec's
   ``images_in_class`` records, and cuts each split into shards of at most ``max_shard_bytes`` of record data
   (greedily, in row order, so the plan is a function of the inputs alone). The plan, with the spec's SHA-256
   and the class files' sizes, is stored in the state file; a rerun reuses it if the inputs still match, and
   otherwise plans again, keeping the finished shards the new plan leaves unchanged.
2. *Write shards.* Each shard streams its records (one row group of at most ``row_group_rows`` rows /
   ``row_group_bytes`` bytes in memory) into a ``pyarrow.parquet.ParquetWriter`` writing a hidden temporary
   file beside the shard, renamed into place (``os.replace``) once complete. Every record is checked: both
   CRCs, the ``tf.train.Example`` parse, ``label`` equal to the file's class id. An error removes the
   temporary file and stops with a :class:`~.records.RecordError` naming the file, the record and its byte
   offset; finished shards (recorded in the state file) stay, and a rerun resumes after them.
3. *Finish.* ``dataset_spec.json`` is copied, the card rendered
   (``assets/dataset_cards/meta_dataset_source.md``), the state marked complete. A rerun reports the source as
   ``"skipped"``.

Parquet options follow ``datasets``' own writer (``datasets/arrow_writer.py``,
``get_parquet_column_options``): image bytes stored PLAIN and uncompressed (JPEG does not compress), the other
columns snappy with dictionaries, content-defined chunking when pyarrow has it (so re-uploads deduplicate on
the Hub's Xet storage).

A non-empty output folder holding anything but a previous conversion of the same source (same name, same
``dataset_spec.json``) is refused (:class:`OutputFolderError`) unless ``overwrite=True``, which then removes
only the converter's own files (and starts that source afresh).

``push_to_hub="ORG/PREFIX"`` uploads each finished source to the dataset repo ``ORG/PREFIX-<source>`` with
``HfApi.upload_large_folder`` where ``huggingface_hub`` has it (1.x), else ``HfApi.upload_folder``, which in
``huggingface_hub`` 2.x (with ``hf_xet``) streams, commits large folders in several batches and resumes an
interrupted upload when re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hf_copa.meta_dataset.records import ExampleError, RecordError, iter_records, parse_example, scan_records

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "STATE_FILENAME",
    "ConvertedSource",
    "OutputFolderError",
    "SplitSummary",
    "convert_records",
    "convert_source",
    "discover_sources",
    "push_source",
    "render_card",
    "source_features",
]

SPEC_FILENAME = "dataset_spec.json"
STATE_FILENAME = ".hf_copa_conversion.json"
STATE_FORMAT = "hf_copa.meta_dataset.convert/1"
CARD_FILENAME = "README.md"
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "assets" / "dataset_cards" / "meta_dataset_source.md"
DEFAULT_MAX_SHARD_BYTES = 500_000_000  # datasets' config.MAX_SHARD_SIZE
DEFAULT_ROW_GROUP_ROWS = 1000
DEFAULT_ROW_GROUP_BYTES = 64 << 20
SPLITS = ("train", "validation", "test")
_SHARD_RE = re.compile(r"(?:train|validation|test)-\d{5}-of-\d{5}\.parquet")
_TMP_RE = re.compile(r"\.(?:train|validation|test)-\d{5}-of-\d{5}\.parquet\.[0-9a-f]{32}\.tmp")
# Never uploaded: the converter's state and temporary files (upload tools skip .cache/huggingface themselves).
UPLOAD_IGNORE_PATTERNS = [STATE_FILENAME, "data/.*", "*.tmp"]

# Where each Meta-Dataset source's images come from (for the card; facts, not licence claims).
_ORIGINS = {
    "ilsvrc_2012": ("ILSVRC-2012 (ImageNet)", "https://image-net.org/"),
    "omniglot": ("Omniglot", "https://github.com/brendenlake/omniglot"),
    "aircraft": ("FGVC-Aircraft", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"),
    "cu_birds": ("Caltech-UCSD Birds-200-2011", "https://www.vision.caltech.edu/datasets/cub_200_2011/"),
    "dtd": ("the Describable Textures Dataset", "https://www.robots.ox.ac.uk/~vgg/data/dtd/"),
    "quickdraw": ("Quick, Draw!", "https://quickdraw.withgoogle.com/data"),
    "fungi": ("the FGVCx Fungi 2018 competition", "https://github.com/visipedia/fgvcx_fungi_comp"),
    "vgg_flower": ("VGG Flowers-102", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    "traffic_sign": ("the German Traffic Sign Recognition Benchmark", "https://benchmark.ini.rub.de/"),
    "mscoco": ("MS COCO", "https://cocodataset.org/"),
    "mnist": (
        "MNIST (test set, as CNAPS' prepare_extra_datasets.py converts it)",
        "https://yann.lecun.com/exdb/mnist/",
    ),
    "cifar10": ("CIFAR-10 (test set, as CNAPS converts it)", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": ("CIFAR-100 (test set, as CNAPS converts it)", "https://www.cs.toronto.edu/~kriz/cifar.html"),
}


class OutputFolderError(FileExistsError):
    """The output folder holds something other than a conversion of these records (and overwrite is off)."""


@dataclass(frozen=True)
class SplitSummary:
    """One split of a converted source: its Meta-Dataset class ids, images and parquet files."""

    name: str
    classes: range
    num_examples: int
    files: tuple[str, ...]

    @property
    def num_shards(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class ConvertedSource:
    """What :func:`convert_source` did. ``status``: ``"converted"`` (from scratch), ``"resumed"`` (some shards
    were already finished), ``"skipped"`` (the folder already held this complete conversion)."""

    name: str
    path: Path
    status: str
    num_classes: int
    splits: dict[str, SplitSummary]
    num_records: int
    records_written: int
    shards_written: int
    seconds: float
    repo_id: str | None = None
    repo_url: str | None = None
    spec_name: str = ""

    @property
    def declared_splits(self) -> list[str]:
        return [name for name, split in self.splits.items() if split.num_examples]


# --- discovery ----------------------------------------------------------------------------------------------


def discover_sources(records: str | os.PathLike[str], sources: Iterable[str] | None = None) -> list[Path]:
    """The source folders under ``records``: itself if it holds ``dataset_spec.json``, else its sub-folders
    that do (sorted by name). ``sources`` keeps only those folder names (all must exist)."""
    root = Path(records)
    if not root.is_dir():
        raise FileNotFoundError(f"records folder {root} does not exist")
    if (root / SPEC_FILENAME).is_file():
        found = [root]
    else:
        found = sorted(path for path in root.iterdir() if (path / SPEC_FILENAME).is_file())
    if not found:
        raise ValueError(
            f"no Meta-Dataset source under {root}: expected {SPEC_FILENAME} in it or in its sub-folders "
            "(one per source, e.g. records/omniglot/dataset_spec.json)"
        )
    if sources is not None:
        wanted = list(dict.fromkeys(sources))
        by_name = {path.name: path for path in found}
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise ValueError(f"source(s) {missing} not found under {root}; found {sorted(by_name)}")
        found = [by_name[name] for name in wanted]
    return found


# --- features --------------------------------------------------------------------------------------------


def _unique_names(names: Sequence[str]) -> list[str]:
    """ClassLabel needs distinct names: a repeated name gets its id appended, ``"name (17)"``."""
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [name if seen[name] == 1 else f"{name} ({i})" for i, name in enumerate(names)]


def source_features(spec: Any):
    """The ``datasets.Features`` of a converted source (see the module docstring)."""
    import datasets

    columns: dict[str, Any] = {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(
            names=_unique_names([spec.class_name(i) for i in range(spec.num_classes)])
        ),
        "record_index": datasets.Value("int64"),
    }
    superclass_names = getattr(spec, "superclass_names", None)
    if superclass_names is not None:
        names = [superclass_names[i] for i in range(len(superclass_names))]
        columns["superclass"] = datasets.ClassLabel(names=_unique_names(names))
    return datasets.Features(columns)


def _parquet_options(schema) -> dict[str, Any]:
    """``datasets``' choices (``arrow_writer.get_parquet_column_options``): image leaves PLAIN, uncompressed,
    no dictionary, no statistics; other columns snappy with dictionaries; content-defined chunking if
    available."""
    import inspect

    import pyarrow.parquet as pq

    compression, column_encoding, dictionary, statistics = {}, {}, [], []
    for column in schema:
        leaves = (
            [f"{column.name}.{child.name}" for child in column.type]
            if column.name == "image"
            else [column.name]
        )
        for leaf in leaves:
            if column.name == "image":
                compression[leaf] = "none"
                column_encoding[leaf] = "PLAIN"
            else:
                compression[leaf] = "snappy"
                dictionary.append(leaf)
                statistics.append(leaf)
    options: dict[str, Any] = {
        "compression": compression,
        "column_encoding": column_encoding,
        "use_dictionary": dictionary,
        "write_statistics": statistics,
    }
    if "use_content_defined_chunking" in inspect.signature(pq.ParquetWriter.__init__).parameters:
        options["use_content_defined_chunking"] = {
            "min_chunk_size": 256 * 1024,
            "max_chunk_size": 1024 * 1024,
        }
    return options


# --- state ----------------------------------------------------------------------------------------------


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / STATE_FILENAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: not ours to trust
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else {}


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _fingerprint(spec: Any, source_dir: Path, source: str) -> dict[str, Any]:
    """The spec's SHA-256 and every class file's size; a missing class file is a :class:`RecordError`."""
    sizes = {}
    for split in SPLITS:
        for class_id in spec.get_classes(split):
            path = Path(spec.record_file(class_id))
            try:
                sizes[str(class_id)] = path.stat().st_size
            except FileNotFoundError:
                raise RecordError(
                    path,
                    f"missing class file: class {class_id} ({spec.class_name(class_id)!r}, {split} split) of "
                    f"{source!r} has no records file",
                    hint="Re-download that class file, or re-convert the source with Meta-Dataset's tools",
                ) from None
    spec_bytes = (source_dir / SPEC_FILENAME).read_bytes()
    return {"spec_sha256": hashlib.sha256(spec_bytes).hexdigest(), "class_file_sizes": sizes}


def _own_files(folder: Path) -> list[Path]:
    """The converter's files in an output folder (what ``overwrite=True`` may remove)."""
    files = [folder / name for name in (STATE_FILENAME, CARD_FILENAME, SPEC_FILENAME)]
    data = folder / "data"
    if data.is_dir():
        files += [
            path for path in data.iterdir() if _SHARD_RE.fullmatch(path.name) or _TMP_RE.fullmatch(path.name)
        ]
    return [path for path in files if path.is_file()]


def _prepare_output(
    folder: Path, source_dir: Path, source: str, fingerprint: dict[str, Any], overwrite: bool
) -> dict | None:
    """The previous state if ``folder`` holds a conversion of the same source (same name, same
    ``dataset_spec.json``), else None for a fresh start (the folder then holds none of the converter's files).
    Anything else in a non-empty folder is refused unless ``overwrite``, which removes the converter's
    files."""
    if folder.resolve() == source_dir.resolve():
        raise OutputFolderError(
            f"the output folder {folder} is the records folder itself: choose another output"
        )
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise OutputFolderError(f"{folder} exists and is not a folder")
    state = _read_state(folder)
    same = (
        bool(state)
        and state.get("source") == source
        and state.get("spec_sha256") == fingerprint["spec_sha256"]
    )
    if same and not overwrite:
        return state
    if not any(folder.iterdir()):
        return None
    if not overwrite:
        what = (
            f"a conversion of other records (source {state.get('source')!r}, another dataset_spec.json)"
            if state
            else "files that are not an hf_copa conversion"
        )
        raise OutputFolderError(
            f"{folder} already holds {what}; nothing was changed. Choose another output folder, or pass "
            "overwrite=True (--overwrite) to replace the converter's files there (README.md, "
            f"dataset_spec.json, data/<split>-*-of-*.parquet, {STATE_FILENAME}); other files are left alone."
        )
    for path in _own_files(folder):
        path.unlink()
    return None


# --- planning -------------------------------------------------------------------------------------------


def _count_hint() -> str:
    return (
        "The class file and dataset_spec.json disagree: re-download or re-convert that class file (or the "
        "source) with Meta-Dataset's converter"
    )


def _plan(spec: Any, source: str, max_shard_bytes: int, bar: Any) -> dict[str, list[dict[str, Any]]]:
    """Cut each split into shards of at most ``max_shard_bytes`` of record data, in row order (a record larger
    than that gets a shard of its own); checks framing and counts on the way."""
    plan: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        shards: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        for class_id in spec.get_classes(split):
            path = spec.record_file(class_id)
            expected = spec.images_in_class(class_id)
            count = 0
            end = 0
            for index, offset, length in scan_records(path):
                if index >= expected:
                    raise RecordError(
                        path,
                        f"count mismatch: the file holds more records than the {expected} dataset_spec.json "
                        f"gives class {class_id} (this is record {index}, the first one too many)",
                        index=index,
                        offset=offset,
                        hint=_count_hint(),
                    )
                if current is None or (
                    current["rows"] and current["record_bytes"] + length > max_shard_bytes
                ):
                    current = {"rows": 0, "record_bytes": 0, "segments": []}
                    shards.append(current)
                segments = current["segments"]
                if segments and segments[-1][0] == class_id:
                    segments[-1][2] = index + 1
                else:
                    segments.append([class_id, index, index + 1, offset])
                current["rows"] += 1
                current["record_bytes"] += length
                count += 1
                end = offset + 16 + length
                bar.update(1)
            if count != expected:
                raise RecordError(
                    path,
                    f"count mismatch: the file ends after {count} records, dataset_spec.json gives class "
                    f"{class_id} {expected} (record {count} is missing)",
                    index=count,
                    offset=end,
                    hint=_count_hint(),
                )
        for index, shard in enumerate(shards):
            shard["file"] = f"data/{split}-{index:05d}-of-{len(shards):05d}.parquet"
        plan[split] = shards
    return plan


# --- writing --------------------------------------------------------------------------------------------


class _RowGroups:
    """Rows buffered into row groups of bounded rows/bytes and written to a ParquetWriter."""

    def __init__(self, writer, schema, bilevel: bool, max_rows: int, max_bytes: int) -> None:
        self.writer, self.schema, self.bilevel = writer, schema, bilevel
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.image_fields = list(schema.field("image").type)
        self.nbytes = 0
        self._clear()

    def _clear(self) -> None:
        self.images: list[bytes] = []
        self.labels: list[int] = []
        self.indices: list[int] = []
        self.superclasses: list[int] = []
        self.buffered = 0

    def add(self, image: bytes, label: int, index: int, superclass: int | None) -> None:
        self.images.append(image)
        self.labels.append(label)
        self.indices.append(index)
        if self.bilevel:
            self.superclasses.append(superclass)
        self.buffered += len(image)
        if len(self.images) >= self.max_rows or self.buffered >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.images:
            return
        n = len(self.images)
        image = pa.StructArray.from_arrays(
            [pa.array(self.images, type=pa.binary()), pa.nulls(n, type=pa.string())], fields=self.image_fields
        )
        arrays = [image, pa.array(self.labels, type=pa.int64()), pa.array(self.indices, type=pa.int64())]
        if self.bilevel:
            arrays.append(pa.array(self.superclasses, type=pa.int64()))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self.writer.write_batch(batch, row_group_size=n)
        self.nbytes += batch.nbytes
        self._clear()


def _write_shard(
    shard: dict[str, Any],
    spec: Any,
    output_dir: Path,
    schema: Any,
    *,
    row_group_rows: int,
    row_group_bytes: int,
    bar: Any,
) -> dict[str, int]:
    """Write one planned shard (temporary file, then ``os.replace``); ``{"size", "rows", "nbytes"}``."""
    import pyarrow.parquet as pq

    final = output_dir / shard["file"]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    bilevel = "superclass" in schema.names
    writer = pq.ParquetWriter(tmp, schema, **_parquet_options(schema))
    try:
        groups = _RowGroups(writer, schema, bilevel, row_group_rows, row_group_bytes)
        for class_id, first, stop, start in shard["segments"]:
            superclass = spec.superclass_of(class_id) if bilevel else None
            _copy_segment(spec, class_id, first, stop, start, groups, superclass, bar)
        groups.flush()
        writer.close()
        os.replace(tmp, final)
    except BaseException:
        with suppress(Exception):  # the original error is the one to report
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"size": final.stat().st_size, "rows": shard["rows"], "nbytes": groups.nbytes}


def _copy_segment(spec, class_id, first, stop, start, groups: _RowGroups, superclass, bar) -> None:
    """Records ``first..stop-1`` of class ``class_id``'s file (the first at byte ``start``), checked."""
    path = spec.record_file(class_id)
    index, offset = first, start
    with closing(iter_records(path, start=start, first_index=first)) as records:
        for data in records:
            try:
                example = parse_example(data)
            except ExampleError as error:
                raise RecordError(path, str(error), index=index, offset=offset) from None
            if example.label != class_id:
                raise RecordError(
                    path,
                    f"label {example.label} in the file of class {class_id} (a class file's records must all "
                    "carry its class id)",
                    index=index,
                    offset=offset,
                )
            groups.add(example.image, class_id, index, superclass)
            bar.update(1)
            index += 1
            offset += 16 + len(data)
            if index == stop:
                break
    if index != stop:
        raise RecordError(
            path,
            f"count mismatch: the file ends after {index} records, the conversion plan expects {stop} "
            "(the file changed since the conversion was planned?)",
            index=index,
            offset=offset,
            hint=_count_hint(),
        )
    if stop == spec.images_in_class(class_id) and os.path.getsize(path) != offset:
        raise RecordError(
            path,
            f"count mismatch: data after the last of the {stop} records dataset_spec.json gives class "
            f"{class_id}",
            index=stop,
            offset=offset,
            hint=_count_hint(),
        )


def _shard_is_done(output_dir: Path, shard: dict[str, Any], done: dict[str, Any]) -> bool:
    import pyarrow.parquet as pq

    record = done.get(shard["file"])
    path = output_dir / shard["file"]
    if not record or not path.is_file() or path.stat().st_size != record.get("size"):
        return False
    try:
        return pq.ParquetFile(path).metadata.num_rows == shard["rows"] == record.get("rows")
    except Exception:
        return False


# --- the card -------------------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    bounds += [(10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1T")


def render_card(
    source: str,
    spec: Any,
    features: Any,
    splits: dict[str, SplitSummary],
    split_bytes: dict[str, int],
    download_size: int,
    *,
    command: str,
    converted_at: datetime,
    repo_id: str | None = None,
):
    """The dataset card (a ``huggingface_hub.DatasetCard``) of a converted source."""
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    from hf_copa import __version__

    declared = [split for split in splits.values() if split.num_examples]
    total = sum(split.num_examples for split in declared)
    card_data = DatasetCardData(
        license="other",
        license_name=re.sub(r"[^a-z0-9.-]+", "-", source.lower()) + "-terms",
        pretty_name=f"Meta-Dataset {source}",
        task_categories=["image-classification"],
        size_categories=[_size_category(total)],
        tags=["meta-dataset", "few-shot", "hf_copa", source],
    )
    MetadataConfigs(
        {"default": {"data_files": [{"split": s.name, "path": f"data/{s.name}-*"} for s in declared]}}
    ).to_dataset_card_data(card_data)
    split_dict = SplitDict()
    for split in declared:
        split_dict.add(
            SplitInfo(name=split.name, num_bytes=split_bytes[split.name], num_examples=split.num_examples)
        )
    info = DatasetInfo(
        features=features,
        splits=split_dict,
        download_size=download_size,
        dataset_size=sum(split_bytes[s.name] for s in declared),
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    origin, homepage = _ORIGINS.get(source, (f"the `{source}` source", None))
    superclass_names = getattr(spec, "superclass_names", None)
    rows = [
        {
            "name": split.name,
            "num_classes": len(split.classes),
            "first": split.classes.start if len(split.classes) else "-",
            "last": split.classes.stop - 1 if len(split.classes) else "-",
            "num_examples": split.num_examples,
            "num_shards": split.num_shards,
        }
        for split in splits.values()
    ]
    return DatasetCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        source=source,
        spec_name=spec.name,
        spec_kind=type(spec).__name__,
        origin=origin,
        homepage=homepage,
        num_classes=spec.num_classes,
        num_superclasses=len(superclass_names) if superclass_names is not None else None,
        splits=rows,
        total=total,
        command=command,
        date=converted_at.strftime("%Y-%m-%d %H:%M UTC"),
        hf_copa_version=__version__,
        datasets_version=datasets.__version__,
        repo_id=repo_id,
    )


# --- converting -----------------------------------------------------------------------------------------


def _progress(progress: bool, **kwargs: Any):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, unit="rec", unit_scale=True, dynamic_ncols=True, **kwargs)


def _summaries(plan: dict[str, list[dict[str, Any]]], spec: Any) -> dict[str, SplitSummary]:
    return {
        split: SplitSummary(
            split,
            spec.get_classes(split),
            sum(shard["rows"] for shard in plan[split]),
            tuple(shard["file"] for shard in plan[split]),
        )
        for split in SPLITS
    }


def convert_source(
    source_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    repo_id: str | None = None,
) -> ConvertedSource:
    """Convert one source folder to the dataset folder ``output_dir`` (see the module docstring).

    ``name``: the source's name (default: the folder's name). ``command``: how the conversion was asked for,
    for the card (default: this call). ``repo_id``: the Hub repo it is meant for, shown in the card's example.
    Raises :class:`~.records.RecordError` for bad records/files (the folder keeps finished shards; rerun to
    resume after fixing the input) and :class:`OutputFolderError` for an output folder holding other things.
    """
    from hf_copa.meta_dataset.specs import load_dataset_spec

    started = time.perf_counter()
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    source = name or source_dir.name
    limits = ((max_shard_bytes, "max_shard_bytes"), (row_group_rows, "row_group_rows"))
    for value, what in (*limits, (row_group_bytes, "row_group_bytes")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    spec = load_dataset_spec(source_dir)
    fingerprint = _fingerprint(spec, source_dir, source)
    state = _prepare_output(output_dir, source_dir, source, fingerprint, overwrite)
    total_records = sum(spec.images_in_class(c) for s in SPLITS for c in spec.get_classes(s))

    def result(status: str, plan, written_records: int, written_shards: int) -> ConvertedSource:
        return ConvertedSource(
            name=source,
            path=output_dir,
            status=status,
            num_classes=spec.num_classes,
            splits=_summaries(plan, spec),
            num_records=total_records,
            records_written=written_records,
            shards_written=written_shards,
            seconds=time.perf_counter() - started,
            spec_name=spec.name,
        )

    same_inputs = bool(state) and state.get("class_file_sizes") == fingerprint["class_file_sizes"]
    if same_inputs and state.get("complete") and _complete_on_disk(output_dir, state):
        return result("skipped", state["plan"], 0, 0)

    if same_inputs and state.get("plan") and state.get("max_shard_bytes") == max_shard_bytes:
        plan = state["plan"]
    else:
        # A fresh start, or class files / shard size changed since the last run: plan again, then keep the
        # finished shards whose plan entry is unchanged and whose class files kept their size.
        output_dir.mkdir(parents=True, exist_ok=True)
        with _progress(progress, total=total_records, desc=f"{source}: scanning") as bar:
            plan = _plan(spec, source, max_shard_bytes, bar)
        if not any(plan.values()):
            raise ValueError(f"{source_dir}: the source holds no records; nothing to convert")
        done = _reusable_shards(output_dir, state, plan, fingerprint) if state else {}
        state = {
            "format": STATE_FORMAT,
            "source": source,
            **fingerprint,
            "max_shard_bytes": max_shard_bytes,
            "records_dir": str(source_dir.resolve()),
            "plan": plan,
            "done": done,
            "complete": False,
        }
        _write_json_atomic(output_dir / STATE_FILENAME, state)
    data_dir = output_dir / "data"
    for stale in data_dir.glob(".*.tmp") if data_dir.is_dir() else ():
        if _TMP_RE.fullmatch(stale.name):
            stale.unlink()  # left by a killed run; ours by name

    features = source_features(spec)
    schema = features.arrow_schema
    done = state.setdefault("done", {})
    state["complete"] = False
    shards = [shard for split in SPLITS for shard in plan[split]]
    finished = {shard["file"] for shard in shards if _shard_is_done(output_dir, shard, done)}
    resumed = bool(finished)
    written_records = written_shards = 0
    initial = sum(shard["rows"] for shard in shards if shard["file"] in finished)
    with _progress(progress, total=total_records, initial=initial, desc=source) as bar:
        for shard in shards:
            if shard["file"] in finished:
                continue
            done.pop(shard["file"], None)
            done[shard["file"]] = _write_shard(
                shard,
                spec,
                output_dir,
                schema,
                row_group_rows=row_group_rows,
                row_group_bytes=row_group_bytes,
                bar=bar,
            )
            written_records += shard["rows"]
            written_shards += 1
            _write_json_atomic(output_dir / STATE_FILENAME, state)

    splits = _summaries(plan, spec)
    split_bytes = {split: sum(done[shard["file"]]["nbytes"] for shard in plan[split]) for split in SPLITS}
    download_size = sum(done[shard["file"]]["size"] for shard in shards)
    spec_tmp = output_dir / f".{SPEC_FILENAME}.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(source_dir / SPEC_FILENAME, spec_tmp)
    os.replace(spec_tmp, output_dir / SPEC_FILENAME)
    card = render_card(
        source,
        spec,
        features,
        splits,
        split_bytes,
        download_size,
        command=command or f"hf_copa.meta_dataset.convert_source({str(source_dir)!r}, {str(output_dir)!r})",
        converted_at=datetime.now(UTC),
        repo_id=repo_id,
    )
    card_tmp = output_dir / f".{CARD_FILENAME}.{uuid.uuid4().hex}.tmp"
    card_tmp.write_text(str(card).rstrip("\n") + "\n", encoding="utf-8")
    os.replace(card_tmp, output_dir / CARD_FILENAME)
    state["complete"] = True
    _write_json_atomic(output_dir / STATE_FILENAME, state)
    return result("resumed" if resumed else "converted", plan, written_records, written_shards)


def _reusable_shards(
    output_dir: Path, old: dict[str, Any], plan: dict[str, list[dict[str, Any]]], fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """After re-planning: the old finished shards that the new plan keeps as they were (same file, same
    segments, class files of the same size); the other shard files of the old state are removed."""
    old_sizes = old.get("class_file_sizes", {})
    new_sizes = fingerprint["class_file_sizes"]
    old_shards = {shard["file"]: shard for split in SPLITS for shard in old.get("plan", {}).get(split, [])}
    new_shards = {shard["file"]: shard for split in SPLITS for shard in plan[split]}
    kept = {}
    for name, record in old.get("done", {}).items():
        shard = new_shards.get(name)
        unchanged = (
            shard is not None
            and old_shards.get(name, {}).get("segments") == shard["segments"]
            and all(old_sizes.get(str(c)) == new_sizes.get(str(c)) for c, *_ in shard["segments"])
        )
        if unchanged and _shard_is_done(output_dir, shard, old["done"]):
            kept[name] = record
    for name in old_shards:
        if name not in kept and _SHARD_RE.fullmatch(Path(name).name):
            (output_dir / name).unlink(missing_ok=True)
    return kept


def _complete_on_disk(output_dir: Path, state: dict[str, Any]) -> bool:
    """A complete state whose shards, card and spec copy are all still there."""
    done = state.get("done", {})
    shards = [shard for split in SPLITS for shard in state.get("plan", {}).get(split, [])]
    return (
        all(_shard_is_done(output_dir, shard, done) for shard in shards)
        and (output_dir / CARD_FILENAME).is_file()
        and (output_dir / SPEC_FILENAME).is_file()
    )


# --- the Hub --------------------------------------------------------------------------------------------


def push_source(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a converted source folder to the dataset repo ``repo_id`` (created if needed); its URL.

    Uses ``HfApi.upload_large_folder`` where it exists (huggingface_hub 1.x: resumable, many commits), else
    ``HfApi.upload_folder`` (huggingface_hub 2.x: with ``hf_xet`` it is the resumable multi-commit upload).
    The converter's state and temporary files are not uploaded. ``private=True`` refuses to upload into an
    existing public repo rather than publish the images.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    state = _read_state(folder)
    if not state or not state.get("complete"):
        raise ValueError(f"{folder} is not a finished conversion; convert it (again) before pushing")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type="dataset").private:
        raise ValueError(
            f"{repo_id} already exists and is public; nothing was uploaded (private=True was asked). Make it "
            "private on the Hub first, or choose another repo."
        )
    message = commit_message or f"Meta-Dataset {state.get('source', folder.name)} (hf_copa conversion)"
    upload_large_folder = getattr(api, "upload_large_folder", None)
    if upload_large_folder is not None:
        upload_large_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            private=private,
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        )
    else:
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
            commit_message=message,
        )
    return str(url)


def convert_records(
    records: str | os.PathLike[str],
    output: str | os.PathLike[str],
    sources: Iterable[str] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    *,
    overwrite: bool = False,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    command: str | None = None,
) -> list[ConvertedSource]:
    """Convert Meta-Dataset records to Hub datasets: ``OUTPUT/<source>/`` per source (see the module
    docstring).

    ``records``: one source folder (holding ``dataset_spec.json``) or a folder of source folders; ``sources``
    keeps only those folder names. ``push_to_hub="ORG/PREFIX"`` uploads each source, once converted, to the
    dataset repo ``ORG/PREFIX-<source>`` (``private`` / ``token`` as for ``huggingface_hub``); check the
    source's licence first (several forbid republishing the images: push privately). Sources are converted in
    order and the first error stops the run; finished sources and shards stay, and a rerun resumes.
    """
    found = discover_sources(records, sources)
    output = Path(output)
    if push_to_hub is not None and (push_to_hub.count("/") != 1 or not all(push_to_hub.split("/"))):
        raise ValueError(
            f"push_to_hub must be 'ORG/PREFIX' (repos become ORG/PREFIX-<source>), got {push_to_hub!r}"
        )
    if command is None:
        arguments = [repr(str(records)), repr(str(output))]
        if sources is not None:
            arguments.append(f"sources={list(sources)!r}")
        if push_to_hub is not None:
            arguments.append(f"push_to_hub={push_to_hub!r}, private={private!r}")
        command = f"hf_copa.meta_dataset.convert_records({', '.join(arguments)})"
    results = []
    for source_dir in found:
        repo_id = f"{push_to_hub}-{source_dir.name}" if push_to_hub else None
        converted = convert_source(
            source_dir,
            output / source_dir.name,
            max_shard_bytes=max_shard_bytes,
            row_group_rows=row_group_rows,
            row_group_bytes=row_group_bytes,
            overwrite=overwrite,
            progress=progress,
            command=command,
            repo_id=repo_id,
        )
        if repo_id is not None:
            url = push_source(converted.path, repo_id, private=private, token=token)
            converted = _with_repo(converted, repo_id, url)
        results.append(converted)
    return results


def _with_repo(converted: ConvertedSource, repo_id: str, url: str) -> ConvertedSource:
    from dataclasses import replace

    return replace(converted, repo_id=repo_id, repo_url=url)
