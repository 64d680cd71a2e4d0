"""The sampler matches transformers' own logits processors (the semantics users know from ``generate``)."""

from __future__ import annotations

import pytest
import torch
from flashtts_torch._runtime import process_logits
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flashtts_core.plugins import SamplingParams

VOCAB = 97


def _reference(logits: torch.Tensor, seen: list[int], sampling: SamplingParams) -> torch.Tensor:
    input_ids = torch.tensor([seen])
    scores = logits[None].clone()
    if sampling.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(input_ids, scores)
    if sampling.temperature == 0.0:
        return scores[0]
    scores = TemperatureLogitsWarper(sampling.temperature)(input_ids, scores)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(input_ids, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(input_ids, scores)
    if sampling.min_p > 0.0:
        scores = MinPLogitsWarper(sampling.min_p)(input_ids, scores)
    return scores[0]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=10),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=1.2, min_p=0.05),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.5),
    ],
    ids=["greedy-penalty", "temperature", "top_k", "top_p", "min_p", "all"],
)
def test_matches_transformers_processors(sampling: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(VOCAB, generator=generator) * 3
    seen = [3, 5, 5, 40, 96, 0]
    presence = torch.zeros(VOCAB, dtype=torch.bool)
    presence[torch.tensor(seen)] = True
    ours = process_logits(logits, sampling, presence)
    theirs = _reference(logits, seen, sampling)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])


def test_allowed_mask_applies_before_everything() -> None:
    logits = torch.arange(VOCAB, dtype=torch.float32)
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[torch.tensor([2, 7])] = True
    scores = process_logits(logits, SamplingParams(temperature=0.0), allowed=allowed)
    assert int(scores.argmax()) == 7
    scores = process_logits(logits, SamplingParams(temperature=1.0, top_k=50), allowed=allowed)
    assert set(torch.isfinite(scores).nonzero().flatten().tolist()) == {2, 7}
