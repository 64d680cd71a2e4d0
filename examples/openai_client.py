"""Talk to a FlashTTS server with the official ``openai`` Python client.

Start a server first, e.g. ``flashtts serve --demo`` (a tiny random-weight model: it speaks noise, but every
call below works) or ``flashtts serve --model_path Spark-TTS-0.5B``, then::

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --out-dir out/

It writes three files: a complete MP3, a streamed PCM file (24 kHz, 16-bit mono, as OpenAI documents), and a WAV
assembled from server-sent events. Pass ``--api-key`` if the server runs with ``--api_key``.
FlashTTS extras (pitch, temperature, ...) go in ``extra_body``; a voice can also be reference audio to clone
(an http(s) URL or base64) instead of a name.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
from pathlib import Path

import openai

__all__ = ("main", "run")

logger = logging.getLogger(__name__)


def run(base_url: str, out_dir: Path, *, api_key: str = "unused", voice: str = "female") -> list[Path]:
    """Make the three example calls; return the files written."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [m.id for m in client.models.list()]
    logger.info("models served: %s", ", ".join(names))

    # 1. One complete file (FlashTTS streams by default on this route; stream=False asks for a file with a
    #    Content-Length and exact headers).
    mp3 = out_dir / "speech.mp3"
    response = client.audio.speech.create(
        model="tts-1",
        voice=voice,
        input="Hello! This is FlashTTS speaking through the OpenAI client.",
        response_format="mp3",
        speed=1.0,
        extra_body={"stream": False, "temperature": 0.8},
    )
    mp3.write_bytes(response.content)

    # 2. Streaming: bytes arrive while the audio is generated.
    pcm = out_dir / "speech.pcm"
    with (
        client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=voice, input="Streaming arrives chunk by chunk.", response_format="pcm"
        ) as streamed,
        pcm.open("wb") as fh,
    ):
        rate = streamed.headers.get("x-sample-rate", "24000")
        for chunk in streamed.iter_bytes():
            fh.write(chunk)
    logger.info("streamed PCM at %s Hz", rate)

    # 3. Server-sent events: speech.audio.delta events carry base64 audio, speech.audio.done ends the stream.
    wav = out_dir / "speech_sse.wav"
    audio = bytearray()
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice=voice,
        input="Events work too.",
        response_format="wav",
        extra_body={"stream_format": "sse"},
    ) as events:
        for line in events.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: ") :])
            if event["type"] == "speech.audio.delta":
                audio += base64.b64decode(event["audio"])
            elif event["type"] == "speech.audio.error":
                raise RuntimeError(event["error"]["message"])
    wav.write_bytes(bytes(audio))
    return [mp3, pcm, wav]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--voice", default="female")
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in run(args.base_url, args.out_dir, api_key=args.api_key, voice=args.voice):
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
