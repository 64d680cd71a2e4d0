"""Option validation and the cheap availability check of the mlx-lm backend (no mlx needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("flashtts_mlx", reason="flashtts-mlx is not installed (pip install -e plugins/flashtts-mlx)")

from flashtts_mlx import MlxBackend, MlxOptions

from flashtts_core.errors import InvalidRequestError
from flashtts_core.plugins import BackendConfig


def _config(**options: object) -> BackendConfig:
    return BackendConfig(model_dir="/nonexistent", options=options)


def test_unknown_option_names_it_and_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError) as info:
        MlxBackend(_config(prefill_step=64))
    message = info.value.message
    assert "prefill_step" in message
    assert "prefill_step_size" in message and "repetition_context_size" in message
    assert info.value.param == "backend_option"


def test_cli_strings_are_converted() -> None:
    backend = MlxBackend(_config(prefill_step_size="128", repetition_context_size="64", trust_remote_code="false"))
    assert backend.options == MlxOptions(prefill_step_size=128, repetition_context_size=64, trust_remote_code=False)


@pytest.mark.parametrize("options", [{"prefill_step_size": 0}, {"repetition_context_size": 0}])
def test_out_of_range_values_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError, match=next(iter(options))):
        MlxBackend(_config(**options))


def test_constructor_only_stores() -> None:
    backend = MlxBackend(_config())
    assert backend._runtime is None
    assert not backend.ready


def test_check_available_is_a_reason_or_none() -> None:
    reason = MlxBackend.check_available()
    assert reason is None or (("mlx" in reason and "pip install" in reason) or "Apple silicon" in reason)
