"""Turning the service's stream of float32 chunks into an HTTP response: one file, a chunked stream, or SSE.

Rules every audio response follows:

* **Errors before the first byte are JSON errors.** The first chunk is awaited *before* any response object
  exists (Litestar sends the status line before it pulls from a ``Stream``), so validation, admission (503),
  voice and generation errors reach the client as the error envelope with the right status.
* **One encoder per response.** ``X-Sample-Rate`` says the rate actually encoded (``pcm`` has no header to
  carry it); ``Content-Type`` comes from :mod:`flashtts_core.audio.formats`.
* **A failure after the first byte ends the stream cleanly**: raw audio is finished (so the file that arrived
  is well-formed) and closed; SSE sends a ``speech.audio.error`` event. It is logged, never raised into the
  server (which could only abort the connection).
* **The generation stops when the client goes away.** Litestar cancels the body task on ``http.disconnect``;
  :class:`ClosingStream` additionally guarantees that the body generator, and through it the service's
  generator, is ``aclose()``-d even when the cancellation hits while the generator is suspended at a
  ``yield`` (a bare async generator would then only be closed whenever the garbage collector gets to it).
* **One time budget per request** (``--request_timeout``, counted from the request's start): exceeded before
  the first byte it is a 504 envelope; after it, the stream ends cleanly as for any failure (SSE: a
  ``speech.audio.error`` event with code ``timeout``). Either way the generation is closed at once, so the
  backend and the admission slot are freed.
* Encoding of large chunks runs in a worker thread so the event loop keeps serving other requests.
* An optional :class:`~flashtts_core.server.metrics.SynthesisTracker` is told the first audio, the audio sent
  and how the synthesis ended (metrics only; no content).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import numpy as np
from litestar import Response
from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse

from flashtts_core.errors import FlashTTSError, GenerationError, RequestTimeoutError

if TYPE_CHECKING:
    from litestar.types import Receive, Scope, Send

    from flashtts_core.audio.encode import AudioEncoder
    from flashtts_core.server.metrics import SynthesisTracker

__all__ = ("ClientDisconnectedError", "ClosingStream", "audio_response")

logger = logging.getLogger(__name__)

# Chunks at least this long (samples) are encoded in a worker thread; shorter ones cost less than the hop.
_THREAD_MIN_SAMPLES = 8192


class _ClosingStreamingResponse(ASGIStreamingResponse):
    """An ASGI streaming response that always closes its iterator when the response ends, however it ends."""

    __slots__ = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _aclose(self.iterator)


class ClosingStream(Stream):
    """:class:`litestar.response.Stream` whose body generator is closed deterministically (see module doc)."""

    __slots__ = ()

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIStreamingResponse:  # type: ignore[override]
        response = super().to_asgi_response(*args, **kwargs)
        # Same slots, no new state: only the behaviour of __call__ changes.
        response.__class__ = _ClosingStreamingResponse
        return response  # type: ignore[return-value]


async def _aclose(iterator: object) -> None:
    """``aclose()`` an async generator, shielded from the cancellation that is usually why we are closing."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:
            logger.debug("ignoring an error while closing a response stream", exc_info=True)


async def _encode(encoder: AudioEncoder, samples: np.ndarray) -> bytes:
    if samples.shape[0] >= _THREAD_MIN_SAMPLES:
        return await anyio.to_thread.run_sync(encoder.encode, samples)
    return encoder.encode(samples)


async def _finish(encoder: AudioEncoder) -> bytes:
    return await anyio.to_thread.run_sync(encoder.finish)


def _safe_finish(encoder: AudioEncoder) -> bytes:
    try:
        return encoder.finish()
    except Exception:
        return b""


class _Budget:
    """The request's time budget: one deadline shared by every phase (first chunk, collection, streaming)."""

    __slots__ = ("deadline", "limit")

    def __init__(self, time_limit: float | None, started: float) -> None:
        self.limit = time_limit
        self.deadline = started + time_limit if time_limit else None

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """``fail_after`` the time left (``TimeoutError`` at once when none is left), or no limit."""
        if self.deadline is None:
            return contextlib.nullcontext()
        return anyio.fail_after(max(0.0, self.deadline - time.monotonic()))


class _NoTracker:
    """Stands in for a :class:`SynthesisTracker` when metrics are off."""

    __slots__ = ()

    def audio(self, samples: int) -> None:
        pass

    def stream_started(self) -> None:
        pass

    def finished(self, outcome: str = "ok") -> None:
        pass


class ClientDisconnectedError(FlashTTSError):
    """The client left before the response started; nobody will read the error (logged only)."""

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_closed_request"


