"""Benchmark Meta-Dataset's official test episodes without TensorFlow, and the paper's benchmark command.

    python scripts/benchmark_official_episodes.py            # --json out.json, --skip-end-to-end
    python scripts/benchmark_official_episodes.py --quick --json out.json   # a smoke test: under a minute

1. Sources: the three reference sources (`../shared/reference/meta_dataset/records`, converted here) and a
   generated flat source of 52 test classes x 20,000 records (QuickDraw's test split has 52 classes;
   `tests/support/meta_dataset_fixtures.write_source`, small JPEGs from a pool), converted with
   `hf_copa.meta_dataset.convert_source`.
2. For each, in a fresh process at one thread: the time `official_sampler(source, num_episodes=600)` takes
   to read the label columns and compute all descriptions and class streams (no image decoded), the rows
   those episodes touch against the rows of the test split (what evaluation embeds), the resident memory
   the sampler adds, and the process's peak (`ru_maxrss`, loading the split with `datasets` included).
3. End to end: `hf-copa evaluate --benchmark meta-dataset` on the reference sources laid out under
   Meta-Dataset names (`ilsvrc_2012` -> md_dag, `omniglot` -> md_bilevel, `dtd` and `mnist` -> md_plain),
   600 episodes each, with the bundled model and ncc, url, copa, wall time and the printed table.
"""

from __future__ import annotations

import argparse
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
REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "meta_dataset" / "records"
GENERATED_CLASSES, GENERATED_IMAGES = 52, 20_000  # the generated source: 52 test classes x 20,000 records
# --quick: 5 episodes of the meta-dataset protocol, a generated source of 52 x 100 records.
QUICK_DEFAULTS = {"episodes": 5, "protocols": ["meta-dataset"]}
QUICK_GENERATED_IMAGES = 100


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sampler_child(source: str, protocol: str, episodes: int) -> None:
    """In a fresh process: time the official sampler on a converted source; print one JSON line."""
    import resource

    import datasets

    from hf_copa.meta_dataset import official_sampler

    split = datasets.load_dataset(source, split="test")  # loaded before the clock: evaluation loads it anyway
    baseline = _rss_mib()
    started = time.perf_counter()
    sampler = official_sampler(source, protocol=protocol, num_episodes=episodes, dataset=split)
    seconds = time.perf_counter() - started
    rows = sampler.rows_used()
    result = {
        "seconds": seconds,
        "rows_embedded": len(rows),
        "rows_in_split": len(split),
        "rss_growth_mib": _rss_mib() - baseline,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_loading_mib": baseline,
    }
    print(json.dumps(result))


def _generate(folder: Path, images_per_class: int) -> Path:
    from tests.support.meta_dataset_fixtures import write_source

    return write_source(
        folder,
        name=folder.name,
        classes_per_split=(0, 0, GENERATED_CLASSES),
        images_per_class=images_per_class,
        image_size=(12, 28),
        distinct_images=256,
    )


def _sampler_cell(source: Path, protocol: str, episodes: int) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_sampler-child",
        str(source),
        protocol,
        str(episodes),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=REPO_ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _end_to_end(converted: Path, work: Path, episodes: int) -> dict:
    from tests.support.meta_dataset_fixtures import benchmark_layout

    root = benchmark_layout(converted, work / "benchmark_root")
    output = work / "benchmark.json"
    command = [
        sys.executable,
        "-m",
        "hf_copa.cli",
        "evaluate",
        "--benchmark",
        "meta-dataset",
        "--data-root",
        str(root),
        "--episodes",
        str(episodes),
        "--method",
        "ncc",
        "url",
        "copa",
        "--threads",
        "1",
        "--no-progress",
        "--cache-dir",
        str(work / "cache"),
        "--output",
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "table": done.stdout.strip(), "command": " ".join(command[2:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument(
        "--protocols", nargs="+", default=["meta-dataset", "varying-way-5-shot", "5-way-1-shot"]
    )
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--json", default=None)
    add_quick_flag(
        parser,
        f"--episodes 5 --protocols meta-dataset, a generated source of "
        f"{GENERATED_CLASSES} x {QUICK_GENERATED_IMAGES} records",
    )
    parser.add_argument("--_sampler-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parse_quick(parser, argv, QUICK_DEFAULTS)
    if args._sampler_child:
        source, protocol, episodes = args._sampler_child
        _sampler_child(source, protocol, int(episodes))
        return 0

    from hf_copa.meta_dataset import convert_records, convert_source

    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread", "sampler": {}}
    if args.quick:
        results["quick"] = True  # marks a smoke-test run's figures
    images_per_class = QUICK_GENERATED_IMAGES if args.quick else GENERATED_IMAGES
    generated_name = f"generated_{GENERATED_CLASSES}x{images_per_class}"
    with tempfile.TemporaryDirectory(prefix="official-episodes-") as tmp:
        work = Path(tmp)
        converted = work / "converted"
        convert_records(REFERENCE, converted, progress=False)
        started = time.perf_counter()
        generated = _generate(work / "records" / generated_name, images_per_class)
        results["generate_seconds"] = time.perf_counter() - started
        convert_source(generated, converted / generated_name, progress=False)
        sources = ["md_plain", "md_bilevel", "md_dag", generated_name]
        for source in sources:
            for protocol in args.protocols:
                if protocol != "meta-dataset" and source != "md_plain" and not source.startswith("generated"):
                    continue
                cell = _sampler_cell(converted / source, protocol, args.episodes)
                results["sampler"][f"{source} {protocol}"] = cell
                print(
                    f"{source:>20} {protocol:>19}: {cell['seconds'] * 1e3:8.0f} ms, "
                    f"rows {cell['rows_embedded']:>9,} "
                    f"of {cell['rows_in_split']:>9,}, sampler +{cell['rss_growth_mib']:.0f} MiB, peak RSS "
                    f"{cell['peak_rss_mib']:.0f} MiB (after loading {cell['rss_after_loading_mib']:.0f})",
                    flush=True,
                )
        if not args.skip_end_to_end:
            results["end_to_end"] = _end_to_end(converted, work, args.episodes)
            print(f"end to end: {results['end_to_end']['seconds']:.0f} s\n{results['end_to_end']['table']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
