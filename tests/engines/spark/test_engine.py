"""SparkEngine end to end on CPU: the tiny scripted checkpoint through the real torch backend.

The scripted tiny LLM (flashtts_core.testing.tiny_spark_llm) emits, for every prompt kind, the structure the real
model was trained to produce, with known tokens (``spark_script_info``), so prompts, voices and audio lengths can be
asserted exactly. Backend calls are observed with a pass-through spy; nothing is faked.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import pytest_asyncio

from flashtts_core.engines.spark.engine import SparkEngine
from flashtts_core.errors import (
    AudioDecodeError,
    GenerationError,
    InvalidRequestError,
    UnsupportedSamplingError,
    VoiceNotFoundError,
)
from flashtts_core.plugins.base import BackendBase
from flashtts_core.plugins.types import (
    FIRST_AUDIO,
    LATER_AUDIO,
    BackendCapabilities,
    BackendConfig,
    EngineConfig,
    GenerationRequest,
    ReferenceAudio,
    SamplingOverrides,
    SynthesisRequest,
    VoicePrompt,
)
from flashtts_core.testing.tiny_spark_llm import SparkScriptInfo, spark_script_info

pytest.importorskip("torch")
flashtts_torch = pytest.importorskip("flashtts_torch")

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPT = 320
N_SEMANTIC = 150  # semantic tokens per scripted completion


# --- fixtures -------------------------------------------------------------------------------------------------------


async def _start(model_dir: Path, **engine_kwargs: Any) -> tuple[BackendBase, SparkEngine]:
    backend = flashtts_torch.TorchBackend(
        BackendConfig(model_dir=str(model_dir / "LLM"), device="cpu", dtype="float32", max_batch_size=4)
    )
    await backend.startup()
    engine = _engine(model_dir, backend, **engine_kwargs)
    await engine.startup()
    return backend, engine


def _engine(model_dir: Path, backend: BackendBase, **kwargs: Any) -> SparkEngine:
    config = EngineConfig(
        model_dir=str(model_dir), device="cpu", detokenizer_device="cpu", batch_size=4, wait_timeout=0.002, **kwargs
    )
    return SparkEngine(config, backend)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def started(spark_checkpoint: Path) -> AsyncIterator[tuple[BackendBase, SparkEngine]]:
    backend, engine = await _start(spark_checkpoint)
    yield backend, engine
    await engine.shutdown()
    await backend.shutdown()


@pytest.fixture
def engine(started: tuple[BackendBase, SparkEngine]) -> SparkEngine:
    return started[1]


@pytest.fixture(scope="module")
def info() -> SparkScriptInfo:
    return spark_script_info(semantic_tokens=N_SEMANTIC)


class Spy:
    """Records the GenerationRequests sent to the real backend (and passes them on unchanged)."""

    def __init__(self, backend: BackendBase) -> None:
        self.requests: list[GenerationRequest] = []
        self._generate = backend.generate

    def __call__(self, request: GenerationRequest) -> Any:
        self.requests.append(request)
        return self._generate(request)


@pytest.fixture
def spy(engine: SparkEngine, monkeypatch: pytest.MonkeyPatch) -> Spy:
    recorder = Spy(engine.backend)
    monkeypatch.setattr(engine.backend, "generate", recorder)
    return recorder


@pytest.fixture
def decoded_globals(engine: SparkEngine, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Global ids of every detokenize call."""
    seen: list[list[int]] = []
    original = engine._decode

    async def record(global_ids: np.ndarray, semantic_ids: Any, *, priority: int) -> np.ndarray:
        seen.append([int(g) for g in global_ids])
        return await original(global_ids, semantic_ids, priority=priority)

    monkeypatch.setattr(engine, "_decode", record)
    return seen


def _wav(seconds: float, rate: int = 16000) -> bytes:
    from flashtts_core.audio.encode import encode_all

    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return encode_all(tone.astype(np.float32), "wav", input_rate=rate)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def voice(started: tuple[BackendBase, SparkEngine]) -> VoicePrompt:
    return await started[1].prepare_voice(ReferenceAudio(data=_wav(1.5), text=None))


async def _collect(engine: SparkEngine, **kwargs: Any) -> list[np.ndarray]:
    request = SynthesisRequest(request_id=kwargs.pop("request_id", "t"), **kwargs)
    return [chunk.samples async for chunk in engine.synthesize(request)]


