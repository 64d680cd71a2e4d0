"""The torch backend with its scheduler in a worker process (``worker=process``, what ``auto`` picks on the CPU): the
conformance kit through the process boundary, and what only a second process can do (fail on its own, outlive or
not its parent, report a load error across the boundary)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from flashtts_torch import TorchBackend
from flashtts_torch._process import ProcessRuntime

from flashtts_core.errors import BackendNotReadyError, CheckpointError, GenerationError
from flashtts_core.plugins import BackendBase, BackendConfig
from flashtts_core.testing.conformance import BackendConformance, generate, make_request

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the worker process needs a POSIX system")


def _config(model_dir: Path, **options: object) -> BackendConfig:
    return BackendConfig(
        model_dir=str(model_dir),
        max_model_len=256,
        device="cpu",
        dtype="float32",
        max_batch_size=8,
        options={"num_threads": 1, **options},
    )


def _runtime(backend: TorchBackend) -> ProcessRuntime:
    runtime = backend._runtime
    assert isinstance(runtime, ProcessRuntime)
    return runtime


def _gone(pid: int, timeout: float = 20.0) -> bool:
    """Whether process ``pid`` has exited (and been reaped) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class TestTorchProcessQwen2(BackendConformance):
    """The kit, with every request crossing the process boundary (auto picks the worker process on the CPU)."""

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

    async def test_runs_in_a_worker_process(self, backend: BackendBase) -> None:
        assert isinstance(backend, TorchBackend) and backend.worker_mode() == "process"
        runtime = _runtime(backend)
        assert runtime.pid is not None and runtime.pid != os.getpid()
        assert "worker process" in runtime.path_description

    async def test_requests_share_decoding_steps(
        self, backend_config: BackendConfig, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        """Concurrent requests are decoded together in the worker (its batch counter comes back with each step;
        a fresh worker, so that the count is this test's)."""
        fresh = TorchBackend(backend_config)
        await fresh.startup()
        try:
            await generate(fresh, make_request(prompt_token_ids, max_tokens=8), timeout_s)
            assert _runtime(fresh).peak_batch == 1
            requests = [make_request(prompt_token_ids[: 4 + i], request_id=f"b{i}", max_tokens=24) for i in range(4)]
            await asyncio.gather(*(generate(fresh, request, timeout_s) for request in requests))
            assert _runtime(fresh).peak_batch >= 2
        finally:
            await fresh.shutdown()


async def test_thread_and_process_give_the_same_ids(tiny_qwen2_dir: Path) -> None:
    """Seeded and greedy requests give the same ids whichever side of the process boundary decodes them."""
    requests = [
        make_request(tuple(range(10, 30)), request_id="greedy", max_tokens=16, temperature=0.0),
        make_request(tuple(range(40, 52)), request_id="seeded", max_tokens=16, temperature=0.9, top_k=20, seed=11),
    ]
    outputs = []
    for worker in ("thread", "process"):
        backend = TorchBackend(_config(tiny_qwen2_dir, worker=worker))
        await backend.startup()
        try:
            results = await asyncio.gather(*(generate(backend, r, 60.0) for r in requests))
            outputs.append([r.token_ids for r in results])
        finally:
            await backend.shutdown()
    assert outputs[0] == outputs[1]


async def test_load_error_comes_back_as_the_same_error(tmp_path: Path) -> None:
    """A folder the worker cannot load fails startup here with the worker's error class and message."""
    backend = TorchBackend(_config(tmp_path, worker="process"))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        await backend.startup()
    assert not backend.ready
    await backend.shutdown()


async def test_shutdown_stops_the_worker(tiny_qwen2_dir: Path) -> None:
    backend = TorchBackend(_config(tiny_qwen2_dir, worker="process"))
    await backend.startup()
    pid = _runtime(backend).pid
    assert pid is not None
    await backend.shutdown()
    assert _gone(pid)


async def test_worker_death_fails_open_requests_and_is_reported(tiny_qwen2_dir: Path) -> None:
    """A worker killed mid-stream ends the open request with a GenerationError; health says degraded, and new
    requests are refused as not ready (503) instead of hanging."""
    backend = TorchBackend(_config(tiny_qwen2_dir, worker="process"))
    await backend.startup()
    try:
        runtime = _runtime(backend)
        assert runtime.pid is not None
        request = make_request(tuple(range(10, 30)), max_tokens=200, temperature=1.0, seed=1)
        stream = backend.generate(request)
        first = await asyncio.wait_for(stream.__anext__(), 30)
        assert first.token_ids
        os.kill(runtime.pid, signal.SIGKILL)
        with pytest.raises(GenerationError, match="worker process exited"):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
        health = await backend.health()
        assert health.status == "degraded" and "worker process" in (health.detail or "")
        with pytest.raises(BackendNotReadyError):
            await generate(backend, request, 30.0)
    finally:
        await backend.shutdown()


async def test_cancelled_request_frees_its_slot(tiny_qwen2_dir: Path) -> None:
    """Closing a stream aborts the sequence in the worker: its running count drops back to zero."""
    backend = TorchBackend(_config(tiny_qwen2_dir, worker="process"))
    await backend.startup()
    try:
        stream = backend.generate(make_request(tuple(range(10, 30)), max_tokens=200, temperature=1.0, seed=2))
        await asyncio.wait_for(stream.__anext__(), 30)
        assert (await backend.health()).running == 1
        await stream.aclose()
        for _ in range(1500):  # 30 s
            if not (await backend.health()).running:
                break
            await asyncio.sleep(0.02)
        assert (await backend.health()).running == 0
        result = await generate(backend, make_request(tuple(range(10, 20)), max_tokens=4), 30.0)
        assert result.finish_reason == "length"
    finally:
        await backend.shutdown()


def test_reporter_sends_counters_that_change_between_iterations() -> None:
    """An Abort that takes queued work out of the worker's queue changes ``waiting`` with no scheduler iteration to
    report it (nothing may be running): the worker sends the counters itself, once per change, so the server's
    health does not keep the old count."""
    from multiprocessing import Pipe
    from types import SimpleNamespace

    from flashtts_torch._protocol import Step
    from flashtts_torch._worker import Reporter

    parent, child = Pipe()
    reporter = Reporter(child)
    runtime = SimpleNamespace(num_running=1, num_waiting=2, peak_batch=1, graphs_captured=0)
    reporter.runtime = runtime  # type: ignore[assignment]
    decoder = msgspec.msgpack.Decoder(Step)

    reporter.step([])
    frame = decoder.decode(parent.recv_bytes())
    assert (frame.running, frame.waiting) == (1, 2)
    runtime.num_running, runtime.num_waiting = 0, 0  # the queued work was aborted, the running one dropped
    reporter.counters()
    frame = decoder.decode(parent.recv_bytes())
    assert (frame.items, frame.running, frame.waiting) == ([], 0, 0)
    reporter.counters()  # unchanged: nothing is sent
    reporter.step([])
    assert not parent.poll(0.1)
    runtime.num_running = 1
    reporter.fail(7, "shutting down")  # an error item carries the current counters, not zeros
    frame = decoder.decode(parent.recv_bytes())
    assert frame.items[0].key == 7 and frame.items[0].error == "shutting down"
    assert frame.running == 1
    parent.close()
    child.close()


async def test_aborted_queued_requests_leave_the_waiting_count(tiny_qwen2_dir: Path) -> None:
    """Requests queued behind a running one and then cancelled leave ``waiting`` (and, once the running one is
    cancelled too, ``running``) at zero in the server's health."""
    backend = TorchBackend(msgspec.structs.replace(_config(tiny_qwen2_dir, worker="process"), max_batch_size=1))
    await backend.startup()

    async def first(stream: Any) -> Any:
        return await stream.__anext__()

    try:
        running = backend.generate(make_request(tuple(range(10, 30)), max_tokens=200, temperature=1.0, seed=2))
        await asyncio.wait_for(running.__anext__(), 30)
        queued = [
            backend.generate(make_request(tuple(range(10, 20 + i)), max_tokens=200, temperature=1.0, seed=i))
            for i in range(2)
        ]
        waiters = [asyncio.create_task(first(stream)) for stream in queued]
        for _ in range(1500):
            if (await backend.health()).waiting == 2:
                break
            await asyncio.sleep(0.02)
        assert (await backend.health()).waiting == 2
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        for stream in queued:
            await stream.aclose()
        await running.aclose()
        for _ in range(1500):  # 30 s
            health = await backend.health()
            if not health.running and not health.waiting:
                break
            await asyncio.sleep(0.02)
        assert (health.running, health.waiting) == (0, 0)
    finally:
        await backend.shutdown()


@pytest.mark.parametrize("executable", ["missing", "false"])
async def test_worker_that_cannot_start(executable: str, tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No runnable worker (no such interpreter, or one that exits at once): ``auto`` serves from a thread instead,
    an explicit ``worker=process`` fails startup saying so."""
    from flashtts_torch import _process
    from flashtts_torch._runtime import TorchRuntime

    path = "/nonexistent/python" if executable == "missing" else shutil.which("false")
    if path is None:
        pytest.skip("no false(1) here")
    monkeypatch.setattr(_process.sys, "executable", path)
    explicit = TorchBackend(_config(tiny_qwen2_dir, worker="process"))
    with pytest.raises(_process.WorkerStartError, match="torch worker process"):
        await explicit.startup()
    await explicit.shutdown()
    backend = TorchBackend(_config(tiny_qwen2_dir))
    await backend.startup()
    try:
        assert isinstance(backend._runtime, TorchRuntime)
        result = await generate(backend, make_request(tuple(range(10, 20)), max_tokens=4), 30.0)
        assert result.finish_reason == "length"
    finally:
        await backend.shutdown()


@pytest.mark.parametrize(
    ("device", "system", "machine", "driver", "expected"),
    [
        ("cpu", "Linux", "x86_64", True, "process"),
        ("cuda", "Linux", "x86_64", False, "thread"),
        ("auto", "Linux", "x86_64", False, "process"),
        ("auto", "Linux", "x86_64", True, "thread"),
        ("auto", "Darwin", "arm64", False, "thread"),
    ],
)
def test_auto_picks_the_process_for_cpu_decoding(
    device: str, system: str, machine: str, driver: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``worker=auto`` without importing torch: the CPU (explicit, or auto without a GPU driver and not an Apple
    Silicon Mac) gets the worker process, a GPU the in-process scheduler."""
    from flashtts_torch import backend as module

    monkeypatch.setattr(module.platform, "system", lambda: system)
    monkeypatch.setattr(module.platform, "machine", lambda: machine)
    monkeypatch.setattr(module.os.path, "exists", lambda path: driver and path == "/dev/nvidia0")
    config = BackendConfig(model_dir="unused", device=device)
    assert TorchBackend(config).worker_mode() == expected
    assert TorchBackend(msgspec.structs.replace(config, options={"worker": "thread"})).worker_mode() == "thread"
