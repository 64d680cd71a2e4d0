"""Property-based fuzzing of the whole OpenAPI document against the real server: no input makes it answer 5xx.

Schemathesis generates valid and invalid requests for every operation of ``/openapi.json`` (a bounded number per
operation, no deadline) and sends them over loopback to the real app (uvicorn on 127.0.0.1, tiny Spark on the
torch backend). The only check is ``not_a_server_error``.

To keep the run short the schema is narrowed where a *valid* value only costs time (long texts, large
``max_tokens``, tiny segment windows); the limits on those values are tested in ``test_input_bounds``. Host names
are never looked up (no DNS traffic leaves the machine): a generated reference URL can only be an IP literal,
which the SSRF rules then judge.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from flashtts_core.config import ServerSettings
from flashtts_core.server import create_app, fetch
from flashtts_core.server.fetch import UrlFetchError
from tests.reliability.conftest import wait_idle
from tests.server.conftest import Server

MAX_EXAMPLES = 25
_CHEAP = {
    "text": {"maxLength": 48},
    "input": {"maxLength": 48},
    "max_tokens": {"maximum": 48},
    "length_threshold": {"minimum": 16},
    "window_size": {"minimum": 16},
}


def _narrowed(document: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(document)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict):
                for name, extra in _CHEAP.items():
                    if isinstance(properties.get(name), dict):
                        _constrain(properties[name], extra)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(document)
    return document


def _constrain(prop: dict[str, Any], extra: dict[str, Any]) -> None:
    variants = prop.get("oneOf") or prop.get("anyOf")
    if variants:
        for variant in variants:
            if variant.get("type") in ("string", "integer"):
                variant.update(extra)
    else:
        prop.update(extra)


schema = schemathesis.openapi.from_dict(_narrowed(create_app(ServerSettings()).openapi_schema.to_schema()))
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    async def resolve(host: str, port: int, *, allow_private: bool, param: str) -> str:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise UrlFetchError(f"the host of the {param} URL could not be resolved ({host!r})", param=param) from None
        if not allow_private and not fetch.is_public_address(ip):
            raise fetch.UrlNotAllowedError(f"the {param} URL points to a non-public address", param=param)
        raise UrlFetchError(f"the {param} URL could not be downloaded (offline test)", param=param)

    monkeypatch.setattr(fetch, "_resolve", resolve)


@pytest.fixture
def target(server: Server, no_dns: None) -> Server:
    wait_idle(server)
    return server


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
    database=None,  # nothing written to the working tree
    derandomize=False,
)
def test_no_server_errors(case: schemathesis.Case, target: Server) -> None:
    response = case.call(base_url=target.base_url, timeout=120)
    case.validate_response(response, checks=[not_a_server_error])
