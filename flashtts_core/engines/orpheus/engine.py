"""The Orpheus-TTS engine: text → Llama-3 LLM (any backend) → 7-token SNAC frames → 24 kHz audio.

Flow of one request (reference-behaviour §3.5, models.md §B):

1. the voice is one of the language's built-in speakers (:mod:`.languages`; no cloning, no pitch/speed);
2. the text is split into segments of at most ``window_size`` LLM tokens (:func:`flashtts_core.text.split_text`);
3. each segment is generated from the original prompt
   ``<custom_token_3><|begin_of_text|>{voice}: {text}<|eot_id|><custom_token_4><custom_token_5><custom_token_1>``,
   built as ids with the ``tokenizers`` library (the text is encoded without special tokens, so there is exactly one
   BOS, where the original puts it). Segments generate concurrently (bounded by the backend's batch size) and are
   consumed in order;
4. generated ids become frames through :class:`~flashtts_core.engines.orpheus.tokens.FrameParser`: slots are
   derived from the ids, code 0 is valid, a wrong-slot or non-audio token costs exactly its frame (logged with
   counts). A segment without a single valid frame is retried once with a fresh seed, then fails with
   :class:`GenerationError` (the original crashed on ``np.concatenate([])``);
5. the frames of all segments form one continuous stream that is decoded with SNAC in windows with three frames of
   context on each side (:mod:`.streaming`), through a :class:`~flashtts_core.batching.DynamicBatcher` shared by all
   requests (``batch_size``/``wait_timeout``), off the event loop. Every frame is emitted — the original dropped the
   first and the last two of each segment — so the output has exactly ``frames × 2048`` samples; the seams are the
   one-shot decode's own samples (no clicks), and joins between segments are decoded like any other adjacent frames.

``request.stream`` only selects the window schedule (first audio after 7 frames vs. 64-frame windows); both give the
same samples, up to the SNAC decoder's per-call noise (kept, as in the original).

Heavy imports (torch and snac via :mod:`.snac`, tokenizers) happen in :meth:`OrpheusEngine.startup`, so
``import flashtts_core.engines.orpheus.engine`` stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio.to_thread
import msgspec

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
from flashtts_core.engines.orpheus.languages import LANG_MAP, LanguageSpec, resolve_language
from flashtts_core.engines.orpheus.streaming import (
    NON_STREAMING_SCHEDULE,
    STREAMING_SCHEDULE,
    FrameWindow,
    WindowPlanner,
)
from flashtts_core.engines.orpheus.tokens import FrameParser, OrpheusTokens
from flashtts_core.errors import (
    BackendNotReadyError,
    CheckpointError,
    GenerationError,
    InvalidRequestError,
    UnsupportedFeatureError,
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
    SamplingOverrides,
    SamplingParams,
    SynthesisRequest,
    VoiceInfo,
)
from flashtts_core.text import split_text

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

    from flashtts_core.engines.orpheus.snac import SnacDecoder

__all__ = ("OrpheusEngine", "OrpheusOptions")

logger = logging.getLogger(__name__)

#: FlashTTS's Orpheus sampling defaults (models.md §B.3); the official package used 0.6 / 0.8 / 1.3 / 1200 tokens.
SAMPLE_RATE = 24000
#: Warm-up: the original's text, and a budget of 10 frames (enough to run the LLM, the parser and one SNAC decode).
WARMUP_TEXT = "test audio."
WARMUP_MAX_TOKENS = 70


class OrpheusOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``--engine_option`` settings of the Orpheus engine (``--lang`` and ``--snac_path`` land here too)."""

    # Language of the checkpoint (english, mandarin, french, german, korean, hindi, spanish, italian,
    # spanish_italian, or a code such as "fr"); None: from the checkpoint's metadata, else english.
    lang: str | None = None
    # SNAC 24 kHz decoder folder (config.json + pytorch_model.bin); None: <model_path>/snac.
    snac_path: str | None = None


class _End:
    """Queue sentinel: a segment has delivered all its frames."""


