"""The Spark-TTS engine: text → Qwen2 LLM (any backend) → BiCodec semantic tokens → 16 kHz audio.

Modes (reference-behaviour §3.4):

* **controllable** — built-in voices ``female``/``male``: the LLM invents a voice (an "acoustic fragment" of pitch /
  speed values and 32 global tokens) and then speaks; pitch/speed labels steer it;
* **clone** — a :class:`VoicePrompt` made by :meth:`SparkEngine.prepare_voice` from reference audio: its 32 global
  tokens fix the voice; with a transcript the reference's semantic tokens are given too and the LLM continues them.

Long texts are split (:func:`flashtts_core.text.split_text`, in LLM tokens). All segments of a request share one
voice: clone segments use the same reference tokens; in controllable mode the first segment's acoustic fragment is
appended to the prompts of the others (as the original does), which start as soon as that fragment is known instead
of after the whole first segment. Segments generate concurrently (bounded by the backend's batch size) and are
consumed in order.

Audio is always produced incrementally: the semantic tokens of all segments form one stream that a
:class:`~flashtts_core.engines.spark.streaming.StreamAssembler` decodes in windows with left context and short
cross-fades. Because segment boundaries are invisible to the decoder (one continuous token stream, one voice), the
join between segments is whatever the codec makes of adjacent tokens — no clicks, no inserted silence, and exactly
``320`` samples per semantic token overall. ``request.stream`` only selects the window schedule: small growing
windows for early first audio, or long windows (and whole-segment buffering, which lets every degenerate segment be
retried) otherwise.

Degenerate generations (no semantic tokens; a controllable prefix without exactly 32 global tokens; running into the
engine's default ``max_tokens`` without an end token) are retried once with a fresh seed, then raise
:class:`GenerationError`. A retry is only possible while none of that segment's audio has been sent; a streamed
segment that hits the default token limit after audio went out is kept (and logged).

Heavy imports (torch via BiCodec, PyAV via the audio decoder) happen in :meth:`SparkEngine.startup` /
:meth:`SparkEngine.prepare_voice`, so ``import flashtts_core.engines.spark.engine`` stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import anyio.to_thread
import msgspec
import numpy as np

from flashtts_core.batching import DynamicBatcher
from flashtts_core.engines.common import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SAMPLING,
    build_sampling,
    resolve_device,
    retry_seed,
    segment_concurrency,
    set_torch_threads,
    token_budget_error,
)
from flashtts_core.engines.spark.streaming import (
    NON_STREAMING_SCHEDULE,
    STREAMING_SCHEDULE,
    StreamAssembler,
    StreamWindow,
)
from flashtts_core.engines.spark.tokenization import GENDERS, SparkTokenizer
from flashtts_core.errors import (
    BackendNotReadyError,
    CheckpointError,
    GenerationError,
    InvalidRequestError,
    VoiceNotFoundError,
)
from flashtts_core.plugins.base import BackendBase, EngineBase
from flashtts_core.plugins.types import (
    FIRST_AUDIO,
    LATER_AUDIO,
    AudioChunk,
    EngineConfig,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    ReferenceAudio,
    SamplingOverrides,
    SamplingParams,
    SynthesisRequest,
    VoiceInfo,
    VoicePrompt,
)
from flashtts_core.text import split_text

if TYPE_CHECKING:
    from flashtts_core.engines.spark.bicodec import BiCodec

__all__ = ("SparkEngine", "SparkOptions")

logger = logging.getLogger(__name__)

#: FlashTTS's sampling defaults for Spark (models.md §A.10); the original CLI used temperature 0.8 / 3000 tokens.
SAMPLE_RATE = 16000
REFERENCE_MIN_SECONDS = 0.5
REFERENCE_MAX_SECONDS = 30.0
WARMUP_MAX_TOKENS = 128
_FIXED_VOICES_FILE = "spark_fixed_voices.json"
_FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed from each end of the codec weights
_BAD_PROMPT = "the voice prompt has no valid Spark tokens; re-add the voice"


class SparkOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``--engine_option`` settings of the Spark engine."""

    # wav2vec2 attention kernel of the reference-audio encoder (original --wav2vec_attn_implementation);
    # flash_attention_2 without the flash-attn package falls back to sdpa with a warning.
    wav2vec_attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    # Keep the first voice generated for female/male (original --fix_voice), persisted in --state_dir if set.
    fix_voice: bool = False


