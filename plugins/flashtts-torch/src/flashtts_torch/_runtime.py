"""The torch side of the backend: model loading, the continuous-batching scheduler thread and the sampler.

Why not ``model.generate``: it cannot add a request to a running batch, streams text (``TextIteratorStreamer``
flushes at spaces, and audio tokens have none), and cannot be aborted from outside. Why not transformers' own
continuous batching (``generate_batch`` / ``ContinuousBatchingManager``, transformers 5.x): one generation config and
one seed for the whole manager, no per-request allowed-token mask, a paged-attention cache aimed at CUDA, and an
API that changes between minor releases. The loop below is small and only relies on ``DynamicCache`` and
``forward(input_ids, attention_mask, position_ids, cache)``.

Scheduler (one worker thread, ``TorchRuntime._run``), one iteration:

1. take new requests from the pending queue while the batch has free slots (``max_batch_size``);
2. drop aborted rows from the batch;
3. prefill each new sequence alone (batch 1, its own fresh cache), sample its first token, then merge its cache
   into the batch cache;
4. run one decoding step for all active rows in a single forward pass and sample one token per row, all rows at
   once (``sample_batch``; each sampled row draws from its own seeded generator);
5. drop finished rows, then hand the step's deltas to the consumers: one ``call_soon_threadsafe`` per event loop.

Batched KV cache: every layer holds keys/values of shape ``(batch, kv_heads, columns, head_dim)`` with the rows
**right-aligned** (left padding). ``self._mask`` ``(batch, columns)`` is 1 on real tokens and 0 on padding;
position ids are passed explicitly per row (``(batch, 1)``, the row's real length), so RoPE does not see the padding.
A row joining with a longer history left-pads all others; rows leaving trigger a trim of leading all-padding columns.
All rows append at the same column, which is what ``DynamicCache.update`` (a concatenation) does.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import random
import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from packaging.version import Version

from flashtts_core.errors import (
    BackendNotReadyError,
    CheckpointError,
    GenerationError,
    PluginError,
)
from flashtts_core.plugins import BackendConfig, GenerationRequest, QueueItem, SamplingParams, TokenChunk
from flashtts_torch.options import TorchOptions

__all__ = ("SequenceState", "TorchRuntime", "candidate_weights", "process_logits", "sample_batch", "sample_next")

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
_MAX_CACHED_MASKS = 32


class SequenceState:
    """One request's state. Written by the worker thread; ``aborted`` is also set by the event loop (a plain
    attribute write, atomic under the GIL, read by the worker before each step)."""

    __slots__ = (
        "aborted",
        "allowed",
        "finished",
        "generator",
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
    )

    def __init__(
        self, request: GenerationRequest, seed: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[QueueItem]
    ) -> None:
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
        self.allowed: torch.Tensor | None = None  # (vocab,) bool: allowed_token_ids
        self.length = 0  # real tokens in the KV cache (prompt + fed-back generated ids)
        self.next_token = 0  # sampled, emitted, not yet fed to the model
        self.num_generated = 0


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
    scores = process_logits(logits, sampling, sequence.presence, sequence.allowed)
    if sampling.temperature == 0.0:
        return scores.argmax()
    return torch.multinomial(scores.softmax(-1), 1, generator=sequence.generator)[0]


Candidates = tuple[list[int], torch.Tensor | None, torch.Tensor]


def candidate_weights(
    logits: torch.Tensor,
    samplings: list[SamplingParams],
    presences: list[torch.Tensor | None],
    alloweds: list[torch.Tensor | None],
) -> tuple[torch.Tensor, list[Candidates]]:
    """:func:`process_logits` for a whole batch ``(B, vocab)`` at once.

    Returns ``(greedy, groups)``: ``greedy`` ``(B,)`` the argmax of the penalised, masked scores (the pick of greedy
    rows), and for the sampled rows up to two groups ``(rows, ids, weights)``: ``weights`` ``(len(rows), K)`` the
    unnormalised probabilities ``exp(score - max)`` after temperature/top-k/top-p/min-p (0 on removed ids) and
    ``ids`` their token ids. Rows with nothing to truncate keep the vocabulary order (``ids`` is ``None``, no sort);
    the others get their best ``K`` ids sorted by score, ``K`` the largest top-k of the group (the vocabulary if a
    row has none).

    A row's weights and their order do not depend on the other rows: every op is row-wise, and where ``K`` varies,
    the extra columns are zeros at the end of the row, which leave its cumulative sums unchanged.
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
    masks = [m for m in alloweds if m is not None]
    if masks:
        if len(masks) == size and all(m is masks[0] for m in masks):
            allowed = masks[0]  # the usual case: one engine, one shared mask object
        else:
            everything = torch.ones(vocab, dtype=torch.bool, device=device)
            allowed = torch.stack([everything if m is None else m for m in alloweds])
        scores = scores.masked_fill(~allowed, _NEG_INF)
    greedy = scores.argmax(-1)
    plain: list[int] = []
    truncated: list[int] = []
    for row, sampling in enumerate(samplings):
        if sampling.temperature == 0.0:
            continue
        if 0 < sampling.top_k < vocab or sampling.top_p < 1.0 or sampling.min_p > 0.0:
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
        rows = rows / _column([s.temperature for s in chosen], rows)
        top_ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in chosen]
        width = max(top_ks)
        values, ids = rows.topk(width, dim=-1)  # (b, K), best first
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


