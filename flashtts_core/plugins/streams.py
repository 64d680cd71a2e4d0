"""Helpers for backends whose runtime blocks: a worker thread produces, the event loop consumes.

The worker hands each request's deltas to the event loop (``loop.call_soon_threadsafe(queue.put_nowait, item)``)
as :class:`TokenChunk` values, or the exception that ends the request. :func:`token_stream` turns that queue into the
``_generate`` stream the contract asks for. :class:`AdmissionQueue` holds the requests waiting for a batch slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

from flashtts_core.plugins.types import FIRST_AUDIO, TokenChunk

__all__ = ("AdmissionQueue", "QueueItem", "first_audio_reserve", "token_stream")

T = TypeVar("T")

#: What a worker thread puts on a request's queue.
QueueItem = TokenChunk | BaseException


async def token_stream(queue: asyncio.Queue[QueueItem]) -> AsyncIterator[TokenChunk]:
    """Yield the deltas of ``queue`` until the chunk with a finish reason; raise an exception item.

    A slow consumer gets everything that piled up as one delta instead of one chunk per token, so a backlog costs one
    wake-up, not hundreds. The caller aborts the work in its runtime in a ``finally`` around the iteration."""
    while True:
        item = await queue.get()
        token_ids: list[int] = []
        while True:
            if isinstance(item, BaseException):
                raise item
            token_ids.extend(item.token_ids)
            if item.finish_reason is not None or queue.empty():
                break
            item = queue.get_nowait()
        yield TokenChunk(tuple(token_ids), item.finish_reason)
        if item.finish_reason is not None:
            return


def first_audio_reserve(slots: int) -> int:
    """Batch slots that :meth:`AdmissionQueue.take` keeps for ``FIRST_AUDIO`` work: one per 8 slots (at least one
    from 2 slots on, none with a single slot, where later segments would otherwise never run)."""
    return 0 if slots < 2 else max(1, slots // 8)


class AdmissionQueue(Generic[T]):
    """Work waiting for a batch slot, in admission order: by ``GenerationRequest.priority`` (lower first), then by
    arrival. Not thread-safe: the runtime guards it with its own lock.

    Priorities are few (a request's first generation, its later segments), so an insertion walks back over the
    lower-priority tail only: appending at one priority level stays O(1)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[tuple[int, T]] = deque()

    def append(self, item: T, priority: int = FIRST_AUDIO) -> None:
        items = self._items
        if not items or items[-1][0] <= priority:
            items.append((priority, item))
            return
        index = len(items) - 1
        while index > 0 and items[index - 1][0] > priority:
            index -= 1
        items.insert(index, (priority, item))

    def take(self, free: int, reserve: int = 0) -> list[T]:
        """Pop the items to admit into ``free`` slots. Work after the first audio only takes a slot while more than
        ``reserve`` would stay free, so that a new request's first generation finds a slot at the next step instead of
        waiting for running ones to end (under load, later segments have the slack: their audio plays after the
        earlier segments')."""
        items = self._items
        admitted: list[T] = []
        while items and len(admitted) < free:
            if items[0][0] > FIRST_AUDIO and free - len(admitted) <= reserve:
                break  # everything behind has the same or a later priority
            admitted.append(items.popleft()[1])
        return admitted

    def remove(self, item: T) -> None:
        """Forget ``item`` (compared by identity); ``ValueError`` when it is not queued."""
        for index, (_, queued) in enumerate(self._items):
            if queued is item:
                del self._items[index]
                return
        raise ValueError("item is not queued")

    def clear(self) -> None:
        self._items.clear()

    def __iter__(self) -> Iterator[T]:
        return (item for _, item in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)
