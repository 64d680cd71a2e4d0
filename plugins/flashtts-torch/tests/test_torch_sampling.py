"""The sampler matches transformers' own logits processors (the semantics users know from ``generate``)."""

from __future__ import annotations

import pytest
import torch
from flashtts_torch._runtime import SequenceState, VocabSubset, candidate_weights, process_logits, sample_batch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flashtts_core.plugins import GenerationRequest, SamplingParams

VOCAB = 97
_NEG = float("-inf")


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


# --- the batched sampler the scheduler uses ----------------------------------------------------------------------

_BATCH = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=10),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.2, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.5),
    SamplingParams(temperature=1.0, top_k=5, top_p=0.5),
]


def _sequence(sampling: SamplingParams, seed: int, presence: torch.Tensor | None = None) -> SequenceState:
    request = GenerationRequest(request_id=f"r{seed}", prompt_token_ids=(1, 2, 3), sampling=sampling)
    sequence = SequenceState(request, seed, None, None)  # type: ignore[arg-type]
    sequence.generator = torch.Generator().manual_seed(seed)
    sequence.presence = presence if sampling.repetition_penalty != 1.0 else None
    return sequence


def _support(scores: torch.Tensor) -> set[int]:
    return set(torch.isfinite(scores).nonzero().flatten().tolist())


@pytest.mark.parametrize("with_allowed", [False, True])
def test_batched_candidates_match_process_logits(with_allowed: bool) -> None:
    """Each row of the batched path keeps exactly the ids the one-row reference keeps, whatever its neighbours."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(len(_BATCH), VOCAB, generator=generator) * 3
    presence = torch.zeros(VOCAB, dtype=torch.bool)
    presence[torch.tensor([3, 5, 40, 96, 0])] = True
    allowed = None
    if with_allowed:
        allowed = torch.zeros(VOCAB, dtype=torch.bool)
        allowed[torch.arange(0, VOCAB, 3)] = True
    presences = [presence if s.repetition_penalty != 1.0 else None for s in _BATCH]
    disallowed = None if allowed is None else ~allowed
    greedy, groups = candidate_weights(logits, _BATCH, presences, [disallowed] * len(_BATCH))
    seen = set()
    for rows, ids, weights in groups:
        for j, row in enumerate(rows):
            seen.add(row)
            reference = process_logits(logits[row], _BATCH[row], presences[row], allowed)
            order = torch.arange(VOCAB) if ids is None else ids[j]
            kept = {int(i) for i, w in zip(order, weights[j], strict=True) if w > 0}
            assert kept == _support(reference), _BATCH[row]
            probs = torch.zeros(VOCAB).scatter(0, order, weights[j] / weights[j].sum())
            torch.testing.assert_close(probs, reference.softmax(-1))
    for row, sampling in enumerate(_BATCH):
        if sampling.temperature == 0.0:
            assert row not in seen
            assert int(greedy[row]) == int(process_logits(logits[row], sampling, presences[row], allowed).argmax())
    assert len(seen) == len(_BATCH) - 1


def test_batched_sampling_ignores_neighbours() -> None:
    """A seeded row draws the same ids alone and among other rows (any K, any mix of settings)."""
    generator = torch.Generator().manual_seed(2)
    steps = [torch.randn(len(_BATCH), VOCAB, generator=generator) * 2 for _ in range(30)]
    presence = torch.zeros(VOCAB, dtype=torch.bool)
    presence[3] = True
    for row, sampling in enumerate(_BATCH):
        alone = _sequence(sampling, 7, presence.clone())
        crowd = [_sequence(s, 100 + i, presence.clone()) for i, s in enumerate(_BATCH)]
        crowd[row] = _sequence(sampling, 7, presence.clone())
        solo_ids = [int(sample_batch(step[row : row + 1], [alone])[0]) for step in steps]
        crowd_ids = [int(sample_batch(step, crowd)[row]) for step in steps]
        assert solo_ids == crowd_ids, sampling


def test_batched_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, _NEG]] * 2)
    sequences = [_sequence(SamplingParams(temperature=1.0), 3), _sequence(SamplingParams(temperature=1.0, top_k=2), 4)]
    counts = torch.zeros(2, 5)
    for _ in range(4000):
        picks = sample_batch(logits, sequences)
        counts[0, picks[0]] += 1
        counts[1, picks[1]] += 1
    expected = torch.stack([logits[0].softmax(-1), logits[0].masked_fill(logits[0] < 1.0, _NEG).softmax(-1)])
    torch.testing.assert_close(counts / 4000, expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_vocab_subset_projection_is_the_full_projection_at_its_ids(bias: bool) -> None:
    """The subset's own (transposed) rows of the output projection, or full logits sliced, give ``lm_head``'s
    logits at the subset's ids."""
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 40, bias=bias)
    ids = torch.tensor([1, 5, 7, 22, 39])
    hidden = torch.randn(3, 16)
    with torch.inference_mode():
        expected = lm_head(hidden)[:, ids]
        rows = VocabSubset(ids, 40, lm_head.weight.index_select(0, ids), None if not bias else lm_head.bias[ids])
        assert rows.weight_t is not None and rows.weight_t.shape == (16, 5) and rows.weight_t.is_contiguous()
        torch.testing.assert_close(rows.project(hidden, lm_head), expected)
        torch.testing.assert_close(VocabSubset(ids, 40).project(hidden, lm_head), expected)


def test_vocab_subset_draws_what_the_masked_vocabulary_draws() -> None:
    """Logits over a shared allowed subset (``VocabSubset``) give, row by row and seed by seed, the ids the full
    vocabulary with the allowed mask gives: same greedy pick, same draws, repetition penalty included."""
    allowed_ids = torch.arange(1, VOCAB, 4)  # ascending, as the runtime builds them
    disallowed = torch.ones(VOCAB, dtype=torch.bool)
    disallowed[allowed_ids] = False
    subset = VocabSubset(allowed_ids, VOCAB)
    presence = torch.zeros(VOCAB, dtype=torch.bool)
    presence[torch.tensor([1, 5, 9, 40])] = True
    generator = torch.Generator().manual_seed(3)
    # + a top-k above the subset's size: it truncates (sorts) the vocabulary, so the subset is sorted too.
    batch = [*_BATCH, SamplingParams(temperature=1.0, top_k=30)]
    steps = [torch.randn(len(batch), VOCAB, generator=generator) * 3 for _ in range(30)]
    full = [_sequence(s, 50 + i, presence.clone()) for i, s in enumerate(batch)]
    narrow = [_sequence(s, 50 + i, presence.clone()) for i, s in enumerate(batch)]
    for sequence in full:
        sequence.disallowed = disallowed
    for step in steps:
        full_ids = sample_batch(step, full).tolist()
        narrow_ids = sample_batch(step.index_select(1, allowed_ids), narrow, subset).tolist()
        assert narrow_ids == full_ids
        assert set(narrow_ids) <= set(allowed_ids.tolist())
