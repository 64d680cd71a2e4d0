"""Tests for long-text splitting and multi-speaker tags (flashtts_core.text)."""

from __future__ import annotations

import pytest

from flashtts_core.errors import InvalidRequestError
from flashtts_core.text import DialogueTurn, has_cjk, parse_multi_speaker, split_text


def chars(text: str) -> int:
    """A stand-in LLM token count: one token per non-space character."""
    return sum(1 for ch in text if not ch.isspace())


def words(text: str) -> int:
    return len(text.split())


def test_short_text_is_one_segment() -> None:
    assert split_text("  Hello there.  ", count_tokens=words, length_threshold=50, window_size=50) == ["Hello there."]


@pytest.mark.parametrize("text", ["", "   ", "。！", "...", " ?! "])
def test_nothing_to_speak_gives_no_segments(text: str) -> None:
    assert split_text(text, count_tokens=chars, length_threshold=50, window_size=50) == []


def test_english_sentences_are_packed_with_spaces() -> None:
    text = "One two three. Four five six! Seven eight nine? Ten eleven."
    segments = split_text(text, count_tokens=words, length_threshold=4, window_size=6)
    assert segments == ["One two three. Four five six!", "Seven eight nine? Ten eleven."]
    assert all(words(s) <= 6 for s in segments)


def test_chinese_sentences_are_packed_without_separator() -> None:
    text = "今天天气很好。我们去公园吧！你觉得怎么样？好的。"
    segments = split_text(text, count_tokens=chars, length_threshold=5, window_size=14)
    assert segments == ["今天天气很好。我们去公园吧！", "你觉得怎么样？好的。"]
    assert "".join(segments) == text
    assert all(chars(s) <= 14 for s in segments)


def test_long_sentence_is_cut_at_commas_then_hard() -> None:
    text = "这是一个很长的句子，没有句号但是有逗号，还有很多很多很多很多很多很多的字"
    segments = split_text(text, count_tokens=chars, length_threshold=5, window_size=10)
    assert all(chars(s) <= 10 for s in segments)
    assert "".join(segments) == text
    english = " ".join(["word"] * 30)
    segments = split_text(english, count_tokens=words, length_threshold=5, window_size=8)
    assert all(words(s) <= 8 for s in segments)
    assert " ".join(segments) == english


def test_decimals_and_times_are_not_sentence_ends() -> None:
    text = "Pi is 3.14 roughly. We meet at 10:30 today. Bye."
    segments = split_text(text, count_tokens=words, length_threshold=3, window_size=5)
    assert segments == ["Pi is 3.14 roughly.", "We meet at 10:30 today.", "Bye."]


def test_mixed_text_counts_as_chinese() -> None:
    assert has_cjk("hello 世界") and not has_cjk("hello world")
    segments = split_text("Hello世界。Good天气。", count_tokens=chars, length_threshold=2, window_size=8)
    assert segments == ["Hello世界。", "Good天气。"]  # joined without a space, like Chinese


def test_hard_cut_keeps_trailing_punctuation() -> None:
    segments = split_text("一二三四五六七八。", count_tokens=chars, length_threshold=2, window_size=4)
    assert segments == ["一二三四", "五六七八。"]


def test_punctuation_only_segments_are_dropped() -> None:
    segments = split_text("Hello there. !!! ... Bye now.", count_tokens=words, length_threshold=1, window_size=2)
    assert segments == ["Hello there.", "Bye now."]


def test_parse_multi_speaker() -> None:
    text = (
        "ignored <role:alice>Hi Bob.<role:bob,pitch:high>Hello!<role:carol,speed:low> "
        "<role:dan,pitch:low,speed:very_high>Yo"
    )
    assert parse_multi_speaker(text) == [
        DialogueTurn(name="alice", text="Hi Bob."),
        DialogueTurn(name="bob", text="Hello!", pitch="high"),
        DialogueTurn(name="dan", text="Yo", pitch="low", speed="very_high"),
    ]


def test_malformed_tag_stays_in_the_previous_dialogue() -> None:
    turns = parse_multi_speaker("<role:a>one<role:b, pitch:high>two")
    assert turns == [DialogueTurn(name="a", text="one<role:b, pitch:high>two")]


def test_invalid_level_is_reported() -> None:
    with pytest.raises(InvalidRequestError, match="pitch 'loud'"):
        parse_multi_speaker("<role:a,pitch:loud>hi")


def test_no_tags_gives_no_turns() -> None:
    assert parse_multi_speaker("just text") == []
