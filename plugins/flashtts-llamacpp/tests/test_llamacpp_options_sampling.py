"""Option validation (in the constructor, before anything loads) and the numpy sampler, whose semantics must match
transformers' logits processors like the torch backend's do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (source build: see the plugin's README.md)")

from flashtts_llamacpp import LlamaCppBackend, LlamaCppOptions
from flashtts_llamacpp._runtime import process_logits, sample_token

from flashtts_core.errors import CheckpointError, InvalidRequestError
from flashtts_core.plugins import BackendConfig, SamplingParams


def _config(**options: object) -> BackendConfig:
    return BackendConfig(model_dir="/nonexistent", options=options)


def test_unknown_option_names_it_and_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError) as info:
        LlamaCppBackend(_config(n_thread=2))
    message = info.value.message
    assert "n_thread" in message and "n_threads" in message and "gguf" in message
    assert info.value.param == "backend_option"


def test_cli_strings_are_converted() -> None:
    backend = LlamaCppBackend(_config(gguf="/m/model.gguf", n_threads="2", contexts="3", prefix_cache="false"))
    assert backend.options == LlamaCppOptions(gguf="/m/model.gguf", n_threads=2, contexts=3, prefix_cache=False)


@pytest.mark.parametrize("option", [{"n_threads": 0}, {"contexts": 0}, {"n_gpu_layers": -2}, {"n_batch": 0}])
def test_out_of_range_values_are_refused(option: dict[str, int]) -> None:
    with pytest.raises(InvalidRequestError, match=next(iter(option))):
        LlamaCppBackend(_config(**option))


def test_constructor_only_stores() -> None:
    backend = LlamaCppBackend(_config())
    assert backend._runtime is None
    assert not backend.ready


def test_check_available_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    reason = LlamaCppBackend.check_available()
    assert reason is not None and "pip install flashtts-llamacpp" in reason and "README" in reason


# --- sampler ---------------------------------------------------------------------------------------------------


VOCAB = 97


def _reference(logits: np.ndarray, seen: list[int], sampling: SamplingParams) -> np.ndarray:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    input_ids = torch.tensor([seen])
    scores = torch.from_numpy(logits.copy())[None]
    if sampling.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(input_ids, scores)
    if sampling.temperature != 0.0:
        scores = TemperatureLogitsWarper(sampling.temperature)(input_ids, scores)
        if sampling.top_k:
            scores = TopKLogitsWarper(sampling.top_k)(input_ids, scores)
        if sampling.top_p < 1.0:
            scores = TopPLogitsWarper(sampling.top_p)(input_ids, scores)
        if sampling.min_p > 0.0:
            scores = MinPLogitsWarper(sampling.min_p)(input_ids, scores)
    return scores[0].numpy()


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
    logits = (np.random.default_rng(0).standard_normal(VOCAB) * 3).astype(np.float32)
    seen = [3, 5, 5, 40, 96, 0]
    presence = np.zeros(VOCAB, dtype=bool)
    presence[seen] = True
    ids, scores = process_logits(logits, sampling, presence)
    full = np.full(VOCAB, -np.inf, dtype=np.float32)
    full[ids if ids is not None else np.arange(VOCAB)] = scores
    theirs = _reference(logits, seen, sampling)
    np.testing.assert_array_equal(np.isinf(full), np.isinf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(full[finite], theirs[finite], rtol=1e-6)


def test_allowed_ids_restrict_greedy_and_sampled_choices() -> None:
    logits = np.arange(VOCAB, dtype=np.float32)
    allowed = np.array([2, 7])
    rng = np.random.default_rng(0)
    assert sample_token(logits, SamplingParams(temperature=0.0), rng, allowed=allowed) == 7
    draws = {sample_token(logits, SamplingParams(temperature=50.0, top_k=50), rng, allowed=allowed) for _ in range(200)}
    assert draws == {2, 7}


def test_same_seed_same_draws_and_distribution() -> None:
    logits = np.log(np.array([0.1, 0.2, 0.7], dtype=np.float32))
    sampling = SamplingParams(temperature=1.0)
    first = [sample_token(logits, sampling, np.random.default_rng(5)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = np.random.default_rng(1)
    counts = np.bincount([sample_token(logits, sampling, rng) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.7], atol=0.03)


# --- GGUF header ---------------------------------------------------------------------------------------------


def test_context_length_is_read_past_arrays(tmp_path: Path) -> None:
    """The header reader skips string and number arrays stored before the key it needs (other converters' order)."""
    gguf = pytest.importorskip("gguf")
    from flashtts_llamacpp._runtime import _context_length

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list(["a", "bb", "<|x|>"] * 1000)
    writer.add_array("test.numbers", [1.5, 2.5, 3.5])
    writer.add_string("test.name", "tiny")
    writer.add_context_length(8192)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert _context_length(path) == 8192
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        _context_length(tmp_path / "bad.gguf")
