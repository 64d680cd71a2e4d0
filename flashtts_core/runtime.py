"""Assembling a running model from settings: model directory → engine class → backend → engine → voices.

Split in two steps so the CLI can fail fast with one clear line before anything heavy is imported:
:func:`resolve` (cheap: directory checks, plugin lookup, availability) and :func:`open_runtime` (loads).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec

from flashtts_core.config import ServerSettings
from flashtts_core.errors import PluginError
from flashtts_core.plugins.base import BackendBase, EngineBase
from flashtts_core.plugins.registry import INSTALL_HINTS, Registry, get_registry
from flashtts_core.plugins.types import BackendConfig, EngineConfig
from flashtts_core.service import SynthesisService
from flashtts_core.voices import VoiceStore

__all__ = (
    "MALLOC_ARENAS",
    "Plan",
    "Runtime",
    "available_cpus",
    "cpu_thread_split",
    "demo_model_dir",
    "limit_malloc_arenas",
    "open_runtime",
    "resolve",
)

logger = logging.getLogger(__name__)

#: glibc malloc arenas the server process may use (glibc's default: 8 per core).
MALLOC_ARENAS = 4
_M_ARENA_MAX = -8  # mallopt() parameter number (glibc <malloc.h>)


class Plan(msgspec.Struct, kw_only=True):
    """What :func:`resolve` decided: the classes and directories to load."""

    settings: ServerSettings
    model_dir: Path
    engine_cls: type[EngineBase]
    backend_cls: type[BackendBase]


class Runtime(msgspec.Struct, kw_only=True):
    plan: Plan
    backend: BackendBase
    engine: EngineBase
    service: SynthesisService
    model_name: str


def demo_model_dir(family: str) -> Path:
    """Build (once, cached) the tiny random-weight checkpoint of ``family``."""
    from flashtts_core.testing.checkpoints import FAMILIES, tiny_checkpoint_dir

    if family not in FAMILIES:
        raise PluginError(f"no demo checkpoint for {family!r}; available: {', '.join(FAMILIES)}")
    return tiny_checkpoint_dir(family)


def _detect_engine(registry: Registry, model_dir: Path, settings: ServerSettings) -> type[EngineBase]:
    if settings.engine is not None:
        return registry.load_engine(settings.engine)
    if settings.snac_path is not None:
        return registry.load_engine("orpheus")
    engines = registry.engines()
    for cls in engines:
        if cls.detect(model_dir):
            return cls
    known = ", ".join(cls.name for cls in engines) or "none"
    raise PluginError(
        f"{model_dir} is not a model directory any installed engine recognises (engines: {known}); "
        "point --model_path at a Spark-TTS-0.5B, Orpheus or MegaTTS3 download, or pass --engine"
    )


def resolve(settings: ServerSettings, registry: Registry | None = None) -> Plan:
    """Check everything that can be checked without loading weights. Raises :class:`PluginError`."""
    registry = registry or get_registry()
    backend_cls = registry.load_backend(settings.backend)
    if settings.demo is not None:
        model_dir = demo_model_dir(settings.demo)
    elif settings.model_path is None:
        raise PluginError("no model given: pass --model_path DIR (or --demo to try a tiny random-weight model)")
    else:
        model_dir = Path(settings.model_path).expanduser()
        if not model_dir.is_dir():
            raise PluginError(f"--model_path {model_dir} is not a directory")
    engine_cls = _detect_engine(registry, model_dir, settings)
    for cls in (engine_cls, backend_cls):
        reason = cls.check_available()
        if reason:
            hint = INSTALL_HINTS.get(cls.name, "") if cls.kind == "backend" else ""
            raise PluginError(f"the {cls.kind} {cls.name!r} cannot run here: {reason}" + (f" ({hint})" if hint else ""))
    return Plan(settings=settings, model_dir=model_dir, engine_cls=engine_cls, backend_cls=backend_cls)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or ``taskset``'s share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def limit_malloc_arenas(limit: int = MALLOC_ARENAS) -> bool:
    """Cap this process's glibc malloc arenas at ``limit`` (unless ``MALLOC_ARENA_MAX`` is set, which glibc has
    applied already); True when applied. Call it before threads start allocating.

    The server's threads (event loop, codec worker, encoders) allocate audio-sized buffers at the same time, glibc
    gives each contending thread an arena of its own, and what they free stays spread over all of them: at c=8 on the
    Spark demo the server's RSS grew for minutes to a ~950 MiB plateau with glibc's default (16 arenas on 2 cores),
    and to ~740 MiB with 4 (or 2), at the same throughput."""
    if "MALLOC_ARENA_MAX" in os.environ or not hasattr(os, "confstr"):
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, limit))
    except (ValueError, OSError, AttributeError):  # no such confstr name, no libc handle, no mallopt
        return False


def _llm_on_cpu(device: str) -> bool:
    """Whether ``--llm_device`` puts the LLM on the CPU: ``auto`` does when torch sees neither CUDA nor MPS (the
    torch backend's own resolution)."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    try:
        import torch
    except ImportError:
        return True
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def _codec_on_cpu(device: str) -> bool:
    """Whether a tokenizer/detokenizer device setting puts codec work on the CPU, resolved as the engines resolve
    it (:func:`flashtts_core.engines.common.resolve_device`), so the split cannot disagree with where they run."""
    from flashtts_core.engines.common import resolve_device

    try:
        return resolve_device(device) == "cpu"
    except ImportError:  # no torch: no torch codec either
        return False


def cpu_thread_split(settings: ServerSettings) -> tuple[int | None, int | None]:
    """Intra-op threads of the LLM backend and of the engine's codec work: ``None`` leaves a runtime's default.

    The LLM scheduler and the codec worker run at the same time in different threads. When both are on the CPU
    and each lets torch use every core, their thread teams fight over the same cores (OpenMP teams spin while they
    wait for each other): on a 2-core box, one thread each gave 1.6x the throughput of two each. So they split the
    budget (``--cpu_threads``, default: the CPUs this process may use), the LLM taking the larger half. When only
    one of them is on the CPU it gets an explicit ``--cpu_threads`` whole, or keeps its runtime's default."""
    total = settings.cpu_threads or available_cpus()
    llm_cpu = _llm_on_cpu(settings.llm_device)
    codec_cpu = _codec_on_cpu(settings.detokenizer_device) or _codec_on_cpu(settings.tokenizer_device)
    if llm_cpu and codec_cpu:
        llm = (total + 1) // 2 if total > 1 else 1
        return llm, max(1, total - llm)
    explicit = settings.cpu_threads
    return (explicit if llm_cpu else None), (explicit if codec_cpu else None)


def role_dir_for(plan: Plan, scratch: Path | None = None) -> Path | None:
    """``--role_dir``, else the engine family's default. A demo of a family without built-in voices (``--demo mega``)
    gets a copy of its tiny role in ``scratch`` instead, so that it has a voice to speak with."""
    if plan.settings.role_dir is not None:
        return Path(plan.settings.role_dir).expanduser()
    if plan.settings.demo is not None and scratch is not None:
        from flashtts_core.testing.checkpoints import demo_roles

        roles = demo_roles(plan.settings.demo)
        if roles is not None:
            target = scratch / "roles"
            shutil.copytree(roles, target)
            return target
    default = plan.engine_cls.default_role_dir()
    return Path(default) if default is not None else None


async def _start(backend: BackendBase, engine: EngineBase, model_dir: Path) -> None:
    """Start the backend, then the engine; at the same time when the backend loads in another process (the engine's
    codec loads while the worker imports and loads the LLM). Either failure is raised after both have finished, so
    the caller's shutdown finds neither half-started."""
    logger.info("loading the %s backend from %s", backend.name, backend.config.model_dir)
    if not backend.loads_out_of_process:
        await backend.startup()
        logger.info("loading the %s engine from %s", engine.name, model_dir)
        await engine.startup()
        return
    logger.info("loading the %s engine from %s (while the backend loads)", engine.name, model_dir)
    results = await asyncio.gather(backend.startup(), engine.startup(), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


@asynccontextmanager
async def open_runtime(plan: Plan, *, warmup: bool | None = None) -> AsyncIterator[Runtime]:
    """Load backend, engine and voices; shut them down on exit (also after a failed start)."""
    s = plan.settings
    llm_threads, codec_threads = cpu_thread_split(s)
    options = dict(s.backend_options)
    if s.cache_implementation is not None and plan.backend_cls.name == "torch":
        options.setdefault("cache_implementation", s.cache_implementation)
    backend = plan.backend_cls(
        BackendConfig(
            model_dir=str(plan.engine_cls.llm_dir(plan.model_dir)),
            max_model_len=s.max_length,
            dtype=s.torch_dtype,
            device=s.llm_device,
            seed=s.seed,
            max_batch_size=s.llm_batch_size,
            gpu_memory_utilization=s.llm_gpu_memory_utilization,
            attn_implementation=s.llm_attn_implementation,
            cpu_threads=llm_threads,
            options=options,
        )
    )
    engine_options = dict(s.engine_options)
    for key in ("lang", "snac_path", "wav2vec_attn_implementation"):
        value = getattr(s, key)
        if value is not None and key in plan.engine_cls.Options.__struct_fields__:
            engine_options.setdefault(key, value)
    if s.fix_voice and "fix_voice" in plan.engine_cls.Options.__struct_fields__:
        engine_options.setdefault("fix_voice", True)
    engine = plan.engine_cls(
        EngineConfig(
            model_dir=str(plan.model_dir),
            device=s.tokenizer_device,
            detokenizer_device=s.detokenizer_device,
            dtype=s.torch_dtype,
            seed=s.seed,
            batch_size=s.batch_size,
            wait_timeout=s.wait_timeout,
            state_dir=s.state_dir,
            cpu_threads=codec_threads,
            options=engine_options,
        ),
        backend,
    )
    scratch: Path | None = None  # a demo's copy of its roles, removed at exit
    try:
        await _start(backend, engine, plan.model_dir)
        info = engine.info
        if s.demo is not None:
            scratch = Path(tempfile.mkdtemp(prefix="flashtts-demo-"))
        voices = VoiceStore(
            role_dir_for(plan, scratch) if info.supports_cloning else None,
            engine=engine.name,
            fingerprint=engine.fingerprint,
            prepare=engine.prepare_voice,
            builtin=frozenset(v.name for v in info.builtin_voices),
        )
        await voices.load()
        service = SynthesisService(engine, voices, max_queue=s.max_queue)
        if s.warmup if warmup is None else warmup:
            await engine.warmup()
        yield Runtime(
            plan=plan, backend=backend, engine=engine, service=service, model_name=s.model_name or engine.name
        )
    finally:
        await engine.shutdown()
        await backend.shutdown()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