def _ids(engine: SparkEngine, markup: str) -> list[int]:
    assert engine.tokenizer is not None
    return engine.tokenizer.encode_markup(markup)


# --- basics -------------------------------------------------------------------------------------------------------


async def test_detect_info_and_fingerprint(engine: SparkEngine, spark_checkpoint: Path, tmp_path: Path) -> None:
    assert SparkEngine.detect(spark_checkpoint) and not SparkEngine.detect(spark_checkpoint / "LLM")
    assert SparkEngine.llm_dir(spark_checkpoint) == spark_checkpoint / "LLM"
    info = engine.info
    assert info.sample_rate == 16000 and info.default_voice == "female" and info.supports_cloning
    assert [v.name for v in info.builtin_voices] == ["female", "male"]
    assert info.controls == {"pitch", "speed"}
    assert engine.fingerprint.startswith("spark-")
    # The fingerprint follows the codec weights' content, not their path.
    (tmp_path / "BiCodec").mkdir()
    weights = tmp_path / "BiCodec" / "model.safetensors"
    shutil.copyfile(spark_checkpoint / "BiCodec" / "model.safetensors", weights)
    copy = _engine(tmp_path, engine.backend)
    assert copy.fingerprint == engine.fingerprint
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _engine(tmp_path, engine.backend).fingerprint != engine.fingerprint


@pytest.mark.parametrize(("voice_name", "pitch", "speed"), [("female", None, None), ("male", "high", "very_low")])
async def test_controllable_voices(
    engine: SparkEngine, spy: Spy, info: SparkScriptInfo, voice_name: str, pitch: str | None, speed: str | None
) -> None:
    chunks = await _collect(engine, text="Hello world.", voice=voice_name, pitch=pitch, speed=speed)
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32 and audio.size == N_SEMANTIC * SPT
    assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0
    (request,) = spy.requests
    assert engine.tokenizer is not None
    expected = engine.tokenizer.controllable_prompt("Hello world.", gender=voice_name, pitch=pitch, speed=speed)  # type: ignore[arg-type]
    assert list(request.prompt_token_ids) == expected
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.max_tokens) == (0.9, 50, 0.95, 4096)
    assert sampling.seed == 0 and sampling.stop_token_ids == engine.tokenizer.stop_ids
    assert sampling.allowed_token_ids == engine.tokenizer.allowed_ids


async def test_clone_without_transcript(engine: SparkEngine, voice: VoicePrompt, spy: Spy) -> None:
    data = voice.data
    assert voice.engine == "spark" and voice.fingerprint == engine.fingerprint
    assert len(data["global_ids"]) == 32 and data["text"] is None
    assert abs(len(data["semantic_ids"]) - 75) <= 1  # 1.5 s at 50 tokens/s
    chunks = await _collect(engine, text="Clone me.", prompt=voice, sampling=SamplingOverrides(seed=7))
    assert sum(c.size for c in chunks) == N_SEMANTIC * SPT
    assert engine.tokenizer is not None
    expected = engine.tokenizer.clone_prompt("Clone me.", global_ids=data["global_ids"])
    assert list(spy.requests[0].prompt_token_ids) == expected
    assert spy.requests[0].sampling.seed == 7


async def test_clone_with_transcript_continues_the_reference(
    engine: SparkEngine, voice: VoicePrompt, spy: Spy, info: SparkScriptInfo
) -> None:
    prompt = msgspec.structs.replace(voice, data={**voice.data, "text": "Reference words."})
    chunks = await _collect(engine, text="New words.", prompt=prompt, pitch="high")
    ref_semantic = voice.data["semantic_ids"]
    assert engine.tokenizer is not None
    expected_prompt = engine.tokenizer.clone_prompt(
        "New words.",
        global_ids=voice.data["global_ids"],
        semantic_ids=ref_semantic,
        transcript="Reference words.",
        pitch="high",
    )
    assert list(spy.requests[0].prompt_token_ids) == expected_prompt
    # The scripted model continues its semantic chain after the reference's last token.
    chain = list(info.semantic_ids)
    expected_tokens = len(chain) - chain.index(ref_semantic[-1]) - 1 if ref_semantic[-1] in chain else len(chain)
    assert sum(c.size for c in chunks) == expected_tokens * SPT


