"""Reference processing and the numeric rules around the MegaTTS3 models (no model code here).

A MegaTTS3 voice is a pair: the reference audio and the WaveVAE latent of that same audio (a ``.npy`` of shape
``(1, T, 32)``, 25 Hz), because the WaveVAE encoder is not published. :func:`prepare_reference` turns the pair into a
:class:`ReferenceVoice` (models.md §C.4 steps 1–3, reference-behaviour §3.6.2):

1. the 24 kHz audio is padded to the ``win_size`` grid plus 12000 zero samples, and its integrated loudness measured
   (ITU-R BS.1770, :func:`integrated_loudness`);
2. the aligner reads its Whisper log-mel (16 kHz) and writes phones with end timestamps; durations are fixed to sum
   to the mel length (a multiple of ``frames_multiple``);
3. the latent is cut to ``mel frames / 4``. A latent a bit shorter than the padded audio (e.g. computed without the
   padding) shortens the prompt instead; one far shorter than the audio is refused.

Also here: the duration post-rules (§C.4 step 6), the length regulator, and the 0.16 s Hann cross-fade between
segments (§C.4 step 9).
"""

from __future__ import annotations

import base64
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flashtts_core.engines.mega.config import (
    ALIGNER_END,
    ALIGNER_START,
    ALIGNER_TIMESTAMP_BASE,
    LATENT_FRAME_SAMPLES,
    MEL_FRAMES_PER_LATENT,
    SAMPLE_RATE,
)
from flashtts_core.engines.mega.g2p import (
    CLAUSE_PHONES,
    SENTENCE_END_PHONES,
    is_valid_merged,
    split_merged,
)
from flashtts_core.errors import AudioDecodeError, InvalidRequestError

if TYPE_CHECKING:
    from flashtts_core.engines.mega.loading import MegaModels

__all__ = (
    "CROSSFADE_SAMPLES",
    "LATENT_HELP",
    "PROMPT_TAIL_SAMPLES",
    "CrossFader",
    "ReferenceVoice",
    "fix_durations",
    "integrated_loudness",
    "length_regulate",
    "match_loudness",
    "pad_prompt_wav",
    "parse_alignment",
    "parse_latent",
    "postprocess_durations",
    "prepare_reference",
)

logger = logging.getLogger(__name__)

PROMPT_TAIL_SAMPLES = 12000  # zeros appended to the prompt wav (0.5 s)
CROSSFADE_SAMPLES = 3840  # 0.16 s at 24 kHz
LATENT_HELP = (
    "MegaTTS3 voices need the WaveVAE latent (.npy, float32, shape (1, T, 32)) of the same reference clip, because "
    "the WaveVAE encoder is not published; get latents for your clips from the MegaTTS3 authors (see the "
    "ByteDance/MegaTTS3 README) and upload the file as latent_file"
)
#: A latent covering less than this share of the (unpadded) reference audio belongs to another clip.
_MIN_LATENT_COVERAGE = 0.8
_LUFS_BLOCK = 0.4  # s (BS.1770 gating block)
_LUFS_STEP = 0.1  # s (75 % overlap)
_LUFS_ABS_GATE = -70.0
_LUFS_REL_GATE = -10.0
_K_WEIGHTING_IR = 16384  # samples of the K-weighting impulse response (the filters decay to < 1e-9 long before)


# --- audio preparation and loudness --------------------------------------------------------------------------------


def pad_prompt_wav(wav: np.ndarray, win_size: int) -> np.ndarray:
    """Pad so that ``len % win_size == win_size - 1`` (when shorter), then append 12000 zeros (§C.4 step 1)."""
    wav = np.asarray(wav, dtype=np.float32)
    rem = len(wav) % win_size
    if rem < win_size - 1:
        wav = np.pad(wav, (0, win_size - 1 - rem))
    return np.pad(wav, (0, PROMPT_TAIL_SAMPLES)).astype(np.float32)


