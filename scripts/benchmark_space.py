"""How long the Space makes a user wait: `hf_copa.interactive.run_task` on the bundled example tasks, for
every method, with 1 and 2 CPU threads, median of a few runs after one warm-up run per method and thread
count.

Two times per cell: "adaptation" is the `adaptation_seconds` the Space shows (support features plus fitting
the head); "run" is the whole `run_task` call (also the query features and, for tsa / copa+tsa, the plain
backbone's features for the "before" plot). Reading and checking the uploads (`build_task`) is not timed.
Each row also records the machine's 1-minute load average before it: on a shared machine, other work
inflates the times (with 2 threads most of all), so compare only rows measured at a low load.

    python scripts/benchmark_space.py --json runs/benchmark_space.json
    python scripts/benchmark_space.py --folder my_task   # my_task/{support,query}/<class>/*
    python scripts/benchmark_space.py --quick --json out.json   # a smoke test: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

# --quick: the first bundled task only, 1 thread, one timed run, the default method and url.
QUICK_DEFAULTS = {"threads": [1], "repeats": 1, "methods": ["copa", "url"]}


def tasks(folder: Path | None, first_only: bool = False) -> dict[str, object]:
    """The tasks to time by name: the bundled examples (quickdraw is 3 classes x 5 shots; with `first_only`,
    only the first), or one folder."""
    from hf_copa.folders import load_class_folders
    from hf_copa.interactive import build_task, example_tasks

    if folder is not None:
        paths, labels = load_class_folders(folder / "support")
        queries, _ = load_class_folders(folder / "query")
        classes = [
            (n, [p for p, label in zip(paths, labels, strict=True) if label == n])
            for n in dict.fromkeys(labels)
        ]
        return {folder.name: build_task(classes, queries)}
    examples = list(example_tasks().items())[: 1 if first_only else None]
    return {key: build_task(task.classes, task.queries) for key, task in examples}


def main(argv: list[str] | None = None) -> None:
    from hf_copa.interactive import methods, run_task
    from hf_copa.pretrained import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the bundled backbone)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(methods()),
        help="default: every one the model serves",
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="time this task (support/ and query/ class folders)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_quick_flag(
        parser,
        "the first bundled task, --threads 1 --repeats 1 --methods copa url",
    )
    args = parse_quick(parser, argv, QUICK_DEFAULTS)

    model = load_model(args.model)
    args.methods = args.methods or list(methods(model))
    named_tasks = tasks(args.folder, first_only=args.quick)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for method in args.methods:
            run_task(model, next(iter(named_tasks.values())), method)  # warm-up, not timed
            for name, task in named_tasks.items():
                load = os.getloadavg()[0]
                adaptation, run = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    result = run_task(model, task, method)
                    run.append(time.perf_counter() - start)
                    adaptation.append(result.adaptation_seconds)
                row = {
                    "task": name,
                    "classes": len(task.class_names),
                    "support": len(task.support_images),
                    "queries": len(task.query_images),
                    "method": method,
                    "threads": threads,
                    "adaptation_s": statistics.median(adaptation),
                    "run_s": statistics.median(run),
                    "adaptation_all_s": adaptation,
                    "run_all_s": run,
                    "load_before": load,
                }
                rows.append(row)
                print(
                    f"{name:14s} {row['classes']} classes {row['support']:2d} support {row['queries']:2d} "
                    f"queries  {method:9s} {threads} thread(s): adaptation {row['adaptation_s']:6.2f} s, "
                    f"run {row['run_s']:6.2f} s  (load {load:.2f})",
                    flush=True,
                )
    print(
        "\n| task | images (support + query) | method | " + " | ".join(f"{t} thread(s)" for t in args.threads)
    )
    print("|---|---|---|" + "---|" * len(args.threads))
    for name, task in named_tasks.items():
        for method in args.methods:
            cells = [r for r in rows if r["task"] == name and r["method"] == method]
            print(
                f"| {name} | {len(task.support_images)} + {len(task.query_images)} | {method} | "
                + " | ".join(f"{r['adaptation_s']:.2f} s ({r['run_s']:.2f} s)" for r in cells)
                + " |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        environment = {
            "model": model.config._name_or_path,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "repeats": args.repeats,
            **({"quick": True} if args.quick else {}),  # marks a smoke-test run's file
        }
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