class _Watch:
    __slots__ = ("disconnected",)

    def __init__(self) -> None:
        self.disconnected = False


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(receive: Receive | None) -> AsyncIterator[_Watch]:
    """Cancel the body of the ``async with`` when the client disconnects (``watch.disconnected`` is then set).

    Litestar only watches for ``http.disconnect`` while it streams a body. Before that (waiting for the first
    chunk) and for non-streamed responses (collecting the whole signal) a client that gives up would otherwise
    leave the generation running to the end. Only called after the request body has been read, so the only
    message ``receive`` can still deliver is the disconnect (cancelling a pending ``receive`` loses nothing)."""
    watch = _Watch()
    error: Exception | None = None
    if receive is None:
        yield watch
        return
    async with anyio.create_task_group() as tasks:

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    watch.disconnected = True
                    tasks.cancel_scope.cancel()
                    return

        tasks.start_soon(listen)
        try:
            yield watch
        except Exception as exc:  # re-raised below: inside, the task group would wrap it in an ExceptionGroup
            error = exc
        finally:
            tasks.cancel_scope.cancel()
    if error is not None:
        raise error


def _timeout_error(budget: _Budget, *, started: bool) -> RequestTimeoutError:
    when = "did not start" if not started else "did not finish"
    return RequestTimeoutError(
        f"the synthesis {when} within the server's time budget of {budget.limit:g} s (--request_timeout); "
        "send a shorter text or retry when the server is less busy"
    )


async def _first_chunk(
    chunks: AsyncGenerator[np.ndarray, None],
    budget: _Budget,
    receive: Receive | None,
    request_id: str,
    tracker: SynthesisTracker | _NoTracker,
) -> np.ndarray:
    """Await the first chunk; on any failure close the generator and raise a proper error."""
    first: np.ndarray | None = None
    try:
        with budget.scope():
            async with _cancel_on_disconnect(receive) as watch:
                first = await chunks.__anext__()
    except StopAsyncIteration:
        tracker.finished("error")
        raise GenerationError("the model produced no audio for this text; try again or rephrase it") from None
    except TimeoutError:
        await _aclose(chunks)
        tracker.finished("timeout")
        logger.info("request %s: no audio within the time budget; stopped", request_id)
        raise _timeout_error(budget, started=False) from None
    except BaseException:
        await _aclose(chunks)
        tracker.finished("error")
        raise
    if first is None or watch.disconnected:
        await _aclose(chunks)
        tracker.finished("disconnect")
        logger.info("request %s: the client disconnected before the audio started", request_id)
        raise ClientDisconnectedError("the client disconnected")
    tracker.audio(first.shape[0])
    return first


async def _collect(
    first: np.ndarray,
    chunks: AsyncGenerator[np.ndarray, None],
    budget: _Budget,
    receive: Receive | None,
    request_id: str,
    tracker: SynthesisTracker | _NoTracker,
) -> np.ndarray:
    pieces = [first]
    try:
        with budget.scope():
            async with _cancel_on_disconnect(receive) as watch:
                async for samples in chunks:
                    pieces.append(samples)
                    tracker.audio(samples.shape[0])
    except TimeoutError:
        tracker.finished("timeout")
        logger.info("request %s: the synthesis exceeded the time budget; stopped", request_id)
        raise _timeout_error(budget, started=True) from None
    except BaseException:
        tracker.finished("error")
        raise
    finally:
        await _aclose(chunks)
    if watch.disconnected:
        tracker.finished("disconnect")
        logger.info("request %s: the client disconnected; generation stopped", request_id)
        raise ClientDisconnectedError("the client disconnected")
    tracker.finished("ok")
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _encode_whole(encoder: AudioEncoder, samples: np.ndarray) -> bytes:
    try:
        return encoder.encode(samples) + encoder.finish()
    finally:
        encoder.close()


def _error_event(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, FlashTTSError):
        return {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}
    return {
        "message": "audio generation failed; see the server log",
        "type": "server_error",
        "param": None,
        "code": None,
    }


async def _next_chunk(chunks: AsyncGenerator[np.ndarray, None], budget: _Budget) -> np.ndarray | None:
    """The next chunk within the budget (``None`` at the end); the cancel scope never spans a ``yield``."""
    try:
        with budget.scope():
            return await chunks.__anext__()
    except StopAsyncIteration:
        return None


class _Body:
    """The streamed body: an async iterator whose ``aclose()`` releases the generation, the encoder and the
    metrics even when the server never started iterating (a client that left right after the status line)."""

    __slots__ = ("_chunks", "_encoder", "_gen", "_tracker")

    def __init__(
        self,
        gen: AsyncGenerator[bytes, None],
        chunks: AsyncGenerator[np.ndarray, None],
        encoder: AudioEncoder,
        tracker: SynthesisTracker | _NoTracker,
    ) -> None:
        self._gen = gen
        self._chunks = chunks
        self._encoder = encoder
        self._tracker = tracker

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        try:
            await _aclose(self._gen)
        finally:
            await _aclose(self._chunks)
            self._encoder.close()
            self._tracker.finished("disconnect")  # no-op when the body already recorded how it ended


