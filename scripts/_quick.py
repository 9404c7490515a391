"""The `--quick` flag every script shares: a tiny run that checks the script works, not figures to report.

Not a script itself (the leading underscore keeps it out of tests/test_scripts.py's list); the scripts import
it as a sibling, which works because `python scripts/NAME.py` puts scripts/ first on sys.path.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any


def add_quick_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """`--quick`, its help saying `what` the quick run does."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a tiny run that checks the script works (seconds), not figures to report ({what}; flags given "
        "explicitly still apply)",
    )


def parse_quick(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick_defaults: Mapping[str, Any]
) -> argparse.Namespace:
    """Parse; under `--quick`, parse again on the quick defaults, so that flags given explicitly win."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick_defaults)
        args = parser.parse_args(argv)
    return args