def _biquad_coefficients(kind: str, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """The two K-weighting stages of BS.1770 (as pyloudnorm designs them for any rate): a +4 dB high shelf at 1.5 kHz
    (Q 1/√2) and a 38 Hz high pass (Q 0.5), from the RBJ cookbook formulas."""
    if kind == "shelf":
        gain_db, q, fc = 4.0, 1.0 / math.sqrt(2.0), 1500.0
    else:
        gain_db, q, fc = 0.0, 0.5, 38.0
    a_lin = 10 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * fc / rate
    alpha = math.sin(w0) / (2.0 * q)
    cos = math.cos(w0)
    if kind == "shelf":
        sq = 2.0 * math.sqrt(a_lin) * alpha
        b = [
            a_lin * ((a_lin + 1) + (a_lin - 1) * cos + sq),
            -2 * a_lin * ((a_lin - 1) + (a_lin + 1) * cos),
            a_lin * ((a_lin + 1) + (a_lin - 1) * cos - sq),
        ]
        a = [
            (a_lin + 1) - (a_lin - 1) * cos + sq,
            2 * ((a_lin - 1) - (a_lin + 1) * cos),
            (a_lin + 1) - (a_lin - 1) * cos - sq,
        ]
    else:
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
        a = [1 + alpha, -2 * cos, 1 - alpha]
    return np.array(b) / a[0], np.array(a) / a[0]


_IR_CACHE: dict[int, np.ndarray] = {}


def _k_weighting_ir(rate: int) -> np.ndarray:
    """Impulse response of the cascaded K-weighting biquads (float64), computed once per rate.

    Why an impulse response: the IIR filters decay within a few thousand samples, so an FFT convolution with the
    truncated response equals the recursive filter to ~1e-12 and needs no per-sample Python loop over the signal."""
    ir = _IR_CACHE.get(rate)
    if ir is not None:
        return ir
    x = np.zeros(_K_WEIGHTING_IR)
    x[0] = 1.0
    for kind in ("shelf", "highpass"):
        b, a = _biquad_coefficients(kind, rate)
        y = np.zeros_like(x)
        x1 = x2 = y1 = y2 = 0.0
        for n in range(x.size):
            xn = x[n]
            yn = b[0] * xn + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
            x2, x1, y2, y1 = x1, xn, y1, yn
            y[n] = yn
        x = y
    _IR_CACHE[rate] = x
    return x


def integrated_loudness(wav: np.ndarray, rate: int = SAMPLE_RATE) -> float | None:
    """Integrated loudness (LUFS) of mono audio per ITU-R BS.1770-4: K-weighting, 400 ms blocks every 100 ms, absolute
    gate −70 LUFS, relative gate −10 LU. ``None`` when the audio is shorter than one block or entirely gated (silence).
    """
    x = np.asarray(wav, dtype=np.float64)
    block = round(_LUFS_BLOCK * rate)
    if x.size < block:
        return None
    ir = _k_weighting_ir(rate)
    n = x.size + ir.size - 1
    size = 1 << (n - 1).bit_length()
    filtered = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: x.size]
    blocks = round((x.size / rate - _LUFS_BLOCK) / _LUFS_STEP) + 1
    energy = np.concatenate([[0.0], np.cumsum(filtered * filtered)])
    starts = (np.arange(blocks) * _LUFS_STEP * rate).astype(np.int64)
    ends = np.minimum(starts + block, x.size)
    z = (energy[ends] - energy[starts]) / (_LUFS_BLOCK * rate)
    with np.errstate(divide="ignore"):
        levels = -0.691 + 10.0 * np.log10(z)
    gated = z[levels >= _LUFS_ABS_GATE]
    if gated.size == 0:
        return None
    relative = -0.691 + 10.0 * math.log10(float(gated.mean())) + _LUFS_REL_GATE
    kept = z[(levels > relative) & (levels >= _LUFS_ABS_GATE)]
    if kept.size == 0:
        return None
    return -0.691 + 10.0 * math.log10(float(kept.mean()))


def loudness_gain(measured: float | None, target: float | None) -> float:
    """Linear gain that moves ``measured`` LUFS to ``target`` (1 when either is unknown)."""
    if measured is None or target is None or not (math.isfinite(measured) and math.isfinite(target)):
        return 1.0
    return float(10.0 ** ((target - measured) / 20.0))


