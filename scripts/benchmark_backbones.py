"""Backbones side by side: the default (EfficientNet-Lite0), the old default (copa-mdl-small) and a converted
URL-layout ResNet-18, on the six shared datasets: accuracy, adaptation time and extraction speed.

    python scripts/benchmark_backbones.py --efficientnet-sizes 84 128 160 224 \
        --json runs/benchmark_backbones.json                      # the README table (hours: see below)
    python scripts/benchmark_backbones.py --json runs/benchmark_backbones.json   # 128 px only: ~1/3 of that
    python scripts/benchmark_backbones.py --backbones efficientnet-lite0 --datasets mnist --episodes 20
    python scripts/benchmark_backbones.py --quick --json out.json   # a smoke test: ~40 s on one thread

The README's table "the default vs the old default vs converted URL-layout networks on the six shared
datasets" comes from the first command above, exactly as written, on the 2-core CPU with nothing else
running (every other flag at its default: --threads 2, --episodes 100, --seed 0, --protocol 5-way-5-shot
meta-dataset, --method ncc url copa, the README evaluation's presets as overrides). Each backbone embeds
about 53,000 rows (the rows 100 episodes of both protocols touch on the six test splits), and CoPA's and
URL's heads on EfficientNet's 1280-d features take about a second per episode: estimated from the quick run,
roughly 3 h in all (about 1 h without the three extra sizes). Its JSON records the command and the machine.
Two threads on two cores shared with another job run many times slower (OpenMP), so time it on a quiet CPU.

Backbones (`--backbones`, in this order):
- `efficientnet-lite0`: the packaged EfficientNet-Lite0 ImageNet weights
  (`hf_copa.bundled.packaged_checkpoint`) at each `--efficientnet-sizes` input size; 128 px is
  `hf_copa.DEFAULT_MODEL` itself, any other size is converted by
  `convert_efficientnet_lite_checkpoint(..., image_size=SIZE)` into a temporary folder (under `--cache-dir`
  when one is given, so that its cached features are found again).
- `copa-mdl-small`: `hf_copa.bundled.SMALL_RESNET`, the old default (half-width ResNet-18, 64 px).
- `url-reference`: `--url-checkpoint` (default ../shared/reference/url_checkpoint.pth.tar.xz) converted by
  `hf_copa.conversion.convert_url_checkpoint` (likewise). That file is laid out like URL's released
  checkpoint but holds coarse RANDOM weights: its accuracies are a stand-in for a converted URL network's,
  not URL's results (its speed figures are real). The table says so.

For each backbone, dataset, protocol and method: mean accuracy (%) with its 95% CI over `--episodes` episodes
(`hf_copa.evaluation.summarise`, as `hf-copa evaluate` reports it), and the learner's seconds per episode on
cached features (`hf_copa.evaluation.adapt_and_score` over `hf_copa.batching.episode_chunks`, as `evaluate`
adapts them: fitting the heads on the support set and scoring the queries, chunks of up to 8 episodes; the
features are extracted, and each method called once, before the clock starts). Episodes are drawn once per
dataset and protocol from the labels alone (`hf_copa.episodes.make_sampler`, episode i from (seed, i)), so
every backbone sees the same episodes; on the meta-dataset protocol the accuracies are `hf_copa.evaluate`'s.
Each dataset row the episodes touch is embedded once per backbone (`hf_copa.features.extract_row_features`,
into a feature cache in a temporary folder, or `--cache-dir`). Per backbone, extraction speed:
`extract_dataset_features` on the first `--speed-images` images of the first dataset (decoding,
preprocessing and the backbone; no cache), after an 8-image warm-up.

Protocols: any name `hf_copa.episodes` knows (meta-dataset, varying-way-5-shot, 5-way-1-shot), and
`N-way-K-shot` for the others (hf_copa has no `5-way-5-shot` protocol), which is
`make_sampler("fixed", num_ways=N, num_support=K, num_query=--num-query)`, 15 queries per class by default;
the JSON records every protocol's fields.

Hyperparameters: each learner's defaults, the backbone config's `adaptation` entries and `--override
[DOMAIN:]METHOD:KEY=VALUE` (`hf_copa.evaluation.hyperparameters_for`). The default overrides are the README
evaluation's presets (URL's `seen` on omniglot and tiny_imagenet, CoPA's `high-lr` on mnist);
`--override` with no value runs without them. An override naming a dataset that is not in the run is skipped.

Output: the Markdown tables on stdout (accuracy: rows backbone x dataset, columns protocol x method; cost:
extraction images/s and milliseconds per episode averaged over the datasets), and with `--json PATH` every
figure, per dataset, plus the machine (threads, torch version, CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _quick import add_quick_flag, parse_quick  # scripts/_quick.py

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
DATASETS = ("omniglot", "tiny_imagenet", "mnist", "fashion_mnist", "cifar10", "quickdraw")
BACKBONES = ("efficientnet-lite0", "copa-mdl-small", "url-reference")
METHODS = ("ncc", "url", "copa")
PROTOCOLS = ("5-way-5-shot", "meta-dataset")
# The README evaluation's presets (the "Evaluation" of "The default model").
DEFAULT_OVERRIDES = ("omniglot:url:preset=seen", "tiny_imagenet:url:preset=seen", "mnist:copa:preset=high-lr")
WARM_UP_IMAGES = 8
FIXED_PROTOCOL = re.compile(r"^(\d+)-way-(\d+)-shot$")
STAND_IN_NOTE = (
    "coarse RANDOM weights laid out like URL's checkpoint (the only URL-layout checkpoint available): its "
    "accuracies are a stand-in for a converted URL network's, not URL's results; its speed figures are real"
)
QUICK_IMAGES = 300
QUICK_DEFAULTS = {
    "datasets": ["mnist", "quickdraw"],
    "max_images": QUICK_IMAGES,
    "episodes": 3,
    "efficientnet_sizes": [84],
    "backbones": ["efficientnet-lite0", "url-reference"],
    "speed_images": 32,
}


@dataclasses.dataclass
class Backbone:
    name: str  # the table's label
    source: str  # what it was loaded or converted from
    kind: str
    stand_in: bool = False


def resolve_protocol(name: str, num_query: int) -> tuple[str, dict[str, int]]:
    """(the `make_sampler` protocol, its options) of a protocol name of `hf_copa.episodes` or N-way-K-shot."""
    from hf_copa.episodes import canonical_protocol

    try:
        return canonical_protocol(name), {}
    except ValueError:
        match = FIXED_PROTOCOL.match(name)
        if match is None:
            raise
        ways, shots = map(int, match.groups())
        return "fixed", {"num_ways": ways, "num_support": shots, "num_query": num_query}


def stratified_rows(labels: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` rows, the same number from each class as far as they go (each class's first rows,
    taken round-robin), sorted: a subset that still holds every class (some splits are sorted by label)."""
    per_class = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    order = [rows[i] for i in range(max(map(len, per_class))) for rows in per_class if i < len(rows)]
    return np.sort(np.asarray(order[:limit], dtype=np.int64))


