"""The Orpheus token map and the 7-slot audio frame layout (models.md §B.2–B.4).

Why by name: the published checkpoints put ``<custom_token_N>`` at ``128256 + N``, and the original code hard-wires
those numbers (128257, 128266, ...). Every id here is looked up in the tokenizer by its *string* instead, so the
engine works with any tokenizer that keeps the custom tokens contiguous (the real one, the tiny test one whose
``<custom_token_0>`` sits near id 400, a re-packed vocabulary) and fails loudly with a
:class:`~flashtts_core.errors.CheckpointError` when the layout is not what the model was trained with.

Audio tokens: ``<custom_token_{10 + k·4096 + code}>`` for slot ``k`` (0..6) of a frame and ``code`` in [0, 4096).
A frame ``f = [a, b, c, d, e, g, h]`` feeds SNAC's three codebooks (rates 1:2:4) as
``L0 = [a]``, ``L1 = [b, e]``, ``L2 = [c, d, g, h]``. Unlike the original parser (which tests ``code > 0`` and so
drops a genuine code 0 and shifts every later slot, and lets code 4096 through), :class:`FrameParser` derives the
slot from the id, accepts code 0, never accepts an out-of-range id and reports (instead of silently mis-aligning)
frames whose tokens arrive in the wrong slot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashtts_core.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

__all__ = (
    "AUDIO_TOKEN_OFFSET",
    "CODEBOOK_SIZE",
    "FRAME_SLOTS",
    "FrameParser",
    "OrpheusTokens",
    "custom_token",
    "frames_to_snac_codes",
    "snac_codes_to_frames",
)

logger = logging.getLogger(__name__)

#: Tokens per audio frame (1 + 2 + 4 codes of SNAC's three codebooks).
FRAME_SLOTS = 7
#: Codes per SNAC codebook; also the id stride between two frame slots.
CODEBOOK_SIZE = 4096
#: ``<custom_token_10>`` is the first audio token (code 0 of slot 0).
AUDIO_TOKEN_OFFSET = 10
#: Number of ``<custom_token_N>`` the engine needs (markers 0..9 + 7·4096 audio tokens).
REQUIRED_CUSTOM_TOKENS = AUDIO_TOKEN_OFFSET + FRAME_SLOTS * CODEBOOK_SIZE

# Slot → (codebook, position inside the frame's share of that codebook); see the module docstring.
_L1_SLOTS = (1, 4)
_L2_SLOTS = (2, 3, 5, 6)


def custom_token(n: int) -> str:
    """The string of Orpheus' ``n``-th custom token."""
    return f"<custom_token_{n}>"


