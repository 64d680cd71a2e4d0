"""Tests for the generic dynamic batcher (flashtts_core.batching)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flashtts_core.batching import DynamicBatcher
from flashtts_core.errors import BackendNotReadyError


class Recorder:
    """A batch function that records its batches (and the thread it ran on)."""

    def __init__(self, delay: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on!r}")
        return [f"r{item}" for item in items]


async def test_concurrent_requests_share_a_batch_off_the_loop() -> None:
    fn = Recorder()
    batcher: DynamicBatcher[object, object] = DynamicBatcher(fn, max_batch_size=4, wait_timeout=0.05)
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
    finally:
        await batcher.aclose()
    assert results == ["r0", "r1", "r2", "r3"]
    assert fn.batches == [[0, 1, 2, 3]]
    assert threading.get_ident() not in fn.threads  # the work ran in a worker thread


async def test_batches_are_capped_and_a_full_batch_does_not_wait() -> None:
    fn = Recorder()
    batcher: DynamicBatcher[object, object] = DynamicBatcher(fn, max_batch_size=2, wait_timeout=10.0)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        assert time.monotonic() - started < 5.0  # full batches start at once, not after wait_timeout
    finally:
        await batcher.aclose()
    assert results == ["r0", "r1", "r2", "r3"]
    assert [len(b) for b in fn.batches] == [2, 2]


async def test_the_wait_counts_from_arrival_not_from_the_end_of_the_previous_batch() -> None:
    """A request that queued while a batch ran has waited its ``wait_timeout`` already: the gathering window counts
    from its arrival, so it starts at once instead of waiting another ``wait_timeout`` for company. Here it arrived
    (backdated) an hour ago with an hour's window; counted from the start of gathering it would wait an hour."""
    batcher: DynamicBatcher[object, object] = DynamicBatcher(Recorder(), max_batch_size=4, wait_timeout=3600.0)
    try:
        result = asyncio.ensure_future(batcher.submit("queued"))
        await asyncio.sleep(0)  # submit has queued the item; the worker it started has not gathered yet
        state = batcher._state
        assert state is not None and len(state.heap) == 1
        state.heap[0].arrived -= 3600.0
        assert await asyncio.wait_for(result, timeout=30) == "rqueued"
    finally:
        await batcher.aclose()


async def test_overtake_runs_first_audio_beside_a_running_batch_of_later_items() -> None:
    """With ``overtake``, a priority-0 item does not wait for a running batch of later ones; without it, it does."""
    for overtake in (True, False):
        release, started = threading.Event(), threading.Event()

        def fn(
            items: list[object], release: threading.Event = release, started: threading.Event = started
        ) -> list[object]:
            if "slow" in items:
                started.set()
                assert release.wait(30)
            return items

        batcher: DynamicBatcher[object, object] = DynamicBatcher(
            fn, max_batch_size=4, wait_timeout=0.0, overtake=overtake
        )
        try:
            slow = asyncio.ensure_future(batcher.submit("slow", priority=1))
            assert await asyncio.to_thread(started.wait, 30)  # the later batch is running
            urgent = asyncio.ensure_future(batcher.submit("urgent", priority=0))
            later = asyncio.ensure_future(batcher.submit("later", priority=1))
            # "slow" is blocked until release: without overtake "urgent" cannot finish, however long we wait.
            done, _ = await asyncio.wait([urgent], timeout=30.0 if overtake else 0.5)
            assert (urgent in done) is overtake
            assert not later.done()  # later items never overtake
            release.set()
            assert await asyncio.gather(slow, urgent, later) == ["slow", "urgent", "later"]
        finally:
            release.set()
            await batcher.aclose()


