"""``--backend_option key=value`` settings of the torch backend."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = ("DEFAULT_STATIC_CACHE_LEN", "SUPPORTED_CACHE_IMPLEMENTATIONS", "TorchOptions")

#: KV-cache layouts the scheduler can decode with: ``dynamic`` (a transformers ``DynamicCache``, rows left-padded,
#: the model's own forward) and ``static`` (a preallocated slot cache driven by :mod:`flashtts_torch._static`, with
#: CUDA graphs on CUDA). ``auto`` (or unset) picks static on CUDA when the architecture supports it, else dynamic.
#: Offloaded and quantised caches keep their tensors elsewhere and are refused up front.
SUPPORTED_CACHE_IMPLEMENTATIONS: frozenset[str] = frozenset({"auto", "dynamic", "static"})

#: Default columns of the static cache (capped by the model context).
DEFAULT_STATIC_CACHE_LEN = 8192


class TorchOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Backend-specific options; unknown keys are an error naming the known ones (typos must not pass silently)."""

    # Original server flag --cache_implementation: None / "auto" (static on CUDA when the architecture is
    # supported, dynamic otherwise), "dynamic" or "static" (an error at load if the architecture is not supported).
    cache_implementation: str | None = None
    # CUDA graphs for the static path's decoding step (captured lazily per batch/length bucket). CUDA only.
    cuda_graphs: bool = True
    # Columns of the static cache, i.e. the longest prompt + generation it can hold. None: min(max_model_len, 8192).
    # The backend advertises it as its max_model_len when the static path is used.
    static_cache_len: Annotated[int, Meta(ge=16)] | None = None
    # torch intra-op threads of the scheduler thread on CPU. None: BackendConfig.cpu_threads (the server's share of
    # the CPU), else torch's default capped at the CPUs this process may use (torch counts all cores of the machine,
    # which oversubscribes containers and shared CI boxes). Set in the scheduler thread only.
    num_threads: Annotated[int, Meta(ge=1, le=1024)] | None = None
    # Where the model and its scheduler run: "thread" (a thread of the server process), "process" (a worker process
    # of its own: the decoding loop does not wait for the server's interpreter lock, see flashtts_torch._worker) or
    # "auto"/None (process on the CPU on POSIX systems, thread elsewhere: on CUDA the step is mostly graph replays;
    # device auto counts as the CPU without a GPU driver, see backend._means_cpu).
    worker: Literal["auto", "thread", "process"] | None = None
    # Passed to from_pretrained; only for checkpoints that ship their own modelling code. Off: it runs that code.
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.cache_implementation is not None and self.cache_implementation not in SUPPORTED_CACHE_IMPLEMENTATIONS:
            supported = ", ".join(sorted(SUPPORTED_CACHE_IMPLEMENTATIONS))
            raise ValueError(
                f"cache_implementation {self.cache_implementation!r} is not supported by the torch backend "
                f"(supported: {supported}; unset means auto)"
            )
        if self.cache_implementation == "dynamic" and self.static_cache_len is not None:
            raise ValueError(
                "static_cache_len sizes the static cache, but cache_implementation=dynamic was asked for; "
                "drop one of the two"
            )

    @property
    def cache_mode(self) -> str:
        """``auto``, ``dynamic`` or ``static``."""
        return self.cache_implementation or "auto"
