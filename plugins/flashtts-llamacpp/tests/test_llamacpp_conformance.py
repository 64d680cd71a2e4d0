"""The conformance kit on the llama-cpp backend, on GGUF copies (f32, written by ``flashtts convert-gguf``) of both
tiny architectures the engines use (Qwen2: Spark-TTS; Llama with Llama 3 rope scaling: Orpheus), plus checks specific
to this backend: GGUF lookup, context queueing, prefix reuse, shutdown, and greedy parity with transformers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (source build: see the plugin's README.md)")
pytest.importorskip("gguf", reason="the tests convert the tiny checkpoints with the gguf package")

from flashtts_llamacpp import LlamaCppBackend

from flashtts_core.errors import CheckpointError
from flashtts_core.plugins import BackendBase, BackendConfig
from flashtts_core.testing.conformance import BackendConformance, generate, make_request
from flashtts_core.testing.tiny_gguf import build_tiny_gguf

# One thread: the tiny models are overhead-bound, and ggml's spin-waiting threads collapse on a shared 2-core box.
_OPTIONS = {"n_threads": 1}


def _config(model_dir: Path, **overrides: object) -> BackendConfig:
    values: dict[str, object] = {
        "model_dir": str(model_dir),
        "max_model_len": 256,
        "device": "cpu",
        "max_batch_size": 8,
        "options": _OPTIONS,
    }
    values.update(overrides)
    return BackendConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def qwen2_gguf_dir(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LLM folder holding only ``model.gguf`` (the backend needs nothing else)."""
    out = tmp_path_factory.mktemp("qwen2-gguf")
    build_tiny_gguf(tiny_qwen2_dir, out / "model.gguf")
    return out


@pytest.fixture(scope="session")
def llama_gguf_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama-gguf")
    build_tiny_gguf(tiny_llama_dir, out / "tiny-llama-f32.gguf")  # not model.gguf: the only *.gguf is found too
    return out


