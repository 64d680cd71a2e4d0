"""Pieces every engine family needs in the same form: device resolution, the sampling merge, retry seeds and
the per-request segment concurrency. Kept here so the families cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flashtts_core.errors import InvalidRequestError
from flashtts_core.plugins.types import SamplingOverrides, SamplingParams

if TYPE_CHECKING:
    from flashtts_core.plugins.base import BackendBase

__all__ = (
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SAMPLING",
    "build_sampling",
    "resolve_device",
    "retry_seed",
    "segment_concurrency",
    "set_torch_threads",
    "token_budget_error",
)

#: The original FlashTTS server's sampling defaults, shared by its LLM-driven families.
DEFAULT_SAMPLING: dict[str, float | int] = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0}
DEFAULT_MAX_TOKENS = 4096


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu`` (explicit devices pass through)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def set_torch_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads for work in the calling thread (``None``: leave them).

    With torch's OpenMP builds the count is per thread, so an engine calls this at the top of every function it
    runs in a worker thread (codec batches); it costs microseconds. (torch also makes it the default of threads
    that start later, which is harmless here.)"""
    if threads is None:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def retry_seed(seed: int | None, attempt: int) -> int | None:
    """The seed of retry ``attempt`` (0 = the request's own): different, but still reproducible."""
    if seed is None or attempt == 0:
        return seed
    return (seed + 1_000_003 * attempt) % (1 << 63)


def build_sampling(
    backend: BackendBase,
    overrides: SamplingOverrides,
    *,
    defaults: Mapping[str, Any],
    max_tokens: int,
    engine_seed: int | None,
    stop_token_ids: tuple[int, ...],
    allowed_token_ids: frozenset[int] | None,
) -> SamplingParams:
    """The engine's defaults for what the backend honours, plus everything the client set explicitly.

    A default the backend cannot honour is left out (the request must still run), but a value the client asked
    for is always passed on, so an unsupported one surfaces as the backend's ``UnsupportedSamplingError`` instead
    of being dropped silently. The allowed-token set is passed only where the backend declares it."""
    caps = backend.capabilities.sampling
    fields: dict[str, Any] = {}
    for name, default in defaults.items():
        value = getattr(overrides, name)
        if value is not None:
            fields[name] = value
        elif name in caps:
            fields[name] = default
    if overrides.seed is not None:
        fields["seed"] = overrides.seed
    elif "seed" in caps:
        fields["seed"] = engine_seed
    return SamplingParams(
        max_tokens=overrides.max_tokens or max_tokens,
        stop_token_ids=stop_token_ids,
        allowed_token_ids=allowed_token_ids if "allowed_token_ids" in caps else None,
        **fields,
    )


def segment_concurrency(backend: BackendBase) -> int:
    """How many segments of one request may be generating at once: the backend's batch size, within its cap."""
    limit = max(1, int(getattr(backend.config, "max_batch_size", 1) or 1))
    cap = backend.capabilities.max_concurrency
    return min(limit, cap) if cap else limit


def token_budget_error(max_tokens: int) -> InvalidRequestError:
    """A segment ran out of a client-set ``max_tokens`` before producing any audio: the client's cap is the cause
    (retrying with the same cap cannot help), so this is a 400 naming the field, not a server error."""
    return InvalidRequestError(
        f"no audio was produced within max_tokens={max_tokens}; raise 'max_tokens' or leave it out",
        param="max_tokens",
        code="max_tokens_too_small",
    )
