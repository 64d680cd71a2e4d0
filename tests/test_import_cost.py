"""``import flashtts_core``, the plugin contract and ``flashtts --help`` must not pull in heavy runtimes."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "av", "vllm", "llama_cpp", "mlx", "sglang", "litestar", "numpy")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_import_is_light() -> None:
    assert _loaded_after("import flashtts_core, flashtts_core.plugins, flashtts_core.errors") == set()


def test_engine_classes_are_light() -> None:
    assert _loaded_after("import flashtts_core.engines.spark") == set()


def test_cli_help_is_light() -> None:
    code = "import sys\nfrom flashtts_core.cli import build_parser\nbuild_parser().format_help()"
    assert _loaded_after(code) == set()


def test_flashtts_help_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "flashtts_core", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "serve" in out.stdout and "infer" in out.stdout and "plugins" in out.stdout
