"""Time hf_copa's head-only learners on the reference episode shapes, against an official-style CoPA.

Each row is one (method, episode): the median wall time of adapting to the
support set and scoring the query set, the matrix-multiply throughput that
time implies (FLOPs counted analytically where the method is a few matmuls a
step, so rows of one episode share a count and their GFLOP/s ratio is the
speed-up), and the largest difference from the official code's query logits
where the reference has them (CoPA and URL; the other methods are held to
their transcriptions by tests/test_one_backbone_methods.py). copa-transformer
needs the maps before pooling, which the reference does not hold: it gets
512 x 6 x 6 maps (URL's ResNet-18 at 84 pixels) made from the same features.

    python scripts/benchmark_adaptation.py --repeats 5 --json runs/bench.json
    python scripts/benchmark_adaptation.py --quick --json runs/bench.json   # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the baseline is in tests/support: run from anywhere, no PYTHONPATH

from hf_copa.learners import get_learner  # noqa: E402
from tests.support.official import official_copa  # noqa: E402

FEATURE_DIM = 512
BASELINE = "copa (official-style)"
# (way, shots per class, queries per class) of the six reference episodes.
EPISODE_SHAPES: list[tuple[int, list[int], int]] = [
    (5, [1] * 5, 10),
    (5, [5] * 5, 10),
    (10, [1, 13, 2, 9, 5, 7, 3, 6, 4, 3], 5),
    (20, [3] * 20, 10),
    (37, [7] * 37, 4),
    (50, [10] * 50, 10),
]
# method -> its preset (the papers' setting for an unseen source)
PRESETS: dict[str, str] = {
    "copa": "default",
    "url": "unseen",
    "finetune": "default",
    "proto-maml": "all",
    "mahalanobis": "default",
    "copa-transformer": "default",
}
# method -> (reference file, key suffix of its query logits)
REFERENCES: dict[str, tuple[str, str]] = {
    "copa": ("copa_adaptation.npz", "copa_default_query_logits"),
    "url": ("url_pa_adaptation.npz", "url_unseen_query_logits"),
}
MAP_SIDE = 6  # URL's ResNet-18 at 84 pixels: 512 x 6 x 6 before pooling
CHAOTIC = {("url", 4), ("url", 5)}  # URL at lr 1.0 diverges from the reference on these; expected
# --quick: the smallest episode, one timed run each, and a one-size matmul peak.
QUICK_DEFAULTS = {"episodes": [0], "repeats": 1}
QUICK_PEAK = {"sizes": (256,), "repeats": 1}


@dataclass
class Episode:
    index: int
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    reference_logits: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def way(self) -> int:
        return int(self.support_labels.max()) + 1


@dataclass
class Row:
    method: str
    episode: int
    way: int
    support: int
    query: int
    steps: int
    ms_per_episode: float
    gflop: float | None
    gflops_per_s: float | None
    max_abs_logit_diff: float | None
    speedup_vs_official_style: float | None = None


def load_episodes(reference_dir: Path, indices: list[int], seed: int) -> tuple[list[Episode], str]:
    """The reference episodes with their official logits, or seeded random ones of the same shapes."""
    files = {name: reference_dir / name for name, _ in REFERENCES.values()}
    present = {name: np.load(path) for name, path in files.items() if path.is_file()}
    if not present:
        return [_random_episode(i, seed) for i in indices], (
            f"reference files not found in {reference_dir}: random non-negative episodes "
            f"of the reference shapes (seed {seed}), no logit check"
        )
    copa_file = REFERENCES["copa"][0]
    source = present[copa_file] if copa_file in present else next(iter(present.values()))
    episodes = []
    for i in indices:
        episode = Episode(
            i,
            torch.from_numpy(source[f"ep{i}_support"]),
            torch.from_numpy(source[f"ep{i}_support_labels"]),
            torch.from_numpy(source[f"ep{i}_query"]),
            torch.from_numpy(source[f"ep{i}_query_labels"]),
        )
        for method, (name, suffix) in REFERENCES.items():
            archive = present.get(name)
            # A reference counts only if it was computed on these very features.
            if archive is not None and np.array_equal(archive[f"ep{i}_support"], source[f"ep{i}_support"]):
                episode.reference_logits[method] = torch.from_numpy(archive[f"ep{i}_{suffix}"])
        episodes.append(episode)
    return episodes, f"reference episodes from {reference_dir} ({', '.join(sorted(present))})"


def _random_episode(index: int, seed: int) -> Episode:
    """Class-clustered non-negative features, like post-ReLU pooled backbone features."""
    way, shots, queries = EPISODE_SHAPES[index]
    generator = torch.Generator().manual_seed(seed * 1000 + index)
    centres = torch.rand(way, FEATURE_DIM, generator=generator)

    def draw(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.repeat_interleave(torch.arange(way), torch.tensor(counts))
        noise = 0.3 * torch.randn(len(labels), FEATURE_DIM, generator=generator)
        return (centres[labels] + noise).clamp_min(0.0), labels

    support, support_labels = draw(shots)
    query, query_labels = draw([queries] * way)
    return Episode(index, support, support_labels, query, query_labels)


def copa_flops(support: int, way: int, steps: int, dim: int = FEATURE_DIM) -> float:
    """Per step: N x d x d forward and d x N x d gradient on Theta_I, the same with C rows on
    Theta_P, and three N x C x d score products (forward, dL/du, dL/dz_P); 2 FLOPs per multiply-add."""
    per_step = 2 * support * dim * dim + 2 * way * dim * dim + 3 * support * way * dim
    return 2.0 * per_step * steps


def url_flops(support: int, steps: int, dim: int = FEATURE_DIM) -> float:
    """Per step: the N x d x d forward product and its d x N x d gradient; 2 FLOPs per multiply-add."""
    return 2.0 * 2 * support * dim * dim * steps


def linear_flops(support: int, way: int, steps: int, dim: int = FEATURE_DIM) -> float:
    """finetune / proto-maml, per step: the N x d x C logits and their d x N x C weight gradient."""
    return 2.0 * 2 * support * dim * way * steps


def transformer_flops(support: int, way: int, steps: int, dim: int = FEATURE_DIM) -> float:
    """copa-transformer (one block), per step: N image and C class-mean maps of L = 1 + 6 * 6 tokens, each
    through 4 d x d maps (query, key, value, output) and attention (L x L scores and their use); the backward
    pass counted as twice the forward."""
    tokens = 1 + MAP_SIDE * MAP_SIDE
    forward = (support + way) * (2 * 4 * tokens * dim * dim + 2 * 2 * tokens * tokens * dim)
    return 3.0 * forward * steps


def head_flops(method: str, support: int, way: int, steps: int) -> float | None:
    """The analytic matmul FLOPs of one adaptation, or None for mahalanobis (C covariance inversions,
    not a few matmuls a step)."""
    if method in ("copa", BASELINE):
        return copa_flops(support, way, steps)
    if method == "url":
        return url_flops(support, steps)
    if method in ("finetune", "proto-maml"):
        return linear_flops(support, way, steps)
    if method == "copa-transformer":
        return transformer_flops(support, way, steps)
    return None


def feature_maps(features: torch.Tensor, seed: int) -> torch.Tensor:
    """[N, d, 6, 6] non-negative maps whose spatial mean is `features` [N, d]: the pooled feature spread
    over the map positions by seeded noise, as a map before global average pooling is."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(*features.shape, MAP_SIDE, MAP_SIDE, generator=generator, dtype=features.dtype)
    weights = weights / weights.mean(dim=(-2, -1), keepdim=True)
    return features[:, :, None, None] * weights


