"""Helpers for backends whose runtime blocks: a worker thread produces, the event loop consumes.

The worker hands each request's deltas to the event loop (``loop.call_soon_threadsafe(queue.put_nowait, item)``)
as :class:`TokenChunk` values, or the exception that ends the request. :func:`token_stream` turns that queue into the
``_generate`` stream the contract asks for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from flashtts_core.plugins.types import TokenChunk

__all__ = ("QueueItem", "token_stream")

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
