"""Pure input helpers: OpenAI speed/pitch bucketing and text limits."""

from __future__ import annotations

import pytest

from flashtts_core.config import ServerSettings
from flashtts_core.errors import InvalidRequestError
from flashtts_core.server.inputs import check_text, level_from_float


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (0.25, "very_low"),
        (0.5, "very_low"),
        (0.51, "low"),
        (0.99, "low"),
        (1.0, "moderate"),
        (1.99, "moderate"),
        (2.0, "high"),
        (2.99, "high"),
        (3.0, "very_high"),
        (4.0, "very_high"),
    ],
)
def test_level_buckets(value: float, level: str) -> None:
    assert level_from_float(value) == level


def test_check_text() -> None:
    settings = ServerSettings(max_text_chars=5)
    assert check_text("hello", settings, param="input") == "hello"
    for bad in ("", "  ", "hello!"):
        with pytest.raises(InvalidRequestError) as excinfo:
            check_text(bad, settings, param="input")
        assert excinfo.value.param == "input"
