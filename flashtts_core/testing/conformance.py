"""The backend conformance suite every backend plugin runs against a tiny model.

Usage (one class per backend/model pair, in the plugin's tests)::

    import pytest
    from flashtts_core.plugins import BackendConfig
    from flashtts_core.testing.conformance import BackendConformance
    from my_plugin import MyBackend

    class TestMyBackend(BackendConformance):
        @pytest.fixture(scope="class")
        @classmethod
        def backend_cls(cls):
            return MyBackend

        @pytest.fixture(scope="class")
        @classmethod
        def backend_config(cls, tiny_qwen2_dir):
            return BackendConfig(model_dir=str(tiny_qwen2_dir), max_model_len=256)

Why the checks look the way they do: tiny models have random weights, so there is no "right" output to compare
with. Every expectation is derived from the backend itself: a 16-token greedy run is the reference, a stop id is
picked from it (rerunning with that id must stop exactly there), concurrent runs must equal their solo runs, and so
on. A check that does not apply to a backend (it does not declare the feature) is skipped with the reason.

Speed: the backend is started once per test class (``backend`` fixture, class scope) on a class-scoped event loop,
so the async tests of a class share one loop (``pytestmark`` below). Override fixtures with ``scope="class"``
(or ``"session"``): a narrower scope is a pytest ScopeMismatch error. Write class-scoped fixtures as
``@classmethod`` (under ``@pytest.fixture``): pytest 9 deprecates class-scoped fixtures on instance methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import pytest_asyncio

from flashtts_core.errors import (
    BackendNotReadyError,
    FlashTTSError,
    PromptTooLongError,
    UnsupportedSamplingError,
)
from flashtts_core.plugins.base import BACKEND_API_VERSION, BackendBase
from flashtts_core.plugins.registry import BACKEND_GROUP
from flashtts_core.plugins.types import (
    LATER_AUDIO,
    OPTIONAL_SAMPLING_FIELDS,
    BackendCapabilities,
    BackendConfig,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)

__all__ = (
    "GREEDY_TOKENS",
    "HEAVY_MODULES",
    "BackendConformance",
    "Generation",
    "first_error",
    "generate",
    "make_request",
    "wait_idle",
)

#: Length of the greedy reference run that stop-id and prefix expectations are derived from.
GREEDY_TOKENS = 16

#: Modules a backend must not import in ``check_available()`` or at plugin import (they take seconds to import).
HEAVY_MODULES: tuple[str, ...] = ("torch", "transformers", "vllm", "llama_cpp", "mlx", "sglang")

# A non-default value per optional sampling field, to provoke UnsupportedSamplingError.
_NON_DEFAULT: dict[str, Any] = {
    "temperature": 0.5,
    "top_k": 5,
    "top_p": 0.5,
    "min_p": 0.1,
    "repetition_penalty": 1.2,
    "seed": 1,
    "allowed_token_ids": frozenset({1, 2, 3}),
}
assert _NON_DEFAULT.keys() == OPTIONAL_SAMPLING_FIELDS.keys()

_IDLE_TIMEOUT_S = 10.0  # bound on "cancelled work stops": a step of a tiny model takes milliseconds
_IDLE_HOLD_S = 0.2  # idle must stay idle this long (nothing restarts or keeps running in the background)


class Generation(msgspec.Struct, frozen=True):
    """Everything one ``generate`` call produced."""

    chunks: tuple[TokenChunk, ...]

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(token for chunk in self.chunks for token in chunk.token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1].finish_reason if self.chunks else None


def make_request(
    prompt_token_ids: tuple[int, ...], request_id: str = "conformance", **sampling: Any
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, prompt_token_ids=tuple(prompt_token_ids), sampling=SamplingParams(**sampling)
    )


async def generate(backend: BackendBase, request: GenerationRequest, timeout_s: float) -> Generation:
    """Run one request to completion (bounded by ``timeout_s``) and keep every chunk."""
    chunks: list[TokenChunk] = []
    with anyio.fail_after(timeout_s):
        async with contextlib.aclosing(backend.generate(request)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
    return Generation(tuple(chunks))


async def first_error(backend: BackendBase, request: GenerationRequest, timeout_s: float) -> BaseException | None:
    """The exception raised by the first ``__anext__`` (``None`` if a chunk came instead): validation must fail
    before any token is produced."""
    stream = backend.generate(request)
    try:
        with anyio.fail_after(timeout_s):
            await stream.__anext__()
    except FlashTTSError as exc:
        return exc
    finally:
        await stream.aclose()
    return None


async def wait_idle(backend: BackendBase, timeout_s: float = _IDLE_TIMEOUT_S) -> None:
    """Wait until ``health()`` reports no running and no waiting request, and stays so for a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = await backend.health()
        if health.running == 0 and health.waiting == 0:
            await asyncio.sleep(_IDLE_HOLD_S)
            health = await backend.health()
            if health.running == 0 and health.waiting == 0:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"backend still busy {timeout_s:.0f} s after its requests ended: {health}")
        await asyncio.sleep(0.01)


