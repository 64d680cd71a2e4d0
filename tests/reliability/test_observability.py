"""Request ids, logs without content, and the Prometheus ``/metrics`` route."""

from __future__ import annotations

import base64
import logging
import re
import uuid

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flashtts_core.config import ServerSettings
from flashtts_core.errors import GenerationError
from flashtts_core.server import create_app
from flashtts_core.server.metrics import Metrics
from tests.reliability.conftest import LONG_BODY, wait_idle
from tests.server.conftest import Server
from tests.server.helpers import assert_error, reference_wav

GENERATED_ID = re.compile(r"req-[0-9a-f]{12}")
REF = reference_wav(1.0)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _metrics(server: Server, **headers: str) -> dict:
    response = server.client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


# --- request ids --------------------------------------------------------------------------------------------------


def test_every_response_has_a_request_id(server: Server) -> None:
    short = {"name": "female", "text": "Hi.", "max_tokens": 60, "response_format": "wav"}
    responses = [
        server.client.get("/health"),
        server.client.get("/no/such/route"),
        server.client.delete("/speak"),
        server.client.post("/speak", json={"name": "female"}),
        server.client.post("/speak", json={"name": "nobody", "text": "hi"}),
        server.client.post("/speak", json=short),
        server.client.get("/v1/models"),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and GENERATED_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert responses[5].status_code == 200


def test_incoming_request_id(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    mine = "client-42_a.b:c"
    for response in (
        server.client.get("/health", headers={"X-Request-Id": mine}),
        server.client.post("/speak", json={"name": "nobody", "text": "hi"}, headers={"X-Request-Id": mine}),
        server.client.post(
            "/speak",
            json={"name": "female", "text": "Hi.", "max_tokens": 60, "response_format": "wav"},
            headers={"X-Request-Id": mine},
        ),
    ):
        assert response.headers["x-request-id"] == mine
    assert any(mine in r.getMessage() and "404" in r.getMessage() for r in caplog.records)  # the failed request
    for unsafe in ("two words", "x" * 65, "-leading", "caf\u00e9", "a;b", "../x"):
        response = server.client.get("/health", headers={"X-Request-Id": unsafe.encode("utf-8")})
        assert GENERATED_ID.fullmatch(response.headers["x-request-id"]), unsafe


def test_engine_sees_a_unique_id_that_starts_with_the_clients(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    service = server.runtime.service
    original = service.synthesize

    def synthesize(request):  # type: ignore[no-untyped-def]
        seen.append(request.request_id)
        return original(request)

    monkeypatch.setattr(service, "synthesize", synthesize)
    body = {"name": "female", "text": "Hi.", "max_tokens": 60, "response_format": "wav"}
    for _ in range(2):
        assert server.client.post("/speak", json=body, headers={"X-Request-Id": "same-id"}).status_code == 200
    assert server.client.post("/speak", json=body).status_code == 200
    assert seen[0].startswith("same-id.") and seen[1].startswith("same-id.") and seen[0] != seen[1]
    assert GENERATED_ID.fullmatch(seen[2])


# --- no content in logs -------------------------------------------------------------------------------------------


def test_no_request_text_or_audio_in_logs(server: Server, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    caplog.set_level(logging.DEBUG)
    marker = f"Quokka{uuid.uuid4().hex}"
    text = f"{marker} says hello."
    ref_b64 = base64.b64encode(REF).decode()
    client = server.client
    ok = [
        client.post("/speak", json={"name": "female", "text": text, "max_tokens": 60, "response_format": "wav"}),
        client.post(
            "/v1/audio/speech",
            json={"input": text, "voice": "male", "stream_format": "sse", "max_tokens": 60, "response_format": "pcm"},
        ),
        client.post("/multi_speak", json={"text": f"<role:female>{text}<role:male>{text}", "max_tokens": 60}),
        client.post(
            "/clone_voice",
            data={"text": text, "reference_audio": ref_b64, "reference_text": marker, "max_tokens": "60"},
        ),
    ]
    assert [r.status_code for r in ok] == [200] * 4, [r.text[:200] for r in ok if r.status_code != 200]
    # Failures log more: they must not log the text either.
    assert_error(client.post("/speak", json={"name": "nobody", "text": text}), 404)
    with server.settings_changed(max_text_chars=10):
        assert_error(client.post("/speak", json={"name": "female", "text": text}), 400)
    service = server.runtime.service
    original_max = service.max_queue
    service.max_queue = 0
    try:
        assert_error(client.post("/v1/audio/speech", json={"input": text}), 503)
    finally:
        service.max_queue = original_max
    original = service.synthesize

    async def failing(request):  # type: ignore[no-untyped-def]
        chunks = original(request)
        try:
            yield await chunks.__anext__()
        finally:
            await chunks.aclose()
        raise GenerationError("the model stopped producing audio")

    monkeypatch.setattr(service, "synthesize", failing)
    streamed = client.post("/speak", json={"name": "female", "text": text, "stream": True, "max_tokens": 60})
    assert streamed.status_code == 200

    assert caplog.records, "nothing was logged at all"
    for record in caplog.records:
        message = record.getMessage()
        assert marker not in message, (record.name, message)
        assert marker not in repr(record.args)
        assert ref_b64[:64] not in message
        assert len(message) < 4000, (record.name, message[:200])
    assert marker not in caplog.text


# --- metrics -------------------------------------------------------------------------------------------------------


def test_metrics_after_requests(server: Server) -> None:
    wait_idle(server)
    before = _metrics(server)
    body = {"name": "female", "text": "Hello there.", "max_tokens": 80, "response_format": "wav"}
    assert server.client.post("/speak", json=body).status_code == 200
    assert server.client.get("/no/such/route").status_code == 404
    after = _metrics(server)
    assert _value(after, "flashtts_http_requests_total", route="/speak", method="POST", status="200") == (
        _value(before, "flashtts_http_requests_total", route="/speak", method="POST", status="200") + 1
    )
    assert _value(after, "flashtts_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert _value(after, "flashtts_time_to_first_audio_seconds_count", route="/speak") == (
        _value(before, "flashtts_time_to_first_audio_seconds_count", route="/speak") + 1
    )
    assert _value(after, "flashtts_real_time_factor_count", route="/speak") >= 1
    assert _value(after, "flashtts_audio_seconds_total", route="/speak") > _value(
        before, "flashtts_audio_seconds_total", route="/speak"
    )
    assert _value(after, "flashtts_queue_capacity") == server.runtime.service.max_queue
    assert _value(after, "flashtts_requests_in_progress") == 0
    assert _value(after, "flashtts_active_streams") == 0
    assert _value(after, "flashtts_backend_running") == 0
    assert _value(after, "flashtts_ready") == 1
    generated = _value(after, "flashtts_llm_generated_tokens_total") - _value(
        before, "flashtts_llm_generated_tokens_total"
    )
    assert generated > 0
    assert _value(after, "flashtts_llm_prompt_tokens_total") > _value(before, "flashtts_llm_prompt_tokens_total")
    assert not any("unmatched" not in str(k) and "/no/such" in str(k) for k in after)  # no raw paths as labels


def test_metrics_while_streaming(idle: Server) -> None:
    server = idle
    before = _metrics(server)
    with (
        httpx.Client(base_url=server.base_url, timeout=120) as http,
        http.stream("POST", "/speak", json={**LONG_BODY, "stream": True, "response_format": "pcm"}) as response,
    ):
        pieces = response.iter_raw()
        assert next(pieces)
        during = _metrics(server)
        assert _value(during, "flashtts_active_streams") == 1
        assert _value(during, "flashtts_requests_in_progress") == 1
    wait_idle(server)
    after = _metrics(server)
    assert _value(after, "flashtts_active_streams") == 0
    assert _value(after, "flashtts_client_disconnects_total", route="/speak") == (
        _value(before, "flashtts_client_disconnects_total", route="/speak") + 1
    )


def test_metrics_auth(server: Server) -> None:
    with server.settings_changed(api_key="sekrit"):
        assert_error(server.client.get("/metrics"), 401, None, "invalid_api_key")
        assert server.client.get("/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert server.client.get("/health").status_code == 200
        with server.settings_changed(metrics_public=True):
            assert server.client.get("/metrics").status_code == 200
    assert server.client.get("/metrics").status_code == 200  # no key configured: public


def test_each_app_has_its_own_registry() -> None:
    first, second = create_app(ServerSettings()), create_app(ServerSettings())
    m1, m2 = first.state.server.metrics, second.state.server.metrics
    assert isinstance(m1, Metrics) and m1.registry is not m2.registry
    m1.observe_response("/speak", "POST", 200, 0.1)
    text1 = anyio.run(m1.render, None).decode()
    text2 = anyio.run(m2.render, None).decode()
    assert 'flashtts_http_requests_total{method="POST",route="/speak",status="200"} 1.0' in text1
    assert "flashtts_http_requests_total{" not in text2
    assert "flashtts_ready 0.0" in text2