async def test_long_text_keeps_one_voice(
    engine: SparkEngine, spy: Spy, decoded_globals: list[list[int]], info: SparkScriptInfo
) -> None:
    text = "The first sentence is here. The second one follows it. A third sentence ends the text."
    chunks = await _collect(engine, text=text, voice="male", length_threshold=5, window_size=25)
    n_segments = len(spy.requests)
    assert n_segments == 3  # one sentence per segment (16-17 tokens each with the tiny tokenizer)
    # The first segment gates the first audio: backends admit it ahead of other requests' later segments.
    assert [r.priority for r in spy.requests] == [FIRST_AUDIO, LATER_AUDIO, LATER_AUDIO]
    assert sum(c.size for c in chunks) == n_segments * N_SEMANTIC * SPT
    fragment = _ids(engine, info.acoustic_prefix)
    first, *later = (list(r.prompt_token_ids) for r in spy.requests)
    assert first[-len(fragment) :] != fragment
    for prompt in later:
        assert prompt[-len(fragment) :] == fragment  # later segments reuse the first segment's voice
    assert decoded_globals and all(g == list(info.global_ids) for g in decoded_globals)


async def test_streaming_matches_non_streaming(engine: SparkEngine) -> None:
    text = "Streaming and whole synthesis agree."
    whole = np.concatenate(await _collect(engine, text=text, voice="female", stream=False))
    streamed_chunks = await _collect(engine, text=text, voice="female", stream=True)
    streamed = np.concatenate(streamed_chunks)
    assert len(streamed_chunks) > 1
    assert streamed.size == whole.size == N_SEMANTIC * SPT
    per_token = np.abs(streamed - whole).reshape(-1, SPT).max(axis=1)
    near_seam = np.zeros(N_SEMANTIC, dtype=bool)
    for end in (50, 140):  # non-final window ends of the streaming schedule for 150 tokens
        near_seam[end - 30 : end] = True
    assert per_token[~near_seam].max() < 1e-2


async def test_cancelling_the_stream_cancels_everything(started: tuple[BackendBase, SparkEngine]) -> None:
    backend, engine = started
    text = " ".join(f"Sentence number {i} is here." for i in range(6))
    request = SynthesisRequest(request_id="cancel-me", text=text, stream=True, length_threshold=5, window_size=25)
    stream = engine.synthesize(request)
    first = await stream.__anext__()
    assert first.samples.size > 0
    await stream.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("spark-cancel-me")]
    for _ in range(100):
        if (await backend.health()).running == 0:
            break
        await asyncio.sleep(0.02)
    assert (await backend.health()).running == 0


# --- errors ---------------------------------------------------------------------------------------------------------


def _bad_references(tmp: Path) -> dict[str, tuple[bytes, str]]:
    rng = np.random.default_rng(3)
    return {
        "empty": (b"", "empty"),
        "random": (rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), "could not be"),
        "short": (_wav(0.2), "at least 0.5 s"),
        "long": (_wav(31.0, rate=8000), "longer than the limit of 30 s"),
        "text": (b"This is a text file, not audio.\n" * 20, "could not be"),
    }


@pytest.mark.parametrize("case", ["empty", "random", "short", "long", "text"])
async def test_bad_reference_audio(engine: SparkEngine, case: str, tmp_path: Path) -> None:
    data, message = _bad_references(tmp_path)[case]
    with pytest.raises(AudioDecodeError, match=message) as excinfo:
        await engine.prepare_voice(ReferenceAudio(data=data))
    assert excinfo.value.param == "reference_audio"
    assert len(excinfo.value.message) < 300


async def test_request_errors(engine: SparkEngine, voice: VoicePrompt) -> None:
    with pytest.raises(VoiceNotFoundError, match="female and male"):
        await _collect(engine, text="hi", voice="alice")
    with pytest.raises(InvalidRequestError, match="nothing to speak"):
        await _collect(engine, text=" ?! ")
    other = msgspec.structs.replace(voice, engine="orpheus")
    with pytest.raises(InvalidRequestError, match="orpheus"):
        await _collect(engine, text="hi", prompt=other)
    broken = msgspec.structs.replace(voice, data={"global_ids": [1, 2, 3]})
    with pytest.raises(InvalidRequestError, match="no valid Spark tokens"):
        await _collect(engine, text="hi", prompt=broken)


