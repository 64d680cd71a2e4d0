"""The conformance kit on the mlx-lm backend (CPU build of mlx on Linux; Metal on Apple silicon), for both tiny
architectures the engines use (Qwen2: Spark-TTS; Llama with Llama 3 rope scaling: Orpheus), plus checks specific to
this backend: batching, per-request seeds, option plumbing and the Spark demo checkpoint end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flashtts_mlx", reason="flashtts-mlx is not installed (pip install -e plugins/flashtts-mlx)")
pytest.importorskip("mlx_lm", reason='mlx-lm is not installed (pip install "mlx[cpu]" mlx-lm -e plugins/flashtts-mlx)')
pytest.importorskip("mlx.core", reason="mlx is not importable here (on Linux it needs mlx[cpu])")

from flashtts_mlx import MlxBackend

from flashtts_core.plugins import BackendBase, BackendConfig
from flashtts_core.testing.conformance import BackendConformance, generate, make_request


def _config(model_dir: Path, **overrides: object) -> BackendConfig:
    values: dict[str, object] = {
        "model_dir": str(model_dir),
        "max_model_len": 256,
        "device": "cpu",
        "dtype": "float32",
        "max_batch_size": 8,
    }
    values.update(overrides)
    return BackendConfig(**values)  # type: ignore[arg-type]


class TestMlxQwen2(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return MlxBackend

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
        assert isinstance(backend, MlxBackend)
        runtime = backend._runtime
        assert runtime is not None
        runtime.peak_batch = 0
        requests = [make_request(prompt_token_ids[: 4 + i], request_id=f"b{i}", max_tokens=24) for i in range(4)]
        await asyncio.gather(*(generate(backend, request, timeout_s) for request in requests))
        assert runtime.peak_batch >= 2

    async def test_seeded_sampling_differs_by_seed(
        self, backend: BackendBase, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """Seeds reach the sampler: a different seed draws a different sequence (16 draws at temperature 1)."""
        runs = [
            await generate(backend, make_request(prompt_token_ids, max_tokens=16, temperature=1.0, seed=s), timeout_s)
            for s in (1, 2)
        ]
        assert runs[0].token_ids != runs[1].token_ids

    async def test_batch_size_cap_queues(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """With max_batch_size=2, six requests still all complete (the rest wait) with their solo outputs."""
        small = MlxBackend(_config(Path(backend_config.model_dir), max_batch_size=2))
        await small.startup()
        try:
            assert small._runtime is not None
            requests = [
                make_request(prompt_token_ids[i:], request_id=f"q{i}", max_tokens=10, temperature=0.0) for i in range(6)
            ]
            solo = [await generate(small, request, timeout_s) for request in requests]
            small._runtime.peak_batch = 0
            together = await asyncio.gather(*(generate(small, request, timeout_s) for request in requests))
            assert [r.token_ids for r in together] == [r.token_ids for r in solo]
            assert small._runtime.peak_batch == 2
        finally:
            await small.shutdown()

    async def test_max_model_len_capped_by_model(self, backend_config: BackendConfig) -> None:
        """A max_model_len above the model's max_position_embeddings (4096 here) is capped to it."""
        large = MlxBackend(_config(Path(backend_config.model_dir), max_model_len=1_000_000))
        await large.startup()
        try:
            assert large.capabilities.max_model_len == 4096
        finally:
            await large.shutdown()

    async def test_shutdown_ends_open_streams_with_abort(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """A stream open while the backend shuts down ends with exactly one final ``abort`` chunk."""
        other = MlxBackend(backend_config)
        await other.startup()
        stream = other.generate(make_request(prompt_token_ids, max_tokens=200, temperature=0.0))
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


class TestMlxLlama(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return MlxBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_llama_dir: Path) -> BackendConfig:
        return _config(tiny_llama_dir)


def test_spark_demo_speaks_with_mlx(tmp_path: Path) -> None:
    """``--demo spark --backend mlx-lm``: the scripted tiny Spark checkpoint produces audio end to end."""
    pytest.importorskip("torch", reason="the Spark codec (BiCodec) runs on torch")
    from flashtts_core.config import ServerSettings
    from flashtts_core.engines.spark import SparkEngine
    from flashtts_core.plugins.registry import Registry
    from flashtts_core.plugins.types import SynthesisRequest
    from flashtts_core.runtime import open_runtime, resolve

    registry = Registry(source=lambda group: [])
    registry.register("engine", "spark", SparkEngine)
    registry.register("backend", "mlx-lm", MlxBackend)
    settings = ServerSettings(
        demo="spark",
        backend="mlx-lm",
        llm_device="cpu",
        tokenizer_device="cpu",
        detokenizer_device="cpu",
        max_length=2048,
        role_dir=str(tmp_path / "roles"),
    )

    async def speak() -> np.ndarray:
        async with open_runtime(resolve(settings, registry), warmup=False) as rt:
            request = SynthesisRequest(request_id="mlx-e2e", text="Hello from MLX.", voice="female")
            pieces = [piece async for piece in rt.service.synthesize(request)]
        return np.concatenate(pieces)

    audio = asyncio.run(speak())
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size >= 16_000 // 10  # the script emits 150 semantic tokens: several tenths of a second
    assert np.isfinite(audio).all() and float(np.abs(audio).max()) > 0.0
