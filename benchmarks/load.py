"""End-to-end load test of the real HTTP server: streaming TTFA, RTF and throughput against concurrency.

Starts ``flashtts serve`` as a subprocess on 127.0.0.1 (a free port), waits for ``/ready``, then drives N concurrent
*streaming* clients (``POST /v1/audio/speech``, ``response_format=pcm``, ``stream=true``) over a fixed set of English
and Chinese sentences. Each concurrency level runs a fixed number of requests (``--requests_per_client`` × c, at least
``--min_requests``, at most ``--max_requests``) in a closed loop: c clients, each sending its next request when
the previous one ended. The server is stopped at the end (also on Ctrl-C or an error). Loopback only.

Per level: time to first audio (first non-empty body chunk) p50/p95, RTF (request wall time / audio seconds, p50),
aggregate audio seconds per wall second, LLM tokens/s (from the server's ``/metrics`` when it exposes a generated-
tokens counter, else derived from the audio: Spark 50 semantic tokens per audio second, Orpheus 82), peak server RSS
(psutil, sampled every 100 ms) and errors by HTTP status or exception.

``--rounds R`` runs the list of levels R times, interleaved, and ends with a summary: per level the median over rounds
of throughput and TTFA p50, and of their ratios to the first level of the same round (a shared machine drifts by
tens of percent over minutes; neighbouring measurements drift together).

``--sequential N`` runs N requests one after the other instead (after ``--warmup`` requests) and reports the
server's RSS after warm-up and at the end (leak check).

    python -m benchmarks.load --demo --concurrency 1,2,4,8,16
    python -m benchmarks.load --demo --concurrency 1,8 --rounds 3 --requests_per_client 10 --max_requests 80
    python -m benchmarks.load --demo --sequential 500 --max_tokens 64
    python -m benchmarks.load --model_path Spark-TTS-0.5B --llm_batch_size 16 --batch_size 8 --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

#: Fixed text set: short and longer English and Chinese sentences (cycled through by every client).
TEXTS: tuple[str, ...] = (
    "Hello there, how are you today?",
    "身临其境，换新体验。",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "今天天气很好，我们一起去公园散步吧，顺便看看湖边新开的花。",
    "Streaming speech synthesis sends the first audio long before the whole sentence has been generated, "
    "which is what makes a voice assistant feel responsive.",
    "人工智能语音合成技术正在快速发展，越来越多的应用开始使用自然流畅的合成语音。",
)

#: LLM tokens per second of audio when the server exposes no token counter (peers.md §3.1).
TOKENS_PER_AUDIO_SECOND = {"spark": 50, "orpheus": 82}

_TOKEN_COUNTER = re.compile(r"^(\w*(?:generat\w*_tokens|tokens_generated)\w*)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$")


# --- the server process --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(args: argparse.Namespace, port: int) -> list[str]:
    """``flashtts serve`` with the benchmark's pass-through options."""
    script = Path(sys.executable).with_name("flashtts")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "flashtts_core"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--log_level", args.log_level]
    if args.model_path:
        cmd += ["--model_path", args.model_path]
    else:
        cmd += ["--demo", args.demo or "spark"]
    cmd += ["--backend", args.backend]
    for name in ("llm_batch_size", "batch_size", "wait_timeout", "llm_device", "detokenizer_device", "torch_dtype"):
        value = getattr(args, name, None)
        if value is not None:
            cmd += [f"--{name}", str(value)]
    for extra in args.server_arg or ():
        cmd += extra.split()
    return cmd


class ServerStartError(RuntimeError):
    """The server exited or was not ready in time; the message ends with its log tail."""


