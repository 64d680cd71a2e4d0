"""Tiny Orpheus-TTS checkpoint: a scripted Llama whose greedy output is valid Orpheus audio frames, plus a tiny SNAC.

The real checkpoint is a 3B Llama-3.2 fine-tune whose tokenizer appends ``<custom_token_0>`` … ``<custom_token_28683>``
to the Llama-3 vocabulary, and a ``snac/`` folder with the SNAC 24 kHz decoder (models.md §B.1–B.2). The engine needs
a model that, after the prompt's final ``<custom_token_1>`` (start of speech), emits whole 7-token frames and then
``<custom_token_2>`` (end of speech), so :func:`build_tiny_orpheus` writes (models.md §D.2, option (b)):

* the LLM in ``out_dir``: :func:`~flashtts_core.testing.tiny_llm.build_tiny_llama` with the Llama-3 specials and all
  28684 custom tokens as non-special added tokens (ids shifted down because the base BPE is tiny; the engine looks
  every id up by name), hidden size 64 with two heads (head_dim 32, the smallest every runtime accepts), scripted
  with a bigram :class:`~flashtts_core.testing.tiny_llm.TokenScript`:
  ``<custom_token_1>`` → frame 0 slot 0 → … → frame F−1 slot 6 → ``<custom_token_2>``. A bigram table needs every
  token of the chain to be distinct, so each slot uses ``frames`` distinct codes; code 0 (slot 0 of frame 1) and
  code 4095 (slot 6 of frame 2) are always among them, because the original parser mishandled exactly those;
* ``snac/``: the ``snac`` package's own ``SNAC`` with the tiny sizes of §D.2 (codebook_dim 2, decoder_dim 32,
  encoder_dim 4; same 269 tensor names and the same 2048 samples per frame as ``snac_24khz``), saved the way the
  published folder is: ``config.json`` + ``pytorch_model.bin`` = ``torch.save`` of the *full* state dict (encoder
  included, weight-norm ``parametrizations.weight.original0/1`` key names).

The tiny SNAC's ``NoiseBlock`` gains are zero (``config.json`` still says ``"noise": true`` and the tensors exist),
so its decoding is deterministic and tests can compare streamed with one-shot audio sample by sample; the real
decoder's small learned noise is untouched by the engine.

``malformed_frames`` replaces slot 3 of the listed frames with a slot-4 token (a wrong-slot token, still an audio id)
for the engine's malformed-frame handling. :func:`orpheus_script_frames` returns the scripted codes for assertions.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flashtts_core.testing.cache import cached_build
from flashtts_core.testing.tiny_llm import LLAMA3_SPECIALS, TokenScript, build_tiny_llama

__all__ = (
    "ORPHEUS_CUSTOM_TOKENS",
    "TINY_SNAC_CONFIG",
    "build_tiny_orpheus",
    "build_tiny_snac",
    "orpheus_script_frames",
    "orpheus_script_tokens",
    "tiny_orpheus_dir",
)

#: ``<custom_token_0>`` … ``<custom_token_28683>`` (vocab 156940 − 128256 in the real checkpoint).
ORPHEUS_CUSTOM_TOKENS: tuple[str, ...] = tuple(f"<custom_token_{n}>" for n in range(28684))

#: models.md §D.2: SNAC 24 kHz structure with tiny widths (91 k parameters, 4 frames → 8192 samples).
TINY_SNAC_CONFIG: dict[str, object] = {
    "sampling_rate": 24000,
    "encoder_dim": 4,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 32,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 2,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}

_SLOTS = 7
_CODES = 4096
_AUDIO_OFFSET = 10  # <custom_token_10> = slot 0, code 0


def orpheus_script_frames(*, frames: int = 24, seed: int = 0) -> np.ndarray:
    """The scripted codes ``(frames, 7)``: per slot, distinct codes; (1, 0) = 0 and (2, 6) = 4095 when they exist."""
    if not 1 <= frames <= 1024:
        raise ValueError(f"frames must be in 1..1024, got {frames}")
    rng = np.random.default_rng((seed, 0x0A7E))  # own stream, independent of the weight init for the same seed
    codes = np.stack([rng.choice(np.arange(1, _CODES - 1), size=frames, replace=False) for _ in range(_SLOTS)], axis=1)
    if frames > 1:
        codes[1, 0] = 0
    if frames > 2:
        codes[2, 6] = _CODES - 1
    return codes.astype(np.int64)


def _audio_token(slot: int, code: int) -> str:
    return ORPHEUS_CUSTOM_TOKENS[_AUDIO_OFFSET + slot * _CODES + int(code)]


def orpheus_script_tokens(*, frames: int = 24, seed: int = 0, malformed_frames: Sequence[int] = ()) -> list[str]:
    """The completion after ``<custom_token_1>``: the frames' tokens, then ``<custom_token_2>``."""
    codes = orpheus_script_frames(frames=frames, seed=seed)
    bad = set(malformed_frames)
    if not bad <= set(range(frames)):
        raise ValueError(f"malformed_frames must be frame indices below {frames}")
    # Wrong-slot replacements: slot-4 codes used nowhere else in slot 4 (so the chain stays free of repeats).
    spare = iter(sorted(set(range(1, _CODES - 1)) - {int(c) for c in codes[:, 4]}))
    out: list[str] = []
    for index, frame in enumerate(codes):
        for slot, code in enumerate(frame):
            if slot == 3 and index in bad:
                out.append(_audio_token(4, next(spare)))
            else:
                out.append(_audio_token(slot, code))
    out.append("<custom_token_2>")
    return out


def build_tiny_snac(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Write ``config.json`` + ``pytorch_model.bin`` of a tiny random SNAC (zero noise gains) into ``out_dir``."""
    import torch
    from snac import SNAC

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SNAC(**TINY_SNAC_CONFIG)  # type: ignore[arg-type]
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for key in state:
        # decoder.model.{i}.block.2 is the NoiseBlock; original0 is its weight-norm magnitude g.
        if ".block.2.linear.parametrizations.weight.original0" in key:
            state[key].zero_()
    torch.save(state, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps(TINY_SNAC_CONFIG, indent=2) + "\n", encoding="utf-8")
    return out


def build_tiny_orpheus(
    out_dir: Path | str, *, frames: int = 24, seed: int = 0, malformed_frames: Sequence[int] = ()
) -> Path:
    """Write a tiny Orpheus checkpoint (LLM files at the top, SNAC in ``snac/``) into ``out_dir``; return it."""
    out = Path(out_dir)
    completion = orpheus_script_tokens(frames=frames, seed=seed, malformed_frames=malformed_frames)
    transitions = dict(itertools.pairwise(["<custom_token_1>", *completion]))
    build_tiny_llama(
        out,
        special_tokens=LLAMA3_SPECIALS,
        added_tokens=ORPHEUS_CUSTOM_TOKENS,
        eos_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>",
        pad_token=None,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        script=TokenScript(transitions=transitions),
        seed=seed,
    )
    build_tiny_snac(out / "snac", seed=seed)
    return out


def tiny_orpheus_dir(*, frames: int = 24, seed: int = 0, malformed_frames: Sequence[int] = ()) -> Path:
    """Return a cached :func:`build_tiny_orpheus` folder (built on first use; see :mod:`.cache`)."""
    bad = tuple(sorted(set(int(i) for i in malformed_frames)))
    params = {"frames": frames, "seed": seed, "malformed_frames": list(bad)}
    return cached_build(
        "orpheus-checkpoint",
        params,
        lambda path: build_tiny_orpheus(path, frames=frames, seed=seed, malformed_frames=bad),
    )
