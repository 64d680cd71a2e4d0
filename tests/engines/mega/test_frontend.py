"""Numeric rules of the MegaTTS3 pipeline: phone ids, G2P prompt/parse, alignment, durations, loudness, joins."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from flashtts_core.engines.mega.frontend import (
    CROSSFADE_SAMPLES,
    CrossFader,
    ReferenceVoice,
    fix_durations,
    integrated_loudness,
    length_regulate,
    match_loudness,
    pad_prompt_wav,
    parse_alignment,
    parse_latent,
    postprocess_durations,
)
from flashtts_core.engines.mega.g2p import (
    PHONE_SIL,
    MegaG2PTokens,
    disable_english_tone,
    merge_phone,
    split_merged,
)
from flashtts_core.errors import CheckpointError, InvalidRequestError


def test_merged_phone_ids() -> None:
    # Chinese phone 3 tone 1 → 201, phone 100 tone 6 → 788; others keep their id with tone 3.
    assert split_merged([201, 788, 206, 145, 120]) == ([3, 100, 3, 145, 120], [4, 15, 15, 3, 3])
    for m in (201, 207, 500, 788, 120, 148):
        (phone,), (tone,) = split_merged([m])
        assert merge_phone(phone, tone) == m
    assert disable_english_tone([0, 3, 4, 5, 11, 15, 16]) == [0, 3, 4, 3, 11, 15, 3]


def test_g2p_tokens_from_the_tiny_tokenizer(mega_dir) -> None:  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(mega_dir / "g2p" / "tokenizer.json"))
    tokens = MegaG2PTokens.from_tokenizer(tok, (7,))
    start = tok.token_to_id("<Reserved_TTS_0>")
    assert tokens.speech_start == start and tokens.stop_ids == (start + 801, 7)
    ids = tokens.prompt_ids(tok, "Hi.")
    assert ids[-1] == start + PHONE_SIL
    assert ids[0] == tok.token_to_id("<BOT>") and ids[-2] == tok.token_to_id("<BOS>")
    assert len(tokens.allowed_ids) == 803
    # Parsed by id: the prompt's sil leads; non-phone ids and unknown merged ids are dropped; a stop id ends it.
    merged, dropped = tokens.parse([start + 120, 42, start + 205, start + 795, start + 801, start + 130])
    assert merged == [145, 120, 205] and dropped == 2
    with pytest.raises(CheckpointError, match="not MegaTTS3's"):
        MegaG2PTokens.from_tokenizer(Tokenizer.from_str(tok.to_str().replace("<BOT>", "<XYZ>")))


def test_alignment_parsing_and_duration_fix() -> None:
    phones, ends, dropped = parse_alignment([145, 812, 208, 840, 120, 163, 864, 900, 148, 830])
    # 120 had no timestamp, 900 (ts 100) had no phone... it follows 163's; 148's end goes backwards.
    assert phones == [145, 208, 163] and ends == [12, 40, 64] and dropped == 4
    assert fix_durations([12, 28, 24], 70) == [12, 28, 30]
    assert fix_durations([12, 28, 0, 24], 60) == [10, 27, 0, 23]  # round robin, zeros skipped
    assert sum(fix_durations([5, 0, 5], 3)) == 3
    assert length_regulate([2, 2, 3]).tolist() == [1, 1, 2, 2, 3, 3, 3]
    assert length_regulate([0, 2]).tolist() == [2, 2]


def test_duration_post_rules() -> None:
    rng = np.random.default_rng(0)
    kwargs = {"code_size": 128, "dur_disturb": 0.0, "dur_alpha": 1.0, "frames_multiple": 8, "rng": rng}
    phones = [145, 120, 163, 130, 148]
    out = postprocess_durations([5, 5, 5, 5, 5], phones, is_first=True, is_final=True, **kwargs)
    assert out[0] == 8 and out[1] == 4 and out[2] == 32 and out[3] == 4 and out[4] >= 64
    assert sum(out) % 8 == 0
    mid = postprocess_durations([5, 5, 5, 5, 0], [120, 130, 110, 112, 121], is_first=False, is_final=False, **kwargs)
    assert mid[:4] == [4, 4, 4, 4] and mid[4] in range(32, 40) and sum(mid) % 8 == 0  # +32 cross-fade room
    assert postprocess_durations([200], [120], is_first=False, is_final=True, **kwargs) == [128 - 1 + 1]
    slow = postprocess_durations([11, 11], [120, 130], is_first=False, is_final=False, **{**kwargs, "dur_alpha": 2.0})
    assert slow[0] == 20
    assert postprocess_durations([], [], is_first=True, is_final=True, **kwargs) == []
    jitter = postprocess_durations(
        [101] * 50, [120] * 50, is_first=False, is_final=False, **{**kwargs, "dur_disturb": 0.1}
    )
    assert all(90 <= d <= 127 for d in jitter[:-1]) and len(set(jitter)) > 3


def test_prompt_padding() -> None:
    assert len(pad_prompt_wav(np.zeros(100, np.float32), 960)) == 959 + 12000
    assert len(pad_prompt_wav(np.zeros(959, np.float32), 960)) == 959 + 12000
    assert len(pad_prompt_wav(np.zeros(960, np.float32), 960)) == 960 + 959 + 12000


def test_loudness_bs1770() -> None:
    t = np.arange(24000 * 5) / 24000
    sine = np.sin(2 * np.pi * 997 * t)
    # A full-scale 997 Hz sine is -3.01 LUFS with the standard's 48 kHz filter; the cookbook design used at every
    # rate (as pyloudnorm does) is within 0.1 LU of it.
    full = integrated_loudness(sine)
    assert full == pytest.approx(-3.01, abs=0.1)
    assert integrated_loudness(0.5 * sine) == pytest.approx(full - 20 * math.log10(2), abs=1e-6)
    assert integrated_loudness(np.zeros(24000)) is None and integrated_loudness(sine[:1000]) is None
    # Silence around the tone is gated out.
    padded = np.concatenate([np.zeros(24000 * 3), 0.5 * sine])
    assert integrated_loudness(padded) == pytest.approx(integrated_loudness(0.5 * sine), abs=0.25)
    quiet = match_loudness(0.1 * sine, -20.0)
    assert integrated_loudness(quiet) == pytest.approx(-20.0, abs=0.01)
    loud = match_loudness(0.1 * sine, 0.0)
    assert np.abs(loud).max() == pytest.approx(0.95)


def test_crossfade_joins_like_the_original() -> None:
    rng = np.random.default_rng(1)
    segments = [rng.standard_normal(n).astype(np.float32) for n in (10000, 9000, 8000)]
    window = np.hanning(2 * CROSSFADE_SAMPLES)
    expected = segments[0]
    for seg in segments[1:]:
        overlap = (
            expected[-CROSSFADE_SAMPLES:] * window[CROSSFADE_SAMPLES:]
            + seg[:CROSSFADE_SAMPLES] * window[:CROSSFADE_SAMPLES]
        )
        expected = np.concatenate([expected[:-CROSSFADE_SAMPLES], overlap, seg[CROSSFADE_SAMPLES:]])
    fader = CrossFader()
    out = []
    for seg in segments:  # fed in pieces, as a stream would
        fader.start_segment()
        for i, piece in enumerate(np.array_split(seg, 3)):
            out.append(fader.push(piece, segment_end=i == 2))
    out.append(fader.finish())
    np.testing.assert_allclose(np.concatenate(out), expected, atol=1e-6)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_latent_file_validation() -> None:
    good = np.zeros((1, 10, 32), np.float32)
    assert parse_latent(_npy(good)).shape == (10, 32)
    assert parse_latent(_npy(good.astype(np.float64))).dtype == np.float32
    cases = [
        (None, "no latent file given"),
        (b"garbage", "not a readable .npy"),
        (_npy(np.zeros((10, 32), np.float32)), r"shape \(10, 32\), expected \(1, T, 32\)"),
        (_npy(np.zeros((1, 10, 16), np.float32)), r"expected \(1, T, 32\)"),
        (_npy(np.zeros((1, 10, 32), np.int16)), "float array"),
        (_npy(np.full((1, 2, 32), np.nan, np.float32)), "NaN"),
    ]
    for data, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as info:
            parse_latent(data)
        assert info.value.param == "latent_file"
        assert "MegaTTS3 authors" in info.value.message


def test_reference_voice_round_trip() -> None:
    latent = np.arange(4 * 32, dtype=np.float32).reshape(4, 32)
    voice = ReferenceVoice((145, 3), (3, 4), (8, 8), latent, -23.5)
    import msgspec

    data = msgspec.json.decode(msgspec.json.encode(voice.to_data()))
    back = ReferenceVoice.from_data(data)
    assert back.phones == voice.phones and back.durations == voice.durations and back.loudness == -23.5
    np.testing.assert_array_equal(back.latent, latent)
    with pytest.raises(ValueError):
        ReferenceVoice.from_data({**data, "durations": [8, 9]})


def test_loudness_gating_with_the_standard_48k_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the coefficients tabulated in BS.1770 the gating/averaging gives exactly -3.01 for the reference sine."""
    import flashtts_core.engines.mega.frontend as frontend

    x = np.zeros(16384)
    x[0] = 1.0
    for b, a in (
        ([1.53512485958697, -2.69169618940638, 1.19839281085285], [1.0, -1.69065929318241, 0.73248077421585]),
        ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621]),
    ):
        y = np.zeros_like(x)
        for n in range(x.size):
            y[n] = sum(b[k] * x[n - k] for k in range(3) if n >= k) - sum(a[k] * y[n - k] for k in (1, 2) if n >= k)
        x = y
    monkeypatch.setitem(frontend._IR_CACHE, 48000, x)
    t = np.arange(48000 * 3) / 48000
    assert integrated_loudness(np.sin(2 * np.pi * 997 * t), 48000) == pytest.approx(-3.0103, abs=2e-3)