@dataclass(frozen=True)
class OrpheusTokens:
    """Ids of the Orpheus prompt markers, stop tokens and audio tokens of one tokenizer.

    ``custom_base`` is the id of ``<custom_token_0>``; marker ``N`` is ``custom_base + N`` (verified by name for
    every token the engine uses, so the arithmetic below is only a shortcut).
    """

    custom_base: int
    begin_of_text: int
    eot: int
    eos: tuple[int, ...] = ()

    # --- markers (models.md §B.2) --------------------------------------------------------------------------------

    @property
    def start_of_speech(self) -> int:
        return self.custom_base + 1

    @property
    def end_of_speech(self) -> int:
        return self.custom_base + 2

    @property
    def start_of_human(self) -> int:
        return self.custom_base + 3

    @property
    def end_of_human(self) -> int:
        return self.custom_base + 4

    @property
    def start_of_ai(self) -> int:
        return self.custom_base + 5

    @property
    def end_of_ai(self) -> int:
        return self.custom_base + 6

    @property
    def audio_base(self) -> int:
        """Id of code 0 in slot 0 (``<custom_token_10>``)."""
        return self.custom_base + AUDIO_TOKEN_OFFSET

    @property
    def audio_ids(self) -> range:
        """All 7 × 4096 audio token ids."""
        return range(self.audio_base, self.audio_base + FRAME_SLOTS * CODEBOOK_SIZE)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """What ends a generation: end of speech, end of the AI turn and the tokenizer's eos id(s)."""
        out = [self.end_of_speech, self.end_of_ai]
        out.extend(i for i in self.eos if i not in out)
        return tuple(out)

    # --- prompt ----------------------------------------------------------------------------------------------

    def prompt_ids(self, text_ids: Sequence[int]) -> tuple[int, ...]:
        """``<custom_token_3><|begin_of_text|>{text}<|eot_id|><custom_token_4><custom_token_5><custom_token_1>``.

        ``text_ids`` is ``"{voice}: {text}"`` tokenised *without* special tokens (no BOS of its own); the single BOS
        is placed after start-of-human exactly as in the original prompt (reference-behaviour §3.5.2).
        """
        return (
            self.start_of_human,
            self.begin_of_text,
            *text_ids,
            self.eot,
            self.end_of_human,
            self.start_of_ai,
            self.start_of_speech,
        )

    # --- frames ------------------------------------------------------------------------------------------------

    def frame_to_ids(self, frame: Sequence[int]) -> tuple[int, ...]:
        """The 7 token ids of one frame of codes (slot order). Raises ``ValueError`` for codes outside [0, 4096)."""
        if len(frame) != FRAME_SLOTS:
            raise ValueError(f"a frame has {FRAME_SLOTS} codes, got {len(frame)}")
        out = []
        for slot, code in enumerate(frame):
            code = int(code)
            if not 0 <= code < CODEBOOK_SIZE:
                raise ValueError(f"code {code} in slot {slot} is outside [0, {CODEBOOK_SIZE})")
            out.append(self.audio_base + slot * CODEBOOK_SIZE + code)
        return tuple(out)

    def split_audio_id(self, token_id: int) -> tuple[int, int] | None:
        """``(slot, code)`` of an audio token id, or ``None`` for any other id."""
        offset = token_id - self.audio_base
        if 0 <= offset < FRAME_SLOTS * CODEBOOK_SIZE:
            slot, code = divmod(offset, CODEBOOK_SIZE)
            return slot, code
        return None

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, model_dir: Path | None = None) -> OrpheusTokens:
        """Look every needed token up by name and verify the custom tokens are contiguous.

        ``model_dir`` (optional) supplies the eos id(s) from ``config.json`` / ``generation_config.json`` /
        ``tokenizer_config.json``; the ``tokenizers`` library alone does not know which token ends a sequence.
        """

        def lookup(token: str) -> int:
            idx = tokenizer.token_to_id(token)
            if idx is None:
                raise CheckpointError(
                    f"the tokenizer has no {token!r} token; this is not an Orpheus checkpoint "
                    "(point --model_path at an Orpheus-TTS download)"
                )
            return int(idx)

        base = lookup(custom_token(0))
        bad = []
        for n in range(1, REQUIRED_CUSTOM_TOKENS):
            idx = tokenizer.token_to_id(custom_token(n))
            if idx != base + n:
                bad.append(f"{custom_token(n)}={'missing' if idx is None else idx}")
                if len(bad) >= 5:
                    break
        if bad:
            raise CheckpointError(
                f"the tokenizer's custom tokens are not contiguous from <custom_token_0>={base} "
                f"(expected <custom_token_N> = {base} + N for N < {REQUIRED_CUSTOM_TOKENS}; found {', '.join(bad)}); "
                "use the checkpoint's own tokenizer.json"
            )
        eos: list[int] = []
        if model_dir is not None:
            for idx in _eos_ids(model_dir, tokenizer):
                if idx not in eos:
                    eos.append(idx)
        return cls(
            custom_base=base, begin_of_text=lookup("<|begin_of_text|>"), eot=lookup("<|eot_id|>"), eos=tuple(eos)
        )


def _eos_ids(model_dir: Path, tokenizer: Tokenizer) -> Iterable[int]:
    """eos ids named by the checkpoint's json files (ints, lists or a token string); unreadable files are skipped."""

    def read(name: str) -> dict[str, Any]:
        try:
            data = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    for name in ("config.json", "generation_config.json"):
        value = read(name).get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and not isinstance(item, bool):
                yield item
    token = read("tokenizer_config.json").get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str):
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            yield int(idx)


