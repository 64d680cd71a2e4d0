"""The torch side of the backend: model loading, the continuous-batching scheduler thread and the sampler.

Why not ``model.generate``: it cannot add a request to a running batch, streams text (``TextIteratorStreamer``
flushes at spaces, and audio tokens have none), and cannot be aborted from outside. Why not transformers' own
continuous batching (``generate_batch`` / ``ContinuousBatchingManager``, transformers 5.x): one generation config and
one seed for the whole manager, no per-request allowed-token mask, a paged-attention cache aimed at CUDA, and an
API that changes between minor releases. The loop below is small; its dynamic path only relies on ``DynamicCache``
and ``forward(input_ids, attention_mask, position_ids, cache)``, its static path on the module layout of Llama-family
decoders (:mod:`flashtts_torch._static`).

Scheduler (one worker thread, ``TorchRuntime._run``), one iteration:

1. take new requests from the pending queue while the batch has free slots (``max_batch_size``);
2. drop aborted rows from the batch;
3. prefill each new sequence alone, sample its first token, then join it to the batch as its last row;
4. run one decoding step for all active rows and sample one token per row, all rows at once (``sample_batch``;
   each sampled row draws from its own seeded generator);
5. drop finished rows, then hand the step's deltas to the consumers: one ``call_soon_threadsafe`` per event loop.

The scheduler is shared by both decoding paths; what differs (prefill, join, decode, drop) lives in a decoder
object (:class:`Decoder`), chosen at load by ``cache_implementation``:

* :class:`DynamicDecoder` (``dynamic``): the transformers model's own forward with a ``DynamicCache``. Every layer
  holds keys/values of shape ``(batch, kv_heads, columns, head_dim)`` with the rows **right-aligned** (left
  padding). Its mask ``(batch, columns)`` is 1 on real tokens and 0 on padding; position ids are passed explicitly
  per row (``(batch, 1)``, the row's real length), so RoPE does not see the padding. A row joining with a longer
  history left-pads all others; rows leaving trigger a trim of leading all-padding columns. All rows append at the
  same column, which is what ``DynamicCache.update`` (a concatenation) does.
* :class:`flashtts_torch._static.StaticDecoder` (``static``; ``auto`` picks it for Llama-family models on CUDA, and
  on CPU when the cache takes at most a quarter of the available memory): a
  preallocated slot cache with the rows compacted into slots ``0..b-1`` and, on CUDA, a graph-captured decoding
  step. Its capacity (``static_cache_len``) is the backend's ``max_model_len``.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from packaging.version import Version

from flashtts_core.errors import (
    BackendNotReadyError,
    CheckpointError,
    GenerationError,
    PluginError,
)
from flashtts_core.plugins import (
    AdmissionQueue,
    BackendConfig,
    GenerationRequest,
    QueueItem,
    SamplingParams,
    TokenChunk,
    first_audio_reserve,
)
from flashtts_core.runtime import available_cpus
from flashtts_torch.options import DEFAULT_STATIC_CACHE_LEN, TorchOptions

__all__ = (
    "Decoder",
    "DynamicDecoder",
    "SequenceState",
    "TorchRuntime",
    "candidate_weights",
    "process_logits",
    "sample_batch",
    "sample_next",
)

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
_MAX_CACHED_MASKS = 32
# Allowed-id sets smaller than the vocabulary get logits of their own (VocabSubset); a few are kept (each may hold a
# copy of its rows of the output projection, see StaticDecoder.vocab_subset).
_MAX_CACHED_SUBSETS = 4


class SequenceState:
    """One request's state. Written by the worker thread; ``aborted`` is also set by the event loop (a plain
    attribute write, atomic under the GIL, read by the worker before each step).

    ``loop``/``queue`` are where the scheduler delivers the request's items in-process; a sequence submitted by the
    worker process (:mod:`flashtts_torch._worker`) has neither, and ``key`` names it to the parent process."""

    __slots__ = (
        "aborted",
        "disallowed",
        "finished",
        "generator",
        "key",
        "length",
        "loop",
        "next_token",
        "num_generated",
        "presence",
        "prompt",
        "queue",
        "request_id",
        "sampling",
        "seed",
        "stop_ids",
        "vocab",
    )

    def __init__(
        self,
        request: GenerationRequest,
        seed: int,
        loop: asyncio.AbstractEventLoop | None,
        queue: asyncio.Queue[QueueItem] | None,
        key: int = -1,
    ) -> None:
        self.key = key
        self.request_id = request.request_id
        self.prompt = request.prompt_token_ids
        self.sampling = request.sampling
        self.stop_ids = frozenset(request.sampling.stop_token_ids)
        self.seed = seed
        self.loop = loop
        self.queue = queue
        self.aborted = False
        self.finished = False
        self.generator: torch.Generator | None = None
        self.presence: torch.Tensor | None = None  # (vocab,) bool: ids seen so far, for repetition_penalty
        self.disallowed: torch.Tensor | None = None  # (vocab,) bool: True on ids outside allowed_token_ids
        self.vocab: VocabSubset | None = None  # allowed_token_ids as a smaller vocabulary, when it is worth one
        self.length = 0  # real tokens in the KV cache (prompt + fed-back generated ids)
        self.next_token = 0  # sampled, emitted, not yet fed to the model
        self.num_generated = 0


class VocabSubset:
    """A request's allowed ids as a vocabulary of their own: the decoder computes logits for these ids only
    (``(rows, n)`` instead of ``(rows, vocab)``) and the sampler maps its picks back through ``ids``.

    ``ids`` ``(n,)`` long, ascending. ``weight_t`` ``(hidden, n)`` / ``bias`` ``(n,)``: the output projection's rows
    for those ids, transposed, or ``weight_t`` ``None`` where the decoder slices full logits instead (it saves the
    sampling work, not the projection). Transposed and contiguous because ``hidden @ weight_t`` streams the weight
    in the order the product reads it: on the CPU 2.4x faster than ``F.linear`` for one row right after a decoding
    step (the weight is no longer in cache then), 1.1x for eight. Rows of a batch share a subset object or the step
    uses the full vocabulary."""

    __slots__ = ("bias", "ids", "vocab_size", "weight_t")

    def __init__(
        self,
        ids: torch.Tensor,
        vocab_size: int,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """``weight``: the ``(n, hidden)`` rows of the output projection (stored transposed)."""
        self.ids = ids
        self.vocab_size = vocab_size  # of the model, which the subset is part of
        self.weight_t = None if weight is None else weight.t().contiguous()
        self.bias = bias

    def project(self, hidden: torch.Tensor, lm_head: Any) -> torch.Tensor:
        """Logits of ``hidden`` ``(rows, hidden)`` over the subset: ``(rows, n)``."""
        if self.weight_t is None:
            return lm_head(hidden).index_select(-1, self.ids)
        if self.bias is None:
            return hidden @ self.weight_t
        return torch.addmm(self.bias, hidden, self.weight_t)


def process_logits(
    logits: torch.Tensor,
    sampling: SamplingParams,
    presence: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn one row of logits ``(vocab,)`` into the float32 scores that are sampled from (or argmax-ed).

    Order and semantics follow transformers' processors: repetition penalty over the ids in ``presence`` (prompt +
    generated; positive logits divided, negative multiplied), the ``allowed`` mask, then, unless greedy
    (temperature 0): temperature → top-k → top-p (keeps the smallest set whose probability reaches top_p, always
    the best id) → min-p. Removed ids get -inf.
    """
    scores = logits.float()
    penalty = sampling.repetition_penalty
    if penalty != 1.0 and presence is not None:
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(presence, penalised, scores)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, _NEG_INF)
    if sampling.temperature == 0.0:
        return scores
    scores = scores / sampling.temperature
    vocab = scores.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_best = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, _NEG_INF)
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores)  # ascending
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1.0 - sampling.top_p
        drop_sorted[-1] = False  # always keep the best id
        scores = scores.masked_fill(drop_sorted.scatter(0, order, drop_sorted), _NEG_INF)
    if sampling.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < sampling.min_p * probs.max(), _NEG_INF)
    return scores


