"""Token map by name, the 7-slot frame layout (codes ↔ ids ↔ SNAC codebooks) and the frame parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flashtts_core.engines.orpheus.tokens import (
    CODEBOOK_SIZE,
    FrameParser,
    OrpheusTokens,
    custom_token,
    frames_to_snac_codes,
    snac_codes_to_frames,
)
from flashtts_core.errors import CheckpointError

# The real checkpoint's layout (models.md §B.2), used where no tokenizer is needed.
REAL = OrpheusTokens(custom_base=128256, begin_of_text=128000, eot=128009, eos=(128001,))


class _Vocab:
    """Minimal stand-in for ``tokenizers.Tokenizer.token_to_id`` (tests of the by-name lookup only)."""

    def __init__(self, ids: dict[str, int]) -> None:
        self.ids = ids

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)


def _vocab(base: int, count: int = 28684) -> dict[str, int]:
    ids = {custom_token(n): base + n for n in range(count)}
    ids.update({"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 9})
    return ids


def test_real_layout_matches_the_published_ids() -> None:
    assert (REAL.start_of_speech, REAL.end_of_speech, REAL.start_of_human, REAL.end_of_human) == (
        128257,
        128258,
        128259,
        128260,
    )
    assert (REAL.start_of_ai, REAL.end_of_ai, REAL.audio_base) == (128261, 128262, 128266)
    assert REAL.audio_ids == range(128266, 128266 + 7 * 4096)
    assert REAL.stop_ids == (128258, 128262, 128001)


def test_from_tokenizer_looks_ids_up_by_name() -> None:
    tokens = OrpheusTokens.from_tokenizer(_Vocab(_vocab(500)))  # type: ignore[arg-type]
    assert tokens.custom_base == 500 and tokens.audio_base == 510 and tokens.begin_of_text == 0 and tokens.eot == 9


def test_from_tokenizer_rejects_missing_or_gapped_custom_tokens() -> None:
    with pytest.raises(CheckpointError, match="custom_token_0"):
        OrpheusTokens.from_tokenizer(_Vocab({"<|begin_of_text|>": 0}))  # type: ignore[arg-type]
    gapped = _vocab(500)
    gapped[custom_token(4000)] = 99
    with pytest.raises(CheckpointError, match=r"not contiguous.*<custom_token_4000>=99"):
        OrpheusTokens.from_tokenizer(_Vocab(gapped))  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="<custom_token_28000>=missing"):
        OrpheusTokens.from_tokenizer(_Vocab(_vocab(500, count=28000)))  # type: ignore[arg-type]


def test_tiny_checkpoint_tokens_and_prompt(orpheus_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(orpheus_dir / "tokenizer.json"))
    tokens = OrpheusTokens.from_tokenizer(tok, orpheus_dir)
    assert tokens.custom_base == tok.token_to_id("<custom_token_0>") != 128256  # not the hard-wired number
    assert tokens.audio_base == tok.token_to_id("<custom_token_10>")
    assert tokens.eos == (tok.token_to_id("<|end_of_text|>"),)
    text_ids = tok.encode("tara: hi <laugh> there", add_special_tokens=False).ids
    prompt = tokens.prompt_ids(text_ids)
    expected = (
        "<custom_token_3><|begin_of_text|>tara: hi <laugh> there<|eot_id|><custom_token_4><custom_token_5>"
        "<custom_token_1>"
    )
    # The string form of the original server, tokenised without special tokens, gives the same ids: one BOS only.
    assert list(prompt) == tok.encode(expected, add_special_tokens=False).ids
    assert prompt.count(tokens.begin_of_text) == 1 and prompt[1] == tokens.begin_of_text


@pytest.mark.parametrize(
    "frame",
    [(0, 0, 0, 0, 0, 0, 0), (4095,) * 7, (0, 4095, 1, 2048, 4094, 17, 0), (12, 1, 0, 4095, 3, 0, 99)],
)
def test_frame_round_trip_codes_ids_codes(frame: tuple[int, ...]) -> None:
    ids = REAL.frame_to_ids(frame)
    assert ids == tuple(REAL.audio_base + slot * CODEBOOK_SIZE + code for slot, code in enumerate(frame))
    parser = FrameParser(REAL)
    assert parser.feed(ids) == [frame]
    assert (parser.frames, parser.malformed_frames, parser.dropped_tokens) == (1, 0, 0)


def test_frame_to_ids_rejects_codes_outside_the_codebook() -> None:
    with pytest.raises(ValueError, match="4096"):
        REAL.frame_to_ids((0, 0, 0, 0, 0, 0, 4096))
    with pytest.raises(ValueError, match="-1"):
        REAL.frame_to_ids((-1, 0, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="7 codes"):
        REAL.frame_to_ids((0, 0))


def test_snac_codebook_layout_and_inverse() -> None:
    frames = np.array([[[1, 2, 3, 4, 5, 6, 7], [10, 20, 30, 40, 50, 60, 70]]])  # (B=1, F=2, 7)
    c0, c1, c2 = frames_to_snac_codes(frames)
    assert c0.tolist() == [[1, 10]]
    assert c1.tolist() == [[2, 5, 20, 50]]
    assert c2.tolist() == [[3, 4, 6, 7, 30, 40, 60, 70]]
    assert np.array_equal(snac_codes_to_frames(c0, c1, c2), frames)
    rng = np.random.default_rng(0)
    many = rng.integers(0, 4096, size=(3, 9, 7))
    assert np.array_equal(snac_codes_to_frames(*frames_to_snac_codes(many)), many)
    with pytest.raises(ValueError):
        snac_codes_to_frames(c0, c1[:, :3], c2)


def test_parser_handles_deltas_split_anywhere() -> None:
    frames = [(i, 4095 - i, 0, i, 7, 4095, i % 3) for i in range(5)]
    ids = [i for f in frames for i in REAL.frame_to_ids(f)]
    parser = FrameParser(REAL)
    out = []
    for start in range(0, len(ids), 3):  # deltas of 3 ids never align with frames of 7
        out.extend(parser.feed(ids[start : start + 3]))
    assert out == frames and parser.finish() == 0


def test_wrong_slot_token_costs_exactly_its_frame() -> None:
    good = [(1, 2, 3, 4, 5, 6, 7), (0, 0, 0, 0, 0, 0, 0), (9, 9, 9, 9, 9, 9, 9)]
    ids = [list(REAL.frame_to_ids(f)) for f in good]
    ids[1][3] = REAL.audio_base + 4 * CODEBOOK_SIZE + 11  # slot-4 token where slot 3 belongs
    parser = FrameParser(REAL)
    out = parser.feed([i for f in ids for i in f])
    assert out == [good[0], good[2]]  # the frame after the bad one keeps its alignment
    assert parser.malformed_frames == 1 and parser.dropped_tokens == 7


def test_non_audio_and_out_of_range_ids_are_reported_not_misaligned() -> None:
    frame = (5, 4, 3, 2, 1, 0, 4095)
    ids = list(REAL.frame_to_ids(frame))
    stream = [
        *ids[:2],
        REAL.eot,  # a text token interrupts a frame
        REAL.audio_base + 7 * CODEBOOK_SIZE,  # one past the last audio id ("code 4096" of slot 6)
        REAL.audio_base - 1,
        *ids,
    ]
    parser = FrameParser(REAL)
    assert parser.feed(stream) == [frame]
    assert parser.malformed_frames == 1 and parser.dropped_tokens == 2 + 3


def test_resync_waits_for_slot_zero_and_finish_reports_the_tail() -> None:
    frame = (1, 1, 1, 1, 1, 1, 1)
    ids = REAL.frame_to_ids(frame)
    parser = FrameParser(REAL)
    assert parser.feed([*ids[3:], *ids, *ids[:4]]) == [frame]  # stray slots 3..6 dropped one by one
    assert parser.dropped_tokens == 4 and parser.malformed_frames == 0
    assert parser.finish() == 4 and parser.finish() == 0
