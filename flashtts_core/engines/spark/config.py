"""Configuration Structs of the Spark-TTS audio tokenizer (BiCodec), decoded from the published YAML files unchanged.

Two files configure BiCodec in the published ``Spark-TTS-0.5B`` directory:

* the root ``config.yaml`` (7 keys: sample rate, hop, reference-clip duration, ...) → :class:`SparkRootConfig`;
* ``BiCodec/config.yaml`` whose single top-level key ``audio_tokenizer`` holds one sub-tree per module
  → :class:`BiCodecConfig`. Some public copies append the root keys at the bottom; unknown keys are ignored.

Every width the YAML states comes from it. Several widths the original code *hard-wires* (ECAPA width 512, merge width
1536, Res2 scale 8, perceiver depth 2 / heads 8, 2-block backbones in the sampling stages) are not in the YAML; they are
inferred from the tensor shapes of ``model.safetensors`` by :func:`infer_bicodec_dims` (defaults = the published
values), so the real file and a shrunk test file both load with the same code and the same key names.

No torch here: this module is imported before any model is built.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from flashtts_core.errors import CheckpointError

__all__ = (
    "BiCodecConfig",
    "BiCodecDims",
    "SparkFeatureDecoderConfig",
    "SparkFeatureEncoderConfig",
    "SparkMelConfig",
    "SparkQuantizerConfig",
    "SparkRootConfig",
    "SparkSpeakerEncoderConfig",
    "SparkWaveGeneratorConfig",
    "infer_bicodec_dims",
    "load_bicodec_config",
    "load_root_config",
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T", bound=msgspec.Struct)


class _Section(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every YAML section: unknown keys are tolerated (ignored), values are immutable."""


class SparkRootConfig(_Section):
    """The root ``config.yaml`` of a Spark-TTS directory (A.2)."""

    highpass_cutoff_freq: float = 40  # never used at inference (helper exists upstream, never called)
    sample_rate: int = 16000  # model sample rate; reference audio is resampled to it
    segment_duration: float = 2.4  # training crop (s), unused here
    max_val_duration: float = 12  # training (s), unused here
    latent_hop_length: int = 320  # samples per semantic token; the reference clip is rounded down to it
    ref_segment_duration: float = 6  # seconds of reference audio that feed the global (speaker) tokens
    volume_normalize: bool = True  # the original normalises reference loudness (A.8 step 3)

    @property
    def reference_length(self) -> int:
        """Samples in the speaker clip: ``int(sample_rate * ref_segment_duration)`` rounded down to the hop."""
        return int(self.sample_rate * self.ref_segment_duration) // self.latent_hop_length * self.latent_hop_length


