"""Synthetic Meta-Dataset sources (``dataset_spec.json`` + ``<class_id>.tfrecords``) and ways to damage them.

:func:`write_source` writes a source folder the way Meta-Dataset's converter lays one out: a flat
(``DatasetSpecification``) or two-level (``BiLevelDatasetSpecification``, Omniglot-like) spec in the JSON form
of ``DatasetSpecification.to_dict()``, and one TFRecord file of ``tf.train.Example`` records (``image``:
encoded bytes, ``label``: the absolute class id) per class. Images are small generated JPEGs or PNGs;
everything is a function of the arguments (``seed``), so two calls write identical files.
``distinct_images=K`` encodes only K images and cycles them, for large sources (benchmarks) where encoding
would dominate.

The corruption helpers (:func:`truncate_record`, :func:`flip_byte`, :func:`replace_record`,
:func:`remove_class_file`, :func:`set_count`) damage a written source in the ways converters must detect.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hf_copa.meta_dataset.records import RecordWriter, frame_record, scan_records

__all__ = [
    "benchmark_layout",
    "encoded_image",
    "flip_byte",
    "record_spans",
    "remove_class_file",
    "replace_record",
    "set_count",
    "truncate_record",
    "write_source",
]

_JSON_SPLITS = ("TRAIN", "VALID", "TEST")


def encoded_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    fmt: str = "JPEG",
    mode: str = "RGB",
    quality: int = 90,
) -> bytes:
    """A smooth random image (gradients plus a little noise, so JPEG sizes are realistic), encoded."""
    from PIL import Image

    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    a, b, c = rng.uniform(0, 255, (3, 1, 1, 3))
    pixels = a * x + b * y + c * x * y + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_source(
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    classes_per_split: Sequence[int] = (2, 1, 3),
    superclasses_per_split: Sequence[int] | None = None,
    classes_per_superclass: Sequence[int] | None = None,
    images_per_class: int | Sequence[int] | Callable[[int], int] = 4,
    image_size: tuple[int, int] = (12, 28),
    formats: Sequence[str] = ("JPEG",),
    seed: int = 0,
    distinct_images: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write a synthetic source into ``folder`` (created); returns it.

    Flat by default: ``classes_per_split`` = (train, validation, test) class counts. Two-level when
    ``superclasses_per_split`` (superclass counts per split) and ``classes_per_superclass`` (one count per
    superclass, in id order) are given. ``images_per_class``: one count for all, one per class, or a function
    of the class id. Image sides are drawn in ``image_size`` (min, max); formats cycle through ``formats``
    (PIL format names; "L" suffix for greyscale, e.g. "PNG-L").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = name or folder.name
    bilevel = superclasses_per_split is not None
    if bilevel:
        if classes_per_superclass is None or len(classes_per_superclass) != sum(superclasses_per_split):
            raise ValueError("classes_per_superclass needs one count per superclass")
        num_classes = sum(classes_per_superclass)
    else:
        num_classes = sum(classes_per_split)
    if callable(images_per_class):
        counts = [int(images_per_class(c)) for c in range(num_classes)]
    elif isinstance(images_per_class, int):
        counts = [images_per_class] * num_classes
    else:
        counts = [int(n) for n in images_per_class]
        if len(counts) != num_classes:
            raise ValueError(f"images_per_class has {len(counts)} entries for {num_classes} classes")

    if class_names is None:
        if bilevel:
            class_names = [
                f"alphabet{s}_character{j + 1:02d}"
                for s, n in enumerate(classes_per_superclass)
                for j in range(n)
            ]
        else:
            class_names = [f"{name}_class{c:03d}" for c in range(num_classes)]
    spec: dict = {"name": name}
    if bilevel:
        spec["superclasses_per_split"] = dict(
            zip(_JSON_SPLITS, map(int, superclasses_per_split), strict=True)
        )
        spec["classes_per_superclass"] = {str(s): int(n) for s, n in enumerate(classes_per_superclass)}
        spec["images_per_class"] = {str(c): n for c, n in enumerate(counts)}
        spec["superclass_names"] = {str(s): f"alphabet{s}" for s in range(len(classes_per_superclass))}
    else:
        spec["classes_per_split"] = dict(zip(_JSON_SPLITS, map(int, classes_per_split), strict=True))
        spec["images_per_class"] = {str(c): n for c, n in enumerate(counts)}
    spec["class_names"] = {str(c): class_names[c] for c in range(num_classes)}
    spec["path"] = str(folder)
    spec["file_pattern"] = "{}.tfrecords"
    spec["__class__"] = "BiLevelDatasetSpecification" if bilevel else "DatasetSpecification"
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")

    rng = np.random.default_rng(seed)
    low, high = image_size

    def make(k: int) -> bytes:
        fmt = formats[k % len(formats)]
        mode = "RGB"
        if fmt.endswith("-L"):
            fmt, mode = fmt[:-2], "L"
        return encoded_image(
            rng, int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1)), fmt=fmt, mode=mode
        )

    pool = [make(k) for k in range(distinct_images)] if distinct_images else None
    k = 0
    for class_id, count in enumerate(counts):
        with RecordWriter(folder / f"{class_id}.tfrecords") as writer:
            for _ in range(count):
                image = pool[(k * 7919) % len(pool)] if pool else make(k)
                writer.write_example(image, class_id)
                k += 1
    return folder


# --- damage -----------------------------------------------------------------------------------------------


def record_spans(path: str | os.PathLike[str]) -> list:
    """Where each record of a class file lies (:class:`~hf_copa.meta_dataset.records.RecordSpan`)."""
    return list(scan_records(path))


def truncate_record(path: str | os.PathLike[str], index: int, *, keep: int | None = None) -> int:
    """Cut the file inside record ``index``: after its header plus ``keep`` data bytes (default: half its
    data); ``keep=-12..-1`` cuts inside the header. Returns the record's offset."""
    span = record_spans(path)[index]
    keep = span.length // 2 if keep is None else keep
    with open(path, "r+b") as file:
        file.truncate(span.offset + 12 + keep)
    return span.offset


