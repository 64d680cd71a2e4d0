"""runtime: how the CPU is shared between the LLM backend and the engine's codec work."""

from __future__ import annotations

import os
import sys
import threading

import msgspec
import pytest

from flashtts_core.config import ServerSettings
from flashtts_core.engines.common import set_torch_threads
from flashtts_core.runtime import MALLOC_ARENAS, available_cpus, cpu_thread_split, limit_malloc_arenas


@pytest.mark.parametrize(
    ("total", "expected"),
    [(1, (1, 1)), (2, (1, 1)), (3, (2, 1)), (4, (2, 2)), (16, (8, 8))],
)
def test_split_when_both_on_cpu(total: int, expected: tuple[int, int]) -> None:
    settings = ServerSettings(cpu_threads=total, llm_device="cpu", tokenizer_device="cpu", detokenizer_device="cpu")
    assert cpu_thread_split(settings) == expected


def test_default_budget_is_the_affinity_mask() -> None:
    settings = ServerSettings(llm_device="cpu", tokenizer_device="cpu", detokenizer_device="cpu")
    llm, codec = cpu_thread_split(settings)
    assert llm is not None and codec is not None
    assert llm + codec == max(2, available_cpus())


def test_only_one_side_on_cpu() -> None:
    gpu_llm = ServerSettings(llm_device="cuda", tokenizer_device="cpu", detokenizer_device="cpu")
    assert cpu_thread_split(gpu_llm) == (None, None)  # nothing to share: runtime defaults
    assert cpu_thread_split(msgspec.structs.replace(gpu_llm, cpu_threads=6)) == (None, 6)
    gpu_codec = ServerSettings(llm_device="cpu", tokenizer_device="cuda", detokenizer_device="cuda:1")
    assert cpu_thread_split(msgspec.structs.replace(gpu_codec, cpu_threads=3)) == (3, None)


def test_set_torch_threads_is_per_thread() -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    seen: list[int] = []

    def worker() -> None:
        set_torch_threads(1)
        seen.append(torch.get_num_threads())
        set_torch_threads(None)  # leaves it
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [1, 1]
    if "OpenMP" in torch.__config__.parallel_info():  # per-thread counts; other builds share one
        assert torch.get_num_threads() == before


async def test_mega_demo_comes_with_a_role_copied_to_a_scratch_folder() -> None:
    from flashtts_core.runtime import open_runtime, resolve
    from flashtts_core.testing.checkpoints import demo_roles

    settings = ServerSettings(demo="mega", llm_device="cpu", tokenizer_device="cpu", detokenizer_device="cpu")
    async with open_runtime(resolve(settings), warmup=False) as runtime:
        voices = runtime.service.voices
        assert voices.names() == ["tiny"]
        folder = voices.role_dir
        assert folder is not None and folder.is_dir()
        cached = demo_roles("mega")
        assert cached is not None and folder != cached and not folder.is_relative_to(cached)
    assert not folder.exists()  # the copy goes with the server; the cached original stays
    assert (cached / "tiny").is_dir()


@pytest.mark.parametrize("worker", ["process", "thread"])
async def test_engine_loads_while_an_out_of_process_backend_loads(worker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the torch worker process the engine's startup begins before the backend is ready (the two loads
    overlap); with the in-process scheduler they stay one after the other. Either way the runtime serves."""
    pytest.importorskip("flashtts_torch")
    from flashtts_core.plugins.base import EngineBase
    from flashtts_core.runtime import open_runtime, resolve

    settings = ServerSettings(
        demo="spark",
        llm_device="cpu",
        tokenizer_device="cpu",
        detokenizer_device="cpu",
        backend_options={"worker": worker},
    )
    plan = resolve(settings)
    seen: list[bool] = []
    original = plan.engine_cls.startup

    async def startup(engine: EngineBase) -> None:
        seen.append(engine.backend.ready)
        await original(engine)

    monkeypatch.setattr(plan.engine_cls, "startup", startup)
    async with open_runtime(plan, warmup=False) as runtime:
        assert runtime.backend.loads_out_of_process is (worker == "process")
        assert runtime.backend.ready and runtime.engine.ready
    assert seen == [worker == "thread"]


def test_malloc_arenas_left_alone_when_the_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_malloc_arenas_capped_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    assert limit_malloc_arenas(MALLOC_ARENAS) is glibc
