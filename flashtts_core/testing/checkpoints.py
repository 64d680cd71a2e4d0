"""Complete tiny random-weight checkpoints in the published directory layout, cached on disk.

Used by the engine tests and by ``flashtts serve --demo`` / ``flashtts infer --demo``: one call returns a directory
that ``--model_path`` accepts exactly like a real download. Each family combines its codec builder and its (scripted)
LLM builder into one root, built once per parameter set through :func:`flashtts_core.testing.cache.cached_build`
(atomic publish, safe under concurrent builders).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashtts_core.testing.cache import cached_build

__all__ = ("FAMILIES", "demo_roles", "tiny_checkpoint_dir")

logger = logging.getLogger(__name__)


def _spark(semantic_tokens: int = 150, seed: int = 0, scripted: bool = True) -> Path:
    """Spark-TTS-0.5B layout: ``config.yaml``, ``BiCodec/``, ``wav2vec2-large-xlsr-53/``, ``LLM/``.

    ``semantic_tokens`` is the length of the scripted completion (0 = a degenerate model that never produces speech,
    for error-path tests); ``scripted=False`` gives an LLM with plain random weights."""

    def build(root: Path) -> None:
        from flashtts_core.testing.tiny_spark import build_tiny_spark_codec
        from flashtts_core.testing.tiny_spark_llm import build_tiny_spark_llm

        build_tiny_spark_codec(root, seed=seed)
        build_tiny_spark_llm(root / "LLM", semantic_tokens=semantic_tokens, seed=seed, scripted=scripted)

    params = {"semantic_tokens": semantic_tokens, "seed": seed, "scripted": scripted}
    return cached_build("spark-checkpoint", params, build)


def _orpheus(**params: Any) -> Path:
    """Orpheus layout: a Hugging Face Llama folder with the SNAC decoder in ``snac/``."""
    from flashtts_core.testing.tiny_orpheus import tiny_orpheus_dir

    return tiny_orpheus_dir(**params)


def _mega(**params: Any) -> Path:
    """MegaTTS3 layout: ``aligner_lm/``, ``diffusion_transformer/``, ``duration_lm/``, ``g2p/``, ``wavvae/``."""
    from flashtts_core.testing.tiny_mega import tiny_mega_dir

    return tiny_mega_dir(**params)


_FAMILIES: dict[str, Callable[..., Path]] = {"spark": _spark, "orpheus": _orpheus, "mega": _mega}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def tiny_checkpoint_dir(family: str = "spark", **params: Any) -> Path:
    """Return the cached tiny checkpoint directory of ``family`` (built on first use, about a second or two).

    ``params`` are passed to the family's builder (spark: ``semantic_tokens``, ``seed``, ``scripted``; orpheus: see
    :func:`flashtts_core.testing.tiny_orpheus.tiny_orpheus_dir`; mega: ``seed``)."""
    builder = _FAMILIES.get(family)
    if builder is None:
        raise ValueError(f"no tiny checkpoint for {family!r}; available: {', '.join(sorted(_FAMILIES))}")
    return builder(**params)


def demo_roles(family: str) -> Path | None:
    """A cached role folder for ``flashtts serve --demo FAMILY`` when the family has no built-in voices (MegaTTS3:
    one role, ``tiny``, with its wav and latent), else ``None``. Callers copy it before writing to it."""
    if family != "mega":
        return None
    from flashtts_core.testing.tiny_mega import tiny_mega_role_dir

    return tiny_mega_role_dir()
