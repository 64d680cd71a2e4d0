"""Discovery of backends and engines through entry points.

Rules (each one covered by ``tests/plugins/test_registry.py``):

* Listing reads metadata only and never imports plugin code, so ``flashtts plugins`` works when a plugin
  is broken.
* Loading is lazy and per plugin: a backend module is imported only when selected or checked.
* An unselected broken plugin is a warning; a selected one stops start-up with a message naming the
  distribution, its version, the cause and the fix.
* Two distributions claiming one name is an error naming both; an API-version mismatch is refused with an
  upgrade hint.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Literal

import msgspec

from flashtts_core.errors import PluginError
from flashtts_core.plugins.base import BACKEND_API_VERSION, ENGINE_API_VERSION, BackendBase, EngineBase

__all__ = (
    "BACKEND_GROUP",
    "ENGINE_GROUP",
    "INSTALL_HINTS",
    "PluginInfo",
    "PluginKind",
    "Registry",
    "get_registry",
)

logger = logging.getLogger(__name__)

BACKEND_GROUP = "flashtts.backends"
ENGINE_GROUP = "flashtts.engines"

PluginKind = Literal["backend", "engine"]
PluginStatus = Literal["ok", "unavailable", "broken", "incompatible", "unchecked"]

# What users type → what to install. Names are those of the original server.
INSTALL_HINTS: dict[str, str] = {
    "torch": "pip install flashtts-torch",
    "llama-cpp": "pip install flashtts-llamacpp",
    "vllm": "pip install flashtts-vllm",
    "sglang": "pip install flashtts-sglang",
    "mlx-lm": "pip install flashtts-mlx",
}

_GROUPS: dict[PluginKind, str] = {"backend": BACKEND_GROUP, "engine": ENGINE_GROUP}
_BASES: dict[PluginKind, type] = {"backend": BackendBase, "engine": EngineBase}
_API: dict[PluginKind, int] = {"backend": BACKEND_API_VERSION, "engine": ENGINE_API_VERSION}


class PluginInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``flashtts plugins``; ``--json`` prints exactly these keys."""

    name: str
    kind: PluginKind
    distribution: str
    version: str
    status: PluginStatus
    reason: str | None = None


class _Entry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: PluginKind
    value: str  # "module:Class", or "" for classes registered programmatically
    distribution: str
    version: str
    cls: type | None = None


EntryPointSource = Callable[[str], Iterable[EntryPoint]]


def _default_source(group: str) -> Iterable[EntryPoint]:
    return entry_points(group=group)


