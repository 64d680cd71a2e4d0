"""Tiny MegaTTS3 checkpoint: the published layout, file names, containers and key names with shrunk sizes (D.3).

:func:`build_tiny_mega` writes::

    aligner_lm/{config.yaml, model_only_last.ckpt}            state_dict['model']      width 32, 1+1 layers, 2 heads
    diffusion_transformer/{config.yaml, model_only_last.ckpt} state_dict['dit']        width 32, 2 layers, 2 heads
    duration_lm/{config.yaml, model_only_last.ckpt}           state_dict['dur_model']  width 16, 1 layer
    wavvae/{config.yaml, decoder.ckpt}                        state_dict['model_gen']  ngf 4, ratios 5/4/4/3
    g2p/                                                      scripted tiny Qwen2 (HF layout)
    config.json                                               metadata stub

Kept from the published model (the pipeline relies on them): 80 mels, aligner vocabulary 6800 with its token
semantics, DiT phone table 302 / tone table 32 / latent 32 / ctx-mask 16, duration codes 128, WaveVAE ×4 latent
upsampling and ×240 generator (960 samples per latent frame), ``<Reserved_TTS_0..801>`` G2P tokens. Sizes the original
hard-wires and we shrink are announced through the new YAML keys (``aligner_heads``, ``dit_heads``) or read back from
tensor shapes.

Random weights give meaningless token streams, so the two token-level models are *scripted* (no training involved):

* the **G2P** LLM follows a :class:`~flashtts_core.testing.tiny_llm.TokenScript` bigram chain
  ``<Reserved_TTS_145>`` (the prompt's last token) → :data:`G2P_SCRIPT` phones → ``<Reserved_TTS_801>`` (stop), so
  greedy and sampled decoding both yield a valid phone sequence;
* the **aligner** decoder is made a bigram table the same way: its attention/MLP output projections are zero (each
  block adds nothing to the residual), its learned positions are zero, so the logits depend only on the current
  token; chain tokens get orthonormal embedding directions (orthogonal to the all-ones vector, so the final LayerNorm
  only rescales them) and the ``out_proj`` row of each successor is a multiple of its predecessor's direction.
  Greedy decoding then writes ``798`` → :data:`ALIGNER_SCRIPT` (phone, end-frame pairs) → ``799`` for any audio.

The duration LM's head is biased towards code 4 (3 frames) so utterances stay short, and its file also holds the
``char_empty_embed`` table upstream always saves (attention without biases, as upstream); the DiT and WaveVAE are
plain random. The role helper writes a 1 s 24 kHz wav with a random ``(1, 39, 32)`` latent (the frames the padded clip
needs).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np

from flashtts_core.testing.cache import cached_build

__all__ = (
    "ALIGNER_SCRIPT",
    "G2P_SCRIPT",
    "TINY_ROLE_NAME",
    "build_tiny_mega",
    "tiny_mega_dir",
    "tiny_mega_reference",
    "tiny_mega_role_dir",
    "write_tiny_mega_role",
)

logger = logging.getLogger(__name__)

#: Merged phone ids the scripted G2P emits after the prompt's ``sil`` (distinct: a bigram chain cannot repeat).
#: English-like phones, a toned Chinese phone (205, 231), a comma (163) and a full stop (148).
G2P_SCRIPT: tuple[int, ...] = (120, 205, 130, 163, 231, 110, 148)
#: (merged phone, end frame) pairs the scripted aligner writes for any reference.
ALIGNER_SCRIPT: tuple[tuple[int, int], ...] = ((145, 12), (208, 40), (120, 64), (163, 80), (225, 104), (148, 140))
TINY_ROLE_NAME = "tiny"

_RESERVED = tuple(f"<Reserved_TTS_{k}>" for k in range(802))
_SCRIPT_STRENGTH = 40.0
_DURATION_CODE = 4  # the tiny duration LM always predicts code 4 = 3 frames


def _yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _save_ckpt(path: Path, sub: str, module: Any, extra: dict[str, Any] | None = None) -> None:
    """``torch.save({'state_dict': {sub: module's state dict + extra}})`` (``extra``: tensors upstream also saves)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    state.update(extra or {})
    torch.save({"state_dict": {sub: state}}, path)


def _randomise(module: Any, generator: Any) -> None:
    """Fill every parameter/buffer: norms 1/0, weight-norm ``g`` = ‖v‖, everything else N(0, 1/fan_in)."""
    import torch

    with torch.no_grad():
        named = dict(module.named_parameters())
        named.update(dict(module.named_buffers()))
        for name, tensor in named.items():
            leaf = name.rsplit(".", 1)[-1]
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            is_norm = isinstance(parent, torch.nn.LayerNorm) or leaf in ("gamma", "beta")
            if is_norm:
                tensor.fill_(1.0 if leaf in ("weight", "gamma") else 0.0)
            elif leaf == "bias":
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
            else:
                fan_in = max(1, math.prod(tensor.shape[1:])) if tensor.dim() > 1 else tensor.numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))
        for name, tensor in named.items():
            if name.endswith("weight_g"):
                v = named[name[: -len("weight_g")] + "weight_v"]
                tensor.copy_(torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True))


