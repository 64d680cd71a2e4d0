"""The MegaTTS3 engine: text → Qwen2 G2P (any backend) → duration LM → latent DiT → WaveVAE → 24 kHz audio.

Flow of one request (reference-behaviour §3.6, models.md §C.4):

1. the voice is a :class:`VoicePrompt` made by :meth:`MegaEngine.prepare_voice` from reference audio **plus** its
   WaveVAE latent (``.npy``): the aligner gives the prompt's phones, tones and durations, the latent is cut to the
   aligned length (:mod:`.frontend`). There are no built-in voices;
2. the text is split into segments of at most ``window_size`` G2P tokens; every segment's G2P runs on the LLM backend
   concurrently (greedy by default, as the original; prompt and parsing by token ids, :mod:`.g2p`);
3. segments are synthesised in order (:mod:`.synthesis`): durations continued from the prompt's, a 32-step CFG DiT
   sample, the WaveVAE decode; each segment is matched to the prompt's loudness and joined to the previous one with a
   0.16 s Hann cross-fade.

Streaming (``request.stream``): the original had none. Here a segment's audio is sent as soon as it exists, and within
a segment the WaveVAE decodes overlapping windows (1 s, then 2 s, then 4 s of latent, 12 frames of context each side),
so the first audio follows the first DiT sample. The decoder is convolutional, so windows equal the one-shot decode up
to float rounding; what differs is the loudness match, which a stream cannot base on the whole segment: it uses the
first window's loudness for the rest of the segment (a segment that fits in one window is identical either way), and
lowers the gain when a later window would clip.

Request ``options``: ``time_step`` (32), ``p_w`` (1.6), ``t_w`` (2.5), ``dur_disturb`` (0.1), ``dur_alpha`` (1.0);
engine-wide defaults come from ``--engine_option``. Noise (DiT and duration jitter) is seeded from the request's
``seed`` or the engine's, so a request is reproducible.

Concurrency: all model work goes through one :class:`~flashtts_core.batching.DynamicBatcher` (``--batch_size``,
``--wait_timeout``, as the Spark codec). In a batch, every segment's durations are planned first and then the DiT
samples all of them as one right-padded, key-masked batch (one per distinct ``time_step``), so concurrent requests
share each DiT step; an item's latent equals its solo latent up to float rounding, and an item that fails (or a
batch that fails, whose items are then re-run alone) fails only its own request.

Precision: engine option ``dtype`` (``auto``: ``--torch_dtype``; both ``auto``: float16 on CUDA, as the original's
autocast, float32 elsewhere). The aligner, duration LM, DiT and WaveVAE are stored in that dtype and run under
autocast to it; the flow-matching state, CFG mix, noise, RoPE/LayerNorm/softmax, spectrograms and loudness stay
float32.

Heavy imports (torch and the models) happen in :meth:`MegaEngine.startup`, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import anyio.to_thread
import msgspec
from msgspec import Meta

from flashtts_core.batching import DynamicBatcher
from flashtts_core.engines.common import build_sampling, resolve_device, segment_concurrency, set_torch_threads
from flashtts_core.engines.mega.config import COMPONENT_DIRS, LATENT_FRAME_SAMPLES, SAMPLE_RATE
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
    VoicePrompt,
)
from flashtts_core.text import split_text

if TYPE_CHECKING:
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from flashtts_core.engines.mega.frontend import ReferenceVoice
    from flashtts_core.engines.mega.g2p import MegaG2PTokens
    from flashtts_core.engines.mega.loading import MegaModels
    from flashtts_core.engines.mega.modeling_dit import DiTSample
    from flashtts_core.engines.mega.synthesis import MegaSynthesisOptions, PreparedPrompt

__all__ = ("G2P_MAX_TOKENS", "STREAM_WINDOWS", "MegaEngine", "MegaOptions", "MegaRequestOptions")

logger = logging.getLogger(__name__)

#: The original's G2P budget (max_new_tokens).
G2P_MAX_TOKENS = 256
REFERENCE_MIN_SECONDS = 1.0
REFERENCE_MAX_SECONDS = 30.0
#: Latent frames (25 Hz) per streamed WaveVAE window: the first window is short for an early first chunk.
STREAM_WINDOWS = (25, 50, 100)
#: Latent frames of real context decoded on each side of a streamed window (the decoder sees ~5 frames).
STREAM_CONTEXT = 12
_WHOLE = 1 << 30  # "context" that makes a window decode the whole latent
_FINGERPRINT_SAMPLE = 1 << 20
_BAD_PROMPT = "the voice prompt is not a valid MegaTTS3 prompt; re-add the voice (audio + latent_file)"

Positive = Annotated[float, Meta(ge=0.0, le=20.0)]
ModelDtype = Literal["auto", "float32", "float16", "bfloat16"]


class MegaOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``--engine_option`` settings of the MegaTTS3 engine: the defaults of the request options, and the dtype of
    the in-process models (``auto``: follow ``--torch_dtype``; when that is ``auto`` too, float16 on CUDA, float32
    elsewhere)."""

    time_step: Annotated[int, Meta(ge=1, le=200)] = 32  # DiT sampling steps
    p_w: Positive = 1.6  # text guidance weight ("intelligibility")
    t_w: Positive = 2.5  # speaker guidance weight ("similarity")
    dur_disturb: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.1  # random duration jitter
    dur_alpha: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0  # duration scale (> 1: slower)
    dtype: ModelDtype = "auto"  # aligner, duration LM, DiT and WaveVAE


class MegaRequestOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Request ``options`` of the MegaTTS3 engine (unset: the engine's defaults)."""

    time_step: Annotated[int, Meta(ge=1, le=200)] | None = None
    p_w: Positive | None = None
    t_w: Positive | None = None
    dur_disturb: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    dur_alpha: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _eos_ids(g2p_dir: Path) -> tuple[int, ...]:
    """``eos_token_id`` of ``generation_config.json`` (else ``config.json``), as a tuple."""
    for name in ("generation_config.json", "config.json"):
        value = _read_json(g2p_dir / name).get("eos_token_id")
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            return tuple(value)
    return ()


def _segment_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed * 1_000_003 + index) % (1 << 63)


# --- work items for the model thread -------------------------------------------------------------------------------


@dataclass
class _AlignJob:
    wav: np.ndarray
    latent: np.ndarray


@dataclass
class _RequestVoice:
    """A request's reference; the duration-LM prompt state is computed on first use, in a model thread (``lock``: two
    batches running at once, see ``overtake``, may plan segments of the same request)."""

    voice: ReferenceVoice
    prepared: PreparedPrompt | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


@dataclass
class _AcousticJob:
    voice: _RequestVoice
    phones: list[int]
    tones: list[int]
    is_first: bool
    is_final: bool
    options: MegaSynthesisOptions
    seed: int | None


@dataclass
class _DecodeJob:
    latent: np.ndarray
    start: int
    end: int
    context: int


_Job = _AlignJob | _AcousticJob | _DecodeJob


@dataclass
class _Failure:
    """The error of one item of a batch (re-raised to that item's submitter only)."""

    error: Exception


