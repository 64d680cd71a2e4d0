"""``--backend_option key=value`` settings of the SGLang backend."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

__all__ = ("MANAGED_SERVER_ARGS", "SglangOptions")

#: ServerArgs the backend sets itself from the common backend settings (or needs for the contract); ``extra`` may
#: not override them.
MANAGED_SERVER_ARGS: frozenset[str] = frozenset(
    {
        "model_path",
        "tokenizer_path",
        "skip_tokenizer_init",
        "context_length",
        "max_running_requests",
        "mem_fraction_static",
        "dtype",
        "random_seed",
        "enable_custom_logit_processor",
        "incremental_streaming_output",
    }
)


class SglangOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Backend-specific options; unknown keys are an error naming the known ones (typos must not pass silently).

    Each maps to the ``sglang.srt.server_args.ServerArgs`` field of the same name; ``None`` leaves SGLang's default.
    """

    tp_size: Annotated[int, Meta(ge=1, le=1024)] = 1
    # Skip CUDA graph capture: faster start, slower decoding (debugging, tests).
    disable_cuda_graph: bool = False
    # "flashinfer", "triton", "fa3", "torch_native", ...; SGLang validates the name.
    attention_backend: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    chunked_prefill_size: Annotated[int, Meta(ge=1)] | None = None
    trust_remote_code: bool = False
    # Any other ServerArgs field, passed through after checking that SGLang has it. From the command line give a
    # JSON object: --backend_option 'extra={"schedule_policy": "lpm"}'.
    extra: dict[str, Any] | str = {}

    def __post_init__(self) -> None:
        managed = sorted(MANAGED_SERVER_ARGS & self.server_extra.keys())
        if managed:
            raise ValueError(
                f"extra may not set {', '.join(managed)}: use the matching FlashTTS setting "
                "(--max_length, --llm_batch_size, --llm_gpu_memory_utilization, --torch_dtype, --seed)"
            )

    @property
    def server_extra(self) -> dict[str, Any]:
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