def match_loudness(wav: np.ndarray, target: float | None, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Scale ``wav`` to the prompt's loudness; if the result peaks at or above 1, rescale it to peak 0.95 (§C.4 8)."""
    out = np.asarray(wav, dtype=np.float32) * np.float32(loudness_gain(integrated_loudness(wav, rate), target))
    peak = float(np.abs(out).max()) if out.size else 0.0
    if peak >= 1.0:
        out = out * np.float32(0.95 / peak)
    return out.astype(np.float32, copy=False)


# --- alignment and durations -------------------------------------------------------------------------------------


def parse_alignment(tokens: Sequence[int]) -> tuple[list[int], list[int], int]:
    """Aligner tokens (start/end removed) → merged phone ids, their end frames, and the number of tokens dropped.

    The expected stream alternates ``phone, 800 + end_frame``. A phone without a following timestamp, a timestamp
    without a phone, an unknown phone id and a timestamp that goes backwards are dropped (and counted), so a
    partly broken decode still yields a usable prompt.
    """
    phones: list[int] = []
    ends: list[int] = []
    pending: int | None = None
    dropped = 0
    for tok in tokens:
        if tok in (ALIGNER_START, ALIGNER_END):
            dropped += 1
        elif tok >= ALIGNER_TIMESTAMP_BASE:
            frame = tok - ALIGNER_TIMESTAMP_BASE
            if pending is None or (ends and frame < ends[-1]):
                dropped += 1 + (pending is not None)
            else:
                phones.append(pending)
                ends.append(frame)
            pending = None
        else:
            if pending is not None:
                dropped += 1
            pending = tok if is_valid_merged(tok) else None
            if pending is None:
                dropped += 1
    if pending is not None:
        dropped += 1
    return phones, ends, dropped


def fix_durations(durations: Sequence[int], total: int) -> list[int]:
    """Make ``durations`` sum to ``total`` (§C.4 step 2): a deficit goes to the last phone; an excess is removed one
    frame at a time from the phones in turn (phones already at 0 are skipped)."""
    dur = [max(0, int(d)) for d in durations]
    if not dur:
        return dur
    diff = total - sum(dur)
    if diff > 0:
        dur[-1] += diff
    i = 0
    while diff < 0:
        if dur[i % len(dur)] > 0:
            dur[i % len(dur)] -= 1
            diff += 1
        i += 1
    return dur


def length_regulate(durations: Sequence[int]) -> np.ndarray:
    """Durations ``[2, 2, 3]`` → 1-based phone index per frame ``[1, 1, 2, 2, 3, 3, 3]`` (int64)."""
    dur = np.asarray(durations, dtype=np.int64)
    return np.repeat(np.arange(1, dur.size + 1, dtype=np.int64), np.maximum(dur, 0))


def postprocess_durations(
    codes: Sequence[int],
    phones: Sequence[int],
    *,
    code_size: int,
    is_first: bool,
    is_final: bool,
    dur_disturb: float,
    dur_alpha: float,
    frames_multiple: int,
    rng: np.random.Generator,
) -> list[int]:
    """Duration codes of the target phones → frame counts, with the original's post-rules (§C.4 step 6).

    ``code - 1`` clamped to the code range; a non-final segment's last phone gets 32 more frames (cross-fade room),
    the final one is clamped to 64–128; each duration is multiplied or divided (50/50) by ``1 + U(0, 1)·dur_disturb``,
    scaled by ``dur_alpha``, rounded and clamped to 0–127; sentence-final punctuation and ``sil`` get ≥ 64 frames,
    commas/semicolons ≥ 32; the first segment's first phone is 8 frames; the last phone is padded so the total is a
    multiple of ``frames_multiple``.
    """
    dur = np.clip(np.asarray(codes, dtype=np.float64) - 1, 0, code_size - 1)
    if dur.size == 0:
        return []
    if is_final:
        dur[-1] = min(max(dur[-1], 64), 128)
    else:
        dur[-1] += 32
    factor = 1.0 + rng.random(dur.size) * dur_disturb
    multiply = rng.random(dur.size) < 0.5
    dur = np.where(multiply, dur * factor, dur / factor) * dur_alpha
    dur = np.clip(np.round(dur), 0, 127).astype(np.int64)
    for i, phone in enumerate(phones):
        if phone in SENTENCE_END_PHONES:
            dur[i] = max(dur[i], 64)
        elif phone in CLAUSE_PHONES:
            dur[i] = max(dur[i], 32)
    if is_first:
        dur[0] = 8
    rem = int(dur.sum()) % frames_multiple
    if rem:
        dur[-1] += frames_multiple - rem
    return [int(d) for d in dur]


# --- latents --------------------------------------------------------------------------------------------------------


def parse_latent(data: bytes | None, latent_dim: int = 32) -> np.ndarray:
    """A ``.npy`` latent file → float32 ``(T, latent_dim)``; anything else raises a 400 naming ``latent_file``."""
    if not data:
        raise InvalidRequestError(f"no latent file given. {LATENT_HELP}", param="latent_file")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidRequestError(
            f"the latent file is not a readable .npy array ({exc}). {LATENT_HELP}", param="latent_file"
        ) from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise InvalidRequestError(
            f"the latent must be a float array, got {getattr(array, 'dtype', type(array).__name__)}. {LATENT_HELP}",
            param="latent_file",
        )
    if array.ndim != 3 or array.shape[0] != 1 or array.shape[2] != latent_dim or array.shape[1] < 1:
        raise InvalidRequestError(
            f"the latent has shape {tuple(array.shape)}, expected (1, T, {latent_dim}). {LATENT_HELP}",
            param="latent_file",
        )
    latent = np.ascontiguousarray(array[0], dtype=np.float32)
    if not np.isfinite(latent).all():
        raise InvalidRequestError(f"the latent contains NaN or infinite values. {LATENT_HELP}", param="latent_file")
    return latent


# --- the reference voice -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceVoice:
    """Everything synthesis needs from a reference (stored as the role's prompt data).

    ``phones``/``tones``: DiT phone and tone ids (N,); ``durations``: frames per phone (N,), summing to
    ``4 * latent frames``; ``latent``: ``(T_ref, 32)`` float32; ``loudness``: LUFS of the padded prompt (None: silent).
    """

    phones: tuple[int, ...]
    tones: tuple[int, ...]
    durations: tuple[int, ...]
    latent: np.ndarray
    loudness: float | None

    def to_data(self) -> dict[str, Any]:
        """JSON-serialisable form (the latent as base64 of little-endian float32)."""
        return {
            "version": 1,
            "phones": list(self.phones),
            "tones": list(self.tones),
            "durations": list(self.durations),
            "latent_frames": int(self.latent.shape[0]),
            "latent_dim": int(self.latent.shape[1]),
            "latent": base64.b64encode(np.ascontiguousarray(self.latent, dtype="<f4").tobytes()).decode("ascii"),
            "loudness": self.loudness,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> ReferenceVoice:
        """Inverse of :meth:`to_data`; raises ``ValueError`` on anything inconsistent."""
        if data.get("version") != 1:
            raise ValueError("unknown prompt version")
        phones = tuple(int(p) for p in data["phones"])
        tones = tuple(int(t) for t in data["tones"])
        durations = tuple(int(d) for d in data["durations"])
        frames, dim = int(data["latent_frames"]), int(data["latent_dim"])
        raw = base64.b64decode(data["latent"], validate=True)
        if len(raw) != frames * dim * 4:
            raise ValueError("latent size mismatch")
        latent = np.frombuffer(raw, dtype="<f4").reshape(frames, dim).astype(np.float32)
        if not phones or len(phones) != len(tones) or len(phones) != len(durations):
            raise ValueError("phones, tones and durations differ in length")
        if sum(durations) != frames * MEL_FRAMES_PER_LATENT or min(durations) < 0:
            raise ValueError("durations do not cover the latent")
        loudness = data.get("loudness")
        return cls(phones, tones, durations, latent, float(loudness) if loudness is not None else None)


def prepare_reference(models: MegaModels, wav: np.ndarray, latent: np.ndarray) -> ReferenceVoice:
    """Align a 24 kHz reference and pair it with its latent (blocking; runs the aligner). See the module docstring."""
    from flashtts_core.audio.resample import resample
    from flashtts_core.engines.mega.modeling_aligner import WHISPER_SAMPLE_RATE, whisper_log_mel
    from flashtts_core.engines.mega.modeling_dit import autocast_like

    config = models.config
    fm = config.frames_multiple
    padded = pad_prompt_wav(wav, config.win_size)
    loudness = integrated_loudness(padded)
    mel = whisper_log_mel(resample(padded, SAMPLE_RATE, WHISPER_SAMPLE_RATE), models.aligner.dims.n_mels)
    frames = mel.shape[-1] // fm * fm
    available = latent.shape[0] * MEL_FRAMES_PER_LATENT // fm * fm
    if latent.shape[0] * LATENT_FRAME_SAMPLES < _MIN_LATENT_COVERAGE * len(wav):
        raise InvalidRequestError(
            f"the latent has {latent.shape[0]} frames ({latent.shape[0] * LATENT_FRAME_SAMPLES / SAMPLE_RATE:.2f} s) "
            f"but the reference audio lasts {len(wav) / SAMPLE_RATE:.2f} s: they are not the same clip. {LATENT_HELP}",
            param="latent_file",
        )
    if available < frames:
        logger.info("the latent covers %d of %d prompt mel frames; shortening the prompt", available, frames)
        frames = available
    elif latent.shape[0] * MEL_FRAMES_PER_LATENT > 2 * frames + 100:
        logger.warning(
            "the latent (%d frames) is much longer than the reference audio; using its start", latent.shape[0]
        )
    if frames < fm:
        raise AudioDecodeError("the reference audio is too short for the aligner; send at least 1 second")
    with autocast_like(models.aligner):  # the mel stays float32; the aligner runs in its stored dtype
        tokens = models.aligner.align_tokens(mel[..., :frames])
    merged, ends, dropped = parse_alignment(tokens)
    if dropped:
        logger.warning("aligner: dropped %d malformed token(s) of %d", dropped, len(tokens))
    if not merged:
        raise AudioDecodeError("the aligner found no speech in the reference audio; send a clip with clear speech")
    raw = [e - s for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    durations = fix_durations(raw, frames)
    phones, tones = split_merged(merged)
    return ReferenceVoice(
        phones=tuple(phones),
        tones=tuple(tones),
        durations=tuple(durations),
        latent=np.ascontiguousarray(latent[: frames // MEL_FRAMES_PER_LATENT]),
        loudness=loudness,
    )


# --- joining segments -------------------------------------------------------------------------------------------


class CrossFader:
    """Joins consecutive segments with the original's Hann cross-fade while streaming (§C.4 step 9).

    The last ``CROSSFADE_SAMPLES`` pushed are always held back (a piece is not known to end its segment until the
    next call says so); at a segment's end they become the tail that waits for the next segment's first
    ``CROSSFADE_SAMPLES``. The overlap is ``tail · hann[second half] + head · hann[first half]`` of a
    ``hanning(2 · 3840)`` window, so the joined length is the sum of the segments minus one overlap per join (a
    segment shorter than the overlap fades over its own length). :meth:`finish` releases what is held.
    """

    def __init__(self, overlap: int = CROSSFADE_SAMPLES) -> None:
        self.overlap = overlap
        self._pending = np.zeros(0, np.float32)  # the newest samples of the current segment, not yet emitted
        self._tail: np.ndarray | None = None  # end of the previous segment, waiting for the next head
        self._head: list[np.ndarray] = []  # start of the current segment, waiting to be mixed with the tail

    def start_segment(self) -> None:
        """Call before the first :meth:`push` of each segment."""
        self._head = []

    def push(self, samples: np.ndarray, *, segment_end: bool) -> np.ndarray:
        """Feed the next piece of the current segment; returns what can be emitted now (possibly nothing)."""
        out = np.asarray(samples, dtype=np.float32)
        if self._tail is not None:
            self._head.append(out)
            head = np.concatenate(self._head)
            if head.size < self.overlap and not segment_end:
                return np.zeros(0, np.float32)
            tail = self._tail
            n = min(self.overlap, tail.size, head.size)
            window = np.hanning(2 * n)
            mixed = tail[tail.size - n :] * window[n:] + head[:n] * window[:n]
            out = np.concatenate([tail[: tail.size - n], mixed, head[n:]]).astype(np.float32)
            self._tail, self._head = None, []
        data = np.concatenate([self._pending, out]) if self._pending.size else out
        cut = max(0, data.size - self.overlap)
        if segment_end:
            self._tail, self._pending = data[cut:].copy(), np.zeros(0, np.float32)
        else:
            self._pending = data[cut:].copy()
        return data[:cut]

    def finish(self) -> np.ndarray:
        """Everything still held (the end of the last segment)."""
        held = self._tail if self._tail is not None else self._pending
        self._tail, self._pending = None, np.zeros(0, np.float32)
        return held
