"""Tiny random-weight Spark-TTS audio-tokenizer checkpoint in the *published* layout (minus the LLM).

Tests need to run the real loading and model code without the 2 GB checkpoint. :func:`build_tiny_spark_codec` writes,
into a Spark root directory:

* ``config.yaml``: the published 7-key root config, byte for byte (169 bytes);
* ``BiCodec/config.yaml``: every key of the published file, widths shrunk (models.md D.1) but the structural constants
  kept: 8192 semantic ids, 32 global tokens, FSQ levels ``[4]*6`` (4096 global ids), rates ``[8, 5, 4, 2]`` (320
  samples per token), two sampling stages;
* ``BiCodec/model.safetensors``: exactly the published tensor *names*, shrunk shapes, including the tensors inference
  never uses (postnet, ECAPA x-vector head, ``quantizer.cluster_size``) so strict loading is exercised. The widths the
  original hard-wires (ECAPA 512/1536, ...) are shrunk too: our loader infers them from the shapes;
* ``wav2vec2-large-xlsr-53/``: a ``Wav2Vec2ForPreTraining``-style ``config.json`` (hidden 32, 17 layers so that
  ``hidden_states[16]`` is an intermediate layer), the stock ``preprocessor_config.json`` and a ``pytorch_model.bin``
  with ``wav2vec2.``-prefixed keys, old-style ``weight_g/weight_v`` positional-conv names and pre-training heads.

Weights come from a seeded ``torch.Generator`` with name-based rules (no global RNG, independent of library init
code), so a seed always gives the same files. The LLM folder is written by a separate builder
(``flashtts_core.testing.tiny_llm``) into the same root. torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashtts_core.engines.spark.config import BiCodecDims

if TYPE_CHECKING:
    import torch

__all__ = (
    "ROOT_CONFIG_YAML",
    "TINY_BICODEC_CONFIG_YAML",
    "TINY_BICODEC_DIMS",
    "TINY_WAV2VEC2_CONFIG",
    "build_tiny_spark_codec",
    "write_root_config",
    "write_tiny_bicodec",
    "write_tiny_wav2vec2",
)

logger = logging.getLogger(__name__)

#: The published root ``config.yaml`` (169 bytes).
ROOT_CONFIG_YAML = """\
highpass_cutoff_freq: 40
sample_rate: 16000
segment_duration: 2.4 # (s)
max_val_duration: 12 # (s)
latent_hop_length: 320
ref_segment_duration: 6
volume_normalize: true
"""

#: ``BiCodec/config.yaml`` with every published key and tiny widths (constraints of models.md A.3 hold).
TINY_BICODEC_CONFIG_YAML = """\
audio_tokenizer:
  mel_params:
    sample_rate: 16000
    n_fft: 1024
    win_length: 640
    hop_length: 320
    mel_fmin: 10
    mel_fmax: null
    num_mels: 16

  encoder:
    input_channels: 32
    vocos_dim: 16
    vocos_intermediate_dim: 32
    vocos_num_layers: 1
    out_channels: 24
    sample_ratios: [1, 1]

  decoder:
    input_channel: 24
    channels: 32
    rates: [8, 5, 4, 2]
    kernel_sizes: [16, 11, 8, 4]

  quantizer:
    input_dim: 24
    codebook_size: 8192
    codebook_dim: 4
    commitment: 0.25
    codebook_loss_weight: 2.0
    use_l2_normlize: True
    threshold_ema_dead_code: 0.2

  speaker_encoder:
    input_dim: 16
    out_dim: 24
    latent_dim: 8
    token_num: 32
    fsq_levels: [4, 4, 4, 4, 4, 4]
    fsq_num_quantizers: 1

  prenet:
    input_channels: 24
    vocos_dim: 16
    vocos_intermediate_dim: 32
    vocos_num_layers: 1
    out_channels: 24
    condition_dim: 24
    sample_ratios: [1, 1]
    use_tanh_at_final: False

  postnet:
    input_channels: 24
    vocos_dim: 16
    vocos_intermediate_dim: 32
    vocos_num_layers: 1
    out_channels: 32
    use_tanh_at_final: False
