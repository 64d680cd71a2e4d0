"""Fixtures of the MegaTTS3 engine tests: the cached tiny checkpoint, the tiny role, one running torch backend + engine.

The engine is started once per session with ``asyncio.run`` (not inside a test's event loop): the torch backend and
the engine's model queue work from any loop, so each async test can use it from its own loop. torch runs on one
thread: the tiny models gain nothing from more, and on a shared CPU a thread pool only adds contention.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from flashtts_core.engines.mega.engine import MegaEngine
    from flashtts_core.plugins.types import VoicePrompt


def start_engine(model_dir: Path, *, config: Mapping[str, Any] | None = None, **engine_options: Any) -> MegaEngine:
    """A started torch backend (on ``g2p/``, CPU) + MegaTTS3 engine (stop it with :func:`stop_engine`).

    ``config`` overrides :class:`EngineConfig` fields (the engine's models default to the CPU); the keyword arguments
    are engine options."""
    from flashtts_torch import TorchBackend

    from flashtts_core.engines.mega.engine import MegaEngine
    from flashtts_core.plugins.types import BackendConfig, EngineConfig

    backend = TorchBackend(
        BackendConfig(model_dir=str(MegaEngine.llm_dir(model_dir)), max_model_len=4096, device="cpu")
    )
    fields: dict[str, Any] = {"device": "cpu", "detokenizer_device": "cpu", **(config or {})}
    engine = MegaEngine(EngineConfig(model_dir=str(model_dir), options=engine_options, **fields), backend)

    async def start() -> None:
        await backend.startup()
        await engine.startup()

    asyncio.run(start())
    return engine


def stop_engine(engine: MegaEngine) -> None:
    async def stop() -> None:
        await engine.shutdown()
        await engine.backend.shutdown()

    asyncio.run(stop())


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mega_dir() -> Path:
    """The cached tiny MegaTTS3 checkpoint; treat as read-only."""
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from flashtts_core.testing.tiny_mega import tiny_mega_dir

    return tiny_mega_dir()


@pytest.fixture(scope="session")
def mega_role_dir() -> Path:
    """A role directory with one role, ``tiny`` (``tiny.wav`` 1 s + ``tiny.npy`` (1, 39, 32))."""
    from flashtts_core.testing.tiny_mega import tiny_mega_role_dir

    return tiny_mega_role_dir()


@pytest.fixture(scope="session")
def mega_reference(mega_role_dir: Path) -> tuple[bytes, bytes]:
    """``(wav bytes, npy bytes)`` of the tiny role."""
    folder = mega_role_dir / "tiny"
    return (folder / "tiny.wav").read_bytes(), (folder / "tiny.npy").read_bytes()


@pytest.fixture(scope="session")
def mega_engine(mega_dir: Path) -> Iterator[MegaEngine]:
    """A started engine on the tiny checkpoint."""
    pytest.importorskip("flashtts_torch")
    engine = start_engine(mega_dir)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="session")
def mega_prompt(mega_engine: MegaEngine, mega_reference: tuple[bytes, bytes]) -> VoicePrompt:
    """The tiny role's voice prompt (prepared once)."""
    from flashtts_core.plugins.types import ReferenceAudio

    wav, npy = mega_reference
    return asyncio.run(mega_engine.prepare_voice(ReferenceAudio(data=wav, latent=npy)))
