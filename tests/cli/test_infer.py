"""``flashtts infer`` end to end (in-process) on the tiny Spark checkpoint with the torch backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flashtts_core.cli import main

pytest.importorskip("torch")
pytest.importorskip("flashtts_torch")

SCRIPTED_SECONDS = 150 * 320 / 16000  # one segment of the scripted tiny model: 150 semantic tokens


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

    return tiny_checkpoint_dir("spark")


def _infer(*args: str) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["infer", "--backend", "torch", "--llm_device", "cpu", "--tokenizer_device", "cpu", *args])
    assert excinfo.value.code == 0


def _decode(path: Path) -> np.ndarray:
    from flashtts_core.audio.decode import decode_audio

    return decode_audio(path.read_bytes(), target_rate=16000)


def test_infer_builtin_voice_to_wav(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "speech.wav"
    _infer("--model_path", str(model_dir), "-i", "Hello world.", "-o", str(out), "--name", "male", "--pitch", "high")
    assert out.read_bytes()[:4] == b"RIFF"
    audio = _decode(out)
    assert audio.size == int(SCRIPTED_SECONDS * 16000)
    assert np.abs(audio).max() > 0


def test_infer_clone_to_mp3_with_demo(tmp_path: Path) -> None:
    from flashtts_core.audio.encode import encode_all

    t = np.arange(24000) / 16000
    reference = tmp_path / "ref.wav"
    reference.write_bytes(encode_all((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), "wav", input_rate=16000))
    text_file = tmp_path / "input.txt"
    text_file.write_text("Cloned speech from a file.", encoding="utf-8")
    out = tmp_path / "speech.mp3"
    _infer("--demo", "spark", "-i", str(text_file), "-o", str(out), "--reference_audio", str(reference))
    audio = _decode(out)
    assert abs(audio.size / 16000 - SCRIPTED_SECONDS) < 0.1  # mp3 may add encoder padding
