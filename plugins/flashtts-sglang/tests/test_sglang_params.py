"""The sglang backend without sglang: option validation, the translation into ServerArgs and sampling_params, the
streamed-output tracker and the availability check (this machine cannot install sglang)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip(
    "flashtts_sglang", reason="flashtts-sglang is not installed (pip install -e plugins/flashtts-sglang)"
)

from flashtts_sglang import SglangBackend, SglangOptions
from flashtts_sglang.backend import (
    BASE_SAMPLING_FIELDS,
    OutputTracker,
    allowed_key,
    model_max_positions,
    priority_kwargs,
    sampling_params,
    server_kwargs,
)

from flashtts_core.errors import CheckpointError, GenerationError, InvalidRequestError, PluginError
from flashtts_core.plugins import BackendConfig, SamplingParams

# ServerArgs fields of a recent SGLang (0.5.x) that the translation may produce.
_ARGS = frozenset(
    {
        "model_path",
        "skip_tokenizer_init",
        "context_length",
        "max_running_requests",
        "mem_fraction_static",
        "dtype",
        "tp_size",
        "trust_remote_code",
        "log_level",
        "random_seed",
        "disable_cuda_graph",
        "attention_backend",
        "chunked_prefill_size",
        "enable_custom_logit_processor",
        "incremental_streaming_output",
        "schedule_policy",
    }
)


def _options(**values: object) -> SglangOptions:
    return SglangBackend(BackendConfig(model_dir="/m", options=values)).options


def test_server_kwargs_from_the_common_settings() -> None:
    config = BackendConfig(
        model_dir="/models/LLM",
        max_model_len=32768,
        dtype="bfloat16",
        seed=3,
        max_batch_size=32,
        gpu_memory_utilization=0.5,
    )
    kwargs = server_kwargs(config, SglangOptions(), server_arg_names=_ARGS, max_positions=4096)
    assert kwargs == {
        "model_path": "/models/LLM",
        "skip_tokenizer_init": True,
        "context_length": 4096,  # capped by the model
        "max_running_requests": 32,
        "mem_fraction_static": 0.5,
        "dtype": "bfloat16",
        "tp_size": 1,
        "trust_remote_code": False,
        "log_level": "error",
        "random_seed": 3,
        "enable_custom_logit_processor": True,
        "incremental_streaming_output": True,
    }


def test_server_kwargs_adapt_to_older_sglang_and_pass_options() -> None:
    older = _ARGS - {"incremental_streaming_output", "enable_custom_logit_processor"}
    options = _options(
        tp_size="2", disable_cuda_graph="true", attention_backend="triton", extra='{"schedule_policy": "lpm"}'
    )
    kwargs = server_kwargs(
        BackendConfig(model_dir="/m", seed=None), options, server_arg_names=older, max_positions=None
    )
    assert "incremental_streaming_output" not in kwargs and "enable_custom_logit_processor" not in kwargs
    assert "random_seed" not in kwargs
    assert kwargs["tp_size"] == 2 and kwargs["disable_cuda_graph"] is True
    assert kwargs["attention_backend"] == "triton" and kwargs["schedule_policy"] == "lpm"
    with pytest.raises(PluginError, match="no_such_arg"):
        server_kwargs(
            BackendConfig(model_dir="/m"),
            _options(extra={"no_such_arg": 1}),
            server_arg_names=_ARGS,
            max_positions=None,
        )


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"tp": 2}, "tp_size"),  # the message lists the known options
        ({"tp_size": 0}, "tp_size"),
        ({"extra": "[]"}, "JSON object"),
        ({"extra": {"context_length": 9}}, "--max_length"),
        ({"extra": '{"random_seed": 1}'}, "may not set random_seed"),
    ],
)
def test_invalid_options_are_refused_up_front(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        SglangBackend(BackendConfig(model_dir="/m", options=options))
    assert info.value.param == "backend_option"


def test_sampling_params() -> None:
    allowed = frozenset({40, 7, 9})
    sampling = SamplingParams(
        max_tokens=64,
        temperature=0.7,
        top_k=0,
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.5,
        stop_token_ids=(2,),
        allowed_token_ids=allowed,
    )
    params = sampling_params(sampling)
    assert params == {
        "max_new_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,  # SGLang: -1 disables, 0 is refused
        "min_p": 0.02,
        "repetition_penalty": 1.5,
        "stop_token_ids": [2],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "n": 1,
        "custom_params": {"allowed_token_ids": [7, 9, 40], "allowed_key": allowed_key(allowed)},
    }
    json.dumps(params)  # custom_params must stay JSON-safe (SGLang sends them over msgpack)
    assert sampling_params(SamplingParams(top_k=20))["top_k"] == 20
    assert "custom_params" not in sampling_params(sampling, allowed_ids=False)


def test_priority_is_passed_only_to_a_priority_scheduler_in_its_order() -> None:
    """FlashTTS's 0 (first audio) must run before 1 (later audio): SGLang runs larger values first by default, so the
    value is negated, kept under schedule_low_priority_values_first, and left out without priority scheduling or
    where async_generate has no priority parameter."""
    takes = {"input_ids", "sampling_params", "stream", "rid", "priority"}
    on = {"enable_priority_scheduling": True}
    first, later = priority_kwargs(0, on, takes)["priority"], priority_kwargs(1, on, takes)["priority"]
    assert first > later
    low_first = {**on, "schedule_low_priority_values_first": True}
    assert priority_kwargs(0, low_first, takes) == {"priority": 0}
    assert priority_kwargs(1, low_first, takes) == {"priority": 1}
    assert priority_kwargs(1, {}, takes) == {}
    assert priority_kwargs(1, {"enable_priority_scheduling": False}, takes) == {}
    assert priority_kwargs(1, on, takes - {"priority"}) == {}


def test_allowed_key_is_stable_and_distinguishes_sets() -> None:
    assert allowed_key(frozenset({1, 2, 3})) == allowed_key(frozenset({3, 2, 1}))
    assert allowed_key(frozenset({1, 2, 3})) != allowed_key(frozenset({1, 2, 4}))


def test_repetition_penalty_above_sglangs_limit_is_refused_with_the_limit() -> None:
    with pytest.raises(InvalidRequestError, match=r"up to 2\.0") as info:
        sampling_params(SamplingParams(repetition_penalty=2.5))
    assert info.value.param == "repetition_penalty"


def _chunk(ids: list[int], finish: object = None) -> dict[str, object]:
    return {"output_ids": ids, "meta_info": {"id": "r", "finish_reason": finish}}


def test_tracker_turns_cumulative_outputs_into_deltas() -> None:
    tracker = OutputTracker(incremental=False, stop_ids=(9,))
    assert tracker.feed(_chunk([1])) == ((1,), None)
    assert tracker.feed(_chunk([1, 2, 3])) == ((2, 3), None)  # a slow reader may see several new ids at once
    assert tracker.feed(_chunk([1, 2, 3])) == ((), None)
    assert tracker.feed(_chunk([1, 2, 3, 4], {"type": "length", "length": 4})) == ((4,), "length")


def test_tracker_passes_incremental_outputs() -> None:
    tracker = OutputTracker(incremental=True, stop_ids=())
    assert tracker.feed(_chunk([5, 6])) == ((5, 6), None)
    assert tracker.feed(_chunk([7], {"type": "length", "length": 3})) == ((7,), "length")


@pytest.mark.parametrize("incremental", [True, False])
def test_tracker_drops_the_stop_id(incremental: bool) -> None:
    tracker = OutputTracker(incremental=incremental, stop_ids=(9, 8))
    tracker.feed(_chunk([1]))
    last = [8] if incremental else [1, 8]
    assert tracker.feed(_chunk(last, {"type": "stop", "matched": 8})) == ((), "stop")
    early = OutputTracker(incremental=True, stop_ids=(9,))
    assert early.feed(_chunk([1, 9, 2])) == ((1,), "stop")


def test_tracker_finish_reasons() -> None:
    assert OutputTracker(incremental=True, stop_ids=()).feed(_chunk([], {"type": "abort"})) == ((), "abort")
    with pytest.raises(InvalidRequestError, match="too long"):
        OutputTracker(incremental=True, stop_ids=()).feed(
            _chunk([], {"type": "abort", "message": "input too long", "status_code": 400})
        )
    with pytest.raises(GenerationError, match="weird"):
        OutputTracker(incremental=True, stop_ids=()).feed(_chunk([], {"type": "weird"}))


def test_seed_is_not_declared() -> None:
    """SGLang samples from one engine-wide generator: per-request seeds are not honoured, so not declared."""
    assert "seed" not in BASE_SAMPLING_FIELDS


def test_model_max_positions(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert model_max_positions(tmp_path) == 2048


async def test_startup_refuses_a_missing_model_before_importing_sglang(tmp_path: Path) -> None:
    backend = SglangBackend(BackendConfig(model_dir=str(tmp_path / "nope")))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        await backend.startup()
    await backend.shutdown()
    assert not backend.ready


def test_check_available_names_the_gpu_requirement() -> None:
    reason = SglangBackend.check_available()
    assert reason is None or "CUDA GPU" in reason


def test_check_available_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from flashtts_sglang import SglangBackend; SglangBackend.check_available(); "
        "print(sorted(m for m in ('torch', 'sglang', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
