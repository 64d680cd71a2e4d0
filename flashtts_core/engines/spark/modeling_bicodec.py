"""BiCodec, the audio tokenizer of Spark-TTS, as plain ``nn.Module``s that load ``BiCodec/model.safetensors`` unchanged.

Why our own code: the original loads non-strictly and depends on a training stack; we need a small, strict,
inference-only tree. Attribute names therefore mirror the published key inventory exactly (``encoder.encoder.convnext.0
.dwconv``, ``quantizer.in_project.weight_g``, ``decoder.model.1.block.1.weight_v``, ...), which is why some names look
odd (the prenet's upsampling stages are called ``downsample``; sampling stages are ``nn.Sequential`` so their backbone
sits at index ``1``).

Data flow (one semantic token = ``hop`` = 320 samples, 50 tokens/s):

* tokenize: wav2vec2 features ``(B, T, 1024)`` → :class:`SparkFeatureEncoder` → :class:`SparkFactorizedVQ` →
  semantic ids ``(B, T)``; 6 s reference clip → :class:`SparkMelSpectrogram` → :class:`SparkSpeakerEncoder` → global
  ids ``(B, Q, 32)``;
* detokenize: ids → codebook rows → prenet conditioned on the d-vector, plus the d-vector → :class:`SparkWaveGenerator`
  → ``(B, 1, 320 * T)``.

Shapes are channel-first ``(B, C, T)`` unless a docstring says *time-major* ``(B, T, C)``.

Padding: modules with a temporal receptive field take an optional ``mask`` ``(B, 1, T)`` (1 = real frame) and zero the
padded frames before every temporal convolution. An unpadded sequence ends in the convolutions' zero padding, so this
makes a padded batch compute exactly what each item computes alone.

Weight norm is the old-style one (``weight_g``/``weight_v``, norm over every axis but 0); it is implemented here so the
keys load directly, and :meth:`SparkBiCodecModel.fold_weight_norm` folds it once after loading.

The modules are defined in dependency order. Parameters are created with ``torch.empty``: they are meant to be built
on the ``meta`` device and filled from a checkpoint; buffers derived from the config (mel filterbank, FSQ levels) are
computed eagerly on the CPU so that they survive a ``meta`` construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashtts_core.engines.spark.config import (
    BiCodecConfig,
    BiCodecDims,
    SparkFeatureDecoderConfig,
    SparkFeatureEncoderConfig,
    SparkMelConfig,
    SparkSpeakerEncoderConfig,
    SparkWaveGeneratorConfig,
)

__all__ = (
    "SparkAdaLayerNorm",
    "SparkBiCodecModel",
    "SparkConvNeXtBlock",
    "SparkDecoderBlock",
    "SparkEcapaAttentiveStatsPool",
    "SparkEcapaConv1dReluBn",
    "SparkEcapaRes2Conv1dReluBn",
    "SparkEcapaSEConnect",
    "SparkEcapaSERes2Block",
    "SparkEcapaTdnn",
    "SparkEcapaXVectorHead",
    "SparkFSQ",
    "SparkFactorizedVQ",
    "SparkFeatureDecoder",
    "SparkFeatureEncoder",
    "SparkGEGLU",
    "SparkMelSpectrogram",
    "SparkPerceiverAttention",
    "SparkPerceiverResampler",
    "SparkRMSNorm",
    "SparkResidualFSQ",
    "SparkResidualUnit",
    "SparkSamplingBlock",
    "SparkSnake",
    "SparkSpeakerEncoder",
    "SparkVocosBackbone",
    "SparkWNConv1d",
    "SparkWNConvTranspose1d",
    "SparkWaveGenerator",
    "bicodec_unused_shapes",
    "slaney_mel_filterbank",
    "weight_norm_weight",
)

logger = logging.getLogger(__name__)

_VOCOS_EPS = 1e-6  # LayerNorm / AdaLayerNorm epsilon of the Vocos backbones (E.6)
_BN_EPS = 1e-5  # ECAPA BatchNorm epsilon
_SNAKE_EPS = 1e-9


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded frames of a channel-first ``(B, C, T)`` tensor; ``mask`` is ``(B, 1, T)``."""
    return x if mask is None else x * mask


# --- weight norm and activations -----------------------------------------------------------------------------------


def weight_norm_weight(weight_g: Tensor, weight_v: Tensor) -> Tensor:
    """Old-style weight norm: ``g * v / ||v||`` with the norm over every axis except 0 (computed in fp32)."""
    v = weight_v.float()
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
    return (v * (weight_g.float() / norm)).to(weight_v.dtype)


