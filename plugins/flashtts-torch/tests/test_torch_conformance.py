"""The conformance kit on the torch backend, for both tiny architectures the engines use (Qwen2: Spark-TTS;
Llama with Llama 3 rope scaling: Orpheus), plus checks specific to this backend's scheduler."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from flashtts_torch import TorchBackend

from flashtts_core.plugins import BackendBase, BackendConfig
from flashtts_core.testing.conformance import BackendConformance, generate, make_request

# One intra-op thread: the tiny models are overhead-bound, and the CI box has two cores shared with other jobs.
# The CPU classes pin the dynamic path (auto would pick the static one here) and the in-process scheduler (auto would
# pick the worker process, whose counters these tests read through the process boundary otherwise); the static
# path's conformance classes are in test_torch_static.py, the worker process's in test_torch_process.py.
_OPTIONS = {"num_threads": 1, "cache_implementation": "dynamic", "worker": "thread"}


def _config(model_dir: Path, **overrides: object) -> BackendConfig:
    values: dict[str, object] = {
        "model_dir": str(model_dir),
        "max_model_len": 256,
        "device": "cpu",
        "dtype": "float32",
        "max_batch_size": 8,
        "options": _OPTIONS,
    }
    values.update(overrides)
    return BackendConfig(**values)  # type: ignore[arg-type]


class TestTorchQwen2(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return TorchBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _config(tiny_qwen2_dir)

    @pytest.fixture(scope="class")
    @classmethod
    def admits_by_priority(cls) -> bool:
        return True

    async def test_requests_share_decoding_steps(
        self, backend: BackendBase, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """Concurrent requests are decoded together (continuous batching), not one after another."""
        assert isinstance(backend, TorchBackend)
        runtime = backend._runtime
        assert runtime is not None
        runtime.peak_batch = 0
        requests = [make_request(prompt_token_ids[: 4 + i], request_id=f"b{i}", max_tokens=24) for i in range(4)]
        await asyncio.gather(*(generate(backend, request, timeout_s) for request in requests))
        assert runtime.peak_batch >= 2

    async def test_batch_size_cap_queues(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """With max_batch_size=2, six requests still all complete (the rest wait) with their solo outputs."""
        small = TorchBackend(_config(Path(backend_config.model_dir), max_batch_size=2))
        await small.startup()
        try:
            assert small._runtime is not None
            requests = [
                make_request(prompt_token_ids[i:], request_id=f"q{i}", max_tokens=10, temperature=0.0) for i in range(6)
            ]
            solo = [await generate(small, request, timeout_s) for request in requests]
            together = await asyncio.gather(*(generate(small, request, timeout_s) for request in requests))
            assert [r.token_ids for r in together] == [r.token_ids for r in solo]
            assert small._runtime.peak_batch <= 2
        finally:
            await small.shutdown()

    async def test_shutdown_ends_open_streams_with_abort(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """A stream open while the backend shuts down ends with exactly one final ``abort`` chunk."""
        other = TorchBackend(backend_config)
        await other.startup()
        request = make_request(prompt_token_ids, max_tokens=200, temperature=0.0)
        stream = other.generate(request)
        try:
            first = await asyncio.wait_for(stream.__anext__(), timeout_s)
            assert first.finish_reason is None
            await other.shutdown()
            rest = [chunk async for chunk in stream]
        finally:
            await stream.aclose()
            await other.shutdown()
        assert rest and rest[-1].finish_reason == "abort"
        assert all(chunk.finish_reason is None for chunk in rest[:-1])

    async def test_max_model_len_capped_by_model(self, backend_config: BackendConfig) -> None:
        """A max_model_len above the model's max_position_embeddings (4096 here) is capped to it."""
        large = TorchBackend(_config(Path(backend_config.model_dir), max_model_len=1_000_000))
        await large.startup()
        try:
            assert large.capabilities.max_model_len == 4096
        finally:
            await large.shutdown()


class TestTorchLlama(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return TorchBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_llama_dir: Path) -> BackendConfig:
        return _config(tiny_llama_dir)


class TestTorchQwen2Cuda(BackendConformance):
    """The same suite on a CUDA GPU in float32 (``pytest --run-gpu``); ``auto``: the static cache with CUDA graphs."""

    pytestmark = pytest.mark.gpu  # added to the inherited asyncio(loop_scope="class") mark (pytest reads the MRO)

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return TorchBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _config(tiny_qwen2_dir, device="cuda", options={})


class TestTorchQwen2CudaDynamic(BackendConformance):
    """CUDA float32 on the dynamic cache (on CUDA, ``auto`` picks the static cache and CUDA graphs)."""

    pytestmark = pytest.mark.gpu  # added to the inherited asyncio(loop_scope="class") mark (pytest reads the MRO)

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return TorchBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _config(tiny_qwen2_dir, device="cuda", options={"cache_implementation": "dynamic"})


class TestTorchQwen2CudaBf16(BackendConformance):
    """CUDA with the default dtype (bfloat16 on GPUs that support it) and the default path (static cache + graphs)."""

    pytestmark = pytest.mark.gpu  # added to the inherited asyncio(loop_scope="class") mark (pytest reads the MRO)

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return TorchBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _config(tiny_qwen2_dir, device="auto", dtype="auto", options={})
