"""The `hf-copa` command: the only place that parses arguments."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from .bundled import DEFAULT_MODEL
from .folders import list_images, load_class_folders, sample_task_dir
from .learners.registry import DEFAULT_METHOD, available_methods, hyperparameter_names
from .training import MIXED_PRECISION_CHOICES, TrainingConfig
from .validation import CopaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-copa", description="Few-shot image classification with CoPA.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_adaptation_options(sub: argparse.ArgumentParser) -> None:
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
    classify.add_argument("support", help="folder with one sub-folder of images per class")
    classify.add_argument("query", nargs="+", help="query image files or folders")
    add_adaptation_options(classify)

    evaluate = commands.add_parser(
        "evaluate", help="mean accuracy ± 95%% CI over few-shot episodes per domain"
    )
    evaluate.add_argument(
        "--model", default=None, help="model folder or Hub id (default: the bundled backbone)"
    )
    evaluate.add_argument(
        "--dataset",
        action="append",
        required=True,
        metavar="PATH_OR_ID[:SPLIT]",
        help="a dataset folder or Hub id, split 'test' unless given; repeat for more domains",
    )
    evaluate.add_argument("--method", nargs="+", default=["ncc", "url", "copa"], choices=available_methods())
    evaluate.add_argument(
        "--protocol", default="meta-dataset", help="meta-dataset, varying-way-5-shot, 5-way-1-shot"
    )
    evaluate.add_argument("--episodes", type=int, default=600)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--seen", nargs="*", default=[], metavar="DOMAIN", help="domains the backbone saw")
    evaluate.add_argument("--unseen", nargs="*", default=[], metavar="DOMAIN", help="domains it did not see")
    evaluate.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="[DOMAIN:]METHOD:KEY=VALUE",
        help="hyperparameter or preset, e.g. mnist:copa:preset=high-lr or url:lr=0.5",
    )
    evaluate.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache folder (default: $HF_COPA_CACHE or "
        "~/.cache/hf_copa/features; 'none' disables it)",
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
    evaluate.add_argument("--no-progress", action="store_true")

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
    train.add_argument("--output-dir", required=True, help="model folder to write (checkpoints inside it)")
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

    convert = commands.add_parser(
        "convert", help="convert URL's released checkpoint (model_best.pth.tar[.xz]) to a model folder"
    )
    convert.add_argument("checkpoint", help="URL's model_best.pth.tar, plain or xz-compressed")
    convert.add_argument("output_dir", help="folder to write the model to")
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
        "--overwrite", action="store_true", help="write into a non-empty folder, replacing only its own files"
    )
    return parser


def add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per hyperparameter any registered learner declares (`--lr`, `--lr-beta`, ...), typed like
    its defaults; its help says which methods take it and their defaults."""
    for name, defaults in hyperparameter_names().items():
        kind = (
            int if all(isinstance(v, int) and not isinstance(v, bool) for v in defaults.values()) else float
        )
        taken = ", ".join(f"{method} {value:g}" for method, value in defaults.items())
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=f"default: {taken}"
        )


def hyperparameters_from(args: argparse.Namespace) -> dict:
    """The hyperparameter flags given on the command line."""
    return {name: getattr(args, name) for name in hyperparameter_names() if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            task = sample_task_dir()
            support_paths, support_labels = load_class_folders(task / "support")
            query_paths, truth = load_class_folders(task / "query")
            return _classify(args, support_paths, support_labels, query_paths, truth)
        if args.command == "classify":
            support_paths, support_labels = load_class_folders(args.support)
            return _classify(args, support_paths, support_labels, _expand_queries(args.query), None)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "train":
            return _train(args, argv)
        if args.command == "model-card":
            return _model_card(args)
    except (CopaError, ValueError, OSError) as err:  # what the user gave; anything else is a bug
        print(f"hf-copa: error: {err}", file=sys.stderr)
        return 2
    return 0


def _expand_queries(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += list_images(path)
        elif path.is_file():
            paths.append(path)
        else:
            raise ValueError(f"Query {item!r} is neither an image file nor a folder.")
    if not paths:
        raise ValueError("No query images found.")
    return paths


def _load_model(name_or_path: str | None, show_notes: bool = True):
    """The backbone, with its warnings (e.g. "no trained default yet") shown as one-line notes."""
    from .pretrained import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(name_or_path)
    if show_notes:
        for warning in caught:
            print(f"note: {warning.message}", file=sys.stderr)
    return model


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
    from .evaluation import Domain, evaluate, parse_override
    from .features import default_cache_dir

    domains = [Domain.parse(spec) for spec in args.dataset]
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"Two datasets share a name: {names}; give each domain a distinct folder or id.")
    for role, marked in (("seen", args.seen), ("unseen", args.unseen)):
        missing = sorted(set(marked) - set(names))
        if missing:
            raise ValueError(f"--{role} names {missing}, which are not among the datasets {names}.")
    global_overrides: dict[str, dict] = {}
    for domain in domains:
        domain.role = "seen" if domain.name in args.seen else "unseen" if domain.name in args.unseen else None
    for text in args.override:
        domain_name, method, key, value = parse_override(text)
        if domain_name is None:
            global_overrides.setdefault(method, {})[key] = value
            continue
        if domain_name not in names:
            raise ValueError(f"Override {text!r} names domain {domain_name!r}, not among {names}.")
        domains[names.index(domain_name)].overrides.setdefault(method, {})[key] = value
    cache_dir = None if (args.cache_dir or "").lower() == "none" else (args.cache_dir or default_cache_dir())
    state = PartialState(cpu=use_cpu())
    model = _load_model(args.model, show_notes=state.is_main_process)
    model_name = None
    if args.random_init:
        from .pretrained import RANDOM_INIT_SEED, random_backbone

        model = random_backbone(model)
        model_name = f"random-init({args.model or DEFAULT_MODEL}, seed={RANDOM_INIT_SEED})"
    result = evaluate(
        model,
        domains,
        methods=args.method,
        protocol=args.protocol,
        num_episodes=args.episodes,
        seed=args.seed,
        overrides=global_overrides,
        cache_dir=cache_dir,
        progress=not args.no_progress,
        model_name=model_name,
    )
    if state.is_main_process:
        print(result.table())
        if args.output:
            result.save(args.output, per_episode=args.per_episode)
            print(f"wrote {args.output}")
    return 0


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
    command = "hf-copa " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    config = TrainingConfig(
        **fields, datasets=args.dataset, output_dir=args.output_dir, teachers=teachers, command=command
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
    from .conversion import DOMAIN_CLASSIFIERS_FILE, convert_url_checkpoint, converted_files

    stale = Path(args.output_dir) / DOMAIN_CLASSIFIERS_FILE
    removes_stale = not args.keep_domain_classifiers and stale.exists()
    output = convert_url_checkpoint(
        args.checkpoint,
        args.output_dir,
        keep_domain_classifiers=args.keep_domain_classifiers,
        push_to_hub=args.push_to_hub,
        stem_padding=args.stem_padding,
        overwrite=args.overwrite,
    )
    print(f"wrote {output}: " + ", ".join(converted_files(args.keep_domain_classifiers)))
    if removes_stale:
        print(
            f"removed {stale.name} (an earlier conversion's classifiers; config.json no longer lists them)"
        )
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
