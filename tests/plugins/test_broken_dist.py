"""A deliberately broken plugin distribution, installed for real (pip) into a private directory, is reported as
broken without breaking ``flashtts plugins`` or a server start with another backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dists" / "flashtts-broken"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("broken-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(FIXTURE)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    return target


def _run(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "flashtts_core", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_broken_plugin_is_listed_as_broken(broken_site: Path) -> None:
    out = _run(broken_site, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(out.stdout)}
    broken = rows[("backend", "broken")]
    assert broken["status"] == "broken"
    assert broken["distribution"] == "flashtts-broken" and broken["version"] == "0.0.1"
    assert "broken on purpose" in broken["reason"]
    assert rows[("backend", "torch")]["status"] == "ok"
    # --check turns a broken plugin into a failing exit status, still printing the table.
    checked = _run(broken_site, "plugins", "--check")
    assert checked.returncode == 1 and "broken" in checked.stdout


def test_selecting_the_broken_plugin_fails_with_a_clear_line(broken_site: Path, tmp_path: Path) -> None:
    out = _run(broken_site, "serve", "--backend", "broken", "--model_path", str(tmp_path))
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("flashtts: error: Error loading backend 'broken' from flashtts-broken 0.0.1")
    assert "pip install -U flashtts-broken" in last


def test_other_backend_still_serves(broken_site: Path, tmp_path: Path) -> None:
    out = _run(broken_site, "infer", "--demo", "--backend", "torch", "-i", "hello", "-o", str(tmp_path / "a.wav"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "a.wav").stat().st_size > 44
