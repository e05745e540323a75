"""What the offline commands (convert, merge) build alike: their parser, --out, and a failure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_command(
    commands: argparse._SubParsersAction, name: str, *, summary: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description and examples as written."""
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_out_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help=f"folder to write {what} into; it must not exist yet, or be empty",
    )


def fail(command: str, message: str) -> int:
    """Print `message` as the command's error and return the exit status for a usage error."""
    print(f"lora-gateway {command}: error: {message}", file=sys.stderr)
    return 2