async def test_lower_priority_value_runs_first() -> None:
    fn = Recorder(delay=0.05)
    batcher: DynamicBatcher[object, object] = DynamicBatcher(fn, max_batch_size=1, wait_timeout=0.0)
    try:
        first = asyncio.ensure_future(batcher.submit("busy"))
        await asyncio.sleep(0.01)  # the worker is now running "busy"; the rest queue up behind it
        later = [asyncio.ensure_future(batcher.submit(f"late{i}", priority=1)) for i in range(2)]
        await asyncio.sleep(0)
        urgent = asyncio.ensure_future(batcher.submit("urgent", priority=0))
        await asyncio.gather(first, urgent, *later)
    finally:
        await batcher.aclose()
    assert [b[0] for b in fn.batches] == ["busy", "urgent", "late0", "late1"]


async def test_cancelled_submitter_does_not_kill_the_worker() -> None:
    fn = Recorder(delay=0.05)
    batcher: DynamicBatcher[object, object] = DynamicBatcher(fn, max_batch_size=2, wait_timeout=0.0)
    try:
        running = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(batcher.submit("cancelled-while-waiting"))
        await asyncio.sleep(0)
        waiting.cancel()
        running.cancel()  # cancelled while its batch runs: the worker must not choke on the done future
        with pytest.raises(asyncio.CancelledError):
            await running
        assert await batcher.submit("b") == "rb"
    finally:
        await batcher.aclose()
    assert ["cancelled-while-waiting"] not in fn.batches


async def test_an_exception_fails_only_the_bad_item() -> None:
    fn = Recorder(fail_on="bad")
    batcher: DynamicBatcher[object, object] = DynamicBatcher(fn, max_batch_size=3, wait_timeout=0.05)
    try:
        results = await asyncio.gather(
            batcher.submit("x"), batcher.submit("bad"), batcher.submit("y"), return_exceptions=True
        )
        assert results[0] == "rx" and results[2] == "ry"
        assert isinstance(results[1], ValueError)
        assert fn.batches[0] == ["x", "bad", "y"]  # one batch, then each item alone
        assert await batcher.submit("z") == "rz"  # the worker survived
    finally:
        await batcher.aclose()


async def test_without_retry_the_whole_batch_fails() -> None:
    fn = Recorder(fail_on="bad")
    batcher: DynamicBatcher[object, object] = DynamicBatcher(
        fn, max_batch_size=2, wait_timeout=0.05, retry_individually=False
    )
    try:
        results = await asyncio.gather(batcher.submit("x"), batcher.submit("bad"), return_exceptions=True)
    finally:
        await batcher.aclose()
    assert all(isinstance(r, ValueError) for r in results)


async def test_wrong_result_count_is_an_error_not_a_hang() -> None:
    batcher: DynamicBatcher[object, object] = DynamicBatcher(lambda items: [], max_batch_size=1, wait_timeout=0.0)
    try:
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            await asyncio.wait_for(batcher.submit(1), 5.0)
    finally:
        await batcher.aclose()


def test_survives_a_new_event_loop() -> None:
    fn = Recorder()
    batcher: DynamicBatcher[object, object] = DynamicBatcher(fn, max_batch_size=2, wait_timeout=0.0)
    assert asyncio.run(batcher.submit(1)) == "r1"
    assert asyncio.run(batcher.submit(2)) == "r2"  # a second asyncio.run: a fresh worker on the new loop


async def test_aclose_fails_waiters_and_rejects_new_work() -> None:
    fn = Recorder(delay=0.05)
    batcher: DynamicBatcher[object, object] = DynamicBatcher(fn, max_batch_size=1, wait_timeout=0.0)
    busy = asyncio.ensure_future(batcher.submit("busy"))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(batcher.submit("queued"))
    await asyncio.sleep(0)
    await batcher.aclose()
    with pytest.raises(BackendNotReadyError):
        await queued
    with pytest.raises((asyncio.CancelledError, BackendNotReadyError)):
        await busy
    with pytest.raises(BackendNotReadyError):
        await batcher.submit("after")
    await batcher.aclose()  # idempotent
