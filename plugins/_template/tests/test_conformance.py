"""Run the FlashTTS backend conformance suite against this backend on a tiny random-weight model."""

from __future__ import annotations

from pathlib import Path

import pytest
from flashtts_example import ExampleBackend

from flashtts_core.plugins import BackendBase, BackendConfig
from flashtts_core.testing.conformance import BackendConformance


class TestExampleBackend(BackendConformance):
    # GPU-only runtimes add: pytestmark = pytest.mark.gpu  (kept together with the inherited asyncio mark)

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return ExampleBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        # tiny_qwen2_dir comes from the kit's pytest plugin (loaded by ../conftest.py): a Qwen2-layout checkpoint
        # built locally in about a second and cached between runs.
        return BackendConfig(model_dir=str(tiny_qwen2_dir), max_model_len=256)
