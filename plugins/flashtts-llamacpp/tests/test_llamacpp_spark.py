"""End to end: the Spark demo checkpoint (scripted tiny LLM + tiny BiCodec) served with the llama-cpp backend produces
the audio the script implies, through ``flashtts infer --llm_gguf`` and through the runtime with the default GGUF
lookup (``<model>/LLM/model.gguf``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (source build: see the plugin's README.md)")
pytest.importorskip("gguf", reason="the tests convert the demo LLM with the gguf package")
pytest.importorskip("torch", reason="the Spark codec (BiCodec) runs on torch")

from flashtts_core.cli import main
from flashtts_core.testing.tiny_gguf import build_tiny_gguf

SCRIPTED_SAMPLES = 150 * 320  # one segment of the scripted demo LLM: 150 semantic tokens of 320 samples at 16 kHz


@pytest.fixture(scope="module")
def spark_dir() -> Path:
    from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

    return tiny_checkpoint_dir("spark")


@pytest.fixture(scope="module")
def spark_gguf(spark_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(spark_dir, tmp_path_factory.mktemp("spark-gguf") / "spark-llm.gguf")


def test_infer_demo_with_llm_gguf(spark_gguf: Path, tmp_path: Path) -> None:
    from flashtts_core.audio.decode import decode_audio

    out = tmp_path / "speech.wav"
    argv = ["infer", "--demo", "spark", "--backend", "llama-cpp", "--llm_gguf", str(spark_gguf)]
    argv += ["--backend_option", "n_threads=1", "--llm_device", "cpu", "--tokenizer_device", "cpu"]
    argv += ["-i", "Hello world.", "-o", str(out), "--name", "female"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    audio = decode_audio(out.read_bytes(), target_rate=16000)
    assert audio.size == SCRIPTED_SAMPLES
    assert np.abs(audio).max() > 0


@pytest.fixture
def spark_root_with_gguf(spark_dir: Path, spark_gguf: Path, tmp_path: Path) -> Path:
    """A copy (symlinks) of the demo checkpoint whose ``LLM/`` also holds ``model.gguf``."""
    root = tmp_path / "Spark-TTS-tiny"
    root.mkdir()
    for item in spark_dir.iterdir():
        if item.name != "LLM":
            (root / item.name).symlink_to(item)
    (root / "LLM").mkdir()
    for item in (spark_dir / "LLM").iterdir():
        (root / "LLM" / item.name).symlink_to(item)
    (root / "LLM" / "model.gguf").symlink_to(spark_gguf)
    return root


async def test_streaming_synthesis_finds_llm_model_gguf(spark_root_with_gguf: Path) -> None:
    """A model root whose ``LLM/`` holds ``model.gguf`` (what ``flashtts convert-gguf ROOT`` writes) needs no flag."""
    import msgspec

    from flashtts_core.config import ServerSettings
    from flashtts_core.plugins import SynthesisRequest
    from flashtts_core.runtime import open_runtime, resolve

    root = spark_root_with_gguf

    settings = msgspec.convert(
        {
            "model_path": str(root),
            "backend": "llama-cpp",
            "backend_options": {"n_threads": "1"},
            "llm_device": "cpu",
            "tokenizer_device": "cpu",
            "detokenizer_device": "cpu",
            "warmup": False,
        },
        ServerSettings,
    )
    plan = resolve(settings)
    assert plan.backend_cls.name == "llama-cpp"
    async with open_runtime(plan, warmup=False) as runtime:
        assert runtime.backend.config.model_dir == str(root / "LLM")
        request = SynthesisRequest(request_id="e2e", text="Hello world.", voice="male", stream=True)
        chunks = [chunk.samples async for chunk in runtime.engine.synthesize(request)]
        assert (await runtime.backend.health()).running == 0
    assert len(chunks) > 1  # streamed in pieces, not as one block at the end
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32 and audio.size == SCRIPTED_SAMPLES
    assert np.abs(audio).max() > 0
