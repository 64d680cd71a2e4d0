"""Session fixtures for the Spark BiCodec tests: one tiny checkpoint, built and loaded once per run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flashtts_core.engines.spark.bicodec import BiCodec
    from flashtts_core.engines.spark.tokenization import SparkTokenizer


@pytest.fixture(scope="session")
def tiny_spark_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Spark-TTS root (config.yaml, BiCodec/, wav2vec2-large-xlsr-53/); treat as read-only."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from flashtts_core.testing.tiny_spark import build_tiny_spark_codec

    return build_tiny_spark_codec(tmp_path_factory.mktemp("tiny_spark"), seed=0)


@pytest.fixture(scope="session")
def tiny_bicodec(tiny_spark_dir: Path) -> BiCodec:
    """The tiny checkpoint loaded on the CPU in fp32."""
    from flashtts_core.engines.spark.bicodec import BiCodec

    return BiCodec.from_pretrained(tiny_spark_dir)


# --- engine fixtures (tests/engines/spark/test_engine.py, test_tokenization.py, test_streaming.py) ----------------


@pytest.fixture(scope="session")
def spark_checkpoint() -> Path:
    """The cached full tiny Spark checkpoint (codec + scripted LLM, 150 semantic tokens per completion)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

    return tiny_checkpoint_dir("spark")


@pytest.fixture(scope="session")
def spark_tokenizer(spark_checkpoint: Path) -> SparkTokenizer:
    from flashtts_core.engines.spark.tokenization import SparkTokenizer

    return SparkTokenizer.from_file(spark_checkpoint / "LLM" / "tokenizer.json")


@pytest.fixture(scope="session")
def spark_codec(spark_checkpoint: Path) -> BiCodec:
    """BiCodec of the full tiny checkpoint (CPU, fp32)."""
    from flashtts_core.engines.spark.bicodec import BiCodec

    return BiCodec.from_pretrained(spark_checkpoint)
