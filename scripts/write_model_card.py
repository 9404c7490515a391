"""(Re)write the model card of a backbone trained by `hf-copa train`, with its evaluation tables.

    python scripts/write_model_card.py MODEL_DIR --evaluation EVAL.json [--baseline RANDOM.json] \
        [--repo-id ORG/NAME] [--evaluation-command "hf-copa evaluate ..."] [--default]

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
    args = parser.parse_args(argv)
    try:
        path = write_trained_model_card(
            args.model_dir,
            evaluation=args.evaluation,
            baseline=args.baseline,
            repo_id=args.repo_id,
            evaluation_command=args.evaluation_command,
            is_default=args.default,
            training_notes=Path(args.notes).read_text() if args.notes else None,
        )
    except (ValueError, OSError) as err:
        print(f"write_model_card: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
