"""SNAC loading (strict, local only) and windowed decoding (every frame, seams equal to a one-shot decode)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flashtts_core.engines.orpheus.streaming import (
    NON_STREAMING_SCHEDULE,
    STREAMING_SCHEDULE,
    DecodeSchedule,
    WindowPlanner,
)
from flashtts_core.errors import CheckpointError

torch = pytest.importorskip("torch")
pytest.importorskip("snac")

from flashtts_core.engines.orpheus.snac import SnacDecoder, load_snac, resolve_snac_dir  # noqa: E402
from flashtts_core.testing.tiny_orpheus import TINY_SNAC_CONFIG, orpheus_script_frames  # noqa: E402


@pytest.fixture
def snac_copy(orpheus_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "snac"
    shutil.copytree(orpheus_dir / "snac", out)
    return out


def _edit_weights(snac_dir: Path, edit: object) -> None:
    path = snac_dir / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    edit(state)  # type: ignore[operator]
    torch.save(state, path)


def test_published_layout_and_frame_geometry(orpheus_dir: Path, tiny_snac: SnacDecoder) -> None:
    state = torch.load(orpheus_dir / "snac" / "pytorch_model.bin", weights_only=True)
    assert len(state) == 269  # the same tensor names as snac_24khz, encoder included
    assert "decoder.model.0.parametrizations.weight.original1" in state
    assert any(k.startswith("encoder.") for k in state)
    assert tiny_snac.sample_rate == 24000 and tiny_snac.samples_per_frame == 2048
    frames = orpheus_script_frames()[:4]
    (audio,) = tiny_snac.decode([frames])
    assert audio.shape == (8192,) and audio.dtype == np.float32 and np.all(np.abs(audio) <= 1.0)


def test_batched_windows_equal_single_decodes(tiny_snac: SnacDecoder) -> None:
    frames = orpheus_script_frames()
    windows = [frames[:5], frames[3:13], frames[10:15], frames[:1]]
    batched = tiny_snac.decode(windows)
    assert [a.size for a in batched] == [5 * 2048, 10 * 2048, 5 * 2048, 2048]
    for window, audio in zip(windows, batched, strict=True):
        np.testing.assert_allclose(audio, tiny_snac.decode([window])[0], atol=1e-5)


def test_missing_key_is_named(snac_copy: Path) -> None:
    key = "encoder.block.0.parametrizations.weight.original1"  # an encoder key: the whole model loads strictly
    _edit_weights(snac_copy, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {key}"):
        load_snac(snac_copy)


def test_unexpected_and_wrong_shape_keys_are_named(snac_copy: Path) -> None:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state["decoder.extra.weight"] = torch.zeros(3)
        state["quantizer.quantizers.0.codebook.weight"] = torch.zeros(4096, 3)

    _edit_weights(snac_copy, edit)
    with pytest.raises(CheckpointError) as info:
        load_snac(snac_copy)
    message = str(info.value)
    assert "unexpected keys (1): decoder.extra.weight" in message
    assert "quantizer.quantizers.0.codebook.weight: file (4096, 3) vs expected (4096, 2)" in message
    assert str(snac_copy / "pytorch_model.bin") in message


def test_config_problems(snac_copy: Path) -> None:
    config = dict(TINY_SNAC_CONFIG)
    (snac_copy / "config.json").write_text(json.dumps({**config, "codebook_size": 1024, "vq_strides": [8, 4, 2, 1]}))
    with pytest.raises(CheckpointError, match=r"codebook_size 1024.*vq_strides \[8, 4, 2, 1\]"):
        load_snac(snac_copy)
    (snac_copy / "config.json").write_text(json.dumps({**config, "bogus": 1}))
    with pytest.raises(CheckpointError, match="bogus"):
        load_snac(snac_copy)
    (snac_copy / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        load_snac(snac_copy)


def test_unreadable_weights(snac_copy: Path) -> None:
    (snac_copy / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a loadable torch state dict"):
        load_snac(snac_copy)


def test_resolve_snac_dir(orpheus_dir: Path, tmp_path: Path) -> None:
    assert resolve_snac_dir(orpheus_dir, None) == orpheus_dir / "snac"
    assert resolve_snac_dir(tmp_path, str(orpheus_dir / "snac")) == orpheus_dir / "snac"
    with pytest.raises(CheckpointError, match="--snac_path"):
        resolve_snac_dir(tmp_path, str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"snac_24khz.*<model_path>/snac"):
        resolve_snac_dir(tmp_path, None)
    (tmp_path / "snac").mkdir()
    (tmp_path / "snac" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"lacks pytorch_model\.bin"):
        resolve_snac_dir(tmp_path, None)


@pytest.mark.parametrize("available", [1, 2, 6, 7, 8, 24, 61, 200])
@pytest.mark.parametrize("schedule", [STREAMING_SCHEDULE, NON_STREAMING_SCHEDULE, DecodeSchedule(first_chunk_frames=1)])
def test_planner_covers_every_frame_once(available: int, schedule: DecodeSchedule) -> None:
    planner = WindowPlanner(schedule)
    covered: list[int] = []
    for count in range(1, available + 1):  # frames arrive one by one
        while (w := planner.next_window(count, final=False)) is not None:
            assert w.context_end - w.end == schedule.context_frames  # mid-stream windows always have right context
            assert w.start - w.context_start == min(w.start, schedule.context_frames)
            covered.extend(range(w.start, w.end))
    while (w := planner.next_window(available, final=True)) is not None:
        covered.extend(range(w.start, w.end))
    assert covered == list(range(available))


def test_first_streamed_window_needs_seven_frames() -> None:
    planner = WindowPlanner(STREAMING_SCHEDULE)
    assert planner.next_window(6, final=False) is None
    window = planner.next_window(7, final=False)
    assert window is not None and (window.start, window.end, window.context_end) == (0, 4, 7)
    assert window.keep(2048) == (0, 4 * 2048)


@pytest.mark.parametrize(
    ("schedule", "count"), [(STREAMING_SCHEDULE, 30), (DecodeSchedule(first_chunk_frames=1, max_chunk_frames=2), 12)]
)
def test_windowed_decode_equals_one_shot_decode(tiny_snac: SnacDecoder, schedule: DecodeSchedule, count: int) -> None:
    """Three frames of context on each side cover SNAC's receptive field: seams are the one-shot samples."""
    frames = orpheus_script_frames(frames=count)
    (full,) = tiny_snac.decode([frames])
    planner = WindowPlanner(schedule)
    pieces = []
    for count in range(1, len(frames) + 1):
        while (w := planner.next_window(count, final=False)) is not None:
            start, end = w.keep(2048)
            pieces.append(tiny_snac.decode([frames[w.context_start : w.context_end]])[0][start:end])
    while (w := planner.next_window(len(frames), final=True)) is not None:
        start, end = w.keep(2048)
        pieces.append(tiny_snac.decode([frames[w.context_start : w.context_end]])[0][start:end])
    out = np.concatenate(pieces)
    assert out.size == len(frames) * 2048
    np.testing.assert_allclose(out, full, atol=1e-5)
