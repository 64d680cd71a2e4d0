"""``flashtts convert-gguf MODEL_DIR``: write the GGUF file the llama-cpp backend loads.

Kept import-light like every sub-command: the converter (numpy, gguf) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from flashtts_core.cli.options import fail, setup_logging

__all__ = ("add_parser", "run")

_OUTTYPES = ("f32", "f16", "q8_0")  # flashtts_core.convert.OUTTYPES, repeated to keep --help light


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert-gguf",
        help="convert a model's LLM to GGUF for the llama-cpp backend",
        description=(
            "Write the GGUF file of a model's LLM (Spark-TTS: MODEL_DIR/LLM; Orpheus: MODEL_DIR; or an HF LLM "
            "folder). Qwen2 and Llama architectures; needs the gguf package (pip install 'flashtts-core[gguf]')."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory or Hugging Face LLM folder")
    p.add_argument(
        "--outtype",
        choices=_OUTTYPES,
        default="f16",
        help="weight type of the matrices (norms stay f32; q8_0 falls back to f16 where rows do not fit its blocks)",
    )
    p.add_argument("--output", default=None, metavar="PATH", help="output file (default: <LLM folder>/model.gguf)")
    p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flashtts_core.convert import convert_to_gguf
    from flashtts_core.errors import FlashTTSError

    setup_logging(args.log_level)
    started = time.monotonic()
    try:
        path = convert_to_gguf(args.model_dir, args.output, outtype=args.outtype)
    except FlashTTSError as exc:
        fail(exc.message, code=1)
        return 1
    size_mb = path.stat().st_size / 1e6
    sys.stdout.write(f"wrote {path} ({size_mb:.1f} MB, {args.outtype}) in {time.monotonic() - started:.1f} s\n")
    return 0
