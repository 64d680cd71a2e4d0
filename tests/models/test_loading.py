"""Strict checkpoint loading: every tensor consumed, every parameter filled, errors name keys, shapes and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashtts_core.errors import CheckpointError
from flashtts_core.models.loading import (
    check_state_dict,
    load_state_dict_strict,
    read_safetensors,
    read_safetensors_shapes,
    read_torch_checkpoint,
)

torch = pytest.importorskip("torch")
nn = torch.nn


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_check_state_dict_partitions_keys() -> None:
    report = check_state_dict(
        {"a": (2, 3), "b": (3,)},
        {"a": [2, 3], "b": [3], "head.x": [1], "old": [5]},
        source="f.safetensors",
        unused={"old": (5,)},
        allowed_extra_prefixes=("head.",),
    )
    assert report.loaded == ("a", "b")
    assert report.unused == ("old",)
    assert report.extra == ("head.x",)
    assert report.source == "f.safetensors"


def test_missing_key_is_named_with_the_file() -> None:
    with pytest.raises(CheckpointError) as info:
        check_state_dict({"a": (1,), "b.weight": (2,)}, {"a": (1,)}, source="/x/model.safetensors")
    assert "b.weight" in info.value.message
    assert "missing" in info.value.message
    assert "/x/model.safetensors" in info.value.message


def test_wrong_shape_names_both_shapes() -> None:
    with pytest.raises(CheckpointError) as info:
        check_state_dict({"w": (4, 3)}, {"w": (3, 4)}, source="m.bin")
    assert "w: file (3, 4) vs expected (4, 3)" in info.value.message


def test_unexpected_key_is_an_error_unless_allowed() -> None:
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): stray"):
        check_state_dict({"a": (1,)}, {"a": (1,), "stray": (1,)}, source="m")
    check_state_dict({"a": (1,)}, {"a": (1,), "stray": (1,)}, source="m", allowed_extra_prefixes=("str",))


def test_unused_keys_must_be_present_with_their_shape() -> None:
    with pytest.raises(CheckpointError, match=r"missing.*old"):
        check_state_dict({"a": (1,)}, {"a": (1,)}, source="m", unused={"old": (2,)})
    with pytest.raises(CheckpointError, match=r"old: file \(3,\) vs expected \(2,\)"):
        check_state_dict({"a": (1,)}, {"a": (1,), "old": (3,)}, source="m", unused={"old": (2,)})


def test_long_listings_are_truncated() -> None:
    expected = {f"k{i:02d}": (1,) for i in range(30)}
    with pytest.raises(CheckpointError, match=r"missing keys \(30\): .*and 18 more"):
        check_state_dict(expected, {}, source="m")


def test_load_fills_module_and_reports() -> None:
    src = _net()
    dst = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    report = load_state_dict_strict(dst, _state(src), source="m")
    assert set(report.loaded) == set(src.state_dict())
    assert torch.equal(dst[0].weight, src[0].weight)


def test_failed_load_leaves_module_untouched() -> None:
    src = _net()
    dst = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = _state(dst)
    state = _state(src)
    del state["1.running_var"]
    with pytest.raises(CheckpointError, match=r"1\.running_var"):
        load_state_dict_strict(dst, state, source="m")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_integer_versus_float_is_a_mismatch() -> None:
    state = _state(_net())
    state["1.num_batches_tracked"] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match=r"num_batches_tracked: file torch\.float32 vs expected torch\.int64"):
        load_state_dict_strict(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), state, source="m")


def test_assign_fills_a_meta_module() -> None:
    src = _net()
    with torch.device("meta"):
        dst = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    load_state_dict_strict(dst, _state(src), source="m", assign=True)
    assert not any(t.is_meta for t in dst.state_dict().values())
    x = torch.randn(2, 3)
    assert torch.allclose(dst.eval()(x), src.eval()(x))


def test_assign_rejects_meta_leftovers() -> None:
    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("table", torch.zeros(3), persistent=False)

    with torch.device("meta"):
        dst = WithBuffer()
    state = {f"lin.{k}": v for k, v in _state(nn.Linear(2, 2)).items()}
    with pytest.raises(CheckpointError, match=r"unfilled.*table"):
        load_state_dict_strict(dst, state, source="m", assign=True)


def test_safetensors_readers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.int64)}, str(path), metadata={"format": "pt"})
    assert read_safetensors_shapes(path) == {"a": (2, 3), "b": (4,)}
    loaded = read_safetensors(path)
    assert loaded["b"].dtype == torch.int64
    with pytest.raises(CheckpointError, match="not found"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_safetensors_shapes(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_safetensors_shapes(bad)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_safetensors(bad)


def test_torch_checkpoint_reader(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    torch.save({"w": torch.zeros(2)}, good)
    assert set(read_torch_checkpoint(good)) == {"w"}
    nested = tmp_path / "nested.bin"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, nested)
    with pytest.raises(CheckpointError, match="flat state dict"):
        read_torch_checkpoint(nested)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a loadable torch state dict"):
        read_torch_checkpoint(garbage)
