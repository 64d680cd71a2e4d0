"""The torch backend's worker process: ``python -m flashtts_torch._worker FD``.

Runs a :class:`~flashtts_torch._runtime.TorchRuntime` (model + scheduler thread) in a process of its own, so that the
decoding loop does not share an interpreter lock with the server. Its Python (a tiny model's step is ~100 small
torch calls, each of which releases and re-takes the GIL) otherwise waits behind the event loop and the codec
threads: on two cores, a busy neighbour thread costs the scheduler a third of its speed, a neighbour process nothing.

``FD`` is this end of a socket pair (see :mod:`flashtts_torch._protocol` for the messages). The main thread reads
the parent's messages and feeds the runtime; the scheduler thread sends each iteration's items back
(:meth:`Reporter.step`). End of file on the socket (the parent exited, even by SIGKILL) closes the runtime and ends
the process; SIGINT is ignored (a Ctrl-C reaches the whole process group; the parent decides when this one stops).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import msgspec

from flashtts_core.errors import FlashTTSError
from flashtts_core.plugins import QueueItem
from flashtts_torch._protocol import (
    Abort,
    Close,
    Closed,
    Failed,
    Ready,
    Setup,
    Started,
    Step,
    StepItem,
    Submit,
    ToWorker,
)

if TYPE_CHECKING:  # torch is imported only once Started is sent (see serve)
    from flashtts_torch._runtime import SequenceState, TorchRuntime

__all__ = ("Reporter", "main")

logger = logging.getLogger("flashtts_torch.worker")


class Reporter:
    """Encodes the scheduler's items for the parent; one frame per iteration, none when nothing changed."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # one frame at a time on the connection
        # Counters are read and sent under this lock, by the scheduler thread (each iteration) and by the main thread
        # (after an Abort): frames leave in the order their counters were read, so the last one is current.
        self._counters_lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._counters: tuple[int, int, int, int] | None = None
        self.runtime: TorchRuntime | None = None  # whose counters go with each step (set once it exists)
        self.sequences: dict[int, SequenceState] = {}  # key → sequence, for Abort; finished ones are removed here

    def send(self, message: msgspec.Struct) -> None:
        data = self._encoder.encode(message)
        with self._lock:
            self._conn.send_bytes(data)

    def step(self, outbox: list[tuple[SequenceState, QueueItem]]) -> None:
        """The runtime's step listener (scheduler thread): this iteration's items, and the counters if changed."""
        runtime = self.runtime
        assert runtime is not None
        items: list[StepItem] = []
        for sequence, item in outbox:
            if isinstance(item, BaseException):
                items.append(StepItem(sequence.key, [], None, str(item)))
                self.sequences.pop(sequence.key, None)
                continue
            items.append(StepItem(sequence.key, list(item.token_ids), item.finish_reason))
            if item.finish_reason is not None:
                self.sequences.pop(sequence.key, None)
        self._report(items)

    def counters(self) -> None:
        """Send the counters if they changed outside a scheduler iteration: an Abort that takes queued work out of
        the queue changes ``waiting`` while the scheduler may have nothing left to iterate on, and the parent's
        health would otherwise keep the old count."""
        self._report([])

    def fail(self, key: int, message: str) -> None:
        """End request ``key`` with an error, from the main thread (a Submit refused while shutting down)."""
        self._report([StepItem(key, [], None, message)])

    def _report(self, items: list[StepItem]) -> None:
        runtime = self.runtime
        assert runtime is not None
        with self._counters_lock:
            counters = (runtime.num_running, runtime.num_waiting, runtime.peak_batch, runtime.graphs_captured)
            if not items and counters == self._counters:
                return
            self._counters = counters
            try:
                self.send(Step(items, *counters))
            except OSError:  # the parent is gone; the main thread sees end of file and closes the runtime
                pass


def serve(conn: Connection) -> int:
    """Load, report, then relay messages until Close or end of file. Returns the exit status."""
    decoder = msgspec.msgpack.Decoder(ToWorker)
    reporter = Reporter(conn)
    reporter.send(Started())
    setup = decoder.decode(conn.recv_bytes())
    if not isinstance(setup, Setup):
        raise RuntimeError(f"expected Setup first, got {type(setup).__name__}")
    logging.basicConfig(  # the server's format (flashtts_core.cli.options), marked as this process's
        level=setup.log_level,
        format="[FlashTTS] %(asctime)s [%(levelname)s] [%(name)s] (torch worker) %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    from flashtts_torch._runtime import TorchRuntime

    runtime = TorchRuntime(setup.config, setup.options)
    reporter.runtime = runtime
    runtime.step_listener = reporter.step
    try:
        runtime.load()
    except Exception as exc:
        if not isinstance(exc, FlashTTSError):
            logger.exception("loading the model failed")
        reporter.send(Failed(type(exc).__name__, str(exc)))
        runtime.close()
        return 1
    reporter.send(
        Ready(
            device=str(runtime.device),
            dtype=str(runtime.dtype).removeprefix("torch."),
            vocab_size=runtime.vocab_size,
            max_model_len=runtime.max_model_len,
            cache_implementation=runtime.cache_implementation,
            cuda_graphs=runtime.cuda_graphs,
            path_description=runtime.path_description,
        )
    )
    sequences = reporter.sequences
    try:
        while True:
            try:
                message = decoder.decode(conn.recv_bytes())
            except (EOFError, OSError):
                logger.warning("the server process went away; stopping")
                break
            if isinstance(message, Submit):
                try:
                    sequences[message.key] = runtime.submit_detached(message.request, message.key)
                except FlashTTSError as exc:  # shutting down: end the request here
                    reporter.fail(message.key, exc.message)
            elif isinstance(message, Abort):
                sequence = sequences.pop(message.key, None)
                if sequence is not None:
                    runtime.abort(sequence)
                    reporter.counters()
            elif isinstance(message, Close):
                break
    finally:
        runtime.close()  # ends every open request with an abort chunk (through Reporter.step)
    try:
        reporter.send(Closed())
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m flashtts_torch._worker FD (started by the torch backend)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(args[0]))
    try:
        return serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    status = main()
    # The model is freed and the server told; skip the interpreter's teardown (seconds with torch loaded), which
    # the server would otherwise wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
