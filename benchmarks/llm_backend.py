"""LLM backend throughput: tokens/s and time to first token against concurrency.

Builds (once, cached) a random-weight Qwen2 checkpoint — ``tiny`` or ``spark-0.5b`` (the dimensions of
Spark-TTS-0.5B's LLM: 24 layers, hidden 896, 14 heads, 2 KV heads, vocabulary 166000) — loads it with a backend
plugin and drives N concurrent streaming requests. Random weights: the tokens are meaningless but the work per
token is the real model's.

    python -m benchmarks.llm_backend --preset tiny --concurrency 1,2,4,8
    python -m benchmarks.llm_backend --preset spark-0.5b --device cuda --dtype bfloat16 --concurrency 1,8,32
    python -m benchmarks.llm_backend --preset tiny --backend_option cache_implementation=static --concurrency 1,8

``--backend_option key=value`` (repeatable) passes backend-specific options, as ``flashtts serve`` does; the
decoding path the backend chose is printed when it reports one (the torch backend: dynamic or static cache, CUDA
graphs or not).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import platform
import resource
import statistics
import time
from pathlib import Path

from flashtts_core.plugins import BackendConfig, GenerationRequest, SamplingParams, get_registry
from flashtts_core.testing.cache import cached_build

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    ),
    "spark-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=166000,
    ),
}


def checkpoint(preset: str) -> Path:
    from flashtts_core.testing.tiny_llm import build_tiny_qwen2

    params = PRESETS[preset]
    return cached_build(
        f"bench-qwen2-{preset}",
        params,
        lambda out: build_tiny_qwen2(out, tie_word_embeddings=True, max_position_embeddings=32768, **params),
    )


async def one(backend: object, i: int, prompt_len: int, max_tokens: int, seed: int) -> tuple[float, int, float]:
    request = GenerationRequest(
        request_id=f"bench-{i}",
        prompt_token_ids=tuple(100 + (i * 7 + k) % 200 for k in range(prompt_len)),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=seed + i),
    )
    start = time.perf_counter()
    first = None
    n = 0
    async for chunk in backend.generate(request):  # type: ignore[attr-defined]
        if chunk.token_ids and first is None:
            first = time.perf_counter() - start
        n += len(chunk.token_ids)
    return first or 0.0, n, time.perf_counter() - start


async def main_async(args: argparse.Namespace) -> None:
    model_dir = checkpoint(args.preset)
    if ":" in args.backend:  # module:Class, for a backend that is importable but not installed as a distribution
        module, _, name = args.backend.partition(":")
        cls = getattr(importlib.import_module(module), name)
    else:
        cls = get_registry().load_backend(args.backend)
    backend = cls(
        BackendConfig(
            model_dir=str(model_dir),
            device=args.device,
            dtype=args.dtype,
            max_batch_size=max(args.concurrency),
            max_model_len=args.max_model_len,
            options=dict(args.backend_option),
        )
    )
    t0 = time.perf_counter()
    await backend.startup()
    load_s = time.perf_counter() - t0
    device = args.device
    print(f"# backend={args.backend} preset={args.preset} device={device} dtype={args.dtype} load={load_s:.1f}s")
    print(f"# machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    print(f"# options: {dict(args.backend_option) or '-'}; path: {_decoding_path(backend)}")
    await one(backend, 0, args.prompt_len, 8, 0)  # warm-up
    print("| concurrency | tokens/s (total) | tokens/s per stream | TTFT p50 ms | TTFT p95 ms | wall s |")
    print("|---|---|---|---|---|---|")
    for c in (c for c in args.concurrency for _ in range(args.repeat)):
        start = time.perf_counter()
        results = await asyncio.gather(*(one(backend, i, args.prompt_len, args.tokens, 1) for i in range(c)))
        wall = time.perf_counter() - start
        ttft = sorted(r[0] * 1000 for r in results)
        total = sum(r[1] for r in results)
        per_stream = statistics.mean(r[1] / r[2] for r in results)
        p95 = ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]
        print(
            f"| {c} | {total / wall:.0f} | {per_stream:.0f} | {statistics.median(ttft):.0f} | {p95:.0f} | {wall:.2f} |"
        )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra = ""
    try:
        import torch

        if torch.cuda.is_available():
            extra = f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    except ImportError:
        pass
    graphs = getattr(getattr(backend, "_runtime", None), "graphs_captured", 0)
    if graphs:
        extra += f", {graphs} CUDA graphs captured"
    print(f"# peak RSS {rss_mb:.0f} MiB{extra}")
    await backend.shutdown()


def _decoding_path(backend: object) -> str:
    """The backend's own one-line description of its decoding path, where it has one (the torch backend)."""
    runtime = getattr(backend, "_runtime", None)
    return str(getattr(runtime, "path_description", "") or "n/a")


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", help="backend name, or module:Class")
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--tokens", type=int, default=256, help="generated tokens per request")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--max_model_len", type=int, default=4096)
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per concurrency (the first may include one-time work: graphs)"
    )
    p.add_argument(
        "--backend_option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend-specific option (repeatable), e.g. cache_implementation=static",
    )
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
