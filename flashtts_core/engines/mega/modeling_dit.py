"""The MegaTTS3 latent diffusion transformer (``diffusion_transformer/``, sub-dict ``dit``) and its sampler.

What it does (models.md §C.2.4, §C.5): given the phones/tones of prompt + target, a frame→phone map ``mel2ph`` at
100 Hz and the prompt's WaveVAE latent, it turns Gaussian noise into the target's 25 Hz × 32-channel latent by
flow matching (``x_t = (1 - t) x0 + t x1``, noise at ``t = 0``), 32 AMO steps on a "sway" time grid, with
classifier-free guidance over three rows (speaker+text, text only, unconditional) run as **one batch**.

Attribute names mirror the published key inventory (``ph_encoder.encoder.attn_layers.0.emb_rel_k``,
``encoder.layers.0.attention_norm.linear``, ...). Shapes: time-major ``(B, T, C)`` unless a docstring says
channel-first ``(B, C, T)``. Parameters are created with ``torch.empty``: modules are built on ``meta`` and filled from
the checkpoint; nothing here is persistent besides the parameters (RoPE tables are recomputed).

:class:`MegaRelTransformerEncoder` is also the duration LM's text encoder when ``lm_use_enc`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashtts_core.engines.mega.config import CFG_PHONE, CFG_TONE, MegaDiTDims

__all__ = (
    "DiTSample",
    "MegaAdaLayerNormOut",
    "MegaAdaLayerNormZero",
    "MegaChannelLayerNorm",
    "MegaConvReluNorm",
    "MegaDiT",
    "MegaDiTAttention",
    "MegaDiTBackbone",
    "MegaDiTBlock",
    "MegaDiTFeedForward",
    "MegaFloat32LayerNorm",
    "MegaRelAttention",
    "MegaRelFFN",
    "MegaRelTransformerEncoder",
    "MegaTimestepEmbedding",
    "amo_sample",
    "amo_sample_batch",
    "autocast_like",
    "sinusoidal_embedding",
    "sway_schedule",
)

logger = logging.getLogger(__name__)

_CHANNEL_LN_EPS = 1e-4  # RelTransformer channel LayerNorm (E.6)
_DIT_LN_EPS = 1e-6  # AdaLN LayerNorm without affine (E.6)
_ROPE_THETA = 10000.0
_MASK_FILL = -1e4  # masked attention logits in the text encoder (fp16-safe)


def autocast_like(module: nn.Module) -> contextlib.AbstractContextManager[object]:
    """Autocast to the dtype of ``module``'s parameters on their device when that is a half type, else nothing.

    Why: the models are stored in the serving dtype (half the memory, no per-op weight casts), while autocast keeps
    what must stay float32 there (LayerNorm, softmax, float32 inputs such as the sampler state meet the weights' dtype
    only inside matmuls/convolutions).
    """
    param = next(module.parameters())
    if param.dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(param.device.type, dtype=param.dtype)


def sinusoidal_embedding(positions: Tensor, dim: int, *, scale: float = 1.0) -> Tensor:
    """``[sin | cos]`` of ``scale * position * exp(-i ln(10000) / (half - 1))``, ``i < half = dim // 2`` (E.11).

    ``positions`` ``(...)`` (any float/int) → ``(..., dim)`` float32 (the [sin|cos] halves are concatenated, not
    interleaved). Shared by the aligner-free parts: DiT phone positions, time embedding (``scale`` 1000), duration LM.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=positions.device) * (-math.log(10000.0) / max(half - 1, 1))
    )
    args = positions.float().unsqueeze(-1) * scale * freqs
    return torch.cat([args.sin(), args.cos()], dim=-1)


class MegaFloat32LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same ``weight``/``bias`` keys) computed in float32 whatever the input and parameter dtypes
    (CPU autocast does not upcast it); returns the input's dtype. ``(..., C)`` → ``(..., C)``."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


# --- RelTransformer text encoder -------------------------------------------------------------------------------------


class MegaChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, T)`` with ``gamma``/``beta`` (C,) and eps 1e-4."""

    def __init__(self, channels: int, eps: float = _CHANNEL_LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``."""
        y = F.layer_norm(x.transpose(1, -1).float(), (x.shape[1],), self.gamma.float(), self.beta.float(), self.eps)
        return y.to(x.dtype).transpose(1, -1)