def sample_next(logits: torch.Tensor, sampling: SamplingParams, sequence: SequenceState) -> torch.Tensor:
    """Pick the next id from one row of logits ``(vocab,)``: argmax when greedy, else a draw from the sequence's
    own generator (so a seeded request does not depend on its batch neighbours). Returns a 0-d long tensor; no host
    synchronisation here, the caller fetches all rows at once. The scheduler uses :func:`sample_batch`; this
    one-row version is the reference it is tested against."""
    allowed = None if sequence.disallowed is None else ~sequence.disallowed
    scores = process_logits(logits, sampling, sequence.presence, allowed)
    if sampling.temperature == 0.0:
        return scores.argmax()
    return torch.multinomial(scores.softmax(-1), 1, generator=sequence.generator)[0]


Candidates = tuple[list[int], torch.Tensor | None, torch.Tensor]


def candidate_weights(
    logits: torch.Tensor,
    samplings: list[SamplingParams],
    presences: list[torch.Tensor | None],
    disalloweds: list[torch.Tensor | None],
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, list[Candidates]]:
    """:func:`process_logits` for a whole batch ``(B, vocab)`` at once.

    ``disalloweds``: per row, ``None`` or a ``(vocab,)`` bool mask that is True on the ids the row may not produce
    (the complement of ``process_logits``' ``allowed``; rows usually share one cached mask object).

    Returns ``(greedy, groups)``: ``greedy`` ``(B,)`` the argmax of the penalised, masked scores (the pick of greedy
    rows; zeros when no row is greedy), and for the sampled rows up to two groups ``(rows, ids, weights)``:
    ``weights`` ``(len(rows), K)`` the unnormalised probabilities ``exp(score - max)`` after
    temperature/top-k/top-p/min-p (0 on removed ids) and ``ids`` their token ids. Rows with nothing to truncate keep
    the vocabulary order (``ids`` is ``None``, no sort); the others get their best ``K`` ids sorted by score, ``K``
    the largest top-k of the group (the vocabulary if a row has none).

    A row's weights and their order do not depend on the other rows: every op is row-wise, and where ``K`` varies,
    the extra columns are zeros at the end of the row, which leave its cumulative sums unchanged.

    ``vocab_size``: the model's vocabulary when ``logits`` covers a subset of it (a top-k that truncates the model's
    vocabulary truncates, i.e. sorts, the subset too, so that a row draws the same ids either way).
    """
    scores = logits.float()
    size, vocab = scores.shape
    device = scores.device
    penalties = [s.repetition_penalty if p is not None else 1.0 for s, p in zip(samplings, presences, strict=True)]
    if any(penalty != 1.0 for penalty in penalties):
        no_presence = torch.zeros(vocab, dtype=torch.bool, device=device)
        presence = torch.stack([no_presence if p is None else p for p in presences])
        penalty = torch.tensor(penalties, dtype=scores.dtype, device=device)[:, None]
        scores = torch.where(presence, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    masks = [m for m in disalloweds if m is not None]
    if masks:
        if len(masks) == size and all(m is masks[0] for m in masks):
            disallowed = masks[0]  # the usual case: one engine, one shared mask object
        else:
            nothing = torch.zeros(vocab, dtype=torch.bool, device=device)
            disallowed = torch.stack([nothing if m is None else m for m in disalloweds])
        scores = scores.masked_fill(disallowed, _NEG_INF)
    # Only when some row is greedy: a full-vocabulary pass each step otherwise wasted (the sampled rows' picks
    # overwrite it).
    greedy = (
        scores.argmax(-1) if any(s.temperature == 0.0 for s in samplings) else scores.new_zeros(size, dtype=torch.long)
    )
    full_vocab = vocab_size or vocab
    plain: list[int] = []
    truncated: list[int] = []
    for row, sampling in enumerate(samplings):
        if sampling.temperature == 0.0:
            continue
        if 0 < sampling.top_k < full_vocab or sampling.top_p < 1.0 or sampling.min_p > 0.0:
            truncated.append(row)
        else:
            plain.append(row)
    groups: list[Candidates] = []
    if plain:
        rows = _select(scores, plain, size)
        temperature = _column([samplings[i].temperature for i in plain], rows)
        rows = rows / temperature
        groups.append((plain, None, (rows - rows.amax(-1, keepdim=True)).exp()))
    if truncated:
        chosen = [samplings[i] for i in truncated]
        rows = _select(scores, truncated, size)
        top_ks = [min(s.top_k, vocab) if 0 < s.top_k < full_vocab else vocab for s in chosen]
        width = max(top_ks)
        # Top-k first, then the temperature on the K survivors only (a positive scale keeps the order and the
        # ties, and gives the same quotients as scaling the whole row).
        values, ids = rows.topk(width, dim=-1)  # (b, K), best first
        values = values / _column([s.temperature for s in chosen], values)
        if any(k < width for k in top_ks):
            kth_best = values.gather(1, torch.tensor(top_ks, device=device)[:, None] - 1)
            values = values.masked_fill(values < kth_best, _NEG_INF)
        weights = (values - values[:, :1]).exp()  # (b, K), 1 at the best id, 0 on removed ids
        if any(s.top_p < 1.0 for s in chosen):
            # process_logits' rule (ascending cumulative probability <= 1 - top_p is dropped, the best id always
            # kept) on unnormalised weights: cumulative <= (1 - top_p) * total.
            ascending = weights.flip(-1).cumsum(-1)
            drop_mass = _column([1.0 - s.top_p for s in chosen], weights)
            drop = (ascending <= drop_mass * ascending[:, -1:]).flip(-1)
            drop[:, 0] = False
            weights = weights.masked_fill(drop, 0.0)
        if any(s.min_p > 0.0 for s in chosen):
            # probs < min_p * max(probs), on the weights (whose max is 1).
            weights = weights.masked_fill(weights < _column([s.min_p for s in chosen], weights), 0.0)
        groups.append((truncated, ids, weights))
    return greedy, groups


def _select(scores: torch.Tensor, rows: list[int], size: int) -> torch.Tensor:
    if len(rows) == size:
        return scores
    return scores.index_select(0, torch.tensor(rows, device=scores.device))


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def sample_batch(
    logits: torch.Tensor, sequences: list[SequenceState], vocab: VocabSubset | None = None
) -> torch.Tensor:
    """Pick one id per row of ``logits`` ``(B, vocab)``; returns ``(B,)`` long, no host synchronisation.

    Greedy rows take the argmax. Sampled rows draw by inverse CDF with one uniform number from their own generator,
    so a seeded request gets the same ids whatever its batch neighbours are.

    With ``vocab``, ``logits`` is ``(B, n)`` over the subset every row shares (its allowed ids, so no mask is
    applied) and the picks are mapped back to vocabulary ids."""
    if vocab is None:
        presences = [seq.presence for seq in sequences]
        disalloweds = [seq.disallowed for seq in sequences]
    else:
        presences = [None if seq.presence is None else seq.presence.index_select(0, vocab.ids) for seq in sequences]
        disalloweds = [None] * len(sequences)
    picks = _sample_rows(logits, sequences, presences, disalloweds, None if vocab is None else vocab.vocab_size)
    return picks if vocab is None else vocab.ids.index_select(0, picks)


def _sample_rows(
    logits: torch.Tensor,
    sequences: list[SequenceState],
    presences: list[torch.Tensor | None],
    disalloweds: list[torch.Tensor | None],
    vocab_size: int | None,
) -> torch.Tensor:
    samplings = [seq.sampling for seq in sequences]
    greedy, groups = candidate_weights(logits, samplings, presences, disalloweds, vocab_size)
    picks = greedy
    for rows, ids, weights in groups:
        draws = torch.cat([torch.rand(1, generator=sequences[i].generator, device=weights.device) for i in rows])
        cumulative = weights.cumsum(-1)  # (b, K)
        # The first column whose cumulative weight reaches u * total: clamped above 0 so that it is never a leading
        # zero-weight column (u == 0); u < 1 keeps it at or before the last non-zero one.
        target = (draws[:, None] * cumulative[:, -1:]).clamp_min(torch.finfo(weights.dtype).tiny)
        column = torch.searchsorted(cumulative, target).clamp_max_(weights.shape[1] - 1)  # (b, 1)
        picked = (column if ids is None else ids.gather(1, column))[:, 0]
        if len(rows) == len(sequences):
            return picked
        picks = picks.index_copy(0, torch.tensor(rows, device=picks.device), picked)
    return picks


#: Receives one scheduler iteration's ``(sequence, item)`` pairs (see :attr:`TorchRuntime.step_listener`).
StepListener = Callable[[list[tuple["SequenceState", QueueItem]]], None]


def _deliver(items: list[tuple[SequenceState, QueueItem]]) -> None:
    """Runs on the consumer's event loop: put a scheduler step's items into their queues, in order."""
    for sequence, item in items:
        assert sequence.queue is not None
        sequence.queue.put_nowait(item)


#: cache_implementation=auto on CPU takes the static cache only when it needs at most this share of the available
#: memory.
_CPU_STATIC_CACHE_SHARE = 0.25


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or ``None`` when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _load_quietly(load: Callable[[], Any]) -> Any:
    """``load()`` without transformers' "Loading weights" progress bar, which a server would write to its log (a
    terminal line of carriage returns)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PluginError(f"invalid device {name!r} for the torch backend: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PluginError(f"device {name!r} requested but torch sees no CUDA GPU; use --llm_device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PluginError(f"device {name!r} requested but MPS is not available here; use --llm_device cpu")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # fp32 on CPU (bf16 matmuls are slow without AMX, fp16 slower still) and on MPS (numerically safest).
    return torch.float32


def _kv_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a DynamicCache: ``cache.layers`` (transformers >= 4.56) or
    ``key_cache``/``value_cache`` lists (older)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


class Decoder(Protocol):
    """What the scheduler needs from a decoding path. Rows are the scheduler's batch, in order; every method runs on
    the worker thread under ``torch.inference_mode()``."""

    #: Most tokens (prompt + generated) a sequence may hold, or ``None`` when only ``max_model_len`` limits it.
    capacity: int | None

    def prefill(self, prompt: Sequence[int], vocab: VocabSubset | None = None) -> torch.Tensor:
        """Run one prompt alone and keep its cache aside; returns the last position's logits ``(1, vocab)`` (over
        ``vocab`` when given: ``(1, n)``)."""
        ...

    def join(self) -> None:
        """Append the last prefilled sequence to the batch as its last row."""
        ...

    def decode(self, ids: Sequence[int], positions: Sequence[int], vocab: VocabSubset | None = None) -> torch.Tensor:
        """One step: row ``i`` feeds ``ids[i]`` at ``positions[i]``; returns next-token logits ``(rows, vocab)``
        (over ``vocab`` when given: ``(rows, n)``)."""
        ...

    def vocab_subset(self, ids: torch.Tensor) -> VocabSubset:
        """A subset of the vocabulary (``ids`` ``(n,)`` ascending) that prefill/decode can compute logits for."""
        ...

    def drop(self, rows: Sequence[int]) -> list[int]:
        """Remove rows; returns, for each row of the new batch in order, its index in the old batch."""
        ...

    def clear(self) -> None:
        """Forget every row (after a failed step)."""
        ...

    def close(self) -> None:
        """Free the cache."""
        ...


class DynamicDecoder:
    """The transformers forward with a batched ``DynamicCache`` (left-padded rows; see the module docstring)."""

    capacity: int | None = None

    def __init__(self, model: Any, device: torch.device) -> None:
        from transformers import DynamicCache

        self._model = model
        self._device = device
        output = model.get_output_embeddings()
        self._vocab_size = int(output.weight.shape[0]) if output is not None else int(model.config.vocab_size)
        # transformers 5.2x renamed forward's past_key_values to cache (5.24 still takes the old name, with a
        # FutureWarning); use whichever this model's forward declares.
        params = inspect.signature(type(model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)
        self._cache_cls: Any = DynamicCache
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (batch, columns) long
        self._pending: tuple[Any, int] | None = None  # a prefilled sequence's cache and prompt length

    def _forward(self, input_ids: torch.Tensor, cache: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        kwargs[self._cache_kwarg] = cache
        output = self._model(input_ids=input_ids, use_cache=True, **kwargs)
        returned = getattr(output, self._cache_kwarg, None)
        return output.logits, (cache if returned is None else returned)

    def vocab_subset(self, ids: torch.Tensor) -> VocabSubset:
        """The model's forward computes every logit; the subset only narrows what the sampler sees."""
        return VocabSubset(ids, self._vocab_size)

    def prefill(self, prompt: Sequence[int], vocab: VocabSubset | None = None) -> torch.Tensor:
        input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=self._device)  # (1, prompt)
        extra = {self._keep_kwarg: 1} if self._keep_kwarg else {}
        logits, cache = self._forward(input_ids, self._cache_cls(), **extra)  # logits (1, 1|prompt, vocab)
        self._pending = (cache, len(prompt))
        last = logits[:, -1]
        return last if vocab is None else last.index_select(-1, vocab.ids)

    def join(self) -> None:
        """Merge the prefilled sequence's cache ``(1, heads, prompt, dim)`` into the batch cache, left-padding
        whichever side is shorter so that every row ends at the last column."""
        assert self._pending is not None, "join() without prefill()"
        (cache, length), self._pending = self._pending, None
        if self._mask is None:
            self._cache = cache
            self._mask = torch.ones(1, length, dtype=torch.long, device=self._device)
            return
        columns = self._mask.shape[1]
        width = max(columns, length)
        pad_old, pad_new = width - columns, width - length
        layers = [
            (
                torch.cat([F.pad(k, (0, 0, pad_old, 0)), F.pad(nk, (0, 0, pad_new, 0))]),
                torch.cat([F.pad(v, (0, 0, pad_old, 0)), F.pad(nv, (0, 0, pad_new, 0))]),
            )
            for (k, v), (nk, nv) in zip(_kv_pairs(self._cache), _kv_pairs(cache), strict=True)
        ]
        self._cache = self._cache_cls(layers)
        new_mask = F.pad(torch.ones(1, length, dtype=torch.long, device=self._device), (pad_new, 0))
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), new_mask])

    def decode(self, ids: Sequence[int], positions: Sequence[int], vocab: VocabSubset | None = None) -> torch.Tensor:
        assert self._mask is not None
        size = len(ids)
        input_ids = torch.tensor([[i] for i in ids], dtype=torch.long, device=self._device)  # (B, 1)
        position_ids = torch.tensor([[p] for p in positions], dtype=torch.long, device=self._device)  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(size, 1)], dim=1)  # (B, columns + 1)
        logits, self._cache = self._forward(
            input_ids, self._cache, attention_mask=self._mask, position_ids=position_ids
        )  # logits (B, 1, vocab)
        last = logits[:, -1, :]
        return last if vocab is None else last.index_select(-1, vocab.ids)

    def drop(self, rows: Sequence[int]) -> list[int]:
        """Remove rows (the others keep their order) and trim leading columns that are padding in every row left."""
        assert self._mask is not None
        gone = set(rows)
        keep = [i for i in range(self._mask.shape[0]) if i not in gone]
        if not keep:
            self.clear()
            return keep
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).to(torch.int8).argmax())  # first column that is real in some row
        layers = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in _kv_pairs(self._cache)
        ]
        self._cache = self._cache_cls(layers)
        self._mask = mask[:, start:]
        return keep

    def clear(self) -> None:
        self._cache = self._mask = self._pending = None

    def close(self) -> None:
        self.clear()


