"""The Orpheus engine end to end on the real torch backend and the tiny scripted checkpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from flashtts_core.engines.common import DEFAULT_MAX_TOKENS
from flashtts_core.engines.orpheus.engine import OrpheusEngine
from flashtts_core.errors import (
    GenerationError,
    InvalidRequestError,
    UnsupportedFeatureError,
    VoiceNotFoundError,
)
from flashtts_core.plugins import FIRST_AUDIO, LATER_AUDIO
from flashtts_core.plugins.types import ReferenceAudio, SamplingOverrides, SynthesisRequest, VoicePrompt
from flashtts_core.testing.tiny_orpheus import orpheus_script_frames
from tests.engines.helpers import record_priorities
from tests.engines.orpheus.conftest import FRAMES, SAMPLES_PER_FRAME, start_engine, stop_engine

pytest.importorskip("flashtts_torch")

TEXT = "hi <laugh> there"


async def _synth(engine: OrpheusEngine, text: str = TEXT, **kwargs: object) -> list[np.ndarray]:
    request = SynthesisRequest(request_id=f"t-{id(kwargs)}", text=text, **kwargs)  # type: ignore[arg-type]
    return [chunk.samples async for chunk in engine.synthesize(request)]


def test_engine_module_import_is_light() -> None:
    probe = (
        "import sys, flashtts_core.engines.orpheus.engine, flashtts_core.engines.orpheus\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'snac', 'av', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == []


def test_detect(orpheus_dir: Path, tmp_path: Path) -> None:
    assert OrpheusEngine.detect(orpheus_dir)
    assert OrpheusEngine.llm_dir(orpheus_dir) == orpheus_dir
    assert not OrpheusEngine.detect(tmp_path)  # no snac/
    (tmp_path / "snac").mkdir()
    assert not OrpheusEngine.detect(tmp_path)  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    assert not OrpheusEngine.detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert OrpheusEngine.detect(tmp_path)


async def test_every_frame_is_decoded_in_order(orpheus_engine: OrpheusEngine, tiny_snac: object) -> None:
    """Non-streamed output = one-shot SNAC decode of all 24 scripted frames (incl. code 0 and 4095): nothing is
    dropped at either end (the original lost the first and the last two frames) and nothing is misaligned."""
    chunks = await _synth(orpheus_engine)
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32 and audio.size == FRAMES * SAMPLES_PER_FRAME
    frames = orpheus_script_frames(frames=FRAMES)
    assert 0 in frames and 4095 in frames
    (expected,) = tiny_snac.decode([frames])  # type: ignore[attr-defined]
    np.testing.assert_allclose(audio, expected, atol=1e-5)


async def test_streaming_matches_non_streaming(orpheus_engine: OrpheusEngine) -> None:
    streamed = await _synth(orpheus_engine, stream=True)
    whole = np.concatenate(await _synth(orpheus_engine, stream=False))
    # First audio after 4 frames (+3 of look-ahead); chunks grow 4, 8, then the 12-frame tail.
    assert [c.size // SAMPLES_PER_FRAME for c in streamed] == [4, 8, 12]
    joined = np.concatenate(streamed)
    assert joined.size == whole.size == FRAMES * SAMPLES_PER_FRAME
    np.testing.assert_allclose(joined, whole, atol=1e-5)  # the tiny SNAC has no noise: seams are exact


async def test_sampling_defaults_and_overrides(orpheus_engine: OrpheusEngine) -> None:
    tokens = orpheus_engine.tokens
    assert tokens is not None
    params = orpheus_engine._sampling(SamplingOverrides())
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.9, 50, 0.95, 1.0)
    assert params.max_tokens == DEFAULT_MAX_TOKENS and params.seed == 0
    assert params.stop_token_ids == (tokens.end_of_speech, tokens.end_of_ai, *tokens.eos)
    assert params.allowed_token_ids == frozenset(tokens.audio_ids) | set(params.stop_token_ids)
    custom = orpheus_engine._sampling(SamplingOverrides(temperature=0.3, top_k=5, max_tokens=77, seed=9))
    assert (custom.temperature, custom.top_k, custom.max_tokens, custom.seed) == (0.3, 5, 77, 9)
    # max_tokens really reaches the backend: 70 tokens = 10 frames.
    audio = np.concatenate(await _synth(orpheus_engine, sampling=SamplingOverrides(max_tokens=70, temperature=0.0)))
    assert audio.size == 10 * SAMPLES_PER_FRAME


async def test_long_text_segments_in_order(
    orpheus_engine: OrpheusEngine, tiny_snac: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    priorities = record_priorities(orpheus_engine, monkeypatch)
    text = "The first sentence is here. The second one follows it. And a third one ends the text."
    from flashtts_core.text import split_text

    segments = split_text(text, count_tokens=orpheus_engine.count_tokens, length_threshold=20, window_size=20)
    assert len(segments) == 3
    chunks = await _synth(orpheus_engine, text=text, length_threshold=20, window_size=20)
    audio = np.concatenate(chunks)
    assert audio.size == 3 * FRAMES * SAMPLES_PER_FRAME
    # One continuous frame stream: the joins are decoded like any adjacent frames (no clicks, no gaps).
    frames = np.tile(orpheus_script_frames(frames=FRAMES), (3, 1))
    (expected,) = tiny_snac.decode([frames])  # type: ignore[attr-defined]
    np.testing.assert_allclose(audio, expected, atol=1e-5)
    assert priorities == [FIRST_AUDIO, LATER_AUDIO, LATER_AUDIO]  # the first segment gates the first audio


async def test_concurrent_requests_share_the_decode_batcher(orpheus_engine: OrpheusEngine) -> None:
    batcher = orpheus_engine._batcher
    assert batcher is not None
    before = batcher.items_run
    results = await asyncio.gather(*(_synth(orpheus_engine, stream=True) for _ in range(3)))
    for chunks in results:
        assert sum(c.size for c in chunks) == FRAMES * SAMPLES_PER_FRAME
    assert batcher.items_run - before == 9  # three windows per request, all through the batcher


async def test_voices_and_unsupported_features(orpheus_engine: OrpheusEngine) -> None:
    with pytest.raises(VoiceNotFoundError, match=r"unknown voice 'pierre'.*tara, leah") as info:
        await _synth(orpheus_engine, voice="pierre")
    assert info.value.param == "voice"
    prompt = VoicePrompt(engine="orpheus", fingerprint="x", data={})
    with pytest.raises(UnsupportedFeatureError, match="cannot clone"):
        await _synth(orpheus_engine, prompt=prompt)
    with pytest.raises(InvalidRequestError, match="empty"):
        await _synth(orpheus_engine, text="   ")
    audio = await _synth(orpheus_engine, voice="zoe", sampling=SamplingOverrides(max_tokens=14))
    assert sum(a.size for a in audio) == 2 * SAMPLES_PER_FRAME


async def test_service_rejects_pitch_and_speed(orpheus_engine: OrpheusEngine) -> None:
    from flashtts_core.service import SynthesisService
    from flashtts_core.voices import VoiceStore

    info = orpheus_engine.info
    store = VoiceStore(
        None,
        engine="orpheus",
        fingerprint=orpheus_engine.fingerprint,
        prepare=orpheus_engine.prepare_voice,
        builtin=frozenset(v.name for v in info.builtin_voices),
    )
    service = SynthesisService(orpheus_engine, store)
    for field in ("pitch", "speed"):
        request = SynthesisRequest(request_id="p", text=TEXT, **{field: "high"})  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match=f"does not support '{field}'") as err:
            async for _ in service.synthesize(request):
                pass
        assert err.value.param == field
    assert service.resolve_voice(None) == ("tara", None)
    with pytest.raises(VoiceNotFoundError, match="available voices: tara"):
        service.resolve_voice("nobody")
    with pytest.raises(UnsupportedFeatureError):
        await orpheus_engine.prepare_voice(ReferenceAudio(data=b"RIFF"))


async def test_a_too_small_client_max_tokens_is_a_client_error(orpheus_engine: OrpheusEngine) -> None:
    """Cut by the client's own cap before a whole frame: a 400 naming max_tokens (no retry, no 500)."""
    with pytest.raises(InvalidRequestError) as excinfo:
        await _synth(orpheus_engine, sampling=SamplingOverrides(max_tokens=5))  # fewer tokens than one frame
    assert excinfo.value.param == "max_tokens" and excinfo.value.code == "max_tokens_too_small"