class MegaConvReluNorm(nn.Module):
    """Prenet: ``n`` × [Conv1d(k) → channel LN → ReLU], then a residual 1×1 ``proj`` (zero-initialised in training,
    so an untrained prenet is the identity). Padded frames are zeroed before every convolution."""

    def __init__(self, channels: int, kernel_size: int, n_layers: int) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2) for _ in range(n_layers)
        )
        self.norm_layers = nn.ModuleList(MegaChannelLayerNorm(channels) for _ in range(n_layers))
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        """``x`` ``(B, C, T)``, ``x_mask`` ``(B, 1, T)`` → ``(B, C, T)``."""
        residual = x
        for conv, norm in zip(self.conv_layers, self.norm_layers, strict=True):
            x = torch.relu(norm(conv(x * x_mask)))
        return (residual + self.proj(x)) * x_mask


class MegaRelAttention(nn.Module):
    """Multi-head self-attention with windowed relative positions (keys *and* values), one relative table shared by
    all heads: ``emb_rel_k``/``emb_rel_v`` ``(1, 2w + 1, head_dim)``; 1×1 convolutions ``conv_q/k/v/o``.

    Logit(i, j) = (q_i·k_j + q_i·rel_k[j - i + w]) / sqrt(head_dim), the relative term only for |j - i| ≤ w; the output
    adds Σ_j p(i, j) rel_v[j - i + w] over the same window.
    """

    def __init__(self, channels: int, heads: int, window: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = channels // heads
        self.window = window
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        self.emb_rel_k = nn.Parameter(torch.empty(1, 2 * window + 1, self.head_dim))
        self.emb_rel_v = nn.Parameter(torch.empty(1, 2 * window + 1, self.head_dim))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """``x`` ``(B, C, T)``, ``attn_mask`` ``(B, 1, T, T)`` (1 = attend) → ``(B, C, T)``."""
        b, c, t = x.shape
        h, d, w = self.heads, self.head_dim, self.window

        def split(y: Tensor) -> Tensor:
            return y.view(b, h, d, t).transpose(2, 3)  # (B, H, T, D)

        q, k, v = split(self.conv_q(x)), split(self.conv_k(x)), split(self.conv_v(x))
        scale = 1.0 / math.sqrt(d)
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, T)
        rel = torch.arange(t, device=x.device)[None, :] - torch.arange(t, device=x.device)[:, None]  # j - i
        inside = rel.abs() <= w  # (T, T)
        bucket = (rel.clamp(-w, w) + w).expand(b, h, t, t)
        rel_logits = torch.matmul(q, self.emb_rel_k[0].transpose(0, 1)) * scale  # (B, H, T, 2w+1)
        scores = scores + torch.gather(rel_logits, -1, bucket) * inside
        scores = scores.masked_fill(attn_mask == 0, _MASK_FILL)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)
        rel_weights = torch.zeros(b, h, t, 2 * w + 1, dtype=probs.dtype, device=x.device)
        rel_weights.scatter_add_(-1, bucket, probs * inside)
        out = out + torch.matmul(rel_weights, self.emb_rel_v[0])  # (B, H, T, D)
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class MegaRelFFN(nn.Module):
    """``conv_2(ReLU(conv_1(x)))``: Conv1d(C → F, k, same padding) then Conv1d(F → C, 1), masked."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size, padding=kernel_size // 2)
        self.conv_2 = nn.Conv1d(filter_channels, channels, 1)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``."""
        x = torch.relu(self.conv_1(x * x_mask))
        return self.conv_2(x * x_mask) * x_mask