class SparkMelConfig(_Section):
    """``mel_params``: the linear-magnitude slaney mel front-end of the speaker branch."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 640  # periodic Hann of 640 zero-padded to n_fft
    hop_length: int = 320
    mel_fmin: float = 10
    mel_fmax: float | None = None  # None means Nyquist
    num_mels: int = 128


class SparkFeatureEncoderConfig(_Section):
    """``encoder``: wav2vec2 features → VocosBackbone → sampling stages → Linear (A.5.4)."""

    input_channels: int = 1024  # = wav2vec2 hidden_size
    vocos_dim: int = 384
    vocos_intermediate_dim: int = 2048
    vocos_num_layers: int = 12
    out_channels: int = 1024  # = quantizer.input_dim
    sample_ratios: tuple[int, ...] = (1, 1)  # one sampling stage per entry; only ratio 1 exists in the checkpoint


class SparkFeatureDecoderConfig(_Section):
    """``prenet`` / ``postnet``: Linear → sampling stages → (conditioned) VocosBackbone → Linear (A.5.5)."""

    input_channels: int = 1024
    vocos_dim: int = 384
    vocos_intermediate_dim: int = 2048
    vocos_num_layers: int = 12
    out_channels: int = 1024
    condition_dim: int | None = None  # set for the prenet: AdaLayerNorm conditioned on the d-vector
    sample_ratios: tuple[int, ...] = (1, 1)
    use_tanh_at_final: bool = False


class SparkWaveGeneratorConfig(_Section):
    """``decoder``: the DAC-style wave generator (A.5.8). Note the key spelling ``input_channel`` (singular)."""

    input_channel: int = 1024
    channels: int = 1536  # halved after each upsampling block
    rates: tuple[int, ...] = (8, 5, 4, 2)  # product = samples per token (320)
    kernel_sizes: tuple[int, ...] = (16, 11, 8, 4)


class SparkQuantizerConfig(_Section):
    """``quantizer``: the factorised VQ of the semantic tokens (A.5.6)."""

    input_dim: int = 1024
    codebook_size: int = 8192  # semantic vocabulary
    codebook_dim: int = 8
    # Training-only keys, kept so the file round-trips; lookup is always L2-normalised.
    commitment: float = 0.25
    codebook_loss_weight: float = 2.0
    use_l2_normlize: bool = True  # (sic)
    threshold_ema_dead_code: float = 0.2


class SparkSpeakerEncoderConfig(_Section):
    """``speaker_encoder``: ECAPA-TDNN → perceiver → residual FSQ → d-vector (A.5.7)."""

    input_dim: int = 128  # = mel_params.num_mels
    out_dim: int = 1024  # d-vector width = prenet.condition_dim
    latent_dim: int = 128  # perceiver width
    token_num: int = 32  # global tokens per utterance
    fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)  # 4**6 = 4096 global ids
    fsq_num_quantizers: int = 1

    @property
    def global_codebook_size(self) -> int:
        """Number of distinct global ids (product of the FSQ levels)."""
        return math.prod(self.fsq_levels)


class BiCodecConfig(_Section):
    """The ``audio_tokenizer`` sub-tree of ``BiCodec/config.yaml``; cross-field constraints of A.3 are checked."""

    mel_params: SparkMelConfig = SparkMelConfig()
    encoder: SparkFeatureEncoderConfig = SparkFeatureEncoderConfig()
    decoder: SparkWaveGeneratorConfig = SparkWaveGeneratorConfig()
    quantizer: SparkQuantizerConfig = SparkQuantizerConfig()
    speaker_encoder: SparkSpeakerEncoderConfig = SparkSpeakerEncoderConfig()
    prenet: SparkFeatureDecoderConfig = SparkFeatureDecoderConfig(condition_dim=1024)
    postnet: SparkFeatureDecoderConfig = SparkFeatureDecoderConfig(vocos_num_layers=6)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, ratios in (
            ("encoder", self.encoder.sample_ratios),
            ("prenet", self.prenet.sample_ratios),
            ("postnet", self.postnet.sample_ratios),
        ):
            if any(r != 1 for r in ratios):
                problems.append(
                    f"{name}.sample_ratios {list(ratios)}: only ratio 1 (the published layout) is supported"
                )
        dec = self.decoder
        if len(dec.rates) != len(dec.kernel_sizes):
            problems.append("decoder.rates and decoder.kernel_sizes differ in length")
        if dec.channels % (2 ** len(dec.rates)):
            problems.append(f"decoder.channels {dec.channels} is not divisible by 2**{len(dec.rates)}")
        if math.prod(dec.rates) != self.mel_params.hop_length:
            problems.append(f"prod(decoder.rates) {math.prod(dec.rates)} != mel_params.hop_length")
        spk = self.speaker_encoder
        if spk.input_dim != self.mel_params.num_mels:
            problems.append("speaker_encoder.input_dim != mel_params.num_mels")
        if any(level < 2 for level in spk.fsq_levels) or spk.fsq_num_quantizers < 1:
            problems.append("speaker_encoder.fsq_levels must be >= 2 and fsq_num_quantizers >= 1")
        if self.encoder.out_channels != self.quantizer.input_dim:
            problems.append("encoder.out_channels != quantizer.input_dim")
        if self.quantizer.input_dim != self.prenet.input_channels:
            problems.append("quantizer.input_dim != prenet.input_channels")
        if not spk.out_dim == self.prenet.condition_dim == self.prenet.out_channels == dec.input_channel:
            problems.append(
                "speaker_encoder.out_dim, prenet.condition_dim, prenet.out_channels and decoder.input_channel "
                "must be equal (the d-vector is added to the prenet output)"
            )
        if problems:
            raise ValueError("; ".join(problems))


class BiCodecDims(msgspec.Struct, frozen=True, kw_only=True):
    """Widths the original code hard-wires; defaults are the published values, :func:`infer_bicodec_dims` reads them."""

    ecapa_channels: int = 512  # "GLOB_c512"
    ecapa_scale: int = 8  # Res2 groups (7 convolved + 1 passed through)
    ecapa_se_bottleneck: int = 128
    ecapa_merge_channels: int = 1536  # 3 * 512 in the original: width of the merge conv and perceiver context
    ecapa_pool_bottleneck: int = 128  # attentive statistics pooling (training head)
    perceiver_depth: int = 2
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    perceiver_ff_inner: int = 341  # int(latent_dim * ff_mult 4 * 2/3) for latent_dim 128
    sampling_backbone_layers: int = 2  # ConvNeXt blocks inside each sampling stage


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found: is this a Spark-TTS model directory?") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from exc


def _convert(data: Any, cls: type[_T], path: Path) -> _T:
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_root_config(path: str | os.PathLike[str]) -> SparkRootConfig:
    """Read the root ``config.yaml``; unknown keys are ignored, a malformed file raises :class:`CheckpointError`."""
    path = Path(path)
    data = _read_yaml(path)
    if isinstance(data, Mapping) and "base_config" in data:
        # The original merges a base file here; the published directory never has one.
        logger.warning("%s: 'base_config' is not supported and is ignored", path)
    return _convert(data, SparkRootConfig, path)


def load_bicodec_config(path: str | os.PathLike[str]) -> BiCodecConfig:
    """Read ``BiCodec/config.yaml`` (its ``audio_tokenizer`` sub-tree) into a validated :class:`BiCodecConfig`."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("audio_tokenizer"), Mapping):
        raise CheckpointError(f"{path} has no 'audio_tokenizer' mapping: is this a BiCodec config.yaml?")
    return _convert(data["audio_tokenizer"], BiCodecConfig, path)


