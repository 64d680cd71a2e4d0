"""AdmissionQueue: admission order by priority then arrival, and the slots kept for first audio."""

from __future__ import annotations

import pytest

from flashtts_core.plugins import FIRST_AUDIO, LATER_AUDIO, AdmissionQueue, GenerationRequest, first_audio_reserve
from flashtts_core.plugins.types import SamplingParams


def _queue(*entries: tuple[str, int]) -> AdmissionQueue[str]:
    queue: AdmissionQueue[str] = AdmissionQueue()
    for name, priority in entries:
        queue.append(name, priority)
    return queue


def test_first_audio_goes_ahead_of_later_segments_in_arrival_order() -> None:
    queue = _queue(("a1", LATER_AUDIO), ("b0", FIRST_AUDIO), ("a2", LATER_AUDIO), ("c0", FIRST_AUDIO))
    assert list(queue) == ["b0", "c0", "a1", "a2"]
    assert queue.take(4) == ["b0", "c0", "a1", "a2"]
    assert not queue


def test_same_priority_is_fifo_and_default_is_first_audio() -> None:
    queue: AdmissionQueue[int] = AdmissionQueue()
    for i in range(5):
        queue.append(i)
    queue.append(9, LATER_AUDIO)
    queue.append(5)
    assert list(queue) == [0, 1, 2, 3, 4, 5, 9]


def test_take_keeps_the_reserve_for_first_audio() -> None:
    queue = _queue(("a1", LATER_AUDIO), ("a2", LATER_AUDIO), ("a3", LATER_AUDIO))
    assert queue.take(3, reserve=1) == ["a1", "a2"]  # one slot stays free
    assert queue.take(1, reserve=1) == []  # the last free slot is kept
    queue.append("b0", FIRST_AUDIO)
    assert queue.take(1, reserve=1) == ["b0"]  # first audio may take it
    assert queue.take(4, reserve=0) == ["a3"]


def test_take_admits_first_audio_into_every_free_slot() -> None:
    queue = _queue(("x0", FIRST_AUDIO), ("y0", FIRST_AUDIO), ("x1", LATER_AUDIO))
    assert queue.take(2, reserve=1) == ["x0", "y0"]
    assert list(queue) == ["x1"]
    assert queue.take(0, reserve=0) == []


def test_remove_by_identity() -> None:
    first, second = ["same"], ["same"]
    queue: AdmissionQueue[list[str]] = AdmissionQueue()
    queue.append(first)
    queue.append(second)
    queue.remove(second)
    assert len(queue) == 1 and queue.take(1)[0] is first
    with pytest.raises(ValueError):
        queue.remove(second)
    queue.append(first)
    queue.clear()
    assert len(queue) == 0


@pytest.mark.parametrize(("slots", "reserve"), [(1, 0), (2, 1), (8, 1), (15, 1), (16, 2), (64, 8)])
def test_first_audio_reserve(slots: int, reserve: int) -> None:
    assert first_audio_reserve(slots) == reserve


def test_priority_is_bounded_and_defaults_to_first_audio() -> None:
    import msgspec

    request = GenerationRequest(request_id="r", prompt_token_ids=(1,), sampling=SamplingParams())
    assert request.priority == FIRST_AUDIO
    with pytest.raises(msgspec.ValidationError, match="priority"):
        msgspec.convert({"request_id": "r", "prompt_token_ids": [1], "sampling": {}, "priority": -1}, GenerationRequest)
