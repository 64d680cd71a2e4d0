"""Component costs behind a request: codec decode, audio encoding, and the server's own overhead.

Three parts (``--parts decode,encode,overhead``, all by default):

* **decode** — BiCodec ``detokenize`` seconds per audio second at batch 1 and 8 (and ``--batches``), on windows of
  ``--tokens`` semantic tokens (50 per audio second). ``--preset tiny`` uses the demo checkpoint; ``--preset spark``
  builds BiCodec in memory with the published ``BiCodec/config.yaml`` dimensions (models.md §A.3) and random weights
  (the work per token is the real decoder's; building it takes a few seconds and ~0.7 GB).
* **encode** — :class:`~flashtts_core.audio.encode.AudioEncoder` seconds per audio second for every response format,
  streamed (fed in ``--chunk_s`` chunks of 16 kHz audio, as the server does), including ``pcm`` at OpenAI's 24 kHz.
* **overhead** — HTTP + encoding share of a request: the same text and seed synthesised ``--requests`` times by the
  engine in-process (no HTTP, no encoding) and through a ``flashtts serve`` subprocess (``/v1/audio/speech``,
  streamed, ``--format``); p50 of each and the share ``(http - engine) / http``. Both run one at a time, on the same
  model and options.

    python -m benchmarks.components
    python -m benchmarks.components --preset spark --parts decode --batches 1,8
    python -m benchmarks.components --parts overhead --requests 10 --format mp3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.load import Server, ServerStartError, percentile

SAMPLE_RATE = 16000
TOKENS_PER_SECOND = 50
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")

#: ``BiCodec/config.yaml`` of Spark-TTS-0.5B (models.md §A.3).
SPARK_BICODEC_CONFIG_YAML = """\
audio_tokenizer:
  mel_params: {sample_rate: 16000, n_fft: 1024, win_length: 640, hop_length: 320, mel_fmin: 10, mel_fmax: null,
               num_mels: 128}
  encoder: {input_channels: 1024, vocos_dim: 384, vocos_intermediate_dim: 2048, vocos_num_layers: 12,
            out_channels: 1024, sample_ratios: [1, 1]}
  decoder: {input_channel: 1024, channels: 1536, rates: [8, 5, 4, 2], kernel_sizes: [16, 11, 8, 4]}
  quantizer: {input_dim: 1024, codebook_size: 8192, codebook_dim: 8, commitment: 0.25, codebook_loss_weight: 2.0,
              use_l2_normlize: True, threshold_ema_dead_code: 0.2}
  speaker_encoder: {input_dim: 128, out_dim: 1024, latent_dim: 128, token_num: 32, fsq_levels: [4, 4, 4, 4, 4, 4],
                    fsq_num_quantizers: 1}
  prenet: {input_channels: 1024, vocos_dim: 384, vocos_intermediate_dim: 2048, vocos_num_layers: 12,
           out_channels: 1024, condition_dim: 1024, sample_ratios: [1, 1], use_tanh_at_final: False}
  postnet: {input_channels: 1024, vocos_dim: 384, vocos_intermediate_dim: 2048, vocos_num_layers: 6,
            out_channels: 1024, use_tanh_at_final: False}
