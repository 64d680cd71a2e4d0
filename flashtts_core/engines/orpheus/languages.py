"""Orpheus languages: built-in voices, inline emotion tags and default voice per language, and language detection.

The table is the original server's ``LANG_MAP`` (reference-behaviour §3.5.3, models.md §B.7). The voices are baked
into each fine-tune (the prompt starts with ``"{voice}: "``), so the language decides which names are valid.

Detection differs from the original on purpose (reference-behaviour §2.6). The original scanned the *folder name*
for bare substrings ("de", "hi", ...), so ``orpheus-model`` became German and ``my-high-quality-run`` Hindi, and an
explicit ``--lang`` could not override it. Here:

1. an explicit ``lang`` option always wins;
2. otherwise the checkpoint's metadata is consulted, in order: ``flashtts.json`` (``{"language": "french"}``), the
   folder name, ``config.json``'s ``_name_or_path``, and the README's YAML front matter (``language:`` codes,
   ``base_model:``). Names only count when they are one of the published research-release repository names
   (``3b-fr-ft-research_release`` ...) as a *whole* path component, never a substring of an arbitrary name;
3. otherwise English (the main ``orpheus-3b-0.1-ft`` model).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashtts_core.errors import InvalidRequestError

__all__ = ("LANG_MAP", "LanguageSpec", "detect_language", "normalize_language", "resolve_language")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LanguageSpec:
    """Voices (the first is the default), informational emotion tags, and the default voice."""

    voices: tuple[str, ...]
    tags: tuple[str, ...]
    default_voice: str


def _spec(voices: tuple[str, ...], tags: tuple[str, ...]) -> LanguageSpec:
    return LanguageSpec(voices=voices, tags=tags, default_voice=voices[0])


_SPANISH = _spec(("javi", "sergio", "maria"), ("groan", "chuckle", "gasp", "resoplido", "laugh", "yawn", "cough"))
_ITALIAN = _spec(
    ("pietro", "giulia", "carlo"), ("sigh", "laugh", "cough", "sniffle", "groan", "yawn", "gemito", "gasp")
)

#: Language name → voices/tags/default, as in the original server.
LANG_MAP: dict[str, LanguageSpec] = {
    "mandarin": _spec(("长乐", "白芷"), ("嬉笑", "轻笑", "呻吟", "大笑", "咳嗽", "抽鼻子", "咳")),
    "french": _spec(
        ("pierre", "amelie", "marie"),
        ("chuckle", "cough", "gasp", "groan", "laugh", "sigh", "sniffle", "whimper", "yawn"),
    ),
    "german": _spec(
        ("jana", "thomas", "max"), ("chuckle", "cough", "gasp", "groan", "laugh", "sigh", "sniffle", "yawn")
    ),
    "korean": _spec(
        ("유나", "준서"), ("한숨", "헐", "헛기침", "훌쩍", "하품", "낄낄", "신음", "작은 웃음", "기침", "으르렁")
    ),
    "hindi": _spec(("ऋतिका",), ()),
    "spanish": _SPANISH,
    "italian": _ITALIAN,
    # The es_it research model: sorted unions, default javi (original behaviour).
    "spanish_italian": LanguageSpec(
        voices=tuple(sorted(set(_SPANISH.voices) | set(_ITALIAN.voices))),
        tags=tuple(sorted(set(_SPANISH.tags) | set(_ITALIAN.tags))),
        default_voice="javi",
    ),
    "english": _spec(
        ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe"),
        ("laugh", "chuckle", "sigh", "cough", "sniffle", "groan", "yawn", "gasp"),
    ),
}

# ISO codes and common names accepted for --lang and found in README front matter.
_ALIASES: dict[str, str] = {
    "en": "english",
    "zh": "mandarin",
    "chinese": "mandarin",
    "fr": "french",
    "de": "german",
    "ko": "korean",
    "hi": "hindi",
    "es": "spanish",
    "it": "italian",
    "es_it": "spanish_italian",
    "es-it": "spanish_italian",
}

# The published multilingual research releases (models.md §B.1): canopylabs/3b-{code}-{ft|pretrain}-research_release.
_RELEASE = re.compile(r"^3b-(fr|de|ko|hi|zh|es_it)-(?:ft|pretrain)-research_release$", re.IGNORECASE)


def normalize_language(value: str) -> str | None:
    """Canonical language name for a name or code (case-insensitive), or ``None`` if unknown."""
    key = value.strip().lower()
    if key in LANG_MAP:
        return key
    return _ALIASES.get(key)


def _from_name(name: str) -> str | None:
    """Language of a path or repo id whose *component* is a known research-release name (``org/3b-fr-ft-...``)."""
    for part in re.split(r"[/\\]", name.strip()):
        match = _RELEASE.match(part)
        if match:
            return _ALIASES[match.group(1).lower()]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (``---`` ... ``---`` at the top), or ``{}``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", text, re.DOTALL)
    if match is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _as_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        return [v for v in value if isinstance(v, str)]
    return []


def _from_card_languages(codes: list[str]) -> str | None:
    names = {normalize_language(c) for c in codes} - {None}
    if {"spanish", "italian"} <= names:
        return "spanish_italian"
    non_english = sorted(n for n in names if n != "english" and n is not None)
    if len(non_english) == 1:
        return non_english[0]
    if names == {"english"}:
        return "english"
    return None  # several languages: not decidable from the card


def detect_language(model_dir: Path) -> tuple[str, str] | None:
    """``(language, where it was found)`` from the checkpoint's metadata, or ``None``. Only small files are read."""
    model_dir = Path(model_dir)
    marker = _read_json(model_dir / "flashtts.json").get("language")
    if isinstance(marker, str) and normalize_language(marker):
        return normalize_language(marker), "flashtts.json"  # type: ignore[return-value]
    name = model_dir.resolve().name if model_dir.name in ("", ".", "..") else model_dir.name
    found = _from_name(name)
    if found:
        return found, f"the folder name {name!r}"
    name_or_path = _read_json(model_dir / "config.json").get("_name_or_path")
    if isinstance(name_or_path, str):
        found = _from_name(name_or_path)
        if found:
            return found, f"config.json _name_or_path {name_or_path!r}"
    card = _front_matter(model_dir / "README.md")
    found = _from_card_languages(_as_list(card.get("language")))
    if found:
        return found, "README.md language"
    for base in _as_list(card.get("base_model")):
        found = _from_name(base)
        if found:
            return found, f"README.md base_model {base!r}"
    return None


def resolve_language(option: str | None, model_dir: Path) -> str:
    """The language to use: the ``lang`` option if given (must be known), else detection, else ``english``."""
    detected = detect_language(model_dir)
    if option is not None:
        lang = normalize_language(option)
        if lang is None:
            known = ", ".join(LANG_MAP)
            raise InvalidRequestError(f"unknown Orpheus language {option!r}; use one of: {known}", param="lang")
        if detected is not None and detected[0] != lang:
            logger.warning("--lang %s overrides the language %s detected from %s", lang, detected[0], detected[1])
        return lang
    if detected is not None:
        logger.info("Orpheus language %s (from %s)", detected[0], detected[1])
        return detected[0]
    logger.info("Orpheus language english (no --lang and nothing in the checkpoint metadata says otherwise)")
    return "english"
