"""Server settings: one Struct holding every ``flashtts serve`` option (names and defaults of the original
server document, plus ours). The CLI builds it; tests build it directly."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = ("BACKEND_NAMES", "ServerSettings")

# The names users type in --backend (those of the original server).
BACKEND_NAMES = ("torch", "llama-cpp", "vllm", "sglang", "mlx-lm")

Dtype = Literal["auto", "float16", "bfloat16", "float32"]
AttnImpl = Literal["eager", "sdpa", "flash_attention_2"]


class ServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # --- model ------------------------------------------------------------------------------------------------
    model_path: str | None = None
    backend: str = "torch"
    engine: str | None = None  # model family; detected from model_path when None
    demo: str | None = None  # serve a cached tiny random-weight checkpoint of this family
    lang: str | None = None
    snac_path: str | None = None
    llm_device: str = "auto"
    tokenizer_device: str = "auto"
    detokenizer_device: str = "auto"
    wav2vec_attn_implementation: AttnImpl = "eager"
    llm_attn_implementation: AttnImpl = "eager"
    max_length: Annotated[int, Meta(ge=64)] = 32768
    llm_gpu_memory_utilization: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.6
    torch_dtype: Dtype = "auto"
    cache_implementation: str | None = None
    seed: int = 0
    # Codec batch size. The original's default was 1 (no batching); 8 lets concurrent streams share codec calls.
    batch_size: Annotated[int, Meta(ge=1)] = 8
    llm_batch_size: Annotated[int, Meta(ge=1)] = 8
    wait_timeout: Annotated[float, Meta(ge=0.0)] = 0.01
    # CPU threads for model work (LLM + audio codec). None: the CPUs this process may use. When the LLM and the
    # codec both run on the CPU they split it (runtime.cpu_thread_split) instead of oversubscribing it.
    cpu_threads: Annotated[int, Meta(ge=1, le=4096)] | None = None
    backend_options: dict[str, Any] = {}
    engine_options: dict[str, Any] = {}
    # --- server ---------------------------------------------------------------------------------------------
    model_name: str | None = None
    role_dir: str | None = None
    db_path: str | None = None  # accepted for compatibility; roles live in role_dir (no pickle database)
    state_dir: str | None = None
    api_key: str | None = None
    fix_voice: bool = False
    host: str = "0.0.0.0"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    cors_origins: tuple[str, ...] = ()
    warmup: bool = True
    # --- limits ---------------------------------------------------------------------------------------------
    max_text_chars: Annotated[int, Meta(ge=1)] = 4096
    max_upload_bytes: Annotated[int, Meta(ge=1024)] = 20 * 1024 * 1024
    allow_private_urls: bool = False
    url_timeout: Annotated[float, Meta(gt=0.0)] = 10.0
    max_queue: Annotated[int, Meta(ge=1)] = 64
    request_timeout: Annotated[float, Meta(gt=0.0)] | None = None  # s, per request (None = no budget)
    max_segments: Annotated[int, Meta(ge=1)] = 256  # LLM generations one request may split into (all turns)
    # --- observability --------------------------------------------------------------------------------------
    metrics_public: bool = False  # serve /metrics without the API key (it always needs none when no key is set)