_END = _End()
_Frame = tuple[int, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class OrpheusEngine(EngineBase):
    """Orpheus-TTS 3B (a Llama-3 checkpoint on any backend) with the SNAC 24 kHz decoder in-process."""

    name: ClassVar[str] = "orpheus"
    Options: ClassVar[type[msgspec.Struct]] = OrpheusOptions

    def __init__(self, config: EngineConfig, backend: BackendBase) -> None:
        super().__init__(config, backend)
        self.options: OrpheusOptions
        #: Canonical language name (a key of LANG_MAP); decided here because ``info`` depends on it.
        self.language: str = resolve_language(self.options.lang, Path(config.model_dir))
        self.spec: LanguageSpec = LANG_MAP[self.language]
        self.tokens: OrpheusTokens | None = None
        self._tokenizer: Tokenizer | None = None
        self._snac: SnacDecoder | None = None
        self._batcher: DynamicBatcher[tuple[np.ndarray, int, int], np.ndarray] | None = None
        self._allowed: frozenset[int] | None = None
        self._sample_rate = SAMPLE_RATE
        self._samples_per_frame = 2048

    # --- discovery -----------------------------------------------------------------------------------------------

    @classmethod
    def check_available(cls) -> str | None:
        missing = [m for m in ("torch", "tokenizers", "snac") if importlib.util.find_spec(m) is None]
        if missing:
            return f"the Orpheus engine needs {', '.join(missing)}: pip install 'flashtts-core[models]'"
        return None

    @classmethod
    def detect(cls, model_dir: Path) -> bool:
        """A ``snac/`` folder beside a Llama ``config.json`` (a ``--snac_path`` elsewhere selects Orpheus anyway)."""
        model_dir = Path(model_dir)
        if not (model_dir / "snac").is_dir():
            return False
        config = _read_json(model_dir / "config.json")
        archs = config.get("architectures") or []
        return config.get("model_type") == "llama" or (isinstance(archs, list) and "LlamaForCausalLM" in archs)

    @classmethod
    def llm_dir(cls, model_dir: Path) -> Path:
        return Path(model_dir)

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the LLM tokenizer and the SNAC decoder (off the event loop) and start the decode batcher."""
        from flashtts_core.engines.orpheus.snac import load_snac, resolve_snac_dir

        model_dir = Path(self.config.model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{model_dir} has no tokenizer.json; point --model_path at an Orpheus checkpoint")
        snac_dir = resolve_snac_dir(model_dir, self.options.snac_path)
        tokenizer, tokens = await anyio.to_thread.run_sync(self._load_tokenizer, tokenizer_file)
        self._check_vocab(model_dir, tokens)
        device = resolve_device(self.config.detokenizer_device)
        snac = await anyio.to_thread.run_sync(lambda: load_snac(snac_dir, device=device))
        self._tokenizer, self.tokens, self._snac = tokenizer, tokens, snac
        self._sample_rate = snac.sample_rate
        self._samples_per_frame = snac.samples_per_frame
        self._allowed = frozenset(tokens.audio_ids) | frozenset(tokens.stop_ids)
        self._batcher = DynamicBatcher(
            self._decode_batch,
            max_batch_size=self.config.batch_size,
            wait_timeout=self.config.wait_timeout,
            name="orpheus-snac",
            overtake=True,  # a first window need not wait for a running batch of later ones (SNAC keeps no state)
        )
        logger.info(
            "orpheus engine ready: language %s, voices %s, SNAC from %s on %s",
            self.language,
            ", ".join(self.spec.voices),
            snac_dir,
            device,
        )
        await super().startup()

    @staticmethod
    def _load_tokenizer(path: Path) -> tuple[Tokenizer, OrpheusTokens]:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path} is not a readable tokenizers file: {exc}") from exc
        return tokenizer, OrpheusTokens.from_tokenizer(tokenizer, path.parent)

    @staticmethod
    def _check_vocab(model_dir: Path, tokens: OrpheusTokens) -> None:
        """The LLM must be able to emit every audio and stop id (a text-only Llama would never produce speech)."""
        vocab = _read_json(model_dir / "config.json").get("vocab_size")
        highest = max(tokens.audio_ids[-1], *tokens.stop_ids)
        if isinstance(vocab, int) and vocab <= highest:
            raise CheckpointError(
                f"{model_dir}/config.json has vocab_size {vocab}, but the Orpheus audio tokens go up to id {highest}; "
                "this LLM was not trained for Orpheus"
            )

    async def shutdown(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        self._batcher = None
        self._snac = None
        await super().shutdown()

    # --- facts ---------------------------------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            sample_rate=self._sample_rate,
            builtin_voices=tuple(
                VoiceInfo(name=v, kind="builtin", language=self.language, description=f"Orpheus {self.language} voice")
                for v in self.spec.voices
            ),
            default_voice=self.spec.default_voice,
            supports_cloning=False,
            controls=frozenset(),
            languages=(self.language,),
            tags=self.spec.tags,
        )

    def _ready(self) -> tuple[Tokenizer, OrpheusTokens]:
        if not self._started or self._tokenizer is None or self.tokens is None:
            raise BackendNotReadyError("the orpheus engine is not started")
        return self._tokenizer, self.tokens

    def count_tokens(self, text: str) -> int:
        """LLM tokens of ``text`` (no special tokens): the unit of ``length_threshold``/``window_size``."""
        tokenizer, _ = self._ready()
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt_ids(self, voice: str, text: str) -> tuple[int, ...]:
        """The generation prompt of one segment (see the module docstring)."""
        tokenizer, tokens = self._ready()
        return tokens.prompt_ids(tokenizer.encode(f"{voice}: {text}", add_special_tokens=False).ids)

    # --- codec work (worker thread, batched) ---------------------------------------------------------------------

    def _decode_batch(self, items: list[tuple[np.ndarray, int, int]]) -> list[np.ndarray]:
        """``(frames (F, 7), keep_start, keep_end)`` → the kept samples of each window's decode."""
        snac = self._snac
        if snac is None:
            raise BackendNotReadyError("the orpheus engine is shut down")
        set_torch_threads(self.config.cpu_threads)
        audio = snac.decode([frames for frames, _, _ in items])
        return [a[start:end] for a, (_, start, end) in zip(audio, items, strict=True)]

    async def _decode(self, frames: list[_Frame], window: FrameWindow, *, priority: int) -> np.ndarray:
        import numpy as np

        batcher = self._batcher
        if batcher is None:
            raise BackendNotReadyError("the orpheus engine is shut down")
        codes = np.asarray(frames[window.context_start : window.context_end], dtype=np.int64)
        start, end = window.keep(self._samples_per_frame)
        return await batcher.submit((codes, start, end), priority=priority)

    # --- synthesis -----------------------------------------------------------------------------------------------

    def _voice(self, request: SynthesisRequest) -> str:
        if request.prompt is not None:
            raise UnsupportedFeatureError(
                "the orpheus engine cannot clone voices; use one of its voices: " + ", ".join(self.spec.voices),
                param="voice",
            )
        voice = request.voice or self.spec.default_voice
        if voice not in self.spec.voices:
            raise VoiceNotFoundError(
                f"unknown voice {voice!r} for the {self.language} Orpheus model; available voices: "
                + ", ".join(self.spec.voices),
                param="voice",
            )
        return voice

    def _sampling(self, overrides: SamplingOverrides) -> SamplingParams:
        _, tokens = self._ready()
        # The allowed set keeps the LLM inside the audio vocabulary; the slot of each position is checked by the parser.
        return build_sampling(
            self.backend,
            overrides,
            defaults=DEFAULT_SAMPLING,
            max_tokens=DEFAULT_MAX_TOKENS,
            engine_seed=self.config.seed,
            stop_token_ids=tokens.stop_ids,
            allowed_token_ids=self._allowed,
        )

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        """Mono float32 chunks at 24 kHz. Validation errors surface at the first ``__anext__``."""
        self._ready()
        if request.pitch not in (None, "moderate") or request.speed not in (None, "moderate"):
            logger.warning("Orpheus does not support pitch or speed; ignoring them (request %s)", request.request_id)
        job = _Job(self, request)
        try:
            job.prepare()
            async for samples in job.run():
                yield AudioChunk(samples)
        finally:
            await job.close()

    async def warmup(self) -> None:
        """A short synthesis (``max_tokens`` 70 = 10 frames) with the default voice."""
        request = SynthesisRequest(
            request_id="warmup",
            text=WARMUP_TEXT,
            voice=self.spec.default_voice,
            sampling=SamplingOverrides(max_tokens=WARMUP_MAX_TOKENS),
        )
        async for _ in self.synthesize(request):
            pass


class _Job:
    """One synthesis request: its segments, their generation tasks and the ordered, windowed decode."""

    def __init__(self, engine: OrpheusEngine, request: SynthesisRequest) -> None:
        self.engine = engine
        self.request = request
        self.voice = ""
        self.segments: list[str] = []
        self.sampling: SamplingParams | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.queues: list[asyncio.Queue[list[_Frame] | _End | BaseException]] = []

    def prepare(self) -> None:
        engine, request = self.engine, self.request
        self.voice = engine._voice(request)
        self.segments = split_text(
            request.text,
            count_tokens=engine.count_tokens,
            length_threshold=request.length_threshold,
            window_size=request.window_size,
        )
        if not self.segments:
            raise InvalidRequestError("the text is empty; send some words to speak", param="input")
        self.sampling = engine._sampling(request.sampling)

    # --- generation ----------------------------------------------------------------------------------------------

    async def _segment(self, index: int, semaphore: asyncio.Semaphore) -> None:
        queue = self.queues[index]
        try:
            async with semaphore:
                for attempt in (0, 1):
                    if await self._generate(index, attempt):
                        queue.put_nowait(_END)
                        return
                    logger.warning(
                        "request %s segment %d/%d: no valid audio frame (attempt %d)",
                        self.request.request_id,
                        index + 1,
                        len(self.segments),
                        attempt + 1,
                    )
            raise GenerationError(
                f"the model produced no valid audio frames for segment {index + 1} of {len(self.segments)}, also "
                "after a retry; try again, rephrase the text or raise max_tokens"
            )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)

    async def _generate(self, index: int, attempt: int) -> bool:
        """One generation of one segment; queues its frames as they complete. False: not a single valid frame
        (then nothing was queued, so the caller may retry)."""
        engine, request = self.engine, self.request
        assert self.sampling is not None and engine.tokens is not None
        sampling = self.sampling
        seed = retry_seed(sampling.seed, attempt)
        if seed != sampling.seed:
            sampling = msgspec.structs.replace(sampling, seed=seed)
        generation = GenerationRequest(
            request_id=f"{request.request_id}:{index}:{attempt}",
            prompt_token_ids=engine.prompt_ids(self.voice, self.segments[index]),
            sampling=sampling,
            priority=FIRST_AUDIO if index == 0 else LATER_AUDIO,
        )
        parser = FrameParser(engine.tokens)
        queue = self.queues[index]
        finish: FinishReason | None = None
        async with contextlib.aclosing(engine.backend.generate(generation)) as chunks:
            async for chunk in chunks:
                frames = parser.feed(chunk.token_ids)
                if frames:
                    queue.put_nowait(frames)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
        tail = parser.finish()
        if finish == "abort":
            raise GenerationError("the generation was aborted by the backend; retry the request")
        if finish == "length" and request.sampling.max_tokens is not None and parser.frames == 0:
            raise token_budget_error(request.sampling.max_tokens)
        if parser.malformed_frames:
            logger.warning(
                "request %s segment %d/%d: skipped %d malformed frame(s) (%d tokens in the wrong slot or outside the "
                "audio vocabulary); kept %d valid frames",
                request.request_id,
                index + 1,
                len(self.segments),
                parser.malformed_frames,
                parser.dropped_tokens,
                parser.frames,
            )
        if finish == "length" and request.sampling.max_tokens is None:
            logger.warning(
                "request %s segment %d/%d hit max_tokens (%d) without an end-of-speech token; the audio may be cut",
                request.request_id,
                index + 1,
                len(self.segments),
                sampling.max_tokens,
            )
        if tail:
            logger.debug(
                "request %s segment %d: dropped an incomplete last frame (%d tokens)",
                request.request_id,
                index + 1,
                tail,
            )
        return parser.frames > 0

    # --- ordered output ------------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[np.ndarray]:
        n = len(self.segments)
        self.queues = [asyncio.Queue() for _ in range(n)]
        semaphore = asyncio.Semaphore(segment_concurrency(self.engine.backend))
        self.tasks = [
            asyncio.create_task(self._segment(i, semaphore), name=f"orpheus-{self.request.request_id}-{i}")
            for i in range(n)
        ]
        planner = WindowPlanner(STREAMING_SCHEDULE if self.request.stream else NON_STREAMING_SCHEDULE)
        frames: list[_Frame] = []  # every segment's frames: one continuous stream for the decoder
        for queue in self.queues:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    break
                if isinstance(item, BaseException):
                    raise item
                frames.extend(item)
                while (window := planner.next_window(len(frames), final=False)) is not None:
                    yield await self.engine._decode(frames, window, priority=0 if planner.windows == 1 else 1)
        while (window := planner.next_window(len(frames), final=True)) is not None:
            yield await self.engine._decode(frames, window, priority=0 if planner.windows == 1 else 1)

    async def close(self) -> None:
        """Cancel every segment task (and so every backend generation) and wait for them to finish."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
