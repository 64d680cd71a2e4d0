"""Content-addressed, race-safe cache for generated test artefacts (tiny checkpoints).

Tiny random-weight models are cheap but not free to build (a Spark LLM with its 13.5k-token tokenizer takes about a
second), and the same few variants are needed by many tests and by ``flashtts serve --demo``. ``cached_build`` names
each artefact after a hash of its build parameters and of :data:`BUILDER_VERSION`, so:

* a second request with the same parameters reuses the directory (no rebuild, no lock file);
* changing a builder's output format only needs a ``BUILDER_VERSION`` bump to invalidate every old entry;
* concurrent builders (pytest-xdist workers, two servers) never see a half-written directory: each builds into its
  own temporary directory beside the target and publishes it with one ``os.replace``. ``os.replace`` of a directory
  onto an existing non-empty directory fails, so the loser of a race discards its copy and uses the winner's.

The cache root is ``$FLASHTTS_CACHE_DIR`` when set, else ``~/.cache/flashtts/tiny``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ("BUILDER_VERSION", "CACHE_DIR_ENV", "cache_key", "cache_root", "cached_build")

logger = logging.getLogger(__name__)

#: Bump whenever any builder's output changes for the same parameters (file set, weights, tokenizer layout).
BUILDER_VERSION = "1"

#: Environment variable that overrides the cache root.
CACHE_DIR_ENV = "FLASHTTS_CACHE_DIR"


def cache_root() -> Path:
    """Return the cache root: ``$FLASHTTS_CACHE_DIR`` or ``~/.cache/flashtts/tiny`` (not created here)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flashtts" / "tiny"


def cache_key(kind: str, params: Mapping[str, object]) -> str:
    """Return ``<kind>-<16 hex digits>``: a stable hash of ``params`` and :data:`BUILDER_VERSION`.

    ``params`` must be JSON-serialisable after ``str()`` of unknown leaves (paths, enums); key order does not matter.
    """
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"cache kind must be a plain, non-hidden name, got {kind!r}")
    payload = json.dumps(
        {"kind": kind, "builder_version": BUILDER_VERSION, "params": dict(params)},
        sort_keys=True,
        default=str,
        ensure_ascii=True,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    return f"{kind}-{digest[:16]}"


def cached_build(kind: str, params: Mapping[str, object], build: Callable[[Path], object]) -> Path:
    """Return the cached directory for ``(kind, params)``, building it with ``build(tmp_dir)`` on first use.

    ``build`` receives an existing, empty directory and must write everything into it; its return value is ignored.
    The directory only becomes visible at its final path once ``build`` has returned (atomic ``os.replace``).
    If ``build`` raises, the temporary directory is removed and the exception propagates.
    """
    root = cache_root()
    final = root / cache_key(kind, params)
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Hidden temp name in the same directory (same filesystem, so os.replace is atomic); unique per attempt.
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, final)
    except OSError:
        # Lost a race: another process published the same artefact first (ENOTEMPTY/EEXIST). Keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
        logger.debug("cache entry %s was built concurrently; discarded our copy", final.name)
    else:
        logger.debug("built cache entry %s", final)
    return final
