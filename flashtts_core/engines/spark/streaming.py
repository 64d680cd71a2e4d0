"""Incremental decoding of a growing semantic-token stream into audio chunks.

The baseline is the original Spark streaming schedule (reference-behaviour §3.4.8): first audio after 50 semantic
tokens (1 s), windows growing ×2 up to 400 tokens (8 s), consecutive windows overlapping by 5 tokens whose audio is
cross-faded. Three things are better here:

* **Left context.** The original decodes each window from its first (overlap) token, so the BiCodec decoder's
  convolutions see zero padding where the previous audio was, and the start of every window differs audibly from a
  full decode. Here each window is decoded together with up to ``left_context_tokens`` earlier tokens whose audio is
  discarded; with a context longer than the decoder's receptive field the start of a window is (numerically almost)
  identical to the full decode.
* **Lookahead.** The *end* of a window lacks right context, so its last ``lookahead_tokens`` (0.2 s) are not emitted
  but re-decoded by the next window; only the first ``overlap_tokens`` of them are cross-faded. Every emitted sample
  had at least ``lookahead - overlap`` tokens of right context (the original: none at its seams).
* **Exact length.** Concatenating every emitted chunk gives exactly ``T * samples_per_token`` samples for ``T``
  tokens, as a single full decode would; the original duplicated the last 100 ms in one edge case.

Timeline of one seam (``|`` = window end, ``o`` = overlap, ``l`` = rest of the lookahead, ``c`` = left context)::

    window k:    [c ctx c][=========== emitted ===========][ tail o ][ l ]|
    window k+1:                     [c ctx c][ cross-fade o ][========= emitted =========][ tail o ][ l ]|
                                                ^ tail of k fades out, head of k+1 fades in (linear ramps)

The classes here are pure (no asyncio, no codec): :class:`StreamAssembler` says which token window to decode next
and turns decoded windows into output samples; the engine owns the decoding.
"""

from __future__ import annotations

import logging
from typing import Annotated, NamedTuple

import msgspec
import numpy as np
from msgspec import Meta

__all__ = ("NON_STREAMING_SCHEDULE", "STREAMING_SCHEDULE", "StreamAssembler", "StreamSchedule", "StreamWindow")

logger = logging.getLogger(__name__)


class StreamSchedule(msgspec.Struct, frozen=True, kw_only=True):
    """Window sizes in semantic tokens (50 per second)."""

    first_chunk_tokens: Annotated[int, Meta(ge=2)] = 50  # first window: first audio after 1 s worth of tokens
    max_chunk_tokens: Annotated[int, Meta(ge=2)] = 400  # windows grow up to this (8 s)
    growth: Annotated[float, Meta(ge=1.0)] = 2.0  # window size factor after every window
    # Tokens at the end of a window that it decodes but does not emit: they lack right context (the decoder's
    # convolutions see the window edge), so the next window, which has that context, re-decodes them.
    lookahead_tokens: Annotated[int, Meta(ge=0)] = 10
    # The first ``overlap_tokens`` of the lookahead are cross-faded between the two decodes (0.1 s = 1600 samples).
    overlap_tokens: Annotated[int, Meta(ge=0)] = 5
    left_context_tokens: Annotated[int, Meta(ge=0)] = 50  # decoded before a window, audio discarded
    samples_per_token: Annotated[int, Meta(ge=1)] = 320  # BiCodec hop at 16 kHz

    def __post_init__(self) -> None:
        if self.overlap_tokens > self.lookahead_tokens:
            raise ValueError("overlap_tokens must not exceed lookahead_tokens")
        if self.first_chunk_tokens <= self.lookahead_tokens:
            raise ValueError("first_chunk_tokens must be larger than lookahead_tokens")
        if self.max_chunk_tokens < self.first_chunk_tokens:
            raise ValueError("max_chunk_tokens must be at least first_chunk_tokens")


#: Streaming requests: the original cadence (≈0.9 s, 1.9 s, 3.9 s, then 7.9 s chunks).
STREAMING_SCHEDULE = StreamSchedule()
#: Non-streaming requests: few, long windows (30 s) — fewer seams and decoder calls, bounded decoder memory.
NON_STREAMING_SCHEDULE = StreamSchedule(first_chunk_tokens=1500, max_chunk_tokens=1500)


