"""``flashtts infer``: synthesise one text to a file, without a server."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

from flashtts_core.cli.options import add_model_options, fail, settings_kwargs, setup_logging

__all__ = ("add_parser", "run")

_LEVELS = ("very_low", "low", "moderate", "high", "very_high")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("infer", help="synthesise text to an audio file")
    add_model_options(p)
    p.add_argument("-i", "--input", required=True, help="text, or a .txt file")
    p.add_argument("-o", "--output", default="output.wav", help="output file; format from the extension")
    p.add_argument("--name", default=None, help="voice name (built-in or a role of --role_dir)")
    p.add_argument("--role_dir", default=None)
    p.add_argument("--reference_audio", default=None, help="reference audio file to clone")
    p.add_argument("--reference_text", default=None, help="transcript of the reference (text or .txt file)")
    p.add_argument("--latent_file", default=None, help="MegaTTS3 latent (.npy) of the reference")
    p.add_argument("--pitch", choices=_LEVELS, default=None)
    p.add_argument("--speed", choices=_LEVELS, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--repetition_penalty", type=float, default=None)
    p.add_argument("--max_tokens", type=int, default=None)
    p.add_argument("--length_threshold", type=int, default=50)
    p.add_argument("--window_size", type=int, default=50)
    p.add_argument("--demo", nargs="?", const="spark", default=None, metavar="FAMILY")
    p.add_argument("--log_level", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def _read_text(value: str) -> str:
    path = Path(value)
    if value.endswith(".txt") and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


def run(args: argparse.Namespace) -> int:
    import msgspec

    from flashtts_core.audio.formats import format_from_extension
    from flashtts_core.config import ServerSettings
    from flashtts_core.errors import FlashTTSError
    from flashtts_core.runtime import open_runtime, resolve

    setup_logging(args.log_level)
    try:
        fmt = format_from_extension(args.output)
    except FlashTTSError as exc:
        fail(exc.message)
    settings = msgspec.convert(
        dict(settings_kwargs(args), demo=args.demo, role_dir=args.role_dir, warmup=False), ServerSettings
    )
    try:
        plan = resolve(settings)
    except FlashTTSError as exc:
        fail(exc.message)
    try:
        return asyncio.run(_infer(args, plan, fmt, open_runtime))
    except FlashTTSError as exc:
        fail(exc.message, code=1)
    return 1


def _load_reference(args: argparse.Namespace) -> Any:
    from flashtts_core.plugins.types import ReferenceAudio

    return ReferenceAudio(
        data=Path(args.reference_audio).read_bytes(),
        text=_read_text(args.reference_text) if args.reference_text else None,
        latent=Path(args.latent_file).read_bytes() if args.latent_file else None,
    )


async def _infer(args: argparse.Namespace, plan: Any, fmt: str, open_runtime: Any) -> int:
    import numpy as np

    from flashtts_core.audio.encode import encode_all
    from flashtts_core.plugins.types import SamplingOverrides, SynthesisRequest

    text = _read_text(args.input)
    sampling = SamplingOverrides(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens,
    )
    async with open_runtime(plan, warmup=False) as rt:
        service = rt.service
        if args.reference_audio:
            ref = await asyncio.to_thread(_load_reference, args)
            voice, prompt = None, await service.reference_prompt(ref)
        else:
            voice, prompt = service.resolve_voice(args.name)
        request = SynthesisRequest(
            request_id=uuid.uuid4().hex,
            text=text,
            voice=voice,
            prompt=prompt,
            pitch=args.pitch,
            speed=args.speed,
            sampling=sampling,
            length_threshold=args.length_threshold,
            window_size=args.window_size,
        )
        chunks: list[np.ndarray] = []
        show = sys.stderr.isatty()
        async for samples in service.synthesize(request):
            chunks.append(samples)
            if show:
                seconds = sum(c.size for c in chunks) / rt.engine.info.sample_rate
                print(f"\rsynthesised {seconds:6.1f} s of audio", end="", file=sys.stderr, flush=True)
        if show:
            print(file=sys.stderr)
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        data = encode_all(audio, fmt, input_rate=rt.engine.info.sample_rate)
    await asyncio.to_thread(Path(args.output).write_bytes, data)
    print(f"wrote {args.output} ({audio.size / rt.engine.info.sample_rate:.2f} s)", file=sys.stderr)
    return 0
