"""Text handling shared by every engine: long-text splitting and multi-speaker tags.

Splitting follows the original server: texts longer than ``length_threshold`` LLM tokens are cut after
sentence punctuation (Chinese and English) and the sentences packed greedily into segments of at most
``window_size`` tokens. Unlike the original, a single sentence longer than the window is cut further at
commas and, failing that, at whitespace/character boundaries, so no segment can overflow the context.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import msgspec

from flashtts_core.plugins.types import Level

__all__ = ("DialogueTurn", "has_cjk", "parse_multi_speaker", "split_text")

# Split after sentence punctuation. ASCII ``.``/``:`` etc. only count when no letter or digit follows, so decimals
# ("3.14"), times ("10:30") and abbreviations inside words stay whole: FlashTTS has no text normaliser that would have
# verbalised them first, as the original's WeTextProcessing step did.
_SENTENCE_END = re.compile(r"(?<=[。？！；：])|(?<=[;.!?:])(?![0-9A-Za-z])")
_CLAUSE_END = re.compile(r"(?<=[，,、])")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LEVELS = ("very_low", "low", "moderate", "high", "very_high")
_TAG = re.compile(r"<role:([^,>]+?)(?:,pitch:([^,>]+?))?(?:,speed:([^,>]+?))?>")


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def _only_punct(text: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PSZ" for ch in text)


def _pieces(text: str, pattern: re.Pattern[str]) -> list[str]:
    return [p.strip() for p in pattern.split(text) if p.strip()]


def _hard_cut(text: str, window: int, count: Callable[[str], int]) -> list[str]:
    """Cut a sentence with no usable punctuation into window-sized pieces (words for spaced text)."""
    units = text.split() if " " in text.strip() else list(text)
    joiner = " " if " " in text.strip() else ""
    out: list[str] = []
    current: list[str] = []
    for unit in units:
        candidate = joiner.join([*current, unit])
        # Punctuation never starts a piece (it would be dropped as a punctuation-only segment and lost).
        if current and count(candidate) > window and not _only_punct(unit):
            out.append(joiner.join(current))
            current = [unit]
        else:
            current.append(unit)
    if current:
        out.append(joiner.join(current))
    return out


def split_text(text: str, *, count_tokens: Callable[[str], int], length_threshold: int, window_size: int) -> list[str]:
    """Split ``text`` into segments of at most ``window_size`` tokens (one segment if it is short).

    Returns ``[]`` for text without anything to speak (empty, or only punctuation/symbols/space)."""
    text = text.strip()
    if not text:
        return []
    if _only_punct(text):
        return []
    if count_tokens(text) <= length_threshold:
        return [text]
    cjk = has_cjk(text)
    joiner = "" if cjk else " "
    sentences: list[str] = []
    for sentence in _pieces(text, _SENTENCE_END):
        if count_tokens(sentence) <= window_size:
            sentences.append(sentence)
            continue
        for clause in _pieces(sentence, _CLAUSE_END):
            if count_tokens(clause) <= window_size:
                sentences.append(clause)
            else:
                sentences.extend(_hard_cut(clause, window_size, count_tokens))
    segments: list[str] = []
    current = ""
    for sentence in sentences:
        candidate = f"{current}{joiner}{sentence}" if current else sentence
        if current and count_tokens(candidate) > window_size:
            segments.append(current)
            current = sentence
        else:
            current = candidate
    if current:
        segments.append(current)
    return [s for s in segments if s and not _only_punct(s)]


class DialogueTurn(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    text: str
    pitch: Level | None = None
    speed: Level | None = None


def parse_multi_speaker(text: str) -> list[DialogueTurn]:
    """Parse ``<role:NAME[,pitch:P][,speed:S]>dialogue`` tags. Text before the first tag is ignored, as in
    the original; invalid levels are reported by the caller through ``DialogueTurn`` validation."""
    turns: list[DialogueTurn] = []
    matches = list(_TAG.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        dialogue = text[match.end() : end].strip()
        if not dialogue:
            continue
        pitch, speed = (match.group(2) or "").strip() or None, (match.group(3) or "").strip() or None
        for label, value in (("pitch", pitch), ("speed", speed)):
            if value is not None and value not in _LEVELS:
                from flashtts_core.errors import InvalidRequestError

                raise InvalidRequestError(
                    f"<role:{match.group(1).strip()}> has {label} {value!r}; use one of {', '.join(_LEVELS)}",
                    param="text",
                )
        turns.append(DialogueTurn(name=match.group(1).strip(), text=dialogue, pitch=pitch, speed=speed))  # type: ignore[arg-type]
    return turns
