"""Options shared by ``serve`` and ``infer``: the names and defaults of the original server document."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from flashtts_core.config import BACKEND_NAMES

__all__ = ("add_model_options", "fail", "parse_key_values", "settings_kwargs", "setup_logging")

_ATTN = ("eager", "sdpa", "flash_attention_2")
_MODEL_KEYS = (
    "model_path", "backend", "engine", "lang", "snac_path", "llm_device", "tokenizer_device", "detokenizer_device",
    "wav2vec_attn_implementation", "llm_attn_implementation", "max_length", "llm_gpu_memory_utilization",
    "torch_dtype", "cache_implementation", "seed", "batch_size", "llm_batch_size", "wait_timeout", "cpu_threads",
)  # fmt: skip


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model_path", help="model directory (Spark-TTS-0.5B, Orpheus + snac, MegaTTS3)")
    g.add_argument("-b", "--backend", default="torch", help=f"LLM runtime: {', '.join(BACKEND_NAMES)} (default: torch)")
    g.add_argument("--engine", default=None, help="model family (spark, orpheus, mega); detected when omitted")
    g.add_argument("--lang", default=None, help="Orpheus language (english, mandarin, french, ...)")
    g.add_argument("--snac_path", default=None, help="SNAC decoder folder for Orpheus (default <model_path>/snac)")
    g.add_argument("--llm_device", default="auto", help="device of the LLM: auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--tokenizer_device", default="auto", help="device of the audio tokenizer (encoder)")
    g.add_argument("--detokenizer_device", default="auto", help="device of the audio detokenizer (decoder)")
    g.add_argument("--wav2vec_attn_implementation", default="eager", choices=_ATTN)
    g.add_argument("--llm_attn_implementation", default="eager", choices=_ATTN)
    g.add_argument("--max_length", type=int, default=32768, help="LLM context length (prompt + generation)")
    g.add_argument("--llm_gpu_memory_utilization", type=float, default=0.6, help="vLLM/SGLang GPU memory share")
    g.add_argument("--torch_dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    g.add_argument("--cache_implementation", default=None, help="torch KV cache: auto, static, dynamic")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=8, help="dynamic batch size of audio tokenizer/detokenizer")
    g.add_argument("--llm_batch_size", type=int, default=8, help="max concurrent LLM sequences")
    g.add_argument("--wait_timeout", type=float, default=0.01, help="dynamic batching gather time (s)")
    g.add_argument(
        "--cpu_threads",
        type=int,
        default=None,
        help="CPU threads for model work; an LLM and a codec both on the CPU split them (default: all CPUs)",
    )
    g.add_argument(
        "--backend_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend-specific option (repeatable); see the backend's README",
    )
    g.add_argument(
        "--engine_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine-specific option (repeatable), e.g. MegaTTS3's time_step=16 or dtype=bfloat16",
    )
    g.add_argument(
        "--llm_gguf",
        dest="backend_option",  # appends "gguf=PATH": the llama-cpp backend's option, validated by the backend
        action="append",
        type="gguf={}".format,
        metavar="PATH",
        help="GGUF file of the LLM for the llama-cpp backend (same as --backend_option gguf=PATH)",
    )


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {k: getattr(args, k) for k in _MODEL_KEYS}
    kwargs["backend_options"] = parse_key_values(args.backend_option, "--backend_option")
    kwargs["engine_options"] = parse_key_values(args.engine_option, "--engine_option")
    return kwargs


def fail(message: str, code: int = 2) -> None:
    print(f"flashtts: error: {message}", file=sys.stderr)
    sys.exit(code)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="[FlashTTS] %(asctime)s [%(levelname)s] [%(name)s] %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
