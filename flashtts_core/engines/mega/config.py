"""Configuration of the MegaTTS3 components, read from the published YAML files and the checkpoints' tensor shapes.

The published ``ByteDance/MegaTTS3`` directory (models.md §C.1) holds one ``config.yaml`` per component. The original
module constructors ignore most of them: almost every width of the aligner, the DiT and the WaveVAE decoder is
hard-wired in code. To load the real files *and* shrunk test files with the same code, every width is resolved in
this order (models.md §D.3):

1. an optional **new key** in the component's YAML (``dit_heads``, ``aligner_heads``, ``wavvae_ratios`` …; the
   original code ignores unknown keys, so the real files stay valid);
2. otherwise the **tensor shapes** of the checkpoint (``x_prenet.weight`` is ``(dim, latent)``, ...);
3. otherwise the **published value** (the defaults of the Structs below).

Only what shapes cannot tell (attention head counts, upsampling ratios, dilations) needs step 1 for a non-published
size. The duration LM is config-driven upstream; its flags come from ``duration_lm/config.yaml`` and its sizes from
the shapes, cross-checked against the YAML where the YAML states them.

The original reads YAML with a custom loader (``base_config`` inheritance, ``${...}`` expressions). Here
``base_config`` files are merged when they exist beside the file (the published directory has none), and a value that
is still an unresolved ``${...}`` string falls back to the default with a warning.

No torch here: this module is imported before any model is built.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from flashtts_core.errors import CheckpointError

__all__ = (
    "ALIGNER_END",
    "ALIGNER_START",
    "ALIGNER_TIMESTAMP_BASE",
    "CFG_PHONE",
    "CFG_TONE",
    "COMPONENT_DIRS",
    "LATENT_FRAME_SAMPLES",
    "MEL_FRAMES_PER_LATENT",
    "SAMPLE_RATE",
    "MegaAlignerDims",
    "MegaDiTDims",
    "MegaDurationDims",
    "MegaGlobalConfig",
    "MegaWaveVAEDims",
    "infer_aligner_dims",
    "infer_dit_dims",
    "infer_duration_dims",
    "infer_wavvae_dims",
    "load_global_config",
    "read_yaml_config",
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The five sub-folders of a MegaTTS3 directory (detection and loading).
COMPONENT_DIRS: tuple[str, ...] = ("aligner_lm", "diffusion_transformer", "duration_lm", "g2p", "wavvae")

SAMPLE_RATE = 24000  # output and prompt rate (hard-wired upstream)
MEL_FRAMES_PER_LATENT = 4  # 100 Hz mel frames per 25 Hz latent frame (DiT ling_pre_net ÷4, WaveVAE vae_stride)
LATENT_FRAME_SAMPLES = 960  # 24 kHz samples per latent frame
CFG_PHONE = 301  # phone id of the unconditional CFG row (last row of the DiT phone table)
CFG_TONE = 31  # tone id of the unconditional CFG row
ALIGNER_START = 798  # aligner decoder start token
ALIGNER_END = 799  # aligner decoder end token
ALIGNER_TIMESTAMP_BASE = 800  # aligner token 800 + f = end of a phone at mel frame f

Shapes = Mapping[str, Sequence[int]]


# --- YAML -----------------------------------------------------------------------------------------------------------


def _load_yaml_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found: is this a MegaTTS3 model directory?") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml_config(path: str | os.PathLike[str], *, _depth: int = 0) -> dict[str, Any]:
    """Read one component's ``config.yaml`` (with its ``base_config`` files merged underneath when they exist)."""
    path = Path(path)
    data = _load_yaml_file(path)
    bases = data.pop("base_config", None)
    if bases and _depth < 8:
        merged: dict[str, Any] = {}
        for base in [bases] if isinstance(bases, str) else list(bases):
            base_path = (path.parent / str(base)).resolve()
            if base_path.is_file():
                merged = _merge(merged, read_yaml_config(base_path, _depth=_depth + 1))
            else:
                # The published folders reference training-repo files that are not shipped; nothing we need is there.
                logger.debug("%s: base_config %s not found; using this file alone", path, base)
        data = _merge(merged, data)
    return data


