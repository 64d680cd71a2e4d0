"""Reading and strictly loading the MegaTTS3 checkpoint layout (tiny files with the published names)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from flashtts_core.engines.mega.config import load_global_config, read_yaml_config  # noqa: E402
from flashtts_core.engines.mega.loading import (  # noqa: E402
    load_dit,
    load_duration_lm,
    load_mega_models,
    load_wavvae_decoder,
    read_mega_checkpoint,
)
from flashtts_core.errors import CheckpointError  # noqa: E402


@pytest.fixture
def copy_dir(mega_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny checkpoint (without the G2P LLM, which these tests do not need)."""
    out = tmp_path / "mega"
    shutil.copytree(mega_dir, out, ignore=shutil.ignore_patterns("g2p"))
    return out


def _rewrite(path: Path, sub: str, edit: object) -> None:
    obj = torch.load(path, weights_only=True)
    edit(obj["state_dict"][sub])  # type: ignore[operator]
    torch.save(obj, path)


def test_tiny_checkpoint_loads_with_inferred_sizes(mega_dir: Path) -> None:
    models = load_mega_models(mega_dir)
    assert (models.dit.dims.dim, models.dit.dims.heads, models.dit.dims.layers) == (32, 2, 2)
    assert (models.dit.dims.text_heads, models.dit.dims.text_window, models.dit.dims.phone_vocab) == (2, 4, 302)
    assert (models.aligner.dims.width, models.aligner.dims.heads, models.aligner.dims.vocab_size) == (32, 2, 6800)
    assert models.wavvae.dims.ngf == 4 and not models.wavvae.dims.use_tanh
    assert models.wavvae.samples_per_frame == 960
    assert models.duration.dims.code_size == 128 and models.duration.dims.layers == 1
    assert models.config.win_size == 960 and models.config.frames_multiple == 8
    assert all(not p.requires_grad for p in models.dit.parameters())


def test_checkpoint_container_and_prefixes(copy_dir: Path) -> None:
    path = copy_dir / "diffusion_transformer" / "model_only_last.ckpt"
    state = read_mega_checkpoint(path, "dit")
    assert "x_prenet.weight" in state
    # DataParallel / torch.compile prefixes are stripped.
    _rewrite(path, "dit", lambda sd: sd.update({f"module._orig_mod.{k}": sd.pop(k) for k in list(sd)}))
    assert set(read_mega_checkpoint(path, "dit")) == set(state)
    with pytest.raises(CheckpointError, match=r"no 'model_gen' entry .*found: dit"):
        read_mega_checkpoint(path, "model_gen")
    torch.save({"weights": {}}, path)
    with pytest.raises(CheckpointError, match="no 'state_dict' mapping"):
        read_mega_checkpoint(path, "dit")
    path.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a loadable MegaTTS3 checkpoint"):
        read_mega_checkpoint(path, "dit")


def test_pickled_code_is_refused(copy_dir: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("owned",))

    path = copy_dir / "duration_lm" / "model_only_last.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"dur_model": Evil()}}, protocol=2))
    with pytest.raises(CheckpointError, match="only tensor pickles"):
        read_mega_checkpoint(path, "dur_model")


