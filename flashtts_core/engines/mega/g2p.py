"""Phone and tone ids of MegaTTS3, and the G2P prompt/parse that runs through the LLM backend.

**Merged ids** (models.md §C.4.2) are what the aligner and the G2P model speak: a Chinese phone (phone-dict id
3..100) with tone t ∈ 1..6 is ``200 + (id − 3)·6 + t`` (201..788); every other phone keeps its dict id (3..173,
punctuation 146..173). Splitting a merged id gives the DiT's ``(phone, tone)``: tone id 4 for tone 1, ``t + 9``
(11..15) for tones 2..6, and 3 ("no tone", English and punctuation) otherwise.

**G2P** (§C.2.2, §C.6): ``g2p/`` is a Qwen2 causal LM whose vocabulary is extended with ``<Reserved_TTS_k>``; token
``<Reserved_TTS_0>`` (``speech_start``) + m means merged id m. The prompt is
``tokenizer("<BOT>" + text + "<BOS>").input_ids + [speech_start + 145]`` (145 = ``sil``) and generation stops at
``speech_start + 801``. Every id is looked up in the tokenizer by name — the published checkpoint's absolute stop id
152468 only holds for its own vocabulary. Output is parsed from **token ids** (never from decoded text), and the
prompt's leading ``sil`` is part of the phone sequence, as in the original, which slices the output from the
position of that last prompt token (this is what the "first phone = 8 frames" rule of the duration post-processing
acts on).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import msgspec

from flashtts_core.errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = (
    "CHINESE_PHONES",
    "CLAUSE_PHONES",
    "G2P_STOP_OFFSET",
    "PHONE_SIL",
    "RESERVED_TOKEN",
    "SENTENCE_END_PHONES",
    "TONE_NONE",
    "MegaG2PTokens",
    "disable_english_tone",
    "is_valid_merged",
    "merge_phone",
    "split_merged",
)

logger = logging.getLogger(__name__)

RESERVED_TOKEN = "<Reserved_TTS_{}>"
G2P_BEGIN = "<BOT>"
G2P_END = "<BOS>"
PHONE_SIL = 145  # silence phone (also the last prompt token of the G2P)
G2P_STOP_OFFSET = 801  # merged id that ends the G2P output
RESERVED_COUNT = 802  # <Reserved_TTS_0> .. <Reserved_TTS_801>
CHINESE_PHONES = range(3, 101)  # phone-dict ids that carry a tone
_MERGED_CHINESE = range(201, 789)
_PLAIN_PHONES = range(3, 174)  # 171 phones (ids 0..2 are reserved)
TONE_NONE = 3
SENTENCE_END_PHONES = frozenset({148, 153, 166, PHONE_SIL})  # '。' '！' '？' sil: at least 64 frames
CLAUSE_PHONES = frozenset({163, 165})  # '，' '；': at least 32 frames
_TONED = frozenset({0, 4, 11, 12, 13, 14, 15})


def is_valid_merged(merged: int) -> bool:
    """Whether ``merged`` is a phone the DiT and the duration LM know (a toned Chinese phone or a plain phone)."""
    return merged in _MERGED_CHINESE or merged in _PLAIN_PHONES


def merge_phone(phone: int, tone: int) -> int:
    """Inverse of :func:`split_merged` for one phone (tone id 4 or 11..15 on a Chinese phone; else the phone)."""
    if phone in CHINESE_PHONES and (tone == 4 or 11 <= tone <= 15):
        t = 1 if tone == 4 else tone - 9
        return 200 + (phone - 3) * 6 + t
    return phone


def split_merged(merged: Iterable[int]) -> tuple[list[int], list[int]]:
    """Merged ids → (phone ids, tone ids), one pair per id."""
    phones: list[int] = []
    tones: list[int] = []
    for m in merged:
        if m in _MERGED_CHINESE:
            phones.append((m - 201) // 6 + 3)
            t = (m - 201) % 6 + 1
            tones.append(4 if t == 1 else t + 9)
        else:
            phones.append(int(m))
            tones.append(TONE_NONE)
    return phones, tones


def disable_english_tone(tones: Sequence[int]) -> list[int]:
    """The DiT sees tone 3 for everything but the Chinese tones (and padding 0), as the original does."""
    return [t if t in _TONED else TONE_NONE for t in tones]


class MegaG2PTokens(msgspec.Struct, frozen=True, kw_only=True):
    """The G2P model's token ids, read from its tokenizer (never hard-coded)."""

    speech_start: int  # id of <Reserved_TTS_0>
    stop_ids: tuple[int, ...]  # <Reserved_TTS_801> first, then the tokenizer's eos ids

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, eos_ids: Sequence[int] = ()) -> MegaG2PTokens:
        """Check that ``<Reserved_TTS_0..801>`` are consecutive ids and ``<BOT>``/``<BOS>`` exist."""
        first = tokenizer.token_to_id(RESERVED_TOKEN.format(0))
        last = tokenizer.token_to_id(RESERVED_TOKEN.format(RESERVED_COUNT - 1))
        problems = []
        if first is None or last is None or last - first != RESERVED_COUNT - 1:
            problems.append(
                f"{RESERVED_TOKEN.format(0)} .. {RESERVED_TOKEN.format(RESERVED_COUNT - 1)} are missing or not "
                "consecutive"
            )
        for token in (G2P_BEGIN, G2P_END):
            if tokenizer.token_to_id(token) is None:
                problems.append(f"{token} is not a token")
        if problems or first is None:
            raise CheckpointError("the g2p tokenizer is not MegaTTS3's: " + "; ".join(problems))
        stop = first + G2P_STOP_OFFSET
        return cls(speech_start=first, stop_ids=(stop, *(i for i in eos_ids if i != stop)))

    @property
    def allowed_ids(self) -> frozenset[int]:
        """Every phone token plus the stop ids: keeps sampling inside the phone vocabulary."""
        return frozenset(range(self.speech_start, self.speech_start + RESERVED_COUNT)) | frozenset(self.stop_ids)

    def prompt_ids(self, tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
        """``<BOT>`` + text + ``<BOS>`` (tokenizer defaults) + the ``sil`` phone token."""
        ids = tokenizer.encode(G2P_BEGIN + text + G2P_END).ids
        return (*ids, self.speech_start + PHONE_SIL)

    def parse(self, token_ids: Iterable[int]) -> tuple[list[int], int]:
        """Generated ids → merged phone ids (led by the prompt's ``sil``) and the number of ids dropped (not a phone
        token, or a merged id no model knows). Parsing stops at a stop id, should the backend pass one through."""
        merged = [PHONE_SIL]
        dropped = 0
        stops = set(self.stop_ids)
        for tid in token_ids:
            if tid in stops:
                break
            m = tid - self.speech_start
            if 0 <= m < RESERVED_COUNT and is_valid_merged(m):
                merged.append(m)
            else:
                dropped += 1
        return merged, dropped