_EXPR = re.compile(r"\$\{.*\}")


def _value(data: Mapping[str, Any], key: str, kind: type[_T], default: _T, *, source: Path | str) -> _T:
    """``data[key]`` converted to ``kind``; the default when absent or an unresolved ``${...}`` expression."""
    if key not in data or data[key] is None:
        return default
    raw = data[key]
    if isinstance(raw, str) and _EXPR.search(raw):
        logger.warning(
            "%s: %s = %r is an expression this loader does not evaluate; using %r", source, key, raw, default
        )
        return default
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise CheckpointError(f"{source}: {key} = {raw!r} is not a valid {getattr(kind, '__name__', kind)}") from exc


class MegaGlobalConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Hyper-parameters of the inference pipeline (``diffusion_transformer/config.yaml``, the original's global
    hparams; ``aligner_lm/config.yaml`` as a fallback) and of ``wavvae/config.yaml``."""

    win_size: int = 960  # the prompt wav is padded to this grid before the 12000-sample tail (C.4 step 1)
    frames_multiple: int = 8  # mel lengths are multiples of this (DiT ÷4 plus one more halving of slack)
    hop_size: int = 240  # WaveVAE samples per mel frame (24 kHz / 100 Hz)
    vae_stride: int = 4  # mel frames per latent frame
    use_tanh: bool | None = None  # ``melgan_config.use_tanh``; the checkpoint decides (model_up.13 present → False)
    wavvae_ratios: tuple[int, ...] = (5, 4, 4, 3)  # new key: generator upsampling ratios (product = hop_size)
    aligner_heads: int = 8  # new key: aligner attention heads (width 512 / head 64 upstream)
    dit_heads: int = 16  # new key: DiT backbone heads (width 1024 / head 64 upstream)
    dur_num_heads: int = 8  # new key: duration-LM decoder heads (the layer's constructor default upstream)

    def __post_init__(self) -> None:
        problems = []
        if self.win_size < 1 or self.frames_multiple < 1:
            problems.append("win_size and frames_multiple must be positive")
        if self.frames_multiple % MEL_FRAMES_PER_LATENT:
            problems.append(f"frames_multiple {self.frames_multiple} must be a multiple of {MEL_FRAMES_PER_LATENT}")
        if self.vae_stride != MEL_FRAMES_PER_LATENT:
            problems.append(f"vae_stride {self.vae_stride} != {MEL_FRAMES_PER_LATENT} (25 Hz latents, 100 Hz mels)")
        if self.hop_size * self.vae_stride != LATENT_FRAME_SAMPLES:
            problems.append(f"hop_size {self.hop_size} x vae_stride {self.vae_stride} != {LATENT_FRAME_SAMPLES}")
        product = 1
        for ratio in self.wavvae_ratios:
            product *= ratio
        if product != self.hop_size or any(r < 1 for r in self.wavvae_ratios):
            problems.append(f"wavvae_ratios {list(self.wavvae_ratios)} must multiply to hop_size {self.hop_size}")
        if min(self.aligner_heads, self.dit_heads, self.dur_num_heads) < 1:
            problems.append("head counts must be positive")
        if problems:
            raise CheckpointError("inconsistent MegaTTS3 configuration: " + "; ".join(problems))


def load_global_config(model_dir: str | os.PathLike[str]) -> tuple[MegaGlobalConfig, dict[str, Any]]:
    """Read the pipeline settings from the component YAMLs; returns them and the duration LM's raw YAML mapping."""
    root = Path(model_dir)
    dit_path = root / "diffusion_transformer" / "config.yaml"
    aligner_path = root / "aligner_lm" / "config.yaml"
    wavvae_path = root / "wavvae" / "config.yaml"
    dur_path = root / "duration_lm" / "config.yaml"
    dit = read_yaml_config(dit_path)
    aligner = read_yaml_config(aligner_path)
    wavvae = read_yaml_config(wavvae_path)
    dur = read_yaml_config(dur_path)
    base = MegaGlobalConfig()
    melgan = wavvae.get("melgan_config") if isinstance(wavvae.get("melgan_config"), Mapping) else {}

    def pipeline(key: str, kind: type[_T], default: _T) -> _T:
        if key in dit:
            return _value(dit, key, kind, default, source=dit_path)
        return _value(aligner, key, kind, default, source=aligner_path)

    use_tanh = _value(melgan, "use_tanh", bool, None, source=wavvae_path)  # type: ignore[arg-type]
    hop = _value(wavvae, "hop_size", int, base.hop_size, source=wavvae_path)
    frame_shift = _value(melgan, "frame_shift", int, hop, source=wavvae_path)
    if frame_shift != hop:
        raise CheckpointError(f"{wavvae_path}: melgan_config.frame_shift {frame_shift} != hop_size {hop}")
    config = MegaGlobalConfig(
        win_size=pipeline("win_size", int, base.win_size),
        frames_multiple=pipeline("frames_multiple", int, base.frames_multiple),
        hop_size=hop,
        vae_stride=_value(wavvae, "vae_stride", int, base.vae_stride, source=wavvae_path),
        use_tanh=use_tanh,
        wavvae_ratios=tuple(_value(wavvae, "wavvae_ratios", list[int], list(base.wavvae_ratios), source=wavvae_path)),
        aligner_heads=_value(aligner, "aligner_heads", int, base.aligner_heads, source=aligner_path),
        dit_heads=_value(dit, "dit_heads", int, base.dit_heads, source=dit_path),
        dur_num_heads=_value(dur, "dur_num_heads", int, base.dur_num_heads, source=dur_path),
    )
    return config, dur