class Registry:
    """Entry-point registry. ``source`` is injectable for tests (group name → entry points)."""

    def __init__(self, source: EntryPointSource | None = None) -> None:
        self._source = source or _default_source
        self._entries: dict[PluginKind, dict[str, list[_Entry]]] | None = None
        self._loaded: dict[tuple[PluginKind, str], type] = {}

    # --- discovery (metadata only) ---------------------------------------------------------------------------

    def _scan(self) -> dict[PluginKind, dict[str, list[_Entry]]]:
        if self._entries is not None:
            return self._entries
        allow = {n.strip() for n in os.environ.get("FLASHTTS_PLUGINS", "").split(",") if n.strip()}
        found: dict[PluginKind, dict[str, list[_Entry]]] = {"backend": {}, "engine": {}}
        for kind, group in _GROUPS.items():
            for ep in self._source(group):
                if kind == "backend" and allow and ep.name not in allow:
                    continue
                dist = getattr(ep, "dist", None)
                entry = _Entry(
                    name=ep.name,
                    kind=kind,
                    value=ep.value,
                    distribution=dist.name if dist is not None else "<unknown>",
                    version=dist.version if dist is not None else "?",
                )
                same = found[kind].setdefault(ep.name, [])
                # The same distribution can be seen twice (e.g. an editable install plus a path entry).
                if all(e.distribution != entry.distribution for e in same):
                    same.append(entry)
        self._entries = found
        return found

    def register(self, kind: PluginKind, name: str, cls: type, *, distribution: str = "<local>") -> None:
        """Register a class programmatically (tests, embedding applications). Replaces an existing name."""
        found = self._scan()
        found[kind][name] = [_Entry(name=name, kind=kind, value="", distribution=distribution, version="-", cls=cls)]
        self._loaded.pop((kind, name), None)

    def names(self, kind: PluginKind) -> list[str]:
        return sorted(self._scan()[kind])

    def list(self, *, check: bool = False) -> list[PluginInfo]:
        """Every plugin with its status. Without ``check`` nothing is imported (status ``unchecked``, or
        ``broken`` for a name claimed twice)."""
        rows: list[PluginInfo] = []
        for kind in ("backend", "engine"):
            for _name, entries in sorted(self._scan()[kind].items()):
                if len(entries) > 1:
                    for e in entries:
                        rows.append(self._info(e, "broken", self._duplicate_message(entries)))
                    continue
                entry = entries[0]
                if not check:
                    rows.append(self._info(entry, "unchecked", None))
                    continue
                try:
                    cls = self._load_entry(entry)
                except PluginError as exc:
                    status: PluginStatus = "incompatible" if exc.code == "incompatible" else "broken"
                    rows.append(self._info(entry, status, exc.message))
                    continue
                reason = cls.check_available()
                rows.append(self._info(entry, "unavailable" if reason else "ok", reason))
        return rows

    # --- loading ---------------------------------------------------------------------------------------------

    def load(self, kind: PluginKind, name: str) -> type:
        """Import and validate one plugin class; errors are :class:`PluginError` with the fix."""
        key = (kind, name)
        if key in self._loaded:
            return self._loaded[key]
        entries = self._scan()[kind].get(name)
        if not entries:
            raise PluginError(self._not_found_message(kind, name))
        if len(entries) > 1:
            raise PluginError(self._duplicate_message(entries))
        return self._load_entry(entries[0])

    def load_backend(self, name: str) -> type[BackendBase]:
        return self.load("backend", name)

    def load_engine(self, name: str) -> type[EngineBase]:
        return self.load("engine", name)

    def engines(self) -> list[type[EngineBase]]:
        """Every engine that loads; a broken one is logged as a warning and skipped."""
        classes: list[type[EngineBase]] = []
        for name in self.names("engine"):
            try:
                classes.append(self.load_engine(name))
            except PluginError as exc:
                logger.warning("skipping engine plugin: %s", exc.message)
        return classes

    def _load_entry(self, entry: _Entry) -> type:
        key = (entry.kind, entry.name)
        if key in self._loaded:
            return self._loaded[key]
        where = f"{entry.kind} {entry.name!r} from {entry.distribution} {entry.version}"
        cls = entry.cls
        if cls is None:
            module_name, _, attr = entry.value.partition(":")
            try:
                obj: object = importlib.import_module(module_name)
                for part in attr.split(".") if attr else ():
                    obj = getattr(obj, part)
            except Exception as exc:  # any import-time failure of third-party code
                raise PluginError(
                    f"Error loading {where}: {type(exc).__name__}: {exc}. "
                    f"Reinstall or upgrade it (pip install -U {entry.distribution}), "
                    f"or uninstall it (pip uninstall {entry.distribution})."
                ) from exc
            if not isinstance(obj, type):
                raise PluginError(f"Error loading {where}: {entry.value} is not a class")
            cls = obj
        base = _BASES[entry.kind]
        if not issubclass(cls, base):
            raise PluginError(f"Error loading {where}: {cls.__qualname__} does not derive from {base.__name__}")
        expected = _API[entry.kind]
        got = getattr(cls, "api_version", None)
        if got != expected:
            newer = isinstance(got, int) and got > expected
            fix = (
                "upgrade flashtts-core (pip install -U flashtts-core)"
                if newer
                else f"upgrade it (pip install -U {entry.distribution})"
            )
            raise PluginError(
                f"{entry.distribution} {entry.version} implements {entry.kind} API {got}; "
                f"this flashtts-core speaks {entry.kind} API {expected}: {fix}",
                code="incompatible",
            )
        if getattr(cls, "name", None) != entry.name:
            raise PluginError(f"Error loading {where}: class declares name {getattr(cls, 'name', None)!r}")
        self._loaded[key] = cls
        return cls

    # --- messages --------------------------------------------------------------------------------------------

    def _info(self, entry: _Entry, status: PluginStatus, reason: str | None) -> PluginInfo:
        return PluginInfo(
            name=entry.name,
            kind=entry.kind,
            distribution=entry.distribution,
            version=entry.version,
            status=status,
            reason=reason,
        )

    def _duplicate_message(self, entries: list[_Entry]) -> str:
        dists = " and ".join(f"{e.distribution} {e.version}" for e in entries)
        return f"{entries[0].kind} name {entries[0].name!r} is claimed by {dists}; uninstall one of them"

    def _not_found_message(self, kind: PluginKind, name: str) -> str:
        known = ", ".join(self.names(kind)) or "none installed"
        msg = f"unknown {kind} {name!r} (installed: {known})"
        if kind == "backend" and name in INSTALL_HINTS:
            msg = f"the {name!r} backend is not installed: {INSTALL_HINTS[name]}"
        elif kind == "backend":
            msg += f"; known backends: {', '.join(INSTALL_HINTS)}"
        return msg


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry over installed entry points."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry
