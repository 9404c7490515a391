"""Benchmark Meta-Dataset records without TensorFlow: conversion, Example parsing, decode + resize.

    python scripts/benchmark_meta_dataset.py                      # 200,000 generated JPEG records
    python scripts/benchmark_meta_dataset.py --records 20000 --json out.json
    python scripts/benchmark_meta_dataset.py --quick --json out.json  # a smoke test: seconds

1. Generates a flat source (``tests/support/meta_dataset_fixtures.write_source``: 100 classes over the three
   splits, small JPEGs drawn from a pool of distinct images) in a temporary folder and states its size.
2. Converts it with ``hf_copa.meta_dataset.convert_source`` in a fresh process (so the RSS high-water mark,
   ``getrusage``'s ``ru_maxrss``, is the conversion's; the RSS after importing the package is shown beside
   it), twice: the full source and a tenth of it, to show that peak memory does not grow with the source. The
   conversion needs no torch; it runs single-threaded.
3. Times ``tf.train.Example`` parsing: the direct wire-format decoder against protobuf.
4. Times decode + resize to 84x84 of the same encoded images by ``meta_dataset_pixels`` (TensorFlow's
   pixels) and by ``hf_copa.CopaImageProcessor`` (PIL decode and resize), through a ``DataLoader`` with 1 and
   2 workers, each worker (and the main process) at ``torch.set_num_threads(1)``; the two are interleaved and
   the best of ``--repeats`` passes is kept.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the sources come from tests/support: run from anywhere, no PYTHONPATH
# --quick: a 1,000-record source, 256 images decoded once, with one DataLoader worker.
QUICK_DEFAULTS = {"records": 1000, "decode_images": 256, "workers": [1], "repeats": 1}


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _convert_child(source: str, output: str) -> None:
    """Run in a fresh process: convert, print JSON with the timings and memory."""
    import resource

    import datasets  # noqa: F401 - imported before the clock starts, as pyarrow and huggingface_hub
    import huggingface_hub  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from hf_copa.meta_dataset.convert import convert_source

    baseline = _rss_mib()
    started = time.perf_counter()
    result = convert_source(source, output, progress=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shards = sum(split.num_shards for split in result.splits.values())
    print(
        json.dumps(
            {"seconds": seconds, "peak_rss_mib": peak, "rss_after_imports_mib": baseline, "shards": shards}
        )
    )


def _write(folder: Path, records: int, seed: int = 0) -> dict:
    from tests.support.meta_dataset_fixtures import write_source

    classes = 100
    per_class = records // classes
    started = time.perf_counter()
    write_source(
        folder,
        classes_per_split=(40, 20, 40),
        images_per_class=per_class,
        image_size=(28, 84),
        distinct_images=4096,
        seed=seed,
    )
    files = sorted(folder.glob("*.tfrecords"))
    size = sum(path.stat().st_size for path in files)
    return {
        "records": per_class * classes,
        "classes": classes,
        "bytes": size,
        "mean_record_bytes": size / (per_class * classes),
        "seconds_to_generate": time.perf_counter() - started,
    }


def _convert(source: Path, output: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--_convert-child", str(source), str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=REPO_ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse_timings(source: Path, limit: int) -> dict:
    from hf_copa.meta_dataset import records

    data = []
    for path in sorted(source.glob("*.tfrecords"), key=lambda p: int(p.stem)):
        data.extend(records.iter_records(path))
        if len(data) >= limit:
            break
    data = data[:limit]
    out = {"records": len(data)}
    for name, parse in (("direct", records.parse_example), ("protobuf", records.parse_example_protobuf)):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for item in data:
                parse(item)
            best = min(best, time.perf_counter() - started)
        out[f"{name}_us_per_record"] = best / len(data) * 1e6
    return out


class _Batches:
    """A map-style dataset whose items are whole decoded batches (one per ``__getitem__``)."""

    def __init__(self, images: list[bytes], batch: int, method: str) -> None:
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self.method = method
        self.processor = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        batch = self.batches[index]
        if self.method == "meta-dataset":
            from hf_copa.meta_dataset.decoder import meta_dataset_pixels

            return meta_dataset_pixels(batch, 84)
        from PIL import Image

        if self.processor is None:
            from hf_copa import CopaImageProcessor

            self.processor = CopaImageProcessor()
        return self.processor([Image.open(io.BytesIO(b)) for b in batch], return_tensors="pt")["pixel_values"]


def _one_thread(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def _decode_pass(images: list[bytes], batch: int, method: str, workers: int) -> float:
    """Images per second after the first batch arrives (worker start-up excluded)."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Batches(images, batch, method),
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
        multiprocessing_context="fork" if workers else None,
    )
    iterator = iter(loader)
    first = next(iterator)
    count = 0
    started = time.perf_counter()
    for pixels in iterator:
        count += pixels.shape[0]
    seconds = time.perf_counter() - started
    assert first.shape[1:] == torch.Size([3, 84, 84])
    return count / seconds