class _SparkWeightNormConv(nn.Module):
    """Shared storage of the weight-normed convolutions: ``weight_g``, ``weight_v``, ``bias`` until folded."""

    def __init__(self, g_rows: int, v_shape: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(g_rows, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(*v_shape))
        self.bias = nn.Parameter(torch.empty(out_channels))

    @property
    def folded(self) -> bool:
        return "weight" in self._parameters

    def effective_weight(self) -> Tensor:
        """The convolution weight: the folded one, or ``g * v / ||v||`` computed now."""
        if self.folded:
            return self._parameters["weight"]  # type: ignore[return-value]
        return weight_norm_weight(self.weight_g, self.weight_v)

    def fold_weight_norm(self) -> None:
        """Replace ``weight_g``/``weight_v`` by the plain ``weight`` they define (inference only; idempotent)."""
        if self.folded:
            return
        weight = weight_norm_weight(self.weight_g.detach(), self.weight_v.detach())
        del self.weight_g
        del self.weight_v
        self.weight = nn.Parameter(weight, requires_grad=False)


class SparkWNConv1d(_SparkWeightNormConv):
    """Weight-normed ``Conv1d``: ``weight_g`` ``(C_out, 1, 1)``, ``weight_v`` ``(C_out, C_in, K)``, ``bias``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__(out_channels, (out_channels, in_channels, kernel_size), out_channels)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, T)`` → ``(B, C_out, T')``."""
        return F.conv1d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation)


class SparkWNConvTranspose1d(_SparkWeightNormConv):
    """Weight-normed ``ConvTranspose1d``: axis 0 is the *input* channel, so ``weight_g`` is ``(C_in, 1, 1)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, padding: int) -> None:
        super().__init__(in_channels, (in_channels, out_channels, kernel_size), out_channels)
        self.stride = stride
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, T)`` → ``(B, C_out, (T - 1) * stride - 2 * padding + K)``."""
        return F.conv_transpose1d(x, self.effective_weight(), self.bias, self.stride, self.padding)


class SparkSnake(nn.Module):
    """Snake activation ``x + sin²(αx) / (α + 1e-9)`` with a learned per-channel ``alpha`` ``(1, C, 1)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``.

        For inference one temporary, updated in place: the activation runs at the audio rate over the decoder's
        widest tensors, where five full-size temporaries made it 1.2-4x slower on the CPU (allocation and memory
        traffic). Same operations in the same order, so the same bits."""
        inverse = (self.alpha + _SNAKE_EPS).reciprocal()
        if torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad):
            return x + inverse * torch.sin(self.alpha * x).pow(2)
        out = torch.mul(x, self.alpha)
        out.sin_().square_().mul_(inverse)
        return out.add_(x)


