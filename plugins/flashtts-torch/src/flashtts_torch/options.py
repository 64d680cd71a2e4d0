"""``--backend_option key=value`` settings of the torch backend."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ("SUPPORTED_CACHE_IMPLEMENTATIONS", "TorchOptions")

#: KV-cache layouts the continuous-batching loop can work with. It pads, stacks and slices the per-layer key/value
#: tensors of a ``DynamicCache`` between steps; static/offloaded/quantised caches keep their tensors elsewhere, so they
#: are refused up front instead of failing mid-request.
SUPPORTED_CACHE_IMPLEMENTATIONS: frozenset[str] = frozenset({"dynamic"})


class TorchOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Backend-specific options; unknown keys are an error naming the known ones (typos must not pass silently)."""

    # Original server flag --cache_implementation. None and "dynamic" are the same thing (the only layout that the
    # continuous-batching loop supports; see SUPPORTED_CACHE_IMPLEMENTATIONS).
    cache_implementation: str | None = None
    # torch intra-op threads on CPU. None: torch's default, capped at the CPUs this process may use (torch counts
    # all cores of the machine, which oversubscribes containers and shared CI boxes). Process-wide setting.
    num_threads: Annotated[int, Meta(ge=1, le=1024)] | None = None
    # Passed to from_pretrained; only for checkpoints that ship their own modelling code. Off: it runs that code.
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.cache_implementation is not None and self.cache_implementation not in SUPPORTED_CACHE_IMPLEMENTATIONS:
            supported = ", ".join(sorted(SUPPORTED_CACHE_IMPLEMENTATIONS))
            raise ValueError(
                f"cache_implementation {self.cache_implementation!r} is not supported by the torch backend's "
                f"continuous-batching loop (supported: {supported}); leave it unset"
            )