class _Degenerate(Exception):
    """A segment produced unusable output; retried once, then turned into GenerationError."""


class _End:
    """Queue sentinel: a segment has delivered all its semantic tokens."""


_END = _End()


class SparkEngine(EngineBase):
    """Spark-TTS-0.5B (``LLM/`` on any backend, BiCodec + wav2vec2 in-process)."""

    name: ClassVar[str] = "spark"
    Options: ClassVar[type[msgspec.Struct]] = SparkOptions

    def __init__(self, config: EngineConfig, backend: BackendBase) -> None:
        super().__init__(config, backend)
        self.options: SparkOptions
        self.tokenizer: SparkTokenizer | None = None
        self._encoder: BiCodec | None = None  # tokenize (reference audio), on config.device
        self._decoder: BiCodec | None = None  # detokenize, on config.detokenizer_device (same object if equal)
        self._encode_batcher: DynamicBatcher[np.ndarray, tuple[np.ndarray, np.ndarray]] | None = None
        self._decode_batcher: DynamicBatcher[tuple[np.ndarray, np.ndarray], np.ndarray] | None = None
        self._fingerprint: str | None = None
        self._sample_rate = SAMPLE_RATE
        self._volume_normalize = True
        self._pinned: dict[str, list[int]] = {}  # fix_voice: gender → acoustic fragment ids
        self._pin_locks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}

    # --- discovery -----------------------------------------------------------------------------------------------

    @classmethod
    def check_available(cls) -> str | None:
        missing = [m for m in ("torch", "tokenizers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"the Spark engine needs {' and '.join(missing)}: pip install 'flashtts-core[models]'"
        return None

    @classmethod
    def detect(cls, model_dir: Path) -> bool:
        return all((Path(model_dir) / sub).is_dir() for sub in ("LLM", "BiCodec", "wav2vec2-large-xlsr-53"))

    @classmethod
    def llm_dir(cls, model_dir: Path) -> Path:
        return Path(model_dir) / "LLM"

    @classmethod
    def default_role_dir(cls) -> str | None:
        return "data/roles"

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the LLM tokenizer and BiCodec (off the event loop), start the codec batchers, load pinned voices."""
        from flashtts_core.engines.spark.bicodec import BiCodec

        model_dir = Path(self.config.model_dir)
        dtype = None if self.config.dtype == "auto" else self.config.dtype
        enc_device = resolve_device(self.config.device)
        dec_device = resolve_device(self.config.detokenizer_device)
        attn = self.options.wav2vec_attn_implementation

        def load(device: str) -> BiCodec:
            return BiCodec.from_pretrained(model_dir, device, dtype, wav2vec_attn_implementation=attn)

        encoder = await anyio.to_thread.run_sync(load, enc_device)
        decoder = encoder
        if dec_device != enc_device:
            decoder = await anyio.to_thread.run_sync(load, dec_device)
        tokenizer_file = model_dir / "LLM" / "tokenizer.json"
        tokenizer = await anyio.to_thread.run_sync(
            lambda: SparkTokenizer.from_file(tokenizer_file, global_count=encoder.num_global_tokens)
        )
        table = tokenizer.table
        if table.global_tokens.size != encoder.global_codebook_size or (
            table.semantic_tokens.size != encoder.semantic_codebook_size
        ):
            raise CheckpointError(
                f"{model_dir}: the LLM tokenizer has {table.global_tokens.size} global / {table.semantic_tokens.size} "
                f"semantic tokens but BiCodec has {encoder.global_codebook_size} / {encoder.semantic_codebook_size}"
            )
        self.tokenizer = tokenizer
        self._encoder, self._decoder = encoder, decoder
        self._sample_rate = encoder.sample_rate
        self._volume_normalize = encoder.root_config.volume_normalize
        self._fingerprint = await anyio.to_thread.run_sync(self._compute_fingerprint)
        batch, wait = self.config.batch_size, self.config.wait_timeout
        self._encode_batcher = DynamicBatcher(
            self._encode_batch, max_batch_size=batch, wait_timeout=wait, name="spark-tokenizer"
        )
        # overtake: a request's first window need not wait for a running batch of later windows (the BiCodec
        # decode keeps no state between calls, so two may run at once).
        self._decode_batcher = DynamicBatcher(
            self._decode_batch, max_batch_size=batch, wait_timeout=wait, name="spark-detokenizer", overtake=True
        )
        if self.options.fix_voice:
            self._pinned = await anyio.to_thread.run_sync(self._load_pinned)
        logger.info("spark engine ready (codec on %s, detokenizer on %s)", enc_device, dec_device)
        await super().startup()

    async def shutdown(self) -> None:
        for batcher in (self._encode_batcher, self._decode_batcher):
            if batcher is not None:
                await batcher.aclose()
        self._encode_batcher = self._decode_batcher = None
        self._encoder = self._decoder = None
        await super().shutdown()

    # --- facts -------------------------------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            sample_rate=self._sample_rate,
            builtin_voices=(
                VoiceInfo(name="female", kind="builtin", description="Spark-TTS controllable female voice"),
                VoiceInfo(name="male", kind="builtin", description="Spark-TTS controllable male voice"),
            ),
            default_voice="female",
            supports_cloning=True,
            controls=frozenset({"pitch", "speed"}),
            languages=("zh", "en"),
            reference_min_seconds=REFERENCE_MIN_SECONDS,
            reference_max_seconds=REFERENCE_MAX_SECONDS,
        )

    @property
    def fingerprint(self) -> str:
        """``spark-`` + a hash of the BiCodec weights' size and first/last MiB: cheap, and changes with the weights
        (unlike an mtime it survives copying the folder), so cached role tokens are recomputed after an update."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        path = Path(self.config.model_dir) / "BiCodec" / "model.safetensors"
        digest = hashlib.sha256()
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                digest.update(size.to_bytes(8, "little"))
                digest.update(fh.read(_FINGERPRINT_SAMPLE))
                if size > _FINGERPRINT_SAMPLE:
                    fh.seek(max(_FINGERPRINT_SAMPLE, size - _FINGERPRINT_SAMPLE))
                    digest.update(fh.read(_FINGERPRINT_SAMPLE))
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return f"spark-{digest.hexdigest()[:16]}"

    def _ready(self) -> SparkTokenizer:
        if not self._started or self.tokenizer is None:
            raise BackendNotReadyError("the spark engine is not started")
        return self.tokenizer

    # --- codec work (worker threads, batched) ------------------------------------------------------------------

    def _encode_batch(self, waves: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        encoder = self._encoder
        if encoder is None:
            raise BackendNotReadyError("the spark engine is shut down")
        set_torch_threads(self.config.cpu_threads)
        global_ids, semantic_ids = encoder.tokenize(waves)
        return list(zip(global_ids, semantic_ids, strict=True))

    def _decode_batch(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        decoder = self._decoder
        if decoder is None:
            raise BackendNotReadyError("the spark engine is shut down")
        set_torch_threads(self.config.cpu_threads)
        return decoder.detokenize([g for g, _ in items], [s for _, s in items])

    def _samples_per_token(self) -> int:
        return self._decoder.hop_length if self._decoder is not None else 320

    async def _decode(self, global_ids: np.ndarray, semantic_ids: Sequence[int], *, priority: int) -> np.ndarray:
        batcher = self._decode_batcher
        if batcher is None:
            raise BackendNotReadyError("the spark engine is shut down")
        return await batcher.submit((global_ids, np.asarray(semantic_ids, dtype=np.int64)), priority=priority)

    # --- voices --------------------------------------------------------------------------------------------------

    async def prepare_voice(self, reference: ReferenceAudio) -> VoicePrompt:
        """Decode the reference (0.5–30 s, any format), normalise its loudness like the original (§A.8) and
        tokenize it with BiCodec: ``data = {"global_ids": [32 ints], "semantic_ids": [T ints], "text": str|None}``."""
        from flashtts_core.audio.decode import decode_audio
        from flashtts_core.engines.spark.audio import volume_normalize

        self._ready()
        wav = await anyio.to_thread.run_sync(
            lambda: decode_audio(
                reference.data,
                target_rate=self._sample_rate,
                min_seconds=REFERENCE_MIN_SECONDS,
                max_seconds=REFERENCE_MAX_SECONDS,
                param="reference_audio",
            )
        )
        if self._volume_normalize:
            wav = volume_normalize(wav)
        batcher = self._encode_batcher
        if batcher is None:
            raise BackendNotReadyError("the spark engine is shut down")
        global_ids, semantic_ids = await batcher.submit(np.ascontiguousarray(wav, dtype=np.float32))
        text = (reference.text or "").strip() or None
        return VoicePrompt(
            engine=self.name,
            fingerprint=self.fingerprint,
            data={"global_ids": global_ids.tolist(), "semantic_ids": semantic_ids.tolist(), "text": text},
        )

    def _clone_voice(self, prompt: VoicePrompt) -> tuple[np.ndarray, list[int], str | None]:
        tok = self._ready()
        if prompt.engine != self.name:
            raise InvalidRequestError(
                f"the voice was prepared for the {prompt.engine!r} engine; re-add it for spark", param="voice"
            )
        if prompt.fingerprint != self.fingerprint:
            logger.warning("voice prompt fingerprint %s differs from the loaded codec's", prompt.fingerprint)
        data = prompt.data
        try:
            global_ids = np.asarray(data["global_ids"], dtype=np.int64).reshape(-1)
            semantic_ids = [int(x) for x in data.get("semantic_ids") or ()]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(_BAD_PROMPT, param="voice") from exc
        table = tok.table
        if (
            global_ids.size != tok.global_count
            or not all(0 <= g < table.global_tokens.size for g in global_ids.tolist())
            or not all(0 <= s < table.semantic_tokens.size for s in semantic_ids)
        ):
            raise InvalidRequestError(_BAD_PROMPT, param="voice")
        text = data.get("text")
        return global_ids, semantic_ids, text if isinstance(text, str) and text.strip() else None

    # --- fix_voice state -----------------------------------------------------------------------------------------

    def _pinned_path(self) -> Path | None:
        return Path(self.config.state_dir) / _FIXED_VOICES_FILE if self.config.state_dir else None

    def _load_pinned(self) -> dict[str, list[int]]:
        path = self._pinned_path()
        tok = self.tokenizer
        if path is None or tok is None or not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            voices = raw["voices"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable pinned voices in %s: %s", path, exc)
            return {}
        pinned: dict[str, list[int]] = {}
        for gender in GENDERS:
            entry = voices.get(gender) if isinstance(voices, dict) else None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                continue
            ids = tok.encode_markup(entry["prompt"])
            parsed = tok.parse_fragment(ids)
            if parsed is None:
                logger.warning("ignoring the pinned %s voice in %s: not a Spark acoustic fragment", gender, path)
                continue
            pinned[gender] = tok.acoustic_fragment(*parsed)
        if pinned:
            logger.info("loaded pinned voices %s from %s", ", ".join(sorted(pinned)), path)
        return pinned

    def _save_pinned(self, pinned: dict[str, list[int]]) -> None:
        path = self._pinned_path()
        tok = self.tokenizer
        if path is None or tok is None:
            return
        voices = {}
        for gender, fragment in pinned.items():
            parsed = tok.parse_fragment(fragment)
            voices[gender] = {
                "prompt": tok.decode(fragment),  # token strings: independent of the tokenizer's id layout
                "global_ids": parsed[1] if parsed else None,
            }
        payload = json.dumps({"version": 1, "voices": voices}, ensure_ascii=False, indent=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(payload, encoding="utf-8")
        os.replace(tmp, path)

    def _pin_lock(self, gender: str) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        held = self._pin_locks.get(gender)
        if held is None or held[0] is not loop:
            held = self._pin_locks[gender] = (loop, asyncio.Lock())
        return held[1]

    async def _pin(self, gender: str, fragment: list[int]) -> None:
        if gender in self._pinned:
            return
        self._pinned[gender] = list(fragment)
        logger.info("fix_voice: pinned the %s voice", gender)
        try:
            await anyio.to_thread.run_sync(self._save_pinned, dict(self._pinned))
        except OSError as exc:
            logger.warning("fix_voice: could not persist pinned voices: %s", exc)

    # --- synthesis -----------------------------------------------------------------------------------------------

    def _sampling(self, overrides: SamplingOverrides) -> SamplingParams:
        tok = self._ready()
        return build_sampling(
            self.backend,
            overrides,
            defaults=DEFAULT_SAMPLING,
            max_tokens=DEFAULT_MAX_TOKENS,
            engine_seed=self.config.seed,
            stop_token_ids=tok.stop_ids,
            allowed_token_ids=tok.allowed_ids,
        )

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        """Mono float32 chunks at 16 kHz. Validation errors surface at the first ``__anext__``."""
        # aclosing: closing this generator must close the inner ones now (cancelling the segment tasks), not at GC.
        async with contextlib.aclosing(self._synthesize(request, allow_pin=True)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def warmup(self) -> None:
        """A short controllable synthesis (``max_tokens`` 128) that never pins a voice."""
        sampling = SamplingOverrides(max_tokens=WARMUP_MAX_TOKENS)
        request = SynthesisRequest(request_id="warmup", text="warm up", voice="female", sampling=sampling)
        async with contextlib.aclosing(self._synthesize(request, allow_pin=False)) as chunks:
            async for _ in chunks:
                pass

    async def _synthesize(self, request: SynthesisRequest, *, allow_pin: bool) -> AsyncIterator[AudioChunk]:
        tok = self._ready()
        job = _Job(self, request, tok, allow_pin=allow_pin)
        try:
            await job.prepare()
            async with contextlib.aclosing(job.run()) as pieces:
                async for samples in pieces:
                    yield AudioChunk(samples)
        finally:
            await job.close()


class _Job:
    """One synthesis request: its segments, their generation tasks and the ordered audio stream."""

    def __init__(self, engine: SparkEngine, request: SynthesisRequest, tok: SparkTokenizer, *, allow_pin: bool) -> None:
        self.engine = engine
        self.request = request
        self.tok = tok
        self.allow_pin = allow_pin
        self.global_ids: np.ndarray | None = None  # codec indices of the voice, int64 (32,)
        self.fragment: list[int] | None = None  # controllable: acoustic fragment ids shared by all segments
        self.fragment_ready = asyncio.Event()
        self.pin_lock: asyncio.Lock | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.queues: list[asyncio.Queue[list[int] | _End | BaseException]] = []
        # Filled by prepare():
        self.gender: str | None = None
        self.reference_semantic: list[int] = []
        self.transcript: str | None = None
        self.segments: list[str] = []
        self.sampling: SamplingParams | None = None
        self.seed: int | None = None

    # --- set-up --------------------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        request, tok, engine = self.request, self.tok, self.engine
        if request.prompt is not None:
            self.global_ids, self.reference_semantic, self.transcript = engine._clone_voice(request.prompt)
        else:
            voice = request.voice or engine.info.default_voice or "female"
            if voice not in GENDERS:
                raise VoiceNotFoundError(
                    f"unknown voice {voice!r}; the spark engine's built-in voices are female and male", param="voice"
                )
            self.gender = voice
        self.segments = split_text(
            request.text,
            count_tokens=tok.count_tokens,
            length_threshold=request.length_threshold,
            window_size=request.window_size,
        )
        if not self.segments:
            raise InvalidRequestError("the text has nothing to speak; send some words", param="text")
        self.sampling = engine._sampling(request.sampling)
        self.seed = self.sampling.seed
        if self.gender is not None and engine.options.fix_voice and self.allow_pin:
            pinned = engine._pinned.get(self.gender)
            if pinned is None:
                # Serialise first requests of this voice until one of them has pinned a timbre (fixes the original's
                # first-writer race: concurrent first requests would each invent a different voice).
                lock = engine._pin_lock(self.gender)
                await lock.acquire()
                pinned = engine._pinned.get(self.gender)
                if pinned is None:
                    self.pin_lock = lock
                else:
                    lock.release()
            if pinned is not None:
                self._set_fragment(pinned)

    def _set_fragment(self, fragment: list[int]) -> None:
        parsed = self.tok.parse_fragment(fragment)
        assert parsed is not None
        self.fragment = list(fragment)
        self.global_ids = np.asarray(parsed[1], dtype=np.int64)
        self.fragment_ready.set()

    def _release_pin_lock(self) -> None:
        lock, self.pin_lock = self.pin_lock, None
        if lock is not None and lock.locked():
            lock.release()

    def _prompt(self, index: int) -> list[int]:
        text = self.segments[index]
        request = self.request
        if self.gender is not None:
            return self.tok.controllable_prompt(
                text, gender=self.gender, pitch=request.pitch, speed=request.speed, acoustic_fragment=self.fragment
            )  # type: ignore[arg-type]
        assert self.global_ids is not None
        return self.tok.clone_prompt(
            text,
            global_ids=self.global_ids.tolist(),
            semantic_ids=self.reference_semantic,
            transcript=self.transcript,
            pitch=request.pitch,
            speed=request.speed,
        )

    # --- generation ----------------------------------------------------------------------------------------------

    async def _segment(self, index: int, semaphore: asyncio.Semaphore) -> None:
        queue = self.queues[index]
        try:
            if self.gender is not None and index > 0 and self.fragment is None:
                await self.fragment_ready.wait()
                if self.fragment is None:
                    # The first segment failed; the consumer reports its error before ever reading this queue.
                    raise GenerationError("no voice was generated for the first segment")
            async with semaphore:
                for attempt in (0, 1):
                    try:
                        await self._generate(index, attempt)
                        return
                    except _Degenerate as exc:
                        reason = str(exc)
                        logger.warning(
                            "request %s segment %d/%d: %s (attempt %d)",
                            self.request.request_id,
                            index + 1,
                            len(self.segments),
                            reason,
                            attempt + 1,
                        )
                raise GenerationError(
                    f"the model produced no usable speech for segment {index + 1} of {len(self.segments)} ({reason}), "
                    "also after a retry; try again or rephrase the text"
                )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)
        finally:
            if index == 0:
                self.fragment_ready.set()  # wake waiting segments even if this one failed
                self._release_pin_lock()

    async def _generate(self, index: int, attempt: int) -> None:
        """One generation of one segment; puts its semantic ids on the segment's queue or raises _Degenerate
        (only while nothing of it was queued)."""
        assert self.sampling is not None
        tok, queue = self.tok, self.queues[index]
        controllable_prefix = self.gender is not None and self.fragment is None
        parser = tok.parser(controllable=controllable_prefix)
        sampling = msgspec.structs.replace(self.sampling, seed=retry_seed(self.seed, attempt))
        if attempt and self.seed is not None and "seed" not in self.engine.backend.capabilities.sampling:
            sampling = msgspec.structs.replace(sampling, seed=None)
        generation = GenerationRequest(
            request_id=f"{self.request.request_id}:{index}:{attempt}",
            prompt_token_ids=tuple(self._prompt(index)),
            sampling=sampling,
            priority=FIRST_AUDIO if index == 0 else LATER_AUDIO,
        )
        stream = self.request.stream
        buffered: list[int] = []
        queued = False
        finish: FinishReason | None = None
        prefix_handled = not controllable_prefix
        async with contextlib.aclosing(self.engine.backend.generate(generation)) as chunks:
            async for chunk in chunks:
                new = parser.feed(chunk.token_ids)
                if not prefix_handled and parser.prefix_done:
                    prefix_handled = True
                    if not parser.globals_ok:
                        raise _Degenerate(f"{len(parser.global_ids)} global tokens instead of {tok.global_count}")
                    await self._voice_found(tok.acoustic_fragment(parser.acoustic_ids, parser.global_ids))
                if new:
                    if stream:
                        queue.put_nowait(new)
                        queued = True
                    else:
                        buffered.extend(new)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
        if finish == "abort":
            raise GenerationError("the generation was aborted by the backend; retry the request")
        client_cap = self.request.sampling.max_tokens
        if finish == "length" and client_cap is not None and (not prefix_handled or not parser.semantic_ids):
            raise token_budget_error(client_cap)
        if not prefix_handled:
            raise _Degenerate("no voice (global tokens) was generated")
        if not parser.semantic_ids:
            raise _Degenerate("no semantic tokens")
        if finish == "length" and self.request.sampling.max_tokens is None:
            if not queued:
                raise _Degenerate(f"no end token within {self.sampling.max_tokens} tokens")
            logger.warning(
                "request %s segment %d hit max_tokens without an end token; keeping the streamed audio",
                self.request.request_id,
                index + 1,
            )
        if buffered:
            queue.put_nowait(buffered)
        queue.put_nowait(_END)

    async def _voice_found(self, fragment: list[int]) -> None:
        """The first segment's acoustic fragment: the voice of the whole request (and, with fix_voice, of every
        later request for this built-in voice)."""
        if self.fragment is not None:
            return
        self._set_fragment(fragment)
        if self.pin_lock is not None and self.gender is not None:
            await self.engine._pin(self.gender, fragment)
            self._release_pin_lock()

    # --- ordered output ------------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[np.ndarray]:
        n = len(self.segments)
        self.queues = [asyncio.Queue() for _ in range(n)]
        semaphore = asyncio.Semaphore(segment_concurrency(self.engine.backend))
        self.tasks = [
            asyncio.create_task(self._segment(i, semaphore), name=f"spark-{self.request.request_id}-{i}")
            for i in range(n)
        ]
        schedule = STREAMING_SCHEDULE if self.request.stream else NON_STREAMING_SCHEDULE
        assembler = StreamAssembler(
            msgspec.structs.replace(schedule, samples_per_token=self.engine._samples_per_token())
        )
        tokens: list[int] = []  # semantic ids of every segment so far: one continuous stream for the decoder
        for index in range(n):
            queue = self.queues[index]
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    break
                if isinstance(item, BaseException):
                    raise item
                tokens.extend(item)
                while (window := assembler.next_window(len(tokens))) is not None:
                    out = assembler.push(window, await self._decode_window(tokens, window, assembler.windows))
                    if out.size:
                        yield out
        window = assembler.next_window(len(tokens), final=True)
        if window is not None:
            out = assembler.push(window, await self._decode_window(tokens, window, assembler.windows))
            if out.size:
                yield out
        tail = assembler.flush()
        if tail.size:
            yield tail

    async def _decode_window(self, tokens: list[int], window: StreamWindow, done: int) -> np.ndarray:
        """Decode one window; a request's first window goes ahead of other requests' later ones (priority 0)."""
        assert self.global_ids is not None
        return await self.engine._decode(
            self.global_ids, tokens[window.context_start : window.end], priority=0 if done == 0 else 1
        )

    async def close(self) -> None:
        """Cancel every segment task (and so every backend generation) and wait for them to finish."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
        self._release_pin_lock()