def _orthonormal_rows(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` orthonormal rows of width ``dim``, all orthogonal to the all-ones vector (zero mean)."""
    basis = rng.standard_normal((dim, count + 1))
    basis[:, 0] = 1.0
    q, _ = np.linalg.qr(basis)
    return q[:, 1 : count + 1].T.copy()


def _script_aligner(model: Any, rng: np.random.Generator) -> None:
    """Turn the aligner decoder into the bigram chain of :data:`ALIGNER_SCRIPT` (see the module docstring)."""
    import torch

    from flashtts_core.engines.mega.config import ALIGNER_END, ALIGNER_START, ALIGNER_TIMESTAMP_BASE

    chain = [ALIGNER_START]
    for phone, end in ALIGNER_SCRIPT:
        chain += [phone, ALIGNER_TIMESTAMP_BASE + end]
    chain.append(ALIGNER_END)
    dec = model.decoder
    width = dec.token_embedding.weight.shape[1]
    dirs = _orthonormal_rows(len(chain) - 1, width, rng)
    with torch.no_grad():
        for block in dec.blocks:
            for proj in (block.attn.out, block.cross_attn.out, block.mlp[2]):
                proj.weight.zero_()
                proj.bias.zero_()
        dec.positional_embedding.zero_()
        dec.out_proj.weight.normal_(0.0, 1e-3)
        dec.out_proj.bias.zero_()
        for direction, (source, target) in zip(dirs, itertools.pairwise(chain), strict=True):
            row = torch.from_numpy(direction).float()
            dec.token_embedding.weight[source] = row
            dec.out_proj.weight[target] += _SCRIPT_STRENGTH * row


def build_tiny_mega(out_dir: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny MegaTTS3 directory into ``out_dir`` (see the module docstring) and return it."""
    import torch

    from flashtts_core.engines.mega.config import (
        MegaAlignerDims,
        MegaDiTDims,
        MegaDurationDims,
        MegaWaveVAEDims,
    )
    from flashtts_core.engines.mega.modeling_aligner import MegaAligner
    from flashtts_core.engines.mega.modeling_dit import MegaDiT
    from flashtts_core.engines.mega.modeling_dur import MegaDurationLM
    from flashtts_core.engines.mega.modeling_wavvae import MegaWaveVAEDecoder
    from flashtts_core.testing.tiny_llm import QWEN2_SPECIALS, TokenScript, build_tiny_qwen2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng((seed, 0x3E6A))

    pipeline = {"win_size": 960, "frames_multiple": 8, "audio_sample_rate": 24000, "hop_size": 240}
    aligner = MegaAligner(MegaAlignerDims(width=32, heads=2, mlp_hidden=128, encoder_layers=1, decoder_layers=1))
    _randomise(aligner, generator)
    _script_aligner(aligner, rng)
    _yaml(out / "aligner_lm" / "config.yaml", {**pipeline, "aligner_heads": 2})
    _save_ckpt(out / "aligner_lm" / "model_only_last.ckpt", "model", aligner)

    dit = MegaDiT(
        MegaDiTDims(
            dim=32,
            heads=2,
            layers=2,
            ffn_hidden=64,
            local_cond_dim=32,
            time_freq_dim=64,
            text_hidden=32,
            text_filter=64,
            text_heads=2,
            text_layers=1,
        )
    )
    _randomise(dit, generator)
    _yaml(out / "diffusion_transformer" / "config.yaml", {**pipeline, "dit_heads": 2})
    _save_ckpt(out / "diffusion_transformer" / "model_only_last.ckpt", "dit", dit)

    dur_dims = MegaDurationDims(
        txt_hidden=16, hidden=16, layers=1, heads=8, ffn_hidden=64, ling_vocab=(35,), mega_use_char=False
    )
    duration = MegaDurationLM(dur_dims)
    _randomise(duration, generator)
    with torch.no_grad():
        duration.project_out_dim.weight.mul_(0.01)
        duration.project_out_dim.bias.zero_()
        duration.project_out_dim.bias[_DURATION_CODE] = 10.0
    _yaml(
        out / "duration_lm" / "config.yaml",
        {
            "dur_txt_hs": 16,
            "dur_model_hidden_size": 16,
            "dur_model_layers": 1,
            "dur_code_size": 128,
            "dur_model_type": "ar_dur",
            "use_rot_embed": True,
            "lm_bias": True,
            "lm_use_enc": False,
            "encoder_type": "rel_fft",
            "ffn_hidden_size": 64,
            "num_heads": 2,
            "enc_layers": 1,
            "enc_ffn_kernel_size": 1,
            "dropout": 0.0,
            "enc_prenet": False,
            "enc_pre_ln": True,
            "use_ph_pos_embed": False,
            "mega_use_char": False,
            "char_dict_size": 4000,
            "use_bert_input": False,
            "ling_labels": ["tone"],
            "ling_label_dict_size": [32],
            "use_pos_embed": False,
            "use_post_ln": False,
            "max_tokens": 4000,
            "max_tokens_per_item": 4000,
            "use_spk_embed": False,
            "use_spk_id": False,
            "use_spk_enc": False,
            "infer_top_k": None,
            "infer_temperature": 1.0,
            "dur_num_heads": 8,
        },
    )
    # Upstream always creates ``char_empty_embed`` (unused at inference), so every real file holds it.
    unused = {"char_empty_embed.weight": torch.randn(1, dur_dims.txt_hidden, generator=generator)}
    _save_ckpt(out / "duration_lm" / "model_only_last.ckpt", "dur_model", duration, unused)

    vae = MegaWaveVAEDecoder(MegaWaveVAEDims(latent_hidden=32, upsampler_out=16, first_channels=64, ngf=4))
    _randomise(vae, generator)
    _yaml(
        out / "wavvae" / "config.yaml",
        {"melgan_config": {"frame_shift": 240, "use_tanh": False}, "vae_stride": 4, "hop_size": 240},
    )
    _save_ckpt(out / "wavvae" / "decoder.ckpt", "model_gen", vae)

    speech = [f"<Reserved_TTS_{m}>" for m in (145, *G2P_SCRIPT, 801)]
    build_tiny_qwen2(
        out / "g2p",
        special_tokens=QWEN2_SPECIALS,
        added_tokens=("<BOT>", "<BOS>", *_RESERVED),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        script=TokenScript(transitions=dict(itertools.pairwise(speech))),
        seed=seed,
    )
    (out / "config.json").write_text(json.dumps({"model_type": "megatts3"}) + "\n", encoding="utf-8")
    return out


def tiny_mega_dir(*, seed: int = 0) -> Path:
    """Return a cached :func:`build_tiny_mega` folder (built on first use, a few seconds; see :mod:`.cache`)."""
    # ``layout`` names the builder's output format: bump it whenever the files change for the same seed.
    params = {"seed": seed, "layout": 2}
    return cached_build("mega-checkpoint", params, lambda path: build_tiny_mega(path, seed=seed))


def _tiny_wav(seconds: float, seed: int) -> np.ndarray:
    """A speech-like test signal: a gliding tone with an amplitude envelope, plus a little noise."""
    rng = np.random.default_rng((seed, 0x3A7))
    n = int(24000 * seconds)
    t = np.arange(n) / 24000
    f0 = 140 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 24000
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.2 * voice * envelope + 0.005 * rng.standard_normal(n)).astype(np.float32)


def _wav_bytes(samples: np.ndarray, rate: int = 24000) -> bytes:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def write_tiny_mega_role(folder: Path | str, *, seconds: float = 1.0, seed: int = 0) -> Path:
    """Write ``<folder>/tiny.wav`` (24 kHz 16-bit mono) and ``<folder>/tiny.npy`` (``(1, T, 32)`` float32, T = the
    latent frames of the padded clip, as a real WaveVAE encoding would have)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wav = _tiny_wav(seconds, seed)
    padded = len(wav) + (959 - len(wav) % 960 if len(wav) % 960 < 959 else 0) + 12000
    frames = math.ceil(padded / 960)
    latent = np.random.default_rng((seed, 0x1A7)).standard_normal((1, frames, 32)).astype(np.float32)
    (folder / "tiny.wav").write_bytes(_wav_bytes(wav))
    np.save(folder / "tiny.npy", latent)
    return folder


def tiny_mega_role_dir(*, seed: int = 0) -> Path:
    """A cached role directory holding one role, ``tiny/`` (``tiny.wav`` + ``tiny.npy``), in the mega-roles layout."""
    return cached_build(
        "mega-roles", {"seed": seed}, lambda path: write_tiny_mega_role(path / TINY_ROLE_NAME, seed=seed)
    )


def tiny_mega_reference(*, seed: int = 0) -> tuple[bytes, bytes]:
    """``(wav bytes, npy bytes)`` of the tiny role (for clone requests)."""
    folder = tiny_mega_role_dir(seed=seed) / TINY_ROLE_NAME
    return (folder / "tiny.wav").read_bytes(), (folder / "tiny.npy").read_bytes()
