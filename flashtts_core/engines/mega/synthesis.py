"""One MegaTTS3 segment from phones to latent, and latent windows to audio (blocking; run in a worker thread).

Per segment (models.md §C.4 steps 6–8): the duration LM continues the prompt's durations for the target phones, the
post-rules shape them, the frame→phone map of prompt + target drives the DiT, which samples the whole latent with the
prompt latent as context; the WaveVAE decodes the target part (the prompt part is cut off after decoding, so its
samples serve as left context of the first target frame).

The duration LM's prompt state is computed once per request (:func:`prepare_prompt`) and copied for each segment.

Batching: a segment is first *planned* (:func:`plan_segment`: duration LM and post-rules, cheap and sequential), then
the DiT samples any number of planned segments as one padded batch (:func:`sample_latents`); each segment's latent
equals its solo latent up to float rounding, so the engine can batch concurrent requests. Every model runs in its
stored dtype under :func:`~.modeling_dit.autocast_like`; the sampler state, loudness and spectrograms stay float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from flashtts_core.engines.mega.config import MEL_FRAMES_PER_LATENT
from flashtts_core.engines.mega.frontend import ReferenceVoice, length_regulate, postprocess_durations
from flashtts_core.engines.mega.g2p import disable_english_tone
from flashtts_core.engines.mega.loading import MegaModels
from flashtts_core.engines.mega.modeling_dit import DiTSample, amo_sample_batch, autocast_like
from flashtts_core.engines.mega.modeling_dur import MegaDurationState

__all__ = (
    "MegaSynthesisOptions",
    "PreparedPrompt",
    "decode_window",
    "generate_segment_latent",
    "plan_segment",
    "prepare_prompt",
    "sample_latents",
)

logger = logging.getLogger(__name__)


class MegaSynthesisOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sampling knobs of one request (request ``options`` override the engine's)."""

    time_step: int = 32  # DiT steps
    p_w: float = 1.6  # text guidance ("intelligibility")
    t_w: float = 2.5  # speaker guidance ("similarity")
    dur_disturb: float = 0.1  # random duration jitter
    dur_alpha: float = 1.0  # duration scale (>1 slower)


@dataclass
class PreparedPrompt:
    """A reference turned into model inputs: DiT ids of the prompt, its frame map and latent, duration-LM state."""

    voice: ReferenceVoice
    mel2ph: np.ndarray  # (F_ref,) 1-based prompt phone per 100 Hz frame
    latent: torch.Tensor  # (1, T_ref, 32) on the model device
    last_code: int  # last prompt duration code: the first input of every target decode
    state: MegaDurationState


def prepare_prompt(models: MegaModels, voice: ReferenceVoice) -> PreparedPrompt:
    """Teacher-force the prompt durations (codes ``min(dur, code_size − 1) + 1``) through the duration LM."""
    lm = models.duration
    device = lm.device
    codes = [min(d, lm.dims.code_size - 1) + 1 for d in voice.durations]
    phones = torch.tensor([voice.phones], device=device)
    tones = torch.tensor([voice.tones], device=device)
    with autocast_like(lm):
        state = lm.prefill(phones, tones, torch.tensor([codes], device=device))
    dit_device = next(models.dit.parameters()).device
    return PreparedPrompt(
        voice=voice,
        mel2ph=length_regulate(voice.durations),
        latent=torch.from_numpy(voice.latent).unsqueeze(0).to(dit_device),
        last_code=codes[-1],
        state=state,
    )


def plan_segment(
    models: MegaModels,
    prompt: PreparedPrompt,
    phones: list[int],
    tones: list[int],
    *,
    is_first: bool,
    is_final: bool,
    options: MegaSynthesisOptions,
    seed: int | None,
) -> DiTSample:
    """Durations of the target phones (duration LM + post-rules) → the DiT input of prompt + target.

    The returned sample carries the segment's noise generator (seeded from ``seed``; the duration LM draws from it
    first when it samples), so sampling it alone or in any batch gives the same noise.
    """
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lm = models.duration
    with autocast_like(lm):
        codes = lm.decode(
            torch.tensor([phones], device=lm.device),
            torch.tensor([tones], device=lm.device),
            prompt.state,
            prompt.last_code,
            generator=generator,
        )
    durations = postprocess_durations(
        codes,
        phones,
        code_size=lm.dims.code_size,
        is_first=is_first,
        is_final=is_final,
        dur_disturb=options.dur_disturb,
        dur_alpha=options.dur_alpha,
        frames_multiple=models.config.frames_multiple,
        rng=rng,
    )
    voice = prompt.voice
    mel2ph = np.concatenate([prompt.mel2ph, length_regulate(durations) + len(voice.phones)])
    fm = models.config.frames_multiple
    mel2ph = mel2ph[: len(mel2ph) // fm * fm]
    logger.debug(
        "segment: %d phones, %d target frames (durations %s)", len(phones), len(mel2ph) - len(prompt.mel2ph), durations
    )
    return DiTSample(
        phones=torch.tensor([*voice.phones, *phones]),
        tones=torch.tensor(disable_english_tone([*voice.tones, *tones])),
        mel2ph=torch.from_numpy(mel2ph),
        prompt_latent=prompt.latent[0],
        steps=options.time_step,
        p_w=options.p_w,
        t_w=options.t_w,
        generator=generator,
    )


def sample_latents(models: MegaModels, samples: Sequence[DiTSample]) -> list[np.ndarray]:
    """The latents ``(T_ref + T_target, 32)`` float32 of planned segments, sampled as one DiT batch (one per step
    count); prompt frames hold the prompt latent."""
    latents = amo_sample_batch(models.dit, samples)
    for sample, latent in zip(samples, latents, strict=True):
        assert latent.shape[0] == sample.mel2ph.shape[0] // MEL_FRAMES_PER_LATENT
    return [latent.cpu().numpy() for latent in latents]


def generate_segment_latent(
    models: MegaModels,
    prompt: PreparedPrompt,
    phones: list[int],
    tones: list[int],
    *,
    is_first: bool,
    is_final: bool,
    options: MegaSynthesisOptions,
    seed: int | None,
) -> np.ndarray:
    """The latent ``(T_ref + T_target, 32)`` float32 of prompt + target, sampled alone (prompt frames = the prompt
    latent)."""
    sample = plan_segment(
        models, prompt, phones, tones, is_first=is_first, is_final=is_final, options=options, seed=seed
    )
    return sample_latents(models, [sample])[0]


def decode_window(models: MegaModels, latent: np.ndarray, start: int, end: int, *, context: int) -> np.ndarray:
    """Samples of latent frames ``[start, end)`` of ``latent`` ``(T, 32)``, decoded with ``context`` frames on each
    side (``context >= T`` decodes the whole latent once): float32 ``(960 (end − start),)``."""
    vae = models.wavvae
    device = vae.proj_to_decoder.weight.device
    x = torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32)).unsqueeze(0).to(device)
    with autocast_like(vae):
        wav = vae.decode_window(x, start, end, context)
    return wav.float().cpu().numpy()
