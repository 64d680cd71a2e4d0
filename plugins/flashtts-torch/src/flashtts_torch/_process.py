"""The server side of the torch backend's worker process (``worker=process``).

:class:`ProcessRuntime` offers what :class:`~flashtts_torch.backend.TorchBackend` uses of a
:class:`~flashtts_torch._runtime.TorchRuntime` (``load``/``submit``/``abort``/``close`` and the counters), but the
model and its scheduler live in ``python -m flashtts_torch._worker``. A reader thread here turns the worker's
:class:`~flashtts_torch._protocol.Step` frames into the same per-request asyncio queues the in-process runtime fills
(one ``call_soon_threadsafe`` per event loop per step), so the backend's streaming code is the same for both.

Failure handling: a load error in the worker comes back as the same :mod:`flashtts_core.errors` class with its
message; a worker that dies later ends every open request with a :class:`GenerationError` naming its exit status,
and :attr:`ProcessRuntime.failure` says so to the health check. Closing sends ``Close`` (the worker aborts what is
open, frees the model, exits) and kills the process if it has not gone within a bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgspec

from flashtts_core import errors
from flashtts_core.errors import BackendNotReadyError, FlashTTSError, GenerationError, PluginError
from flashtts_core.plugins import BackendConfig, GenerationRequest, QueueItem, TokenChunk
from flashtts_torch._protocol import (
    Abort,
    Close,
    Closed,
    Failed,
    Ready,
    Setup,
    Started,
    Step,
    Submit,
    ToParent,
)
from flashtts_torch.options import TorchOptions

__all__ = ("ProcessRuntime", "RemoteSequence", "WorkerStartError")

logger = logging.getLogger(__name__)

#: Seconds the worker may take to report that it runs (before it imports torch or loads anything).
_START_TIMEOUT_S = 60.0
#: Seconds close() waits for the worker to abort its requests and exit before killing it.
_CLOSE_TIMEOUT_S = 30.0


class WorkerStartError(PluginError):
    """The worker process could not be started or exited before it said it runs (an environment that cannot start
    ``python -m flashtts_torch._worker``), as opposed to a worker that failed while loading the model."""


class RemoteSequence:
    """The parent's handle on one request: where its items go, and whether its last one arrived."""

    __slots__ = ("finished", "key", "loop", "queue")

    def __init__(self, key: int, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()
        self.finished = False


def _deliver(items: list[tuple[RemoteSequence, QueueItem]]) -> None:
    """Runs on the consumer's event loop: one step's items into their queues, in order."""
    for sequence, item in items:
        sequence.queue.put_nowait(item)


def _rebuild_error(error_type: str, message: str) -> FlashTTSError:
    """The worker's load error as the same FlashTTS class (anything else: a PluginError with the class name)."""
    cls = getattr(errors, error_type, None)
    if isinstance(cls, type) and issubclass(cls, FlashTTSError):
        return cls(message)
    return PluginError(f"the torch worker process failed to load the model: {error_type}: {message}")


class ProcessRuntime:
    """Starts, feeds and stops the worker process. ``load``/``close`` block (run them off the event loop);
    ``submit``/``abort`` and the counters are for the event loop."""

    def __init__(self, config: BackendConfig, options: TorchOptions) -> None:
        self._config = config
        self._options = options
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ToParent)
        self._reader: threading.Thread | None = None
        self._keys = itertools.count()
        self._live: dict[int, RemoteSequence] = {}  # requests whose last item has not been delivered
        self._closing = False
        self.failure: str | None = None  # set when the worker died: why (for health and new requests)
        # Reported by the worker (Ready at load, then every Step).
        self.device = "cpu"
        self.dtype = "float32"
        self.vocab_size = 0
        self.max_model_len = config.max_model_len
        self.cache_implementation = "dynamic"
        self.cuda_graphs = False
        self.path_description = ""
        self.num_running = 0
        self.num_waiting = 0
        self.peak_batch = 0
        self.graphs_captured = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- lifecycle -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Start the worker, hand it the settings and wait until its model is loaded (or its error)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The worker must import what this process imports (a source checkout on sys.path, as spawn would pass).
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "flashtts_torch._worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise WorkerStartError(f"cannot start the torch worker process: {exc}") from exc
        finally:
            theirs.close()
        self._conn = conn = Connection(ours.detach())
        if not conn.poll(_START_TIMEOUT_S):
            self._proc.kill()
            self._proc.wait()
            raise WorkerStartError(f"the torch worker process did not start within {_START_TIMEOUT_S:.0f} s")
        hello = self._expect("before it started", WorkerStartError)
        if not isinstance(hello, Started):
            raise WorkerStartError(f"the torch worker process answered {type(hello).__name__} instead of Started")
        level = logging.getLogger("flashtts_torch").getEffectiveLevel()  # what the server shows of this package
        self._send(Setup(self._config, self._options, level))
        reply = self._expect("while loading the model", PluginError)
        if isinstance(reply, Failed):
            self._proc.wait()
            raise _rebuild_error(reply.error_type, reply.message)
        if not isinstance(reply, Ready):
            raise PluginError(f"the torch worker process answered {type(reply).__name__} instead of Ready")
        self.device = reply.device
        self.dtype = reply.dtype
        self.vocab_size = reply.vocab_size
        self.max_model_len = reply.max_model_len
        self.cache_implementation = reply.cache_implementation
        self.cuda_graphs = reply.cuda_graphs
        self.path_description = f"{reply.path_description}; worker process (pid {self._proc.pid})"
        self._reader = threading.Thread(target=self._read, name="flashtts-torch-reader", daemon=True)
        self._reader.start()

    def _expect(self, when: str, error: type[PluginError]) -> ToParent:
        """The worker's next message during startup; ``error`` with its exit status if it exits first."""
        assert self._conn is not None and self._proc is not None
        try:
            return self._decoder.decode(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            status = self._proc.wait()
            raise error(f"the torch worker process exited with status {status} {when} (its log is above)") from exc

    def close(self) -> None:
        """Ask the worker to abort what is open and exit; kill it if it does not within a bound."""
        self._closing = True
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        try:
            self._send(Close())
        except OSError:
            pass
        reader = self._reader
        if reader is not None:
            reader.join(_CLOSE_TIMEOUT_S)
        try:
            proc.wait(timeout=_CLOSE_TIMEOUT_S if reader is None else 5.0)
        except subprocess.TimeoutExpired:
            logger.warning("the torch worker process (pid %d) did not exit; killing it", proc.pid)
            proc.kill()
            proc.wait()
        conn.close()
        self._fail_open(lambda: TokenChunk((), "abort"))

    # --- event-loop side -------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RemoteSequence:
        """Send a request to the worker; its items arrive on the returned handle's queue."""
        if self.failure is not None:
            raise BackendNotReadyError(f"the torch backend is not available: {self.failure}")
        if self._closing or self._reader is None:
            raise BackendNotReadyError("the torch backend is shutting down")
        sequence = RemoteSequence(next(self._keys), loop)
        self._live[sequence.key] = sequence
        try:
            self._send(Submit(sequence.key, request))
        except OSError as exc:
            self._live.pop(sequence.key, None)
            raise BackendNotReadyError("the torch backend's worker process is gone") from exc
        return sequence

    def abort(self, sequence: RemoteSequence) -> None:
        """The consumer went away: tell the worker to drop the request (before its next step)."""
        if sequence.finished:
            return
        sequence.finished = True
        if self._live.pop(sequence.key, None) is None:
            return
        try:
            self._send(Abort(sequence.key))
        except OSError:
            pass

    # --- reader thread ---------------------------------------------------------------------------------------

    def _send(self, message: msgspec.Struct) -> None:
        conn = self._conn
        if conn is None:
            raise OSError("not connected")
        data = self._encoder.encode(message)
        with self._send_lock:
            conn.send_bytes(data)

    def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                message = self._decoder.decode(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if isinstance(message, Step):
                self._on_step(message)
            elif isinstance(message, Closed):
                return
        if self._closing:
            return
        status = self._proc.wait() if self._proc is not None else None
        self.failure = f"its worker process exited unexpectedly (status {status}); restart the server"
        logger.error("the torch backend's worker process exited unexpectedly (status %s)", status)
        self.num_running = self.num_waiting = 0
        failure = self.failure
        self._fail_open(lambda: GenerationError(f"the torch backend failed: {failure}"))

    def _on_step(self, step: Step) -> None:
        self.num_running, self.num_waiting = step.running, step.waiting
        self.peak_batch, self.graphs_captured = step.peak_batch, step.graphs_captured
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RemoteSequence, QueueItem]]] = {}
        for entry in step.items:
            sequence = self._live.get(entry.key)
            if sequence is None:  # aborted here already
                continue
            item: QueueItem
            if entry.error is not None:
                item = GenerationError(entry.error)
            else:
                item = TokenChunk(tuple(entry.token_ids), entry.finish_reason)  # type: ignore[arg-type]
            if entry.error is not None or entry.finish_reason is not None:
                self._live.pop(entry.key, None)
                sequence.finished = True
            by_loop.setdefault(sequence.loop, []).append((sequence, item))
        self._hand_over(by_loop)

    def _fail_open(self, make_item: Callable[[], QueueItem]) -> None:
        """End every request still open with an item of ``make_item`` (the worker is gone)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RemoteSequence, QueueItem]]] = {}
        for key in list(self._live):
            sequence = self._live.pop(key, None)
            if sequence is None:
                continue
            sequence.finished = True
            by_loop.setdefault(sequence.loop, []).append((sequence, make_item()))
        self._hand_over(by_loop)

    def _hand_over(self, by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RemoteSequence, QueueItem]]]) -> None:
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed: nobody reads these requests any more
                for sequence, _ in items:
                    self.abort(sequence)