def _last_first_occurrence(ids: tuple[int, ...]) -> int:
    """The largest k such that ids[k] does not occur in ids[:k] (0 always qualifies): stopping on ids[k] must
    then end the output exactly at k."""
    return max(k for k in range(len(ids)) if ids[k] not in ids[:k])


class BackendConformance:
    """Base test class; subclass it once per backend/model and override ``backend_cls`` and ``backend_config``.

    Optional overrides: ``prompt_token_ids`` (ids valid for the model), ``timeout_s`` (per request),
    ``expected_capabilities`` (asserted equal to what the backend reports) and ``admits_by_priority`` (``True``
    checks that queued work is admitted by ``GenerationRequest.priority``).
    """

    pytestmark = pytest.mark.asyncio(loop_scope="class")

    # --- fixtures to override --------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        raise NotImplementedError("override in your TestXxx class")

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls) -> BackendConfig:
        raise NotImplementedError("override in your TestXxx class")

    @pytest.fixture(scope="class")
    @classmethod
    def prompt_token_ids(cls) -> tuple[int, ...]:
        return (11, 12, 13, 14, 15, 16, 17, 18)

    @pytest.fixture(scope="class")
    @classmethod
    def timeout_s(cls) -> float:
        return 60.0

    @pytest.fixture(scope="class")
    @classmethod
    def expected_capabilities(cls) -> BackendCapabilities | None:
        return None

    @pytest.fixture(scope="class")
    @classmethod
    def admits_by_priority(cls) -> bool:
        """Override to ``True`` when the backend queues by ``GenerationRequest.priority`` (then it is checked)."""
        return False

    # --- shared state ----------------------------------------------------------------------------------------

    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    @classmethod
    async def backend(cls, backend_cls: type[BackendBase], backend_config: BackendConfig) -> AsyncIterator[BackendBase]:
        instance = backend_cls(backend_config)
        await instance.startup()
        try:
            yield instance
        finally:
            await instance.shutdown()

    @pytest.fixture(scope="class")
    @classmethod
    def capabilities(cls, backend: BackendBase) -> BackendCapabilities:
        return backend.capabilities

    @pytest.fixture(scope="class")
    @classmethod
    def greedy(cls) -> dict[str, Any]:
        """Sampling kwargs for greedy decoding, which every backend must support."""
        return {"temperature": 0.0}

    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    @classmethod
    async def greedy_reference(
        cls, backend: BackendBase, greedy: dict[str, Any], prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> tuple[int, ...]:
        """The backend's own greedy output for the prompt: what later checks are compared with."""
        result = await generate(backend, make_request(prompt_token_ids, max_tokens=GREEDY_TOKENS, **greedy), timeout_s)
        assert result.finish_reason == "length", (
            f"a {GREEDY_TOKENS}-token greedy run without stop ids must end with 'length' (is max_model_len at "
            f"least {len(prompt_token_ids) + GREEDY_TOKENS}?), got {result.finish_reason!r}"
        )
        assert len(result.token_ids) == GREEDY_TOKENS, result.token_ids
        return result.token_ids

    # --- plugin metadata -------------------------------------------------------------------------------------

    async def test_api_version(self, backend_cls: type[BackendBase]) -> None:
        assert issubclass(backend_cls, BackendBase)
        assert backend_cls.api_version == BACKEND_API_VERSION
        assert isinstance(backend_cls.name, str) and backend_cls.name, "set the class attribute `name`"
        assert issubclass(backend_cls.Options, msgspec.Struct)

    async def test_entry_point_resolves(self, backend_cls: type[BackendBase]) -> None:
        candidates = [ep for ep in entry_points(group=BACKEND_GROUP) if ep.name == backend_cls.name]
        if not candidates:
            pytest.skip(f"{backend_cls.__qualname__} is not installed through a {BACKEND_GROUP!r} entry point")
        assert len(candidates) == 1, f"backend name {backend_cls.name!r} is claimed twice: {candidates}"
        assert candidates[0].load() is backend_cls

    async def test_check_available_is_cheap(self, backend_cls: type[BackendBase]) -> None:
        """Import the plugin module and call ``check_available()`` in a fresh interpreter: no runtime import."""
        code = (
            "import importlib, json, sys\n"
            f"obj = importlib.import_module({backend_cls.__module__!r})\n"
            f"for part in {backend_cls.__qualname__!r}.split('.'):\n"
            "    obj = getattr(obj, part)\n"
            "reason = obj.check_available()\n"
            f"heavy = sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules)\n"
            "print(json.dumps({'reason': reason, 'heavy': heavy}))\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = await anyio.run_process([sys.executable, "-c", code], env=env, check=False)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        assert report["heavy"] == [], (
            f"importing {backend_cls.__module__} and calling check_available() imported {report['heavy']}; "
            "import the runtime inside startup() and use importlib.util.find_spec in check_available()"
        )
        assert report["reason"] is None or isinstance(report["reason"], str)

    async def test_capabilities(
        self, capabilities: BackendCapabilities, expected_capabilities: BackendCapabilities | None
    ) -> None:
        assert capabilities.sampling <= OPTIONAL_SAMPLING_FIELDS.keys()
        assert capabilities.max_model_len >= 16
        assert capabilities.max_concurrency is None or capabilities.max_concurrency >= 1
        if expected_capabilities is not None:
            assert capabilities == expected_capabilities

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def test_generate_before_startup(
        self, backend_cls: type[BackendBase], backend_config: BackendConfig, prompt_token_ids: tuple[int, ...]
    ) -> None:
        fresh = backend_cls(backend_config)
        error = await first_error(fresh, make_request(prompt_token_ids, max_tokens=2), 5.0)
        assert isinstance(error, BackendNotReadyError), error
        await fresh.shutdown()

    async def test_shutdown_idempotent_without_startup(
        self, backend_cls: type[BackendBase], backend_config: BackendConfig, tmp_path: Path
    ) -> None:
        never_started = backend_cls(backend_config)
        await never_started.shutdown()
        await never_started.shutdown()
        assert not never_started.ready

        broken = backend_cls(msgspec.structs.replace(backend_config, model_dir=str(tmp_path / "no-such-model")))
        failure: Exception | None = None
        try:
            await broken.startup()
        except Exception as exc:  # whatever the runtime raises for a missing checkpoint
            failure = exc
        assert failure is not None, "startup() with a missing model_dir must fail"
        await broken.shutdown()
        await broken.shutdown()
        assert not broken.ready

    async def test_startup_shutdown_idempotent(
        self,
        backend_cls: type[BackendBase],
        backend_config: BackendConfig,
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """A second instance: start, generate, shut down twice, then refuse work."""
        instance = backend_cls(backend_config)
        await instance.startup()
        try:
            assert instance.ready
            result = await generate(instance, make_request(prompt_token_ids, max_tokens=2), timeout_s)
            assert result.finish_reason in ("stop", "length")
        finally:
            await instance.shutdown()
        await instance.shutdown()
        assert not instance.ready
        assert (await instance.health()).status == "stopped"
        error = await first_error(instance, make_request(prompt_token_ids, max_tokens=2), 5.0)
        assert isinstance(error, BackendNotReadyError), error

    # --- streaming shape -------------------------------------------------------------------------------------

    async def test_generate_streams_deltas(
        self,
        backend: BackendBase,
        greedy: dict[str, Any],
        greedy_reference: tuple[int, ...],
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """Deltas, not cumulative outputs: their concatenation is exactly the reference (a cumulative stream
        would be longer than max_tokens)."""
        result = await generate(backend, make_request(prompt_token_ids, max_tokens=GREEDY_TOKENS, **greedy), timeout_s)
        for chunk in result.chunks:
            assert isinstance(chunk, TokenChunk)
            assert all(isinstance(t, int) and t >= 0 for t in chunk.token_ids), chunk
        assert result.token_ids == greedy_reference

    async def test_single_final_chunk(
        self, backend: BackendBase, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        result = await generate(backend, make_request(prompt_token_ids, max_tokens=8), timeout_s)
        finals = [i for i, chunk in enumerate(result.chunks) if chunk.finish_reason is not None]
        assert finals == [len(result.chunks) - 1], f"finish reasons at chunk indices {finals}: {result.chunks}"
        assert result.finish_reason in ("stop", "length")

    async def test_max_tokens_length(
        self,
        backend: BackendBase,
        greedy: dict[str, Any],
        greedy_reference: tuple[int, ...],
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        for max_tokens in (1, 5):
            result = await generate(backend, make_request(prompt_token_ids, max_tokens=max_tokens, **greedy), timeout_s)
            assert result.finish_reason == "length"
            assert result.token_ids == greedy_reference[:max_tokens]
        sampled = await generate(backend, make_request(prompt_token_ids, max_tokens=3), timeout_s)
        assert sampled.finish_reason == "length"
        assert len(sampled.token_ids) <= 3

    async def test_stop_token_ids(
        self,
        backend: BackendBase,
        greedy: dict[str, Any],
        greedy_reference: tuple[int, ...],
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """Stopping on the reference's k-th id (first occurrence) ends the output at exactly ids[:k], without the
        stop id; a second, absent stop id changes nothing; stopping on the first id gives an empty output."""
        ids = greedy_reference
        k = _last_first_occurrence(ids)
        absent = next(t for t in range(len(ids) + 2) if t not in ids[: k + 1])
        for stops in ((ids[k],), (absent, ids[k])):
            result = await generate(
                backend,
                make_request(prompt_token_ids, max_tokens=GREEDY_TOKENS, stop_token_ids=stops, **greedy),
                timeout_s,
            )
            assert result.finish_reason == "stop", (stops, result.chunks)
            assert result.token_ids == ids[:k], (stops, k, ids)
        first = await generate(
            backend, make_request(prompt_token_ids, max_tokens=4, stop_token_ids=(ids[0],), **greedy), timeout_s
        )
        assert first.token_ids == ()
        assert first.finish_reason == "stop"

    # --- determinism -----------------------------------------------------------------------------------------

    async def test_greedy_repeats(
        self,
        backend: BackendBase,
        greedy: dict[str, Any],
        greedy_reference: tuple[int, ...],
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        for _ in range(2):
            result = await generate(
                backend, make_request(prompt_token_ids, max_tokens=GREEDY_TOKENS, **greedy), timeout_s
            )
            assert result.token_ids == greedy_reference

    async def test_seed_determinism(
        self,
        backend: BackendBase,
        capabilities: BackendCapabilities,
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """Same request + same seed → same ids, also when other requests share the batch."""
        if not capabilities.deterministic_seed or "seed" not in capabilities.sampling:
            pytest.skip("the backend does not declare deterministic_seed")
        sampling: dict[str, Any] = {"max_tokens": GREEDY_TOKENS, "seed": 1234}
        extras = {"top_k": 50, "top_p": 0.9}
        sampling.update({name: value for name, value in extras.items() if name in capabilities.sampling})
        request = make_request(prompt_token_ids, **sampling)
        first = await generate(backend, request, timeout_s)
        second = await generate(backend, request, timeout_s)
        assert first.token_ids == second.token_ids
        others = [
            make_request(prompt_token_ids[i:] + prompt_token_ids[:i], request_id=f"other-{i}", max_tokens=GREEDY_TOKENS)
            for i in range(1, 4)
        ]
        crowded = await asyncio.gather(*(generate(backend, r, timeout_s) for r in [*others, request]))
        assert crowded[-1].token_ids == first.token_ids

    # --- validation ------------------------------------------------------------------------------------------

    async def test_unsupported_sampling_rejected(
        self,
        backend: BackendBase,
        capabilities: BackendCapabilities,
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        unsupported = [name for name in OPTIONAL_SAMPLING_FIELDS if name not in capabilities.sampling]
        if not unsupported:
            pytest.skip("the backend honours every optional sampling field")
        for name in unsupported:
            request = make_request(prompt_token_ids, max_tokens=2, **{name: _NON_DEFAULT[name]})
            error = await first_error(backend, request, timeout_s)
            assert isinstance(error, UnsupportedSamplingError), (name, error)
            assert error.param == name

    async def test_prompt_too_long_rejected(
        self,
        backend: BackendBase,
        capabilities: BackendCapabilities,
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """A prompt that leaves no room for one generated token fails before the first token."""
        size = capabilities.max_model_len
        prompt = (prompt_token_ids * (size // len(prompt_token_ids) + 1))[:size]
        error = await first_error(backend, make_request(prompt, max_tokens=1), timeout_s)
        assert isinstance(error, PromptTooLongError), error
        assert "max_length" in error.message or str(size) in error.message

    # --- cancellation, health, concurrency -------------------------------------------------------------------

    @pytest.mark.parametrize("how", ["aclose", "task_cancel"])
    async def test_cancel_midstream_then_serve(
        self,
        backend: BackendBase,
        capabilities: BackendCapabilities,
        greedy: dict[str, Any],
        greedy_reference: tuple[int, ...],
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
        how: str,
    ) -> None:
        """Abandon a long generation after its first chunk; the backend must drop it (health back to 0 and
        staying there) and serve the next request normally."""
        long_request = make_request(
            prompt_token_ids, max_tokens=capabilities.max_model_len - len(prompt_token_ids), **greedy
        )
        if how == "aclose":
            stream = backend.generate(long_request)
            with anyio.fail_after(timeout_s):
                first = await stream.__anext__()
            assert first.finish_reason is None
            await stream.aclose()
        else:
            started = asyncio.Event()

            async def consume() -> None:
                async for _chunk in backend.generate(long_request):
                    started.set()

            task = asyncio.ensure_future(consume())
            with anyio.fail_after(timeout_s):
                await started.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()
        await wait_idle(backend)
        result = await generate(backend, make_request(prompt_token_ids, max_tokens=4, **greedy), timeout_s)
        assert result.token_ids == greedy_reference[:4]

    async def test_health_counts(
        self, backend: BackendBase, prompt_token_ids: tuple[int, ...], timeout_s: float
    ) -> None:
        await wait_idle(backend)
        assert (await backend.health()).status == "ready"
        room = backend.capabilities.max_model_len - len(prompt_token_ids)
        stream = backend.generate(make_request(prompt_token_ids, max_tokens=room))
        try:
            with anyio.fail_after(timeout_s):
                await stream.__anext__()
            busy = await backend.health()
            assert busy.running + busy.waiting >= 1, busy
        finally:
            await stream.aclose()
        await wait_idle(backend)

    async def test_concurrent_requests(
        self,
        backend: BackendBase,
        greedy: dict[str, Any],
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """Eight overlapping requests with different prompt lengths and budgets all complete, each with exactly
        its solo greedy output (batching must not mix rows up)."""
        base = prompt_token_ids
        requests = [
            make_request(base + (base * 8)[:i], request_id=f"concurrent-{i}", max_tokens=GREEDY_TOKENS - i, **greedy)
            for i in range(8)
        ]
        solo = [await generate(backend, request, timeout_s) for request in requests]
        together = await asyncio.gather(*(generate(backend, request, timeout_s) for request in requests))
        for i, (alone, crowded) in enumerate(zip(solo, together, strict=True)):
            assert crowded.finish_reason == alone.finish_reason == "length", i
            assert crowded.token_ids == alone.token_ids, f"request {i} differs when run concurrently"
        await wait_idle(backend)

    async def test_allowed_token_ids(
        self,
        backend: BackendBase,
        capabilities: BackendCapabilities,
        greedy_reference: tuple[int, ...],
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        if "allowed_token_ids" not in capabilities.sampling:
            pytest.skip("the backend does not declare allowed_token_ids")
        # Exclude the unconstrained greedy choice so the mask has to change the output.
        allowed = frozenset(prompt_token_ids[:5]) - {greedy_reference[0]} or frozenset(prompt_token_ids[:5])
        variants: list[dict[str, Any]] = [{"temperature": 0.0}, {"temperature": 1.0}]
        if "seed" in capabilities.sampling:
            variants[1]["seed"] = 7
        for sampling in variants:
            request = make_request(prompt_token_ids, max_tokens=GREEDY_TOKENS, allowed_token_ids=allowed, **sampling)
            result = await generate(backend, request, timeout_s)
            assert result.finish_reason == "length"
            assert set(result.token_ids) <= allowed, (sampling, result.token_ids, sorted(allowed))

    async def test_all_declared_sampling_together(
        self,
        backend: BackendBase,
        capabilities: BackendCapabilities,
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """Every declared field at a non-default value in one request is accepted and respected for length."""
        values = {name: _NON_DEFAULT[name] for name in capabilities.sampling}
        if "allowed_token_ids" in values:
            values["allowed_token_ids"] = frozenset(prompt_token_ids)
        result = await generate(backend, make_request(prompt_token_ids, max_tokens=12, **values), timeout_s)
        assert result.finish_reason in ("stop", "length")
        assert len(result.token_ids) <= 12
        if "allowed_token_ids" in values:
            assert set(result.token_ids) <= values["allowed_token_ids"]

    async def test_first_audio_admitted_first(
        self,
        backend_cls: type[BackendBase],
        backend_config: BackendConfig,
        admits_by_priority: bool,
        prompt_token_ids: tuple[int, ...],
        timeout_s: float,
    ) -> None:
        """Two slots, two later segments and then a new request's first generation, sent together: the first
        generation starts before the second later segment (FIFO would run both later segments first)."""
        if not admits_by_priority:
            pytest.skip("the backend does not declare that it admits by priority (admits_by_priority fixture)")
        small = backend_cls(msgspec.structs.replace(backend_config, max_batch_size=2))
        await small.startup()
        started: list[str] = []

        async def run(request: GenerationRequest) -> None:
            with anyio.fail_after(timeout_s):
                async with contextlib.aclosing(small.generate(request)) as stream:
                    async for chunk in stream:
                        if chunk.token_ids and request.request_id not in started:
                            started.append(request.request_id)

        try:
            later = [
                msgspec.structs.replace(
                    make_request(prompt_token_ids, request_id=f"later{i}", max_tokens=48, temperature=0.0),
                    priority=LATER_AUDIO,
                )
                for i in range(2)
            ]
            first = make_request(prompt_token_ids, request_id="first", max_tokens=8, temperature=0.0)
            await asyncio.gather(*(run(request) for request in (*later, first)))
        finally:
            await small.shutdown()
        assert sorted(started) == ["first", "later0", "later1"]
        assert started.index("first") < started.index("later1"), started