"""


def model_dir(args: argparse.Namespace) -> Path:
    if args.model_path:
        return Path(args.model_path)
    from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

    return tiny_checkpoint_dir(args.demo or "spark")


# --- decode ----------------------------------------------------------------------------------------------------------


def load_decoder(args: argparse.Namespace) -> tuple[Any, str]:
    """A BiCodec instance usable for ``detokenize`` and a description of it."""
    from flashtts_core.engines.spark.bicodec import BiCodec

    if args.preset == "tiny":
        root = model_dir(args)
        return BiCodec.from_pretrained(root, "cpu"), f"checkpoint {root.name if args.model_path else 'tiny (demo)'}"
    import torch

    from flashtts_core.engines.spark.config import BiCodecDims, load_bicodec_config, load_root_config
    from flashtts_core.engines.spark.modeling_bicodec import SparkBiCodecModel
    from flashtts_core.testing.tiny_spark import ROOT_CONFIG_YAML

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(ROOT_CONFIG_YAML, encoding="utf-8")
        (Path(tmp) / "bicodec.yaml").write_text(SPARK_BICODEC_CONFIG_YAML, encoding="utf-8")
        root_config = load_root_config(Path(tmp) / "config.yaml")
        config = load_bicodec_config(Path(tmp) / "bicodec.yaml")
    start = time.perf_counter()
    torch.manual_seed(0)
    model = SparkBiCodecModel(config, BiCodecDims())
    model.fold_weight_norm()
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - start
    # Only detokenize is used: the wav2vec2 feature extractor (tokenize) is not needed.
    codec = BiCodec(model, None, root_config=root_config, config=config)  # type: ignore[arg-type]
    return codec, f"Spark-TTS-0.5B BiCodec dims, random weights ({params / 1e6:.0f}M params, built in {built:.1f}s)"


def bench_decode(args: argparse.Namespace) -> None:
    import torch

    codec, what = load_decoder(args)
    rng = np.random.default_rng(0)
    n_global = codec.num_global_tokens
    print(f"## codec decode (BiCodec detokenize, {what}; torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"# window {args.tokens} semantic tokens = {args.tokens / TOKENS_PER_SECOND:.1f} audio s per item")
    print("| batch | audio s per call | call ms p50 | decode s per audio s | audio s per s |")
    print("|---|---|---|---|---|", flush=True)
    for batch in args.batches:
        globs = [rng.integers(0, codec.global_codebook_size, n_global) for _ in range(batch)]
        sems = [rng.integers(0, codec.semantic_codebook_size, args.tokens) for _ in range(batch)]
        codec.detokenize(globs, sems)  # warm-up
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            codec.detokenize(globs, sems)
            times.append(time.perf_counter() - start)
        audio = batch * args.tokens / TOKENS_PER_SECOND
        t = statistics.median(times)
        print(f"| {batch} | {audio:.1f} | {t * 1000:.0f} | {t / audio:.4f} | {audio / t:.1f} |", flush=True)


# --- encode ----------------------------------------------------------------------------------------------------------


def speech_like_signal(seconds: float) -> np.ndarray:
    """A speech-like test signal: a gliding harmonic tone with noise and pauses, at 16 kHz, in [-0.5, 0.5]."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = (np.sin(2 * np.pi * 1.5 * t) > -0.3).astype(np.float64)
    noise = np.random.default_rng(0).normal(0, 0.05, t.size)
    return (0.3 * voiced * envelope + noise).clip(-0.5, 0.5).astype(np.float32)


def bench_encode(args: argparse.Namespace) -> None:
    import av

    from flashtts_core.audio.encode import AudioEncoder

    signal = speech_like_signal(args.audio_s)
    step = max(1, int(args.chunk_s * SAMPLE_RATE))
    chunks = [signal[i : i + step] for i in range(0, signal.size, step)]
    print(
        f"## audio encoding (streamed, {args.audio_s:.0f} s of 16 kHz audio in {args.chunk_s} s chunks; "
        f"PyAV {av.__version__})"
    )
    print("| format | output rate Hz | encode s per audio s | × real time | bytes per audio s |")
    print("|---|---|---|---|---|", flush=True)
    cases = [(f, None) for f in FORMATS] + [("pcm", 24000)]
    for fmt, rate in cases:
        times = []
        size = 0
        out_rate = SAMPLE_RATE
        for _ in range(args.repeat):
            start = time.perf_counter()
            encoder = AudioEncoder(fmt, input_rate=SAMPLE_RATE, output_rate=rate, streaming=True)
            size = sum(len(encoder.encode(c)) for c in chunks) + len(encoder.finish())
            times.append(time.perf_counter() - start)
            out_rate = encoder.sample_rate
        t = statistics.median(times)
        label = fmt if rate is None else f"{fmt} (OpenAI default rate)"
        print(
            f"| {label} | {out_rate} | {t / args.audio_s:.5f} | {args.audio_s / t:.0f} | {size / args.audio_s:.0f} |",
            flush=True,
        )


# --- server overhead -------------------------------------------------------------------------------------------------