async def _raw_body(
    first: np.ndarray,
    chunks: AsyncGenerator[np.ndarray, None],
    encoder: AudioEncoder,
    request_id: str,
    budget: _Budget,
    tracker: SynthesisTracker | _NoTracker,
) -> AsyncIterator[bytes]:
    tracker.stream_started()
    outcome = "disconnect"  # unless the loop below ends otherwise: cancelled or closed while suspended
    try:
        data = await _encode(encoder, first)
        if data:
            yield data
        while (samples := await _next_chunk(chunks, budget)) is not None:
            tracker.audio(samples.shape[0])
            data = await _encode(encoder, samples)
            if data:
                yield data
        data = await _finish(encoder)
        outcome = "ok"
        if data:
            yield data
    except TimeoutError:
        outcome = "timeout"
        logger.info("request %s: the time budget ran out while streaming; ending the stream", request_id)
        await _aclose(chunks)  # free the backend before finishing the file
        tail = _safe_finish(encoder)
        if tail:
            yield tail
    except Exception as exc:  # cancellation (BaseException) must propagate; everything else ends the stream
        outcome = "error"
        logger.error(
            "request %s failed while streaming: %s", request_id, exc, exc_info=not isinstance(exc, FlashTTSError)
        )
        tail = _safe_finish(encoder)
        if tail:
            yield tail
    finally:
        tracker.finished(outcome)
        encoder.close()
        await _aclose(chunks)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"


def _delta(data: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


async def _sse_body(
    first: np.ndarray,
    chunks: AsyncGenerator[np.ndarray, None],
    encoder: AudioEncoder,
    request_id: str,
    budget: _Budget,
    tracker: SynthesisTracker | _NoTracker,
) -> AsyncIterator[bytes]:
    tracker.stream_started()
    outcome = "disconnect"
    try:
        data = await _encode(encoder, first)
        if data:
            yield _delta(data)
        while (samples := await _next_chunk(chunks, budget)) is not None:
            tracker.audio(samples.shape[0])
            data = await _encode(encoder, samples)
            if data:
                yield _delta(data)
        data = await _finish(encoder)
        outcome = "ok"
        if data:
            yield _delta(data)
        yield _sse({"type": "speech.audio.done"})
    except TimeoutError:
        outcome = "timeout"
        logger.info("request %s: the time budget ran out while streaming; ending the stream", request_id)
        await _aclose(chunks)
        yield _sse({"type": "speech.audio.error", "error": _error_event(_timeout_error(budget, started=True))})
    except Exception as exc:
        outcome = "error"
        logger.error(
            "request %s failed while streaming: %s", request_id, exc, exc_info=not isinstance(exc, FlashTTSError)
        )
        yield _sse({"type": "speech.audio.error", "error": _error_event(exc)})
    finally:
        tracker.finished(outcome)
        encoder.close()
        await _aclose(chunks)


async def audio_response(
    chunks: AsyncGenerator[np.ndarray, None],
    *,
    input_rate: int,
    fmt: str,
    output_rate: int | None,
    stream: bool,
    request_id: str,
    sse: bool = False,
    time_limit: float | None = None,
    receive: Receive | None = None,
    started: float | None = None,
    tracker: SynthesisTracker | None = None,
) -> Response[Any]:
    """The HTTP response for ``chunks`` (mono float32 at ``input_rate``), encoded as ``fmt``.

    ``sse`` implies streaming. Raises (as JSON errors) whatever the first chunk raises; the generator is closed
    on every path. ``receive`` (the request's ASGI receive, body already read) lets a disconnect stop the
    generation before the response starts. ``time_limit`` (s) counts from ``started`` (``time.monotonic()``
    of the request's start; now if omitted).
    """
    from flashtts_core.audio.encode import AudioEncoder

    budget = _Budget(time_limit, time.monotonic() if started is None else started)
    track: SynthesisTracker | _NoTracker = tracker if tracker is not None else _NoTracker()
    try:
        encoder = AudioEncoder(fmt, input_rate=input_rate, output_rate=output_rate, streaming=stream or sse)
    except BaseException:
        await _aclose(chunks)
        raise
    try:
        first = await _first_chunk(chunks, budget, receive, request_id, track)
    except BaseException:
        encoder.close()
        raise
    spec = encoder.spec
    headers = {
        "X-Sample-Rate": str(encoder.sample_rate),
        "X-Request-Id": request_id,
        "Cache-Control": "no-cache",
    }
    if sse:
        headers["X-Accel-Buffering"] = "no"
        body = _Body(_sse_body(first, chunks, encoder, request_id, budget, track), chunks, encoder, track)
        return ClosingStream(body, media_type="text/event-stream", headers=headers)
    headers["Content-Disposition"] = f"attachment; filename=speech.{spec.extension}"
    if stream:
        headers["X-Accel-Buffering"] = "no"
        body = _Body(_raw_body(first, chunks, encoder, request_id, budget, track), chunks, encoder, track)
        return ClosingStream(body, media_type=encoder.mime_type, headers=headers)
    try:
        samples = await _collect(first, chunks, budget, receive, request_id, track)
    except BaseException:
        encoder.close()
        raise
    body_bytes = await anyio.to_thread.run_sync(_encode_whole, encoder, samples)
    return Response(body_bytes, media_type=encoder.mime_type, headers=headers, status_code=200)
