"""A pure-Python backend used to test the conformance kit itself (``tests/testing/test_kit_self.py``).

:class:`ScriptedBackend` is to the kit what an in-memory filesystem is to a filesystem test suite: a complete,
deterministic implementation with no runtime behind it, so a failing kit test points at the kit. It is not meant
for serving. Its "model" derives the scores of every next id from a hash of the whole context, so outputs vary with
the prompt (stop-id and concurrency checks need varied ids), and greedy decoding is reproducible.

Options make it declare less than it can (``sampling``, ``deterministic_seed``) so the kit's rejection and skip paths
get exercised, and group tokens into multi-id deltas (``chunk_tokens``) as batching runtimes do.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
from array import array
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, ClassVar

import anyio
import msgspec
from msgspec import Meta

from flashtts_core.errors import BackendNotReadyError, CheckpointError, InvalidRequestError
from flashtts_core.plugins.base import BackendBase
from flashtts_core.plugins.types import (
    OPTIONAL_SAMPLING_FIELDS,
    BackendCapabilities,
    BackendConfig,
    BackendHealth,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)

__all__ = ("ScriptedBackend", "ScriptedOptions", "scripted_scores")

logger = logging.getLogger(__name__)


class ScriptedOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    vocab_size: Annotated[int, Meta(ge=2, le=100_000)] = 256
    # Optional sampling fields to declare; None = all of OPTIONAL_SAMPLING_FIELDS.
    sampling: frozenset[str] | None = None
    deterministic_seed: bool = True
    # Pause per generated id: makes "cancel mid-stream" observable and yields to the loop like a real runtime.
    delay_s: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    # Ids per delta (the last delta may be shorter; the stop delta is empty).
    chunk_tokens: Annotated[int, Meta(ge=1)] = 1
    # None: no cap. Else requests beyond it wait (counted in health().waiting), as a fixed-slot runtime would.
    max_concurrency: Annotated[int, Meta(ge=1)] | None = None


def scripted_scores(context: Sequence[int], vocab_size: int) -> list[float]:
    """The fake model: one score per id, a pure function of the whole context (hash-seeded Gaussian noise)."""
    digest = hashlib.blake2b(array("q", context).tobytes(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    return [rng.gauss(0.0, 2.0) for _ in range(vocab_size)]


def _pick(scores: list[float], context: Sequence[int], sampling: SamplingParams, rng: random.Random) -> int:
    """Sampling with the same semantics as the torch backend (Hugging Face processors), in plain Python."""
    vocab = len(scores)
    x = list(scores)
    penalty = sampling.repetition_penalty
    if penalty != 1.0:
        for token in set(context):
            if 0 <= token < vocab:
                x[token] = x[token] * penalty if x[token] < 0 else x[token] / penalty
    allowed = sampling.allowed_token_ids
    if allowed is not None:
        x = [value if i in allowed else -math.inf for i, value in enumerate(x)]
    if sampling.temperature == 0.0:
        return max(range(vocab), key=x.__getitem__)  # first maximum, like argmax
    ranked = sorted((i for i in range(vocab) if x[i] > -math.inf), key=lambda i: -x[i])
    if 0 < sampling.top_k < len(ranked):
        ranked = ranked[: sampling.top_k]
    best = x[ranked[0]] / sampling.temperature
    weights = [math.exp(x[i] / sampling.temperature - best) for i in ranked]
    total = sum(weights)
    probs = [w / total for w in weights]
    if sampling.top_p < 1.0:
        kept, mass = 0, 0.0
        for p in probs:
            kept += 1
            mass += p
            if mass >= sampling.top_p:
                break
        ranked, probs = ranked[:kept], probs[:kept]
    if sampling.min_p > 0.0:
        floor = sampling.min_p * probs[0]
        pairs = [(i, p) for i, p in zip(ranked, probs, strict=True) if p >= floor]
        ranked, probs = [i for i, _ in pairs], [p for _, p in pairs]
    draw = rng.random() * sum(probs)
    for token, p in zip(ranked, probs, strict=True):
        draw -= p
        if draw <= 0.0:
            return token
    return ranked[-1]


class ScriptedBackend(BackendBase):
    """Deterministic fake backend honouring every sampling field, with asyncio cancellation."""

    name: ClassVar[str] = "scripted"
    Options: ClassVar[type[msgspec.Struct]] = ScriptedOptions

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.options: ScriptedOptions
        declared = self.options.sampling
        if declared is not None and not declared <= OPTIONAL_SAMPLING_FIELDS.keys():
            unknown = ", ".join(sorted(declared - OPTIONAL_SAMPLING_FIELDS.keys()))
            raise InvalidRequestError(f"unknown sampling field(s) in options.sampling: {unknown}", param="sampling")
        self._capabilities: BackendCapabilities | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._unseeded = random.Random(config.seed)

    async def startup(self) -> None:
        # Fail like a real backend on a missing checkpoint, so "shutdown after a failed startup" is testable.
        if not await anyio.Path(self.config.model_dir).is_dir():
            raise CheckpointError(f"model_dir {self.config.model_dir} does not exist")
        options = self.options
        sampling = frozenset(OPTIONAL_SAMPLING_FIELDS) if options.sampling is None else options.sampling
        self._capabilities = BackendCapabilities(
            sampling=sampling,
            max_model_len=self.config.max_model_len,
            max_concurrency=options.max_concurrency,
            deterministic_seed=options.deterministic_seed and "seed" in sampling,
        )
        if options.max_concurrency is not None:
            self._slots = asyncio.Semaphore(options.max_concurrency)
        await super().startup()

    async def _shutdown(self) -> None:
        self._capabilities = None
        self._slots = None

    @property
    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise BackendNotReadyError("the scripted backend is not started")
        return self._capabilities

    async def health(self) -> BackendHealth:
        health = await super().health()
        return msgspec.structs.replace(health, running=self._running - self._waiting, waiting=self._waiting)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        slots = self._slots
        if slots is None:
            async for chunk in self._run(request):
                yield chunk
            return
        self._waiting += 1
        try:
            await slots.acquire()
        finally:
            self._waiting -= 1
        try:
            async for chunk in self._run(request):
                yield chunk
        finally:
            slots.release()

    async def _run(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        options = self.options
        sampling = request.sampling
        if sampling.seed is not None and options.deterministic_seed:
            rng = random.Random(sampling.seed)
        else:
            rng = random.Random(self._unseeded.getrandbits(64))
        stops = frozenset(sampling.stop_token_ids)
        context = list(request.prompt_token_ids)
        pending: list[int] = []
        for produced in range(1, sampling.max_tokens + 1):
            await asyncio.sleep(options.delay_s)  # a cancellation point between ids, like a real runtime's await
            token = _pick(scripted_scores(context, options.vocab_size), context, sampling, rng)
            if token in stops:
                if pending:
                    yield TokenChunk(tuple(pending))
                yield TokenChunk((), "stop")
                return
            context.append(token)
            pending.append(token)
            if produced == sampling.max_tokens:
                break
            if len(pending) >= options.chunk_tokens:
                yield TokenChunk(tuple(pending))
                pending = []
        yield TokenChunk(tuple(pending), "length")
