"""CLI behaviour that needs no model: help, plugin listing, clear start-up errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _flashtts(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flashtts_core", *args], capture_output=True, text=True, timeout=120)


def test_no_command_prints_help_and_fails() -> None:
    out = _flashtts()
    assert out.returncode == 1 and "serve" in out.stdout


def test_serve_help_lists_original_options() -> None:
    out = _flashtts("serve", "--help")
    assert out.returncode == 0
    for option in (
        "--model_path", "--backend", "--snac_path", "--role_dir", "--api_key", "--llm_device", "--tokenizer_device",
        "--detokenizer_device", "--wav2vec_attn_implementation", "--llm_attn_implementation", "--max_length",
        "--llm_gpu_memory_utilization", "--torch_dtype", "--cache_implementation", "--seed", "--batch_size",
        "--llm_batch_size", "--wait_timeout", "--host", "--port", "--demo", "--fix_voice", "--model_name",
    ):  # fmt: skip
        assert option in out.stdout, option


def test_plugins_json_shape() -> None:
    out = _flashtts("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows and all(set(r) == {"name", "kind", "distribution", "version", "status", "reason"} for r in rows)
    assert all(r["kind"] in ("backend", "engine") for r in rows)
    assert {"name": "spark", "kind": "engine"}.items() <= next(r for r in rows if r["name"] == "spark").items()


def test_missing_model_dir_is_one_clear_line(tmp_path: Path) -> None:
    out = _flashtts("serve", "--model_path", str(tmp_path / "nope"), "--backend", "torch")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("flashtts: error: --model_path")


def test_unrecognised_model_dir(tmp_path: Path) -> None:
    out = _flashtts("serve", "--model_path", str(tmp_path), "--backend", "torch")
    assert out.returncode == 2
    assert "not a model directory" in out.stderr


def test_backend_not_installed_names_the_fix(tmp_path: Path) -> None:
    for d in ("LLM", "BiCodec", "wav2vec2-large-xlsr-53"):
        (tmp_path / d).mkdir()
    out = _flashtts("serve", "--model_path", str(tmp_path), "--backend", "sglang-nonexistent")
    assert out.returncode == 2 and "unknown backend 'sglang-nonexistent'" in out.stderr


def test_model_options_reach_the_settings() -> None:
    import argparse

    from flashtts_core.cli.options import add_model_options, settings_kwargs
    from flashtts_core.config import ServerSettings

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    argv = "--engine_option time_step=16 --engine_option dtype=bfloat16 --backend_option num_threads=1 --cpu_threads 3"
    args = parser.parse_args(argv.split())
    settings = ServerSettings(**settings_kwargs(args))
    assert settings.engine_options == {"time_step": "16", "dtype": "bfloat16"}
    assert settings.backend_options == {"num_threads": "1"}
    assert settings.cpu_threads == 3 and settings.batch_size == 8
