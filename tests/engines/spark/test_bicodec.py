"""BiCodec end to end on the tiny published-layout checkpoint: loading (strict), tokenize, detokenize, batching."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from flashtts_core.engines.spark.bicodec import BiCodec, load_bicodec_model  # noqa: E402
from flashtts_core.engines.spark.config import load_root_config  # noqa: E402
from flashtts_core.engines.spark.wav2vec import SparkWav2Vec2Features, load_wav2vec2_state_dict  # noqa: E402
from flashtts_core.errors import AudioDecodeError, CheckpointError, InvalidRequestError  # noqa: E402
from flashtts_core.testing.tiny_spark import build_tiny_spark_codec  # noqa: E402

W2V = "wav2vec2-large-xlsr-53"


def _wave(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_bicodec(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    path = root / "BiCodec" / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


# --- the tiny checkpoint itself ------------------------------------------------------------------------------------


def test_tiny_layout_and_root_config(tiny_spark_dir: Path) -> None:
    root_yaml = tiny_spark_dir / "config.yaml"
    assert root_yaml.stat().st_size == 169
    config = load_root_config(root_yaml)
    assert (config.sample_rate, config.latent_hop_length, config.ref_segment_duration) == (16000, 320, 6)
    assert config.reference_length == 96000
    for name in ("BiCodec/config.yaml", "BiCodec/model.safetensors", f"{W2V}/config.json"):
        assert (tiny_spark_dir / name).is_file()
    assert (tiny_spark_dir / W2V / "preprocessor_config.json").is_file()
    assert (tiny_spark_dir / W2V / "pytorch_model.bin").is_file()
    total = sum(p.stat().st_size for p in tiny_spark_dir.rglob("*") if p.is_file())
    assert total < 10_000_000


def test_tiny_builder_is_deterministic(tiny_spark_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_spark_codec(tmp_path / "again", seed=0)
    name = "BiCodec/model.safetensors"
    assert (again / name).read_bytes() == (tiny_spark_dir / name).read_bytes()
    other = load_file(build_tiny_spark_codec(tmp_path / "other", seed=1) / name)
    assert not torch.equal(other["decoder.model.0.weight_v"], load_file(again / name)["decoder.model.0.weight_v"])


def test_tiny_file_has_the_unused_published_tensors(tiny_spark_dir: Path) -> None:
    keys = set(load_file(tiny_spark_dir / "BiCodec" / "model.safetensors"))
    assert "quantizer.cluster_size" in keys
    assert "speaker_encoder.speaker_encoder.pool.linear1.weight" in keys
    assert any(k.startswith("postnet.") for k in keys)
    w2v = torch.load(tiny_spark_dir / W2V / "pytorch_model.bin", weights_only=True)
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in w2v
    assert any(k.startswith("project_hid.") for k in w2v)


# --- strict loading ------------------------------------------------------------------------------------------------


def test_loads_and_reports_facts(tiny_bicodec: BiCodec) -> None:
    assert tiny_bicodec.sample_rate == 16000
    assert tiny_bicodec.hop_length == 320
    assert tiny_bicodec.reference_length == 96000
    assert tiny_bicodec.num_global_tokens == 32
    assert tiny_bicodec.global_codebook_size == 4096
    assert tiny_bicodec.semantic_codebook_size == 8192
    assert not tiny_bicodec.model.training
    assert all("weight_g" not in k for k in tiny_bicodec.model.state_dict())  # weight norm folded


def test_missing_key_names_key_and_file(tiny_spark_dir: Path, tmp_path: Path) -> None:
    root = _copy(tiny_spark_dir, tmp_path / "m")
    path = _edit_bicodec(root, lambda t: t.pop("decoder.model.1.block.1.weight_v"))
    with pytest.raises(CheckpointError) as info:
        load_bicodec_model(root / "BiCodec")
    assert "decoder.model.1.block.1.weight_v" in info.value.message
    assert str(path) in info.value.message


def test_missing_unused_key_is_also_an_error(tiny_spark_dir: Path, tmp_path: Path) -> None:
    root = _copy(tiny_spark_dir, tmp_path / "m")
    _edit_bicodec(root, lambda t: t.pop("postnet.linear.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): postnet\.linear\.weight"):
        load_bicodec_model(root / "BiCodec")


def test_wrong_shape_names_both_shapes(tiny_spark_dir: Path, tmp_path: Path) -> None:
    root = _copy(tiny_spark_dir, tmp_path / "m")

    def widen(t: dict[str, torch.Tensor]) -> None:
        t["prenet.linear.bias"] = torch.zeros(25)

    _edit_bicodec(root, widen)
    with pytest.raises(CheckpointError, match=r"prenet\.linear\.bias: file \(25,\) vs expected \(24,\)"):
        load_bicodec_model(root / "BiCodec")


def test_unknown_key_is_rejected(tiny_spark_dir: Path, tmp_path: Path) -> None:
    root = _copy(tiny_spark_dir, tmp_path / "m")

    def add(t: dict[str, torch.Tensor]) -> None:
        t["decoder.model.9.weight"] = torch.zeros(1)

    _edit_bicodec(root, add)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): decoder\.model\.9\.weight"):
        load_bicodec_model(root / "BiCodec")


def test_bicodec_config_tolerates_appended_root_keys_and_checks_constraints(tmp_path: Path) -> None:
    from flashtts_core.engines.spark.config import load_bicodec_config
    from flashtts_core.testing.tiny_spark import ROOT_CONFIG_YAML, TINY_BICODEC_CONFIG_YAML

    path = tmp_path / "config.yaml"
    path.write_text(TINY_BICODEC_CONFIG_YAML + ROOT_CONFIG_YAML)  # some public copies append the root keys
    config = load_bicodec_config(path)
    assert config.decoder.input_channel == 24 and config.mel_params.mel_fmax is None
    assert config.speaker_encoder.fsq_levels == (4, 4, 4, 4, 4, 4)
    path.write_text(TINY_BICODEC_CONFIG_YAML.replace("\n    channels: 32", "\n    channels: 30"))
    with pytest.raises(CheckpointError, match=r"decoder\.channels 30 is not divisible"):
        load_bicodec_config(path)
    path.write_text("mel_params: {}\n")
    with pytest.raises(CheckpointError, match="no 'audio_tokenizer'"):
        load_bicodec_config(path)


def test_missing_files_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.yaml not found"):
        BiCodec.from_pretrained(tmp_path)


# --- tokenize ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("samples", "frames"), [(400, 1), (719, 1), (720, 2), (16000, 49), (16000 * 7 + 33, 349)])
def test_tokenize_shapes_and_ranges(tiny_bicodec: BiCodec, samples: int, frames: int) -> None:
    assert frames == (samples - 400) // 320 + 1
    global_ids, semantic_ids = tiny_bicodec.tokenize(_wave(samples))
    assert global_ids.shape == (32,) and global_ids.dtype == np.int64
    assert semantic_ids.shape == (frames,) and semantic_ids.dtype == np.int64
    assert global_ids.min() >= 0 and global_ids.max() < 4096
    assert semantic_ids.min() >= 0 and semantic_ids.max() < 8192
    assert tiny_bicodec.num_semantic_tokens(samples) == frames


def test_tokenize_does_not_modify_input(tiny_bicodec: BiCodec) -> None:
    wav = _wave(5000)
    before = wav.copy()
    tiny_bicodec.tokenize(wav)
    tiny_bicodec.tokenize([wav, wav[:1000]])
    np.testing.assert_array_equal(wav, before)


def test_tokenize_rejects_bad_input(tiny_bicodec: BiCodec) -> None:
    with pytest.raises(AudioDecodeError, match="too short"):
        tiny_bicodec.tokenize(_wave(399))
    with pytest.raises(AudioDecodeError, match="1-D"):
        tiny_bicodec.tokenize(np.zeros((2, 1000), dtype=np.float32))
    bad = _wave(1000)
    bad[3] = np.nan
    with pytest.raises(AudioDecodeError, match="NaN"):
        tiny_bicodec.tokenize(bad)
    assert tiny_bicodec.tokenize([]) == ([], [])


def test_speaker_clip_rule(tiny_bicodec: BiCodec) -> None:
    long = _wave(96000 + 5000, seed=3)
    assert np.array_equal(tiny_bicodec.tokenize(long)[0], tiny_bicodec.tokenize(long[:96000])[0])
    short = _wave(30000, seed=4)
    tiled = np.tile(short, 4)[:96000]
    assert np.array_equal(tiny_bicodec.tokenize(short)[0], tiny_bicodec.tokenize(tiled)[0])
    # The semantic tokens, in contrast, cover the whole input.
    assert tiny_bicodec.tokenize(long)[1].shape == (tiny_bicodec.num_semantic_tokens(long.shape[0]),)


def test_tokenize_batch_equals_one_by_one(tiny_bicodec: BiCodec) -> None:
    waves = [_wave(16000, 1), _wave(7000, 2), _wave(11111, 3)]
    batch_globals, batch_semantic = tiny_bicodec.tokenize(waves)
    for wav, g, s in zip(waves, batch_globals, batch_semantic, strict=True):
        g1, s1 = tiny_bicodec.tokenize(wav)
        np.testing.assert_array_equal(g, g1)
        np.testing.assert_array_equal(s, s1)


# --- detokenize ------------------------------------------------------------------------------------------------------


def test_detokenize_length_and_range(tiny_bicodec: BiCodec) -> None:
    rng = np.random.default_rng(0)
    global_ids = rng.integers(0, 4096, 32)
    semantic_ids = rng.integers(0, 8192, 13)
    wav = tiny_bicodec.detokenize(global_ids, semantic_ids)
    assert wav.shape == (13 * 320,) and wav.dtype == np.float32
    assert np.isfinite(wav).all() and np.abs(wav).max() <= 1.0
    assert wav.std() > 1e-4  # the tiny model is not silent
    assert tiny_bicodec.detokenize(global_ids, semantic_ids[:0]).shape == (0,)
    np.testing.assert_array_equal(tiny_bicodec.detokenize(global_ids, semantic_ids[None]), wav)


def test_detokenize_batch_equals_one_by_one(tiny_bicodec: BiCodec) -> None:
    rng = np.random.default_rng(1)
    globs = [rng.integers(0, 4096, 32) for _ in range(3)]
    sems = [rng.integers(0, 8192, n) for n in (9, 4, 0)]
    batched = tiny_bicodec.detokenize(globs, sems)
    assert [w.shape[0] for w in batched] == [9 * 320, 4 * 320, 0]
    for g, s, w in zip(globs, sems, batched, strict=True):
        np.testing.assert_allclose(w, tiny_bicodec.detokenize(g, s), atol=1e-5, rtol=0)


def test_detokenize_rejects_bad_ids(tiny_bicodec: BiCodec) -> None:
    g = np.zeros(32, dtype=np.int64)
    s = np.zeros(5, dtype=np.int64)
    with pytest.raises(InvalidRequestError, match=r"\[0, 4096\)"):
        tiny_bicodec.detokenize(g + 4096, s)
    with pytest.raises(InvalidRequestError, match=r"\[0, 8192\)"):
        tiny_bicodec.detokenize(g, s - 1)
    with pytest.raises(InvalidRequestError, match="expected 32 ids"):
        tiny_bicodec.detokenize(g[:31], s)
    with pytest.raises(InvalidRequestError, match="integers"):
        tiny_bicodec.detokenize(g, s.astype(np.float32))
    with pytest.raises(InvalidRequestError, match="either one"):
        tiny_bicodec.detokenize([g], s)


def test_round_trip(tiny_bicodec: BiCodec) -> None:
    wav = _wave(24000, seed=5)
    global_ids, semantic_ids = tiny_bicodec.tokenize(wav)
    out = tiny_bicodec.detokenize(global_ids, semantic_ids)
    assert out.shape == (semantic_ids.shape[0] * 320,)
    assert semantic_ids.shape[0] == (24000 - 400) // 320 + 1


# --- wav2vec2 loader -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w2v(tiny_spark_dir: Path) -> SparkWav2Vec2Features:
    return SparkWav2Vec2Features.from_pretrained(tiny_spark_dir / W2V)


def _features(model: SparkWav2Vec2Features, wav: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model.extract([wav])[0][0]


def test_wav2vec_keeps_sixteen_layers(w2v: SparkWav2Vec2Features) -> None:
    assert len(w2v.model.encoder.layers) == 16
    assert (w2v.min_samples, w2v.hop_length, w2v.hidden_size) == (400, 320, 32)


@pytest.mark.parametrize("fmt", ["safetensors-unprefixed-parametrized", "bin-unprefixed-old-names"])
def test_wav2vec_other_namings_and_formats(
    tiny_spark_dir: Path, tmp_path: Path, w2v: SparkWav2Vec2Features, fmt: str
) -> None:
    folder = _copy(tiny_spark_dir / W2V, tmp_path / W2V)
    original = torch.load(folder / "pytorch_model.bin", weights_only=True)
    (folder / "pytorch_model.bin").unlink()
    converted = {k.removeprefix("wav2vec2."): v for k, v in original.items() if k.startswith("wav2vec2.")}
    if fmt.startswith("safetensors"):
        converted = {
            k.replace("conv.weight_g", "conv.parametrizations.weight.original0").replace(
                "conv.weight_v", "conv.parametrizations.weight.original1"
            ): v
            for k, v in converted.items()
        }
        save_file(converted, str(folder / "model.safetensors"))
    else:
        torch.save(converted, folder / "pytorch_model.bin")
    other = SparkWav2Vec2Features.from_pretrained(folder)
    wav = _wave(8000)
    torch.testing.assert_close(_features(other, wav), _features(w2v, wav), rtol=0, atol=0)


def test_wav2vec_missing_or_unknown_keys(tiny_spark_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_spark_dir / W2V, tmp_path / W2V)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    for dropped in ("wav2vec2.encoder.layers.3.attention.q_proj.weight", "wav2vec2.encoder.layers.16.layer_norm.bias"):
        broken = {k: v for k, v in state.items() if k != dropped}
        torch.save(broken, folder / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match=dropped.removeprefix("wav2vec2.").replace(".", r"\.")):
            SparkWav2Vec2Features.from_pretrained(folder)
    torch.save({**state, "lm_head.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): lm_head\.weight"):
        SparkWav2Vec2Features.from_pretrained(folder)


def test_wav2vec_features_match_transformers(tiny_spark_dir: Path, w2v: SparkWav2Vec2Features) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config.from_json_file(str(tiny_spark_dir / W2V / "config.json"))
    reference = Wav2Vec2Model(config).eval()
    keys = list(reference.state_dict())
    state = load_wav2vec2_state_dict(tiny_spark_dir / W2V / "pytorch_model.bin", keys)
    reference.load_state_dict({k: state[k] for k in keys})
    waves = [_wave(9000, 1), _wave(6000, 2)]
    normalised = [(w - w.mean()) / np.sqrt(w.var() + 1e-7) for w in waves]
    padded = torch.zeros(2, 9000)
    mask = torch.zeros(2, 9000, dtype=torch.long)
    for i, w in enumerate(normalised):
        padded[i, : len(w)] = torch.from_numpy(w)
        mask[i, : len(w)] = 1
    with torch.inference_mode():
        hidden = reference(padded, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = (hidden[11] + hidden[14] + hidden[16]) / 3
        ours, frames = w2v.extract(waves)
    assert frames == [(9000 - 400) // 320 + 1, (6000 - 400) // 320 + 1]
    for i, n in enumerate(frames):
        torch.testing.assert_close(ours[i, :n], expected[i, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours[i, :n], _features(w2v, waves[i]), rtol=1e-4, atol=1e-5)


def test_wav2vec_attention_kernels_agree(tiny_spark_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--wav2vec_attn_implementation reaches the encoder layers; eager and sdpa give the same features (padded batch
    included), and flash_attention_2 without the flash-attn package falls back to sdpa with a warning."""
    import importlib.util

    import torch

    rng = np.random.default_rng(3)
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8000, 12000)]
    features = {}
    for kernel in ("eager", "sdpa"):
        extractor = SparkWav2Vec2Features.from_pretrained(tiny_spark_dir / W2V, attn_implementation=kernel)
        assert extractor.model.config._attn_implementation == kernel
        with torch.inference_mode():
            features[kernel], frames = extractor.extract(wavs)
    for row, count in enumerate(frames):
        torch.testing.assert_close(features["sdpa"][row, :count], features["eager"][row, :count], atol=1e-4, rtol=1e-4)
    if importlib.util.find_spec("flash_attn") is None:
        with caplog.at_level("WARNING"):
            extractor = SparkWav2Vec2Features.from_pretrained(
                tiny_spark_dir / W2V, attn_implementation="flash_attention_2"
            )
        assert extractor.model.config._attn_implementation == "sdpa"
        assert "using sdpa" in caplog.text