# --- shape inference ------------------------------------------------------------------------------------------------


def _count(shapes: Shapes, pattern: str) -> int:
    """Number of distinct N for which a key matches ``pattern`` (a regex with one ``(\\d+)`` group)."""
    regex = re.compile(pattern)
    return len({int(m.group(1)) for key in shapes if (m := regex.fullmatch(key))})


def _dim(shapes: Shapes, key: str, axis: int, default: int) -> int:
    shape = shapes.get(key)
    return int(shape[axis]) if shape is not None and len(shape) > axis else default


class MegaAlignerDims(msgspec.Struct, frozen=True, kw_only=True):
    """The Whisper-style aligner (C.2.1); defaults are the published (hard-wired) values."""

    n_mels: int = 80
    audio_ctx: int = 3000  # encoder positions (after the stride-2 conv): 60 s of 100 Hz mel frames
    text_ctx: int = 2048
    width: int = 512
    heads: int = 8
    mlp_hidden: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    vocab_size: int = 6800  # 800 merged phone ids + 6000 timestamps


def infer_aligner_dims(shapes: Shapes, *, heads: int = 8) -> MegaAlignerDims:
    base = MegaAlignerDims()
    width = _dim(shapes, "encoder.conv1.weight", 0, base.width)
    if width % heads:
        raise CheckpointError(f"aligner width {width} is not divisible by aligner_heads {heads}")
    return MegaAlignerDims(
        n_mels=_dim(shapes, "encoder.conv1.weight", 1, base.n_mels),
        audio_ctx=_dim(shapes, "encoder.positional_embedding", 0, base.audio_ctx),
        text_ctx=_dim(shapes, "decoder.positional_embedding", 0, base.text_ctx),
        width=width,
        heads=heads,
        mlp_hidden=_dim(shapes, "encoder.blocks.0.mlp.0.weight", 0, base.mlp_hidden),
        encoder_layers=_count(shapes, r"encoder\.blocks\.(\d+)\.attn_ln\.weight") or base.encoder_layers,
        decoder_layers=_count(shapes, r"decoder\.blocks\.(\d+)\.attn_ln\.weight") or base.decoder_layers,
        vocab_size=_dim(shapes, "decoder.token_embedding.weight", 0, base.vocab_size),
    )


