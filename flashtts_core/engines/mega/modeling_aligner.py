"""The MegaTTS3 aligner (``aligner_lm/``, sub-dict ``model``): a small Whisper-style encoder–decoder.

Why it exists: a cloned voice needs the prompt's phones, tones and per-phone durations (the DiT conditions on a
frame→phone map of prompt + target, the duration LM continues the prompt's durations). The aligner reads the
prompt's log-mel spectrogram and writes ``[phone, end-timestamp, phone, end-timestamp, ...]`` greedily
(models.md §C.2.1, §C.4 step 2). Tokens: 0..799 merged phone ids (798 start, 799 end), ``800 + f`` = a phone ends at
mel frame ``f`` (10 ms frames).

Differences from OpenAI Whisper that matter for loading: ``decoder.out_proj`` is a separate Linear **with bias**
(not tied to the token embedding); the encoder's sinusoidal positions are stored in the file (a persistent buffer).
LayerNorms run in fp32. Decoding uses a KV cache; the original recomputes the whole prefix every step, which gives
the same tokens.

Shapes are time-major ``(B, T, C)`` except the mel input ``(B, n_mels, F)``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashtts_core.engines.mega.config import ALIGNER_END, ALIGNER_START, MegaAlignerDims
from flashtts_core.engines.mega.modeling_dit import MegaFloat32LayerNorm
from flashtts_core.engines.spark.modeling_bicodec import slaney_mel_filterbank

__all__ = (
    "WHISPER_HOP",
    "WHISPER_N_FFT",
    "WHISPER_SAMPLE_RATE",
    "MegaAligner",
    "MegaAlignerAttention",
    "MegaAlignerBlock",
    "MegaAlignerDecoder",
    "MegaAlignerEncoder",
    "MegaAlignerLayerNorm",
    "whisper_log_mel",
    "whisper_mel_filters",
)

logger = logging.getLogger(__name__)

WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160  # 10 ms: the same 100 Hz frame rate as the 24 kHz / 240 mel frames of the DiT


def whisper_mel_filters(n_mels: int = 80) -> np.ndarray:
    """Slaney mel filters ``(n_mels, 201)`` for 16 kHz / n_fft 400 (librosa's ``filters.mel`` defaults)."""
    return np.ascontiguousarray(slaney_mel_filterbank(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels, 0.0, None).T)


def whisper_log_mel(audio: np.ndarray, n_mels: int = 80) -> Tensor:
    """Whisper's log-mel spectrogram of 16 kHz mono audio (E.11): ``(L,)`` → ``(1, n_mels, L // 160)`` float32.

    Periodic Hann(400), centre reflect padding, power spectrum with the last frame dropped, slaney mel, ``log10``
    floored at 1e-10, dynamic range limited to 8 (×10 dB) below the maximum, then ``(x + 4) / 4``.
    """
    wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if wav.numel() <= WHISPER_N_FFT // 2:
        wav = F.pad(wav, (0, WHISPER_N_FFT // 2 + 1 - wav.numel()))
    window = torch.hann_window(WHISPER_N_FFT, periodic=True)
    stft = torch.stft(
        wav, WHISPER_N_FFT, WHISPER_HOP, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = stft[..., :-1].abs() ** 2  # (201, F)
    mel = torch.from_numpy(whisper_mel_filters(n_mels)) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).unsqueeze(0)


class MegaAlignerLayerNorm(MegaFloat32LayerNorm):
    """LayerNorm computed in fp32 whatever the activation dtype (as the original)."""


class MegaAlignerAttention(nn.Module):
    """Multi-head attention: ``query``/``value``/``out`` with bias, ``key`` without; scale 1/sqrt(head_dim)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def split(self, x: Tensor) -> Tensor:
        """``(B, T, C)`` → ``(B, H, T, D)``."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``source`` ``(B, S, C)``, each ``(B, H, S, D)``."""
        return self.split(self.key(source)), self.split(self.value(source))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
        """Queries from ``x`` ``(B, T, C)`` over keys/values ``(B, H, S, D)`` → ``(B, T, C)``."""
        q = self.split(self.query(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1)
        return self.out(out.transpose(1, 2).flatten(2))


class MegaAlignerBlock(nn.Module):
    """Pre-LN residual block: self-attention, optional cross-attention, GELU MLP (``mlp.0`` / ``mlp.2``)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, *, cross: bool) -> None:
        super().__init__()
        self.attn = MegaAlignerAttention(width, heads)
        self.attn_ln = MegaAlignerLayerNorm(width)
        self.cross_attn = MegaAlignerAttention(width, heads) if cross else None
        self.cross_attn_ln = MegaAlignerLayerNorm(width) if cross else None
        self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, width))
        self.mlp_ln = MegaAlignerLayerNorm(width)

    def forward(
        self,
        x: Tensor,
        *,
        cache: dict[str, Tensor] | None = None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
    ) -> Tensor:
        """``x`` ``(B, T, C)``. With ``cache``, this call's keys/values are appended to it (incremental decoding)."""
        h = self.attn_ln(x)
        k, v = self.attn.project_kv(h)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            # Incremental: one new query attends to every cached key, which is exactly the causal row.
            causal = causal and x.shape[1] > 1
        x = x + self.attn(h, k, v, causal=causal)
        if self.cross_attn is not None and self.cross_attn_ln is not None and cross_kv is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), *cross_kv)
        return x + self.mlp(self.mlp_ln(x))


class MegaAlignerEncoder(nn.Module):
    """conv1 (k3) + GELU, conv2 (k3, stride 2) + GELU, stored sinusoidal positions, blocks, ``ln_post``."""

    def __init__(self, dims: MegaAlignerDims) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(dims.n_mels, dims.width, 3, padding=1)
        self.conv2 = nn.Conv1d(dims.width, dims.width, 3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.empty(dims.audio_ctx, dims.width))
        self.blocks = nn.ModuleList(
            MegaAlignerBlock(dims.width, dims.heads, dims.mlp_hidden, cross=False) for _ in range(dims.encoder_layers)
        )
        self.ln_post = MegaAlignerLayerNorm(dims.width)

    def forward(self, mel: Tensor) -> Tensor:
        """``(B, n_mels, F)`` → ``(B, ceil(F / 2), C)``; at most ``audio_ctx`` output frames."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        if x.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(
                f"the reference is too long for the aligner: {x.shape[1]} frames > {self.positional_embedding.shape[0]}"
            )
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class MegaAlignerDecoder(nn.Module):
    """Token + learned position embedding, causal blocks with cross-attention, ``ln``, untied ``out_proj``."""

    def __init__(self, dims: MegaAlignerDims) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(dims.vocab_size, dims.width)
        self.positional_embedding = nn.Parameter(torch.empty(dims.text_ctx, dims.width))
        self.blocks = nn.ModuleList(
            MegaAlignerBlock(dims.width, dims.heads, dims.mlp_hidden, cross=True) for _ in range(dims.decoder_layers)
        )
        self.ln = MegaAlignerLayerNorm(dims.width)
        self.out_proj = nn.Linear(dims.width, dims.vocab_size)

    def forward(
        self,
        tokens: Tensor,
        cross_kv: list[tuple[Tensor, Tensor]],
        caches: list[dict[str, Tensor]],
        offset: int,
    ) -> Tensor:
        """Logits ``(B, T, vocab)`` of ``tokens`` ``(B, T)`` at positions ``offset..offset+T-1`` (caches updated)."""
        x = self.token_embedding(tokens) + self.positional_embedding[offset : offset + tokens.shape[1]]
        for block, kv, cache in zip(self.blocks, cross_kv, caches, strict=True):
            x = block(x, cache=cache, cross_kv=kv, causal=True)
        return self.out_proj(self.ln(x))


class MegaAligner(nn.Module):
    """The full aligner; :meth:`align_tokens` runs the greedy decode of C.4 step 2."""

    def __init__(self, dims: MegaAlignerDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = MegaAlignerEncoder(dims)
        self.decoder = MegaAlignerDecoder(dims)

    @torch.inference_mode()
    def align_tokens(self, mel: Tensor, *, max_steps: int = 768) -> list[int]:
        """Greedy tokens after the start token up to (excluding) the end token, for one mel ``(1, n_mels, F)``.

        Stops after ``max_steps`` generated tokens (the original's limit) or at the decoder's context.
        """
        device = self.decoder.out_proj.weight.device
        dtype = self.decoder.out_proj.weight.dtype
        audio = self.encoder(mel.to(device=device, dtype=dtype))
        cross_kv = [block.cross_attn.project_kv(audio) for block in self.decoder.blocks if block.cross_attn is not None]
        caches: list[dict[str, Tensor]] = [{} for _ in self.decoder.blocks]
        limit = min(max_steps, self.dims.text_ctx - 1)
        token = torch.tensor([[ALIGNER_START]], device=device)
        out: list[int] = []
        for step in range(limit):
            logits = self.decoder(token, cross_kv, caches, offset=step)
            next_id = int(logits[0, -1].float().argmax())
            if next_id == ALIGNER_END:
                break
            out.append(next_id)
            token = torch.tensor([[next_id]], device=device)
        else:
            logger.warning("the aligner did not finish within %d tokens; using what it produced", limit)
        return out
