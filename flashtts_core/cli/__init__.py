"""The ``flashtts`` command: ``serve``, ``infer`` and ``plugins``.

Only argparse and the cheap settings module are imported here, so ``flashtts --help`` stays fast; each
sub-command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flashtts_core import __version__

__all__ = ("build_parser", "main")


def build_parser() -> argparse.ArgumentParser:
    from flashtts_core.cli import convert, infer, plugins, serve

    parser = argparse.ArgumentParser(
        prog="flashtts",
        description="FlashTTS: serve LLM-based text-to-speech models (Spark-TTS, Orpheus-TTS, MegaTTS3).",
    )
    parser.add_argument("--version", action="version", version=f"flashtts {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    serve.add_parser(sub)
    infer.add_parser(sub)
    plugins.add_parser(sub)
    convert.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(1)
    code = args.run(args)
    sys.exit(code or 0)
