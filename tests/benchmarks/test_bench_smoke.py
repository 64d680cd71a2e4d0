"""Smoke test of the benchmark entry points: each runs with its smallest settings and prints its tables.

Behaviour only — timings are never asserted (they depend on the machine and its load). The two runs start
together (each starts a server on a free loopback port) so that their start-up times overlap: about 35 s on an
idle 2-core machine, 60-80 s on a loaded one (each run imports torch and loads the tiny demo model).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240

LOAD = ["-m", "benchmarks.load", "--demo", "--concurrency", "1,2", "--rounds", "2", "--requests_per_client", "1"]
LOAD += ["--min_requests", "1", "--warmup", "0", "--max_tokens", "64"]
COMPONENTS = ["-m", "benchmarks.components", "--batches", "1", "--tokens", "50", "--repeat", "1"]
COMPONENTS += ["--audio_s", "1", "--requests", "1", "--max_tokens", "64"]


class Run:
    def __init__(self, args: list[str], tmp: Path, name: str) -> None:
        self.out = tmp / f"{name}.out"
        self.err = tmp / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=err)

    def result(self) -> str:
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"timed out after {TIMEOUT}s:\n{self.err.read_text(errors='replace')[-3000:]}")
        stdout = self.out.read_text(errors="replace")
        assert code == 0, f"exit {code}\n{stdout}\n{self.err.read_text(errors='replace')[-3000:]}"
        return stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    tmp = tmp_path_factory.mktemp("bench")
    started = {"load": Run(LOAD, tmp, "load"), "components": Run(COMPONENTS, tmp, "components")}
    yield started
    for run in started.values():
        run.stop()


def _table_rows(text: str, header_start: str) -> list[str]:
    """The body rows of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert lines[start + 1].startswith("|---")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_load_prints_a_level_table(runs: dict[str, Run]) -> None:
    out = runs["load"].result()
    rows = _table_rows(out, "| c | requests | TTFA p50 ms")
    assert len(rows) == 4  # c=1 and c=2, two rounds, interleaved
    table = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [(cells[0], cells[1]) for cells in table] == [("1", "1"), ("2", "2")] * 2
    for cells, row in zip(table, rows, strict=True):
        assert cells[-1] == "0", f"a request failed: {row}"
        assert "(derived)" in cells[6] or "(metrics)" in cells[6]
        assert re.fullmatch(r"\d+\.\d\d", cells[7])  # server CPU cores
        assert re.fullmatch(r"\d+", cells[8])  # peak RSS in MiB
    assert "# summary over 2 round(s)" in out
    summary = [[c.strip() for c in row.strip("|").split("|")] for row in _table_rows(out, "| c | audio s / wall s")]
    assert [cells[0] for cells in summary] == ["1", "2"]
    assert summary[0][2] == "1.00" and summary[0][6] == "1.00"  # the base level against itself
    for cells in summary:
        assert re.fullmatch(r"\d+\.\d\d", cells[2]) and re.fullmatch(r"\d+\.\d\d", cells[6]), cells
        # All-busy throughput: NaN when the window before the last request is under a second (as here, mostly).
        assert re.fullmatch(r"\d+\.\d\d|nan", cells[3]), cells


def test_components_prints_its_tables(runs: dict[str, Run]) -> None:
    out = runs["components"].result()
    assert len(_table_rows(out, "| batch |")) == 1
    formats = [row.strip("|").split("|")[0].strip() for row in _table_rows(out, "| format |")]
    for fmt in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
        assert fmt in formats
    assert len(_table_rows(out, "| path |")) == 2
    assert "server overhead" in out