async def test_a_too_small_client_max_tokens_is_a_client_error(engine: SparkEngine, voice: VoicePrompt) -> None:
    """Output cut by the client's own cap before any audio: a 400 naming max_tokens, no retry, no 500."""
    for kwargs in ({"voice": "female"}, {"prompt": voice}):
        with pytest.raises(InvalidRequestError) as excinfo:
            await _collect(engine, text="hello", sampling=SamplingOverrides(max_tokens=1), **kwargs)
        assert excinfo.value.param == "max_tokens" and excinfo.value.code == "max_tokens_too_small"


async def test_sampling_follows_backend_capabilities(
    engine: SparkEngine, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine.backend.capabilities
    limited = msgspec.structs.replace(real, sampling=frozenset({"temperature", "top_p"}))
    monkeypatch.setattr(type(engine.backend), "capabilities", property(lambda self: limited))
    assert isinstance(engine.backend.capabilities, BackendCapabilities)
    # Engine defaults only for what the backend honours; no seed, no allowed_token_ids.
    chunks = await _collect(engine, text="Limited backend.", voice="female")
    assert sum(c.size for c in chunks) == N_SEMANTIC * SPT
    sampling = spy.requests[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.9, 0.95, 0)
    assert sampling.seed is None and sampling.allowed_token_ids is None
    # An explicit request for an unsupported field is the backend's error, not silently dropped.
    with pytest.raises(UnsupportedSamplingError, match="top_k"):
        await _collect(engine, text="Limited backend.", sampling=SamplingOverrides(top_k=5))


async def test_degenerate_model_fails_after_one_retry(spark_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

    backend, engine = await _start(tiny_checkpoint_dir("spark", semantic_tokens=0))
    try:
        spy = Spy(backend)
        monkeypatch.setattr(backend, "generate", spy)
        with pytest.raises(GenerationError, match="no semantic tokens") as excinfo:
            await _collect(engine, text="Nothing comes out.", voice="female")
        assert len(spy.requests) == 2
        assert spy.requests[0].sampling.seed != spy.requests[1].sampling.seed
        # The retry keeps the voice found by the first attempt.
        fragment = spy.requests[1].prompt_token_ids[len(spy.requests[0].prompt_token_ids) :]
        assert engine.tokenizer is not None and engine.tokenizer.parse_fragment(fragment) is not None
        assert "<|" not in excinfo.value.message and len(excinfo.value.message) < 200
        voice = await engine.prepare_voice(ReferenceAudio(data=_wav(1.0)))
        with pytest.raises(GenerationError):
            await _collect(engine, text="Nothing comes out.", prompt=voice)
    finally:
        await engine.shutdown()
        await backend.shutdown()


# --- fix_voice and warm-up ------------------------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"


async def test_fix_voice_pins_and_persists(
    started: tuple[BackendBase, SparkEngine],
    spark_checkpoint: Path,
    state_dir: Path,
    info: SparkScriptInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = started[0]
    spy = Spy(backend)
    monkeypatch.setattr(backend, "generate", spy)
    first = _engine(spark_checkpoint, backend, state_dir=str(state_dir), options={"fix_voice": True})
    await first.startup()
    try:
        await first.warmup()  # warm-up never pins a voice
        assert not (state_dir / "spark_fixed_voices.json").exists()
        await asyncio.gather(*(_collect(first, text=f"Pin {i}.", voice="female") for i in range(2)))
    finally:
        await first.shutdown()
    saved = json.loads((state_dir / "spark_fixed_voices.json").read_text(encoding="utf-8"))
    assert saved["voices"]["female"]["prompt"] == info.acoustic_prefix
    assert saved["voices"]["female"]["global_ids"] == list(info.global_ids)
    fragment = _ids(started[1], info.acoustic_prefix)
    pinned_prompts = [r for r in spy.requests[1:] if list(r.prompt_token_ids[-len(fragment) :]) == fragment]
    assert len(pinned_prompts) == 1  # the concurrent second request waited for the pin and reused it

    spy.requests.clear()
    second = _engine(spark_checkpoint, backend, state_dir=str(state_dir), options={"fix_voice": True})
    await second.startup()
    try:
        chunks = await _collect(second, text="After a restart.", voice="female")
    finally:
        await second.shutdown()
    assert sum(c.size for c in chunks) == N_SEMANTIC * SPT
    assert list(spy.requests[0].prompt_token_ids[-len(fragment) :]) == fragment
