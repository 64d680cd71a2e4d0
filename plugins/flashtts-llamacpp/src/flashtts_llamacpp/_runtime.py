"""llama.cpp contexts, the worker threads that drive them, and the sampler.

Imported by :meth:`LlamaCppBackend.startup` only: it imports ``llama_cpp`` and numpy at module level.

Why a hand-written decoding loop instead of ``Llama.generate`` / ``create_completion``: llama.cpp's sampler chain
applies top-p before the temperature and the repetition penalty over a 64-token window, which differs from the
Hugging Face semantics the other backends (and the engines' defaults) use; its allowed-token mask would be a
Python logits processor over the whole vocabulary anyway; and a per-request seed would depend on a shared sampler.
So the loop is: ``Llama.eval`` the prompt (in ``n_batch`` slices, checking for cancellation in between), then per
step read the last position's logits with ``llama_get_logits_ith(ctx, -1)``, pick the id with the numpy sampler below
(each request owns its ``numpy.random.Generator``), hand it to the event loop and ``eval`` it.

Concurrency: llama-cpp-python's ``Llama`` holds one sequence per context and cannot share weights between
contexts, so the runtime keeps ``contexts`` independent ``Llama`` instances (default 1), each owned by one worker
thread. Requests wait in one queue, by ``GenerationRequest.priority`` and then arrival; a free worker takes the first.
Nothing is ever refused for being busy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import queue
import random
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from flashtts_core.errors import (
    BackendNotReadyError,
    CheckpointError,
    GenerationError,
    PluginError,
)
from flashtts_core.plugins import BackendConfig, GenerationRequest, SamplingParams, TokenChunk
from flashtts_llamacpp.options import LlamaCppOptions

__all__ = (
    "Job",
    "LlamaCppRuntime",
    "find_gguf",
    "physical_cores",
    "process_logits",
    "sample_token",
)

logger = logging.getLogger(__name__)

QueueItem = TokenChunk | BaseException

_GPU_DEVICE_PREFIXES = ("cuda", "rocm", "mps", "metal", "vulkan", "gpu")
_ALLOWED_CACHE_SIZE = 32  # distinct allowed-id sets kept as index arrays (engines use one or two)


# ------------------------------------------------------------------------------------------------------- sampling


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores.astype(np.float64) - scores.max())
    return shifted / shifted.sum()


def process_logits(
    logits: np.ndarray,
    sampling: SamplingParams,
    presence: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Turn one row of logits ``(vocab,)`` into ``(ids, scores)``: the candidates left and their float32 scores.

    ``ids is None`` means the scores cover the whole vocabulary (index = id). Order and semantics follow
    transformers' processors, like the torch backend: repetition penalty over the ids in ``presence`` (prompt +
    generated; positive logits divided, negative multiplied), the ``allowed`` ids, then, unless greedy
    (temperature 0): temperature → top-k (ties with the k-th kept) → top-p (the smallest set reaching ``top_p``,
    always the best id) → min-p. Candidates are *removed* rather than set to -inf, so every later step (and the
    final draw) works on fewer values: with Spark's top_k=50 the top-p sort is over 50 scores, not 166k.
    ``logits`` is never modified (it may be llama.cpp's own buffer).
    """
    if allowed is not None:
        ids: np.ndarray | None = allowed
        scores = logits[allowed].astype(np.float32)
        seen = presence[allowed] if presence is not None else None
    else:
        ids = None
        scores = np.array(logits, dtype=np.float32)
        seen = presence
    penalty = sampling.repetition_penalty
    if penalty != 1.0 and seen is not None:
        scores = np.where(seen, np.where(scores < 0, scores * penalty, scores / penalty), scores).astype(np.float32)
    if sampling.temperature == 0.0:
        return ids, scores
    scores = scores / np.float32(sampling.temperature)

    def keep(index: np.ndarray) -> None:
        nonlocal ids, scores
        scores = scores[index]
        ids = index if ids is None else ids[index]

    size = scores.size
    if 0 < sampling.top_k < size:
        kth_best = np.partition(scores, size - sampling.top_k)[size - sampling.top_k]
        keep(np.flatnonzero(scores >= kth_best))
    if sampling.top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending
        cumulative = np.cumsum(_softmax(scores[order]))
        drop = cumulative <= 1.0 - sampling.top_p
        drop[-1] = False  # always keep the best id
        keep(np.sort(order[~drop]))
    if sampling.min_p > 0.0:
        probs = _softmax(scores)
        keep(np.flatnonzero(probs >= sampling.min_p * probs.max()))
    return ids, scores