class StreamWindow(NamedTuple):
    """Decode ``tokens[context_start:end]``; its audio from token ``start`` on is used."""

    context_start: int
    start: int
    end: int
    final: bool


class StreamAssembler:
    """State machine that turns a growing token sequence into output audio chunks.

    Usage: after appending tokens, call :meth:`next_window` with the token count until it returns ``None``, decode
    each window and pass the audio to :meth:`push`, which returns the samples to emit now. When no more tokens will
    come, do the same with ``final=True`` and then emit :meth:`flush`.
    """

    def __init__(self, schedule: StreamSchedule = STREAMING_SCHEDULE) -> None:
        self.schedule = schedule
        self._start = 0  # first token whose audio is not emitted yet (= start of the held-back tail)
        self._tail = np.zeros(0, dtype=np.float32)  # audio of tokens [start, start + tail tokens), decoded before
        self._chunk = schedule.first_chunk_tokens
        self.emitted_samples = 0
        self.windows = 0

    @property
    def tail_tokens(self) -> int:
        return self._tail.size // self.schedule.samples_per_token

    @property
    def next_chunk_tokens(self) -> int:
        return self._chunk

    def next_window(self, available: int, *, final: bool = False) -> StreamWindow | None:
        """The next window to decode with ``available`` tokens known, or ``None`` if none is due.

        Non-final windows span ``chunk`` tokens from the first unemitted token (the tail is re-decoded);
        the final window runs to the last token, if there is anything new beyond the tail."""
        start = self._start
        if final:
            end = available
            if end <= start + self.tail_tokens:
                return None  # nothing new: flush() emits the tail as it is (it was decoded up to the last token)
        else:
            end = start + self._chunk
            if available < end:
                return None
        context_start = max(0, start - self.schedule.left_context_tokens)
        return StreamWindow(context_start, start, end, final)

    def push(self, window: StreamWindow, audio: np.ndarray) -> np.ndarray:
        """Take the decoded audio of ``tokens[window.context_start:window.end]``; return the samples to emit.

        ``audio`` should have ``(end - context_start) * samples_per_token`` samples; a codec that returns a few
        more or fewer is trimmed or zero-padded so the total length stays exact."""
        spt = self.schedule.samples_per_token
        if window.start != self._start:
            raise ValueError("push() got a window that does not start at the first unemitted token")
        expected = (window.end - window.context_start) * spt
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if audio.size != expected:
            logger.debug("decoded window has %d samples, expected %d; fitting", audio.size, expected)
            audio = np.pad(audio, (0, max(0, expected - audio.size)))[:expected]
        audio = audio[(window.start - window.context_start) * spt :]  # drop the left context
        if window.final:
            lookahead = overlap = 0
        else:
            lookahead = min(self.schedule.lookahead_tokens, window.end - window.start - 1)
            overlap = min(self.schedule.overlap_tokens, lookahead)
        emit_end = audio.size - lookahead * spt
        tail = self._tail
        if tail.size:
            # Equal-gain linear cross-fade: both signals estimate the same waveform (highly correlated), so their
            # weights sum to one. Ramps exclude the end points so neither signal is used alone at the borders.
            n = min(tail.size, emit_end)
            fade_in = (np.arange(n, dtype=np.float32) + 0.5) / n
            head = tail[:n] * (1.0 - fade_in) + audio[:n] * fade_in
            body = np.concatenate([head, audio[n:emit_end]])
        else:
            body = audio[:emit_end]
        # Keep the start of the lookahead for the next cross-fade; the rest is simply re-decoded next time.
        self._tail = audio[emit_end : emit_end + overlap * spt].copy()
        self._start = window.end - lookahead
        self.emitted_samples += body.size
        self.windows += 1
        if not window.final:
            self._chunk = min(self.schedule.max_chunk_tokens, int(self._chunk * self.schedule.growth))
        return body.astype(np.float32, copy=False)

    def flush(self) -> np.ndarray:
        """The held-back tail (after the final window there is none left)."""
        tail, self._tail = self._tail, np.zeros(0, dtype=np.float32)
        self._start += tail.size // self.schedule.samples_per_token
        self.emitted_samples += tail.size
        return tail