# --- mel front-end ---------------------------------------------------------------------------------------------------


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    # Slaney scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic (27 mels per factor 6.4) above.
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    freq = np.asarray(freq, dtype=np.float64)
    log_part = min_log_mel + np.log(np.maximum(freq, min_log_hz) / min_log_hz) / logstep
    return np.where(freq >= min_log_hz, log_part, freq / f_sp)


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    mels = np.asarray(mels, dtype=np.float64)
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def slaney_mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float | None = None
) -> np.ndarray:
    """Triangular slaney-scale filters with slaney (area) normalisation, shape ``(n_fft // 2 + 1, n_mels)`` float32.

    Equal to librosa's ``filters.mel(..., htk=False, norm="slaney")`` transposed, and to torchaudio's
    ``melscale_fbanks(norm="slaney", mel_scale="slaney")``: the FFT bin frequencies are ``linspace(0, sr/2, n_freqs)``,
    ``n_mels + 2`` edges are evenly spaced on the mel scale, each filter rises from edge i to i+1 and falls to i+2,
    then is scaled by ``2 / (f[i+2] - f[i])`` so every filter has the same area.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    all_freqs = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    edges_mel = np.linspace(_hz_to_mel_slaney(np.array(f_min)), _hz_to_mel_slaney(np.array(f_max)), n_mels + 2)
    edges_hz = _mel_to_hz_slaney(edges_mel)
    widths = np.diff(edges_hz)  # (n_mels + 1,)
    slopes = edges_hz[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= 2.0 / (edges_hz[2 : n_mels + 2] - edges_hz[:n_mels])
    return bank.astype(np.float32)


class SparkMelSpectrogram(nn.Module):
    """Linear-magnitude slaney mel spectrogram (power 1, no log): torchaudio's ``MelSpectrogram`` as set in A.5.1.

    The window and filterbank are non-persistent buffers computed from the config: the checkpoint does not carry
    them. The STFT always runs in fp32.
    """

    def __init__(self, config: SparkMelConfig) -> None:
        super().__init__()
        self.n_fft = config.n_fft
        self.win_length = config.win_length
        self.hop_length = config.hop_length
        # Explicit CPU device / from_numpy: these stay real tensors when the model is built under ``meta``.
        # torch's own fp32 periodic Hann, as torchaudio uses (zero-padded to n_fft by torch.stft).
        window = torch.hann_window(config.win_length, periodic=True, dtype=torch.float32, device="cpu")
        fb = slaney_mel_filterbank(config.sample_rate, config.n_fft, config.num_mels, config.mel_fmin, config.mel_fmax)
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)

    def forward(self, wav: Tensor) -> Tensor:
        """``(B, L)`` samples → ``(B, n_mels, 1 + L // hop)`` (centre, reflect padding of ``n_fft // 2``)."""
        spec = torch.stft(
            wav.float(),
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.float(),
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        ).abs()  # (B, n_freqs, F)
        mel = torch.matmul(spec.transpose(1, 2), self.fb.float()).transpose(1, 2)  # (B, n_mels, F)
        return mel.to(wav.dtype)


# --- Vocos backbone --------------------------------------------------------------------------------------------------


class SparkAdaLayerNorm(nn.Module):
    """LayerNorm without affine, then ``* scale(c) + shift(c)`` (plain multiply, not ``1 + scale``)."""

    def __init__(self, condition_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.scale = nn.Linear(condition_dim, dim)
        self.shift = nn.Linear(condition_dim, dim)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        """Time-major ``(B, T, C)`` with ``condition`` ``(B, condition_dim)`` → ``(B, T, C)``."""
        x = F.layer_norm(x, (self.dim,), eps=_VOCOS_EPS)
        return x * self.scale(condition).unsqueeze(1) + self.shift(condition).unsqueeze(1)


class SparkConvNeXtBlock(nn.Module):
    """``x + gamma * pwconv2(gelu(pwconv1(norm(dwconv(x)))))`` with a depthwise kernel-7 convolution."""

    def __init__(self, dim: int, intermediate_dim: int, condition_dim: int | None = None) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm: nn.Module = (
            SparkAdaLayerNorm(condition_dim, dim) if condition_dim else nn.LayerNorm(dim, eps=_VOCOS_EPS)
        )
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()  # exact (erf) GELU
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim))  # layer scale

    def forward(self, x: Tensor, condition: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``; ``condition`` ``(B, condition_dim)`` is required for the AdaLN variant."""
        h = self.dwconv(_masked(x, mask)).transpose(1, 2)  # (B, T, C)
        h = self.norm(h, condition) if isinstance(self.norm, SparkAdaLayerNorm) else self.norm(h)
        h = self.pwconv2(self.act(self.pwconv1(h)))
        return x + (self.gamma * h).transpose(1, 2)


class SparkVocosBackbone(nn.Module):
    """Conv embed (k7) → (Ada)LayerNorm → ConvNeXt blocks → LayerNorm; output is **time-major**."""

    def __init__(
        self,
        input_channels: int,
        dim: int,
        intermediate_dim: int,
        num_layers: int,
        condition_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm: nn.Module = (
            SparkAdaLayerNorm(condition_dim, dim) if condition_dim else nn.LayerNorm(dim, eps=_VOCOS_EPS)
        )
        self.convnext = nn.ModuleList(
            SparkConvNeXtBlock(dim, intermediate_dim, condition_dim) for _ in range(num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=_VOCOS_EPS)

    def forward(self, x: Tensor, condition: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``(B, C_in, T)`` → time-major ``(B, T, dim)``."""
        x = self.embed(_masked(x, mask)).transpose(1, 2)
        x = self.norm(x, condition) if isinstance(self.norm, SparkAdaLayerNorm) else self.norm(x)
        x = x.transpose(1, 2)
        for block in self.convnext:
            x = block(x, condition, mask)
        return self.final_layer_norm(x.transpose(1, 2))


class SparkSamplingBlock(nn.Module):
    """Resampling stage of ratio 1, the only one in the published checkpoint: no parameters, returns ``3 * x``.

    The original sums three branches (upsample, downsample, identity) that are all the identity at ratio 1; the
    factor 3 is real and must be kept.
    """

    def __init__(self, dim: int, *, upsample_scale: int = 1, downsample_scale: int = 1) -> None:
        super().__init__()
        if upsample_scale != 1 or downsample_scale != 1:
            raise ValueError("only sampling ratio 1 is implemented (the published BiCodec layout)")
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """Time-major ``(B, T, C)`` → channel-first ``(B, C, T)``."""
        return 3.0 * x.transpose(1, 2)


def _sampling_stage(dim: int, intermediate_dim: int, num_layers: int) -> nn.Sequential:
    # Sequential so that the keys read ``.{i}.1.*`` (index 0 is the parameter-free sampling block).
    return nn.Sequential(SparkSamplingBlock(dim), SparkVocosBackbone(dim, dim, intermediate_dim, num_layers))


class SparkFeatureEncoder(nn.Module):
    """wav2vec2 features → 1024-d latents before the VQ (config ``encoder``)."""

    def __init__(self, config: SparkFeatureEncoderConfig, *, sampling_layers: int = 2) -> None:
        super().__init__()
        self.encoder = SparkVocosBackbone(
            config.input_channels, config.vocos_dim, config.vocos_intermediate_dim, config.vocos_num_layers
        )
        self.downsample = nn.ModuleList(
            _sampling_stage(config.vocos_dim, config.vocos_intermediate_dim, sampling_layers)
            for _ in config.sample_ratios
        )
        self.project = nn.Linear(config.vocos_dim, config.out_channels)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, C_in, T)`` → ``(B, C_out, T)``."""
        h = self.encoder(x, mask=mask)  # (B, T, D)
        for stage in self.downsample:
            h = stage[1](stage[0](h), mask=mask)
        return self.project(h).transpose(1, 2)


class SparkFeatureDecoder(nn.Module):
    """Prenet (conditioned on the d-vector) / postnet (training head) of BiCodec."""

    def __init__(self, config: SparkFeatureDecoderConfig, *, sampling_layers: int = 2) -> None:
        super().__init__()
        self.use_tanh_at_final = config.use_tanh_at_final
        self.linear_pre = nn.Linear(config.input_channels, config.vocos_dim)
        self.downsample = nn.ModuleList(
            _sampling_stage(config.vocos_dim, config.vocos_intermediate_dim, sampling_layers)
            for _ in config.sample_ratios
        )
        self.vocos_backbone = SparkVocosBackbone(
            config.vocos_dim,
            config.vocos_dim,
            config.vocos_intermediate_dim,
            config.vocos_num_layers,
            condition_dim=config.condition_dim,
        )
        self.linear = nn.Linear(config.vocos_dim, config.out_channels)

    def forward(self, x: Tensor, condition: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``(B, C_in, T)`` with ``condition`` ``(B, condition_dim)`` → ``(B, C_out, T)``."""
        h = self.linear_pre(x.transpose(1, 2))  # (B, T, D)
        for stage in self.downsample:
            h = stage[1](stage[0](h), mask=mask)
        h = self.vocos_backbone(h.transpose(1, 2), condition, mask)
        out = self.linear(h).transpose(1, 2)
        return torch.tanh(out) if self.use_tanh_at_final else out


