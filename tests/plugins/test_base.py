"""BackendBase: the checks every backend gets before its first token, and its token counters."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flashtts_core.errors import BackendNotReadyError, InvalidRequestError, PromptTooLongError, UnsupportedSamplingError
from flashtts_core.plugins import (
    BackendBase,
    BackendCapabilities,
    BackendConfig,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)


class _Backend(BackendBase):
    name = "unit"

    async def startup(self) -> None:
        await super().startup()

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(sampling=frozenset({"top_k", "allowed_token_ids"}), max_model_len=8, vocab_size=16)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        yield TokenChunk((3, 4))
        yield TokenChunk((5,), "length")


def _request(prompt: tuple[int, ...] = (1, 2), **sampling: object) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt_token_ids=prompt, sampling=SamplingParams(**sampling))  # type: ignore[arg-type]


async def test_validate() -> None:
    backend = _Backend(BackendConfig(model_dir="."))
    with pytest.raises(BackendNotReadyError):
        backend.validate(_request())
    await backend.startup()
    assert backend.validate(_request(max_tokens=100)).sampling.max_tokens == 6  # fitted to the context
    assert backend.validate(_request(temperature=0.0)).sampling.temperature == 0.0  # greedy is always allowed
    cases: list[tuple[GenerationRequest, type[Exception], str]] = [
        (_request(top_p=0.5), UnsupportedSamplingError, "top_p"),
        (_request(tuple(range(8))), PromptTooLongError, "input"),
        (_request(()), InvalidRequestError, "prompt_token_ids"),
        (_request((1, 16)), InvalidRequestError, "prompt_token_ids"),
        (_request((-1,)), InvalidRequestError, "prompt_token_ids"),
        (_request(allowed_token_ids=frozenset({3, 99})), InvalidRequestError, "allowed_token_ids"),
        (_request(allowed_token_ids=frozenset()), InvalidRequestError, "allowed_token_ids"),
    ]
    for request, error, param in cases:
        with pytest.raises(error) as info:
            backend.validate(request)
        assert type(info.value) is error and info.value.param == param
    await backend.shutdown()
    await backend.shutdown()  # idempotent


async def test_token_counters() -> None:
    backend = _Backend(BackendConfig(model_dir="."))
    await backend.startup()
    assert (backend.prompt_tokens, backend.generated_tokens) == (0, 0)
    for _ in range(2):
        assert [c.token_ids async for c in backend.generate(_request((1, 2, 3)))] == [(3, 4), (5,)]
    assert (backend.prompt_tokens, backend.generated_tokens) == (6, 6)
    with pytest.raises(PromptTooLongError):  # refused requests count nothing
        [c async for c in backend.generate(_request(tuple(range(8))))]
    assert (backend.prompt_tokens, backend.generated_tokens) == (6, 6)
    await backend.shutdown()