def sample_token(
    logits: np.ndarray,
    sampling: SamplingParams,
    rng: np.random.Generator,
    presence: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> int:
    """Pick the next id: argmax when greedy, else one draw from ``rng`` over the processed distribution."""
    if sampling.temperature == 0.0 and allowed is None and (presence is None or sampling.repetition_penalty == 1.0):
        return int(np.argmax(logits))  # the common greedy case needs no copy of the vocabulary
    ids, scores = process_logits(logits, sampling, presence, allowed)
    if sampling.temperature == 0.0:
        index = int(np.argmax(scores))
    else:
        cdf = np.cumsum(_softmax(scores))
        index = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), scores.size - 1)
    return int(ids[index]) if ids is not None else index


# ------------------------------------------------------------------------------------------------- configuration


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (Linux sysfs topology), else the CPU count."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
            )
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def find_gguf(model_dir: Path, explicit: str | None) -> Path:
    """The GGUF to load: the ``gguf`` option, else ``model.gguf`` or the only ``*.gguf`` in the LLM folder (or its
    ``LLM/`` sub-folder, for a model root)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointError(f"the GGUF file {path} (--llm_gguf / --backend_option gguf=) does not exist")
        return path
    if not model_dir.is_dir():
        raise CheckpointError(f"the LLM folder {model_dir} does not exist")
    for folder in (model_dir, model_dir / "LLM"):
        if (folder / "model.gguf").is_file():
            return folder / "model.gguf"
        found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"{folder} holds several GGUF files ({names}); choose one with --llm_gguf PATH "
                "(or --backend_option gguf=PATH)"
            )
    raise CheckpointError(
        f"no GGUF file in {model_dir}: the llama-cpp backend loads the LLM as GGUF. Convert it with "
        f"`flashtts convert-gguf {model_dir}` (needs pip install 'flashtts-core[gguf]'), or pass --llm_gguf PATH"
    )


# GGUF metadata value types (gguf spec): fixed-size scalars by struct format; 8 = string, 9 = array.
_GGUF_SCALARS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _context_length(path: Path) -> int:
    """The model's training context (``<arch>.context_length``) from the GGUF header, or 0 when it has none.

    Read directly (a few header fields; arrays such as the token list are skipped by size) so the contexts can be sized
    before llama.cpp allocates any KV cache, without a second native model load that would also print llama.cpp's
    loader warnings to stderr."""
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise CheckpointError(f"{path} is not a GGUF file")
            (version,) = struct.unpack_from("<I", data, 4)
            if version < 2:
                raise CheckpointError(f"{path} is GGUF version {version}; reconvert it (flashtts convert-gguf)")
            (n_kv,) = struct.unpack_from("<Q", data, 16)
            offset = 24
            values: dict[str, object] = {}

            def read_string(at: int) -> tuple[str, int]:
                (length,) = struct.unpack_from("<Q", data, at)
                return data[at + 8 : at + 8 + length].decode("utf-8", errors="replace"), at + 8 + length

            def skip_or_read(kind: int, at: int) -> tuple[object, int]:
                if kind in _GGUF_SCALARS:
                    fmt = "<" + _GGUF_SCALARS[kind]
                    return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)
                if kind == _GGUF_STRING:
                    return read_string(at)
                if kind == _GGUF_ARRAY:
                    item_kind, count = struct.unpack_from("<IQ", data, at)
                    at += 12
                    if item_kind in _GGUF_SCALARS:
                        return None, at + count * struct.calcsize("<" + _GGUF_SCALARS[item_kind])
                    for _ in range(count):
                        _, at = skip_or_read(item_kind, at)
                    return None, at
                raise CheckpointError(f"{path}: unknown GGUF metadata type {kind}")

            for _ in range(n_kv):
                key, offset = read_string(offset)
                (kind,) = struct.unpack_from("<I", data, offset)
                value, offset = skip_or_read(kind, offset + 4)
                values[key] = value
                arch = values.get("general.architecture")
                if arch is not None and f"{arch}.context_length" in values:
                    return int(values[f"{arch}.context_length"])  # type: ignore[call-overload]
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"cannot read the GGUF header of {path}: {exc}") from exc
    return 0


def _devices() -> frozenset[str]:
    """Device kinds this llama.cpp build can run on, from the backends it reports (e.g. "CUDA : ARCHS = ...")."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").upper()
    found = {"cpu"}
    for marker, kind in (("CUDA", "cuda"), ("METAL", "metal"), ("HIP", "rocm"), ("ROCM", "rocm")):
        if marker in info:
            found.add(kind)
    return frozenset(found)