# --- semantic quantizer ----------------------------------------------------------------------------------------------


class SparkFactorizedVQ(nn.Module):
    """Factorised VQ: 1×1 projection to a low-dim space, nearest codebook row by cosine, 1×1 projection back.

    ``quantizer.cluster_size`` (a training EMA buffer) is in the file but not here; the loader verifies and drops it.
    """

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_project = SparkWNConv1d(input_dim, codebook_dim, 1)
        self.out_project = SparkWNConv1d(codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def tokenize(self, z: Tensor) -> Tensor:
        """``(B, input_dim, T)`` → ids ``(B, T)`` int64.

        Both the projected frame and every codebook row are L2-normalised; the distance is written out as
        ``|e|² - 2 e·c + |c|²`` (fp32) and the first minimum wins, as in the original.
        """
        encodings = self.in_project(z).transpose(1, 2).float()  # (B, T, d)
        batch, frames, dim = encodings.shape
        enc = F.normalize(encodings.reshape(batch * frames, dim), dim=1)
        book = F.normalize(self.codebook.weight.float(), dim=1)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        return dist.argmin(dim=1).reshape(batch, frames)

    def detokenize(self, indices: Tensor) -> Tensor:
        """ids ``(B, T)`` → ``(B, input_dim, T)`` from the raw (un-normalised) codebook rows."""
        return self.out_project(self.codebook(indices).transpose(1, 2))


# --- speaker encoder: ECAPA-TDNN ------------------------------------------------------------------------------------


class SparkEcapaConv1dReluBn(nn.Module):
    """Conv1d → ReLU → BatchNorm (this order everywhere in the ECAPA net)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(out_channels, eps=_BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, T)`` → ``(B, C_out, T)``."""
        return self.bn(F.relu(self.conv(x)))


class SparkEcapaRes2Conv1dReluBn(nn.Module):
    """Res2Net conv: ``scale`` channel groups; group i ≥ 1 adds the previous output first; the last passes through."""

    def __init__(self, channels: int, kernel_size: int, padding: int, dilation: int, scale: int) -> None:
        super().__init__()
        if channels % scale:
            raise ValueError(f"Res2 channels {channels} not divisible by scale {scale}")
        self.width = channels // scale
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel_size, padding=padding, dilation=dilation) for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width, eps=_BN_EPS) for _ in range(scale - 1))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``."""
        groups = torch.split(x, self.width, dim=1)
        outs: list[Tensor] = []
        h = groups[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            h = groups[i] if i == 0 else h + groups[i]
            h = bn(F.relu(conv(h)))
            outs.append(h)
        outs.append(groups[-1])
        return torch.cat(outs, dim=1)


class SparkEcapaSEConnect(nn.Module):
    """Squeeze-excitation: time mean → Linear → ReLU → Linear → sigmoid → per-channel scale."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``."""
        weights = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * weights.unsqueeze(2)


