"""Languages: the LANG_MAP table, ``--lang`` vs checkpoint metadata, and what the engine/service report."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from flashtts_core.engines.orpheus.languages import LANG_MAP, detect_language, normalize_language, resolve_language
from flashtts_core.errors import InvalidRequestError


def test_lang_map_matches_the_original() -> None:
    english = LANG_MAP["english"]
    assert english.voices == ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
    assert english.default_voice == "tara" and "laugh" in english.tags
    assert LANG_MAP["mandarin"].default_voice == "长乐"
    assert LANG_MAP["hindi"].tags == ()
    es_it = LANG_MAP["spanish_italian"]
    assert es_it.default_voice == "javi"
    assert es_it.voices == tuple(sorted(LANG_MAP["spanish"].voices + LANG_MAP["italian"].voices))
    assert es_it.tags == tuple(sorted(set(LANG_MAP["spanish"].tags) | set(LANG_MAP["italian"].tags)))
    assert set(LANG_MAP) == {
        "mandarin", "french", "german", "korean", "hindi", "spanish", "italian", "spanish_italian", "english",
    }  # fmt: skip


def test_normalize_accepts_names_and_codes() -> None:
    assert normalize_language("French") == "french"
    assert normalize_language("zh") == "mandarin"
    assert normalize_language("es_it") == "spanish_italian"
    assert normalize_language("klingon") is None


def _model(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize(
    "name",
    ["orpheus-model", "orpheus-3b-de", "high-quality-run", "kode", "french-ish", "3b-de-ft-research_release-copy"],
)
def test_substrings_never_select_a_language(tmp_path: Path, name: str) -> None:
    # The original picked german for anything containing "de" and hindi for "hi" (reference-behaviour §2.6).
    path = _model(tmp_path / "de" / "hi", name)
    assert detect_language(path) is None
    assert resolve_language(None, path) == "english"


@pytest.mark.parametrize(
    ("name", "lang"),
    [
        ("3b-fr-ft-research_release", "french"),
        ("3b-de-pretrain-research_release", "german"),
        ("3b-es_it-ft-research_release", "spanish_italian"),
        ("3b-zh-ft-research_release", "mandarin"),
    ],
)
def test_known_release_folder_names(tmp_path: Path, name: str, lang: str) -> None:
    assert resolve_language(None, _model(tmp_path, name)) == lang


def test_metadata_sources(tmp_path: Path) -> None:
    cfg = _model(tmp_path, "a")
    (cfg / "config.json").write_text(json.dumps({"_name_or_path": "canopylabs/3b-ko-ft-research_release"}))
    assert detect_language(cfg) == ("korean", "config.json _name_or_path 'canopylabs/3b-ko-ft-research_release'")

    marker = _model(tmp_path, "b")
    (marker / "flashtts.json").write_text(json.dumps({"language": "hi"}))
    assert resolve_language(None, marker) == "hindi"

    card = _model(tmp_path, "c")
    (card / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- es\n- it\n---\n# model\n")
    assert resolve_language(None, card) == "spanish_italian"

    base = _model(tmp_path, "d")
    (base / "README.md").write_text("---\nbase_model: canopylabs/3b-fr-pretrain-research_release\n---\n")
    assert resolve_language(None, base) == "french"

    broken = _model(tmp_path, "e")
    (broken / "README.md").write_text("---\n: [unclosed\n---\n")
    (broken / "config.json").write_text("{not json")
    assert resolve_language(None, broken) == "english"


def test_explicit_lang_wins_and_unknown_is_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _model(tmp_path, "3b-fr-ft-research_release")
    with caplog.at_level("WARNING"):
        assert resolve_language("german", path) == "german"
    assert "overrides" in caplog.text
    assert resolve_language("it", path) == "italian"
    with pytest.raises(InvalidRequestError, match=r"unknown Orpheus language 'klingon'.*english") as info:
        resolve_language("klingon", path)
    assert info.value.param == "lang"


def test_engine_info_per_language(orpheus_dir: Path) -> None:
    from flashtts_torch import TorchBackend

    from flashtts_core.engines.orpheus.engine import OrpheusEngine
    from flashtts_core.plugins.types import BackendConfig, EngineConfig

    backend = TorchBackend(BackendConfig(model_dir=str(orpheus_dir)))  # not started: info needs no weights
    info = OrpheusEngine(EngineConfig(model_dir=str(orpheus_dir), options={"lang": "fr"}), backend).info
    assert info.name == "orpheus" and info.sample_rate == 24000
    assert [v.name for v in info.builtin_voices] == ["pierre", "amelie", "marie"]
    assert {(v.kind, v.language) for v in info.builtin_voices} == {("builtin", "french")}
    assert info.default_voice == "pierre" and info.languages == ("french",) and "whimper" in info.tags
    assert info.supports_cloning is False and info.controls == frozenset()
    english = OrpheusEngine(EngineConfig(model_dir=str(orpheus_dir)), backend).info
    assert english.default_voice == "tara" and english.languages == ("english",)
    with pytest.raises(InvalidRequestError, match="known options: lang, snac_path"):
        OrpheusEngine(EngineConfig(model_dir=str(orpheus_dir), options={"language": "fr"}), backend)


def test_runtime_passes_lang_and_detects_from_metadata(orpheus_dir: Path, tmp_path: Path) -> None:
    """``--lang`` reaches the engine through the runtime; without it the folder name of a release decides."""
    pytest.importorskip("flashtts_torch")
    from flashtts_core.config import ServerSettings
    from flashtts_core.engines.orpheus.engine import OrpheusEngine
    from flashtts_core.plugins.registry import Registry
    from flashtts_core.runtime import open_runtime, resolve

    registry = Registry(source=lambda group: [])
    registry.register("engine", "orpheus", OrpheusEngine)
    from flashtts_torch import TorchBackend

    registry.register("backend", "torch", TorchBackend)
    # A copy named like the German research release (symlinks keep it cheap).
    release = tmp_path / "3b-de-ft-research_release"
    release.mkdir()
    for item in orpheus_dir.iterdir():
        (release / item.name).symlink_to(item)

    async def voices(settings: ServerSettings) -> tuple[str, list[str]]:
        plan = resolve(settings, registry)
        assert plan.engine_cls is OrpheusEngine
        async with open_runtime(plan, warmup=False) as rt:
            names = rt.service.voice_names()
            return rt.engine.info.languages[0], names

    base = {"model_path": str(release), "max_length": 1024, "llm_device": "cpu", "detokenizer_device": "cpu"}
    assert asyncio.run(voices(ServerSettings(**base))) == ("german", ["jana", "thomas", "max"])
    assert asyncio.run(voices(ServerSettings(**base, lang="korean"))) == ("korean", ["유나", "준서"])
    shutil.rmtree(release)