class Server:
    """``flashtts serve`` in a subprocess; a context manager that always stops it."""

    def __init__(self, args: argparse.Namespace, *, startup_timeout: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = serve_command(args, self.port)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="flashtts-bench-", suffix=".log", delete=False)  # noqa: SIM115
        self.load_s = 0.0
        self._started = 0.0

    def start(self) -> None:
        """Launch the process without waiting (see :meth:`wait_ready`)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._started = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> None:
        """Block until ``/ready`` answers 200; raise (with the server's log) if it exits or takes too long."""
        try:
            self._wait_ready(self._started)
        except BaseException:
            self.stop()
            raise
        self.load_s = time.perf_counter() - self._started

    def __enter__(self) -> Server:
        if self.proc is None:
            self.start()
        self.wait_ready()
        return self

    def _wait_ready(self, start: float) -> None:
        if self.proc is None:
            raise ServerStartError("the server is not running")
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.perf_counter() - start > self.startup_timeout:
                    waited = f"{self.startup_timeout:.0f}s"
                    raise ServerStartError(f"the server was not ready after {waited}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return
                time.sleep(0.25)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn: graceful shutdown (runs the lifespan exit)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RssSampler:
    """Samples the RSS of a process (and its children) in a thread; ``peak`` is the maximum since ``reset``.

    Uses psutil; without it, falls back to ``/proc/<pid>`` (Linux), else reports 0. Children count: the torch
    backend decodes in a worker process of the server."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        try:
            import psutil
        except ImportError:
            self._proc = None
        else:
            self._proc = psutil.Process(pid)
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak = 0

    def current(self) -> int:
        if self._proc is None:
            return sum(_proc_rss(pid) for pid in _proc_tree(self._pid))
        import psutil

        try:
            total = self._proc.memory_info().rss
            for child in self._proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return total
        except psutil.Error:
            return 0

    def reset(self) -> None:
        self.peak = self.current()

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and its live children (all their threads)."""
        if self._proc is None:
            return sum(_proc_cpu(pid) for pid in _proc_tree(self._pid))
        import psutil

        total = 0.0
        try:
            processes = [self._proc, *self._proc.children(recursive=True)]
        except psutil.Error:
            return 0.0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                t = process.cpu_times()
                total += float(t.user + t.system)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> RssSampler:
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _proc_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/*/children`` (just ``pid`` where that is missing)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                queue.extend(int(child) for child in children.read_text().split())
    return found


def _proc_rss(pid: int) -> int:
    """VmRSS from ``/proc/<pid>/status`` in bytes (0 where there is no procfs)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _proc_cpu(pid: int) -> float:
    """utime + stime from ``/proc/<pid>/stat`` in seconds (0 where there is no procfs)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


# --- clients -------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    status: str  # "200", "503", or an exception name
    ttfa: float | None = None  # seconds to the first non-empty body chunk
    wall: float = 0.0
    audio_s: float = 0.0
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (perf_counter time, audio s) per chunk


@dataclass
class Level:
    concurrency: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    peak_rss: int = 0
    tokens: float | None = None  # from /metrics, when available
    cpu: float = 0.0  # server CPU seconds during the level
    start: float = 0.0  # perf_counter time the level started
    busy_until: float = 0.0  # when the last request was sent: until then all c clients had a request in flight


def request_body(args: argparse.Namespace, i: int) -> dict[str, object]:
    body: dict[str, object] = {
        "input": TEXTS[i % len(TEXTS)],
        "voice": args.voice,
        "response_format": "pcm",
        "stream": True,
        "seed": args.seed + i,
    }
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> Result:
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(str(response.status_code), wall=time.perf_counter() - start)
            rate = int(response.headers.get("x-sample-rate", "24000"))
            first = None
            size = 0
            arrivals: list[tuple[float, float]] = []
            async for chunk in response.aiter_raw():
                if not chunk:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now - start
                size += len(chunk)
                arrivals.append((now, len(chunk) / 2 / rate))
            wall = time.perf_counter() - start
            return Result("200", ttfa=first, wall=wall, audio_s=size / 2 / rate, arrivals=arrivals)
    except httpx.HTTPError as exc:
        return Result(type(exc).__name__, wall=time.perf_counter() - start)


async def run_closed_loop(
    client: httpx.AsyncClient, url: str, args: argparse.Namespace, concurrency: int, total: int, offset: int
) -> tuple[list[Result], float]:
    """``concurrency`` clients share ``total`` requests; each sends its next one when the previous one ended.
    Returns the results and the time the last request was sent (until then every client had one in flight)."""
    counter = iter(range(total))
    results: list[Result] = []
    last_sent = time.perf_counter()

    async def worker() -> None:
        nonlocal last_sent
        for i in counter:
            if i == total - 1:
                last_sent = time.perf_counter()
            results.append(await one_request(client, url, request_body(args, offset + i)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, last_sent


async def read_token_counter(client: httpx.AsyncClient, url: str) -> float | None:
    """Sum of the server's generated-token counters on ``/metrics`` (Prometheus text), or None."""
    try:
        response = await client.get(f"{url}/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    total = None
    for line in response.text.splitlines():
        match = _TOKEN_COUNTER.match(line.strip())
        if match:
            total = (total or 0.0) + float(match.group(2))
    return total


# --- reporting -----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); NaN for an empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def errors_text(results: list[Result]) -> str:
    counts = Counter(r.status for r in results if r.status != "200")
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) or "0"


def _ok(level: Level) -> list[Result]:
    return [r for r in level.results if r.status == "200" and r.audio_s > 0]


def throughput_of(level: Level) -> float:
    """Audio seconds of the successful requests per wall second of the level."""
    return sum(r.audio_s for r in _ok(level)) / level.wall if level.wall else 0.0


def busy_throughput_of(level: Level) -> float:
    """Audio seconds received per wall second while all c clients had a request in flight (from the level's start
    to its last request's send): the closed loop's steady state, without the ramp-down at the end of a level, where
    fewer and fewer clients remain. NaN when that window is too short to mean anything (under a second)."""
    window = level.busy_until - level.start
    if window < 1.0:
        return float("nan")
    audio = sum(a for r in _ok(level) for t, a in r.arrivals if t <= level.busy_until)
    return audio / window


def ttfa_p50_of(level: Level) -> float:
    """Median time to first audio of the successful requests, in ms."""
    return percentile([r.ttfa * 1000 for r in _ok(level) if r.ttfa is not None], 0.5)


def level_row(level: Level, family: str) -> str:
    ok = _ok(level)
    ttfa = [r.ttfa * 1000 for r in ok if r.ttfa is not None]
    rtf = [r.wall / r.audio_s for r in ok]
    throughput = throughput_of(level)
    if level.tokens is not None:
        tokens = f"{level.tokens / level.wall:.0f} (metrics)"
    else:
        per_s = TOKENS_PER_AUDIO_SECOND.get(family)
        tokens = f"{throughput * per_s:.0f} (derived)" if per_s else "n/a"
    return (
        f"| {level.concurrency} | {len(level.results)} | {percentile(ttfa, 0.5):.0f} | {percentile(ttfa, 0.95):.0f} "
        f"| {percentile(rtf, 0.5):.2f} | {throughput:.2f} | {tokens} | {level.cpu / level.wall:.2f} "
        f"| {mib(level.peak_rss)} | {errors_text(level.results)} |"
    )


LEVEL_HEADER = (
    "| c | requests | TTFA p50 ms | TTFA p95 ms | RTF p50 | audio s / wall s | LLM tokens/s | server CPU cores "
    "| peak RSS MiB | errors |\n|---|---|---|---|---|---|---|---|---|---|"
)


def describe(server: Server, family: str, args: argparse.Namespace) -> None:
    model = args.model_path or f"--demo {args.demo or 'spark'} (tiny random weights)"
    passed = {n: getattr(args, n) for n in ("llm_batch_size", "batch_size", "wait_timeout") if getattr(args, n)}
    print(f"# server: {model}, engine={family}, backend={args.backend}, options={passed or 'defaults'}")
    print(f"# ready after {server.load_s:.1f}s (process start → /ready); pid {server.pid}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"load average at start {load:.2f}"
    )


async def server_family(client: httpx.AsyncClient, url: str) -> str:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        response = await client.get(f"{url}/server_info")
        if response.status_code == 200:
            data = response.json()
            return str(data.get("info", data)["model"])
    return "unknown"


def _ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("nan")


def summary(rounds: list[list[Level]]) -> str:
    """Per concurrency: the median over rounds of throughput and TTFA p50, and of their ratios to the first level of
    the same round. Ratios between neighbouring measurements cancel most of a shared machine's drift, which moves
    single figures by ±20 % over minutes."""
    base = rounds[0][0].concurrency
    lines = [
        f"# summary over {len(rounds)} round(s): medians; ratios against c={base} of the same round; 'all busy' = "
        "audio received while every client had a request in flight (no ramp-down at the level's end)",
        f"| c | audio s / wall s | × c={base} | all busy: audio s / wall s | × c={base} | TTFA p50 ms | × c={base} |",
        "|---|---|---|---|---|---|---|",
    ]
    figures = {"whole": throughput_of, "busy": busy_throughput_of, "ttfa": ttfa_p50_of}
    for index, level in enumerate(rounds[0]):
        pairs = [(levels[index], levels[0]) for levels in rounds]  # (this level, the round's base level)
        cells: list[str] = []
        for name, figure in figures.items():
            value = statistics.median(figure(lv) for lv, _ in pairs)
            ratio = statistics.median(_ratio(figure(lv), figure(base)) for lv, base in pairs)
            cells += [f"{value:.0f}" if name == "ttfa" else f"{value:.2f}", f"{ratio:.2f}"]
        lines.append(f"| {level.concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run_level(
    client: httpx.AsyncClient, url: str, args: argparse.Namespace, rss: RssSampler, c: int, total: int, offset: int
) -> Level:
    level = Level(c)
    before = await read_token_counter(client, url)
    rss.reset()
    cpu = rss.cpu_seconds()
    level.start = start = time.perf_counter()
    level.results, level.busy_until = await run_closed_loop(client, url, args, c, total, offset)
    level.wall = time.perf_counter() - start
    level.cpu = rss.cpu_seconds() - cpu
    level.peak_rss = max(rss.peak, rss.current())
    after = await read_token_counter(client, url)
    if before is not None and after is not None:
        level.tokens = after - before
    return level


async def concurrency_levels(server: Server, args: argparse.Namespace) -> None:
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4, max_keepalive_connections=max(args.concurrency))
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=10.0), limits=limits) as client:
        family = await server_family(client, server.url)
        describe(server, family, args)
        for i in range(args.warmup):
            await one_request(client, server.url, request_body(args, i))
        print(LEVEL_HEADER, flush=True)
        offset = 0
        rounds: list[list[Level]] = []
        with RssSampler(server.pid) as rss:
            for _ in range(args.rounds):
                levels: list[Level] = []
                rounds.append(levels)
                for c in args.concurrency:
                    total = min(args.max_requests, max(c, args.min_requests, args.requests_per_client * c))
                    level = await run_level(client, server.url, args, rss, c, total, offset)
                    offset += total
                    levels.append(level)
                    print(level_row(level, family), flush=True)
    tokens_note = (
        "LLM tokens/s: 'derived' = audio s/s × 50 (Spark semantic tokens; Orpheus ×82), without the ~38 "
        "voice tokens Spark generates per request; 'metrics' = the server's generated-token counter."
    )
    print(
        "# TTFA = first non-empty body chunk; RTF = request wall / audio s (p50); server CPU cores = CPU seconds of "
        f"the server and its worker processes / wall seconds. {tokens_note}"
    )
    if len(args.concurrency) > 1 or args.rounds > 1:
        print(summary(rounds))


async def sequential(server: Server, args: argparse.Namespace) -> None:
    n = args.sequential
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=10.0)) as client:
        family = await server_family(client, server.url)
        describe(server, family, args)
        with RssSampler(server.pid) as rss:
            for i in range(args.warmup):
                await one_request(client, server.url, request_body(args, i))
            await asyncio.sleep(0.5)
            warm = rss.current()
            rss.reset()
            print(f"# {n} sequential requests after {args.warmup} warm-up requests; RSS after warm-up {mib(warm)} MiB")
            print("| requests done | RSS MiB | growth % | latency p50 ms (last batch) | errors so far |")
            print("|---|---|---|---|---|", flush=True)
            step = max(1, n // 10)
            results: list[Result] = []
            batch: list[Result] = []
            start = time.perf_counter()
            for i in range(n):
                result = await one_request(client, server.url, request_body(args, args.warmup + i))
                results.append(result)
                batch.append(result)
                if (i + 1) % step == 0 or i + 1 == n:
                    now = rss.current()
                    p50 = percentile([r.wall * 1000 for r in batch], 0.5)
                    growth = 100 * (now - warm) / warm
                    print(f"| {i + 1} | {mib(now)} | {growth:+.1f} | {p50:.0f} | {errors_text(results)} |", flush=True)
                    batch = []
            wall = time.perf_counter() - start
            end = rss.current()
            peak = max(rss.peak, end)
    print(
        f"# RSS after warm-up {mib(warm)} MiB → end {mib(end)} MiB (growth {100 * (end - warm) / warm:+.1f} %), "
        f"peak {mib(peak)} MiB; {n} requests in {wall:.0f}s, errors: {errors_text(results)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", nargs="?", const="spark", default=None, metavar="FAMILY", help="tiny demo model (default)")
    p.add_argument("--model_path", default=None, help="a real model directory (instead of --demo)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--llm_batch_size", type=int, default=None, help="passed to flashtts serve")
    p.add_argument("--batch_size", type=int, default=None, help="codec batch size, passed to flashtts serve")
    p.add_argument("--wait_timeout", type=float, default=None, help="codec batching window, passed to flashtts serve")
    p.add_argument("--llm_device", default=None)
    p.add_argument("--detokenizer_device", default=None)
    p.add_argument("--torch_dtype", default=None)
    p.add_argument("--server_arg", action="append", help="extra 'flashtts serve' argument(s), e.g. '--max_queue 128'")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument(
        "--rounds", type=int, default=1, help="run the levels this many times, interleaved (a summary gives medians)"
    )
    p.add_argument("--requests_per_client", type=int, default=2, help="requests per level = this × c")
    p.add_argument("--min_requests", type=int, default=6, help="at least this many requests per level")
    p.add_argument("--max_requests", type=int, default=64, help="cap on the requests of one level")
    p.add_argument("--sequential", type=int, default=0, metavar="N", help="run N sequential requests (RSS growth)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (default 2; 20 with --sequential)")
    p.add_argument("--voice", default="female")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max_tokens", type=int, default=None, help="cap LLM tokens per request (shorter requests)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--startup_timeout", type=float, default=300.0)
    p.add_argument("--log_level", default="warning", choices=("debug", "info", "warning", "error"))
    args = p.parse_args()
    if args.warmup is None:
        args.warmup = 20 if args.sequential else 2
    try:
        with Server(args, startup_timeout=args.startup_timeout) as server:
            if args.sequential:
                asyncio.run(sequential(server, args))
            else:
                asyncio.run(concurrency_levels(server, args))
    except ServerStartError as exc:  # the server did not start: its log tail is in the message
        sys.exit(f"benchmarks.load: {exc}")


if __name__ == "__main__":
    main()
