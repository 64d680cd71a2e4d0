"""A small dynamic batcher: gathers requests that arrive close together and runs them as one batch.

Why: codec work (BiCodec tokenize/detokenize, SNAC decode) is far cheaper per item when several concurrent requests
share one forward pass. The original server's batcher (reference-behaviour §5) had three defects this one avoids:

* it ran the synchronous GPU work *on* the event loop — here ``fn`` always runs in a worker thread;
* a submitter that was cancelled (client disconnect) made ``set_result`` raise inside the worker, killing it and
  hanging every later request — here done futures are skipped and the worker is supervised (restarted on demand);
* it captured the event loop at first use, so one engine object could not be used from a second ``asyncio.run()`` —
  here the queue and worker are (re)created per running loop.

Scheduling: a batch starts when ``max_batch_size`` live requests are waiting or ``wait_timeout`` seconds after the
first of them arrived (the window is *not* restarted by later arrivals, so a steady trickle cannot delay a request
indefinitely). Requests are taken by ascending ``priority`` and then arrival order, so an engine can put the first
audio chunk of a new request ahead of later chunks of running ones. With ``overtake`` (for a thread-safe ``fn``),
priority-0 requests do not even wait for a running batch of later ones: they start a batch of their own beside it
(at most one such batch at a time). An exception from ``fn`` fails only the batch
it was raised for; with ``retry_individually`` each item of a failed multi-item batch is re-run alone, so one bad
input cannot fail the requests that merely shared its batch.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio.to_thread

from flashtts_core.errors import BackendNotReadyError

__all__ = ("DynamicBatcher",)

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(order=True)
class _Pending(Generic[In, Out]):
    priority: int
    seq: int
    item: Any = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    arrived: float = field(compare=False, default=0.0)  # loop time of submit


class _LoopState:
    """Everything bound to one event loop: the heap of waiting requests, the wake-up event and the worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[_Pending[Any, Any]] = []
        self.wakeup = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None
        self.running: int | None = None  # the best (lowest) priority in the worker's running batch
        self.overtaking: asyncio.Task[None] | None = None  # a priority-0 batch running beside the worker's


