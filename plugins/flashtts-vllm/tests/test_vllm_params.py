"""The vllm backend's translation of FlashTTS settings into vLLM arguments, options and availability: pure
functions, tested without vLLM (this file runs in the main CI venv, where vLLM is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flashtts_vllm", reason="flashtts-vllm is not installed (pip install -e plugins/flashtts-vllm)")

from flashtts_vllm import VllmBackend, VllmOptions
from flashtts_vllm.backend import (
    engine_kwargs,
    model_max_positions,
    sampling_kwargs,
    translate_output,
)

from flashtts_core.errors import GenerationError, InvalidRequestError, PluginError
from flashtts_core.plugins import BackendConfig, SamplingParams

# The AsyncEngineArgs fields the translation may produce, as in vLLM 0.32 (no swap_space: removed in V1).
_ARGS_V1 = frozenset(
    {
        "model",
        "skip_tokenizer_init",
        "max_model_len",
        "max_num_seqs",
        "gpu_memory_utilization",
        "dtype",
        "seed",
        "enforce_eager",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "kv_cache_dtype",
        "kv_cache_memory_bytes",
        "disable_log_stats",
    }
)


def _options(**values: object) -> VllmOptions:
    return VllmBackend(BackendConfig(model_dir="/m", options=values)).options


def test_engine_kwargs_from_the_common_settings() -> None:
    config = BackendConfig(
        model_dir="/models/LLM",
        max_model_len=32768,
        dtype="bfloat16",
        seed=7,
        max_batch_size=16,
        gpu_memory_utilization=0.4,
        attn_implementation="sdpa",
    )
    kwargs = engine_kwargs(config, VllmOptions(), engine_arg_names=_ARGS_V1, max_positions=4096)
    assert kwargs == {
        "model": "/models/LLM",
        "skip_tokenizer_init": True,
        "max_model_len": 4096,  # capped by the model
        "max_num_seqs": 16,
        "gpu_memory_utilization": 0.4,
        "dtype": "bfloat16",
        "seed": 7,
        "enforce_eager": False,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "disable_log_stats": True,
    }


def test_engine_kwargs_options_and_extra() -> None:
    options = _options(
        enforce_eager="true",
        tensor_parallel_size="2",
        kv_cache_dtype="fp8",
        extra='{"kv_cache_memory_bytes": 1073741824}',
    )
    config = BackendConfig(model_dir="/m", max_model_len=512, seed=None)
    kwargs = engine_kwargs(config, options, engine_arg_names=_ARGS_V1, max_positions=None)
    assert kwargs["max_model_len"] == 512
    assert "seed" not in kwargs  # vLLM's own default
    assert kwargs["enforce_eager"] is True and kwargs["tensor_parallel_size"] == 2
    assert kwargs["kv_cache_dtype"] == "fp8"
    assert kwargs["kv_cache_memory_bytes"] == 1 << 30


def test_options_this_vllm_lacks_are_refused_with_the_reason() -> None:
    config = BackendConfig(model_dir="/m")
    with pytest.raises(PluginError, match="swap_space"):
        engine_kwargs(config, _options(swap_space="4"), engine_arg_names=_ARGS_V1, max_positions=None)
    old_vllm = _ARGS_V1 | {"swap_space"}
    kwargs = engine_kwargs(config, _options(swap_space=4), engine_arg_names=old_vllm, max_positions=None)
    assert kwargs["swap_space"] == 4.0
    with pytest.raises(PluginError, match="no_such_arg"):
        engine_kwargs(config, _options(extra={"no_such_arg": 1}), engine_arg_names=_ARGS_V1, max_positions=None)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"enforce_eagr": True}, "enforce_eagr"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"extra": "[1, 2]"}, "JSON object"),
        ({"extra": "{not json"}, "JSON object"),
        ({"extra": {"max_model_len": 10}}, "--max_length"),
        ({"extra": '{"model": "other"}'}, "may not set model"),
    ],
)
def test_invalid_options_are_refused_up_front(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        VllmBackend(BackendConfig(model_dir="/m", options=options))
    assert info.value.param == "backend_option"


def test_sampling_kwargs() -> None:
    sampling = SamplingParams(
        max_tokens=100,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        min_p=0.05,
        repetition_penalty=1.1,
        stop_token_ids=(5, 3),
        allowed_token_ids=frozenset({9, 3, 5}),
    )
    kwargs = sampling_kwargs(sampling, seed=42)
    assert kwargs == {
        "n": 1,
        "max_tokens": 100,
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 50,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "seed": 42,
        "stop_token_ids": [5, 3],
        "ignore_eos": True,
        "detokenize": False,
        "skip_special_tokens": False,
        "allowed_token_ids": [3, 5, 9],
    }
    assert "allowed_token_ids" not in sampling_kwargs(sampling, seed=None, allowed_ids=False)
    greedy = sampling_kwargs(SamplingParams(temperature=0.0), seed=None)
    assert greedy["temperature"] == 0.0 and greedy["seed"] is None and "allowed_token_ids" not in greedy


@pytest.mark.parametrize(
    ("ids", "reason", "expected"),
    [
        ([1, 2], None, ((1, 2), None)),
        ([], None, ((), None)),
        ([1, 2], "length", ((1, 2), "length")),
        ([1, 7], "stop", ((1,), "stop")),  # vLLM keeps the stop id; the contract drops it
        ([7], "stop", ((), "stop")),
        ([1, 7, 2], None, ((1,), "stop")),  # a stop id ends the output even before vLLM reports it
        ([4], "abort", ((4,), "abort")),
    ],
)
def test_translate_output(ids: list[int], reason: str | None, expected: tuple[tuple[int, ...], str | None]) -> None:
    assert translate_output(ids, reason, frozenset({7})) == expected


def test_translate_output_unknown_reason_is_an_error() -> None:
    with pytest.raises(GenerationError, match="error"):
        translate_output([1], "error", frozenset())


def test_model_max_positions(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))
    assert model_max_positions(tmp_path) == 32768
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 8192}}))
    assert model_max_positions(tmp_path) == 8192
    (tmp_path / "config.json").write_text("{}")
    assert model_max_positions(tmp_path) is None


async def test_startup_refuses_a_missing_model_before_importing_vllm(tmp_path: Path) -> None:
    """A missing folder must not reach vLLM (which would take it for a hub id and try to download it)."""
    from flashtts_core.errors import CheckpointError

    backend = VllmBackend(BackendConfig(model_dir=str(tmp_path / "nope")))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        await backend.startup()
    await backend.shutdown()


@pytest.mark.parametrize("device", ["cuda:1", "mps", "tpu"])
async def test_startup_refuses_devices_vllm_cannot_select(tmp_path: Path, device: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    backend = VllmBackend(BackendConfig(model_dir=str(tmp_path), device=device))
    with pytest.raises(PluginError, match="CUDA_VISIBLE_DEVICES" if device == "cuda:1" else "invalid device"):
        await backend.startup()


def test_check_available_is_none_or_names_the_fix() -> None:
    reason = VllmBackend.check_available()
    assert reason is None or "pip install" in reason or "Linux" in reason
