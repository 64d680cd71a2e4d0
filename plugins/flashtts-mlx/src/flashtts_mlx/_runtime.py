"""The mlx side of the backend: model loading, the continuous-batching worker thread and the per-request sampler.

Why mlx-lm's ``BatchGenerator`` and not one ``stream_generate`` per request: in mlx-lm 0.32 it takes a sampler, a
list of logits processors, stop sequences and ``max_tokens`` **per inserted sequence** (``insert(samplers=...,
logits_processors=..., stop_sequences=...)``), lets sequences join a running batch, and ``remove(uids)`` drops one
between steps. That is everything the backend contract needs, and concurrent requests then share one forward pass
per step instead of taking turns on the model (mlx has no thread-safe concurrent generation either).

mlx has no asyncio API and its evaluation blocks, so one worker thread owns the model and the generator
(``MlxRuntime._run``). One iteration:

1. drop aborted sequences (``remove``);
2. insert queued requests while fewer than ``max_batch_size`` are running;
3. ``next()``: one decoding step for the generation batch plus one prefill chunk (``prefill_step_size`` tokens) of
   the prompts still being processed;
4. hand each new id to its request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``.

Seeds: ``mx.random.seed`` sets one process-wide key, so seeding per request that way would make a seeded request
depend on everything else that samples at the same time. Instead each request's sampler holds its own PRNG key
(``mx.random.key(seed)``, split once per step) and passes it to ``mx.random.categorical(..., key=...)``: a seeded
request draws the same ids whatever shares the batch (the conformance kit checks this).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    SamplingParams,
    TokenChunk,
    first_audio_reserve,
)
from flashtts_mlx.options import MlxOptions

__all__ = ("MlxRuntime", "MlxSequence", "make_sampler_for")

logger = logging.getLogger(__name__)

_MAX_CACHED_MASKS = 32
_GPU_DEVICE_NAMES = frozenset({"gpu", "mps", "metal", "cuda"})

# What the worker hands to the event loop: a delta, or the error that ends the request.
QueueItem = TokenChunk | BaseException


class MlxSequence:
    """One request's state. ``aborted`` is set by the event loop (a plain attribute write, atomic under the GIL)
    and read by the worker before each step; everything else is written by the worker only."""

    __slots__ = ("aborted", "finished", "loop", "queue", "request", "seed", "uid")

    def __init__(
        self, request: GenerationRequest, seed: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[QueueItem]
    ) -> None:
        self.request = request
        self.seed = seed
        self.loop = loop
        self.queue = queue
        self.aborted = False
        self.finished = False
        self.uid: int | None = None  # BatchGenerator uid once inserted


def make_sampler_for(
    mx: Any, sampling: SamplingParams, seed: int, greedy: Callable[[Any], Any]
) -> Callable[[Any], Any]:
    """The sampler of one request: ``greedy`` (shared, so an all-greedy batch takes one batched argmax) when the
    temperature is 0, else temperature → top-k → top-p → min-p (transformers' order, as the torch backend) and a
    draw with the request's own key.

    mlx-lm's ``make_sampler`` is not used as is because it applies top-p/min-p before the temperature and draws
    from the process-wide key; its filters (``apply_top_k``/``apply_top_p``/``apply_min_p``) are reused.
    """
    if sampling.temperature == 0.0:
        return greedy
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    inverse_temperature = 1.0 / sampling.temperature
    top_k, top_p, min_p = sampling.top_k, sampling.top_p, sampling.min_p
    state = [mx.random.key(seed)]

    def sample(logprobs: Any) -> Any:
        scores = logprobs * inverse_temperature
        # Renormalise: top-p exponentiates, and a low temperature would otherwise underflow every probability.
        scores = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
        if 0 < top_k < scores.shape[-1]:
            scores = apply_top_k(scores, top_k)
        if top_p < 1.0:
            scores = apply_top_p(scores, top_p)
        if min_p > 0.0:
            scores = apply_min_p(scores, min_p)
        keys = mx.random.split(state[0], 2)
        state[0] = keys[0]
        return mx.random.categorical(scores, key=keys[1])

    return sample


class MlxRuntime:
    """Owns the model, the ``BatchGenerator`` and the worker thread. ``load``/``close`` block (run them with
    ``anyio.to_thread``); ``submit``/``abort`` and the counters are called from the event loop."""

    def __init__(self, config: BackendConfig, options: MlxOptions) -> None:
        self._config = config
        self._options = options
        self._cond = threading.Condition()
        self._pending: AdmissionQueue[MlxSequence] = AdmissionQueue()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        # Worker-thread state.
        self._mx: Any = None
        self._model: Any = None
        self._generator: Any = None
        self._stream: Any = None
        self._active: dict[int, MlxSequence] = {}
        self._admitting = 0
        self._allowed_masks: OrderedDict[frozenset[int], Any] = OrderedDict()
        self._greedy: Callable[[Any], Any] | None = None
        # Seeds for requests without one: reproducible per server run when config.seed is set.
        self._seed_rng = random.Random(config.seed)
        # Slots that later segments leave free for new requests' first generations (AdmissionQueue.take).
        self._reserve = first_audio_reserve(config.max_batch_size)
        self.device_name = "cpu"
        self.vocab_size = 0
        self.max_model_len = config.max_model_len
        self.peak_batch = 0  # most sequences decoded together (tests check that requests are batched)

    # --- event-loop side -------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._active) + self._admitting

    @property
    def num_waiting(self) -> int:
        return len(self._pending)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> MlxSequence:
        """Queue a request for the worker; never blocks and never refuses for load (the queue is unbounded)."""
        seed = request.sampling.seed
        if seed is None:
            seed = self._seed_rng.getrandbits(32)
        sequence = MlxSequence(request, seed & 0xFFFFFFFF, loop, asyncio.Queue())
        with self._cond:
            if self._closing or self._thread is None:
                raise BackendNotReadyError("the mlx-lm backend is shutting down")
            self._pending.append(sequence, request.priority)
            self._cond.notify()
        return sequence

    def abort(self, sequence: MlxSequence) -> None:
        """The consumer went away: a queued sequence is forgotten, a running one is removed by the worker before
        its next step."""
        if sequence.finished:
            return
        sequence.aborted = True
        with self._cond:
            with contextlib.suppress(ValueError):
                self._pending.remove(sequence)
            self._cond.notify()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Start the worker thread, which loads the model, and wait until it is ready. Blocking.

        The model is loaded *in* the worker thread: mlx streams are per thread, and everything that evaluates
        arrays of this model then happens on the one thread that owns them."""
        model_dir = Path(self._config.model_dir)
        if not (model_dir / "config.json").is_file():
            # Checked here because mlx-lm treats a path that does not exist as a Hugging Face repo id and would
            # try to download it; serve time never downloads.
            raise CheckpointError(
                f"{model_dir} is not a Hugging Face model folder (no config.json); point model_dir at the LLM folder"
            )
        thread = threading.Thread(target=self._thread_main, name="flashtts-mlx-worker", daemon=True)
        self._thread = thread
        thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            thread.join()
            self._thread = None
            raise self._load_error

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
        leftovers.extend(self._active.values())
        self._active.clear()
        for sequence in leftovers:
            self._finish(sequence, TokenChunk((), "abort"))
        self._allowed_masks.clear()
        self._generator = self._model = None
        gc.collect()

    # --- worker thread ---------------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._load_in_thread()
        except BaseException as exc:
            self._load_error = exc
            self._loaded.set()
            return
        self._loaded.set()
        try:
            self._run()
        finally:
            generator, self._generator = self._generator, None
            if generator is not None:
                generator.close()

    def _load_in_thread(self) -> None:
        import mlx.core as mx
        from mlx_lm.sample_utils import greedy_sampler
        from mlx_lm.utils import load_model

        self._mx = mx
        device = self._resolve_device(mx)
        model_dir = Path(self._config.model_dir)
        # load_model is what mlx_lm.load() calls for the weights; the tokenizer it would load as well is never used
        # (the backend receives and returns ids), so skip its cost.
        model, model_config = load_model(model_dir, trust_remote_code=self._options.trust_remote_code)
        if self._config.dtype != "auto":
            model.set_dtype(getattr(mx, self._config.dtype))
            mx.eval(model.parameters())
        text_config = model_config.get("text_config", model_config)
        vocab_size = text_config.get("vocab_size")
        if not vocab_size:
            raise CheckpointError(f"{model_dir / 'config.json'} has no vocab_size")
        self.vocab_size = int(vocab_size)
        max_positions = text_config.get("max_position_embeddings")
        limit = self._config.max_model_len
        self.max_model_len = min(limit, int(max_positions)) if max_positions else limit
        self._model = model
        self._greedy = greedy_sampler
        self._stream = mx.new_stream(device)
        self._generator = self._new_generator()
        self.device_name = "gpu" if device == mx.gpu else "cpu"

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        batch = self._config.max_batch_size
        return BatchGenerator(
            self._model,
            max_tokens=self.max_model_len,
            stop_tokens=None,  # only the request's stop ids end it (the contract), not the checkpoint's eos
            completion_batch_size=batch,
            prefill_batch_size=batch,
            prefill_step_size=self._options.prefill_step_size,
            stream=self._stream,
        )

    def _resolve_device(self, mx: Any) -> Any:
        name = self._config.device
        if name == "auto":
            return mx.gpu if mx.is_available(mx.gpu) else mx.cpu
        if name == "cpu":
            return mx.cpu
        if name in _GPU_DEVICE_NAMES or name.startswith("cuda:"):
            if not mx.is_available(mx.gpu):
                where = "Apple silicon (Metal)" if platform.system() == "Darwin" else "an mlx[cuda] install"
                raise PluginError(f"device {name!r} requested but mlx has no GPU here (needs {where}); use cpu")
            return mx.gpu
        raise PluginError(f"invalid device {name!r} for the mlx-lm backend: use auto, cpu or gpu (mps/metal)")

    def _run(self) -> None:
        while True:
            work = self._next_work()
            if work is None:
                return
            admitted, aborted = work
            try:
                if aborted:
                    self._generator.remove([seq.uid for seq in aborted])
                    for sequence in aborted:
                        self._active.pop(sequence.uid, None)  # type: ignore[arg-type]
                        sequence.finished = True
                self._insert([seq for seq in admitted if not seq.aborted])
            except Exception as exc:
                logger.exception("admitting requests failed")
                self._fail_all(exc, admitted)
                continue
            finally:
                self._admitting = 0
            if not self._active:
                continue
            self.peak_batch = max(self.peak_batch, len(self._active))
            try:
                _, responses = self._generator.next()
            except Exception as exc:
                logger.exception("decoding step failed; ending %d requests", len(self._active))
                self._fail_all(exc, [])
                continue
            for response in responses:
                self._deliver(response)

    def _next_work(self) -> tuple[list[MlxSequence], list[MlxSequence]] | None:
        """Block until there is something to do; return (newly admitted, aborted running) or ``None`` to stop."""
        with self._cond:
            while not self._closing and not self._pending and not self._active:
                self._cond.wait()
            if self._closing:
                return None
            free = max(self._config.max_batch_size - len(self._active), 0)
            admitted = self._pending.take(free, self._reserve)
            self._admitting = len(admitted)
            aborted = [seq for seq in self._active.values() if seq.aborted]
            return admitted, aborted

    def _insert(self, sequences: list[MlxSequence]) -> None:
        if not sequences:
            return
        from mlx_lm.generate import StopSequences

        mx = self._mx
        assert self._greedy is not None
        samplers, processors, stops = [], [], []
        for sequence in sequences:
            sampling = sequence.request.sampling
            samplers.append(make_sampler_for(mx, sampling, sequence.seed, self._greedy))
            processors.append(self._processors(sampling))
            stops.append(StopSequences([[token] for token in sampling.stop_token_ids]))
        uids = self._generator.insert(
            [list(seq.request.prompt_token_ids) for seq in sequences],
            max_tokens=[seq.request.sampling.max_tokens for seq in sequences],
            samplers=samplers,
            logits_processors=processors,
            stop_sequences=stops,
        )
        for sequence, uid in zip(sequences, uids, strict=True):
            sequence.uid = uid
            self._active[uid] = sequence

    def _processors(self, sampling: SamplingParams) -> list[Callable[[Any, Any], Any]]:
        """Repetition penalty (over prompt + generated ids, transformers' semantics) then the allowed-id mask: the
        same order as the torch backend, and both before the sampler."""
        processors: list[Callable[[Any, Any], Any]] = []
        if sampling.repetition_penalty != 1.0:
            from mlx_lm.sample_utils import make_repetition_penalty

            context = self._options.repetition_context_size or self.max_model_len
            processors.append(make_repetition_penalty(sampling.repetition_penalty, context))
        if sampling.allowed_token_ids is not None:
            mask = self._allowed_mask(sampling.allowed_token_ids)

            def only_allowed(_tokens: Any, logits: Any) -> Any:
                return logits + mask

            processors.append(only_allowed)
        return processors

    def _allowed_mask(self, allowed: frozenset[int]) -> Any:
        """Additive ``(vocab,)`` mask (0 allowed, -inf elsewhere), cached per set: engines pass the same frozenset
        with every request, so it is built once."""
        mask = self._allowed_masks.get(allowed)
        if mask is None:
            mx = self._mx
            values = [float("-inf")] * self.vocab_size
            for token in allowed:
                values[token] = 0.0
            mask = mx.array(values, dtype=mx.float32)
            self._allowed_masks[allowed] = mask
            if len(self._allowed_masks) > _MAX_CACHED_MASKS:
                self._allowed_masks.popitem(last=False)
        else:
            self._allowed_masks.move_to_end(allowed)
        return mask

    def _deliver(self, response: Any) -> None:
        sequence = self._active.get(response.uid)
        if sequence is None:
            return
        reason = response.finish_reason
        if reason is None:
            if not sequence.aborted:
                self._emit(sequence, TokenChunk((int(response.token),)))
            return
        # The generator has already dropped a finished sequence from its batch.
        del self._active[response.uid]
        if reason == "stop":  # the id is one of the request's stop ids: never part of the output
            self._finish(sequence, TokenChunk((), "stop"))
        else:
            self._finish(sequence, TokenChunk((int(response.token),), "length"))

    def _fail_all(self, exc: Exception, admitted: list[MlxSequence]) -> None:
        """A failed step leaves the generator's batch state unknown: end every request and start a fresh one."""
        error = GenerationError(f"the mlx-lm backend failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        for sequence in [*self._active.values(), *admitted]:
            self._finish(sequence, error)
        self._active.clear()
        old, self._generator = self._generator, None
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        self._generator = self._new_generator()

    # --- hand-off to the event loop --------------------------------------------------------------------------

    def _emit(self, sequence: MlxSequence, item: QueueItem) -> None:
        try:
            sequence.loop.call_soon_threadsafe(sequence.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will read this sequence again
            sequence.aborted = True

    def _finish(self, sequence: MlxSequence, item: QueueItem) -> None:
        if sequence.finished:
            return
        sequence.finished = True
        self._emit(sequence, item)
