"""Cost of the backbone-adapting learners: time per episode and peak memory of tsa, copa+tsa and the
all-layers finetune-all and proto-maml-all, vs copa.

Every method starts from images and ends with query logits, so the rows compare what a user waits for:
copa embeds the support and query images once and fits its heads on the features; tsa and copa+tsa run
the backbone (forward and backward) on the support images at every one of their 40 steps (finetune-all:
200, proto-maml-all: 6, with the model's own adaptation settings), then embed the queries through the
adapted backbone. Each (model, episode, method) cell runs in a fresh process:
its peak memory is the process's peak resident set (CPU) or peak CUDA allocation (GPU) above what it held
once the model and the images were loaded.

    python scripts/benchmark_tsa.py --json runs/benchmark_tsa.json   # on a GPU: --device cuda
    python scripts/benchmark_tsa.py --quick --json out.json          # a smoke test: seconds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
METHODS = ("copa", "tsa", "copa+tsa", "finetune-all", "proto-maml-all")
EPISODES = {"5-way 1-shot": (5, 1), "5-way 5-shot": (5, 5), "10-way 5-shot": (10, 5)}
QUERIES_PER_CLASS = 15
# --quick: the small bundled ResNet-18 (no reference checkpoint needed), 5-way 1-shot, one timed run.
QUICK_DEFAULTS = {"models": ["copa-mdl-small"], "episodes": ["5-way 1-shot"], "repeats": 1}


def load(model_name: str, reference_dir: Path):
    """'url-resnet18': URL's ResNet-18 (84x84, 512-d) with the reference checkpoint's weights;
    'copa-mdl-small': the small bundled ResNet-18 (`hf_copa.SMALL_RESNET`; TSA needs a ResNet, which the
    default EfficientNet-Lite is not); anything else: a folder or Hub id."""
    from hf_copa.bundled import SMALL_RESNET
    from hf_copa.conversion import load_url_backbone
    from hf_copa.pretrained import load_model

    if model_name != "url-resnet18":
        return load_model(SMALL_RESNET if model_name == "copa-mdl-small" else model_name)
    return load_url_backbone(reference_dir / "url_checkpoint.pth.tar.xz", stem_padding=2)  # as measured


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def cell(model_name, method, way, shot, repeats, device, threads, reference_dir, results) -> None:
    import hf_copa
    from hf_copa import get_learner

    torch.set_num_threads(threads)
    model = load(model_name, reference_dir).to(device)
    side = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(way * shot, 3, side, side, generator=generator) * 2 - 1
    query = torch.rand(way * QUERIES_PER_CLASS, 3, side, side, generator=generator) * 2 - 1
    labels = torch.arange(way).repeat(shot)

    def episode() -> torch.Tensor:
        if method == "copa":
            head = hf_copa.adapt(model.extract_features(support), labels, method="copa")
            return head.logits(model.extract_features(query))
        overrides = model.config.adaptation.get(method)  # the model's own settings, as adapt uses them
        head = get_learner(method, config_overrides=overrides).fit_images(model, support, labels)
        return head.logits(model.extract_features(query, **head.backbone_state()))

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = rss_mib()
    episode()  # warm-up: the first pass also creates the convolution primitives
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        episode()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20 - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    results.put(
        {
            "model": model_name,
            "method": method,
            "episode": f"{way}-way {shot}-shot",
            "support": way * shot,
            "query": way * QUERIES_PER_CLASS,
            "image_size": side,
            "seconds_median": statistics.median(seconds),
            "seconds": seconds,
            "peak_memory_mib": round(peak, 1),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["url-resnet18", "copa-mdl-small"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--episodes", nargs="+", default=list(EPISODES), choices=list(EPISODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reference-dir", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--json", type=Path, default=None)
    add_quick_flag(
        parser,
        "--models copa-mdl-small --episodes '5-way 1-shot' --repeats 1, all methods",
    )
    args = parse_quick(parser, argv, QUICK_DEFAULTS)

    context = multiprocessing.get_context("spawn")  # a fresh process per cell: its own peak memory
    rows = []
    print("| model | episode | method | s / episode | peak memory MiB |\n|---|---|---|---|---|")
    for model_name in args.models:
        for name in args.episodes:
            way, shot = EPISODES[name]
            for method in args.methods:
                results = context.Queue()
                process = context.Process(
                    target=cell,
                    args=(model_name, method, way, shot, args.repeats, args.device, args.threads,
                          args.reference_dir, results),
                )  # fmt: skip
                process.start()
                row = results.get()
                process.join()
                rows.append(row)
                print(
                    f"| {model_name} | {name} | {method} | {row['seconds_median']:.2f} | "
                    f"{row['peak_memory_mib']:.0f} |",
                    flush=True,
                )
    if args.json:
        hardware = {
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            **({"quick": True} if args.quick else {}),  # marks a smoke-test run's file
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
