"""The conformance kit run against the pure-Python ScriptedBackend: proves the kit's checks and skips work
without any runtime (a failure here is a kit bug, not a backend bug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashtts_core.plugins import BackendBase, BackendCapabilities, BackendConfig
from flashtts_core.plugins.types import OPTIONAL_SAMPLING_FIELDS
from flashtts_core.testing.conformance import BackendConformance
from flashtts_core.testing.fakes import ScriptedBackend


@pytest.fixture(scope="module")
def fake_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scripted-model")


class TestScriptedFull(BackendConformance):
    """Declares everything: every check runs, none is skipped except the entry-point one."""

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return ScriptedBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, fake_model_dir: Path) -> BackendConfig:
        return BackendConfig(model_dir=str(fake_model_dir), max_model_len=512, options={"delay_s": 0.0005})

    @pytest.fixture(scope="class")
    @classmethod
    def expected_capabilities(cls) -> BackendCapabilities:
        return BackendCapabilities(
            sampling=frozenset(OPTIONAL_SAMPLING_FIELDS), max_model_len=512, deterministic_seed=True
        )


class TestScriptedRestricted(BackendConformance):
    """Declares only temperature, no seed determinism, a concurrency cap of 2 and 3-id deltas: exercises the
    rejection path, the skips and queued (waiting) requests."""

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return ScriptedBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, fake_model_dir: Path) -> BackendConfig:
        options = {
            "sampling": ["temperature"],
            "deterministic_seed": False,
            "max_concurrency": 2,
            "chunk_tokens": 3,
            "delay_s": 0.0005,
            "vocab_size": 64,
        }
        return BackendConfig(model_dir=str(fake_model_dir), max_model_len=64, options=options)
