"""The MegaTTS3 modules: published structure (keys and parameter totals, on ``meta``) and reference numerics (E.11)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flashtts_core.engines.mega.config import (  # noqa: E402
    MegaAlignerDims,
    MegaDiTDims,
    MegaDurationDims,
    MegaWaveVAEDims,
)
from flashtts_core.engines.mega.modeling_aligner import MegaAligner, whisper_log_mel, whisper_mel_filters  # noqa: E402
from flashtts_core.engines.mega.modeling_dit import (  # noqa: E402
    MegaDiT,
    MegaRelAttention,
    MegaTimestepEmbedding,
    _apply_pair_rope,
    _rope_tables,
    amo_sample,
    sinusoidal_embedding,
    sway_schedule,
)
from flashtts_core.engines.mega.modeling_dur import MegaDurationLM, MegaDurationState  # noqa: E402
from flashtts_core.engines.mega.modeling_wavvae import MegaWaveVAEDecoder  # noqa: E402
from flashtts_core.models.loading import state_dict_shapes  # noqa: E402


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_published_dit_structure() -> None:
    """484 tensors and 458.8 M parameters (= the 1.836 GB fp32 file), with the listed key names and shapes."""
    with torch.device("meta"):
        dit = MegaDiT(MegaDiTDims())
    shapes = state_dict_shapes(dit)
    assert len(shapes) == 484
    assert round(_params(dit) / 1e5) == 4588
    assert shapes["ph_encoder.encoder.attn_layers.5.emb_rel_k"] == (1, 9, 256)
    assert shapes["encoder.layers.23.attention_norm.linear.weight"] == (6144, 1024)
    assert shapes["encoder.norm.linear.weight"] == (2048, 1024)
    assert shapes["ling_pre_net.1.weight"] == (1024, 1024, 4)
    assert shapes["local_cond_project.weight"] == (512, 48)
    assert shapes["ph_encoder.pre.norm_layers.2.gamma"] == (1024,)
    assert shapes["ph_encoder.encoder.ffn_layers.0.conv_2.weight"] == (1024, 2048, 1)


def test_published_aligner_and_wavvae_structure() -> None:
    with torch.device("meta"):
        aligner = MegaAligner(MegaAlignerDims())
        vae = MegaWaveVAEDecoder(MegaWaveVAEDims())
    shapes = state_dict_shapes(aligner)
    assert len(shapes) == 247  # the positional buffer is in the file
    assert round((_params(aligner) + 3000 * 512) / 1e5) == 546
    assert shapes["decoder.out_proj.bias"] == (6800,) and "encoder.blocks.0.attn.key.bias" not in shapes
    assert round(_params(vae) / 1e5) == 2261
    vae_shapes = state_dict_shapes(vae)
    assert vae_shapes["decoder.model_up.1.weight_v"] == (2048, 160, 7)
    assert vae_shapes["decoder.model_up.12.weight_v"] == (1, 128, 7)
    assert vae_shapes["decoder.model_up.13.weight"] == (1, 1, 1)  # use_tanh false
    assert vae_shapes["latent_upsampler.trans_upsample.1.weight_v"] == (320, 160, 10)
    assert "decoder.model_up.9.block3.convs2.2.weight_g" in vae_shapes


def test_wavvae_lengths_and_windows() -> None:
    torch.manual_seed(0)
    vae = MegaWaveVAEDecoder(MegaWaveVAEDims(latent_hidden=8, upsampler_out=8, first_channels=32, ngf=2)).eval()
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.2)
    vae.fold_weight_norm()
    latent = torch.randn(1, 30, 32)
    with torch.inference_mode():
        whole = vae(latent)[0]
        window = vae.decode_window(latent, 10, 20, context=12)
    assert whole.shape == (30 * 960,)
    torch.testing.assert_close(window, whole[10 * 960 : 20 * 960], atol=1e-5, rtol=0)


def test_whisper_mel() -> None:
    assert whisper_mel_filters(80).shape == (80, 201)
    assert whisper_mel_filters(80).sum() == pytest.approx(1.999024, abs=1e-5)
    mel = whisper_log_mel(np.sin(np.arange(16000) * 0.1).astype(np.float32))
    assert mel.shape == (1, 80, 100)  # last frame dropped: L // 160
    assert float(mel.max() - mel.min()) <= 2.0 + 1e-6  # 8 (x10 dB) of range, divided by 4


def test_sway_schedule_and_amo_constants() -> None:
    s32 = sway_schedule(32).tolist()
    assert s32[0] == 0 and s32[-1] == 1
    np.testing.assert_allclose(s32[1:3], [0.001205, 0.004815], atol=1e-6)
    np.testing.assert_allclose(s32[-3:-1], [0.901983, 0.950932], atol=1e-6)
    s10 = sway_schedule(10).tolist()
    np.testing.assert_allclose(s10[1:4], [0.012312, 0.048943, 0.108993], atol=1e-6)
    t, t_next = s10[0], s10[1]
    o = min(t_next + 3 * (t_next - t), 1.0)
    a = t_next / o
    b = math.sqrt((1 - t_next) ** 2 - (a * (1 - o)) ** 2)
    assert (o, a) == (pytest.approx(0.0492465, abs=1e-6), pytest.approx(0.25))
    assert b == pytest.approx(0.9586619, abs=1e-6)


def test_time_embedding_sinusoid() -> None:
    emb = sinusoidal_embedding(torch.tensor([0.5]), 256, scale=1000.0)[0]
    np.testing.assert_allclose(emb[:3].numpy(), [-0.4677718, 0.0666987, -0.8664088], atol=1e-5)
    np.testing.assert_allclose(emb[128:131].numpy(), [-0.8838493, 0.9977732, 0.4993353], atol=1e-5)
    assert MegaTimestepEmbedding(256, 8)(torch.tensor([0.5, 0.1])).shape == (2, 8)


def test_pair_rope_is_complex_multiplication() -> None:
    x = torch.randn(1, 1, 5, 8)
    cos, sin = _rope_tables(5, 8, torch.device("cpu"))
    out = _apply_pair_rope(x, cos, sin)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    rot = torch.polar(torch.ones(5, 4), torch.arange(5).float()[:, None] * inv)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(1, 1, 5, 4, 2)) * rot).reshape(1, 1, 5, 8)
    torch.testing.assert_close(out, expected)


def test_relative_attention_matches_a_direct_loop() -> None:
    torch.manual_seed(1)
    attn = MegaRelAttention(8, 2, window=2)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 8, 6)
    mask = torch.ones(1, 1, 6, 6)
    out = attn(x, mask)
    q = attn.conv_q(x).view(2, 4, 6).transpose(1, 2)
    k = attn.conv_k(x).view(2, 4, 6).transpose(1, 2)
    v = attn.conv_v(x).view(2, 4, 6).transpose(1, 2)
    rk, rv = attn.emb_rel_k[0], attn.emb_rel_v[0]
    ref = torch.zeros(2, 6, 4)
    for h in range(2):
        for i in range(6):
            logits = torch.stack(
                [(q[h, i] @ k[h, j] + (q[h, i] @ rk[j - i + 2] if abs(j - i) <= 2 else 0)) / 2 for j in range(6)]
            )
            p = logits.softmax(0)
            ref[h, i] = sum(p[j] * (v[h, j] + (rv[j - i + 2] if abs(j - i) <= 2 else 0)) for j in range(6))
    expected = attn.conv_o(ref.transpose(1, 2).reshape(1, 8, 6))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_duration_lm_incremental_equals_full_recompute() -> None:
    torch.manual_seed(2)
    lm = MegaDurationLM(MegaDurationDims(txt_hidden=8, hidden=16, layers=2, heads=4, ffn_hidden=32, ffn_kernel=3))
    for p in lm.parameters():
        torch.nn.init.normal_(p, std=0.3)
    phones = torch.randint(3, 170, (1, 7))
    tones = torch.randint(1, 16, (1, 7))
    prev = torch.randint(1, 129, (1, 7))
    with torch.inference_mode():
        full = lm._step(prev, lm.linguistic(phones, tones), MegaDurationState())
        state = MegaDurationState()
        head = lm._step(prev[:, :4], lm.linguistic(phones[:, :4], tones[:, :4]), state)
        steps = [lm._step(prev[:, i : i + 1], lm.linguistic(phones, tones)[:, i : i + 1], state) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([head, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    codes = lm.decode(phones, tones, lm.prefill(phones, tones, prev), last_code=5)
    assert len(codes) == 7 and all(1 <= c <= 128 for c in codes)


def test_amo_sample_shapes_and_prompt_overwrite() -> None:
    torch.manual_seed(3)
    dit = MegaDiT(
        MegaDiTDims(
            dim=16,
            heads=2,
            layers=1,
            ffn_hidden=32,
            local_cond_dim=8,
            time_freq_dim=16,
            text_hidden=16,
            text_filter=32,
            text_heads=2,
            text_layers=1,
        )
    )
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.1)
    phones = torch.tensor([[145, 120, 130, 148]])
    mel2ph = torch.tensor([[1] * 8 + [2] * 8 + [3] * 8 + [4] * 8])
    prompt = torch.randn(1, 3, 32)
    gen = torch.Generator().manual_seed(0)
    out = amo_sample(
        dit,
        phones=phones,
        tones=torch.full_like(phones, 3),
        mel2ph=mel2ph,
        prompt_latent=prompt,
        steps=4,
        generator=gen,
    )
    assert out.shape == (1, 8, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :3], prompt)
    again = amo_sample(
        dit,
        phones=phones,
        tones=torch.full_like(phones, 3),
        mel2ph=mel2ph,
        prompt_latent=prompt,
        steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, again)