class _MegaRelEncoderStack(nn.Module):
    """Pre-LN stack of relative-attention blocks with a final ``last_ln`` (key prefix ``encoder.``)."""

    def __init__(self, channels: int, filter_channels: int, heads: int, layers: int, kernel: int, window: int) -> None:
        super().__init__()
        self.attn_layers = nn.ModuleList(MegaRelAttention(channels, heads, window) for _ in range(layers))
        self.norm_layers_1 = nn.ModuleList(MegaChannelLayerNorm(channels) for _ in range(layers))
        self.ffn_layers = nn.ModuleList(MegaRelFFN(channels, filter_channels, kernel) for _ in range(layers))
        self.norm_layers_2 = nn.ModuleList(MegaChannelLayerNorm(channels) for _ in range(layers))
        self.last_ln = MegaChannelLayerNorm(channels)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        """``(B, C, T)`` → ``(B, C, T)``."""
        attn_mask = (x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)).to(x.dtype)  # (B, 1, T, T)
        for attn, n1, ffn, n2 in zip(
            self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2, strict=True
        ):
            x = x * x_mask
            x = x + attn(n1(x), attn_mask)
            x = x + ffn(n2(x), x_mask)
        return self.last_ln(x) * x_mask


class MegaRelTransformerEncoder(nn.Module):
    """Phone encoder: ``emb`` (scaled by sqrt(hidden)) + other embeddings → optional ConvReluNorm prenet ``pre`` →
    relative-position transformer ``encoder``. Phone id 0 is padding (masked everywhere)."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        filter_channels: int,
        heads: int,
        layers: int,
        kernel: int,
        window: int,
        prenet_layers: int,
        prenet_kernel: int,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.emb = nn.Embedding(vocab, hidden, padding_idx=0)
        self.pre = MegaConvReluNorm(hidden, prenet_kernel, prenet_layers) if prenet_layers else None
        self.encoder = _MegaRelEncoderStack(hidden, filter_channels, heads, layers, kernel, window)

    def forward(self, tokens: Tensor, other_embeds: Tensor | float = 0.0) -> Tensor:
        """``tokens`` ``(B, N)`` int, ``other_embeds`` ``(B, N, H)`` → ``(B, N, H)`` (zero on padding)."""
        x = self.emb(tokens) * math.sqrt(self.hidden) + other_embeds
        x_mask = (tokens > 0).to(x.dtype).unsqueeze(1)  # (B, 1, N)
        x = x.transpose(1, 2)
        if self.pre is not None:
            x = self.pre(x, x_mask)
        return self.encoder(x, x_mask).transpose(1, 2)


# --- DiT backbone --------------------------------------------------------------------------------------------------


def _rope_tables(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin ``(T, head_dim / 2)`` for adjacent-pair (complex) RoPE, θ = 10000, positions 0..T-1 (fp32)."""
    inv = 1.0 / (_ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def _apply_pair_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (2i, 2i+1) of ``x`` ``(B, H, T, D)`` by the angles of ``cos``/``sin`` ``(T, D/2)``."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class MegaDiTAttention(nn.Module):
    """Full (non-causal) self-attention with biased ``wq/wk/wv/wo`` and pair-RoPE on q and k.

    Unmasked for one utterance (the original's mask is all ones); a padded batch passes a key-padding mask so that no
    frame attends to another item's padding.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(B, T, C)``, ``key_mask`` ``(B, T)`` bool (True = a real frame; None = all real) → ``(B, T, C)``."""
        b, t, _ = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = _apply_pair_rope(split(self.wq(x)), *rope)
        k = _apply_pair_rope(split(self.wk(x)), *rope)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T), broadcast over queries
        out = F.scaled_dot_product_attention(q, k, split(self.wv(x)), attn_mask=attn_mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class MegaDiTFeedForward(nn.Module):
    """``w2(SiLU(w1 x))`` (not gated)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)))


class MegaAdaLayerNormZero(nn.Module):
    """``linear(SiLU(t))`` → (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each ``(B, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t_emb: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.linear(F.silu(t_emb)).chunk(6, dim=-1))


class MegaAdaLayerNormOut(nn.Module):
    """Final modulation: ``linear(SiLU(t))`` → (**scale**, **shift**); ``LN(x)·(1 + scale) + shift``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(t_emb)).chunk(2, dim=-1)
        return _layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters, eps 1e-6, over the last axis, in float32 (returns float32)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=_DIT_LN_EPS)


class MegaDiTBlock(nn.Module):
    """AdaLN-Zero transformer block: ``h = x + g_msa·Attn(mod(LN x))``, ``out = h + g_mlp·FFN(mod(LN h))``."""

    def __init__(self, dim: int, heads: int, ffn_hidden: int) -> None:
        super().__init__()
        self.attention = MegaDiTAttention(dim, heads)
        self.feed_forward = MegaDiTFeedForward(dim, ffn_hidden)
        self.attention_norm = MegaAdaLayerNormZero(dim)

    def forward(self, x: Tensor, t_emb: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(B, T, C)``, ``t_emb`` ``(B, C)``, ``key_mask`` ``(B, T)`` bool or None → ``(B, T, C)``.

        Everything but the attention is per frame (LayerNorm over channels), so padding cannot leak through it."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attention_norm(t_emb)
        modulated = _layer_norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        h = x + gate_msa[:, None] * self.attention(modulated, rope, key_mask)
        return h + gate_mlp[:, None] * self.feed_forward(_layer_norm(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])


class MegaDiTBackbone(nn.Module):
    """``layers`` blocks → AdaLN-out ``norm`` → ``out_proj`` (key prefix ``encoder.``)."""

    def __init__(self, dim: int, heads: int, layers: int, ffn_hidden: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.layers = nn.ModuleList(MegaDiTBlock(dim, heads, ffn_hidden) for _ in range(layers))
        self.norm = MegaAdaLayerNormOut(dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, t_emb: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x`` ``(B, T, C)``, ``t_emb`` ``(B, C)``, ``key_mask`` ``(B, T)`` bool or None → ``(B, T, C)``.

        RoPE positions start at 0 for every row, so a right-padded row sees the positions it would see alone."""
        rope = _rope_tables(x.shape[1], self.head_dim, x.device)
        for layer in self.layers:
            x = layer(x, t_emb, rope, key_mask)
        return self.out_proj(self.norm(x, t_emb))


class MegaTimestepEmbedding(nn.Module):
    """Flow time ``t`` ∈ [0, 1] → sinusoid of ``1000·t`` (``freq_dim`` wide) → ``time_mlp`` (Linear, SiLU, Linear)."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """``(B,)`` → ``(B, C)``."""
        emb = sinusoidal_embedding(t, self.freq_dim, scale=1000.0).to(self.time_mlp[0].weight.dtype)
        return self.time_mlp(emb)


class MegaDiT(nn.Module):
    """The ``llm_dit`` velocity model; see :meth:`forward` and :func:`amo_sample`."""

    def __init__(self, dims: MegaDiTDims) -> None:
        super().__init__()
        self.dims = dims
        d = dims
        self.ph_encoder = MegaRelTransformerEncoder(
            d.phone_vocab,
            d.text_hidden,
            d.text_filter,
            d.text_heads,
            d.text_layers,
            d.text_kernel,
            d.text_window,
            d.text_prenet_layers,
            d.text_prenet_kernel,
        )
        self.tone_embed = nn.Embedding(d.tone_vocab, d.dim, padding_idx=0)
        # Two (published) stride-2 convolutions, no activation: 100 Hz phone features → 25 Hz latent frames.
        self.ling_pre_net = nn.Sequential(
            *(
                nn.Conv1d(d.dim, d.dim, d.ling_kernel, stride=2, padding=(d.ling_kernel - 2) // 2)
                for _ in range(d.ling_downsample_layers)
            )
        )
        self.ctx_mask_proj = nn.Linear(1, d.ctx_mask_dim)
        self.local_cond_project = nn.Linear(d.latent_dim + d.ctx_mask_dim, d.local_cond_dim)
        self.prenet = nn.Linear(d.local_cond_dim, d.dim)
        self.x_prenet = nn.Linear(d.latent_dim, d.dim)
        self.f5_time_embed = MegaTimestepEmbedding(d.time_freq_dim, d.dim)
        self.encoder = MegaDiTBackbone(d.dim, d.heads, d.layers, d.ffn_hidden)
        self.postnet = nn.Linear(d.dim, d.latent_dim)

    @property
    def frames_per_latent(self) -> int:
        return 2**self.dims.ling_downsample_layers

    def linguistic_features(
        self, phones: Tensor, tones: Tensor, mel2ph: Tensor, mel_lengths: Tensor | None = None
    ) -> Tensor:
        """Phone-level text encoding expanded to frames and downsampled to the latent rate.

        ``phones``/``tones`` ``(B, N)`` int (0 = padding), ``mel2ph`` ``(B, F)`` 1-based phone index per 100 Hz frame
        (0 = padding; ``F`` a multiple of 4) → ``(B, F / 4, C)``. For a right-padded batch ``mel_lengths`` ``(B,)``
        gives each row's real frames: the output of every downsampling convolution but the last is zeroed past the
        row's length, so the next one reads zeros there, exactly the zero padding it reads when the row runs alone
        (the phone encoder masks padding phones itself, and padding frames gather the all-zero row 0).
        """
        positions = torch.arange(phones.shape[1], device=phones.device)[None].expand_as(phones)
        other = self.tone_embed(tones) + sinusoidal_embedding(positions, self.dims.dim).to(self.tone_embed.weight.dtype)
        x_ling = self.ph_encoder(phones, other) * (phones > 0).unsqueeze(-1).to(other.dtype)  # (B, N, C)
        padded = F.pad(x_ling, (0, 0, 1, 0))  # row 0 = padding frame
        frames = torch.gather(padded, 1, mel2ph.unsqueeze(-1).expand(-1, -1, padded.shape[-1]))  # (B, F, C)
        h = frames.transpose(1, 2)  # (B, C, F)
        lengths = mel_lengths
        last = len(self.ling_pre_net) - 1
        for i, conv in enumerate(self.ling_pre_net):
            h = conv(h)
            if lengths is not None and i < last:
                stride, pad, kernel = conv.stride[0], conv.padding[0], conv.kernel_size[0]
                lengths = torch.div(lengths + 2 * pad - kernel, stride, rounding_mode="floor") + 1
                keep = torch.arange(h.shape[-1], device=h.device)[None, :] < lengths[:, None]  # (B, F')
                h = h * keep.unsqueeze(1).to(h.dtype)
        return h.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        x_ling: Tensor,
        lat_ctx: Tensor,
        ctx_mask: Tensor,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Velocity ``(B, T, latent)`` at flow time ``t`` ``(B,)`` for the noisy latent ``x`` ``(B, T, latent)``.

        ``x_ling`` ``(B, T, C)`` from :meth:`linguistic_features`; ``lat_ctx`` ``(B, T, latent)`` the prompt latent
        (zero outside the prompt); ``ctx_mask`` ``(B, T, 1)`` 1 on prompt frames; ``key_mask`` ``(B, T)`` bool, True
        on real frames of a right-padded batch (None: no padding). Frames past a row's length give garbage velocities
        that the caller ignores; they never influence the real frames.
        """
        local_cond = self.local_cond_project(torch.cat([lat_ctx * ctx_mask, self.ctx_mask_proj(ctx_mask)], dim=-1))
        h = self.x_prenet(x * (1 - ctx_mask)) + self.prenet(local_cond) + x_ling
        return self.postnet(self.encoder(h, self.f5_time_embed(t), key_mask))


def sway_schedule(steps: int, device: torch.device | str = "cpu") -> Tensor:
    """Sway-sampling time grid (coefficient −1): ``t_i = 1 − cos(π/2 · i / N)``, i = 0..N (fp32, ``(N + 1,)``)."""
    i = torch.arange(steps + 1, dtype=torch.float64, device=device)
    return (1.0 - torch.cos(math.pi / 2 * i / steps)).float()


@dataclass
class DiTSample:
    """One utterance (prompt + target) for :func:`amo_sample_batch`.

    ``phones``/``tones`` ``(N,)`` int (prompt then target; tones already "English tone disabled"), ``mel2ph`` ``(F,)``
    1-based phone index per 100 Hz frame with ``F`` a multiple of the DiT's 4× downsampling, ``prompt_latent``
    ``(T_ref, latent)``. ``generator`` is the CPU generator the noise is drawn from (None: the global one); it is
    advanced exactly as when the utterance is sampled alone, so batching never changes an item's noise.
    """

    phones: Tensor
    tones: Tensor
    mel2ph: Tensor
    prompt_latent: Tensor
    steps: int = 32
    p_w: float = 1.6
    t_w: float = 2.5
    generator: torch.Generator | None = None

    def frames(self, frames_per_latent: int) -> int:
        """Latent frames of the utterance (prompt included)."""
        return self.mel2ph.shape[0] // frames_per_latent

    def check(self, model: MegaDiT) -> None:
        """Raise :class:`ValueError` when the sample cannot be sampled (so a batch can leave it out)."""
        fpl = model.frames_per_latent
        latent_dim = model.dims.latent_dim
        if self.phones.dim() != 1 or self.tones.shape != self.phones.shape or self.phones.numel() == 0:
            raise ValueError(f"phones {tuple(self.phones.shape)} and tones {tuple(self.tones.shape)} must be (N,)")
        if self.mel2ph.dim() != 1 or self.mel2ph.numel() == 0 or self.mel2ph.shape[0] % fpl:
            raise ValueError(f"mel2ph {tuple(self.mel2ph.shape)} must be (F,) with F a positive multiple of {fpl}")
        if self.prompt_latent.dim() != 2 or self.prompt_latent.shape[1] != latent_dim:
            raise ValueError(f"prompt latent {tuple(self.prompt_latent.shape)} is not (T_ref, {latent_dim})")
        if self.prompt_latent.shape[0] > self.frames(fpl):
            raise ValueError(
                f"prompt latent ({self.prompt_latent.shape[0]} frames) is longer than the utterance "
                f"({self.frames(fpl)} frames)"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def _noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the CPU (same numbers on every device) in float32, moved to ``device``."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


@torch.inference_mode()
def _sample_group(model: MegaDiT, samples: Sequence[DiTSample], steps: int) -> list[Tensor]:
    """CFG + AMO sampling of ``samples`` (all with ``steps`` steps) as one right-padded batch of ``3 × len`` rows.

    Rows ``3i``, ``3i + 1``, ``3i + 2`` are item ``i``'s speaker+text, text-only and unconditional rows. Padding:
    phone/tone/mel2ph id 0 (the padding id everywhere), zero latent context; the backbone gets a key-padding mask and
    the linguistic convolutions the frame lengths, so each item's real frames see exactly what they see alone. One
    item alone runs unpadded and unmasked (the original's computation).
    """
    device = next(model.parameters()).device
    fpl = model.frames_per_latent
    latent_dim = model.dims.latent_dim
    count = len(samples)
    n_phones = [s.phones.shape[0] for s in samples]
    n_mel = [s.mel2ph.shape[0] for s in samples]
    frames = [s.frames(fpl) for s in samples]
    n_max, f_max, t_max = max(n_phones), max(n_mel), max(frames)
    padded = len(set(n_phones)) > 1 or len(set(n_mel)) > 1

    rows = 3 * count
    phones = torch.zeros(rows, n_max, dtype=torch.long)
    tones = torch.zeros(rows, n_max, dtype=torch.long)
    mel2ph = torch.zeros(rows, f_max, dtype=torch.long)
    lat_ctx = torch.zeros(rows, t_max, latent_dim)
    ctx_mask = torch.zeros(rows, t_max, 1)
    for i, s in enumerate(samples):
        n, t_ref, r = n_phones[i], s.prompt_latent.shape[0], 3 * i
        phones[r : r + 2, :n] = s.phones.long()
        tones[r : r + 2, :n] = s.tones.long()
        phones[r + 2, :n] = CFG_PHONE  # unconditional row: the CFG token on every real phone
        tones[r + 2, :n] = CFG_TONE
        mel2ph[r : r + 3, : n_mel[i]] = s.mel2ph.long()
        lat_ctx[r, :t_ref] = s.prompt_latent.float().cpu()  # rows r+1 (text only) and r+2 (unconditional) get none
        ctx_mask[r : r + 3, :t_ref] = 1.0
    phones, tones, mel2ph = phones.to(device), tones.to(device), mel2ph.to(device)
    lat_ctx, ctx_mask = lat_ctx.to(device), ctx_mask.to(device)
    valid = torch.arange(t_max)[None, :] < torch.tensor(frames)[:, None]  # (count, T_max)
    key_mask = valid.repeat_interleave(3, 0).to(device) if padded else None
    mel_lengths = torch.tensor(n_mel, device=device).repeat_interleave(3) if padded else None
    p_w = torch.tensor([s.p_w for s in samples], dtype=torch.float32, device=device).view(count, 1, 1)
    t_w = torch.tensor([s.t_w for s in samples], dtype=torch.float32, device=device).view(count, 1, 1)
    frame_mask = valid.to(device=device, dtype=torch.float32).unsqueeze(-1)  # (count, T_max, 1)

    def draw() -> Tensor:
        """One noise tensor ``(count, T_max, latent)``: each item's own draw of its own length, zero-padded."""
        out = torch.zeros(count, t_max, latent_dim, device=device)
        for i, s in enumerate(samples):
            out[i, : frames[i]] = _noise((1, frames[i], latent_dim), s.generator, device)[0]
        return out

    schedule = sway_schedule(steps)
    x = draw()
    with autocast_like(model):
        x_ling = model.linguistic_features(phones, tones, mel2ph, mel_lengths)
        for i in range(steps):
            t, t_next = float(schedule[i]), float(schedule[i + 1])
            t_rows = torch.full((rows,), t, device=device)
            v_all = model(x.repeat_interleave(3, 0), t_rows, x_ling, lat_ctx, ctx_mask, key_mask).float()
            v_spk, v_text, v_uncond = v_all.view(count, 3, t_max, latent_dim).unbind(1)
            v = v_uncond + p_w * (v_text - v_uncond) + t_w * (v_spk - v_text)
            # AMO (overshoot 3): step to o beyond t', then mix back with fresh noise so the marginal matches t'.
            o = min(t_next + 3.0 * (t_next - t), 1.0)
            z_o = x + (o - t) * v
            a = t_next / o
            b = math.sqrt(max((1.0 - t_next) ** 2 - (a * (1.0 - o)) ** 2, 0.0))
            x = a * z_o + b * draw() if b > 0 else a * z_o
            x = x * frame_mask  # keep the padding at zero (it never reaches a real frame anyway)
    results = []
    for i, s in enumerate(samples):
        latent = x[i, : frames[i]].float().clone()
        latent[: s.prompt_latent.shape[0]] = s.prompt_latent.to(device).float()
        results.append(latent)
    return results


def amo_sample_batch(model: MegaDiT, samples: Sequence[DiTSample]) -> list[Tensor]:
    """Sample several utterances together (C.5, one batch per distinct step count); returns each latent
    ``(F_i / 4, latent)`` float32 on the model device, the first ``T_ref`` frames replaced by the prompt latent.

    Each item's result equals its solo result up to float rounding (padding is masked, noise comes from each item's
    own generator in the solo order); ``p_w``/``t_w`` are per item. Raises :class:`ValueError` for an invalid item
    (call :meth:`DiTSample.check` first to keep one bad item from failing the rest).
    """
    for sample in samples:
        sample.check(model)
    groups: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.steps, []).append(i)
    out: list[Tensor | None] = [None] * len(samples)
    for steps, indices in groups.items():
        for i, latent in zip(indices, _sample_group(model, [samples[i] for i in indices], steps), strict=True):
            out[i] = latent
    return [latent for latent in out if latent is not None]


def amo_sample(
    model: MegaDiT,
    *,
    phones: Tensor,
    tones: Tensor,
    mel2ph: Tensor,
    prompt_latent: Tensor,
    steps: int = 32,
    p_w: float = 1.6,
    t_w: float = 2.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate the latent of one utterance (prompt + target) with CFG and the AMO sampler (C.5).

    ``phones``/``tones`` ``(1, N)`` (prompt then target; tones already "English tone disabled"), ``mel2ph`` ``(1, F)``
    with ``F`` a multiple of 4, ``prompt_latent`` ``(1, T_ref, latent)``. Returns ``(1, F / 4, latent)`` float32 with
    the first ``T_ref`` frames replaced by the prompt latent. Guidance: ``v = v_u + p_w (v_text − v_u) +
    t_w (v_spk − v_text)``; the three rows run as one batch. Noise is drawn on the CPU from ``generator`` (so a
    seed gives the same result on every device). The model runs in its parameters' dtype (:func:`autocast_like`);
    the sampler state stays float32.
    """
    sample = DiTSample(
        phones=phones[0],
        tones=tones[0],
        mel2ph=mel2ph[0],
        prompt_latent=prompt_latent[0],
        steps=steps,
        p_w=p_w,
        t_w=t_w,
        generator=generator,
    )
    return amo_sample_batch(model, [sample])[0].unsqueeze(0)
