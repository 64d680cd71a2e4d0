"""Which SNAC windows to decode while Orpheus frames arrive, so that every frame is emitted exactly once.

The original (models.md §B.6) decodes the last 4 frames whenever a frame completes and keeps only the second one:
the first frame and the last two frames of every utterance are never heard, and each frame costs a 4-frame decode.
Here the frames are cut into consecutive *chunks*; each chunk is decoded together with up to ``context_frames``
frames on each side and only the chunk's own samples are kept. At the start and the end of the utterance the
context is simply what exists — which is exactly what a one-shot decode of the whole utterance sees there too.

Why ``context_frames = 3`` makes the seams exact: the SNAC 24 kHz decoder is a stack of non-causal convolutions
(no attention in ``snac_24khz``). Its receptive field, in finest-codebook steps (4 per frame), is about ±3 (the
depthwise k7 input conv) + ±1 (first transposed conv) + ±4.9 (the three dilated k7 residual units at 8× rate:
±39 samples / 8) + under ±1 for the later, finer blocks ≈ ±10 steps = ±2.5 frames. The codebook lookup is per
frame (no cross-frame mixing). So with 3 frames (12 steps) of real context on both sides, the kept samples are the
same numbers a one-shot decode would produce (up to float rounding and the decoder's per-call noise): no seams, no
cross-fade needed, and the concatenated output has exactly ``frames × 2048`` samples.

Chunk sizes grow (streaming: 4, 8, 16, then 32 frames ≈ 0.34 s → 2.7 s) so the first audio comes after
``first_chunk_frames + context_frames`` = 7 frames (~49 tokens) while later windows amortise the context overhead.
Non-streaming requests use long chunks (64 frames ≈ 5.5 s) that bound the decoder's memory. Both give the same audio.

Pure logic: no asyncio, no torch, no numpy.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import msgspec
from msgspec import Meta

__all__ = ("NON_STREAMING_SCHEDULE", "STREAMING_SCHEDULE", "DecodeSchedule", "FrameWindow", "WindowPlanner")


class DecodeSchedule(msgspec.Struct, frozen=True, kw_only=True):
    """Chunk sizes and context, in frames (one frame = 7 tokens = 2048 samples = 85.3 ms)."""

    first_chunk_frames: Annotated[int, Meta(ge=1)] = 4
    max_chunk_frames: Annotated[int, Meta(ge=1)] = 32
    growth: Annotated[float, Meta(ge=1.0)] = 2.0
    context_frames: Annotated[int, Meta(ge=0)] = 3

    def __post_init__(self) -> None:
        if self.max_chunk_frames < self.first_chunk_frames:
            raise ValueError("max_chunk_frames must be at least first_chunk_frames")


#: Streaming requests: first audio after 7 frames, then chunks of 8, 16 and 32 frames.
STREAMING_SCHEDULE = DecodeSchedule()
#: Non-streaming requests: 64-frame chunks (fewer decoder calls, bounded memory).
NON_STREAMING_SCHEDULE = DecodeSchedule(first_chunk_frames=64, max_chunk_frames=64)


class FrameWindow(NamedTuple):
    """Decode frames ``[context_start, context_end)``; keep the audio of frames ``[start, end)``."""

    context_start: int
    start: int
    end: int
    context_end: int

    @property
    def frames(self) -> int:
        """Frames in the decoded window."""
        return self.context_end - self.context_start

    def keep(self, samples_per_frame: int) -> tuple[int, int]:
        """Sample range of the decoded window's audio that belongs to ``[start, end)``."""
        return (
            (self.start - self.context_start) * samples_per_frame,
            (self.end - self.context_start) * samples_per_frame,
        )


class WindowPlanner:
    """Hands out the next window to decode for a growing frame count; every frame lands in exactly one window."""

    def __init__(self, schedule: DecodeSchedule = STREAMING_SCHEDULE) -> None:
        self.schedule = schedule
        #: Frames already covered by handed-out windows.
        self.emitted = 0
        self._chunk = float(schedule.first_chunk_frames)
        #: Windows handed out so far.
        self.windows = 0

    def next_window(self, available: int, *, final: bool) -> FrameWindow | None:
        """The next window if ``available`` frames allow it (``final``: no more frames will come), else ``None``."""
        s = self.schedule
        chunk = int(self._chunk)
        if available <= self.emitted:
            return None
        if final:
            end = min(self.emitted + chunk, available)
        else:
            end = self.emitted + chunk
            if end + s.context_frames > available:
                return None
        window = FrameWindow(
            context_start=max(0, self.emitted - s.context_frames),
            start=self.emitted,
            end=end,
            context_end=min(available, end + s.context_frames),
        )
        self.emitted = end
        self.windows += 1
        self._chunk = min(float(s.max_chunk_frames), self._chunk * s.growth)
        return window