class MegaEngine(EngineBase):
    """MegaTTS3 (``g2p/`` on any backend; aligner, duration LM, DiT and WaveVAE decoder in-process)."""

    name: ClassVar[str] = "mega"
    Options: ClassVar[type[msgspec.Struct]] = MegaOptions

    def __init__(self, config: EngineConfig, backend: BackendBase) -> None:
        super().__init__(config, backend)
        self.options: MegaOptions
        self.models: MegaModels | None = None
        self.tokens: MegaG2PTokens | None = None
        self._tokenizer: Tokenizer | None = None
        self._batcher: DynamicBatcher[_Job, Any] | None = None
        self._fingerprint: str | None = None
        #: DiT sampling runs, keyed by the number of segments sampled together (observability and tests).
        self.dit_batch_sizes: Counter[int] = Counter()
        self._counts_lock = threading.Lock()  # two model batches may run at once (overtake)

    # --- discovery -----------------------------------------------------------------------------------------------

    @classmethod
    def check_available(cls) -> str | None:
        missing = [m for m in ("torch", "tokenizers") if importlib.util.find_spec(m) is None]
        if missing:
            return f"the MegaTTS3 engine needs {' and '.join(missing)}: pip install 'flashtts-core[models]'"
        return None

    @classmethod
    def detect(cls, model_dir: Path) -> bool:
        """The five component folders of the published ``ByteDance/MegaTTS3`` directory."""
        return all((Path(model_dir) / sub).is_dir() for sub in COMPONENT_DIRS)

    @classmethod
    def llm_dir(cls, model_dir: Path) -> Path:
        return Path(model_dir) / "g2p"

    @classmethod
    def default_role_dir(cls) -> str | None:
        return "data/mega-roles"

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the G2P tokenizer and the four models (off the event loop) and start the model thread's queue."""
        from flashtts_core.engines.mega.loading import load_mega_models

        model_dir = Path(self.config.model_dir)
        tokenizer, tokens = await anyio.to_thread.run_sync(self._load_tokenizer, model_dir / "g2p")
        aligner_device = resolve_device(self.config.device)
        device = resolve_device(self.config.detokenizer_device)
        aligner_dtype, dtype = self.model_dtype(aligner_device), self.model_dtype(device)
        models = await anyio.to_thread.run_sync(
            lambda: load_mega_models(
                model_dir, aligner_device=aligner_device, device=device, aligner_dtype=aligner_dtype, dtype=dtype
            )
        )
        self._tokenizer, self.tokens, self.models = tokenizer, tokens, models
        self._fingerprint = await anyio.to_thread.run_sync(self._compute_fingerprint)
        self._batcher = DynamicBatcher(
            self._run_jobs,
            max_batch_size=self.config.batch_size,
            wait_timeout=self.config.wait_timeout,
            name="mega-models",
            # A first chunk's work need not wait for a running batch of later chunks: the model calls keep no state
            # between calls (the duration LM copies the prompt state, each DiT sample has its own generator) and a
            # request's prompt state is made once under its voice's lock.
            overtake=True,
        )
        logger.info(
            "mega engine ready (aligner on %s in %s, DiT/duration/WaveVAE on %s in %s; batches of up to %d)",
            aligner_device,
            aligner_dtype,
            device,
            dtype,
            self.config.batch_size,
        )
        await super().startup()

    def model_dtype(self, device: str) -> torch.dtype:
        """The dtype of the models on ``device``: the ``dtype`` option, else ``--torch_dtype``; ``auto`` for both
        means float16 on CUDA (the original's autocast; FlashTTS saw numerics problems with bf16) and float32
        elsewhere."""
        import torch

        name = self.options.dtype if self.options.dtype != "auto" else self.config.dtype
        if name == "auto":
            return torch.float16 if device.startswith("cuda") else torch.float32
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]

    @staticmethod
    def _load_tokenizer(g2p_dir: Path) -> tuple[Tokenizer, MegaG2PTokens]:
        from tokenizers import Tokenizer

        from flashtts_core.engines.mega.g2p import MegaG2PTokens

        path = g2p_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{g2p_dir} has no tokenizer.json; point --model_path at a MegaTTS3 download")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path} is not a readable tokenizers file: {exc}") from exc
        return tokenizer, MegaG2PTokens.from_tokenizer(tokenizer, _eos_ids(g2p_dir))

    async def shutdown(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        self._batcher = None
        self.models = None
        await super().shutdown()

    # --- facts ---------------------------------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            sample_rate=SAMPLE_RATE,
            builtin_voices=(),
            default_voice=None,
            supports_cloning=True,
            requires_latent=True,
            controls=frozenset(),
            languages=("zh", "en"),
            reference_min_seconds=REFERENCE_MIN_SECONDS,
            reference_max_seconds=REFERENCE_MAX_SECONDS,
        )

    @property
    def fingerprint(self) -> str:
        """``mega-`` + a hash of the aligner weights (size, first and last MiB): prompts hold its alignment."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        from flashtts_core.engines.mega.loading import find_checkpoint

        path = find_checkpoint(Path(self.config.model_dir) / "aligner_lm")
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
        return f"mega-{digest.hexdigest()[:16]}"

    def _ready(self) -> tuple[Tokenizer, MegaG2PTokens, MegaModels]:
        if not self._started or self._tokenizer is None or self.tokens is None or self.models is None:
            raise BackendNotReadyError("the mega engine is not started")
        return self._tokenizer, self.tokens, self.models

    def count_tokens(self, text: str) -> int:
        """G2P tokens of ``text``: the unit of ``length_threshold``/``window_size``."""
        tokenizer, _, _ = self._ready()
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    def g2p_prompt(self, text: str) -> tuple[int, ...]:
        tokenizer, tokens, _ = self._ready()
        return tokens.prompt_ids(tokenizer, text)

    # --- model thread ----------------------------------------------------------------------------------------------

    def _models(self) -> MegaModels:
        models = self.models
        if models is None:
            raise BackendNotReadyError("the mega engine is shut down")
        return models

    def _run_jobs(self, jobs: list[_Job]) -> list[Any]:
        """Run one batch of queued model work (in the batcher's worker thread).

        Acoustic jobs are planned one by one (duration LM, cheap) and then sampled by the DiT *together*
        (:meth:`_sample`); alignment and decode jobs run one at a time. Each item gets its result or a
        :class:`_Failure` holding its own error, so one bad item never fails the others.
        """
        set_torch_threads(self.config.cpu_threads)
        results: list[Any] = [None] * len(jobs)
        planned: list[tuple[int, DiTSample]] = []
        for i, job in enumerate(jobs):
            try:
                if isinstance(job, _AcousticJob):
                    planned.append((i, self._plan(job)))
                else:
                    results[i] = self._run_job(job)
            except Exception as exc:
                results[i] = _Failure(exc)
        if planned:
            for (i, _), result in zip(planned, self._sample([sample for _, sample in planned]), strict=True):
                results[i] = result
        return results

    def _run_job(self, job: _AlignJob | _DecodeJob) -> Any:
        from flashtts_core.engines.mega.frontend import prepare_reference
        from flashtts_core.engines.mega.synthesis import decode_window

        models = self._models()
        if isinstance(job, _AlignJob):
            return prepare_reference(models, job.wav, job.latent)
        return decode_window(models, job.latent, job.start, job.end, context=job.context)

    def _plan(self, job: _AcousticJob) -> DiTSample:
        """The DiT input of one segment (the request's duration-LM prompt state is made on first use)."""
        from flashtts_core.engines.mega.synthesis import plan_segment, prepare_prompt

        models = self._models()
        voice = job.voice
        if voice.prepared is None:
            with voice.lock:  # once per request, also when two batches plan its segments at the same time
                if voice.prepared is None:
                    voice.prepared = prepare_prompt(models, voice.voice)
        return plan_segment(
            models,
            voice.prepared,
            job.phones,
            job.tones,
            is_first=job.is_first,
            is_final=job.is_final,
            options=job.options,
            seed=job.seed,
        )

    def _sample(self, samples: list[DiTSample]) -> list[Any]:
        """Latents of planned segments: one DiT batch for the valid ones (per step count); when that batch fails,
        each item is re-run alone from its generator's saved state, so only the culprit fails."""
        from flashtts_core.engines.mega.synthesis import sample_latents

        models = self._models()
        out: list[Any] = [None] * len(samples)
        good: list[int] = []
        for k, sample in enumerate(samples):
            try:
                sample.check(models.dit)
            except ValueError as exc:
                out[k] = _Failure(exc)
            else:
                good.append(k)
        if not good:
            return out
        states = {k: samples[k].generator.get_state() for k in good if samples[k].generator is not None}
        try:
            latents = sample_latents(models, [samples[k] for k in good])
        except Exception as exc:
            if len(good) == 1:
                out[good[0]] = _Failure(exc)
                return out
            logger.warning("mega: a DiT batch of %d failed (%s); sampling its items one by one", len(good), exc)
            for k in good:
                generator = samples[k].generator
                if generator is not None:
                    generator.set_state(states[k])
                try:
                    (out[k],) = sample_latents(models, [samples[k]])
                except Exception as item_exc:
                    out[k] = _Failure(item_exc)
                else:
                    with self._counts_lock:
                        self.dit_batch_sizes[1] += 1
            return out
        for k, latent in zip(good, latents, strict=True):
            out[k] = latent
        with self._counts_lock:
            for size in Counter(samples[k].steps for k in good).values():
                self.dit_batch_sizes[size] += 1
        return out

    async def _submit(self, job: _Job, *, priority: int = 1) -> Any:
        batcher = self._batcher
        if batcher is None:
            raise BackendNotReadyError("the mega engine is shut down")
        result = await batcher.submit(job, priority=priority)
        if isinstance(result, _Failure):
            raise result.error
        return result

    # --- voices --------------------------------------------------------------------------------------------------

    async def prepare_voice(self, reference: ReferenceAudio) -> VoicePrompt:
        """Reference audio (1–30 s, any format) + its ``.npy`` latent → a prompt holding the aligned phones, tones,
        durations, the cut latent and the prompt loudness (see :meth:`.frontend.ReferenceVoice.to_data`).

        The latent is checked first (400 naming ``latent_file`` when missing, not ``(1, T, 32)``, or far shorter
        than the audio)."""
        from flashtts_core.audio.decode import decode_audio
        from flashtts_core.engines.mega.frontend import parse_latent

        _, _, models = self._ready()
        latent = parse_latent(reference.latent, models.dit.dims.latent_dim)
        wav = await anyio.to_thread.run_sync(
            lambda: decode_audio(
                reference.data,
                target_rate=SAMPLE_RATE,
                min_seconds=REFERENCE_MIN_SECONDS,
                max_seconds=REFERENCE_MAX_SECONDS,
                param="reference_audio",
            )
        )
        voice: ReferenceVoice = await self._submit(_AlignJob(wav, latent), priority=0)
        logger.info(
            "mega voice prepared: %d prompt phones, %.2f s of latent",
            len(voice.phones),
            voice.latent.shape[0] * LATENT_FRAME_SAMPLES / SAMPLE_RATE,
        )
        return VoicePrompt(engine=self.name, fingerprint=self.fingerprint, data=voice.to_data())

    def _voice(self, request: SynthesisRequest) -> ReferenceVoice:
        from flashtts_core.engines.mega.frontend import ReferenceVoice

        prompt = request.prompt
        if prompt is None:
            if request.voice:
                raise VoiceNotFoundError(
                    f"unknown voice {request.voice!r}: the mega engine has no built-in voices; use a stored voice or "
                    "clone one (reference audio + latent_file)",
                    param="voice",
                )
            raise InvalidRequestError(
                "the mega engine has no built-in voices: pick a stored voice or send reference audio with its "
                "latent_file",
                param="voice",
            )
        if prompt.engine != self.name:
            raise InvalidRequestError(_BAD_PROMPT, param="voice")
        try:
            return ReferenceVoice.from_data(dict(prompt.data))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(_BAD_PROMPT, param="voice") from exc

    def _options(self, request: SynthesisRequest) -> MegaSynthesisOptions:
        from flashtts_core.engines.mega.synthesis import MegaSynthesisOptions

        try:
            given = msgspec.convert(dict(request.options), MegaRequestOptions, strict=False)
        except msgspec.ValidationError as exc:
            known = ", ".join(MegaRequestOptions.__struct_fields__)
            raise InvalidRequestError(
                f"invalid option for the mega engine: {exc} (known: {known})", param="options"
            ) from exc
        fields = {
            name: getattr(given, name) if getattr(given, name) is not None else getattr(self.options, name)
            for name in MegaRequestOptions.__struct_fields__
        }
        return MegaSynthesisOptions(**fields)

    # --- synthesis -----------------------------------------------------------------------------------------------

    def _sampling(self, overrides: SamplingOverrides) -> SamplingParams:
        """Greedy G2P unless the client asks otherwise (the original decodes greedily: phones must not vary)."""
        _, tokens, _ = self._ready()
        params = build_sampling(
            self.backend,
            overrides,
            defaults={},
            max_tokens=G2P_MAX_TOKENS,
            engine_seed=self.config.seed,
            stop_token_ids=tokens.stop_ids,
            allowed_token_ids=tokens.allowed_ids,
        )
        if overrides.temperature is None:
            params = msgspec.structs.replace(params, temperature=0.0)
        return params

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[AudioChunk]:
        """Mono float32 chunks at 24 kHz. Validation errors surface at the first ``__anext__``."""
        self._ready()
        if request.pitch not in (None, "moderate") or request.speed not in (None, "moderate"):
            logger.warning("MegaTTS3 has no pitch/speed control; ignoring them (request %s)", request.request_id)
        job = _Request(self, request)
        try:
            job.prepare()
            async for samples in job.run():
                if samples.size:
                    yield AudioChunk(samples)
        finally:
            await job.close()

    async def warmup(self) -> None:
        """Run the G2P once (the acoustic models need a voice; they have no lazy initialisation to warm)."""
        self._ready()
        request = GenerationRequest(
            request_id="warmup",
            prompt_token_ids=self.g2p_prompt("warm up"),
            sampling=self._sampling(SamplingOverrides(max_tokens=8)),
        )
        async with contextlib.aclosing(self.backend.generate(request)) as chunks:
            async for _ in chunks:
                pass


class _Request:
    """One synthesis request: its segments, their G2P tasks and the ordered acoustic work."""

    def __init__(self, engine: MegaEngine, request: SynthesisRequest) -> None:
        self.engine = engine
        self.request = request
        self.segments: list[str] = []
        self.tasks: list[asyncio.Task[list[int]]] = []
        self.voice: _RequestVoice | None = None
        self.options: MegaSynthesisOptions | None = None
        self.sampling: SamplingParams | None = None

    def prepare(self) -> None:
        engine, request = self.engine, self.request
        self.voice = _RequestVoice(engine._voice(request))
        self.options = engine._options(request)
        self.segments = split_text(
            request.text,
            count_tokens=engine.count_tokens,
            length_threshold=request.length_threshold,
            window_size=request.window_size,
        )
        if not self.segments:
            raise InvalidRequestError("the text is empty; send some words to speak", param="input")
        self.sampling = engine._sampling(request.sampling)

    async def _g2p(self, index: int, semaphore: asyncio.Semaphore) -> list[int]:
        """Merged phone ids of one segment (led by ``sil``)."""
        engine, request = self.engine, self.request
        assert self.sampling is not None and engine.tokens is not None
        generation = GenerationRequest(
            request_id=f"{request.request_id}:g2p:{index}",
            prompt_token_ids=engine.g2p_prompt(self.segments[index]),
            sampling=self.sampling,
            priority=FIRST_AUDIO if index == 0 else LATER_AUDIO,
        )
        ids: list[int] = []
        finish: FinishReason | None = None
        async with semaphore, contextlib.aclosing(engine.backend.generate(generation)) as chunks:
            async for chunk in chunks:
                ids.extend(chunk.token_ids)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
        if finish == "abort":
            raise GenerationError("the G2P generation was aborted by the backend; retry the request")
        merged, dropped = engine.tokens.parse(ids)
        where = f"request {request.request_id} segment {index + 1}/{len(self.segments)}"
        if dropped:
            logger.warning("%s: the G2P produced %d non-phone token(s); skipped them", where, dropped)
        if finish == "length":
            logger.warning(
                "%s: the G2P hit its token limit (%d); the phones may be cut", where, self.sampling.max_tokens
            )
        if len(merged) < 2:
            raise GenerationError(
                f"the G2P model produced no phones for segment {index + 1} of {len(self.segments)}; rephrase the text"
            )
        return merged

    def _windows(self, t_ref: int, total: int) -> list[tuple[int, int]]:
        if not self.request.stream:
            return [(t_ref, total)]
        windows: list[tuple[int, int]] = []
        start, i = t_ref, 0
        while start < total:
            size = STREAM_WINDOWS[min(i, len(STREAM_WINDOWS) - 1)]
            end = total if total - (start + size) < STREAM_WINDOWS[0] // 2 else start + size  # no tiny last window
            windows.append((start, end))
            start, i = end, i + 1
        return windows

    async def run(self) -> AsyncIterator[np.ndarray]:
        import numpy as np

        from flashtts_core.engines.mega.frontend import CrossFader, integrated_loudness, loudness_gain
        from flashtts_core.engines.mega.g2p import split_merged

        engine, request = self.engine, self.request
        assert self.voice is not None and self.options is not None
        n = len(self.segments)
        semaphore = asyncio.Semaphore(segment_concurrency(engine.backend))
        self.tasks = [
            asyncio.create_task(self._g2p(i, semaphore), name=f"mega-{request.request_id}-g2p-{i}") for i in range(n)
        ]
        seed = request.sampling.seed if request.sampling.seed is not None else engine.config.seed
        target = self.voice.voice.loudness
        t_ref = self.voice.voice.latent.shape[0]
        fader = CrossFader()
        first_chunk = True
        for index, task in enumerate(self.tasks):
            phones, tones = split_merged(await task)
            acoustic = _AcousticJob(
                self.voice,
                phones,
                tones,
                is_first=index == 0,
                is_final=index == n - 1,
                options=self.options,
                seed=_segment_seed(seed, index),
            )
            latent = await engine._submit(acoustic, priority=0 if first_chunk else 1)
            windows = self._windows(t_ref, latent.shape[0])
            gain: float | None = None
            fader.start_segment()
            for w, (start, end) in enumerate(windows):
                context = STREAM_CONTEXT if request.stream else _WHOLE
                wav = await engine._submit(_DecodeJob(latent, start, end, context), priority=0 if first_chunk else 1)
                if gain is None:
                    gain = loudness_gain(integrated_loudness(wav), target)
                peak = float(np.abs(wav).max()) * gain if wav.size else 0.0
                if peak >= 1.0:
                    gain *= 0.95 / peak  # the original rescales to peak 0.95; a stream lowers the gain from here on
                out = fader.push(wav * np.float32(gain), segment_end=w == len(windows) - 1)
                first_chunk = False
                yield out
        yield fader.finish()

    async def close(self) -> None:
        """Cancel every G2P task (and so every backend generation) and wait for them to finish."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