class MegaDiTDims(msgspec.Struct, frozen=True, kw_only=True):
    """The latent diffusion transformer ``llm_dit`` (C.2.4); defaults are the published (hard-wired) values."""

    dim: int = 1024
    heads: int = 16
    layers: int = 24
    ffn_hidden: int = 2048
    latent_dim: int = 32
    local_cond_dim: int = 512
    ctx_mask_dim: int = 16
    time_freq_dim: int = 256
    phone_vocab: int = 302
    tone_vocab: int = 32
    text_hidden: int = 1024
    text_filter: int = 2048
    text_heads: int = 4
    text_layers: int = 6
    text_kernel: int = 3
    text_window: int = 4
    text_prenet_layers: int = 3
    text_prenet_kernel: int = 5
    ling_downsample_layers: int = 2  # stride-2 convolutions: 100 Hz → 25 Hz
    ling_kernel: int = 4


def infer_rel_encoder_dims(shapes: Shapes, prefix: str, defaults: MegaDiTDims | None = None) -> dict[str, int]:
    """Widths of a RelTransformer text encoder under ``prefix`` (e.g. ``ph_encoder.``): hidden, filter, heads, ..."""
    base = defaults or MegaDiTDims()
    hidden = _dim(shapes, prefix + "emb.weight", 1, base.text_hidden)
    k_channels = _dim(shapes, prefix + "encoder.attn_layers.0.emb_rel_k", 2, hidden // base.text_heads)
    if k_channels <= 0 or hidden % k_channels:
        raise CheckpointError(f"{prefix}emb_rel_k width {k_channels} does not divide the hidden size {hidden}")
    window_rows = _dim(shapes, prefix + "encoder.attn_layers.0.emb_rel_k", 1, 2 * base.text_window + 1)
    return {
        "vocab": _dim(shapes, prefix + "emb.weight", 0, base.phone_vocab),
        "hidden": hidden,
        "filter": _dim(shapes, prefix + "encoder.ffn_layers.0.conv_1.weight", 0, base.text_filter),
        "kernel": _dim(shapes, prefix + "encoder.ffn_layers.0.conv_1.weight", 2, base.text_kernel),
        "heads": hidden // k_channels,
        "layers": _count(shapes, re.escape(prefix) + r"encoder\.attn_layers\.(\d+)\.conv_q\.weight")
        or base.text_layers,
        "window": (window_rows - 1) // 2,
        # No ``pre.*`` keys in a real file means no prenet; with no shapes at all, the published layout.
        "prenet_layers": _count(shapes, re.escape(prefix) + r"pre\.conv_layers\.(\d+)\.weight")
        if shapes
        else base.text_prenet_layers,
        "prenet_kernel": _dim(shapes, prefix + "pre.conv_layers.0.weight", 2, base.text_prenet_kernel),
    }


def infer_dit_dims(shapes: Shapes, *, heads: int = 16) -> MegaDiTDims:
    base = MegaDiTDims()
    dim = _dim(shapes, "x_prenet.weight", 0, base.dim)
    if dim % heads or (dim // heads) % 2:
        raise CheckpointError(f"DiT width {dim} must split into dit_heads {heads} heads of an even size")
    text = infer_rel_encoder_dims(shapes, "ph_encoder.", base)
    if text["hidden"] != dim:
        raise CheckpointError(f"DiT text encoder width {text['hidden']} != backbone width {dim}")
    return MegaDiTDims(
        dim=dim,
        heads=heads,
        layers=_count(shapes, r"encoder\.layers\.(\d+)\.attention\.wq\.weight") or base.layers,
        ffn_hidden=_dim(shapes, "encoder.layers.0.feed_forward.w1.weight", 0, base.ffn_hidden),
        latent_dim=_dim(shapes, "x_prenet.weight", 1, base.latent_dim),
        local_cond_dim=_dim(shapes, "local_cond_project.weight", 0, base.local_cond_dim),
        ctx_mask_dim=_dim(shapes, "ctx_mask_proj.weight", 0, base.ctx_mask_dim),
        time_freq_dim=_dim(shapes, "f5_time_embed.time_mlp.0.weight", 1, base.time_freq_dim),
        phone_vocab=text["vocab"],
        tone_vocab=_dim(shapes, "tone_embed.weight", 0, base.tone_vocab),
        text_hidden=text["hidden"],
        text_filter=text["filter"],
        text_heads=text["heads"],
        text_layers=text["layers"],
        text_kernel=text["kernel"],
        text_window=text["window"],
        text_prenet_layers=text["prenet_layers"],
        text_prenet_kernel=text["prenet_kernel"],
        ling_downsample_layers=_count(shapes, r"ling_pre_net\.(\d+)\.weight") or base.ling_downsample_layers,
        ling_kernel=_dim(shapes, "ling_pre_net.0.weight", 2, base.ling_kernel),
    )


class MegaWaveVAEDims(msgspec.Struct, frozen=True, kw_only=True):
    """The WaveVAE decoder (C.2.5); defaults are the published (hard-wired) values."""

    latent_dim: int = 32
    latent_hidden: int = 320  # proj_to_decoder output
    upsampler_out: int = 160  # latent_upsampler output (100 Hz)
    first_channels: int = 2048  # 16 * ngf
    ngf: int = 128
    ratios: tuple[int, ...] = (5, 4, 4, 3)
    latent_ratio: int = 4
    resblock_kernels: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)
    use_tanh: bool = False  # True: Tanh at the end; False: a 1x1 Conv1d (model_up.13) instead


def infer_wavvae_dims(shapes: Shapes, config: MegaGlobalConfig) -> MegaWaveVAEDims:
    base = MegaWaveVAEDims()
    ratios = tuple(config.wavvae_ratios)
    stages = _count(shapes, r"decoder\.model_up\.(\d+)\.trans_upsample\.1\.weight_v")
    if stages and stages != len(ratios):
        raise CheckpointError(
            f"the WaveVAE decoder has {stages} upsampling stages but wavvae_ratios lists {len(ratios)}: {list(ratios)}"
        )
    last_conv = 2 + 2 * len(ratios) + 2  # pad, conv, (upsample, mrf) x n, leaky, pad, conv
    kernels = tuple(
        _dim(shapes, f"decoder.model_up.3.block{i + 1}.convs1.0.weight_v", 2, k)
        for i, k in enumerate(base.resblock_kernels)
    )
    has_final_conv = f"decoder.model_up.{last_conv + 1}.weight" in shapes
    use_tanh = not has_final_conv if shapes else bool(config.use_tanh)
    if config.use_tanh is not None and shapes and config.use_tanh != use_tanh:
        logger.warning(
            "wavvae/config.yaml says use_tanh=%s but the checkpoint %s the final 1x1 conv; following the checkpoint",
            config.use_tanh,
            "has" if has_final_conv else "lacks",
        )
    return MegaWaveVAEDims(
        latent_dim=_dim(shapes, "proj_to_decoder.weight", 1, base.latent_dim),
        latent_hidden=_dim(shapes, "proj_to_decoder.weight", 0, base.latent_hidden),
        upsampler_out=_dim(shapes, "latent_upsampler.upsample.3.weight_v", 0, base.upsampler_out),
        first_channels=_dim(shapes, "decoder.model_up.1.weight_v", 0, base.first_channels),
        ngf=_dim(shapes, f"decoder.model_up.{last_conv}.weight_v", 1, base.ngf),
        ratios=ratios,
        latent_ratio=config.vae_stride,
        resblock_kernels=kernels,
        use_tanh=use_tanh,
    )


class MegaDurationDims(msgspec.Struct, frozen=True, kw_only=True):
    """The autoregressive duration LM ``ar_dur`` (C.2.3): flags from ``duration_lm/config.yaml``, sizes from shapes.

    The state-dict layout is not in models.md (§C.2.3 lists only the config keys). The names used here were checked
    against the public MegaTTS3 source (``tts/modules/ar_dur``: ``CodePredictor``/``ARDurPredictor``,
    ``RotTransformerDecoderLayer`` → ``op`` = ``RotDecSALayer``, fairseq-style ``MultiheadAttention`` built with
    ``bias=False``, ``TransformerFFNLayer`` with ``padding='LEFT'``); every optional tensor (FFN biases from
    ``lm_bias``, the char encoder) is still derived from the key set, so the strict loader reports exactly what
    differs from a real file.
    """

    phone_vocab: int = 174  # 171 phones + 3 reserved
    txt_hidden: int = 512  # dur_txt_hs
    hidden: int = 512  # dur_model_hidden_size
    layers: int = 8  # dur_model_layers
    heads: int = 8
    ffn_hidden: int = 2048  # 4 x hidden
    ffn_kernel: int = 1
    ffn_left_pad: bool = True  # ffn_1 is Sequential(ConstantPad1d, Conv1d) → key ``ffn_1.1``
    ffn_conv_out: bool = False  # ffn_2 is a Conv1d (3-D weight) rather than a Linear
    code_size: int = 128  # dur_code_size: duration codes 0..code_size (code_size + 1 classes), BOS = code_size + 1
    ling_labels: tuple[str, ...] = ("tone",)
    ling_vocab: tuple[int, ...] = (35,)  # ling_label_dict_size + 3
    attn_in_bias: bool = False  # upstream builds the decoder attention without biases (``in_proj_bias`` None)
    attn_out_bias: bool = False  # ... and its ``out_proj`` without bias
    ffn_bias: bool = True
    use_rot_embed: bool = True
    use_pos_embed: bool = False
    use_post_ln: bool = False
    lm_use_enc: bool = False  # True: a RelTransformer text encoder instead of a plain phone embedding
    use_ph_pos_embed: bool = False
    mega_use_char: bool = True  # creates the (unused at inference) char encoder + char_empty_embed
    char_vocab: int = 4000
    regression: bool = False  # dur_model_type == 'ar_mse': Softplus regression head
    infer_top_k: int | None = None  # None → argmax
    infer_temperature: float = 1.0


_UNSUPPORTED_DUR_FLAGS = ("use_spk_id", "use_spk_embed", "use_spk_enc", "use_bert_input")


def infer_duration_dims(
    shapes: Shapes, yaml_config: Mapping[str, Any], *, heads: int = 8, source: str = "duration_lm/config.yaml"
) -> MegaDurationDims:
    """Resolve the duration LM's module tree: flags from the YAML, sizes from the checkpoint (checked against the
    YAML values where both exist)."""
    base = MegaDurationDims()
    cfg = yaml_config

    def flag(key: str, default: bool) -> bool:
        return _value(cfg, key, bool, default, source=source)

    for key in _UNSUPPORTED_DUR_FLAGS:
        if flag(key, False):
            raise CheckpointError(
                f"{source}: {key} is true; speaker/BERT conditioning of the duration LM is not supported "
                "(the MegaTTS3 inference pipeline never feeds it)"
            )
    lm_use_enc = flag("lm_use_enc", base.lm_use_enc)
    use_rot = flag("use_rot_embed", base.use_rot_embed)
    if not use_rot:
        raise CheckpointError(f"{source}: use_rot_embed false is not supported (the published model uses rotary)")
    enc_key = "encoder.emb.weight" if lm_use_enc else "encoder.weight"
    txt_hidden = _dim(shapes, enc_key, 1, _value(cfg, "dur_txt_hs", int, base.txt_hidden, source=source))
    hidden = _dim(shapes, "enc_proj.weight", 0, _value(cfg, "dur_model_hidden_size", int, base.hidden, source=source))
    code_size = _dim(shapes, "code_emb.weight", 0, _value(cfg, "dur_code_size", int, base.code_size, source=source) + 2)
    code_size -= 2
    layers = _count(shapes, r"layers\.(\d+)\.op\.layer_norm1\.weight") or _value(
        cfg, "dur_model_layers", int, base.layers, source=source
    )
    problems = []
    for key, found in (
        ("dur_txt_hs", txt_hidden),
        ("dur_model_hidden_size", hidden),
        ("dur_code_size", code_size),
        ("dur_model_layers", layers),
    ):
        stated = _value(cfg, key, int, found, source=source)
        if stated != found:
            problems.append(f"{key} is {stated} in the YAML but {found} in the checkpoint")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    if hidden % heads or (hidden // heads) % 2:
        raise CheckpointError(f"{source}: duration LM width {hidden} must split into {heads} heads of an even size")
    labels = tuple(_value(cfg, "ling_labels", list[str], list(base.ling_labels), source=source))
    sizes = _value(cfg, "ling_label_dict_size", list[int], [v - 3 for v in base.ling_vocab], source=source)
    if len(sizes) != len(labels):
        raise CheckpointError(f"{source}: ling_labels and ling_label_dict_size differ in length")
    ling_vocab = tuple(
        _dim(shapes, f"ling_label_embed_layers.{label}.weight", 0, size + 3)
        for label, size in zip(labels, sizes, strict=True)
    )
    if "tone" not in labels:
        raise CheckpointError(f"{source}: ling_labels {list(labels)} lacks 'tone' (the pipeline passes tones)")
    ffn_prefix = "layers.0.op.ffn."
    left_pad = f"{ffn_prefix}ffn_1.weight" not in shapes
    conv_key = f"{ffn_prefix}ffn_1.1.weight" if left_pad else f"{ffn_prefix}ffn_1.weight"
    top_k = _value(cfg, "infer_top_k", int, 0, source=source) or None
    model_type = _value(cfg, "dur_model_type", str, "ar_dur", source=source)
    return MegaDurationDims(
        phone_vocab=_dim(shapes, enc_key, 0, base.phone_vocab),
        txt_hidden=txt_hidden,
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn_hidden=_dim(shapes, conv_key, 0, 4 * hidden),
        ffn_kernel=_dim(shapes, conv_key, 2, 1),
        ffn_left_pad=left_pad,
        ffn_conv_out=len(shapes.get(f"{ffn_prefix}ffn_2.weight", (0, 0))) == 3,
        code_size=code_size,
        ling_labels=labels,
        ling_vocab=ling_vocab,
        attn_in_bias="layers.0.op.self_attn.in_proj_bias" in shapes,
        attn_out_bias="layers.0.op.self_attn.out_proj.bias" in shapes,
        ffn_bias=f"{ffn_prefix}ffn_2.bias" in shapes if shapes else True,
        use_rot_embed=use_rot,
        use_pos_embed=flag("use_pos_embed", base.use_pos_embed),
        use_post_ln=flag("use_post_ln", base.use_post_ln),
        lm_use_enc=lm_use_enc,
        use_ph_pos_embed=flag("use_ph_pos_embed", base.use_ph_pos_embed),
        # The char encoder is unused at inference; follow the file (the YAML default is true even when absent). It is an
        # Embedding (``char_encoder.weight``), or a RelTransformer (``char_encoder.emb.weight``, ...) with lm_use_enc.
        mega_use_char=any(k.startswith("char_encoder.") for k in shapes)
        if shapes
        else flag("mega_use_char", base.mega_use_char),
        char_vocab=_dim(
            shapes,
            "char_encoder.emb.weight" if lm_use_enc else "char_encoder.weight",
            0,
            _value(cfg, "char_dict_size", int, 4000, source=source),
        ),
        regression=model_type == "ar_mse",
        infer_top_k=top_k,
        infer_temperature=_value(cfg, "infer_temperature", float, 1.0, source=source),
    )
