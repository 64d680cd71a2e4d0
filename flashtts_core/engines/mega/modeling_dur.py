"""The MegaTTS3 duration LM (``duration_lm/``, sub-dict ``dur_model``): an autoregressive per-phone duration model.

Why autoregressive and prompted: durations of the target text continue the prompt speaker's rhythm. The prompt's
durations (as codes ``dur + 1``) are teacher-forced through the decoder to fill its KV cache; the target phones are
then decoded one code per phone, each step's input being ``code_emb(previous code) + enc_proj(x_ling[phone])``
(models.md §C.2.3, §C.4 steps 4 and 6).

Module tree (checked against the public MegaTTS3 source; see :class:`~.config.MegaDurationDims`):
``encoder`` (phone Embedding, or a RelTransformer when ``lm_use_enc``), ``ling_label_embed_layers.<label>``,
``enc_proj``, ``code_emb`` (``code_size + 2`` rows, BOS = ``code_size + 1``), ``layers.N.op.{layer_norm1, self_attn
(in_proj_weight, out_proj; no biases upstream), layer_norm2, ffn.{ffn_1.1, ffn_2}}`` (pre-LN unless ``use_post_ln``;
rotary embedding of the rotate-half kind on q/k, base 10000), ``layer_norm`` (pre-LN only), ``project_out_dim``
(``project_out_dim.0`` + Softplus for the ``ar_mse`` regression head). Tensors upstream creates but inference never
uses: ``char_empty_embed`` (always), ``char_encoder`` (when ``mega_use_char``) and the sinusoidal position module's
``embed_positions._float_tensor`` buffer (when ``use_pos_embed``); the loader verifies and drops them
(:func:`duration_unused_shapes`, :func:`duration_unused_prefixes`).

Shapes are time-major ``(B, T, C)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashtts_core.engines.mega.config import MegaDurationDims
from flashtts_core.engines.mega.modeling_dit import (
    MegaFloat32LayerNorm,
    MegaRelTransformerEncoder,
    sinusoidal_embedding,
)

__all__ = (
    "MegaDurationLM",
    "MegaDurationLayer",
    "MegaDurationState",
    "MegaRotarySelfAttention",
    "duration_unused_prefixes",
    "duration_unused_shapes",
)

logger = logging.getLogger(__name__)

_ROPE_BASE = 10000.0


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _rotary(x: Tensor, positions: Tensor) -> Tensor:
    """Rotate-half RoPE of ``x`` ``(B, H, T, D)`` at ``positions`` ``(T,)`` (cos/sin duplicated over both halves)."""
    d = x.shape[-1]
    inv = 1.0 / (_ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    angles = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    xf = x.float()
    return (xf * emb.cos() + _rotate_half(xf) * emb.sin()).to(x.dtype)


@dataclass
class MegaDurationState:
    """Incremental decoder state: per-layer keys/values ``(B, H, T, D)`` (already rotated) and the FFN inputs kept
    for a causal convolution wider than one frame, plus the number of positions consumed."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    ffn_inputs: list[Tensor | None] = field(default_factory=list)
    length: int = 0

    def copy(self) -> MegaDurationState:
        """A shallow copy that later steps can extend without touching this one (tensors are never mutated)."""
        return MegaDurationState(list(self.keys), list(self.values), list(self.ffn_inputs), self.length)