class SparkEcapaSERes2Block(nn.Module):
    """``x + SE(conv1x1(Res2(conv1x1(x))))``; stored as ``se_res2block.{0..3}``."""

    def __init__(self, channels: int, *, dilation: int, scale: int, se_bottleneck: int) -> None:
        super().__init__()
        self.se_res2block = nn.Sequential(
            SparkEcapaConv1dReluBn(channels, channels),
            SparkEcapaRes2Conv1dReluBn(channels, 3, padding=dilation, dilation=dilation, scale=scale),
            SparkEcapaConv1dReluBn(channels, channels),
            SparkEcapaSEConnect(channels, se_bottleneck),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``."""
        return x + self.se_res2block(x)


class SparkEcapaTdnn(nn.Module):
    """ECAPA-TDNN frame-feature trunk (``GLOB_c512`` in the original, widths inferred from the checkpoint).

    Only the frame features feed BiCodec; the x-vector head (pool/bn/linear) is :class:`SparkEcapaXVectorHead`,
    which is not built for inference.
    """

    def __init__(self, feat_dim: int, dims: BiCodecDims) -> None:
        super().__init__()
        channels = dims.ecapa_channels
        self.layer1 = SparkEcapaConv1dReluBn(feat_dim, channels, kernel_size=5, padding=2)
        blocks = {"scale": dims.ecapa_scale, "se_bottleneck": dims.ecapa_se_bottleneck}
        self.layer2 = SparkEcapaSERes2Block(channels, dilation=2, **blocks)
        self.layer3 = SparkEcapaSERes2Block(channels, dilation=3, **blocks)
        self.layer4 = SparkEcapaSERes2Block(channels, dilation=4, **blocks)
        self.conv = nn.Conv1d(3 * channels, dims.ecapa_merge_channels, kernel_size=1)

    def forward(self, mels: Tensor) -> Tensor:
        """Mel ``(B, n_mels, T)`` → frame features ``(B, merge_channels, T)``."""
        out1 = self.layer1(mels)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        return F.relu(self.conv(torch.cat((out2, out3, out4), dim=1)))


class SparkEcapaAttentiveStatsPool(nn.Module):
    """Attentive statistics pooling with global context (training head; parameters only, never run here)."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.linear1 = nn.Conv1d(3 * channels, bottleneck, kernel_size=1)  # input: frames ‖ mean ‖ std
        self.linear2 = nn.Conv1d(bottleneck, channels, kernel_size=1)


class SparkEcapaXVectorHead(nn.Module):
    """The ECAPA x-vector head (``pool``, ``bn``, ``linear``): present in the checkpoint, unused by BiCodec.

    It exists so :func:`bicodec_unused_shapes` can describe (and the tiny builder can write) these keys from a module
    definition rather than from a hand-kept list.
    """

    def __init__(self, dims: BiCodecDims, embed_dim: int) -> None:
        super().__init__()
        merge = dims.ecapa_merge_channels
        self.pool = SparkEcapaAttentiveStatsPool(merge, dims.ecapa_pool_bottleneck)
        self.bn = nn.BatchNorm1d(2 * merge, eps=_BN_EPS)
        self.linear = nn.Linear(2 * merge, embed_dim)


# --- speaker encoder: perceiver resampler and FSQ -----------------------------------------------------------------


class SparkRMSNorm(nn.Module):
    """``normalize(x) * sqrt(dim) * gamma`` over the last axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., dim)`` → ``(..., dim)``."""
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class SparkPerceiverAttention(nn.Module):
    """Latents attend to ``concat(latents, context)``; heads split "(h d)" head-major; no bias, no mask."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # first half K, second half V
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, latents: Tensor, context: Tensor) -> Tensor:
        """Time-major latents ``(B, N, dim)`` and context ``(B, M, dim)`` → ``(B, N, dim)``."""
        batch, n_latents, _ = latents.shape
        keys_values = self.to_kv(torch.cat((latents, context), dim=1)).chunk(2, dim=-1)

        def heads_first(t: Tensor) -> Tensor:
            return t.reshape(batch, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        q = heads_first(self.to_q(latents))
        k, v = (heads_first(t) for t in keys_values)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v
        return self.to_out(out.transpose(1, 2).reshape(batch, n_latents, self.heads * self.dim_head))


class SparkGEGLU(nn.Module):
    """``value * gelu(gate)`` with value = first half, gate = second half of the last axis."""

    def forward(self, x: Tensor) -> Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class SparkPerceiverResampler(nn.Module):
    """Resamples ECAPA frame features to ``num_latents`` learned query vectors (the global token slots)."""

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        dim_context: int,
        num_latents: int,
        heads: int,
        dim_head: int,
        ff_inner: int,
    ) -> None:
        super().__init__()
        # The original uses Identity when the context already has the latent width (then the file has no keys).
        self.proj_context: nn.Module = nn.Linear(dim_context, dim) if dim_context != dim else nn.Identity()
        self.latents = nn.Parameter(torch.empty(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList(
                (
                    SparkPerceiverAttention(dim, heads, dim_head),
                    nn.Sequential(nn.Linear(dim, 2 * ff_inner), SparkGEGLU(), nn.Linear(ff_inner, dim)),
                )
            )
            for _ in range(depth)
        )
        self.norm = SparkRMSNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Time-major context ``(B, T, dim_context)`` → ``(B, num_latents, dim)``."""
        context = self.proj_context(x)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(latents, context) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class SparkFSQ(nn.Module):
    """Finite scalar quantisation with implicit codebook; always computed in fp32 (rounding is dtype-sensitive).

    For levels L: ``half = (L - 1) * 1.001 / 2``, ``offset = 0.5`` for even L, ``shift = atanh(offset / half)``,
    ``bound(z) = tanh(z + shift) * half - offset``, code = ``round(bound(z)) / (L // 2)``; index = Σ digit_k · basis_k
    with digit = code · (L // 2) + L // 2 and the first channel least significant.
    """

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        levels_t = torch.tensor(list(levels), dtype=torch.int64, device="cpu")
        basis = torch.cumprod(torch.tensor([1, *list(levels)[:-1]], dtype=torch.int64, device="cpu"), dim=0)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.codebook_size = math.prod(levels)

    def _half_width(self) -> Tensor:
        return (self.levels // 2).float()

    def bound(self, z: Tensor) -> Tensor:
        """Squash ``(..., D)`` into the level range (before rounding)."""
        levels = self.levels.float()
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z.float() + shift) * half - offset

    def quantize(self, z: Tensor) -> Tensor:
        """``(..., D)`` → codes in ``[-1, 1]`` (fp32)."""
        return torch.round(self.bound(z)) / self._half_width()

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Codes ``(..., D)`` → ids ``(...)`` int64."""
        half = self._half_width()
        digits = torch.round(codes.float() * half + half).to(torch.int64)
        return (digits * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """ids ``(...)`` → codes ``(..., D)`` fp32."""
        digits = (indices.to(torch.int64).unsqueeze(-1) // self.basis) % self.levels
        half = self._half_width()
        return (digits.float() - half) / half


class SparkResidualFSQ(nn.Module):
    """Linear → residual FSQ stages (stage i scaled by ``(L - 1) ** -i``) → Linear."""

    def __init__(self, dim: int, levels: Sequence[int], num_quantizers: int) -> None:
        super().__init__()
        codebook_dim = len(levels)
        # The original skips the projections when the widths agree (then the file has no keys for them).
        self.project_in: nn.Module = nn.Linear(dim, codebook_dim) if dim != codebook_dim else nn.Identity()
        self.project_out: nn.Module = nn.Linear(codebook_dim, dim) if dim != codebook_dim else nn.Identity()
        self.fsq = SparkFSQ(levels)
        self.num_quantizers = num_quantizers

    def _scales(self) -> Tensor:
        levels = self.fsq.levels.double()
        return torch.stack([(levels - 1) ** -i for i in range(self.num_quantizers)]).float()  # (Q, D)

    def encode(self, x: Tensor) -> Tensor:
        """Time-major ``(B, N, dim)`` → ids ``(B, N, Q)`` int64."""
        residual = self.project_in(x).float()
        indices = []
        for scale in self._scales():
            codes = self.fsq.quantize(residual / scale)
            indices.append(self.fsq.codes_to_indices(codes))
            residual = residual - codes * scale
        return torch.stack(indices, dim=-1)

    def decode(self, indices: Tensor) -> Tensor:
        """ids ``(B, N, Q)`` → ``(B, N, dim)``."""
        scales = self._scales()
        codes = (self.fsq.indices_to_codes(indices) * scales).sum(dim=-2)  # (B, N, D)
        return self.project_out(codes.to(_param_dtype(self, codes.dtype)))


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None else default


class SparkSpeakerEncoder(nn.Module):
    """Mel → ECAPA frame features → perceiver (``token_num`` latents) → residual FSQ → global ids; ids → d-vector."""

    def __init__(self, config: SparkSpeakerEncoderConfig, dims: BiCodecDims) -> None:
        super().__init__()
        self.token_num = config.token_num
        self.latent_dim = config.latent_dim
        self.speaker_encoder = SparkEcapaTdnn(config.input_dim, dims)
        self.perceiver_sampler = SparkPerceiverResampler(
            config.latent_dim,
            depth=dims.perceiver_depth,
            dim_context=dims.ecapa_merge_channels,
            num_latents=config.token_num,
            heads=dims.perceiver_heads,
            dim_head=dims.perceiver_dim_head,
            ff_inner=dims.perceiver_ff_inner,
        )
        self.quantizer = SparkResidualFSQ(config.latent_dim, config.fsq_levels, config.fsq_num_quantizers)
        self.project = nn.Linear(config.token_num * config.latent_dim, config.out_dim)

    def tokenize(self, mels: Tensor) -> Tensor:
        """Mel ``(B, n_mels, T)`` → global ids ``(B, Q, token_num)`` int64."""
        features = self.speaker_encoder(mels)  # (B, merge, T)
        latents = self.perceiver_sampler(features.transpose(1, 2))  # (B, token_num, latent_dim)
        return self.quantizer.encode(latents).transpose(1, 2)

    def detokenize(self, indices: Tensor) -> Tensor:
        """Global ids ``(B, Q, token_num)`` → d-vector ``(B, out_dim)``."""
        latents = self.quantizer.decode(indices.transpose(1, 2))  # (B, token_num, latent_dim)
        # Flatten channel-major: element index = channel * token_num + token.
        return self.project(latents.transpose(1, 2).reshape(latents.shape[0], -1))


# --- wave generator --------------------------------------------------------------------------------------------------


class SparkResidualUnit(nn.Module):
    """``x + conv1x1(snake(conv_k7_dilated(snake(x))))``."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            SparkSnake(dim),
            SparkWNConv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation),
            SparkSnake(dim),
            SparkWNConv1d(dim, dim, 1),
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``."""
        y = self.block[1](_masked(self.block[0](x), mask))
        y = self.block[3](self.block[2](y))
        trim = (x.shape[-1] - y.shape[-1]) // 2  # zero with this padding; kept for other kernel choices
        if trim > 0:
            x = x[..., trim:-trim]
        return x + y


class SparkDecoderBlock(nn.Module):
    """Snake → transposed conv (×stride) → residual units with dilations 1, 3, 9."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.block = nn.Sequential(
            SparkSnake(in_channels),
            SparkWNConvTranspose1d(
                in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - stride) // 2
            ),
            SparkResidualUnit(out_channels, 1),
            SparkResidualUnit(out_channels, 3),
            SparkResidualUnit(out_channels, 9),
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, C_in, T)`` → ``(B, C_out, T * stride)`` (for ``K - stride`` even); ``mask`` is at the input rate."""
        x = self.block[1](_masked(self.block[0](x), mask))
        out_mask = None if mask is None else mask.repeat_interleave(self.stride, dim=-1)
        for unit in self.block[2:]:
            x = unit(x, out_mask)
        return x


class SparkWaveGenerator(nn.Module):
    """DAC-style generator: conv k7 → upsampling blocks (channels halve) → snake → conv k7 to 1 channel → tanh."""

    def __init__(self, config: SparkWaveGeneratorConfig) -> None:
        super().__init__()
        self.rates = tuple(config.rates)
        layers: list[nn.Module] = [SparkWNConv1d(config.input_channel, config.channels, 7, padding=3)]
        channels = config.channels
        for rate, kernel in zip(config.rates, config.kernel_sizes, strict=True):
            layers.append(SparkDecoderBlock(channels, channels // 2, kernel, rate))
            channels //= 2
        layers += [SparkSnake(channels), SparkWNConv1d(channels, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, C, T)`` → ``(B, 1, T * prod(rates))`` in ``[-1, 1]``; ``mask`` ``(B, 1, T)``."""
        x = self.model[0](_masked(x, mask))
        for block in self.model[1 : 1 + len(self.rates)]:
            x = block(x, mask)
            if mask is not None:
                mask = mask.repeat_interleave(block.stride, dim=-1)
        snake, conv, tanh = self.model[1 + len(self.rates) :]
        return tanh(conv(_masked(snake(x), mask)))