"""

#: Hard-wired widths shrunk for the tiny file (the real ones are the defaults of :class:`BiCodecDims`).
TINY_BICODEC_DIMS = BiCodecDims(
    ecapa_channels=16,
    ecapa_scale=8,
    ecapa_se_bottleneck=8,
    ecapa_merge_channels=48,
    ecapa_pool_bottleneck=8,
    perceiver_depth=2,
    perceiver_heads=1,
    perceiver_dim_head=64,
    perceiver_ff_inner=int(8 * 4 * 2 / 3),
    sampling_backbone_layers=2,
)

#: ``config.json`` of the tiny wav2vec2: the published key set with shrunk widths (hidden = encoder.input_channels).
TINY_WAV2VEC2_CONFIG: dict[str, Any] = {
    "activation_dropout": 0.0,
    "apply_spec_augment": True,
    "architectures": ["Wav2Vec2ForPreTraining"],
    "attention_dropout": 0.1,
    "bos_token_id": 1,
    "codevector_dim": 16,
    "contrastive_logits_temperature": 0.1,
    "conv_bias": True,
    "conv_dim": [8, 8, 8, 8, 8, 8, 8],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "diversity_loss_weight": 0.1,
    "do_stable_layer_norm": True,
    "eos_token_id": 2,
    "feat_extract_activation": "gelu",
    "feat_extract_dropout": 0.0,
    "feat_extract_norm": "layer",
    "feat_proj_dropout": 0.1,
    "feat_quantizer_dropout": 0.0,
    "final_dropout": 0.0,
    "gradient_checkpointing": True,  # in the published file; must be harmless at inference (eval mode)
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "layerdrop": 0.1,
    "mask_channel_length": 10,
    "mask_channel_min_space": 1,
    "mask_channel_other": 0.0,
    "mask_channel_prob": 0.0,
    "mask_channel_selection": "static",
    "mask_feature_length": 10,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_space": 1,
    "mask_time_other": 0.0,
    "mask_time_prob": 0.075,
    "mask_time_selection": "static",
    "model_type": "wav2vec2",
    "num_attention_heads": 2,
    "num_codevector_groups": 2,
    "num_codevectors_per_group": 8,
    "num_conv_pos_embedding_groups": 2,
    "num_conv_pos_embeddings": 16,
    "num_feat_extract_layers": 7,
    "num_hidden_layers": 17,
    "num_negatives": 100,
    "pad_token_id": 0,
    "proj_codevector_dim": 16,
    "transformers_version": "4.7.0.dev0",
    "vocab_size": 32,
}

_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_normalize": True,
    "feature_extractor_type": "Wav2Vec2FeatureExtractor",
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0,
    "return_attention_mask": True,
    "sampling_rate": 16000,
}


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A plausible random value for a tensor named ``key``: keeps activations O(1) in a random network."""
    import torch

    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.tensor(1000, dtype=torch.int64)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen)

    def normal(std: float) -> torch.Tensor:
        return std * torch.randn(shape, generator=gen)

    if leaf == "running_var":
        return uniform(0.5, 1.5)
    if leaf in ("running_mean", "bias"):
        return normal(0.02)
    if leaf == "alpha":  # snake
        return uniform(0.5, 1.5)
    if leaf in ("weight_g", "original0"):  # weight-norm gains: < 1 so the residual stacks do not blow up
        return uniform(0.4, 0.8)
    if leaf == "gamma":  # ConvNeXt layer scale, RMSNorm gain
        return uniform(0.5, 1.0)
    if leaf == "cluster_size":
        return uniform(0.0, 10.0)
    if leaf == "masked_spec_embed":
        return uniform(0.0, 1.0)
    if len(shape) == 1:  # LayerNorm / BatchNorm weights
        return 1.0 + normal(0.1)
    if leaf in ("latents", "codevectors") or key.endswith("codebook.weight"):
        return normal(1.0)
    fan_in = math.prod(shape[1:])
    return normal(1.0 / math.sqrt(fan_in))


def write_root_config(root: Path) -> Path:
    """Write the published root ``config.yaml`` into ``root``; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(ROOT_CONFIG_YAML, encoding="utf-8")
    return path


def write_tiny_bicodec(codec_dir: Path, *, seed: int = 0) -> Path:
    """Write ``config.yaml`` and ``model.safetensors`` of a tiny BiCodec into ``codec_dir``; returns ``codec_dir``."""
    import torch
    from safetensors.torch import save_file

    from flashtts_core.engines.spark.config import load_bicodec_config
    from flashtts_core.engines.spark.modeling_bicodec import SparkBiCodecModel, bicodec_unused_shapes

    codec_dir.mkdir(parents=True, exist_ok=True)
    (codec_dir / "config.yaml").write_text(TINY_BICODEC_CONFIG_YAML, encoding="utf-8")
    config = load_bicodec_config(codec_dir / "config.yaml")
    with torch.device("meta"):
        model = SparkBiCodecModel(config, TINY_BICODEC_DIMS)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict(keep_vars=True).items()}
    shapes.update(bicodec_unused_shapes(config, TINY_BICODEC_DIMS))
    gen = torch.Generator().manual_seed(seed)
    tensors = {key: _random_tensor(key, shape, gen).contiguous() for key, shape in shapes.items()}
    save_file(tensors, str(codec_dir / "model.safetensors"), metadata={"format": "pt"})
    return codec_dir


def write_tiny_wav2vec2(w2v_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny ``wav2vec2-large-xlsr-53`` folder (config, preprocessor config, ``pytorch_model.bin``)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    w2v_dir.mkdir(parents=True, exist_ok=True)
    (w2v_dir / "config.json").write_text(json.dumps(TINY_WAV2VEC2_CONFIG, indent=2) + "\n", encoding="utf-8")
    (w2v_dir / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR_CONFIG, indent=2) + "\n")
    with torch.device("meta"):
        model = Wav2Vec2ForPreTraining(Wav2Vec2Config(**TINY_WAV2VEC2_CONFIG))
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        # The published file predates weight-norm parametrizations: store the old names, like the real one.
        name = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )
        state[name] = _random_tensor(name, tuple(tensor.shape), gen).contiguous()
    torch.save(state, w2v_dir / "pytorch_model.bin")
    return w2v_dir


def build_tiny_spark_codec(out_dir: Path, *, seed: int = 0) -> Path:
    """Write ``config.yaml``, ``BiCodec/`` and ``wav2vec2-large-xlsr-53/`` of a tiny Spark-TTS root into ``out_dir``.

    Deterministic for a seed; about 1 MB. Returns ``out_dir`` (created if needed). The ``LLM/`` folder is not written.
    """
    out_dir = Path(out_dir)
    write_root_config(out_dir)
    write_tiny_bicodec(out_dir / "BiCodec", seed=seed)
    write_tiny_wav2vec2(out_dir / "wav2vec2-large-xlsr-53", seed=seed + 1)
    logger.debug("built tiny Spark codec in %s (seed %d)", out_dir, seed)
    return out_dir
