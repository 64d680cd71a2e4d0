"""pytest plugin of the FlashTTS test kit: markers, ``--run-gpu`` and tiny-checkpoint fixtures.

Loaded with ``pytest_plugins = ["flashtts_core.testing.pytest_plugin"]`` in a repository's root ``conftest.py``
(this repository and third-party plugin repositories alike). Deliberately not a ``pytest11`` entry point: that would
inject these fixtures and options into every pytest run of every environment that has flashtts-core installed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

__all__ = (
    "MARKERS",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "tiny_llama_dir",
    "tiny_qwen2_dir",
)

logger = logging.getLogger(__name__)

MARKERS: dict[str, str] = {
    "gpu": "needs a CUDA GPU (run with --run-gpu on a GPU machine)",
    "slow": "slow tests (dist installs, source builds)",
    "browser": "drives headless Chromium",
}

# Parameters of the shared tiny checkpoints (head_dim 32: the smallest that every runtime's kernels accept).
_TINY_PARAMS: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "seed": 0,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flashtts")
    group.addoption(
        "--run-gpu",
        action="store_true",
        default=False,
        help="run tests marked gpu (they are skipped otherwise, and also when no CUDA device is visible)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # A repository may already list the markers in its ini/pyproject (this one does); register only what is
    # missing so `pytest --markers` shows each once and --strict-markers accepts them either way.
    declared = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    for name, description in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {description}")


def _gpu_skip_reason(config: pytest.Config) -> str | None:
    if not config.getoption("--run-gpu"):
        return "needs a CUDA GPU: pass --run-gpu on a machine that has one"
    if importlib.util.find_spec("torch") is None:
        return "--run-gpu given but torch is not installed, so CUDA cannot be detected"
    import torch  # only when GPU tests were asked for: torch takes seconds to import

    if not torch.cuda.is_available():
        return "--run-gpu given but torch sees no CUDA device"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _gpu_skip_reason(config)
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen2_dir() -> Path:
    """A random-weight Qwen2 checkpoint + tokenizer (HF layout), built once and cached across sessions."""
    from flashtts_core.testing.cache import cached_build
    from flashtts_core.testing.tiny_llm import build_tiny_qwen2

    return cached_build("tiny-qwen2", _TINY_PARAMS, lambda out: build_tiny_qwen2(out, **_TINY_PARAMS))


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """A random-weight Llama (Llama 3 tokenizer and rope scaling) checkpoint, built once and cached."""
    from flashtts_core.testing.cache import cached_build
    from flashtts_core.testing.tiny_llm import build_tiny_llama

    return cached_build("tiny-llama", _TINY_PARAMS, lambda out: build_tiny_llama(out, **_TINY_PARAMS))
