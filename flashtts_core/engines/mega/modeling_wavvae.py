"""The MegaTTS3 WaveVAE decoder (``wavvae/decoder.ckpt``, sub-dict ``model_gen``): 25 Hz × 32 latent → 24 kHz wave.

Only the decoder half is published; the encoder that produced a speaker's latent is not, which is why every voice
comes with its ``.npy`` latent (models.md §C.2.5, §C.3).

Data flow (channel-first ``(B, C, T)`` unless stated):

``latent (B, T, 32)`` → ``proj_to_decoder`` Linear → ``(B, 320, T)`` → ``latent_upsampler`` (×4) → ``(B, 160, 4T)``
(100 Hz) → ``decoder.model_up``: reflect-pad + WNConv(k7) → 4 × [upsample ×r, multi-receptive-field block] with the
channels halving 2048 → 128 → LeakyReLU → reflect-pad + WNConv(→1, k7) → Tanh, or a plain 1×1 Conv1d
(``model_up.13``) when the model was trained without Tanh → ``(B, 1, 960 T)``.

Every upsampler has two branches summed: nearest-neighbour ×r → LeakyReLU → reflect-pad 3 → WNConv(k7)
(``upsample.3``) and LeakyReLU → WNConvTranspose(k = 2·max(r, 5), padding = max(r, 5) − r // 2, output_padding
r mod 2) (``trans_upsample.1``), applied to ``sin(x) + x``. Weight norm is old-style (``weight_g``/``weight_v``),
folded once after loading.

The decoder is convolutional and non-causal with a receptive field of a few latent frames, so a long latent can be
decoded in overlapping windows (see :meth:`MegaWaveVAEDecoder.decode_window`): with enough context the kept samples
equal those of a one-shot decode up to float rounding.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashtts_core.engines.mega.config import MegaWaveVAEDims

# The weight-normed convolutions (keys weight_g / weight_v / bias) are the same as BiCodec's.
from flashtts_core.engines.spark.modeling_bicodec import SparkWNConv1d, SparkWNConvTranspose1d

__all__ = (
    "MegaWaveVAEDecoder",
    "MegaWaveVAEGenerator",
    "MegaWaveVAEMRF",
    "MegaWaveVAEResBlock",
    "MegaWaveVAEUpsample",
)

logger = logging.getLogger(__name__)

_LEAK = 0.2


class MegaWaveVAEUpsample(nn.Module):
    """Two-branch ×``ratio`` upsampler ``(B, C_in, T)`` → ``(B, C_out, ratio·T)`` applied to ``sin(x) + x``."""

    def __init__(self, in_channels: int, out_channels: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.upsample = nn.Sequential(
            nn.Upsample(scale_factor=ratio, mode="nearest"),
            nn.LeakyReLU(_LEAK),
            nn.ReflectionPad1d(3),
            SparkWNConv1d(in_channels, out_channels, 7),
        )
        span = max(ratio, 5)
        self.trans_upsample = nn.Sequential(
            nn.LeakyReLU(_LEAK),
            SparkWNConvTranspose1d(in_channels, out_channels, 2 * span, stride=ratio, padding=span - ratio // 2),
        )
        self.output_padding = ratio % 2

    def forward(self, x: Tensor) -> Tensor:
        x = torch.sin(x) + x
        a = self.upsample(x)
        act = self.trans_upsample[0](x)
        conv: SparkWNConvTranspose1d = self.trans_upsample[1]  # type: ignore[assignment]
        b = F.conv_transpose1d(
            act,
            conv.effective_weight(),
            conv.bias,
            stride=conv.stride,
            padding=conv.padding,
            output_padding=self.output_padding,
        )
        return a + b


class MegaWaveVAEResBlock(nn.Module):
    """HiFi-GAN ResBlock: 3 × (LeakyReLU → WNConv(k, dilation d) → LeakyReLU → WNConv(k, 1), residual)."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            SparkWNConv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            SparkWNConv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, _LEAK)), _LEAK))
        return x


class MegaWaveVAEMRF(nn.Module):
    """Multi-receptive-field fusion: the mean of ``block1..3`` (one ResBlock per kernel size)."""

    def __init__(self, channels: int, kernels: tuple[int, ...], dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.n = len(kernels)
        for i, kernel in enumerate(kernels):
            self.add_module(f"block{i + 1}", MegaWaveVAEResBlock(channels, kernel, dilations))

    def forward(self, x: Tensor) -> Tensor:
        return sum(getattr(self, f"block{i + 1}")(x) for i in range(self.n)) / self.n  # type: ignore[return-value]


class MegaWaveVAEGenerator(nn.Module):
    """``decoder``: ``model_up`` = pad, conv, (upsample, MRF) × len(ratios), LeakyReLU, pad, conv, Tanh | Conv1d."""

    def __init__(self, dims: MegaWaveVAEDims) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad1d(3), SparkWNConv1d(dims.upsampler_out, dims.first_channels, 7)]
        channels = dims.first_channels
        for ratio in dims.ratios:
            layers.append(MegaWaveVAEUpsample(channels, channels // 2, ratio))
            channels //= 2
            layers.append(MegaWaveVAEMRF(channels, dims.resblock_kernels, dims.resblock_dilations))
        if channels != dims.ngf:
            raise ValueError(f"the generator ends with {channels} channels but the output conv takes {dims.ngf}")
        layers += [nn.LeakyReLU(_LEAK), nn.ReflectionPad1d(3), SparkWNConv1d(channels, 1, 7)]
        layers.append(nn.Tanh() if dims.use_tanh else nn.Conv1d(1, 1, 1))
        self.model_up = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, upsampler_out, 4T)`` → ``(B, 1, 960 T)``."""
        return self.model_up(x)


class MegaWaveVAEDecoder(nn.Module):
    """The published decoder half of the WaveVAE (``model_gen`` without the encoder)."""

    def __init__(self, dims: MegaWaveVAEDims) -> None:
        super().__init__()
        self.dims = dims
        self.proj_to_decoder = nn.Linear(dims.latent_dim, dims.latent_hidden)
        self.latent_upsampler = MegaWaveVAEUpsample(dims.latent_hidden, dims.upsampler_out, dims.latent_ratio)
        self.decoder = MegaWaveVAEGenerator(dims)

    @property
    def samples_per_frame(self) -> int:
        hop = 1
        for ratio in self.dims.ratios:
            hop *= ratio
        return hop * self.dims.latent_ratio

    def fold_weight_norm(self) -> None:
        """Fold every weight-normed convolution (once, after loading; idempotent)."""
        for module in self.modules():
            if isinstance(module, (SparkWNConv1d, SparkWNConvTranspose1d)):
                module.fold_weight_norm()

    def forward(self, latent: Tensor) -> Tensor:
        """``(B, T, latent_dim)`` → waveform ``(B, 960 T)``."""
        x = self.proj_to_decoder(latent).transpose(1, 2)
        return self.decoder(self.latent_upsampler(x)).squeeze(1)

    @torch.inference_mode()
    def decode_window(self, latent: Tensor, start: int, end: int, context: int) -> Tensor:
        """Samples of latent frames ``[start, end)`` of ``latent`` ``(1, T, latent_dim)``, decoded with up to
        ``context`` frames of real latent on each side (then cut): ``(960 (end - start),)``."""
        lo, hi = max(0, start - context), min(latent.shape[1], end + context)
        wav = self(latent[:, lo:hi])[0]
        hop = self.samples_per_frame
        return wav[(start - lo) * hop : (end - lo) * hop]
