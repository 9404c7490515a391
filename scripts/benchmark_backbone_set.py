"""What several backbones cost: SUR and URT per episode next to CoPA, the feature cache of B backbones, and
URT's training on 1 and 2 processes (the same figures).

Per episode: the six reference episode shapes (`benchmark_adaptation.EPISODE_SHAPES`, 5 to 50 ways, up to
500 support images) on random features, d = 512: copa on [N, 512] (one backbone), sur and urt on
[N, B, 512] (B = 8 backbones; urt with an untrained layer of the official shape, 2 heads, 1024 hidden:
training does not change its cost), and one step of URT's meta-training on that episode (loss, backward,
Adam). Adaptation and scoring only: extracting features costs B backbone
passes per image instead of one, which the cache pays once per image.

Cache: the bytes an entry takes per row, measured on a real cache entry written by
`hf_copa.features.extract_row_features` (a 512-d backbone), scaled to 1,000,000 rows x B backbones; in
memory, the stacked [rows, B, d] float32 tensor that evaluation holds for a split's rows.

URT training: `hf-copa train-urt` on generated datasets and a set of tiny backbones, run as one process and
as two (torchrun, CPU, gloo) with 2 episodes a step; the losses and the layer must be the same.

    python scripts/benchmark_backbone_set.py --threads 2 --json runs/benchmark_backbone_set.json
    python scripts/benchmark_backbone_set.py --quick --json out.json   # a smoke test: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py
from benchmark_adaptation import EPISODE_SHAPES  # scripts/benchmark_adaptation.py
from safetensors.torch import load_file

import hf_copa
from hf_copa import CopaBackboneSet, CopaConfig, CopaModel
from hf_copa.features import extract_row_features
from hf_copa.learners.urt import URTLayer, save_urt_layer
from hf_copa.training.urt import episode_loss

FEATURE_DIM = 512
ROWS_AT_SCALE = 1_000_000
REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_DEFAULTS = {"episodes": [0], "repeats": 1, "backbones": 3, "cache_rows": 64, "urt_episodes": 4}


def episode_features(way: int, shots: list[int], queries: int, backbones: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(shots)])
    query_labels = torch.arange(way).repeat_interleave(queries)
    support = torch.randn(len(labels), backbones, FEATURE_DIM, generator=generator).relu()
    query = torch.randn(len(query_labels), backbones, FEATURE_DIM, generator=generator).relu()
    return support, labels, query


def seconds_per_episode(fit, repeats: int) -> float:
    fit()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fit()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_episode_rows(args, layer_folder: Path) -> list[dict]:
    rows = []
    head = str(layer_folder)
    for index in args.episodes:
        way, shots, queries = EPISODE_SHAPES[index]
        support, labels, query = episode_features(way, shots, queries, args.backbones, seed=index)
        fits = {
            "copa": lambda s=support, y=labels, q=query: hf_copa.adapt(s[:, 0], y, method="copa").logits(
                q[:, 0]
            ),
            "sur": lambda s=support, y=labels, q=query: hf_copa.adapt(s, y, method="sur").logits(q),
            "urt": lambda s=support, y=labels, q=query: hf_copa.adapt(
                s, y, method="urt", urt_head=head
            ).logits(q),
        }
        layer = URTLayer(args.backbones, FEATURE_DIM)
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-5)
        query_labels = torch.arange(way).repeat_interleave(queries)

        def training_step(s=support, y=labels, q=query, yq=query_labels, net=layer, adam=optimizer):
            adam.zero_grad()
            episode_loss(net, s, y, q, yq, penalty=0.1).backward()
            adam.step()

        fits["urt (training step)"] = training_step
        timings = {method: seconds_per_episode(fit, args.repeats) for method, fit in fits.items()}
        for method, seconds in timings.items():
            rows.append(
                {
                    "episode": index,
                    "way": way,
                    "support": len(labels),
                    "query": len(query),
                    "method": method,
                    "backbones": 1 if method == "copa" else args.backbones,
                    "ms_per_episode": round(1000 * seconds, 2),
                    "vs_copa": round(seconds / timings["copa"], 3),
                }
            )
    return rows


def cache_figures(args, folder: Path) -> dict:
    """Bytes per row of a real cache entry of a 512-d backbone, scaled to a 1M-row source and B backbones."""
    torch.manual_seed(0)
    model = CopaModel(
        CopaConfig(embedding_size=4, hidden_sizes=[4, 8, 16, FEATURE_DIM], image_size=32)
    ).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(args.cache_rows)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [0] * len(images)},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    extract_row_features(model, dataset, np.arange(len(images)), cache_dir=folder, progress=False)
    entry = next(folder.glob("*.safetensors"))
    per_row = entry.stat().st_size / len(images)
    at_scale = per_row * ROWS_AT_SCALE * args.backbones
    memory = ROWS_AT_SCALE * args.backbones * FEATURE_DIM * 4
    return {
        "feature_dim": FEATURE_DIM,
        "rows_measured": len(images),
        "entry_bytes": entry.stat().st_size,
        "bytes_per_row_per_backbone": round(per_row, 1),
        "disk_gb_1m_rows": round(at_scale / 1e9, 2),
        "memory_gb_1m_rows": round(memory / 1e9, 2),
        "backbones": args.backbones,
    }


def urt_training(args, folder: Path) -> dict:
    """`hf-copa train-urt` as 1 and as 2 processes on generated data: seconds and whether the layers agree."""
    rng = np.random.default_rng(1)
    for name, classes in (("first", 12), ("second", 10)):
        images, labels = [], []
        for label in range(classes):
            colour = rng.integers(0, 256, size=3)
            for _ in range(10):
                images.append(np.clip(colour * 0.6 + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8))
                labels.append(label)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        dataset.to_parquet(str(folder / name / "data" / "train-00000-of-00001.parquet"))
    members = []
    for index in range(args.backbones):
        torch.manual_seed(index)
        config = CopaConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], image_size=32)
        members.append((f"backbone{index}", CopaModel(config).eval()))
    CopaBackboneSet(members).save_pretrained(folder / "set")
    command = [
        "train-urt", "--model", str(folder / "set"), "--dataset", str(folder / "first"),
        "--dataset", str(folder / "second"), "--episodes", str(args.urt_episodes), "--episodes-per-step", "2",
        "--protocol", "5-way-1-shot", "--log-every", "2", "--no-progress",
        "--cache-dir", str(folder / "cache"),
        "--threads", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    runs = {}
    for processes in (1, 2):
        launcher = (
            [sys.executable, "-m", "hf_copa.cli"]
            if processes == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            + ["-m", "hf_copa.cli"]
        )
        output = folder / f"urt-{processes}"
        started = time.perf_counter()
        subprocess.run(
            [*launcher, *command, "--output", str(output)], env=env, check=True, capture_output=True
        )
        log = json.loads((output / "urt_training_log.json").read_text())
        runs[processes] = {
            "wall_s": round(time.perf_counter() - started, 2),
            "training_s": log["seconds"],
            "losses": [row["loss"] for row in log["history"]],
            "layer": load_file(output / "urt_layer.safetensors"),
        }
    difference = max(
        float((runs[1]["layer"][name] - runs[2]["layer"][name]).abs().max()) for name in runs[1]["layer"]
    )
    return {
        "episodes": args.urt_episodes,
        "episodes_per_step": 2,
        "processes": {str(p): {k: v for k, v in run.items() if k != "layer"} for p, run in runs.items()},
        "max_abs_layer_difference": difference,
        "same_losses": bool(np.allclose(runs[1]["losses"], runs[2]["losses"], rtol=1e-5, atol=1e-6)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, nargs="+", default=list(range(len(EPISODE_SHAPES))))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", type=int, default=8)
    parser.add_argument("--cache-rows", type=int, default=1024)
    parser.add_argument("--urt-episodes", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (stated in the output)")
    parser.add_argument("--json", default=None)
    add_quick_flag(parser, "one episode, one timed run, 3 backbones, 64 cached rows, 4 URT episodes")
    args = parse_quick(parser, argv, QUICK_DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="backbone-set-") as tmp:
        tmp = Path(tmp)
        save_urt_layer(URTLayer(args.backbones, FEATURE_DIM), tmp / "layer", {"backbones": []}, {})
        rows = per_episode_rows(args, tmp / "layer")
        cache = cache_figures(args, tmp / "cache")
        urt = urt_training(args, tmp / "urt")
    machine = {
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(f"threads: {machine['threads']}")
    print(
        "| episode | way | support | method | backbones | ms/episode | x copa |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['episode']} | {r['way']} | {r['support']} | {r['method']} | {r['backbones']} | "
            f"{r['ms_per_episode']} | {r['vs_copa']} |"
        )
    print(
        f"cache: {cache['bytes_per_row_per_backbone']} bytes/row/backbone -> {cache['disk_gb_1m_rows']} GB "
        f"on disk, {cache['memory_gb_1m_rows']} GB in memory for {ROWS_AT_SCALE:,} rows x "
        f"{cache['backbones']} backbones"
    )
    for processes, run in urt["processes"].items():
        print(f"train-urt, {processes} process(es): {run['training_s']} s training, {run['wall_s']} s wall")
    print(f"same losses: {urt['same_losses']}, max |layer difference| {urt['max_abs_layer_difference']:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"machine": machine, "rows": rows, "cache": cache, "urt_training": urt}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
