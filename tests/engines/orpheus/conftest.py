"""Fixtures of the Orpheus engine tests: the cached tiny checkpoint and one running torch backend + engine.

The engine is started once per session with ``asyncio.run`` (not inside a test's event loop): the torch backend and
the engine's decode batcher work from any loop, so each async test can use it from its own loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from flashtts_core.engines.orpheus.engine import OrpheusEngine
    from flashtts_core.engines.orpheus.snac import SnacDecoder

#: Frames the default tiny checkpoint emits per segment (24 × 7 tokens + end of speech).
FRAMES = 24
SAMPLES_PER_FRAME = 2048


def start_engine(model_dir: Path, **engine_options: Any) -> OrpheusEngine:
    """A started torch backend + Orpheus engine on the CPU (stop it with :func:`stop_engine`)."""
    from flashtts_torch import TorchBackend

    from flashtts_core.engines.orpheus.engine import OrpheusEngine
    from flashtts_core.plugins.types import BackendConfig, EngineConfig

    backend = TorchBackend(BackendConfig(model_dir=str(model_dir), max_model_len=4096, device="cpu"))
    engine = OrpheusEngine(
        EngineConfig(model_dir=str(model_dir), detokenizer_device="cpu", batch_size=4, options=engine_options),
        backend,
    )

    async def start() -> None:
        await backend.startup()
        await engine.startup()

    asyncio.run(start())
    return engine


def stop_engine(engine: OrpheusEngine) -> None:
    async def stop() -> None:
        await engine.shutdown()
        await engine.backend.shutdown()

    asyncio.run(stop())


@pytest.fixture(scope="session")
def orpheus_dir() -> Path:
    """The cached tiny Orpheus checkpoint (scripted Llama + tiny SNAC in ``snac/``); treat as read-only."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("snac")
    from flashtts_core.testing.tiny_orpheus import tiny_orpheus_dir

    return tiny_orpheus_dir(frames=FRAMES)


@pytest.fixture(scope="session")
def orpheus_engine(orpheus_dir: Path) -> Iterator[OrpheusEngine]:
    """A started engine on the tiny checkpoint (english)."""
    pytest.importorskip("flashtts_torch")
    engine = start_engine(orpheus_dir)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="session")
def tiny_snac(orpheus_dir: Path) -> SnacDecoder:
    """The tiny SNAC decoder, loaded on its own (reference decodes for the engine's output)."""
    from flashtts_core.engines.orpheus.snac import load_snac

    return load_snac(orpheus_dir / "snac")