def flip_byte(path: str | os.PathLike[str], index: int, *, where: str = "data") -> int:
    """Invert one byte of record ``index``: in the middle of its data (``"data"``: a data-CRC mismatch) or in
    its length field (``"length"``: a length-CRC mismatch). Returns the record's offset."""
    span = record_spans(path)[index]
    position = span.offset + 12 + span.length // 2 if where == "data" else span.offset + 1
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0xFF]))
    return span.offset


def replace_record(path: str | os.PathLike[str], index: int, data: bytes) -> int:
    """Replace record ``index``'s data by ``data``, correctly framed (valid CRCs). Returns its offset."""
    spans = record_spans(path)
    blob = Path(path).read_bytes()
    span = spans[index]
    Path(path).write_bytes(blob[: span.offset] + frame_record(data) + blob[span.offset + 16 + span.length :])
    return span.offset


def remove_class_file(folder: str | os.PathLike[str], class_id: int) -> Path:
    path = Path(folder) / f"{class_id}.tfrecords"
    path.unlink()
    return path


def set_count(folder: str | os.PathLike[str], class_id: int, count: int) -> None:
    """Make ``dataset_spec.json`` give ``class_id`` ``count`` images (flat and two-level specs)."""
    path = Path(folder) / "dataset_spec.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["images_per_class"][str(class_id)] = count
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")


# The reference sources under Meta-Dataset's names: one of each spec kind, a flat one both seen and unseen.
BENCHMARK_LAYOUT = {"ilsvrc_2012": "md_dag", "omniglot": "md_bilevel", "dtd": "md_plain", "mnist": "md_plain"}


def benchmark_layout(converted: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """A `--data-root` for `hf-copa evaluate --benchmark meta-dataset` made of the converted reference
    sources (`BENCHMARK_LAYOUT`), as symbolic links under `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, source in BENCHMARK_LAYOUT.items():
        (root / name).symlink_to(Path(converted) / source, target_is_directory=True)
    return root
