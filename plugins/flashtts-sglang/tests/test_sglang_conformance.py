"""The conformance kit on the sglang backend: CUDA only (``pytest --run-gpu`` on a GPU machine with sglang).

Never run in this repository's CI, whose machines have no GPU and cannot install sglang (it pins a CUDA torch build
and has no CPU kernel wheels); the parameter translation is covered without sglang by test_sglang_params.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sglang", reason="sglang needs a CUDA GPU (cannot be installed on this CPU machine)")

from flashtts_sglang import SglangBackend

from flashtts_core.plugins import BackendBase, BackendConfig
from flashtts_core.testing.conformance import BackendConformance

pytestmark = pytest.mark.gpu


def _config(model_dir: Path, **overrides: object) -> BackendConfig:
    values: dict[str, object] = {
        "model_dir": str(model_dir),
        "max_model_len": 256,
        "device": "cuda",
        "dtype": "float32",
        "max_batch_size": 8,
        "gpu_memory_utilization": 0.2,
        # Tiny models: skip CUDA graph capture (seconds per batch size) and use the portable attention kernels.
        "options": {"disable_cuda_graph": True, "attention_backend": "triton"},
    }
    values.update(overrides)
    return BackendConfig(**values)  # type: ignore[arg-type]


class TestSglangQwen2Cuda(BackendConformance):
    pytestmark = pytest.mark.gpu  # added to the inherited asyncio(loop_scope="class") mark (pytest reads the MRO)

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return SglangBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _config(tiny_qwen2_dir)


class TestSglangLlamaCuda(BackendConformance):
    pytestmark = pytest.mark.gpu

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return SglangBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_llama_dir: Path) -> BackendConfig:
        return _config(tiny_llama_dir, dtype="bfloat16")