class TestLlamaCppQwen2(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return LlamaCppBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, qwen2_gguf_dir: Path) -> BackendConfig:
        return _config(qwen2_gguf_dir)

    @pytest.fixture(scope="class")
    @classmethod
    def admits_by_priority(cls) -> bool:
        return True

    async def test_greedy_matches_transformers(
        self, backend: BackendBase, tiny_qwen2_dir: Path, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """Greedy ids equal transformers' greedy ids on the source checkpoint (the f32 GGUF is the same model)."""
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_token_ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        expected = tuple(out[0, len(prompt_token_ids) :].tolist())
        result = await generate(backend, make_request(prompt_token_ids, max_tokens=16, temperature=0.0), timeout_s)
        assert result.token_ids == expected

    async def test_prefix_reuse_gives_the_same_ids(
        self, backend: BackendBase, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """A prompt that extends the previous one reuses its KV cache; the output equals a run without reuse."""
        longer = (*prompt_token_ids, 40, 41, 42)
        await generate(backend, make_request(prompt_token_ids, max_tokens=4, temperature=0.0), timeout_s)
        reused = await generate(backend, make_request(longer, max_tokens=12, temperature=0.0), timeout_s)
        no_reuse = {**_OPTIONS, "prefix_cache": False}
        fresh_backend = LlamaCppBackend(_config(Path(backend_config.model_dir), options=no_reuse))
        async with fresh_backend:
            fresh = await generate(fresh_backend, make_request(longer, max_tokens=12, temperature=0.0), timeout_s)
        assert reused.token_ids == fresh.token_ids

    async def test_contexts_serve_in_parallel_and_queue(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """Two contexts: six concurrent requests all complete with their solo outputs; at most two run at once."""
        options = {**_OPTIONS, "contexts": 4}
        two = LlamaCppBackend(_config(Path(backend_config.model_dir), max_batch_size=2, options=options))
        async with two:
            assert two.capabilities.max_concurrency == 2  # contexts are capped at --llm_batch_size
            requests = [
                make_request(prompt_token_ids[i:], request_id=f"q{i}", max_tokens=10, temperature=0.0) for i in range(6)
            ]
            solo = [await generate(two, request, timeout_s) for request in requests]
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    health = await two.health()
                    peak = max(peak, health.running)
                    await asyncio.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            try:
                together = await asyncio.gather(*(generate(two, request, timeout_s) for request in requests))
            finally:
                watcher.cancel()
            assert [r.token_ids for r in together] == [r.token_ids for r in solo]
            assert 1 <= peak <= 2

    async def test_shutdown_ends_open_streams_with_abort(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """A running and a queued stream open while the backend shuts down each end with one final ``abort`` chunk."""
        # A long budget: the worker does not wait for its consumer, so the first request must still be running.
        other = LlamaCppBackend(_config(Path(backend_config.model_dir), max_model_len=4096))
        await other.startup()
        request = make_request(prompt_token_ids, max_tokens=4000, temperature=0.0)
        running, queued = other.generate(request), other.generate(request)
        try:
            first = await asyncio.wait_for(running.__anext__(), timeout_s)
            assert first.finish_reason is None
            pending = asyncio.ensure_future(queued.__anext__())
            await asyncio.sleep(0.05)
            assert (await other.health()).waiting == 1
            await other.shutdown()
            rest = [chunk async for chunk in running]
            last = await asyncio.wait_for(pending, timeout_s)
        finally:
            await running.aclose()
            await queued.aclose()
            await other.shutdown()
        assert rest and rest[-1].finish_reason == "abort"
        assert all(chunk.finish_reason is None for chunk in rest[:-1])
        assert last.finish_reason == "abort" and last.token_ids == ()

    async def test_max_model_len_capped_by_model(self, backend_config: BackendConfig) -> None:
        """A max_model_len above the model's training context (4096 here) is capped to it."""
        large = LlamaCppBackend(_config(Path(backend_config.model_dir), max_model_len=1_000_000))
        async with large:
            assert large.capabilities.max_model_len == 4096

    async def test_out_of_vocabulary_prompt_is_rejected(self, backend: BackendBase, timeout_s: float) -> None:
        from flashtts_core.errors import InvalidRequestError
        from flashtts_core.testing.conformance import first_error

        error = await first_error(backend, make_request((1, 2, 10**6), max_tokens=2), timeout_s)
        assert isinstance(error, InvalidRequestError) and error.param == "prompt_token_ids"


class TestLlamaCppLlama(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return LlamaCppBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, llama_gguf_dir: Path) -> BackendConfig:
        return _config(llama_gguf_dir)


# --- GGUF lookup (no generation) -------------------------------------------------------------------------------


async def test_missing_gguf_says_how_to_convert(tmp_path: Path) -> None:
    backend = LlamaCppBackend(_config(tmp_path))
    with pytest.raises(CheckpointError, match=r"flashtts convert-gguf .*--llm_gguf"):
        await backend.startup()
    await backend.shutdown()


async def test_several_ggufs_need_a_choice(qwen2_gguf_dir: Path, tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).symlink_to(qwen2_gguf_dir / "model.gguf")
    backend = LlamaCppBackend(_config(tmp_path))
    with pytest.raises(CheckpointError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        await backend.startup()
    chosen = LlamaCppBackend(_config(tmp_path, options={**_OPTIONS, "gguf": str(tmp_path / "b.gguf")}))
    async with chosen:
        assert chosen.ready


async def test_gguf_in_llm_subfolder_and_explicit_missing_file(qwen2_gguf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "LLM").mkdir()
    (tmp_path / "LLM" / "model.gguf").symlink_to(qwen2_gguf_dir / "model.gguf")
    async with LlamaCppBackend(_config(tmp_path)) as backend:
        assert backend.ready
    missing = LlamaCppBackend(_config(tmp_path, options={**_OPTIONS, "gguf": str(tmp_path / "nope.gguf")}))
    with pytest.raises(CheckpointError, match="does not exist"):
        await missing.startup()
