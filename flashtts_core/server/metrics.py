"""Prometheus metrics of one app (``GET /metrics``), in a registry of its own.

Every app gets its own :class:`prometheus_client.CollectorRegistry` (never the process-global one), so tests and
embedders can build several apps in one process without "Duplicated timeseries" errors, and one app's numbers
never leak into another's.

What is exported (all names prefixed ``flashtts_``):

* ``http_requests_total{route,method,status}``: every response, by route *template* (``/speak``,
  ``/v1/models/{model_id:str}``; unknown paths are ``unmatched``, so a scanner cannot blow up the label set);
* ``requests_in_progress`` / ``queue_capacity``: admitted synthesis requests and ``--max_queue`` (503 beyond it);
  ``backend_running`` / ``backend_waiting``: the LLM backend's own counts; ``ready``: the model is loaded (these
  are read at scrape time);
* ``active_streams``: streamed audio responses being sent right now;
* ``time_to_first_audio_seconds{route}``: request start → first audio chunk ready (before encoding);
* ``real_time_factor{route}``: synthesis wall time / audio duration, for completed syntheses;
* ``audio_seconds_total{route}``: audio produced; ``client_disconnects_total{route}`` and
  ``request_timeouts_total{route}``: syntheses ended early.

* ``llm_prompt_tokens_total`` / ``llm_generated_tokens_total``: token ids sent to and streamed from the LLM
  backend (counted by :class:`~flashtts_core.plugins.BackendBase` for every backend; their rate is the LLM's
  tokens/s).

``/metrics`` needs the API key when ``--api_key`` is set, unless ``--metrics_public`` (a scraper without the
key); it reveals no request content either way, only counts and timings.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from flashtts_core.plugins import BackendBase
    from flashtts_core.runtime import Runtime

__all__ = ("CONTENT_TYPE", "Metrics", "SynthesisTracker")

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"

_TTFA_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The metrics of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "flashtts_http_requests",
            "HTTP responses by route template, method and status",
            ("route", "method", "status"),
            registry=r,
        )
        self.duration = Histogram(
            "flashtts_http_response_start_seconds",
            "Request start to response start (streamed audio: to the first audio)",
            ("route",),
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge("flashtts_active_streams", "Streamed audio responses being sent", registry=r)
        self.ttfa = Histogram(
            "flashtts_time_to_first_audio_seconds",
            "Request start to the first audio chunk (before encoding)",
            ("route",),
            buckets=_TTFA_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "flashtts_real_time_factor",
            "Synthesis wall time / audio duration of completed syntheses (< 1 is faster than real time)",
            ("route",),
            buckets=_RTF_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter("flashtts_audio_seconds", "Seconds of audio produced", ("route",), registry=r)
        self.disconnects = Counter(
            "flashtts_client_disconnects", "Syntheses stopped because the client went away", ("route",), registry=r
        )
        self.timeouts = Counter(
            "flashtts_request_timeouts", "Syntheses stopped by --request_timeout", ("route",), registry=r
        )
        self.in_progress = Gauge(
            "flashtts_requests_in_progress",
            "Synthesis requests admitted and not finished (503 beyond flashtts_queue_capacity)",
            registry=r,
        )
        self.capacity = Gauge("flashtts_queue_capacity", "Admission limit (--max_queue)", registry=r)
        self.backend_running = Gauge("flashtts_backend_running", "LLM sequences the backend is running", registry=r)
        self.backend_waiting = Gauge(
            "flashtts_backend_waiting", "LLM sequences queued in the backend for a batch slot", registry=r
        )
        self.ready = Gauge("flashtts_ready", "1 once the model is loaded, else 0", registry=r)
        self.llm_prompt_tokens = Counter(
            "flashtts_llm_prompt_tokens", "Prompt token ids sent to the LLM backend", registry=r
        )
        self.llm_generated_tokens = Counter(
            "flashtts_llm_generated_tokens", "Token ids generated by the LLM backend", registry=r
        )
        # Backend totals already added to the counters: the backend keeps plain ints, the counters follow them at
        # scrape time (a new backend instance starts from zero again).
        self._seen: tuple[object, int, int] = (None, 0, 0)

    def observe_response(self, route: str | None, method: str, status: int, seconds: float | None) -> None:
        label = route or UNMATCHED
        self.requests.labels(label, method, str(status)).inc()
        if seconds is not None and route:
            self.duration.labels(label).observe(seconds)

    def tracker(self, route: str, sample_rate: int, started: float | None = None) -> SynthesisTracker:
        return SynthesisTracker(self, route, sample_rate, started)

    async def render(self, runtime: Runtime | None) -> bytes:
        """The exposition text; the live gauges are read from ``runtime`` now (no bookkeeping that can drift)."""
        if runtime is None:
            self.ready.set(0)
        else:
            self.ready.set(1)
            service = runtime.service
            self.in_progress.set(service.active_requests)
            self.capacity.set(service.max_queue)
            health = await runtime.backend.health()
            self.backend_running.set(health.running)
            self.backend_waiting.set(health.waiting)
            self._follow(runtime.backend)
        return generate_latest(self.registry)

    def _follow(self, backend: BackendBase) -> None:
        """Advance the token counters to the backend's totals (from zero again for a new backend instance)."""
        owner, seen_prompt, seen_generated = self._seen
        if owner is not backend:
            seen_prompt = seen_generated = 0
        self.llm_prompt_tokens.inc(backend.prompt_tokens - seen_prompt)
        self.llm_generated_tokens.inc(backend.generated_tokens - seen_generated)
        self._seen = (backend, backend.prompt_tokens, backend.generated_tokens)


class SynthesisTracker:
    """Timings of one synthesis, fed by :func:`flashtts_core.server.responses.audio_response`."""

    __slots__ = ("_done", "_first", "_metrics", "_rate", "_route", "_samples", "_started", "_streaming")

    def __init__(self, metrics: Metrics, route: str, sample_rate: int, started: float | None) -> None:
        self._metrics = metrics
        self._route = route
        self._rate = sample_rate
        self._started = time.monotonic() if started is None else started
        self._first: float | None = None
        self._samples = 0
        self._done = False
        self._streaming = False

    def audio(self, samples: int) -> None:
        if self._first is None:
            self._first = time.monotonic()
            self._metrics.ttfa.labels(self._route).observe(self._first - self._started)
        self._samples += samples

    def stream_started(self) -> None:
        if not self._streaming:
            self._streaming = True
            self._metrics.active_streams.inc()

    def finished(self, outcome: str = "ok") -> None:
        """The synthesis ended: ``ok`` (complete), ``disconnect``, ``timeout`` or ``error``. Idempotent."""
        if self._done:
            return
        self._done = True
        if self._streaming:
            self._metrics.active_streams.dec()
        seconds = self._samples / self._rate if self._rate else 0.0
        if seconds > 0:
            self._metrics.audio_seconds.labels(self._route).inc(seconds)
        if outcome == "ok" and seconds > 0:
            self._metrics.rtf.labels(self._route).observe((time.monotonic() - self._started) / seconds)
        elif outcome == "disconnect":
            self._metrics.disconnects.labels(self._route).inc()
        elif outcome == "timeout":
            self._metrics.timeouts.labels(self._route).inc()