def sample_batch(logits: torch.Tensor, sequences: list[SequenceState]) -> torch.Tensor:
    """Pick one id per row of ``logits`` ``(B, vocab)``; returns ``(B,)`` long, no host synchronisation.

    Greedy rows take the argmax. Sampled rows draw by inverse CDF with one uniform number from their own generator,
    so a seeded request gets the same ids whatever its batch neighbours are."""
    greedy, groups = candidate_weights(
        logits,
        [seq.sampling for seq in sequences],
        [seq.presence for seq in sequences],
        [seq.allowed for seq in sequences],
    )
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


def _deliver(items: list[tuple[SequenceState, QueueItem]]) -> None:
    """Runs on the consumer's event loop: put a scheduler step's items into their queues, in order."""
    for sequence, item in items:
        sequence.queue.put_nowait(item)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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


class TorchRuntime:
    """Owns the model and the scheduler thread. ``load``/``close`` run in a worker thread (``anyio.to_thread``);
    ``submit``/``abort`` and the counters are called from the event loop."""

    def __init__(self, config: BackendConfig, options: TorchOptions) -> None:
        self._config = config
        self._options = options
        self._cond = threading.Condition()
        self._pending: deque[SequenceState] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._cache_kwarg = "past_key_values"
        self._keep_kwarg: str | None = None
        self._cache_cls: Any = None
        # Batch state, touched only by the worker thread.
        self._batch: list[SequenceState] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (batch, columns) long
        self._admitting = 0
        self._allowed_masks: OrderedDict[frozenset[int], torch.Tensor] = OrderedDict()
        # Items emitted during the current scheduler iteration, handed to the event loops by _flush.
        self._outbox: list[tuple[SequenceState, QueueItem]] = []
        # Seeds for requests without one: reproducible per server run when config.seed is set.
        self._seed_rng = random.Random(config.seed)
        self._previous_threads: int | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.vocab_size = 0
        self.max_model_len = config.max_model_len
        self.peak_batch = 0  # largest decoding batch seen (tests check that requests are batched)

    # --- event-loop side -------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._batch) + self._admitting

    @property
    def num_waiting(self) -> int:
        return len(self._pending)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> SequenceState:
        """Queue a request for the worker; never blocks and never refuses for load (the queue is unbounded)."""
        seed = request.sampling.seed
        if seed is None:
            seed = self._seed_rng.getrandbits(63)
        sequence = SequenceState(request, seed, loop, asyncio.Queue())
        with self._cond:
            if self._closing or self._thread is None:
                raise BackendNotReadyError("the torch backend is shutting down")
            self._pending.append(sequence)
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
        from transformers import AutoModelForCausalLM, DynamicCache

        config = self._config
        model_dir = Path(config.model_dir)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(
                f"{model_dir} is not a Hugging Face model folder (no config.json); point model_dir at the LLM folder"
            )
        self.device = device = _resolve_device(config.device)
        self.dtype = dtype = _resolve_dtype(config.dtype, device)
        if device.type == "cpu":
            wanted = self._options.num_threads or min(torch.get_num_threads(), _available_cpus())
            if wanted != torch.get_num_threads():
                self._previous_threads = torch.get_num_threads()
                torch.set_num_threads(wanted)
        # transformers 4.56 renamed from_pretrained's torch_dtype to dtype.
        dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs: dict[str, Any] = {
            dtype_kwarg: dtype,
            "local_files_only": True,  # serve time never downloads
            "trust_remote_code": self._options.trust_remote_code,
        }
        if config.attn_implementation:
            kwargs["attn_implementation"] = config.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        model = model.to(device).eval()
        # transformers 5.2x renamed forward's past_key_values to cache (5.24 still takes the old name, with a
        # FutureWarning); use whichever this model's forward declares.
        params = inspect.signature(type(model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)
        self._cache_cls = DynamicCache
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        output = model.get_output_embeddings()
        self.vocab_size = int(output.weight.shape[0]) if output is not None else int(text_config.vocab_size)
        max_positions = getattr(text_config, "max_position_embeddings", None)
        self.max_model_len = min(config.max_model_len, max_positions) if max_positions else config.max_model_len
        self._model = model
        self._thread = threading.Thread(target=self._run, name="flashtts-torch-scheduler", daemon=True)
        self._thread.start()

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
        self._cache = self._mask = None
        self._allowed_masks.clear()
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self._previous_threads is not None:
            torch.set_num_threads(self._previous_threads)
            self._previous_threads = None

    # --- scheduler (worker thread) ---------------------------------------------------------------------------

    def _run(self) -> None:
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
            self._batch, self._cache, self._mask = [], None, None

    def _next_work(self) -> list[SequenceState] | None:
        """Block until there is something to do; return the newly admitted sequences (``None``: shut down)."""
        with self._cond:
            while not self._closing and not self._pending and not self._batch:
                self._cond.wait()
            if self._closing:
                return None
            free = max(self._config.max_batch_size - len(self._batch), 0)
            admitted: list[SequenceState] = []
            while self._pending and len(admitted) < free:
                admitted.append(self._pending.popleft())
            self._admitting = len(admitted)
            return admitted

    def _forward(self, input_ids: torch.Tensor, cache: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        kwargs[self._cache_kwarg] = cache
        output = self._model(input_ids=input_ids, use_cache=True, **kwargs)
        returned = getattr(output, self._cache_kwarg, None)
        return output.logits, (cache if returned is None else returned)

    def _prefill(self, sequence: SequenceState) -> None:
        device = self.device
        sampling = sequence.sampling
        sequence.generator = torch.Generator(device=device)
        sequence.generator.manual_seed(sequence.seed)
        if sampling.repetition_penalty != 1.0:
            presence = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            presence[torch.tensor(sequence.prompt, device=device)] = True
            sequence.presence = presence
        if sampling.allowed_token_ids is not None:
            sequence.allowed = self._allowed_mask(sampling.allowed_token_ids)
        input_ids = torch.tensor([sequence.prompt], dtype=torch.long, device=device)  # (1, prompt)
        extra = {self._keep_kwarg: 1} if self._keep_kwarg else {}
        logits, cache = self._forward(input_ids, self._cache_cls(), **extra)  # logits (1, 1|prompt, vocab)
        sequence.length = len(sequence.prompt)
        token = int(sample_batch(logits[:, -1], [sequence])[0])
        if self._accept(sequence, token):
            self._join(sequence, cache)

    def _decode_step(self) -> None:
        batch = self._batch
        assert self._mask is not None
        device = self.device
        size = len(batch)
        self.peak_batch = max(self.peak_batch, size)
        input_ids = torch.tensor([[seq.next_token] for seq in batch], dtype=torch.long, device=device)  # (B, 1)
        positions = torch.tensor([[seq.length] for seq in batch], dtype=torch.long, device=device)  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(size, 1)], dim=1)  # (B, columns + 1)
        logits, self._cache = self._forward(
            input_ids, self._cache, attention_mask=self._mask, position_ids=positions
        )  # logits (B, 1, vocab)
        picks = sample_batch(logits[:, -1, :], batch).tolist()
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
        if sequence.num_generated >= sequence.sampling.max_tokens:
            self._finish(sequence, TokenChunk((token,), "length"))
            return False
        if sequence.presence is not None:
            sequence.presence[token] = True
        sequence.next_token = token
        self._emit(sequence, TokenChunk((token,)))
        return True

    def _join(self, sequence: SequenceState, cache: Any) -> None:
        """Merge a prefilled sequence's cache ``(1, heads, prompt, dim)`` into the batch cache, left-padding
        whichever side is shorter so that every row ends at the last column."""
        new_kv = _kv_pairs(cache)
        length = sequence.length
        if not self._batch:
            self._cache = cache
            self._mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        else:
            assert self._mask is not None
            columns = self._mask.shape[1]
            width = max(columns, length)
            pad_old, pad_new = width - columns, width - length
            layers = [
                (
                    torch.cat([F.pad(k, (0, 0, pad_old, 0)), F.pad(nk, (0, 0, pad_new, 0))]),
                    torch.cat([F.pad(v, (0, 0, pad_old, 0)), F.pad(nv, (0, 0, pad_new, 0))]),
                )
                for (k, v), (nk, nv) in zip(_kv_pairs(self._cache), new_kv, strict=True)
            ]
            self._cache = self._cache_cls(layers)
            new_mask = F.pad(torch.ones(1, length, dtype=torch.long, device=self.device), (pad_new, 0))
            self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), new_mask])
        self._batch.append(sequence)

    def _drop_rows(self, rows: list[int]) -> None:
        """Remove batch rows (finished or aborted) and trim leading columns that are padding in every row left."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self._batch)) if i not in gone]
        self._batch = [self._batch[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).to(torch.int8).argmax())  # first column that is real in some row
        layers = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in _kv_pairs(self._cache)
        ]
        self._cache = self._cache_cls(layers)
        self._mask = mask[:, start:]

    def _allowed_mask(self, allowed: frozenset[int]) -> torch.Tensor:
        """(vocab,) bool mask, cached per set: engines pass the same frozenset object with every request, so the
        lookup is an identity hit and the mask is built once."""
        mask = self._allowed_masks.get(allowed)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            mask[torch.tensor(sorted(allowed), dtype=torch.long, device=self.device)] = True
            self._allowed_masks[allowed] = mask
            if len(self._allowed_masks) > _MAX_CACHED_MASKS:
                self._allowed_masks.popitem(last=False)
        else:
            self._allowed_masks.move_to_end(allowed)
        return mask

    # --- hand-off to the event loop --------------------------------------------------------------------------

    def _emit(self, sequence: SequenceState, item: QueueItem) -> None:
        """Queue an item for the consumer; sent by :meth:`_flush` at the end of the scheduler iteration."""
        self._outbox.append((sequence, item))

    def _flush(self) -> None:
        """Hand this iteration's items over with one ``call_soon_threadsafe`` per event loop (one wake-up per step,
        not one per token per row)."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[SequenceState, QueueItem]]] = {}
        for sequence, item in outbox:
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
