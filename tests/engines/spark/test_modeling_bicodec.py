"""BiCodec modules: reference numerics (models.md §E) and the published key inventory (A.6), without weights."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flashtts_core.engines.spark.config import (  # noqa: E402
    BiCodecConfig,
    BiCodecDims,
    SparkMelConfig,
    SparkWaveGeneratorConfig,
    infer_bicodec_dims,
)
from flashtts_core.engines.spark.modeling_bicodec import (  # noqa: E402
    SparkAdaLayerNorm,
    SparkBiCodecModel,
    SparkFactorizedVQ,
    SparkFSQ,
    SparkMelSpectrogram,
    SparkResidualFSQ,
    SparkSamplingBlock,
    SparkSnake,
    SparkWaveGenerator,
    SparkWNConv1d,
    SparkWNConvTranspose1d,
    bicodec_unused_shapes,
    slaney_mel_filterbank,
    weight_norm_weight,
)
from flashtts_core.testing.tiny_spark import TINY_BICODEC_DIMS  # noqa: E402

# --- E.1 mel ---------------------------------------------------------------------------------------------------------


def test_slaney_filterbank_reference_numbers() -> None:
    fb = slaney_mel_filterbank(16000, 1024, 128, 10.0, None)
    assert fb.shape == (513, 128)
    assert float(fb.astype(np.float64).sum()) == pytest.approx(8.193642, rel=1e-6)
    assert np.flatnonzero(fb[:, 0]).tolist() == [1, 2, 3]
    assert float(fb[:, 0].max()) == pytest.approx(0.0391248, rel=1e-5)
    last = np.flatnonzero(fb[:, 127])
    assert (last.min(), last.max()) == (488, 511)


def test_mel_frames_and_centred_window_padding() -> None:
    mel = SparkMelSpectrogram(SparkMelConfig())
    wav = torch.randn(2, 3200 + 17, generator=torch.Generator().manual_seed(0))
    out = mel(wav)
    assert out.shape == (2, 128, 1 + wav.shape[1] // 320)
    # A 640 window inside a 1024 FFT is the window zero-padded by 192 on each side.
    padded = torch.nn.functional.pad(torch.hann_window(640, periodic=True), (192, 192))
    spec = torch.stft(wav, 1024, 320, window=padded, center=True, pad_mode="reflect", return_complex=True).abs()
    reference = (spec.transpose(1, 2) @ torch.from_numpy(slaney_mel_filterbank(16000, 1024, 128, 10, None))).mT
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_mel_buffers_are_not_checkpoint_keys() -> None:
    assert SparkMelSpectrogram(SparkMelConfig()).state_dict() == {}


# --- E.2 FSQ ---------------------------------------------------------------------------------------------------------


def test_fsq_reference_vector() -> None:
    fsq = SparkFSQ([4] * 6)
    z = torch.tensor([-3.0, -0.5, 0.0, 0.2, 0.6, 3.0])
    torch.testing.assert_close(
        fsq.bound(z), torch.tensor([-1.98670, -0.72913, 0.0, 0.24725, 0.60819, 0.99778]), atol=1e-5, rtol=0
    )
    codes = fsq.quantize(z)
    assert codes.tolist() == [-1.0, -0.5, 0.0, 0.0, 0.5, 0.5]
    assert int(fsq.codes_to_indices(codes)) == 4004


def test_fsq_implicit_codebook_rows() -> None:
    fsq = SparkFSQ([4] * 6)
    rows = fsq.indices_to_codes(torch.tensor([0, 3, 1234, 4095]))
    assert rows.tolist() == [
        [-1.0] * 6,
        [0.5, -1, -1, -1, -1, -1],
        [0, -1, -0.5, 0.5, -1, -0.5],
        [0.5] * 6,
    ]


def test_fsq_round_trip_is_exact() -> None:
    fsq = SparkFSQ([4] * 6)
    indices = torch.arange(4096)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(indices)), indices)


def test_residual_fsq_single_stage_scale_one() -> None:
    rfsq = SparkResidualFSQ(6, [4] * 6, 1)  # dim == codebook dim: no projections, as in the original
    assert rfsq.state_dict() == {}
    z = torch.tensor([[[-3.0, -0.5, 0.0, 0.2, 0.6, 3.0]]])
    indices = rfsq.encode(z)
    assert indices.tolist() == [[[4004]]]
    assert rfsq.decode(indices).tolist() == [[[-1.0, -0.5, 0.0, 0.0, 0.5, 0.5]]]


# --- E.3 factorised VQ -----------------------------------------------------------------------------------------------


def _identity_vq(dim: int, size: int) -> SparkFactorizedVQ:
    vq = SparkFactorizedVQ(dim, size, dim)
    with torch.no_grad():
        for proj in (vq.in_project, vq.out_project):
            proj.weight_v.copy_(torch.eye(dim).unsqueeze(-1))
            proj.weight_g.fill_(1.0)
            proj.bias.zero_()
    return vq


def test_vq_lookup_is_max_cosine_and_detokenize_uses_raw_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    vq = _identity_vq(4, 64)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.randn(64, 4, generator=gen) * torch.rand(64, 1, generator=gen) * 5)
    z = torch.randn(2, 4, 9, generator=gen)
    ids = vq.tokenize(z)
    assert ids.shape == (2, 9) and ids.dtype == torch.int64
    cosine = (
        torch.nn.functional.normalize(z.transpose(1, 2), dim=-1)
        @ torch.nn.functional.normalize(vq.codebook.weight, dim=-1).T
    )
    assert torch.equal(ids, cosine.argmax(dim=-1))
    torch.testing.assert_close(vq.detokenize(ids), vq.codebook.weight[ids].transpose(1, 2))


def test_vq_ties_pick_the_lowest_index() -> None:
    vq = _identity_vq(2, 4)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [5.0, 0.0]]))
    assert vq.tokenize(torch.tensor([[[3.0], [0.0]]])).tolist() == [[1]]


# --- E.4 / E.5 / E.7 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(1.0, [-0.2919266, 0.0, 0.7298489, 2.8268218]), (0.5, [-0.5403023, 0.0, 0.6224174, 3.4161468])],
)
def test_snake_reference_values(alpha: float, expected: list[float]) -> None:
    snake = SparkSnake(1)
    with torch.no_grad():
        snake.alpha.fill_(alpha)
    x = torch.tensor([[[-1.0, 0.0, 0.5, 2.0]]])
    out = snake(x)  # with autograd: the out-of-place form
    torch.testing.assert_close(out[0, 0], torch.tensor(expected), atol=1e-6, rtol=0)
    with torch.inference_mode():
        assert torch.equal(snake(x), out.detach())  # the in-place form: the same bits
    assert torch.equal(x, torch.tensor([[[-1.0, 0.0, 0.5, 2.0]]]))  # the input is left alone


def test_snake_in_place_form_matches_on_wide_inputs() -> None:
    snake = SparkSnake(16)
    with torch.no_grad():
        snake.alpha.copy_(torch.rand(1, 16, 1) + 0.1)
    x = torch.randn(2, 16, 3000)
    reference = snake(x).detach()
    with torch.inference_mode():
        assert torch.equal(snake(x), reference)


def test_sampling_block_ratio_one_triples_and_transposes() -> None:
    block = SparkSamplingBlock(4)
    x = torch.arange(8.0).reshape(1, 2, 4)
    assert block(x).tolist() == [[[0, 12], [3, 15], [6, 18], [9, 21]]]
    assert block.state_dict() == {}
    with pytest.raises(ValueError, match="ratio 1"):
        SparkSamplingBlock(4, upsample_scale=2)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_weight_norm_conv_matches_torch_weight_norm() -> None:
    torch.manual_seed(0)
    ref = torch.nn.utils.weight_norm(torch.nn.Conv1d(5, 6, 7, padding=3, dilation=1))
    ours = SparkWNConv1d(5, 6, 7, padding=3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 11)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    ours.fold_weight_norm()
    assert set(ours.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_weight_norm_transposed_conv_norms_over_input_axis() -> None:
    torch.manual_seed(0)
    ref = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(6, 3, 16, stride=8, padding=4))
    assert ref.weight_g.shape == (6, 1, 1)
    ours = SparkWNConvTranspose1d(6, 3, 16, stride=8, padding=4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 6, 5)
    out = ours(x)
    assert out.shape == (1, 3, 40)
    torch.testing.assert_close(out, ref(x), rtol=1e-6, atol=1e-6)


def test_parametrization_naming_gives_the_same_weight() -> None:
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(3, 4, 5))
    params = conv.parametrizations.weight
    torch.testing.assert_close(weight_norm_weight(params.original0, params.original1), conv.weight)


def test_ada_layer_norm_multiplies_by_scale() -> None:
    torch.manual_seed(0)
    norm = SparkAdaLayerNorm(3, 5)
    x, c = torch.randn(2, 4, 5), torch.randn(2, 3)
    expected = torch.nn.functional.layer_norm(x, (5,), eps=1e-6) * norm.scale(c)[:, None] + norm.shift(c)[:, None]
    torch.testing.assert_close(norm(x, c), expected)


def test_wave_generator_length_and_padding_mask() -> None:
    torch.manual_seed(0)
    gen = SparkWaveGenerator(SparkWaveGeneratorConfig(input_channel=4, channels=16))
    for module in gen.modules():
        for name, param in module.named_parameters(recurse=False):
            with torch.no_grad():
                param.copy_(torch.rand_like(param) + 0.5 if name in ("alpha", "weight_g") else torch.randn_like(param))
    gen = gen.eval().double()  # float64: the comparison below is then exact, not "close"
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        full = gen(x)
        assert full.shape == (2, 1, 5 * 320)
        alone = gen(x[1:, :, :3])
        mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2], dtype=torch.float64).unsqueeze(1)
        batched = gen(x, mask)
    # The mask zeroes padded frames before every temporal conv, exactly like the zero padding of a shorter input.
    assert torch.equal(batched[0], full[0])
    torch.testing.assert_close(batched[1, :, : 3 * 320], alone[0], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        unmasked = gen(x[1:])
    assert not torch.allclose(unmasked[0, :, : 3 * 320], alone[0])  # without the mask the tail leaks in


# --- A.6 key inventory (built on the meta device: no memory, no weights) ----------------------------------------


@pytest.fixture(scope="module")
def published_shapes() -> dict[str, tuple[int, ...]]:
    config = BiCodecConfig()
    with torch.device("meta"):
        model = SparkBiCodecModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    unused = bicodec_unused_shapes(config)
    assert not set(shapes) & set(unused)
    return {**shapes, **unused}


def test_published_key_count_and_prefixes(published_shapes: dict[str, tuple[int, ...]]) -> None:
    assert len(published_shapes) == 840
    counts = Counter()
    for key in published_shapes:
        parts = key.split(".")
        top = ".".join(parts[:2]) if parts[0] in ("encoder", "speaker_encoder", "decoder") else parts[0]
        counts[top] += 1
    assert counts == {
        "encoder.encoder": 114,
        "encoder.downsample": 48,
        "encoder.project": 2,
        "quantizer": 8,
        "speaker_encoder.speaker_encoder": 221,
        "speaker_encoder.perceiver_sampler": 18,
        "speaker_encoder.quantizer": 4,
        "speaker_encoder.project": 2,
        "prenet": 192,
        "postnet": 112,
        "decoder.model": 119,
    }


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("encoder.encoder.embed.weight", (384, 1024, 7)),
        ("encoder.encoder.convnext.11.pwconv1.weight", (2048, 384)),
        ("encoder.downsample.1.1.embed.weight", (384, 384, 7)),
        ("quantizer.in_project.weight_g", (8, 1, 1)),
        ("quantizer.in_project.weight_v", (8, 1024, 1)),
        ("quantizer.out_project.weight_v", (1024, 8, 1)),
        ("quantizer.codebook.weight", (8192, 8)),
        ("quantizer.cluster_size", (8192,)),
        ("speaker_encoder.speaker_encoder.layer1.conv.weight", (512, 128, 5)),
        ("speaker_encoder.speaker_encoder.layer1.bn.num_batches_tracked", ()),
        ("speaker_encoder.speaker_encoder.layer3.se_res2block.1.convs.6.weight", (64, 64, 3)),
        ("speaker_encoder.speaker_encoder.layer4.se_res2block.3.linear2.weight", (512, 128)),
        ("speaker_encoder.speaker_encoder.conv.weight", (1536, 1536, 1)),
        ("speaker_encoder.speaker_encoder.pool.linear1.weight", (128, 4608, 1)),
        ("speaker_encoder.speaker_encoder.bn.running_var", (3072,)),
        ("speaker_encoder.speaker_encoder.linear.weight", (1024, 3072)),
        ("speaker_encoder.perceiver_sampler.latents", (32, 128)),
        ("speaker_encoder.perceiver_sampler.proj_context.weight", (128, 1536)),
        ("speaker_encoder.perceiver_sampler.layers.1.0.to_kv.weight", (1024, 128)),
        ("speaker_encoder.perceiver_sampler.layers.0.1.0.weight", (682, 128)),
        ("speaker_encoder.perceiver_sampler.layers.0.1.2.weight", (128, 341)),
        ("speaker_encoder.perceiver_sampler.norm.gamma", (128,)),
        ("speaker_encoder.quantizer.project_in.weight", (6, 128)),
        ("speaker_encoder.project.weight", (1024, 4096)),
        ("prenet.linear_pre.weight", (384, 1024)),
        ("prenet.vocos_backbone.norm.scale.weight", (384, 1024)),
        ("prenet.vocos_backbone.convnext.11.norm.shift.bias", (384,)),
        ("postnet.vocos_backbone.convnext.5.norm.weight", (384,)),
        ("decoder.model.0.weight_v", (1536, 1024, 7)),
        ("decoder.model.1.block.0.alpha", (1, 1536, 1)),
        ("decoder.model.1.block.1.weight_g", (1536, 1, 1)),
        ("decoder.model.1.block.1.weight_v", (1536, 768, 16)),
        ("decoder.model.4.block.1.weight_v", (192, 96, 4)),
        ("decoder.model.2.block.4.block.1.weight_v", (384, 384, 7)),
        ("decoder.model.3.block.3.block.3.weight_g", (192, 1, 1)),
        ("decoder.model.5.alpha", (1, 96, 1)),
        ("decoder.model.6.weight_v", (1, 96, 7)),
    ],
)
def test_published_key_shapes(published_shapes: dict[str, tuple[int, ...]], key: str, shape: tuple[int, ...]) -> None:
    assert published_shapes[key] == shape


def test_published_parameter_totals(published_shapes: dict[str, tuple[int, ...]]) -> None:
    totals: Counter[str] = Counter()  # every stored value, BatchNorm statistics included (they are in the file)
    for key, shape in published_shapes.items():
        totals[key.split(".")[0]] += math.prod(shape)
    expected = {"encoder": 30.49, "quantizer": 0.09, "speaker_encoder": 14.07, "prenet": 39.39, "postnet": 19.69}
    for name, millions in expected.items():
        assert totals[name] / 1e6 == pytest.approx(millions, abs=0.01), name
    assert totals["decoder"] / 1e6 == pytest.approx(52.63, abs=0.01)
    assert sum(totals.values()) / 1e6 == pytest.approx(156.35, abs=0.02)


def test_dims_are_inferred_from_shapes(published_shapes: dict[str, tuple[int, ...]]) -> None:
    assert infer_bicodec_dims(published_shapes) == BiCodecDims()
    config = BiCodecConfig()
    with torch.device("meta"):
        tiny_like = SparkBiCodecModel(config, TINY_BICODEC_DIMS)
    shapes = {k: tuple(v.shape) for k, v in tiny_like.state_dict(keep_vars=True).items()}
    shapes.update(bicodec_unused_shapes(config, TINY_BICODEC_DIMS))
    assert infer_bicodec_dims(shapes) == TINY_BICODEC_DIMS