class DynamicBatcher(Generic[In, Out]):
    """Run ``fn(items) -> results`` (synchronous, called in a worker thread) on batches of submitted items.

    ``fn`` must return exactly one result per item, in order. ``submit`` is safe to call from many tasks at once;
    cancelling a ``submit`` call only drops that item (if it has not started running yet).
    """

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int = 8,
        wait_timeout: float = 0.01,
        name: str = "batcher",
        retry_individually: bool = True,
        overtake: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if wait_timeout < 0:
            raise ValueError(f"wait_timeout must not be negative, got {wait_timeout}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.wait_timeout = wait_timeout
        self.name = name
        self.retry_individually = retry_individually
        # Priority-0 items may run beside a running batch of later items: fn must be safe to call from two threads.
        self.overtake = overtake
        self._seq = itertools.count()
        self._state: _LoopState | None = None
        self._closed = False
        #: Number of batches run and items processed (observability and tests).
        self.batches_run = 0
        self.items_run = 0

    # --- public API -----------------------------------------------------------------------------------------------

    async def submit(self, item: In, *, priority: int = 0) -> Out:
        """Queue ``item`` and wait for its result. Lower ``priority`` values run first."""
        if self._closed:
            raise BackendNotReadyError(f"the {self.name} batcher is shut down")
        state = self._ensure_state()
        future: asyncio.Future[Out] = state.loop.create_future()
        heapq.heappush(state.heap, _Pending(priority, next(self._seq), item, future, state.loop.time()))
        state.wakeup.set()
        if (
            self.overtake
            and priority == 0
            and state.running is not None
            and state.running > 0
            and (state.overtaking is None or state.overtaking.done())
        ):
            state.overtaking = state.loop.create_task(self._overtake(state), name=f"{self.name}-overtake")
        return await future

    async def aclose(self) -> None:
        """Stop the worker and fail whatever is still waiting. Idempotent."""
        self._closed = True
        state, self._state = self._state, None
        if state is None:
            return
        error = BackendNotReadyError(f"the {self.name} batcher is shut down")
        for pending in state.heap:
            if not pending.future.done():
                pending.future.set_exception(error)
        state.heap.clear()
        tasks = [t for t in (state.worker, state.overtaking) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is state.loop:
                # asyncio.wait does not re-raise the tasks' CancelledError (nor swallow one aimed at us).
                await asyncio.wait(tasks)

    # --- internals --------------------------------------------------------------------------------------------

    def _ensure_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is None or state.loop is not loop or state.loop.is_closed():
            # A new event loop (e.g. a second asyncio.run in tests): anything queued on the old loop is unreachable.
            state = self._state = _LoopState(loop)
        if state.worker is None or state.worker.done():
            if state.worker is not None and not state.worker.cancelled() and state.worker.exception() is not None:
                logger.error("%s worker died; restarting it", self.name, exc_info=state.worker.exception())
            state.worker = loop.create_task(self._work(state), name=f"{self.name}-worker")
        return state

    async def _work(self, state: _LoopState) -> None:
        while True:
            batch = await self._gather(state)
            if batch:
                state.running = batch[0].priority  # popped in priority order: the batch's best
                try:
                    await self._run_guarded(batch)
                finally:
                    state.running = None

    async def _overtake(self, state: _LoopState) -> None:
        """Run the waiting priority-0 items beside the worker's batch of later ones, until it ends or none wait."""
        while state.running is not None and state.running > 0:
            batch: list[_Pending[In, Out]] = []
            while state.heap and state.heap[0].priority == 0 and len(batch) < self.max_batch_size:
                pending = heapq.heappop(state.heap)
                if not pending.future.done():
                    batch.append(pending)
            if not batch:
                return
            await self._run_guarded(batch)

    async def _run_guarded(self, batch: list[_Pending[In, Out]]) -> None:
        """:meth:`_run`, failing or cancelling the batch's futures when it is interrupted."""
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            for pending in batch:
                if not pending.future.done():
                    pending.future.cancel()
            raise
        except BaseException as exc:  # pragma: no cover - _run handles fn errors itself
            logger.exception("%s worker error", self.name)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)

    def _live(self, state: _LoopState) -> int:
        return sum(1 for p in state.heap if not p.future.done())

    async def _gather(self, state: _LoopState) -> list[_Pending[In, Out]]:
        """Wait for the first live request, then up to ``wait_timeout`` for the batch to fill; pop the batch."""
        while self._live(state) == 0:
            state.heap.clear()
            state.wakeup.clear()
            await state.wakeup.wait()
        if self.wait_timeout > 0 and self._live(state) < self.max_batch_size:
            # From the oldest waiting request's arrival: requests that queued up while the previous batch ran have
            # waited long enough already.
            deadline = min(p.arrived for p in state.heap if not p.future.done()) + self.wait_timeout
            while self._live(state) < self.max_batch_size:
                remaining = deadline - state.loop.time()
                if remaining <= 0:
                    break
                state.wakeup.clear()
                try:
                    await asyncio.wait_for(state.wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
        batch: list[_Pending[In, Out]] = []
        while state.heap and len(batch) < self.max_batch_size:
            pending = heapq.heappop(state.heap)
            if not pending.future.done():  # skip submitters that were cancelled while waiting
                batch.append(pending)
        return batch

    async def _call(self, items: list[In]) -> list[Out]:
        results = await anyio.to_thread.run_sync(self.fn, items, abandon_on_cancel=True)
        results = list(results)
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: the batch function gave {len(results)} results for {len(items)} items")
        return results

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        items = [p.item for p in batch]
        self.batches_run += 1
        self.items_run += len(items)
        try:
            results = await self._call(items)
        except Exception as exc:
            if not (self.retry_individually and len(batch) > 1):
                _fail(batch, exc)
                return
            logger.warning("%s: a batch of %d failed (%s); retrying its items one by one", self.name, len(batch), exc)
            for pending in batch:
                if pending.future.done():
                    continue
                try:
                    (result,) = await self._call([pending.item])
                except Exception as item_exc:
                    _fail([pending], item_exc)
                else:
                    _resolve([pending], [result])
            return
        _resolve(batch, results)


def _resolve(batch: list[_Pending[Any, Any]], results: Sequence[Any]) -> None:
    for pending, result in zip(batch, results, strict=True):
        if not pending.future.done():
            pending.future.set_result(result)


def _fail(batch: list[_Pending[Any, Any]], exc: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
