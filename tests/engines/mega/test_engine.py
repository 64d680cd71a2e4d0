"""The MegaTTS3 engine end to end on the real torch backend (G2P) and the tiny scripted checkpoint."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from flashtts_core.engines.mega.engine import MegaEngine
from flashtts_core.engines.mega.frontend import ReferenceVoice, integrated_loudness
from flashtts_core.errors import InvalidRequestError, VoiceNotFoundError
from flashtts_core.plugins import FIRST_AUDIO, LATER_AUDIO
from flashtts_core.plugins.types import ReferenceAudio, SamplingOverrides, SynthesisRequest, VoicePrompt
from flashtts_core.testing.tiny_mega import ALIGNER_SCRIPT, G2P_SCRIPT
from tests.engines.helpers import record_priorities

pytest.importorskip("flashtts_torch")

SAMPLES_PER_FRAME = 960
#: One segment of the scripted G2P: durations 8 (first phone), 3 x 3, 32 (comma), 3 x 2, then the final stop at
#: 64..70 (clamped to >= 64 before and after the ±10 % jitter) → 119..125, padded to 120 or 128 mel frames.
SEGMENT_SAMPLES = (30 * SAMPLES_PER_FRAME, 32 * SAMPLES_PER_FRAME)


async def _synth(
    engine: MegaEngine, prompt: VoicePrompt | None, text: str = "Hello there.", **kwargs: object
) -> list[np.ndarray]:
    request = SynthesisRequest(request_id=f"t-{id(kwargs)}", text=text, prompt=prompt, **kwargs)  # type: ignore[arg-type]
    return [chunk.samples async for chunk in engine.synthesize(request)]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_engine_module_import_is_light() -> None:
    probe = (
        "import sys, flashtts_core.engines.mega.engine, flashtts_core.engines.mega\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'av', 'tokenizers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == []


def test_detect_and_layout(mega_dir: Path, tmp_path: Path) -> None:
    assert MegaEngine.detect(mega_dir)
    assert MegaEngine.llm_dir(mega_dir) == mega_dir / "g2p"
    assert MegaEngine.default_role_dir() == "data/mega-roles"
    for sub in ("aligner_lm", "diffusion_transformer", "duration_lm", "g2p"):
        (tmp_path / sub).mkdir()
    assert not MegaEngine.detect(tmp_path)  # no wavvae/
    (tmp_path / "wavvae").mkdir()
    assert MegaEngine.detect(tmp_path)


def test_info(mega_engine: MegaEngine) -> None:
    info = mega_engine.info
    assert (info.name, info.sample_rate, info.builtin_voices, info.default_voice) == ("mega", 24000, (), None)
    assert info.supports_cloning and info.requires_latent and info.controls == frozenset()
    assert mega_engine.fingerprint.startswith("mega-")


def test_voice_prompt_is_json_and_aligned(mega_prompt: VoicePrompt) -> None:
    data = msgspec.json.decode(msgspec.json.encode(mega_prompt))
    voice = ReferenceVoice.from_data(data["data"])
    merged = [p for p, _ in ALIGNER_SCRIPT]
    assert len(voice.phones) == len(merged) and voice.phones[0] == 145  # the scripted aligner's phones
    # Scripted ends 12, 40, 64, 80, 104, 140; the 1 s clip pads to 152 mel frames, the deficit goes to the last.
    assert voice.durations == (12, 28, 24, 16, 24, 48)
    assert voice.latent.shape == (38, 32)
    assert voice.loudness is not None and -40 < voice.loudness < 0


async def test_clone_non_streaming(mega_engine: MegaEngine, mega_prompt: VoicePrompt) -> None:
    chunks = await _synth(mega_engine, mega_prompt)
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32 and audio.size in SEGMENT_SAMPLES
    assert np.isfinite(audio).all() and 0 < np.abs(audio).max() < 1
    loudness = integrated_loudness(audio)
    assert loudness == pytest.approx(ReferenceVoice.from_data(dict(mega_prompt.data)).loudness, abs=0.05)
    # Reproducible with the same seed, different with another.
    again = np.concatenate(await _synth(mega_engine, mega_prompt))
    np.testing.assert_array_equal(audio, again)
    other = np.concatenate(await _synth(mega_engine, mega_prompt, sampling=SamplingOverrides(seed=7)))
    assert other.size in SEGMENT_SAMPLES and (other.size != audio.size or not np.allclose(other, audio))


async def test_clone_from_reference_upload(mega_engine: MegaEngine, mega_reference: tuple[bytes, bytes]) -> None:
    wav, npy = mega_reference
    prompt = await mega_engine.prepare_voice(ReferenceAudio(data=wav, latent=npy, text="ignored"))
    assert prompt.engine == "mega" and prompt.fingerprint == mega_engine.fingerprint
    # A latent a little shorter than the padded clip (e.g. computed without the padding) shortens the prompt.
    latent = np.load(io.BytesIO(npy))[:, :30]
    short = await mega_engine.prepare_voice(ReferenceAudio(data=wav, latent=_npy(latent)))
    voice = ReferenceVoice.from_data(dict(short.data))
    assert voice.latent.shape == (30, 32) and sum(voice.durations) == 120
    audio = np.concatenate(await _synth(mega_engine, short))
    assert audio.size in SEGMENT_SAMPLES


async def test_bad_latents_are_refused(mega_engine: MegaEngine, mega_reference: tuple[bytes, bytes]) -> None:
    wav, npy = mega_reference
    latent = np.load(io.BytesIO(npy))
    cases = {
        "missing": None,
        "not npy": b"\x93NUMPY garbage",
        "2-D": _npy(latent[0]),
        "wrong width": _npy(latent[..., :16]),
        "far shorter than the audio": _npy(latent[:, :10]),
        "nan": _npy(np.full_like(latent, np.nan)),
    }
    for case, data in cases.items():
        with pytest.raises(InvalidRequestError) as info:
            await mega_engine.prepare_voice(ReferenceAudio(data=wav, latent=data))
        assert info.value.param == "latent_file", case
        assert "MegaTTS3 authors" in info.value.message, case


async def test_streaming_matches_non_streaming(mega_engine: MegaEngine, mega_prompt: VoicePrompt) -> None:
    """``dur_alpha`` 4 stretches a segment to 58 latent frames: streamed as a 25-frame window, then the rest. The
    windows decode like the one-shot decode; the stream's loudness gain comes from the first window only, so the two
    agree up to one factor per segment."""
    options = {"dur_alpha": 4.0}
    streamed = await _synth(mega_engine, mega_prompt, stream=True, options=options)
    whole = np.concatenate(await _synth(mega_engine, mega_prompt, stream=False, options=options))
    joined = np.concatenate(streamed)
    assert joined.size == whole.size and whole.size % SAMPLES_PER_FRAME == 0
    assert 50 * SAMPLES_PER_FRAME < whole.size < 75 * SAMPLES_PER_FRAME  # durations x4 (the final one capped)
    # First window 25 frames (minus the cross-fade reserve), then the rest; the reserve comes last.
    sizes = [c.size for c in streamed]
    assert sizes[0] == 25 * SAMPLES_PER_FRAME - 3840 and sizes[-1] == 3840 and len(sizes) == 3
    scale = float(np.dot(joined, whole) / np.dot(whole, whole))
    assert 0.25 < scale < 4
    np.testing.assert_allclose(joined, scale * whole, atol=1e-4 * float(np.abs(whole).max()))


async def test_long_text_segments_and_crossfade(
    mega_engine: MegaEngine, mega_prompt: VoicePrompt, monkeypatch: pytest.MonkeyPatch
) -> None:
    priorities = record_priorities(mega_engine, monkeypatch)
    text = "The first sentence is here. The second one follows it. And a third one ends the text."
    from flashtts_core.text import split_text

    segments = split_text(text, count_tokens=mega_engine.count_tokens, length_threshold=20, window_size=20)
    assert len(segments) == 3
    kwargs = {"length_threshold": 20, "window_size": 20}
    whole = np.concatenate(await _synth(mega_engine, mega_prompt, text=text, **kwargs))
    # The first segment as a single one; the later ones start with the G2P's sil, which (not being the first phone
    # of the first segment) gets the 64-frame sentence-pause minimum; the middle one ends 32 frames longer (all
    # multiples of 8 mel frames = 1920 samples); 0.16 s overlaps at both joins.
    parts = whole.size + 2 * 3840
    assert parts % 1920 == 0
    # One G2P generation per segment; the first gates the first audio.
    assert priorities == [FIRST_AUDIO, LATER_AUDIO, LATER_AUDIO]
    priorities.clear()
    later = (64 + 3 * 5 + 32 + 64) * 240  # sil, 5 short phones, comma, stop: the least a later segment can be
    assert SEGMENT_SAMPLES[0] + 2 * later <= parts <= SEGMENT_SAMPLES[1] + 2 * (later + 32 * 240 + 8 * 240 + 20 * 240)
    streamed = await _synth(mega_engine, mega_prompt, text=text, stream=True, **kwargs)
    joined = np.concatenate(streamed)
    assert len(streamed) >= 4 and joined.size == whole.size
    # The first segment fits one window: identical. The later ones stream in two windows, with the loudness gain of
    # their first window: equal up to a gain close to 1.
    first_end = SEGMENT_SAMPLES[0] - 3840
    np.testing.assert_allclose(joined[:first_end], whole[:first_end], atol=1e-5)
    assert np.abs(joined - whole).max() <= 0.1 * np.abs(whole).max()


async def test_options_and_voice_errors(mega_engine: MegaEngine, mega_prompt: VoicePrompt) -> None:
    fast = np.concatenate(await _synth(mega_engine, mega_prompt, options={"time_step": 2, "p_w": 1.0, "t_w": 0.0}))
    assert fast.size in SEGMENT_SAMPLES
    for bad in ({"p_w": -1}, {"time_step": 0}, {"guidance": 3}):
        with pytest.raises(InvalidRequestError) as info:
            await _synth(mega_engine, mega_prompt, options=bad)
        assert info.value.param == "options"
    with pytest.raises(InvalidRequestError, match="no built-in voices"):
        await _synth(mega_engine, None)
    with pytest.raises(VoiceNotFoundError):
        await _synth(mega_engine, None, voice="female")
    foreign = VoicePrompt(engine="spark", fingerprint="x", data={"global_ids": []})
    with pytest.raises(InvalidRequestError, match="re-add the voice"):
        await _synth(mega_engine, foreign)
    with pytest.raises(InvalidRequestError, match="empty"):
        await _synth(mega_engine, mega_prompt, text=" ... ")


async def test_g2p_prompt_sampling_and_concurrency(mega_engine: MegaEngine, mega_prompt: VoicePrompt) -> None:
    tokens = mega_engine.tokens
    assert tokens is not None
    params = mega_engine._sampling(SamplingOverrides())
    assert params.temperature == 0.0 and params.max_tokens == 256  # greedy, as the original
    assert params.stop_token_ids[0] == tokens.speech_start + 801
    assert params.allowed_token_ids == tokens.allowed_ids
    assert mega_engine.g2p_prompt("Hi")[-1] == tokens.speech_start + 145
    # Sampled G2P still follows the script (same phones → same length); requests can run concurrently.
    results = await asyncio.gather(
        _synth(mega_engine, mega_prompt, sampling=SamplingOverrides(temperature=0.8, top_k=20)),
        _synth(mega_engine, mega_prompt, stream=True),
    )
    for chunks in results:
        assert sum(c.size for c in chunks) in SEGMENT_SAMPLES
    assert len(G2P_SCRIPT) == 7


async def test_role_speech_through_the_service(mega_engine: MegaEngine, mega_role_dir: Path, tmp_path: Path) -> None:
    """A ``data/mega-roles`` style folder (any wav + any npy) becomes a voice; its prompt is cached beside it."""
    from flashtts_core.service import SynthesisService
    from flashtts_core.voices import VoiceStore

    roles = tmp_path / "mega-roles"
    shutil.copytree(mega_role_dir, roles)
    store = VoiceStore(
        roles,
        engine=mega_engine.name,
        fingerprint=mega_engine.fingerprint,
        prepare=mega_engine.prepare_voice,
        builtin=frozenset(),
    )
    await store.load()
    assert store.names() == ["tiny"]
    cached = json.loads((roles / "tiny" / "flashtts_prompt.json").read_text())
    assert cached["engine"] == "mega" and cached["data"]["latent_frames"] == 38
    service = SynthesisService(mega_engine, store)
    voice, prompt = service.resolve_voice("tiny")
    assert voice is None and prompt is not None
    request = SynthesisRequest(request_id="role", text="Hello there.", prompt=prompt)
    audio = np.concatenate([c async for c in service.synthesize(request)])
    assert audio.size in SEGMENT_SAMPLES
    # The service reports latent problems against latent_file.
    wav = (roles / "tiny" / "tiny.wav").read_bytes()
    with pytest.raises(InvalidRequestError) as info:
        await service.reference_prompt(ReferenceAudio(data=wav, latent=None))
    assert info.value.param == "latent_file"
