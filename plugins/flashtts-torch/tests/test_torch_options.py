"""Option validation of the torch backend: happens in the constructor, before anything is loaded."""

from __future__ import annotations

import pytest
from flashtts_torch import TorchBackend, TorchOptions

from flashtts_core.errors import InvalidRequestError
from flashtts_core.plugins import BackendConfig


def _config(**options: object) -> BackendConfig:
    return BackendConfig(model_dir="/nonexistent", options=options)


def test_unknown_option_names_it_and_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError) as info:
        TorchBackend(_config(cache_implementaton="dynamic"))
    message = info.value.message
    assert "cache_implementaton" in message
    assert "cache_implementation" in message and "num_threads" in message
    assert info.value.param == "backend_option"


def test_cli_strings_are_converted() -> None:
    backend = TorchBackend(_config(num_threads="2", trust_remote_code="false"))
    assert backend.options == TorchOptions(num_threads=2, trust_remote_code=False)


@pytest.mark.parametrize("value", [None, "auto", "dynamic", "static"])
def test_supported_cache_implementations(value: str | None) -> None:
    assert TorchBackend(_config(cache_implementation=value)).options.cache_implementation == value


def test_unsupported_cache_implementation_is_refused_up_front() -> None:
    with pytest.raises(InvalidRequestError) as info:
        TorchBackend(_config(cache_implementation="offloaded"))
    message = info.value.message
    assert "offloaded" in message
    assert "dynamic" in message and "static" in message and "auto" in message


def test_static_options_from_the_cli() -> None:
    options = TorchBackend(_config(cache_implementation="static", static_cache_len="4096", cuda_graphs="false")).options
    assert options == TorchOptions(cache_implementation="static", static_cache_len=4096, cuda_graphs=False)
    assert options.cache_mode == "static"
    assert TorchOptions().cache_mode == "auto"
    assert TorchOptions().cuda_graphs is True


def test_static_cache_len_with_dynamic_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="static_cache_len"):
        TorchBackend(_config(cache_implementation="dynamic", static_cache_len=1024))


def test_static_cache_len_must_be_sensible() -> None:
    with pytest.raises(InvalidRequestError, match="static_cache_len"):
        TorchBackend(_config(static_cache_len=4))


def test_num_threads_must_be_positive() -> None:
    with pytest.raises(InvalidRequestError, match="num_threads"):
        TorchBackend(_config(num_threads=0))


def test_constructor_does_not_import_torch_work() -> None:
    """The constructor only stores: no runtime object before startup()."""
    backend = TorchBackend(_config())
    assert backend._runtime is None
    assert not backend.ready