def test_strict_errors_name_the_keys(copy_dir: Path) -> None:
    config, dur_yaml = load_global_config(copy_dir)
    dit = copy_dir / "diffusion_transformer"
    _rewrite(dit / "model_only_last.ckpt", "dit", lambda sd: sd.pop("encoder.layers.1.attention.wq.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): encoder\.layers\.1\.attention\.wq\.bias"):
        load_dit(dit, config)
    dur = copy_dir / "duration_lm"
    _rewrite(dur / "model_only_last.ckpt", "dur_model", lambda sd: sd.update(extra_head=torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra_head"):
        load_duration_lm(dur, config, dur_yaml)
    vae = copy_dir / "wavvae"
    _rewrite(
        vae / "decoder.ckpt",
        "model_gen",
        lambda sd: sd.update({"decoder.model_up.3.block1.convs1.0.bias": torch.zeros(5)}),
    )
    with pytest.raises(
        CheckpointError, match=r"decoder\.model_up\.3\.block1\.convs1\.0\.bias: file \(5,\) vs expected"
    ):
        load_wavvae_decoder(vae, config)


def test_duration_yaml_must_agree_with_the_checkpoint(copy_dir: Path) -> None:
    path = copy_dir / "duration_lm" / "config.yaml"
    path.write_text(path.read_text().replace("dur_code_size: 128", "dur_code_size: 64"))
    config, dur_yaml = load_global_config(copy_dir)
    with pytest.raises(CheckpointError, match="dur_code_size is 64 in the YAML but 128 in the checkpoint"):
        load_duration_lm(copy_dir / "duration_lm", config, dur_yaml)


def test_wavvae_encoder_tensors_are_skipped_with_one_log_line(copy_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    vae = copy_dir / "wavvae"
    state = torch.load(vae / "decoder.ckpt", weights_only=True)
    state["state_dict"]["model_gen"].update(
        {"encoder.model.0.weight": torch.zeros(2), "proj_to_z.weight": torch.zeros(2)}
    )
    (vae / "decoder.ckpt").unlink()
    torch.save(state, vae / "model_only_last.ckpt")  # the training checkpoint name, encoder included
    config, _ = load_global_config(copy_dir)
    with caplog.at_level(logging.INFO, logger="flashtts_core.engines.mega.loading"):
        model = load_wavvae_decoder(vae, config)
    assert model.samples_per_frame == 960
    assert [r.message for r in caplog.records if "encoder" in r.message] == [
        f"{vae / 'model_only_last.ckpt'}: skipping 2 WaveVAE encoder tensors (voices bring their latents as .npy files)"
    ]


def test_missing_files_and_yaml(copy_dir: Path) -> None:
    (copy_dir / "aligner_lm" / "model_only_last.ckpt").unlink()
    with pytest.raises(CheckpointError, match=r"aligner_lm has no model_only_last\.ckpt"):
        load_mega_models(copy_dir)
    (copy_dir / "wavvae" / "config.yaml").write_text("hop_size: 200\n")
    with pytest.raises(CheckpointError, match="hop_size 200"):
        load_global_config(copy_dir)


def test_yaml_base_config_and_expressions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "base.yaml").write_text("win_size: 480\nframes_multiple: 8\nnested: {a: 1, b: 2}\n")
    (tmp_path / "config.yaml").write_text("base_config: ./base.yaml\nnested: {b: 3}\nframes_multiple: ${x}\n")
    data = read_yaml_config(tmp_path / "config.yaml")
    assert data["win_size"] == 480 and data["nested"] == {"a": 1, "b": 3}
    for sub in ("aligner_lm", "wavvae", "duration_lm"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.yaml").write_text("{}\n")
    (tmp_path / "diffusion_transformer").mkdir()
    shutil.copy(tmp_path / "config.yaml", tmp_path / "diffusion_transformer" / "config.yaml")
    shutil.copy(tmp_path / "base.yaml", tmp_path / "diffusion_transformer" / "base.yaml")
    with caplog.at_level(logging.WARNING):
        config, _ = load_global_config(tmp_path)
    assert config.win_size == 480 and config.frames_multiple == 8  # the expression falls back to the default
    assert any("expression" in r.message for r in caplog.records)


def test_duration_lm_keys_follow_the_original_module_tree(copy_dir: Path) -> None:
    """Upstream always saves ``char_empty_embed``, builds the decoder attention without biases, saves the position
    module's ``_float_tensor`` buffer with ``use_pos_embed``, the char encoder with ``mega_use_char`` and names the
    ``ar_mse`` head ``project_out_dim.0``."""
    dur = copy_dir / "duration_lm"
    path, yaml_path = dur / "model_only_last.ckpt", dur / "config.yaml"
    state = read_mega_checkpoint(path, "dur_model")
    assert state["char_empty_embed.weight"].shape == (1, 16)
    assert "layers.0.op.ffn.ffn_1.1.weight" in state
    assert not any(k.startswith("layers.0.op.self_attn.") and "bias" in k for k in state)

    yaml_path.write_text(yaml_path.read_text().replace("use_pos_embed: false", "use_pos_embed: true"))
    _rewrite(path, "dur_model", lambda sd: sd.update({"embed_positions._float_tensor": torch.zeros(1)}))
    _rewrite(path, "dur_model", lambda sd: sd.update({"char_encoder.weight": torch.zeros(4000, 16)}))
    config, dur_yaml = load_global_config(copy_dir)
    lm = load_duration_lm(dur, config, dur_yaml)
    assert lm.dims.use_pos_embed and lm.dims.mega_use_char and lm.dims.char_vocab == 4000

    def regression_head(sd: dict[str, torch.Tensor]) -> None:
        sd.pop("project_out_dim.weight"), sd.pop("project_out_dim.bias")
        sd.update({"project_out_dim.0.weight": torch.zeros(1, 16), "project_out_dim.0.bias": torch.full((1,), 3.0)})

    yaml_path.write_text(yaml_path.read_text().replace("dur_model_type: ar_dur", "dur_model_type: ar_mse"))
    _rewrite(path, "dur_model", regression_head)
    config, dur_yaml = load_global_config(copy_dir)
    lm = load_duration_lm(dur, config, dur_yaml)
    phones, tones = torch.tensor([[145, 120, 148]]), torch.tensor([[3, 3, 3]])
    codes = lm.decode(phones, tones, lm.prefill(phones, tones, torch.tensor([[4, 4, 4]])), last_code=4)
    assert codes == [3, 3, 3]  # round(softplus(3.0)) = 3

    _rewrite(path, "dur_model", lambda sd: sd.pop("char_empty_embed.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): char_empty_embed\.weight"):
        load_duration_lm(dur, config, dur_yaml)