def server_settings(args: argparse.Namespace) -> Any:
    import msgspec

    from flashtts_core.config import ServerSettings

    fields: dict[str, Any] = {"backend": args.backend}
    if args.model_path:
        fields["model_path"] = args.model_path
    else:
        fields["demo"] = args.demo or "spark"
    for name in ("llm_batch_size", "batch_size", "wait_timeout"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return msgspec.convert(fields, ServerSettings)


def synthesis_request(args: argparse.Namespace, i: int) -> Any:
    from flashtts_core.plugins.types import SamplingOverrides, SynthesisRequest

    return SynthesisRequest(
        request_id=f"bench-{i}",
        text=args.text,
        voice="female",
        pitch="moderate",  # what the OpenAI route sends for pitch/speed 1.0
        speed="moderate",
        sampling=SamplingOverrides(seed=args.seed, max_tokens=args.max_tokens),
        stream=True,
    )


async def engine_once(engine: Any, args: argparse.Namespace, i: int) -> tuple[float, int]:
    """Wall time of one in-process ``engine.synthesize`` (streamed, like the HTTP request) and its samples."""
    start = time.perf_counter()
    samples = 0
    async for chunk in engine.synthesize(synthesis_request(args, i)):
        samples += chunk.samples.size
    return time.perf_counter() - start, samples


async def http_once(client: httpx.AsyncClient, url: str, args: argparse.Namespace) -> tuple[float, int]:
    """Wall time of one streamed ``POST /v1/audio/speech`` (until the last byte) and the body size."""
    body: dict[str, Any] = {
        "input": args.text,
        "voice": "female",
        "response_format": args.format,
        "stream": True,
        "seed": args.seed,
    }
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    start = time.perf_counter()
    size = 0
    async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            size += len(chunk)
    return time.perf_counter() - start, size


async def overhead_pairs(server: Server, args: argparse.Namespace) -> tuple[list[float], list[float], float, int]:
    """Alternate in-process and HTTP requests (same text, seed, model and options) so that load drifts on a shared
    machine hit both paths alike; the first pair is a warm-up."""
    from flashtts_core.runtime import open_runtime, resolve

    plan = resolve(server_settings(args))
    engine_t: list[float] = []
    http_t: list[float] = []
    samples = size = 0
    async with open_runtime(plan) as runtime, httpx.AsyncClient(timeout=120.0) as client:
        server.wait_ready()  # the server process started loading while this process loaded its own copy
        engine = runtime.engine
        for i in range(args.requests + 1):
            e, samples = await engine_once(engine, args, i)
            h, size = await http_once(client, server.url, args)
            if i:
                engine_t.append(e)
                http_t.append(h)
        rate = engine.info.sample_rate
    return engine_t, http_t, samples / rate, size


def bench_overhead(args: argparse.Namespace) -> None:
    load_args = argparse.Namespace(
        model_path=args.model_path,
        demo=args.demo,
        backend=args.backend,
        llm_batch_size=args.llm_batch_size,
        batch_size=args.batch_size,
        wait_timeout=args.wait_timeout,
        server_arg=None,
        log_level="warning",
    )
    print(
        f"## server overhead ({args.requests} pairs after 1 warm-up pair, alternating; "
        f"text {args.text!r}, seed {args.seed})",
        flush=True,
    )
    server = Server(load_args)
    server.start()
    try:
        engine, http, audio, size = asyncio.run(overhead_pairs(server, args))
    except ServerStartError as exc:  # the server did not start: its log tail is in the message
        raise SystemExit(f"benchmarks.components: {exc}") from exc
    finally:
        server.stop()
    e50, h50 = statistics.median(engine), statistics.median(http)
    diffs = [h - e for e, h in zip(engine, http, strict=True)]
    print("| path | p50 ms | p95 ms | audio s | response bytes |")
    print("|---|---|---|---|---|")
    e95 = percentile(engine, 0.95)
    print(f"| engine.synthesize in-process | {e50 * 1000:.0f} | {e95 * 1000:.0f} | {audio:.2f} | – |")
    print(
        f"| HTTP /v1/audio/speech ({args.format}, streamed) | {h50 * 1000:.0f} | {percentile(http, 0.95) * 1000:.0f} "
        f"| {audio:.2f} | {size} |"
    )
    print(
        f"# server overhead (HTTP + encoding) = (http p50 - engine p50) / http p50 = {100 * (h50 - e50) / h50:+.1f} %; "
        f"p50 of the per-pair difference {statistics.median(diffs) * 1000:+.0f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="decode,encode,overhead", help="comma-separated: decode, encode, overhead")
    p.add_argument("--demo", nargs="?", const="spark", default=None, metavar="FAMILY", help="tiny demo model (default)")
    p.add_argument("--model_path", default=None, help="a real Spark model directory (instead of --demo)")
    p.add_argument("--preset", choices=("tiny", "spark"), default="tiny", help="decode: checkpoint / real dims")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--tokens", type=int, default=100, help="decode: semantic tokens per item (50 = 1 s)")
    p.add_argument("--repeat", type=int, default=5, help="decode/encode: timed repetitions (median)")
    p.add_argument("--audio_s", type=float, default=10.0, help="encode: seconds of audio")
    p.add_argument("--chunk_s", type=float, default=1.0, help="encode: chunk length fed to the encoder")
    p.add_argument("--requests", type=int, default=5, help="overhead: timed requests per path")
    p.add_argument("--format", default="pcm", help="overhead: response_format of the HTTP requests")
    p.add_argument("--text", default="Hello there, how are you today?")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max_tokens", type=int, default=None)
    p.add_argument("--backend", default="torch")
    p.add_argument("--llm_batch_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--wait_timeout", type=float, default=None)
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"decode", "encode", "overhead"}
    if unknown:
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, load {load:.2f}")
    if "decode" in parts:
        bench_decode(args)
    if "encode" in parts:
        bench_encode(args)
    if "overhead" in parts:
        bench_overhead(args)


if __name__ == "__main__":
    main()
