"""The voice store over HTTP: hostile names create nothing outside role_dir, and ``kill -9`` during writes
never leaves a listed voice incomplete (a subprocess server, killed and restarted)."""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from flashtts_core.plugins.types import VoicePrompt
from flashtts_core.testing.checkpoints import tiny_checkpoint_dir
from tests.server.conftest import Server
from tests.server.helpers import assert_error, decode, reference_wav

REF = reference_wav(1.0)
HOSTILE_NAMES = [
    "../evil",
    "..",
    ".",
    "a/b",
    "a\\b",
    "/abs",
    "%2e%2e",
    "%2e%2e%2fevil",
    "a\x00b",
    "\x00",
    "evil\x01",
    "tab\tname",
    "line\nbreak",
    "CON",
    "nul.txt",
    "com1",
    "x" * 65,
    " lead",
    "trail.",
    "C:evil",
    "e\u202eliv",  # right-to-left override (a format character)
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_create_nothing(server: Server, name: str) -> None:
    root = server.role_dir.parent
    before = _tree(root)
    cwd_before = set(os.listdir("."))
    ref = base64.b64encode(REF).decode()
    multipart = server.client.post("/add_speaker", data={"name": name}, files={"audio_file": ("r.wav", REF)})
    urlencoded = server.client.post("/add_speaker", data={"name": name, "audio": ref})
    for response in (multipart, urlencoded):
        assert_error(response, 400, "name")
    deleted = server.client.post("/delete_speaker", data={"name": name})
    assert deleted.status_code in (400, 404), deleted.text
    assert _tree(root) == before
    assert set(os.listdir(".")) == cwd_before


def test_raw_percent_encoded_traversal(server: Server) -> None:
    """``%2e%2e%2fevil`` in a raw urlencoded body decodes to ``../evil``: refused all the same."""
    root = server.role_dir.parent
    before = _tree(root)
    ref = base64.b64encode(REF).decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    for raw in ("%2e%2e%2fevil", "..%2Fevil", "a%00b", "%2E%2E"):
        response = server.client.post(
            "/add_speaker",
            content=f"name={raw}&audio={ref}".encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert_error(response, 400, "name")
    assert _tree(root) == before
    assert not (root / "evil").exists()


# --- kill -9 during voice writes ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Process:
    def __init__(self, role_dir: Path, log: Path) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable,
            "-m",
            "flashtts_core",
            "serve",
            "--model_path",
            str(tiny_checkpoint_dir("spark")),
            "--role_dir",
            str(role_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--llm_device",
            "cpu",
            "--tokenizer_device",
            "cpu",
            "--detokenizer_device",
            "cpu",
            "--no_warmup",
        ]
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server was not ready in {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self._log_file.close()


def _adder(base_url: str, prefix: str, acked: list[str], stop: threading.Event) -> None:
    """Adds voices one after another until stopped or the server dies; records those answered 200."""
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for i in range(200):  # bounded
            if stop.is_set():
                return
            name = f"{prefix}-{i}"
            try:
                response = http.post("/add_speaker", data={"name": name}, files={"audio_file": ("r.wav", REF)})
            except httpx.HTTPError:
                return  # killed
            if response.status_code == 200:
                acked.append(name)


def test_kill_during_voice_writes(tmp_path: Path) -> None:
    role_dir = tmp_path / "roles"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print("kill seed", seed)
    acked: list[str] = []
    for round_ in range(2):
        server = _Process(role_dir, tmp_path / f"server-{round_}.log")
        try:
            server.wait_ready()
            stop = threading.Event()
            adders = [
                threading.Thread(target=_adder, args=(server.base_url, f"r{round_}t{t}", acked, stop), daemon=True)
                for t in range(2)
            ]
            for thread in adders:
                thread.start()
            deadline = time.monotonic() + 60
            count = len(acked)
            while len(acked) == count and time.monotonic() < deadline:  # at least one write per round
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            server.kill(signal.SIGKILL)
        stop.set()
        for thread in adders:
            thread.join(timeout=30)
    assert acked, "no voice was ever added"

    # Leftovers as an interrupted write would leave them; removed (and logged) at the next start.
    (role_dir / ".tmp-planted").mkdir()
    (role_dir / ".tmp-planted" / "reference_audio.wav").write_bytes(REF[:100])
    (role_dir / ".trash-planted").mkdir()
    (role_dir / acked[0] / ".tmp-planted.json").write_bytes(b'{"engine": "spa')

    log = tmp_path / "server-final.log"
    server = _Process(role_dir, log)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            roles = http.get("/audio_roles").json()["roles"]
            listed = [r for r in roles if r not in ("female", "male")]
            on_disk = sorted(p.name for p in role_dir.iterdir() if not p.name.startswith("."))
            print(f"{len(acked)} voices acknowledged, {len(listed)} listed after 2 kills")
            assert set(acked) <= set(listed)  # an acknowledged voice survives a kill -9
            assert sorted(listed) == on_disk  # no half-written voice is visible, none is hidden
            for name in listed:
                folder = role_dir / name
                samples, rate = decode((folder / "reference_audio.wav").read_bytes(), "wav")
                assert samples.size > 0 and rate > 0
                msgspec.json.decode((folder / "flashtts_prompt.json").read_bytes(), type=VoicePrompt)
            for name in {listed[0], listed[-1]}:
                response = http.post("/speak", json={"name": name, "text": "Hello.", "response_format": "wav"})
                assert response.status_code == 200, response.text
                assert decode(response.content, "wav")[0].size > 0
    finally:
        server.kill(signal.SIGTERM)
    leftovers = [p.name for p in role_dir.rglob(".tmp-*")] + [p.name for p in role_dir.glob(".trash-*")]
    assert leftovers == []
    text = log.read_text()
    assert "removing incomplete voice leftover .tmp-planted" in text
    assert "removing incomplete file" in text
