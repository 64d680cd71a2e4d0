"""Registry rules, with entry points injected (no installs needed)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Iterator
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from flashtts_core.errors import PluginError
from flashtts_core.plugins import BackendBase, BackendCapabilities, Registry
from flashtts_core.plugins.registry import BACKEND_GROUP, ENGINE_GROUP


class _Dist:
    def __init__(self, name: str, version: str = "1.0") -> None:
        self.name = name
        self.version = version


def _ep(name: str, value: str, group: str, dist: str) -> EntryPoint:
    ep = EntryPoint(name=name, value=value, group=group)
    # EntryPoint is immutable; the dist is attached the way importlib.metadata does it.
    vars(ep)["dist"] = _Dist(dist)
    return ep


class GoodBackend(BackendBase):
    name = "good"

    async def startup(self) -> None:
        await super().startup()

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(sampling=frozenset(), max_model_len=16)

    async def _generate(self, request: Any) -> Iterator[Any]:  # pragma: no cover - never run
        yield None


class UnavailableBackend(GoodBackend):
    name = "unavail"

    @classmethod
    def check_available(cls) -> str | None:
        return "needs a CUDA GPU"


class OldApiBackend(GoodBackend):
    name = "old"
    api_version = 0


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> str:
    mod = types.ModuleType("fake_flashtts_plugins")
    mod.GoodBackend = GoodBackend  # type: ignore[attr-defined]
    mod.UnavailableBackend = UnavailableBackend  # type: ignore[attr-defined]
    mod.OldApiBackend = OldApiBackend  # type: ignore[attr-defined]
    mod.NotAClass = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod.__name__


def _registry(eps: list[EntryPoint]) -> Registry:
    def source(group: str) -> Iterable[EntryPoint]:
        return [ep for ep in eps if ep.group == group]

    return Registry(source)


def test_listing_does_not_import(fake_module: str) -> None:
    reg = _registry([_ep("ghost", "module_that_does_not_exist:X", BACKEND_GROUP, "flashtts-ghost")])
    rows = reg.list(check=False)
    assert [(r.name, r.status) for r in rows] == [("ghost", "unchecked")]
    assert "module_that_does_not_exist" not in sys.modules


def test_statuses(fake_module: str) -> None:
    reg = _registry(
        [
            _ep("good", f"{fake_module}:GoodBackend", BACKEND_GROUP, "flashtts-good"),
            _ep("unavail", f"{fake_module}:UnavailableBackend", BACKEND_GROUP, "flashtts-unavail"),
            _ep("old", f"{fake_module}:OldApiBackend", BACKEND_GROUP, "flashtts-old"),
            _ep("ghost", "module_that_does_not_exist:X", BACKEND_GROUP, "flashtts-ghost"),
            _ep("num", f"{fake_module}:NotAClass", BACKEND_GROUP, "flashtts-num"),
        ]
    )
    rows = {r.name: r for r in reg.list(check=True)}
    assert rows["good"].status == "ok" and rows["good"].reason is None
    assert rows["unavail"].status == "unavailable" and rows["unavail"].reason == "needs a CUDA GPU"
    assert rows["old"].status == "incompatible"
    assert "upgrade" in (rows["old"].reason or "")
    assert rows["ghost"].status == "broken"
    assert "flashtts-ghost" in (rows["ghost"].reason or "")
    assert rows["num"].status == "broken"
    assert {r.kind for r in rows.values()} == {"backend"}


def test_selected_broken_plugin_names_dist_cause_and_fix(fake_module: str) -> None:
    reg = _registry([_ep("ghost", "module_that_does_not_exist:X", BACKEND_GROUP, "flashtts-ghost")])
    with pytest.raises(PluginError) as info:
        reg.load_backend("ghost")
    message = info.value.message
    assert "flashtts-ghost 1.0" in message
    assert "ModuleNotFoundError" in message
    assert "pip install -U flashtts-ghost" in message


def test_unselected_broken_plugin_does_not_block_others(fake_module: str) -> None:
    reg = _registry(
        [
            _ep("good", f"{fake_module}:GoodBackend", BACKEND_GROUP, "flashtts-good"),
            _ep("ghost", "module_that_does_not_exist:X", BACKEND_GROUP, "flashtts-ghost"),
        ]
    )
    assert reg.load_backend("good") is GoodBackend


def test_duplicate_names_are_an_error(fake_module: str) -> None:
    reg = _registry(
        [
            _ep("good", f"{fake_module}:GoodBackend", BACKEND_GROUP, "flashtts-good"),
            _ep("good", f"{fake_module}:GoodBackend", BACKEND_GROUP, "flashtts-other"),
        ]
    )
    with pytest.raises(PluginError, match=r"flashtts-good 1\.0 and flashtts-other 1\.0"):
        reg.load_backend("good")
    assert {r.status for r in reg.list(check=True)} == {"broken"}


def test_api_version_mismatch_refused(fake_module: str) -> None:
    reg = _registry([_ep("old", f"{fake_module}:OldApiBackend", BACKEND_GROUP, "flashtts-old")])
    with pytest.raises(PluginError, match=r"implements backend API 0; this flashtts-core speaks backend API 1"):
        reg.load_backend("old")


def test_name_mismatch_refused(fake_module: str) -> None:
    reg = _registry([_ep("other", f"{fake_module}:GoodBackend", BACKEND_GROUP, "flashtts-good")])
    with pytest.raises(PluginError, match="declares name 'good'"):
        reg.load_backend("other")


def test_unknown_backend_gives_install_hint() -> None:
    reg = _registry([])
    with pytest.raises(PluginError, match="pip install flashtts-vllm"):
        reg.load_backend("vllm")
    with pytest.raises(PluginError, match="unknown backend 'nope'"):
        reg.load_backend("nope")


def test_allowlist(fake_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHTTS_PLUGINS", "unavail")
    reg = _registry(
        [
            _ep("good", f"{fake_module}:GoodBackend", BACKEND_GROUP, "flashtts-good"),
            _ep("unavail", f"{fake_module}:UnavailableBackend", BACKEND_GROUP, "flashtts-unavail"),
        ]
    )
    assert reg.names("backend") == ["unavail"]


def test_engine_group_is_separate(fake_module: str) -> None:
    reg = _registry([_ep("good", f"{fake_module}:GoodBackend", ENGINE_GROUP, "flashtts-good")])
    assert reg.names("backend") == []
    with pytest.raises(PluginError, match="does not derive from EngineBase"):
        reg.load_engine("good")


def test_register_programmatically() -> None:
    reg = _registry([])
    reg.register("backend", "good", GoodBackend)
    assert reg.load_backend("good") is GoodBackend