def load_backbone(backbone: Backbone, size: int | None, folder: Path) -> Any:
    from hf_copa import DEFAULT_MODEL, load_model
    from hf_copa.bundled import packaged_checkpoint
    from hf_copa.configuration_efficientnet_lite import DEFAULT_IMAGE_SIZE
    from hf_copa.conversion import convert_efficientnet_lite_checkpoint, convert_url_checkpoint

    if backbone.kind == "efficientnet-lite0":
        if size == DEFAULT_IMAGE_SIZE:
            return load_model(DEFAULT_MODEL)
        convert_efficientnet_lite_checkpoint(
            packaged_checkpoint("lite0"), folder, image_size=size, overwrite=True
        )
        return load_model(folder)
    if backbone.kind == "url-reference":
        convert_url_checkpoint(backbone.source, folder, overwrite=True)
        return load_model(folder)
    return load_model(backbone.source)


def images_per_second(model: Any, dataset: Any, count: int) -> dict[str, float | int]:
    from hf_copa.features import extract_dataset_features

    subset = dataset.select(range(min(count, len(dataset))))
    extract_dataset_features(model, subset.select(range(min(WARM_UP_IMAGES, len(subset)))), progress=False)
    started = time.perf_counter()
    extract_dataset_features(model, subset, progress=False)
    seconds = time.perf_counter() - started
    return {"images": len(subset), "seconds": seconds, "images_per_s": len(subset) / seconds}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cell(result: dict[str, float]) -> str:
    return f"{result['mean']:.2f} ± {result['ci95']:.2f}"


def tables(figures: dict[str, Any]) -> str:
    settings = figures["settings"]
    protocols, methods, names = settings["protocols"], settings["methods"], list(settings["datasets"])
    columns = [(p, m) for p in protocols for m in methods]
    header = "| backbone | dataset | " + " | ".join(f"{p} {m}" for p, m in columns) + " |"
    lines = [header, "|---|---|" + "---|" * len(columns)]
    for name, backbone in figures["backbones"].items():
        shown = f"{name} *" if backbone["stand_in"] else name
        for dataset in names:
            per_protocol = backbone["datasets"][dataset]["protocols"]
            cells = [cell(per_protocol[p][m]) for p, m in columns]
            lines.append(f"| {shown} | {dataset} | " + " | ".join(cells) + " |")
        if len(names) > 1:
            cells = [f"{backbone['average'][p][m]:.2f}" for p, m in columns]
            lines.append(f"| {shown} | **average** | " + " | ".join(cells) + " |")
    if any(b["stand_in"] for b in figures["backbones"].values()):
        lines += ["", f"\\* {STAND_IN_NOTE}."]
    lines += [
        "",
        f"Mean accuracy (%) ± 95% CI over {settings['episodes']} episodes (seed {settings['seed']}), the "
        f"same episodes for every backbone; torch threads: {figures['machine']['threads']}.",
        "",
        "| backbone | input | feature dim | parameters | extraction images/s | "
        + " | ".join(f"{p} {m} ms/episode" for p, m in columns)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for name, backbone in figures["backbones"].items():
        ms = [f"{1000 * backbone['adapt_s_per_episode'][p][m]:.1f}" for p, m in columns]
        lines.append(
            f"| {name} | {backbone['image_size']} px | {backbone['feature_dim']} | "
            f"{backbone['parameters'] / 1e6:.2f} M | {backbone['extraction']['images_per_s']:.1f} | "
            + " | ".join(ms)
            + " |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument(
        "--efficientnet-sizes",
        nargs="+",
        type=int,
        default=[128],
        help="EfficientNet-Lite0 input sizes (128: the default model; others converted; default: 128)",
    )
    parser.add_argument(
        "--url-checkpoint", default=str(SHARED_DIR / "reference" / "url_checkpoint.pth.tar.xz")
    )
    parser.add_argument("--data-root", default=str(SHARED_DIR / "datasets"))
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), help="names under --data-root, or paths"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="use at most this many rows per dataset, as many per class as possible (default: all)",
    )
    parser.add_argument("--protocol", nargs="+", default=list(PROTOCOLS))
    parser.add_argument("--num-query", type=int, default=15, help="queries per class of N-way-K-shot")
    parser.add_argument("--method", nargs="+", default=list(METHODS))
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--override",
        nargs="*",
        default=list(DEFAULT_OVERRIDES),
        help="[DOMAIN:]METHOD:KEY=VALUE (default: the README evaluation's presets; none given: no override)",
    )
    parser.add_argument("--speed-images", type=int, default=256, help="images timed per backbone")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument(
        "--cache-dir", default=None, help="feature cache (and converted backbones); default: a temporary one"
    )
    parser.add_argument("--json", default=None, help="also write every figure here")
    add_quick_flag(
        parser,
        f"mnist and quickdraw, {QUICK_IMAGES} images each, --episodes 3, EfficientNet-Lite0 at 84 px and the "
        "URL-layout checkpoint",
    )
    args = parse_quick(parser, argv, QUICK_DEFAULTS)
    for flag in ("threads", "episodes", "speed_images", "num_query"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads)

    from hf_copa.learners import learner_class

    for method in args.method:
        learner = learner_class(method)
        if learner.needs_backbone or learner.feature_kind != "pooled":
            parser.error(f"--method {method}: only learners on pooled cached features are benchmarked here")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    if "url-reference" in args.backbones and not Path(args.url_checkpoint).is_file():
        parser.error(f"--url-checkpoint {args.url_checkpoint} not found")
    protocols = {name: resolve_protocol(name, args.num_query) for name in args.protocol}
    domains = evaluation_domains(args.datasets, args.data_root, args.split)
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        parser.error(f"two datasets share a name: {names}")
    global_overrides, applied = apply_overrides(args.override, domains, args.method)

    started = time.perf_counter()
    splits, episodes = draw_episodes(domains, protocols, args)
    figures: dict[str, Any] = {
        "machine": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "quick": bool(args.quick),
        },
        "settings": settings(args, argv, protocols, domains, splits, applied),
        "backbones": {},
    }
    with tempfile.TemporaryDirectory(prefix="benchmark_backbones.") as scratch:
        work = Path(args.cache_dir) if args.cache_dir else Path(scratch)
        for backbone, size in backbone_list(args):
            folder = work / "converted" / re.sub(r"[^a-z0-9]+", "-", backbone.name.lower()).strip("-")
            model = load_backbone(backbone, size, folder)
            figures["backbones"][backbone.name] = benchmark_backbone(
                backbone, model, domains, splits, episodes, args, global_overrides, work / "features"
            )
            del model
    figures["total_s"] = time.perf_counter() - started
    figures["table"] = tables(figures)
    print(figures["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def evaluation_domains(specs: list[str], data_root: str, split: str) -> list[Any]:
    """`hf_copa.evaluation.Domain`s: each spec a folder, or a name under `data_root`."""
    from hf_copa.evaluation import Domain

    paths = [Path(spec) if Path(spec).is_dir() else Path(data_root) / spec for spec in specs]
    return [Domain(name=path.name, path=str(path), split=split) for path in paths]


def apply_overrides(
    texts: list[str], domains: list[Any], methods: list[str]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The global overrides (the per-domain ones go into the domains) and the overrides applied: those for a
    method of the run, on all datasets or on one of the run's."""
    from hf_copa.evaluation import parse_override

    by_name = {d.name: d for d in domains}
    global_overrides: dict[str, dict[str, Any]] = {}
    applied = []
    for text in texts:
        domain_name, method, key, value = parse_override(text)
        if method not in methods or (domain_name is not None and domain_name not in by_name):
            continue
        target = global_overrides if domain_name is None else by_name[domain_name].overrides
        target.setdefault(method, {})[key] = value
        applied.append(text)
    return global_overrides, applied


def draw_episodes(
    domains: list[Any], protocols: dict[str, tuple[str, dict[str, int]]], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[tuple[str, str], list[Any]]]:
    """(dataset name -> split, (dataset name, protocol) -> episodes), from the labels alone: the same
    episodes for every backbone."""
    from hf_copa.episodes import make_sampler
    from hf_copa.splits import load_split

    splits, episodes = {}, {}
    for domain in domains:
        dataset = load_split(domain.path, domain.split)
        if args.max_images is not None and args.max_images < len(dataset):
            dataset = dataset.select(stratified_rows(np.asarray(dataset["label"]), args.max_images))
        splits[domain.name] = dataset
        for protocol, (sampler_protocol, options) in protocols.items():
            sampler = make_sampler(
                sampler_protocol, dataset, seed=args.seed, num_episodes=args.episodes, **options
            )
            episodes[domain.name, protocol] = [sampler.episode(i) for i in range(args.episodes)]
    return splits, episodes


def settings(
    args: argparse.Namespace,
    argv: list[str] | None,
    protocols: dict[str, tuple[str, dict[str, int]]],
    domains: list[Any],
    splits: dict[str, Any],
    applied: list[str],
) -> dict[str, Any]:
    from hf_copa.episodes import get_protocol

    return {
        "command": " ".join(
            ["python", "scripts/benchmark_backbones.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "episodes": args.episodes,
        "seed": args.seed,
        "methods": list(args.method),
        "protocols": {
            name: {"sampler": p, **dataclasses.asdict(get_protocol(p, **options))}
            for name, (p, options) in protocols.items()
        },
        "datasets": {
            d.name: {"path": d.path, "split": d.split, "rows": len(splits[d.name])} for d in domains
        },
        "max_images": args.max_images,
        "overrides": applied,
        "speed": {"dataset": domains[0].name, "images": args.speed_images, "warm_up": WARM_UP_IMAGES},
    }


def backbone_list(args: argparse.Namespace) -> list[tuple[Backbone, int | None]]:
    """The backbones to run, each with its EfficientNet input size (None for the others)."""
    from hf_copa.bundled import SMALL_RESNET, packaged_checkpoint
    from hf_copa.configuration_efficientnet_lite import DEFAULT_IMAGE_SIZE

    backbones: list[tuple[Backbone, int | None]] = []
    for kind in dict.fromkeys(args.backbones):
        if kind == "efficientnet-lite0":
            for size in dict.fromkeys(args.efficientnet_sizes):
                label = f"efficientnet-lite0 {size}px" + (" (default)" if size == DEFAULT_IMAGE_SIZE else "")
                backbones.append((Backbone(label, str(packaged_checkpoint("lite0")), kind), size))
        elif kind == "copa-mdl-small":
            backbones.append((Backbone("copa-mdl-small (old default)", SMALL_RESNET, kind), None))
        else:
            label = "url-resnet18 (random weights)"
            backbones.append((Backbone(label, args.url_checkpoint, kind, stand_in=True), None))
    return backbones


def benchmark_backbone(
    backbone: Backbone,
    model: Any,
    domains: list[Any],
    splits: dict[str, Any],
    episodes: dict[tuple[str, str], list[Any]],
    args: argparse.Namespace,
    global_overrides: dict[str, dict[str, Any]],
    cache_dir: Path,
) -> dict[str, Any]:
    """Every figure of one backbone: its shape, extraction speed and, per dataset, protocol and method, the
    accuracy and the learner's seconds per episode."""
    from hf_copa.batching import episode_chunks
    from hf_copa.evaluation import adapt_and_score, hyperparameters_for, rows_used, summarise
    from hf_copa.features import extract_row_features

    first = splits[domains[0].name]
    probe = extract_row_features(model, first, [0], progress=False).features
    entry: dict[str, Any] = {
        "kind": backbone.kind,
        "source": backbone.source,
        "stand_in": backbone.stand_in,
        **({"note": STAND_IN_NOTE} if backbone.stand_in else {}),
        "model_class": type(model).__name__,
        "image_size": getattr(model.config, "image_size", None),
        "feature_dim": int(probe.shape[1]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "extraction": images_per_second(model, first, args.speed_images),
        "datasets": {},
    }
    log(f"{backbone.name}: {entry['extraction']['images_per_s']:.1f} images/s")
    warmed: set[str] = set()
    protocols = args.protocol
    for domain in domains:
        dataset = splits[domain.name]
        touched = rows_used([e for p in protocols for e in episodes[domain.name, p]])
        started = time.perf_counter()
        features = extract_row_features(model, dataset, touched, cache_dir=cache_dir, progress=False)
        per_dataset: dict[str, Any] = {
            "rows_embedded": len(touched),
            "embedding_s": time.perf_counter() - started,
            "hyperparameters": {
                m: hyperparameters_for(model.config, domain, m, global_overrides) for m in args.method
            },
            "protocols": {},
        }
        log(f"{backbone.name} / {domain.name}: {len(touched)} rows in {per_dataset['embedding_s']:.1f} s")
        for protocol in protocols:
            drawn = episodes[domain.name, protocol]
            chunks = episode_chunks(drawn)
            accuracies, seconds = {}, {}
            for method in args.method:
                hp = per_dataset["hyperparameters"][method]
                if method not in warmed:  # a first call pays one-time costs (thread pools, lazy set-up)
                    adapt_and_score(features, [drawn[chunks[0][0]]], method, hp)
                    warmed.add(method)
                scores: dict[int, float] = {}
                started = time.perf_counter()
                for chunk in chunks:
                    chunk_scores = adapt_and_score(features, [drawn[i] for i in chunk], method, hp)
                    scores.update(zip(chunk, chunk_scores, strict=True))
                seconds[method] = (time.perf_counter() - started) / len(drawn)
                accuracies[method] = [scores[i] for i in range(len(drawn))]
            results = summarise({domain.name: accuracies}, [domain], args.method)[0][domain.name]
            shape = {
                "mean_ways": float(np.mean([e.num_ways for e in drawn])),
                "mean_support": float(np.mean([len(e.support_indices) for e in drawn])),
                "mean_query": float(np.mean([len(e.query_indices) for e in drawn])),
            }
            per_dataset["protocols"][protocol] = {
                m: {**results[m], "adapt_s_per_episode": seconds[m], **shape} for m in args.method
            }
        entry["datasets"][domain.name] = per_dataset
    for key, field in (("average", "mean"), ("adapt_s_per_episode", "adapt_s_per_episode")):
        entry[key] = {
            p: {
                m: float(np.mean([d["protocols"][p][m][field] for d in entry["datasets"].values()]))
                for m in args.method
            }
            for p in protocols
        }
    return entry


if __name__ == "__main__":
    sys.exit(main())