def test_no_valid_frame_is_a_generation_error(caplog: pytest.LogCaptureFixture) -> None:
    """A model whose every frame is malformed: retried once with a fresh seed, then a clear GenerationError."""
    from flashtts_core.testing.tiny_orpheus import tiny_orpheus_dir

    engine = start_engine(tiny_orpheus_dir(frames=2, malformed_frames=(0, 1)))
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(GenerationError, match="no valid audio frames"):
            asyncio.run(_synth(engine))
        assert "attempt 2" in caplog.text
    finally:
        stop_engine(engine)


async def test_warmup(orpheus_engine: OrpheusEngine) -> None:
    await orpheus_engine.warmup()


def test_malformed_frame_is_skipped_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong-slot token (slot 4 where slot 3 belongs, in frame 5) costs exactly that frame, with a warning."""
    from flashtts_core.engines.orpheus.snac import load_snac
    from flashtts_core.testing.tiny_orpheus import tiny_orpheus_dir

    model_dir = tiny_orpheus_dir(frames=12, malformed_frames=(5,))
    engine = start_engine(model_dir)
    try:
        with caplog.at_level(logging.WARNING):
            audio = np.concatenate(asyncio.run(_synth(engine)))
    finally:
        stop_engine(engine)
    assert "skipped 1 malformed frame(s) (7 tokens" in caplog.text and "kept 11 valid frames" in caplog.text
    assert audio.size == 11 * SAMPLES_PER_FRAME
    frames = np.delete(orpheus_script_frames(frames=12), 5, axis=0)
    (expected,) = load_snac(model_dir / "snac").decode([frames])
    np.testing.assert_allclose(audio, expected, atol=1e-5)


def test_flashtts_infer_cli(orpheus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flashtts_torch import TorchBackend

    from flashtts_core.cli import main
    from flashtts_core.plugins import registry as registry_module

    # The entry point is declared in pyproject.toml; register it explicitly in case the installed metadata predates it.
    registry = registry_module.Registry()
    if "orpheus" not in registry.names("engine"):
        registry.register("engine", "orpheus", OrpheusEngine)
    if "torch" not in registry.names("backend"):
        registry.register("backend", "torch", TorchBackend)
    monkeypatch.setattr(registry_module, "_registry", registry)
    out = tmp_path / "x.wav"
    argv = ["infer", "--model_path", str(orpheus_dir), "--backend", "torch", "-i", TEXT, "-o", str(out)]
    argv += ["--llm_device", "cpu", "--detokenizer_device", "cpu", "--max_length", "1024"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 24000 and wav.getnchannels() == 1
        assert wav.getnframes() == FRAMES * SAMPLES_PER_FRAME
