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
* Encoding of large chunks runs in a worker thread so the event loop keeps serving other requests.
"""

from __future__ import annotations

import base64
import contextlib
import logging
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


def _timeout_scope(time_limit: float | None) -> contextlib.AbstractContextManager[Any]:
    return anyio.fail_after(time_limit) if time_limit else contextlib.nullcontext()


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


async def _first_chunk(
    chunks: AsyncGenerator[np.ndarray, None], time_limit: float | None, receive: Receive | None, request_id: str
) -> np.ndarray:
    """Await the first chunk; on any failure close the generator and raise a proper error."""
    first: np.ndarray | None = None
    try:
        with _timeout_scope(time_limit):
            async with _cancel_on_disconnect(receive) as watch:
                first = await chunks.__anext__()
    except StopAsyncIteration:
        raise GenerationError("the model produced no audio for this text; try again or rephrase it") from None
    except TimeoutError:
        await _aclose(chunks)
        raise RequestTimeoutError("the synthesis did not start within the server's request timeout") from None
    except BaseException:
        await _aclose(chunks)
        raise
    if first is None or watch.disconnected:
        await _aclose(chunks)
        logger.info("request %s: the client disconnected before the audio started", request_id)
        raise ClientDisconnectedError("the client disconnected")
    return first


async def _collect(
    first: np.ndarray,
    chunks: AsyncGenerator[np.ndarray, None],
    time_limit: float | None,
    receive: Receive | None,
    request_id: str,
) -> np.ndarray:
    pieces = [first]
    try:
        with _timeout_scope(time_limit):
            async with _cancel_on_disconnect(receive) as watch:
                async for samples in chunks:
                    pieces.append(samples)
    except TimeoutError:
        raise RequestTimeoutError("the synthesis took longer than the server's request timeout") from None
    finally:
        await _aclose(chunks)
    if watch.disconnected:
        logger.info("request %s: the client disconnected; generation stopped", request_id)
        raise ClientDisconnectedError("the client disconnected")
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


async def _raw_body(
    first: np.ndarray, chunks: AsyncGenerator[np.ndarray, None], encoder: AudioEncoder, request_id: str
) -> AsyncIterator[bytes]:
    try:
        data = await _encode(encoder, first)
        if data:
            yield data
        async for samples in chunks:
            data = await _encode(encoder, samples)
            if data:
                yield data
        data = await _finish(encoder)
        if data:
            yield data
    except Exception as exc:  # cancellation (BaseException) must propagate; everything else ends the stream
        logger.error(
            "request %s failed while streaming: %s", request_id, exc, exc_info=not isinstance(exc, FlashTTSError)
        )
        tail = _safe_finish(encoder)
        if tail:
            yield tail
    finally:
        encoder.close()
        await _aclose(chunks)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"


def _delta(data: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


async def _sse_body(
    first: np.ndarray, chunks: AsyncGenerator[np.ndarray, None], encoder: AudioEncoder, request_id: str
) -> AsyncIterator[bytes]:
    try:
        data = await _encode(encoder, first)
        if data:
            yield _delta(data)
        async for samples in chunks:
            data = await _encode(encoder, samples)
            if data:
                yield _delta(data)
        data = await _finish(encoder)
        if data:
            yield _delta(data)
        yield _sse({"type": "speech.audio.done"})
    except Exception as exc:
        logger.error(
            "request %s failed while streaming: %s", request_id, exc, exc_info=not isinstance(exc, FlashTTSError)
        )
        yield _sse({"type": "speech.audio.error", "error": _error_event(exc)})
    finally:
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
) -> Response[Any]:
    """The HTTP response for ``chunks`` (mono float32 at ``input_rate``), encoded as ``fmt``.

    ``sse`` implies streaming. Raises (as JSON errors) whatever the first chunk raises; the generator is closed
    on every path. ``receive`` (the request's ASGI receive, body already read) lets a disconnect stop the
    generation before the response starts.
    """
    from flashtts_core.audio.encode import AudioEncoder

    try:
        encoder = AudioEncoder(fmt, input_rate=input_rate, output_rate=output_rate, streaming=stream or sse)
    except BaseException:
        await _aclose(chunks)
        raise
    try:
        first = await _first_chunk(chunks, time_limit, receive, request_id)
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
        return ClosingStream(
            _sse_body(first, chunks, encoder, request_id), media_type="text/event-stream", headers=headers
        )
    headers["Content-Disposition"] = f"attachment; filename=speech.{spec.extension}"
    if stream:
        headers["X-Accel-Buffering"] = "no"
        return ClosingStream(
            _raw_body(first, chunks, encoder, request_id), media_type=encoder.mime_type, headers=headers
        )
    try:
        samples = await _collect(first, chunks, time_limit, receive, request_id)
    except BaseException:
        encoder.close()
        raise
    body = await anyio.to_thread.run_sync(_encode_whole, encoder, samples)
    return Response(body, media_type=encoder.mime_type, headers=headers, status_code=200)