class MegaRotarySelfAttention(nn.Module):
    """Causal self-attention with a fused ``in_proj_weight`` ``(3H, H)`` (+ optional ``in_proj_bias``) and
    ``out_proj``; rotary positions on q and k."""

    def __init__(self, hidden: int, heads: int, *, in_bias: bool, out_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden)) if in_bias else None
        self.out_proj = nn.Linear(hidden, hidden, bias=out_bias)

    def forward(
        self, x: Tensor, positions: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``(B, T, H)`` at ``positions`` ``(T,)`` → (output ``(B, T, H)``, all keys, all values)."""
        b, t, _ = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)

        def split(y: Tensor) -> Tensor:
            return y.reshape(b, t, self.heads, -1).transpose(1, 2)

        q, k, v = _rotary(split(q), positions), _rotary(split(k), positions), split(v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # Queries are the last T of the S keys: query i may see keys 0..S-T+i.
        s = k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1)), k, v


class _MegaDurationFFN(nn.Module):
    """Causal (left-padded) Conv1d(H → F, k) → ×k^-½ → GELU → ``ffn_2`` (Linear or 1×1 Conv1d)."""

    def __init__(self, dims: MegaDurationDims) -> None:
        super().__init__()
        self.kernel = dims.ffn_kernel
        conv = nn.Conv1d(dims.hidden, dims.ffn_hidden, dims.ffn_kernel, bias=dims.ffn_bias)
        self.ffn_1: nn.Module = (
            nn.Sequential(nn.ConstantPad1d((dims.ffn_kernel - 1, 0), 0.0), conv) if (dims.ffn_left_pad) else conv
        )
        self._conv = conv
        if dims.ffn_conv_out:
            self.ffn_2: nn.Module = nn.Conv1d(dims.ffn_hidden, dims.hidden, 1, bias=dims.ffn_bias)
        else:
            self.ffn_2 = nn.Linear(dims.ffn_hidden, dims.hidden, bias=dims.ffn_bias)

    def forward(self, x: Tensor, history: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` ``(B, T, H)``; ``history`` the previous ``k - 1`` inputs ``(B, k-1, H)`` (None: zeros).

        Returns the output and the new history.
        """
        k = self.kernel
        if k > 1:
            past = history if history is not None else x.new_zeros(x.shape[0], k - 1, x.shape[2])
            full = torch.cat([past, x], dim=1)
            h = F.conv1d(full.transpose(1, 2), self._conv.weight, self._conv.bias)  # valid conv: T outputs
            new_history = full[:, -(k - 1) :]
        else:
            h = self._conv(x.transpose(1, 2))
            new_history = None
        h = F.gelu(h * k**-0.5)
        if isinstance(self.ffn_2, nn.Conv1d):
            return self.ffn_2(h).transpose(1, 2), new_history
        return self.ffn_2(h.transpose(1, 2)), new_history


class _MegaDurationOp(nn.Module):
    def __init__(self, dims: MegaDurationDims) -> None:
        super().__init__()
        self.layer_norm1 = MegaFloat32LayerNorm(dims.hidden)
        self.self_attn = MegaRotarySelfAttention(
            dims.hidden, dims.heads, in_bias=dims.attn_in_bias, out_bias=dims.attn_out_bias
        )
        self.layer_norm2 = MegaFloat32LayerNorm(dims.hidden)
        self.ffn = _MegaDurationFFN(dims)


class MegaDurationLayer(nn.Module):
    """One decoder layer (``layers.N.op.*``), pre-LN (or post-LN with ``use_post_ln``)."""

    def __init__(self, dims: MegaDurationDims) -> None:
        super().__init__()
        self.post_ln = dims.use_post_ln
        self.op = _MegaDurationOp(dims)

    def forward(
        self, x: Tensor, positions: Tensor, past: tuple[Tensor, Tensor] | None, history: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        op = self.op
        if self.post_ln:
            attn, k, v = op.self_attn(x, positions, past)
            x = op.layer_norm1(x + attn)
            ffn, history = op.ffn(x, history)
            return op.layer_norm2(x + ffn), k, v, history
        attn, k, v = op.self_attn(op.layer_norm1(x), positions, past)
        x = x + attn
        ffn, history = op.ffn(op.layer_norm2(x), history)
        return x + ffn, k, v, history


class MegaDurationLM(nn.Module):
    """The ``ar_dur`` duration predictor; :meth:`prefill` + :meth:`decode` implement C.4 steps 4 and 6."""

    def __init__(self, dims: MegaDurationDims, text_encoder: dict[str, int] | None = None) -> None:
        super().__init__()
        self.dims = dims
        if dims.lm_use_enc:
            if text_encoder is None:
                raise ValueError("lm_use_enc needs the text encoder sizes")
            te = text_encoder
            self.encoder: nn.Module = MegaRelTransformerEncoder(
                te["vocab"],
                te["hidden"],
                te["filter"],
                te["heads"],
                te["layers"],
                te["kernel"],
                te["window"],
                te["prenet_layers"],
                te["prenet_kernel"],
            )
        else:
            self.encoder = nn.Embedding(dims.phone_vocab, dims.txt_hidden, padding_idx=0)
        self.ling_label_embed_layers = nn.ModuleDict(
            {
                label: nn.Embedding(size, dims.txt_hidden, padding_idx=0)
                for label, size in zip(dims.ling_labels, dims.ling_vocab, strict=True)
            }
        )
        self.enc_proj = nn.Linear(dims.txt_hidden, dims.hidden)
        self.code_emb = nn.Embedding(dims.code_size + 2, dims.hidden, padding_idx=0)
        self.layers = nn.ModuleList(MegaDurationLayer(dims) for _ in range(dims.layers))
        self.layer_norm = None if dims.use_post_ln else MegaFloat32LayerNorm(dims.hidden)
        # Classification over codes 0..code_size, or (``ar_mse``) Linear → Softplus (keys ``project_out_dim.0.*``).
        self.project_out_dim: nn.Module = (
            nn.Sequential(nn.Linear(dims.hidden, 1), nn.Softplus())
            if dims.regression
            else nn.Linear(dims.hidden, dims.code_size + 1)
        )

    @property
    def bos(self) -> int:
        return self.dims.code_size + 1

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return self.code_emb.weight.device

    def linguistic(self, phones: Tensor, tones: Tensor) -> Tensor:
        """``phones``/``tones`` ``(B, N)`` → projected phone features ``(B, N, hidden)`` (zero on padding)."""
        tone_emb = self.ling_label_embed_layers["tone"](tones)
        if self.dims.lm_use_enc:
            other = tone_emb
            if self.dims.use_ph_pos_embed:
                positions = torch.arange(phones.shape[1], device=phones.device)[None].expand_as(phones)
                other = other + sinusoidal_embedding(positions, self.dims.txt_hidden).to(other.dtype)
            x = self.encoder(phones, other * (phones > 0).unsqueeze(-1).to(other.dtype))
        else:
            x = self.encoder(phones) + tone_emb
        x = x * (phones > 0).unsqueeze(-1).to(x.dtype)
        return self.enc_proj(x)

    def _step(self, codes: Tensor, x_ling: Tensor, state: MegaDurationState, call_offset: int = 0) -> Tensor:
        """Run ``codes`` ``(B, T)`` (previous codes) + ``x_ling`` ``(B, T, hidden)`` at the next T positions; returns
        the head output ``(B, T, classes)`` and extends ``state``.

        Rotary positions continue ``state`` (prompt 0..P-1, then the target). The optional sinusoidal positions
        (``use_pos_embed``) count from 1 within each prefill/decode call instead (``call_offset`` = the index of the
        first code in its call), as upstream's incremental position module restarts with every ``infer`` call.
        """
        t = codes.shape[1]
        positions = torch.arange(state.length, state.length + t, device=codes.device)
        x = self.code_emb(codes) + x_ling
        if self.dims.use_pos_embed:
            # Fairseq-style sinusoidal positions with padding_idx 0: the first real position is 1.
            within = torch.arange(call_offset + 1, call_offset + t + 1, device=codes.device)
            x = x + sinusoidal_embedding(within, self.dims.hidden).to(x.dtype)
        first = not state.keys
        for i, layer in enumerate(self.layers):
            past = None if first else (state.keys[i], state.values[i])
            history = None if first else state.ffn_inputs[i]
            x, k, v, history = layer(x, positions, past, history)
            if first:
                state.keys.append(k)
                state.values.append(v)
                state.ffn_inputs.append(history)
            else:
                state.keys[i], state.values[i], state.ffn_inputs[i] = k, v, history
        state.length += t
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.project_out_dim(x)

    @torch.inference_mode()
    def prefill(self, phones: Tensor, tones: Tensor, codes: Tensor) -> MegaDurationState:
        """Teacher-force the prompt: ``phones``/``tones``/``codes`` ``(1, P)`` (codes = durations + 1). The inputs
        are BOS then the first ``P - 1`` codes; positions 0..P-1."""
        state = MegaDurationState()
        prev = torch.cat([torch.full_like(codes[:, :1], self.bos), codes[:, :-1]], dim=1)
        self._step(prev, self.linguistic(phones, tones), state)
        return state

    @torch.inference_mode()
    def decode(
        self,
        phones: Tensor,
        tones: Tensor,
        state: MegaDurationState,
        last_code: int,
        *,
        first_step_min: int = 0,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """One duration code per target phone (``phones``/``tones`` ``(1, N)``), continuing ``state`` from the
        prompt's last code. Codes are clamped to ≥ 1 (≥ ``first_step_min`` at step 0). ``state`` is not modified."""
        state = state.copy()
        x_ling = self.linguistic(phones, tones)
        prev = torch.tensor([[last_code]], device=phones.device)
        codes: list[int] = []
        for i in range(phones.shape[1]):
            out = self._step(prev, x_ling[:, i : i + 1], state, call_offset=i)[0, -1].float()
            if self.dims.regression:
                code = int(torch.round(out[0]))  # the head ends with Softplus
            elif self.dims.infer_top_k:
                logits = out / max(self.dims.infer_temperature, 1e-5)
                top = torch.topk(logits, min(self.dims.infer_top_k, logits.numel()))
                probs = torch.softmax(top.values, -1).cpu()
                code = int(top.indices[int(torch.multinomial(probs, 1, generator=generator))])
            else:
                code = int(out.argmax())
            code = max(code, first_step_min if i == 0 else 1)
            code = min(code, self.dims.code_size)
            codes.append(code)
            prev = torch.tensor([[code]], device=phones.device)
        return codes


def duration_unused_shapes(dims: MegaDurationDims) -> dict[str, tuple[int, ...]]:
    """Tensors of the file that inference never uses (verified by shape, then dropped).

    Upstream creates ``char_empty_embed`` whatever ``mega_use_char`` says, the char encoder only with it (an Embedding
    unless ``lm_use_enc``, see :func:`duration_unused_prefixes`), and the one-element ``_float_tensor`` buffer of its
    sinusoidal position module with ``use_pos_embed``.
    """
    unused: dict[str, tuple[int, ...]] = {"char_empty_embed.weight": (1, dims.txt_hidden)}
    if dims.mega_use_char and not dims.lm_use_enc:
        unused["char_encoder.weight"] = (dims.char_vocab, dims.txt_hidden)
    if dims.use_pos_embed:
        unused["embed_positions._float_tensor"] = (1,)
    return unused


def duration_unused_prefixes(dims: MegaDurationDims) -> tuple[str, ...]:
    """Key prefixes of unused sub-modules whose shapes are not verified: the RelTransformer char encoder that upstream
    builds with ``lm_use_enc`` and ``mega_use_char``."""
    return ("char_encoder.",) if dims.mega_use_char and dims.lm_use_enc else ()
