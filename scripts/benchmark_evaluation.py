"""Benchmark a whole evaluation: feature cache fill, batched vs one-by-one adaptation, peak memory.

    python scripts/benchmark_evaluation.py                     # 600 meta-dataset episodes of copa on mnist
    python scripts/benchmark_evaluation.py --model PATH --episodes 100 --json out.json
    python scripts/benchmark_evaluation.py --quick --json out.json   # a smoke test: seconds

The one-by-one path runs the same learner on each episode alone (what a loop
over `hf_copa.adapt` does); both must give identical accuracies.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

REPO_ROOT = Path(__file__).resolve().parents[1]
# --quick: 10 episodes on the dataset's first 500 images.
QUICK_DEFAULTS = {"episodes": 10}
QUICK_IMAGES = 500


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model folder or Hub id (default: the bundled backbone)"
    )
    parser.add_argument("--dataset", default=str(REPO_ROOT.parent / "shared" / "datasets" / "mnist"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--method", default="copa")
    parser.add_argument("--protocol", default="meta-dataset")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-one-by-one", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures here")
    add_quick_flag(
        parser,
        f"--episodes 10 on the first {QUICK_IMAGES} images",
    )
    args = parse_quick(parser, argv, QUICK_DEFAULTS)

    import datasets

    from hf_copa.batching import episode_chunks
    from hf_copa.episodes import make_sampler
    from hf_copa.evaluation import adapt_and_score, adapt_one_by_one
    from hf_copa.features import extract_dataset_features
    from hf_copa.learners import get_learner
    from hf_copa.pretrained import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model).to(device)
    dataset = datasets.load_dataset(args.dataset, split=args.split)
    if args.quick:
        dataset = dataset.select(range(min(QUICK_IMAGES, len(dataset))))
    figures: dict[str, float | int | str] = {
        "dataset": f"{args.dataset}:{args.split}",
        "images": len(dataset),
        "method": args.method,
        "episodes": args.episodes,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        **({"quick": True} if args.quick else {}),  # marks a smoke-test run's figures
    }
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        features = extract_dataset_features(model, dataset, cache_dir=cache_dir, device=device)
        figures["cache_fill_s"] = time.perf_counter() - started
        started = time.perf_counter()
        extract_dataset_features(model, dataset, cache_dir=cache_dir, device=device, progress=False)
        figures["cache_hit_s"] = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.synchronize()

    sampler = make_sampler(args.protocol, dataset, seed=args.seed, num_episodes=args.episodes)
    episodes = [sampler.episode(i) for i in range(args.episodes)]
    support_sizes = [len(e.support_indices) for e in episodes]
    figures["mean_support"] = float(np.mean(support_sizes))
    figures["mean_ways"] = float(np.mean([e.num_ways for e in episodes]))
    hp = get_learner(args.method).hyperparameters
    features = features.to(device)

    started = time.perf_counter()
    batched = {}
    chunks = episode_chunks(episodes)
    for chunk in chunks:
        scores = adapt_and_score(features, [episodes[i] for i in chunk], args.method, hp, device=device)
        batched.update(zip(chunk, scores, strict=True))
    figures["batched_adapt_s"] = time.perf_counter() - started
    batched_accuracies = [batched[i] for i in range(len(episodes))]
    figures["accuracy_mean"] = 100 * float(np.mean(batched_accuracies))
    figures["chunks"] = len(chunks)

    if not args.skip_one_by_one:
        started = time.perf_counter()
        single = adapt_one_by_one(features, episodes, args.method, hp)
        figures["one_by_one_adapt_s"] = time.perf_counter() - started
        figures["speedup"] = figures["one_by_one_adapt_s"] / figures["batched_adapt_s"]
        figures["identical_accuracies"] = single == batched_accuracies
        figures["episodes_differing"] = int(
            sum(a != b for a, b in zip(single, batched_accuracies, strict=True))
        )
    figures["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        figures["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20

    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"{key:>{width}}  {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