def _count_indices(shapes: Mapping[str, Sequence[int]], pattern: str) -> int:
    """Number of distinct integers N for which some key matches ``pattern`` (a regex with one ``(\\d+)`` group)."""
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in shapes if (m := regex.fullmatch(key))}
    return len(found)


def infer_bicodec_dims(shapes: Mapping[str, Sequence[int]], *, defaults: BiCodecDims | None = None) -> BiCodecDims:
    """Read the hard-wired widths from the checkpoint's key → shape map (e.g. the safetensors header).

    Keys that are absent fall back to ``defaults`` (the published values); the strict loader then reports them.
    The perceiver's head split is not visible in the shapes: ``dim_head`` keeps its default (64) and the head count
    is ``to_q`` rows / ``dim_head``.
    """
    base = defaults or BiCodecDims()
    ecapa = "speaker_encoder.speaker_encoder."
    perceiver = "speaker_encoder.perceiver_sampler."

    def rows(key: str, fallback: int) -> int:
        shape = shapes.get(key)
        return int(shape[0]) if shape else fallback

    res2 = _count_indices(shapes, re.escape(ecapa) + r"layer2\.se_res2block\.1\.convs\.(\d+)\.weight")
    depth = _count_indices(shapes, re.escape(perceiver) + r"layers\.(\d+)\.0\.to_q\.weight")
    sampling = _count_indices(shapes, r"encoder\.downsample\.0\.1\.convnext\.(\d+)\.dwconv\.weight")
    inner = rows(perceiver + "layers.0.0.to_q.weight", base.perceiver_heads * base.perceiver_dim_head)
    if inner % base.perceiver_dim_head:
        raise CheckpointError(
            f"perceiver to_q has {inner} rows, not a multiple of dim_head {base.perceiver_dim_head}: "
            "this is not a BiCodec checkpoint"
        )
    ff_rows = shapes.get(perceiver + "layers.0.1.0.weight")
    return BiCodecDims(
        ecapa_channels=rows(ecapa + "layer1.conv.weight", base.ecapa_channels),
        ecapa_scale=res2 + 1 if res2 else base.ecapa_scale,
        ecapa_se_bottleneck=rows(ecapa + "layer2.se_res2block.3.linear1.weight", base.ecapa_se_bottleneck),
        ecapa_merge_channels=rows(ecapa + "conv.weight", base.ecapa_merge_channels),
        ecapa_pool_bottleneck=rows(ecapa + "pool.linear1.weight", base.ecapa_pool_bottleneck),
        perceiver_depth=depth or base.perceiver_depth,
        perceiver_heads=inner // base.perceiver_dim_head,
        perceiver_dim_head=base.perceiver_dim_head,
        perceiver_ff_inner=int(ff_rows[0]) // 2 if ff_rows else base.perceiver_ff_inner,
        sampling_backbone_layers=sampling or base.sampling_backbone_layers,
    )