def _gpu_layers(config: BackendConfig, options: LlamaCppOptions) -> tuple[int, int | None]:
    """(n_gpu_layers, main GPU index or None) for the configured device."""
    device = config.device.lower()
    gpu_build = bool(llama_cpp.llama_supports_gpu_offload())
    wants_gpu = device.startswith(_GPU_DEVICE_PREFIXES)
    if device != "cpu" and device != "auto" and not wants_gpu:
        raise PluginError(f"invalid device {config.device!r} for the llama-cpp backend: use auto, cpu, cuda, cuda:N")
    if wants_gpu and not gpu_build:
        raise PluginError(
            f"device {config.device!r} requested but this llama-cpp-python was built without GPU support; rebuild it "
            'with e.g. CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python, '
            "or use --llm_device cpu"
        )
    main_gpu = None
    if ":" in device:
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise PluginError(f"invalid device {config.device!r}: expected cuda:N")
        main_gpu = int(index)
    if options.n_gpu_layers is not None:
        return options.n_gpu_layers, main_gpu
    return (-1 if gpu_build and device != "cpu" else 0), main_gpu


# ----------------------------------------------------------------------------------------------------- requests


class Job:
    """One request between the event loop and a worker thread."""

    __slots__ = ("aborted", "loop", "queue", "request", "seed", "shutdown")

    def __init__(
        self, request: GenerationRequest, seed: int, loop: asyncio.AbstractEventLoop, items: asyncio.Queue[QueueItem]
    ) -> None:
        self.request = request
        self.seed = seed
        self.loop = loop
        self.queue = items
        self.aborted = False  # the consumer went away: stop silently
        self.shutdown = False  # the backend is shutting down: stop with a final "abort" chunk

    def deliver(self, item: QueueItem) -> None:
        """Hand an item to the consumer's event loop (thread-safe; a closed loop means the consumer is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.aborted = True


class LlamaCppRuntime:
    """``contexts`` llama.cpp contexts, one worker thread each, fed from one queue (by priority, then FIFO)."""

    def __init__(self, config: BackendConfig, options: LlamaCppOptions) -> None:
        self.config = config
        self.options = options
        self.gguf_path: Path | None = None
        self.max_model_len = config.max_model_len
        self.n_vocab = 0
        self.n_threads = 0
        self.n_gpu_layers = 0
        self.devices: frozenset[str] = frozenset({"cpu"})
        self.prefix_cache = options.prefix_cache
        self._llms: list[Any] = []
        self._threads: list[threading.Thread] = []
        # (priority, arrival, job): GenerationRequest.priority first, then FIFO; a None job stops a worker.
        self._queue: queue.PriorityQueue[tuple[int, int, Job | None]] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._lock = threading.Lock()
        self._waiting: set[Job] = set()
        self._running: set[Job] = set()
        self._closing = False
        self._allowed: OrderedDict[frozenset[int], np.ndarray] = OrderedDict()
        # Seeds for requests without one: reproducible per server run when config.seed is set.
        self._seed_rng = random.Random(config.seed)

    # --- lifecycle (blocking; called through anyio.to_thread) ------------------------------------------------

    def load(self) -> None:
        path = find_gguf(Path(self.config.model_dir).expanduser(), self.options.gguf)
        self.gguf_path = path
        n_ctx_train = _context_length(path)
        self.max_model_len = min(self.config.max_model_len, n_ctx_train) if n_ctx_train > 0 else self.max_model_len
        self.n_gpu_layers, main_gpu = _gpu_layers(self.config, self.options)
        self.devices = _devices()
        contexts = min(self.options.contexts, self.config.max_batch_size)
        # The option, else the server's CPU share (BackendConfig.cpu_threads), else the physical cores; per context.
        budget = min(self.config.cpu_threads, physical_cores()) if self.config.cpu_threads else physical_cores()
        self.n_threads = self.options.n_threads or max(1, budget // contexts)
        n_batch = min(self.options.n_batch, self.max_model_len)
        kwargs: dict[str, Any] = {
            "model_path": str(path),
            "n_ctx": self.max_model_len,
            "n_batch": n_batch,
            "n_ubatch": n_batch,
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads,
            "n_gpu_layers": self.n_gpu_layers,
            "logits_all": False,
            "verbose": False,
        }
        if self.config.seed is not None:
            kwargs["seed"] = self.config.seed & 0xFFFFFFFF
        if main_gpu is not None:
            kwargs.update(main_gpu=main_gpu, split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE)
        for _ in range(contexts):
            try:
                llm = llama_cpp.Llama(**kwargs)
            except (ValueError, RuntimeError) as exc:
                raise CheckpointError(f"llama.cpp failed to load {path}: {exc}") from exc
            self._llms.append(llm)
        first = self._llms[0]
        self.n_vocab = int(first.n_vocab())
        if llama_cpp.llama_model_is_recurrent(first.model) or llama_cpp.llama_model_is_hybrid(first.model):
            self.prefix_cache = False  # their state cannot be truncated to a prefix
        for index, llm in enumerate(self._llms):
            thread = threading.Thread(target=self._worker, args=(llm,), name=f"flashtts-llamacpp-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the workers (open streams end with ``abort``) and free the contexts. Idempotent."""
        with self._lock:
            self._closing = True
            waiting, self._waiting = list(self._waiting), set()
            for job in self._running:
                job.shutdown = True
        for job in waiting:
            job.aborted = True
            job.deliver(TokenChunk((), "abort"))
        for _ in self._threads:
            self._queue.put((-1, next(self._arrivals), None))
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        for llm in self._llms:
            llm.close()
        self._llms.clear()

    # --- requests (event loop side) --------------------------------------------------------------------------

    @property
    def num_contexts(self) -> int:
        return len(self._llms)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Job:
        seed = request.sampling.seed
        if seed is None:
            seed = self._seed_rng.getrandbits(63)
        job = Job(request, seed, loop, asyncio.Queue())
        with self._lock:
            if self._closing:
                raise BackendNotReadyError("the llama-cpp backend is shutting down")
            self._waiting.add(job)
        self._queue.put((request.priority, next(self._arrivals), job))
        return job

    def abort(self, job: Job) -> None:
        """The consumer is gone: drop the job if it still waits, else make its worker stop at the next step."""
        job.aborted = True
        with self._lock:
            self._waiting.discard(job)

    # --- worker threads --------------------------------------------------------------------------------------

    def _allowed_ids(self, allowed: frozenset[int] | None) -> np.ndarray | None:
        """Sorted id array of an allowed set, computed once per distinct set (an LRU of a few sets)."""
        if allowed is None:
            return None
        with self._lock:
            ids = self._allowed.get(allowed)
            if ids is not None:
                self._allowed.move_to_end(allowed)
                return ids
        ids = np.fromiter(sorted(allowed), dtype=np.int64, count=len(allowed))
        with self._lock:
            self._allowed[allowed] = ids
            while len(self._allowed) > _ALLOWED_CACHE_SIZE:
                self._allowed.popitem(last=False)
        return ids

    def _worker(self, llm: Any) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.discard(job)
                if job.aborted or self._closing:
                    continue
                self._running.add(job)
            try:
                self._run(llm, job)
            except Exception as exc:
                logger.exception("llama.cpp generation failed for request %s", job.request.request_id)
                llm.reset()  # the KV cache may be half-written: never reuse it as a prefix
                error = GenerationError(f"llama.cpp generation failed: {exc}")
                error.__cause__ = exc
                job.deliver(error)
            finally:
                with self._lock:
                    self._running.discard(job)

    def _reusable_prefix(self, llm: Any, prompt: list[int]) -> int:
        """Length of the prompt prefix already in the context's KV cache (always leaving one token to evaluate,
        whose logits start the generation)."""
        if not self.prefix_cache or llm.n_tokens == 0:
            return 0
        cached = llm.input_ids[: min(llm.n_tokens, len(prompt) - 1)]
        if cached.size == 0:
            return 0
        differs = np.flatnonzero(cached != np.asarray(prompt[: cached.size], dtype=cached.dtype))
        return int(differs[0]) if differs.size else int(cached.size)

    def _run(self, llm: Any, job: Job) -> None:
        request = job.request
        sampling = request.sampling
        prompt = list(request.prompt_token_ids)
        reused = self._reusable_prefix(llm, prompt)
        llm.n_tokens = reused  # eval() drops the KV cells from here on
        step = llm.n_batch
        for start in range(reused, len(prompt), step):
            if job.aborted or job.shutdown:
                break
            llm.eval(prompt[start : start + step])
        stops = frozenset(sampling.stop_token_ids)
        allowed = self._allowed_ids(sampling.allowed_token_ids)
        presence = None
        if sampling.repetition_penalty != 1.0:
            presence = np.zeros(self.n_vocab, dtype=bool)
            presence[prompt] = True
        rng = np.random.default_rng(job.seed & 0xFFFFFFFFFFFFFFFF)
        n_vocab = self.n_vocab
        for produced in range(sampling.max_tokens):
            if job.shutdown:
                job.deliver(TokenChunk((), "abort"))
                return
            if job.aborted:
                return
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            token = sample_token(logits, sampling, rng, presence, allowed)
            if token in stops:
                job.deliver(TokenChunk((), "stop"))
                return
            if produced + 1 == sampling.max_tokens:
                job.deliver(TokenChunk((token,), "length"))
                return
            job.deliver(TokenChunk((token,)))
            if presence is not None:
                presence[token] = True
            llm.eval([token])