def _decode_timings(source: Path, count: int, batch: int, workers: list[int], repeats: int) -> dict:
    from hf_copa.meta_dataset import records

    images: list[bytes] = []
    for path in sorted(source.glob("*.tfrecords"), key=lambda p: int(p.stem)):
        images.extend(example.image for _, example in records.iter_examples(path))
        if len(images) >= count:
            break
    images = images[:count]
    out: dict = {"images": len(images), "batch": batch}
    for w in workers:
        best = {"meta-dataset": 0.0, "CopaImageProcessor": 0.0}
        for _ in range(repeats):
            for method in best:  # interleaved: drift on a shared machine hits both alike
                best[method] = max(best[method], _decode_pass(images, batch, method, w))
        out[f"workers={w}"] = best
    return out


def _table(figures: dict) -> str:
    src, small = figures["source"], figures["source_small"]
    conv, conv_small = figures["conversion"], figures["conversion_small"]
    lines = [
        f"Source: {src['records']:,} JPEG records, {src['classes']} classes, "
        f"{src['bytes'] / 1e6:.1f} MB of .tfrecords ({src['mean_record_bytes']:.0f} B per record, "
        "images 28-84 px drawn from 4,096 distinct ones). Threads: torch.set_num_threads(1) in every "
        f"process; {os.cpu_count()} CPUs; Python {platform.python_version()}.",
        "",
        "| conversion (fresh process) | records | MB read | seconds | records/s | MB/s | shards | peak RSS "
        "(MiB) | RSS after imports (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for source, result in ((src, conv), (small, conv_small)):
        lines.append(
            f"| convert_source | {source['records']:,} | {source['bytes'] / 1e6:.1f} | "
            f"{result['seconds']:.1f} | {source['records'] / result['seconds']:,.0f} | "
            f"{source['bytes'] / 1e6 / result['seconds']:.1f} | "
            f"{result['shards']} | {result['peak_rss_mib']:.0f} | {result['rss_after_imports_mib']:.0f} |"
        )
    parse = figures["parse"]
    lines += [
        "",
        f"| tf.train.Example parse ({parse['records']:,} records) | us per record |",
        "| --- | --- |",
        f"| direct wire-format decoder (parse_example) | {parse['direct_us_per_record']:.2f} |",
        f"| protobuf (parse_example_protobuf) | {parse['protobuf_us_per_record']:.2f} |",
    ]
    decode = figures["decode"]
    lines += [
        "",
        f"| decode + resize to 84x84 ({decode['images']:,} images, batches of {decode['batch']}) | "
        "meta_dataset_pixels (images/s) | CopaImageProcessor (images/s) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for key, value in decode.items():
        if key.startswith("workers="):
            md, pil = value["meta-dataset"], value["CopaImageProcessor"]
            lines.append(
                f"| DataLoader {key.replace('=', ' = ')} | {md:,.0f} | {pil:,.0f} | {md / pil:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000, help="records in the generated source")
    parser.add_argument("--decode-images", type=int, default=4096, help="images decoded per pass")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    add_quick_flag(
        parser,
        "--records 1000 --decode-images 256 --workers 1 --repeats 1",
    )
    parser.add_argument("--_convert-child", nargs=2, help=argparse.SUPPRESS)
    args = parse_quick(parser, argv, QUICK_DEFAULTS)
    if args._convert_child:
        _convert_child(*args._convert_child)
        return 0

    import torch

    torch.set_num_threads(1)
    figures: dict = {"threads": 1, "cpus": os.cpu_count()}
    if args.quick:
        figures["quick"] = True  # marks a smoke-test run's figures
    with tempfile.TemporaryDirectory(prefix="md-bench-") as tmp:
        tmp = Path(tmp)
        figures["source"] = _write(tmp / "records" / "bench", args.records)
        figures["source_small"] = _write(
            tmp / "records" / "bench_small", max(args.records // 10, 100), seed=1
        )
        figures["conversion"] = _convert(tmp / "records" / "bench", tmp / "out" / "bench")
        figures["conversion_small"] = _convert(tmp / "records" / "bench_small", tmp / "out" / "bench_small")
        figures["parse"] = _parse_timings(tmp / "records" / "bench", 20_000)
        figures["decode"] = _decode_timings(
            tmp / "records" / "bench", args.decode_images, args.batch, args.workers, args.repeats
        )
    print(_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