def matmul_peak(sizes: tuple[int, ...] = (256, 512, 1024, 2048), repeats: int = 3) -> tuple[float, str]:
    """Best float32 torch.mm GFLOP/s over square sizes and the largest episode's 500 x 512 x 512 shape."""
    shapes = [(n, n, n) for n in sizes] + [(500, FEATURE_DIM, FEATURE_DIM)]
    best, best_shape = 0.0, ""
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up
        inner = max(1, int(2e8 // (m * k * n)))  # enough products per timing to dwarf the timer
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b)
            gflops = 2.0 * m * k * n * inner / (time.perf_counter() - start) / 1e9
            if gflops > best:
                best, best_shape = gflops, f"{m}x{k}x{n}"
    return best, best_shape


def median_ms(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall time of `run` after one warm-up call, and its last output."""
    logits = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), logits


def benchmark_episode(method: str, episode: Episode, repeats: int) -> Row:
    """Adapt with `method` (a registered learner, or the official-style baseline) and score the query set."""
    if method == BASELINE:
        hp = get_learner("copa", preset=PRESETS["copa"]).hyperparameters

        def run() -> torch.Tensor:
            logits, _ = official_copa(
                episode.support,
                episode.support_labels,
                episode.query,
                episode.query_labels,
                lr=hp["lr"],
                weight_decay=hp["weight_decay"],
                tau=hp["tau"],
                steps=hp["steps"],
            )
            return logits

        reference_method = "copa"
    else:
        hp = get_learner(method, preset=PRESETS[method]).hyperparameters
        support_features, query_features = episode.support, episode.query
        if get_learner(method).feature_kind == "maps":
            support_features = feature_maps(episode.support, 2 * episode.index)
            query_features = feature_maps(episode.query, 2 * episode.index + 1)

        def run() -> torch.Tensor:
            learner = get_learner(method, preset=PRESETS[method])
            return learner.fit(support_features, episode.support_labels).logits(query_features)

        reference_method = method

    support, way = len(episode.support_labels), episode.way
    steps = hp.get("steps", 0)
    flop = head_flops(method, support, way, steps)
    ms, logits = median_ms(run, repeats)
    reference = episode.reference_logits.get(reference_method)
    diff = None if reference is None else float((logits.detach().float() - reference).abs().max())
    return Row(
        method,
        episode.index,
        way,
        support,
        len(episode.query_labels),
        steps,
        ms,
        None if flop is None else flop / 1e9,
        None if flop is None else flop / (ms * 1e-3) / 1e9,
        diff,
    )


def add_speedups(rows: list[Row]) -> None:
    baseline_ms = {row.episode: row.ms_per_episode for row in rows if row.method == BASELINE}
    for row in rows:
        if row.method == "copa" and row.episode in baseline_ms:
            row.speedup_vs_official_style = baseline_ms[row.episode] / row.ms_per_episode


def markdown_table(rows: list[Row], peak: float) -> str:
    header = (
        "| method | ep | way | support | query | steps | ms / episode | GFLOP/s | % of peak "
        "| speed-up vs official-style | max abs logit diff |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        diff = "n/a" if r.max_abs_logit_diff is None else f"{r.max_abs_logit_diff:.2e}"
        if (r.method, r.episode) in CHAOTIC and r.max_abs_logit_diff is not None:
            diff += " (chaotic)"
        speedup = "" if r.speedup_vs_official_style is None else f"{r.speedup_vs_official_style:.1f}x"
        if r.gflops_per_s is None:
            throughput = "n/a | n/a"
        else:
            throughput = f"{r.gflops_per_s:.1f} | {100 * r.gflops_per_s / peak:.0f}%"
        lines.append(
            f"| {r.method} | {r.episode} | {r.way} | {r.support} | {r.query} | {r.steps} "
            f"| {r.ms_per_episode:.1f} | {throughput} | {speedup} | {diff} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--episodes", nargs="+", type=int, default=list(range(len(EPISODE_SHAPES))))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median) after a warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the official-style CoPA rows")
    parser.add_argument(
        "--reference-dir",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "reference",
        help="folder with copa_adaptation.npz / url_pa_adaptation.npz (random episodes if absent)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random episodes")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    add_quick_flag(
        parser,
        "episode 0, --repeats 1, a one-size matmul peak",
    )
    args = parse_quick(parser, argv, QUICK_DEFAULTS)
    bad = [i for i in args.episodes if not 0 <= i < len(EPISODE_SHAPES)]
    if bad:
        parser.error(f"--episodes must be in 0..{len(EPISODE_SHAPES) - 1}, got {bad}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    episodes, source = load_episodes(args.reference_dir, args.episodes, args.seed)
    peak, peak_shape = matmul_peak(**QUICK_PEAK) if args.quick else matmul_peak()
    cpu = " ".join(filter(None, [platform.machine(), platform.processor()]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu})")
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s (torch.mm {peak_shape})")
    print(f"episodes: {source}")
    print(f"timing: median of {args.repeats} after a warm-up; each run adapts, then scores the query set\n")

    methods = list(dict.fromkeys(args.methods))
    if "copa" in methods and not args.no_baseline:
        methods.insert(methods.index("copa") + 1, BASELINE)
    rows = [benchmark_episode(m, ep, args.repeats) for m in methods for ep in episodes]
    add_speedups(rows)
    print(markdown_table(rows, peak))
    print(
        "\nGFLOP/s counts only the head matmuls (see head_flops; n/a: mahalanobis inverts); the "
        "official-style baseline is credited CoPA's count, though it also builds N x N logits and scores "
        "the query set every step."
    )
    if any((r.method, r.episode) in CHAOTIC and r.max_abs_logit_diff is not None for r in rows):
        print("URL 'unseen' (Adadelta lr 1.0) is chaotic on ep4/ep5: a large logit difference is known.")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "matmul_peak_gflops": peak,
            "matmul_peak_shape": peak_shape,
            "episodes": source,
            "repeats": args.repeats,
            **({"quick": True} if args.quick else {}),  # marks a smoke-test run's file
        }
        args.json.write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
