"""(Re)write the model card of a backbone trained by `hf-copa train`, with its evaluation tables.

    python scripts/write_model_card.py MODEL_DIR --evaluation EVAL.json [--baseline RANDOM.json] \
        [--repo-id ORG/NAME] [--evaluation-command "hf-copa evaluate ..."] [--default] \
        [--extra-evaluation MORE.json --extra-evaluation-command "hf-copa evaluate ..."]...

EVAL.json / RANDOM.json are written by `hf-copa evaluate --output` for the model and for
`hf-copa evaluate --random-init` (the same shape with random weights). EVAL.json becomes `model-index`.
"""

import argparse
import sys
from pathlib import Path

from hf_copa.model_cards import write_trained_model_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("--evaluation", default=None)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--repo-id", default=None)
    parser.add_argument("--evaluation-command", default=None)
    parser.add_argument("--default", action="store_true", help="the card of hf_copa's bundled default model")
    parser.add_argument("--notes", default=None, help="markdown file added under Training")
    parser.add_argument(
        "--extra-evaluation", action="append", default=[], help="another results JSON, shown as its own table"
    )
    parser.add_argument(
        "--extra-evaluation-command",
        action="append",
        default=[],
        help="the command of each --extra-evaluation",
    )
    args = parser.parse_args(argv)
    if len(args.extra_evaluation_command) > len(args.extra_evaluation):
        print(
            "write_model_card: error: more --extra-evaluation-command than --extra-evaluation",
            file=sys.stderr,
        )
        return 2
    commands = args.extra_evaluation_command + [None] * len(args.extra_evaluation)
    try:
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
    except (ValueError, OSError) as err:
        print(f"write_model_card: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
