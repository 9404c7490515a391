"""Measure hf_copa's GPU path on one card (or any device): adaptation, extraction, TSA, CPU agreement.

Needs nothing but the repository and its install (no network, no Hub): features and images are generated,
at Meta-Dataset's sizes (its variable-way variable-shot protocol over a generated label set, up to 500
support images). In one run it measures

- the card's float32 / TF32 / bf16 matmul peak (torch.mm, synchronised),
- for every registered feature learner (on `--episodes` episodes of `--protocol`): seconds per episode
  batched (padded chunks, as `evaluate` runs them) and one by one (`Learner.fit`), and where its FLOPs are
  counted analytically the share of the float32 peak; for copa, the 13 x 600 Meta-Dataset episodes
  projected from the batched rate,
- feature extraction images/s of the default model (EfficientNet-Lite0, 128 px), the small bundled ResNet-18
  (64 px) and a URL-sized ResNet-18 at 84 px, float32 and bf16 autocast, channels-last or not,
- TSA's seconds per episode (5-way 5-shot on the small bundled ResNet-18),
- the largest |logit| difference between the device and the CPU on the same episodes, per learner.

It writes one JSON (`--json`) and prints a table.

    python scripts/gpu_check.py --json runs/gpu_check.json                 # on the card, a few minutes
    python scripts/gpu_check.py --device cpu --quick --json runs/gpu.json  # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py
from benchmark_adaptation import head_flops  # scripts/benchmark_adaptation.py: the analytic FLOPs

FEATURE_DIM = 512
META_DATASET_EPISODES = 13 * 600
# --quick: a few small episodes, one repeat, tiny extraction and TSA runs.
QUICK_DEFAULTS = {
    "episodes": 4,
    "single_episodes": 2,
    "repeats": 1,
    "extraction_images": 16,
    "extraction_batch": 8,
    "tsa_steps": 2,
    "peak_size": 1024,
    "max_support": 50,
    "maps_episodes": 1,
    "protocol": "5-way-1-shot",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of `run` after one warm-up call (synchronised), and its last result."""
    result = run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def matmul_peaks(device: torch.device, size: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of a size^3 torch.mm in float32 (TF32 off), TF32 (on CUDA) and bf16."""
    peaks = {}
    settings = [("float32", torch.float32, False)]
    if device.type == "cuda":
        settings += [("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)]
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in settings:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            inner = max(1, int(2e9 // size**3)) if device.type == "cuda" else max(1, int(2e8 // size**3))
            seconds, _ = timed(
                lambda a=a, b=b, inner=inner: [torch.mm(a, b) for _ in range(inner)], device, repeats
            )
            peaks[name] = 2.0 * size**3 * inner / seconds / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return peaks


def generated_episodes(
    protocol: str, count: int, max_support: int, seed: int
) -> tuple[list[Any], torch.Tensor]:
    """`protocol` episodes over a generated 100-class label set, support sets capped at `max_support`, and
    class-clustered non-negative features [rows, 512] (like post-ReLU pooled ones)."""
    from hf_copa.episodes import make_sampler

    labels = np.repeat(np.arange(100), 600)
    sampler = make_sampler(protocol, labels, seed=seed, num_episodes=100 * count)
    episodes = []
    for i in range(100 * count):
        episode = sampler.episode(i)
        if len(episode.support_indices) <= max_support:
            episodes.append(episode)
        if len(episodes) == count:
            break
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(100, FEATURE_DIM, generator=generator)
    noise = 0.3 * torch.randn(len(labels), FEATURE_DIM, generator=generator)
    features = (centres[torch.from_numpy(labels)] + noise).clamp_min(0.0)
    return episodes, features


def learner_rows(
    episodes: list[Any], features: torch.Tensor, device: torch.device, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Per feature learner: batched and one-by-one seconds per episode, %-of-peak, CPU logit difference.

    Learners on feature maps (copa-transformer) get 512 x 6 x 6 maps made from the same features
    (`benchmark_adaptation.feature_maps`), on the first `--maps-episodes` episodes only (36x the memory).
    """
    from benchmark_adaptation import feature_maps

    from hf_copa.batching import episode_chunks, pad_episodes
    from hf_copa.evaluation import rows_used
    from hf_copa.features import RowFeatures
    from hf_copa.learners import available_methods, get_learner, learner_class

    pooled = {"cpu": features, "device": features.to(device)}
    # Under --quick the smallest support sets (a transformer step on 500 maps takes seconds on a CPU).
    map_episodes = sorted(episodes, key=lambda e: len(e.support_indices)) if args.quick else episodes
    map_episodes = map_episodes[: args.maps_episodes]
    map_rows = torch.from_numpy(rows_used(map_episodes))
    maps = feature_maps(features[map_rows], args.seed)
    on_maps = {"cpu": RowFeatures(map_rows, maps), "device": RowFeatures(map_rows, maps.to(device))}
    rows = []
    for method in available_methods():
        cls = learner_class(method)
        if cls.needs_backbone:
            continue  # TSA learners adapt on images: timed below
        if cls.feature_kind == "backbones":
            continue  # sur, urt: several backbones' features (scripts/benchmark_backbone_set.py)
        tables, timed_episodes = (on_maps, map_episodes) if cls.feature_kind == "maps" else (pooled, episodes)
        singles = timed_episodes[: args.single_episodes]
        learner = get_learner(method)

        def batched(
            tables: dict = tables, timed_episodes: list = timed_episodes, learner=learner
        ) -> list[Any]:
            heads = []
            for chunk in episode_chunks(timed_episodes):
                support, labels, ways = pad_episodes(tables["device"], [timed_episodes[i] for i in chunk])
                heads += learner.fit_batch(support.to(device), labels.to(device), ways)
            return heads

        def one_by_one(
            where: str = "device", tables: dict = tables, learner=learner, singles=singles
        ) -> list[Any]:
            on = device if where == "device" else torch.device("cpu")
            return [
                learner.fit(
                    tables[where][torch.as_tensor(e.support_indices)].to(on),
                    torch.as_tensor(e.support_labels).to(on),
                )
                for e in singles
            ]

        batch_seconds, _ = timed(batched, device, args.repeats)
        single_seconds, heads = timed(one_by_one, device, args.repeats)
        difference = 0.0
        for head, cpu_head, episode in zip(heads, one_by_one("cpu"), singles, strict=True):
            query = torch.as_tensor(episode.query_indices)
            logits = head.logits(tables["device"][query].to(device)).float().cpu()
            cpu_logits = cpu_head.logits(tables["cpu"][query]).float()
            difference = max(difference, float((logits - cpu_logits).abs().max()))
        steps = learner.hyperparameters.get("steps", 0)
        flops = [
            head_flops(method, len(e.support_indices), int(e.support_labels.max()) + 1, steps)
            for e in timed_episodes
        ]
        flop = None if None in flops else sum(flops)
        row = {
            "method": method,
            "episodes_batched": len(timed_episodes),
            "seconds_per_episode_batched": batch_seconds / len(timed_episodes),
            "episodes_one_by_one": len(singles),
            "seconds_per_episode_one_by_one": single_seconds / len(singles),
            "max_abs_logit_diff_vs_cpu": difference,
            "gflops_per_s_batched": None if flop is None else flop / batch_seconds / 1e9,
        }
        if method == "copa":
            row["projected_meta_dataset_seconds"] = row["seconds_per_episode_batched"] * META_DATASET_EPISODES
        rows.append(row)
    return rows


def extraction_rows(device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s of a forward pass at the model's input size, per model and precision and memory format."""
    from hf_copa import SMALL_RESNET, CopaConfig, CopaModel
    from hf_copa.pretrained import load_model

    models = {
        "default": load_model(),
        "copa-mdl-small": load_model(SMALL_RESNET),
        "url-resnet18": CopaModel(CopaConfig()).eval(),
    }
    rows = []
    for name, model in models.items():
        model = model.to(device)
        side = model.config.image_size
        pixels = torch.rand(args.extraction_images, 3, side, side, device=device) * 2 - 1
        for precision in ("float32", "bf16"):
            if precision == "bf16" and device.type != "cuda":
                continue
            for channels_last in (False, True):
                batch = pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels

                def run(batch: torch.Tensor = batch, precision: str = precision, model=model) -> None:
                    with (
                        torch.no_grad(),
                        torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"),
                    ):
                        for start in range(0, len(batch), args.extraction_batch):
                            model(batch[start : start + args.extraction_batch])

                seconds, _ = timed(run, device, args.repeats)
                rows.append(
                    {
                        "model": name,
                        "image_size": side,
                        "precision": precision,
                        "channels_last": channels_last,
                        "batch": args.extraction_batch,
                        "images_per_s": args.extraction_images / seconds,
                    }
                )
        model.to("cpu")
    return rows


def tsa_row(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """TSA on one 5-way 5-shot episode of generated images on the small bundled ResNet-18 (TSA needs a
    ResNet: the default EfficientNet-Lite refuses it), on `device`."""
    from hf_copa.adaptation import adapt_to_task
    from hf_copa.bundled import SMALL_RESNET
    from hf_copa.frozen import frozen_backbone
    from hf_copa.learners import get_learner
    from hf_copa.pretrained import load_model

    model = load_model(SMALL_RESNET)
    side = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(25, 3, side, side, generator=generator) * 2 - 1
    labels = torch.arange(5).repeat_interleave(5)

    def run() -> Any:
        with frozen_backbone(model, device):
            return adapt_to_task(
                model, labels, get_learner("tsa", steps=args.tsa_steps), support_images=support
            )

    seconds, _ = timed(run, device, args.repeats)
    return {"method": "tsa", "way": 5, "shots": 5, "steps": args.tsa_steps, "seconds_per_episode": seconds}


def markdown(report: dict[str, Any]) -> str:
    device = report["device"]
    lines = [f"device: {device['name']} ({device['type']}), torch {report['torch']}"]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in report["matmul_peak_gflops"].items())
    lines += [f"matmul peak GFLOP/s: {peaks}", ""]
    header = (
        "| method | s/ep batched | s/ep one by one | GFLOP/s batched | % fp32 peak | max abs dlogit vs CPU |"
    )
    lines += [header, "|---|---|---|---|---|---|"]
    peak = report["matmul_peak_gflops"]["float32"]
    for r in report["learners"]:
        rate = r["gflops_per_s_batched"]
        shown = "n/a | n/a" if rate is None else f"{rate:.0f} | {100 * rate / peak:.0f}%"
        batched, single = r["seconds_per_episode_batched"], r["seconds_per_episode_one_by_one"]
        diff = r["max_abs_logit_diff_vs_cpu"]
        lines.append(f"| {r['method']} | {batched:.4f} | {single:.4f} | {shown} | {diff:.1e} |")
    copa = next((r for r in report["learners"] if r["method"] == "copa"), None)
    if copa:
        projected = copa["projected_meta_dataset_seconds"]
        lines.append(
            f"\ncopa, 13 x 600 Meta-Dataset episodes projected from the batched rate: {projected:.0f} s"
        )
    lines += ["", "| model | px | precision | channels-last | images/s |", "|---|---|---|---|---|"]
    for r in report["extraction"]:
        cells = (r["model"], r["image_size"], r["precision"], r["channels_last"], f"{r['images_per_s']:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    tsa = report["tsa"]
    setting = f"{tsa['way']}-way {tsa['shots']}-shot, {tsa['steps']} steps"
    lines.append(f"\ntsa ({setting}): {tsa['seconds_per_episode']:.2f} s per episode")
    lines.append(f"processes: {report['processes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--protocol", default="meta-dataset", help="the episodes' protocol (hf-copa's names)")
    parser.add_argument("--episodes", type=int, default=64, help="episodes timed batched")
    parser.add_argument("--single-episodes", type=int, default=16, help="of those, timed one by one")
    parser.add_argument("--max-support", type=int, default=500, help="largest support set drawn")
    parser.add_argument("--maps-episodes", type=int, default=4, help="episodes for learners on feature maps")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per figure (median) after a warm-up"
    )
    parser.add_argument("--extraction-images", type=int, default=4096)
    parser.add_argument("--extraction-batch", type=int, default=256)
    parser.add_argument("--tsa-steps", type=int, default=40)
    parser.add_argument("--peak-size", type=int, default=8192, help="side of the square matmul for the peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    add_quick_flag(parser, "4 5-way 1-shot episodes (1 on maps), one repeat, 16 images, 2 TSA steps")
    args = parse_quick(parser, argv, QUICK_DEFAULTS)
    for name in (
        "episodes",
        "single_episodes",
        "max_support",
        "repeats",
        "extraction_images",
        "extraction_batch",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu for the CPU figures.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    episodes, features = generated_episodes(args.protocol, args.episodes, args.max_support, args.seed)
    args.single_episodes = min(args.single_episodes, len(episodes))
    report: dict[str, Any] = {
        "quick": args.quick,
        "torch": torch.__version__,
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
        },
        "matmul_peak_gflops": matmul_peaks(device, args.peak_size, args.repeats),
        "protocol": args.protocol,
        "episode_support_sizes": [len(e.support_indices) for e in episodes],
        "learners": learner_rows(episodes, features, device, args),
        "extraction": extraction_rows(device, args),
        "tsa": tsa_row(device, args),
        # Two processes on one card share it (contention, not scaling); several cards: accelerate launch.
        "processes": "not measured: one device"
        if device.type != "cuda" or torch.cuda.device_count() < 2
        else "see README: accelerate launch --num_processes N -m hf_copa.cli evaluate",
    }
    report["seconds_total"] = time.perf_counter() - started
    print(markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