class FrameParser:
    """Incrementally turns generated ids into complete 7-code frames, reporting (never hiding) malformed ones.

    Each id's slot is derived from the id itself (``(id − audio_base) // 4096``) and must equal the next expected
    slot. On a mismatch (an id for another slot, or a non-audio id) the partial frame is dropped and counted as
    malformed, and parsing re-synchronises at the next slot-0 token; so one bad token costs exactly the frame it
    belongs to and can never shift the slots of the frames after it. Code 0 and 4095 are ordinary codes.
    """

    def __init__(self, tokens: OrpheusTokens) -> None:
        self.tokens = tokens
        self._partial: list[int] = []
        #: Complete frames produced so far.
        self.frames = 0
        #: Frames abandoned because a token arrived in the wrong slot (or a non-audio token interrupted them).
        self.malformed_frames = 0
        #: Tokens dropped (those of abandoned frames, and stray tokens outside any frame).
        self.dropped_tokens = 0

    def feed(self, token_ids: Iterable[int]) -> list[tuple[int, ...]]:
        """Consume ids; return the frames they completed (each a tuple of 7 codes in slot order)."""
        out: list[tuple[int, ...]] = []
        partial = self._partial
        for token_id in token_ids:
            parsed = self.tokens.split_audio_id(token_id)
            if parsed is not None and parsed[0] == len(partial):
                partial.append(parsed[1])
                if len(partial) == FRAME_SLOTS:
                    out.append(tuple(partial))
                    partial.clear()
                continue
            if partial:
                self.malformed_frames += 1
                self.dropped_tokens += len(partial)
                partial.clear()
            if parsed is not None and parsed[0] == 0:
                partial.append(parsed[1])
            else:
                self.dropped_tokens += 1
        self.frames += len(out)
        return out

    def finish(self) -> int:
        """End of the stream: drop an incomplete last frame (e.g. cut by max_tokens); return its token count."""
        tail = len(self._partial)
        self._partial.clear()
        return tail


def frames_to_snac_codes(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames ``(B, F, 7)`` → SNAC codes ``[c0 (B, F), c1 (B, 2F), c2 (B, 4F)]`` (int64).

    For frame ``j``: ``c0[j] = f0``; ``c1[2j], c1[2j+1] = f1, f4``; ``c2[4j..4j+3] = f2, f3, f5, f6``.
    """
    import numpy as np

    frames = np.asarray(frames, dtype=np.int64)
    if frames.ndim != 3 or frames.shape[2] != FRAME_SLOTS:
        raise ValueError(f"frames must have shape (B, F, {FRAME_SLOTS}), got {frames.shape}")
    batch, count = frames.shape[:2]
    c0 = frames[:, :, 0]
    c1 = frames[:, :, list(_L1_SLOTS)].reshape(batch, 2 * count)
    c2 = frames[:, :, list(_L2_SLOTS)].reshape(batch, 4 * count)
    return c0, c1, c2


def snac_codes_to_frames(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Inverse of :func:`frames_to_snac_codes`: ``c0 (B, F)``, ``c1 (B, 2F)``, ``c2 (B, 4F)`` → frames ``(B, F, 7)``."""
    import numpy as np

    c0, c1, c2 = (np.asarray(c, dtype=np.int64) for c in (c0, c1, c2))
    batch, count = c0.shape
    if c1.shape != (batch, 2 * count) or c2.shape != (batch, 4 * count):
        raise ValueError(f"codebook shapes {c0.shape}, {c1.shape}, {c2.shape} do not form whole frames")
    frames = np.empty((batch, count, FRAME_SLOTS), dtype=np.int64)
    frames[:, :, 0] = c0
    frames[:, :, list(_L1_SLOTS)] = c1.reshape(batch, count, 2)
    frames[:, :, list(_L2_SLOTS)] = c2.reshape(batch, count, 4)
    return frames