# --- BiCodec -----------------------------------------------------------------------------------------------------


class SparkBiCodecModel(nn.Module):
    """The inference part of BiCodec: encoder, quantizer, speaker encoder, prenet, wave generator, mel front-end.

    The postnet and the ECAPA x-vector head are training heads; their keys are described by
    :func:`bicodec_unused_shapes` so the loader can verify and drop them.
    """

    def __init__(self, config: BiCodecConfig, dims: BiCodecDims | None = None) -> None:
        super().__init__()
        dims = dims or BiCodecDims()
        self.config = config
        self.dims = dims
        self.hop_length = math.prod(config.decoder.rates)
        self.mel_transformer = SparkMelSpectrogram(config.mel_params)
        self.encoder = SparkFeatureEncoder(config.encoder, sampling_layers=dims.sampling_backbone_layers)
        self.quantizer = SparkFactorizedVQ(
            config.quantizer.input_dim, config.quantizer.codebook_size, config.quantizer.codebook_dim
        )
        self.speaker_encoder = SparkSpeakerEncoder(config.speaker_encoder, dims)
        self.prenet = SparkFeatureDecoder(config.prenet, sampling_layers=dims.sampling_backbone_layers)
        self.decoder = SparkWaveGenerator(config.decoder)

    def fold_weight_norm(self) -> None:
        """Fold every weight-normed convolution (call once after loading; idempotent)."""
        for module in self.modules():
            if isinstance(module, _SparkWeightNormConv):
                module.fold_weight_norm()

    def tokenize_semantic(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """wav2vec2 features, time-major ``(B, T, input_channels)`` → semantic ids ``(B, T)`` int64."""
        return self.quantizer.tokenize(self.encoder(features.transpose(1, 2), mask))

    def tokenize_global(self, reference: Tensor) -> Tensor:
        """Reference clips ``(B, L)`` (fixed length) → global ids ``(B, Q, token_num)`` int64."""
        mels = self.mel_transformer(reference)  # fp32 STFT whatever the model dtype
        return self.speaker_encoder.tokenize(mels.to(self.speaker_encoder.project.weight.dtype))

    def detokenize(self, semantic_ids: Tensor, global_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Semantic ids ``(B, T)`` + global ids ``(B, Q, token_num)`` → waveform ``(B, 1, T * hop)``."""
        z_q = self.quantizer.detokenize(semantic_ids)  # (B, D, T)
        d_vector = self.speaker_encoder.detokenize(global_ids).to(z_q.dtype)  # (B, out_dim)
        x = self.prenet(z_q, d_vector, mask) + d_vector.unsqueeze(-1)
        return self.decoder(x, mask)


def bicodec_unused_shapes(config: BiCodecConfig, dims: BiCodecDims | None = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of the checkpoint tensors that inference does not use: postnet, ECAPA x-vector head, cluster_size.

    The modules are built on the ``meta`` device (no memory), so the expectation comes from the same definitions
    that describe the used part.
    """
    dims = dims or BiCodecDims()
    with torch.device("meta"):
        postnet = SparkFeatureDecoder(config.postnet, sampling_layers=dims.sampling_backbone_layers)
        head = SparkEcapaXVectorHead(dims, config.speaker_encoder.out_dim)
    shapes: dict[str, tuple[int, ...]] = {
        f"postnet.{key}": tuple(t.shape) for key, t in postnet.state_dict(keep_vars=True).items()
    }
    shapes.update(
        {f"speaker_encoder.speaker_encoder.{key}": tuple(t.shape) for key, t in head.state_dict(keep_vars=True).items()}
    )
    shapes["quantizer.cluster_size"] = (config.quantizer.codebook_size,)
    return shapes