class TorchRuntime:
    """Owns the model and the scheduler thread. ``load``/``close`` run in a worker thread (``anyio.to_thread``);
    ``submit``/``abort`` and the counters are called from the event loop."""

    def __init__(self, config: BackendConfig, options: TorchOptions) -> None:
        self._config = config
        self._options = options
        self._cond = threading.Condition()
        self._pending: AdmissionQueue[SequenceState] = AdmissionQueue()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._model: Any = None
        # Batch state, touched only by the worker thread: the sequences (the decoder's rows, in order) and the
        # decoding path that holds their KV cache.
        self._batch: list[SequenceState] = []
        self._decoder: Decoder | None = None
        self._admitting = 0
        self._disallowed_masks: OrderedDict[frozenset[int], torch.Tensor] = OrderedDict()
        self._vocab_subsets: OrderedDict[frozenset[int], VocabSubset | None] = OrderedDict()
        # Items emitted during the current scheduler iteration, handed to the event loops by _flush.
        self._outbox: list[tuple[SequenceState, QueueItem]] = []
        # Seeds for requests without one: reproducible per server run when config.seed is set.
        self._seed_rng = random.Random(config.seed)
        # Slots that later segments leave free for new requests' first generations (AdmissionQueue.take).
        self._reserve = first_audio_reserve(config.max_batch_size)
        self._threads: int | None = None  # intra-op threads of the scheduler thread on CPU (None: torch's)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.vocab_size = 0
        self.max_model_len = config.max_model_len
        self.peak_batch = 0  # largest decoding batch seen (tests check that requests are batched)
        self.cache_implementation = "dynamic"  # the decoding path in use: "dynamic" or "static"
        self.cuda_graphs = False  # whether the static path replays CUDA graphs
        self.path_description = ""  # one line: the path and why (logged at load, printed by benchmarks)
        # Set by the worker process: receives every scheduler iteration's items (possibly none) in place of the
        # per-loop hand-off, on the scheduler thread (and once more from close).
        self.step_listener: StepListener | None = None

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs captured so far by the static path (0 on the dynamic path)."""
        return int(getattr(self._decoder, "graphs_captured", 0))

    # --- event-loop side -------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._batch) + self._admitting

    @property
    def num_waiting(self) -> int:
        return len(self._pending)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> SequenceState:
        """Queue a request for the worker; never blocks and never refuses for load (the queue is unbounded)."""
        return self._enqueue(request, loop, asyncio.Queue())

    def submit_detached(self, request: GenerationRequest, key: int) -> SequenceState:
        """Queue a request whose items go to :attr:`step_listener` (the worker process), named there by ``key``."""
        return self._enqueue(request, None, None, key)

    def _enqueue(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop | None,
        queue: asyncio.Queue[QueueItem] | None,
        key: int = -1,
    ) -> SequenceState:
        seed = request.sampling.seed
        if seed is None:
            seed = self._seed_rng.getrandbits(63)
        sequence = SequenceState(request, seed, loop, queue, key)
        with self._cond:
            if self._closing or self._thread is None:
                raise BackendNotReadyError("the torch backend is shutting down")
            self._pending.append(sequence, request.priority)
            self._cond.notify()
        return sequence

    def abort(self, sequence: SequenceState) -> None:
        """Called when the consumer goes away: a queued sequence is removed, a running one is dropped by the worker
        before its next step (at most one forward pass later)."""
        if sequence.finished:
            return
        sequence.aborted = True
        with self._cond:
            try:
                self._pending.remove(sequence)
            except ValueError:
                pass
            self._cond.notify()

    # --- lifecycle (worker threads) --------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and start the scheduler thread. Blocking; run off the event loop."""
        import transformers
        from transformers import AutoModelForCausalLM

        config = self._config
        model_dir = Path(config.model_dir)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(
                f"{model_dir} is not a Hugging Face model folder (no config.json); point model_dir at the LLM folder"
            )
        self.device = device = _resolve_device(config.device)
        self.dtype = dtype = _resolve_dtype(config.dtype, device)
        if device.type == "cpu":
            # The scheduler thread sets this for itself (torch's OpenMP thread count is per thread): the option,
            # else the server's share of the CPU (BackendConfig.cpu_threads), else torch's default capped at the
            # CPUs this process may use (torch counts every core of the machine, which oversubscribes containers).
            self._threads = (
                self._options.num_threads or self._config.cpu_threads or min(torch.get_num_threads(), available_cpus())
            )
        # transformers 4.56 renamed from_pretrained's torch_dtype to dtype.
        dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs: dict[str, Any] = {
            dtype_kwarg: dtype,
            "local_files_only": True,  # serve time never downloads
            "trust_remote_code": self._options.trust_remote_code,
        }
        if config.attn_implementation:
            kwargs["attn_implementation"] = config.attn_implementation
        model = _load_quietly(lambda: AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs))
        model = model.to(device).eval()
        self._model = model
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        output = model.get_output_embeddings()
        self.vocab_size = int(output.weight.shape[0]) if output is not None else int(text_config.vocab_size)
        max_positions = getattr(text_config, "max_position_embeddings", None)
        self.max_model_len = min(config.max_model_len, max_positions) if max_positions else config.max_model_len
        self._decoder = self._make_decoder(model)  # the backend logs path_description with its "ready" line
        self._thread = threading.Thread(target=self._run, name="flashtts-torch-scheduler", daemon=True)
        self._thread.start()

    def _make_decoder(self, model: Any) -> Decoder:
        """Pick the decoding path (``cache_implementation``), build it and set ``path_description`` (and, for the
        static path, ``max_model_len`` = the cache length)."""
        from flashtts_torch._static import SUPPORTED_ARCHITECTURES, StaticDecoder, UnsupportedModelError, inspect_layout

        options, device = self._options, self.device
        mode = options.cache_mode
        if mode == "dynamic":
            self.path_description = "dynamic cache (cache_implementation=dynamic)"
            return DynamicDecoder(model, device)
        if mode == "auto" and device.type not in ("cuda", "cpu"):
            self.path_description = (
                f"dynamic cache (cache_implementation=auto on {device.type}: the static cache is picked "
                "automatically on CUDA and CPU only; ask for it with cache_implementation=static)"
            )
            return DynamicDecoder(model, device)
        wanted = options.static_cache_len or DEFAULT_STATIC_CACHE_LEN
        cache_len = min(wanted, self.max_model_len)
        try:
            layout = inspect_layout(model, cache_len)
        except UnsupportedModelError as exc:
            if mode == "static":
                raise PluginError(
                    f"cache_implementation=static is not available for this model: {exc}. The static path "
                    f"supports {', '.join(SUPPORTED_ARCHITECTURES)} (full attention, RoPE without "
                    "sequence-length-dependent scaling); use cache_implementation=dynamic"
                ) from exc
            self.path_description = f"dynamic cache (cache_implementation=auto, no static path: {exc})"
            return DynamicDecoder(model, device)
        slots = self._config.max_batch_size
        if mode == "auto" and device.type == "cpu":
            # On the CPU an allocation this large does not fail, it swaps: take the static cache only where it
            # leaves most of the memory free.
            size = StaticDecoder.cache_size(layout, slots=slots, cache_len=cache_len, dtype=self.dtype)
            free = _available_memory()
            if free is None or size > free * _CPU_STATIC_CACHE_SHARE:
                what = "unknown" if free is None else f"{free / 2**30:.1f} GiB"
                self.path_description = (
                    f"dynamic cache (cache_implementation=auto: the static cache would take {size / 2**30:.1f} GiB "
                    f"of the {what} of available memory; lower static_cache_len or --llm_batch_size, or ask for "
                    "cache_implementation=static)"
                )
                return DynamicDecoder(model, device)
        try:
            with torch.inference_mode():
                decoder = StaticDecoder(
                    layout,
                    slots=slots,
                    cache_len=cache_len,
                    device=device,
                    dtype=self.dtype,
                    cuda_graphs=options.cuda_graphs,
                )
        except torch.cuda.OutOfMemoryError as exc:
            size = StaticDecoder.cache_size(layout, slots=slots, cache_len=cache_len, dtype=self.dtype)
            advice = "lower static_cache_len or --llm_batch_size, or use cache_implementation=dynamic"
            if mode == "static":
                raise PluginError(
                    f"the static KV cache ({slots} slots x {cache_len} columns, {size / 2**30:.1f} GiB) does not "
                    f"fit on {device}: {advice}"
                ) from exc
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.path_description = (
                f"dynamic cache (cache_implementation=auto: the static cache, {size / 2**30:.1f} GiB, does not fit; "
                f"{advice})"
            )
            return DynamicDecoder(model, device)
        self.max_model_len = cache_len
        self.cache_implementation = "static"
        self.cuda_graphs = decoder.use_graphs
        if decoder.use_graphs:
            graphs = "CUDA graphs on"
        elif device.type == "cuda":
            graphs = "CUDA graphs off (cuda_graphs=false)"
        else:
            graphs = f"no CUDA graphs on {device.type}"
        capped = ""
        if options.static_cache_len is not None and cache_len < options.static_cache_len:
            capped = f" (static_cache_len {options.static_cache_len} capped by max_model_len)"
        self.path_description = (
            f"static cache (cache_implementation={mode}, {type(model).__name__}), {graphs}, "
            f"cache_len={cache_len}{capped}, slots={slots}, {decoder.cache_bytes / 2**20:.1f} MiB of keys/values"
        )
        return decoder

    def close(self) -> None:
        """Stop the worker (after its current step), end every open request with ``abort`` and free the model."""
        with self._cond:
            self._closing = True
            leftovers = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        leftovers.extend(self._batch)
        for sequence in leftovers:
            self._finish(sequence, TokenChunk((), "abort"))
        self._flush()
        self._batch = []
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._disallowed_masks.clear()
        self._vocab_subsets.clear()
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- scheduler (worker thread) ---------------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads is not None and self._threads != torch.get_num_threads():
            torch.set_num_threads(self._threads)  # this thread's count (see load)
        with torch.inference_mode():
            while True:
                admitted = self._next_work()
                if admitted is None:
                    return
                try:
                    self._iterate(admitted)
                finally:
                    self._flush()

    def _iterate(self, admitted: list[SequenceState]) -> None:
        """One scheduler iteration: drop aborted rows, prefill the admitted sequences, one decoding step."""
        self._drop_rows([i for i, seq in enumerate(self._batch) if seq.aborted])
        for sequence in admitted:
            try:
                if not sequence.aborted:
                    self._prefill(sequence)
            except Exception as exc:
                logger.exception("prefill failed for request %s", sequence.request_id)
                self._finish(sequence, self._error(exc))
            finally:
                self._admitting -= 1
        if admitted:
            self._flush()  # first tokens out before the decoding step (time to first token)
        if not self._batch:
            return
        try:
            self._decode_step()
        except Exception as exc:
            logger.exception("decoding step failed; ending %d requests", len(self._batch))
            error = self._error(exc)
            for sequence in self._batch:
                self._finish(sequence, error)
            self._batch = []
            if self._decoder is not None:
                self._decoder.clear()

    def _next_work(self) -> list[SequenceState] | None:
        """Block until there is something to do; return the newly admitted sequences (``None``: shut down)."""
        with self._cond:
            while not self._closing and not self._pending and not self._batch:
                self._cond.wait()
            if self._closing:
                return None
            free = max(self._config.max_batch_size - len(self._batch), 0)
            admitted = self._pending.take(free, self._reserve)
            self._admitting = len(admitted)
            return admitted

    def _prefill(self, sequence: SequenceState) -> None:
        assert self._decoder is not None
        device = self.device
        sampling = sequence.sampling
        sequence.generator = torch.Generator(device=device)
        sequence.generator.manual_seed(sequence.seed)
        if sampling.repetition_penalty != 1.0:
            presence = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            presence[torch.tensor(sequence.prompt, device=device)] = True
            sequence.presence = presence
        if sampling.allowed_token_ids is not None:
            sequence.disallowed = self._disallowed_mask(sampling.allowed_token_ids)
            sequence.vocab = self._vocab_subset(sampling.allowed_token_ids)
        logits = self._decoder.prefill(sequence.prompt, sequence.vocab)  # (1, vocab | subset)
        sequence.length = len(sequence.prompt)
        token = int(sample_batch(logits, [sequence], sequence.vocab)[0])
        if self._accept(sequence, token):
            self._decoder.join()
            self._batch.append(sequence)

    def _decode_step(self) -> None:
        assert self._decoder is not None
        batch = self._batch
        self.peak_batch = max(self.peak_batch, len(batch))
        # Every row restricted to the same allowed ids (one engine's requests): logits for those ids only.
        vocab = batch[0].vocab
        if vocab is not None and any(seq.vocab is not vocab for seq in batch):
            vocab = None
        tokens, lengths = [seq.next_token for seq in batch], [seq.length for seq in batch]
        logits = self._decoder.decode(tokens, lengths, vocab)  # (B, vocab | subset)
        picks = sample_batch(logits, batch, vocab).tolist()
        done: list[int] = []
        for i, (sequence, token) in enumerate(zip(batch, picks, strict=True)):
            sequence.length += 1
            if not self._accept(sequence, token):
                done.append(i)
        self._drop_rows(done)

    def _accept(self, sequence: SequenceState, token: int) -> bool:
        """Apply stop/length rules to a sampled id and emit it; ``True`` if the sequence goes on."""
        if token in sequence.stop_ids:
            self._finish(sequence, TokenChunk((), "stop"))
            return False
        sequence.num_generated += 1
        if sequence.num_generated >= sequence.sampling.max_tokens or self._context_full(sequence):
            self._finish(sequence, TokenChunk((token,), "length"))
            return False
        if sequence.presence is not None:
            sequence.presence[token] = True
        sequence.next_token = token
        self._emit(sequence, TokenChunk((token,)))
        return True

    def _context_full(self, sequence: SequenceState) -> bool:
        """Prompt + generated ids fill the decoder's capacity (the static cache), so nothing more can be fed back.
        ``BackendBase.validate`` already caps ``max_tokens`` so; this guards requests that bypass it."""
        capacity = self._decoder.capacity if self._decoder is not None else None
        return capacity is not None and len(sequence.prompt) + sequence.num_generated >= capacity

    def _drop_rows(self, rows: list[int]) -> None:
        """Remove batch rows (finished or aborted); the decoder says which old row each remaining row is."""
        if not rows:
            return
        assert self._decoder is not None
        order = self._decoder.drop(rows)
        self._batch = [self._batch[i] for i in order]

    def _disallowed_mask(self, allowed: frozenset[int]) -> torch.Tensor:
        """(vocab,) bool mask, True outside ``allowed``, cached per set: engines pass the same frozenset object with
        every request, so the lookup is an identity hit, the mask is built once and shared by every row."""
        mask = self._disallowed_masks.get(allowed)
        if mask is None:
            mask = torch.ones(self.vocab_size, dtype=torch.bool, device=self.device)
            mask[torch.tensor(sorted(allowed), dtype=torch.long, device=self.device)] = False
            self._disallowed_masks[allowed] = mask
            if len(self._disallowed_masks) > _MAX_CACHED_MASKS:
                self._disallowed_masks.popitem(last=False)
        else:
            self._disallowed_masks.move_to_end(allowed)
        return mask

    def _vocab_subset(self, allowed: frozenset[int]) -> VocabSubset | None:
        """The decoder's subset for ``allowed``, cached per set like the masks; ``None`` when the set is the whole
        vocabulary. Any smaller set is worth one: its logits cost at most the full ones, and sampling skips the mask
        (one pass over ``(rows, vocab)``) and the columns outside it."""
        if allowed in self._vocab_subsets:
            self._vocab_subsets.move_to_end(allowed)
            return self._vocab_subsets[allowed]
        subset = None
        if len(allowed) < self.vocab_size:
            assert self._decoder is not None
            ids = torch.tensor(sorted(allowed), dtype=torch.long, device=self.device)
            subset = self._decoder.vocab_subset(ids)
        self._vocab_subsets[allowed] = subset
        if len(self._vocab_subsets) > _MAX_CACHED_SUBSETS:
            self._vocab_subsets.popitem(last=False)
        return subset

    # --- hand-off to the event loop --------------------------------------------------------------------------

    def _emit(self, sequence: SequenceState, item: QueueItem) -> None:
        """Queue an item for the consumer; sent by :meth:`_flush` at the end of the scheduler iteration."""
        self._outbox.append((sequence, item))

    def _flush(self) -> None:
        """Hand this iteration's items over with one ``call_soon_threadsafe`` per event loop (one wake-up per step,
        not one per token per row)."""
        outbox, self._outbox = self._outbox, []
        if self.step_listener is not None:
            self.step_listener(outbox)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[SequenceState, QueueItem]]] = {}
        for sequence, item in outbox:
            assert sequence.loop is not None
            by_loop.setdefault(sequence.loop, []).append((sequence, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed: nobody will read these sequences again
                for sequence, _ in items:
                    sequence.aborted = True

    def _finish(self, sequence: SequenceState, item: QueueItem) -> None:
        if sequence.finished:
            return
        sequence.finished = True
        self._emit(sequence, item)

    @staticmethod
    def _error(exc: Exception) -> GenerationError:
        error = GenerationError(f"the torch backend failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
