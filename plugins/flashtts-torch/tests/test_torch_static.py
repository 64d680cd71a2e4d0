"""The static-cache decoding path (``cache_implementation=static``) against the dynamic path and transformers.

On CPU the static path runs its decoding step eagerly at the exact batch size and length (CUDA pads to the buckets
its graphs are captured for; a test here pads on the CPU too), so these tests cover the cache layout, the compaction
and the bucketing; the ``gpu`` tests at the end compare graph replay with eager runs on a CUDA device
(``pytest --run-gpu``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flashtts_torch import TorchBackend, _static
from flashtts_torch._runtime import DynamicDecoder
from flashtts_torch._static import (
    MIN_LENGTH_BUCKET,
    StaticDecoder,
    UnsupportedModelError,
    batch_buckets,
    inspect_layout,
    length_buckets,
)

from flashtts_core.errors import PluginError, PromptTooLongError
from flashtts_core.plugins import BackendBase, BackendConfig, GenerationRequest
from flashtts_core.plugins.streams import token_stream
from flashtts_core.testing.conformance import BackendConformance, generate, make_request

# One intra-op thread: the tiny models are overhead-bound, and the CI box has two cores shared with other jobs.
# In-process scheduler: these tests look into the runtime (its decoder, counters, monkeypatched helpers); the worker
# process is covered by test_torch_process.py.
_CPU = {"num_threads": 1, "worker": "thread"}

# Prompts of different lengths; the longest generations below cross the first length bucket (256 columns).
PROMPTS: tuple[tuple[int, ...], ...] = (
    tuple(range(11, 19)),
    tuple(range(30, 50)),
    (5, 6, 7),
    tuple(range(60, 93)),
)
LONG = 300  # tokens: prompt + LONG > MIN_LENGTH_BUCKET for every prompt


def _config(model_dir: Path, *, max_model_len: int = 1024, max_batch_size: int = 8, **options: Any) -> BackendConfig:
    device = options.pop("device", "cpu")
    dtype = options.pop("dtype", "float32")
    return BackendConfig(
        model_dir=str(model_dir),
        max_model_len=max_model_len,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        options={**(_CPU if device == "cpu" else {}), **options},
    )


@contextlib.asynccontextmanager
async def _started(model_dir: Path, **kwargs: Any) -> AsyncIterator[TorchBackend]:
    backend = TorchBackend(_config(model_dir, **kwargs))
    await backend.startup()
    try:
        yield backend
    finally:
        await backend.shutdown()


async def _solo(backend: BackendBase, requests: list[GenerationRequest]) -> list[tuple[int, ...]]:
    return [(await generate(backend, request, 120.0)).token_ids for request in requests]


async def _together(backend: BackendBase, requests: list[GenerationRequest]) -> list[tuple[int, ...]]:
    results = await asyncio.gather(*(generate(backend, request, 120.0) for request in requests))
    assert all(result.finish_reason == "length" for result in results)
    return [result.token_ids for result in results]


async def _staggered(
    backend: BackendBase, requests: list[GenerationRequest], after: int = 5, stop_at: dict[int, int] | None = None
) -> list[tuple[int, ...]]:
    """Request ``i`` starts once request ``i - 1`` has streamed ``after`` ids (so rows join a running batch);
    ``stop_at[i] = n``: the consumer of request ``i`` closes its stream after ``n`` ids (an abort)."""
    stop_at = stop_at or {}
    started = [asyncio.Event() for _ in requests]

    async def one(index: int, request: GenerationRequest) -> tuple[int, ...]:
        if index:
            await started[index - 1].wait()
        ids: list[int] = []
        async with contextlib.aclosing(backend.generate(request)) as stream:
            async for chunk in stream:
                ids.extend(chunk.token_ids)
                if len(ids) >= after:
                    started[index].set()
                if index in stop_at and len(ids) >= stop_at[index]:
                    break
        started[index].set()
        return tuple(ids)

    return list(await asyncio.wait_for(asyncio.gather(*(one(i, r) for i, r in enumerate(requests))), 120.0))


# --- tiny checkpoints built with transformers' own classes -----------------------------------------------------------


def _save_random_model(out: Path, config: Any, model_cls: Any, *, strong_mlp: bool = True) -> Path:
    """Random-init ``model_cls(config)`` and save it; a strong MLP (as in flashtts_core.testing.tiny_llm) keeps the
    greedy output varied instead of repeating one id."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    if strong_mlp:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    param.mul_(10.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip("this transformers has no Qwen3")
    config = transformers.Qwen3Config(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return _save_random_model(tmp_path_factory.mktemp("qwen3"), config, transformers.Qwen3ForCausalLM)


def _mistral(out: Path, sliding_window: int | None) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        sliding_window=sliding_window,
    )
    return _save_random_model(out, config, MistralForCausalLM)


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mistral(tmp_path_factory.mktemp("mistral"), None)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=512, n_embd=64, n_layer=1, n_head=2)
    return _save_random_model(tmp_path_factory.mktemp("gpt2"), config, GPT2LMHeadModel, strong_mlp=False)


ARCHS = ("tiny_qwen2_dir", "tiny_llama_dir", "tiny_qwen3_dir", "tiny_mistral_dir")


# --- units -----------------------------------------------------------------------------------------------------------


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert length_buckets(100) == [100]
    assert length_buckets(256) == [256]
    assert length_buckets(1000) == [256, 512, 1000]
    assert length_buckets(1024) == [256, 512, 1024]


def _load(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


def _cpu_decoder(model: Any, *, slots: int, cache_len: int) -> StaticDecoder:
    """A float32 CPU decoder over ``model``'s modules (call under ``torch.inference_mode()``)."""
    layout = inspect_layout(model, cache_len)
    cpu = torch.device("cpu")
    return StaticDecoder(layout, slots=slots, cache_len=cache_len, device=cpu, dtype=torch.float32, cuda_graphs=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch: str, request: pytest.FixtureRequest) -> None:
    """Prefill and decoding steps (several rows of different lengths, after a compaction) give the logits of a full
    transformers forward over each row's whole sequence."""
    model = _load(request.getfixturevalue(arch))
    with torch.inference_mode():
        decoder = _cpu_decoder(model, slots=4, cache_len=512)

        def reference(ids: list[int]) -> torch.Tensor:
            return model(input_ids=torch.tensor([ids])).logits[0, -1]

        rows = [list(p) for p in PROMPTS]
        for prompt in rows:
            logits = decoder.prefill(prompt)
            torch.testing.assert_close(logits[0], reference(prompt), atol=1e-4, rtol=1e-4)
            decoder.join()
        for step in range(6):
            if step == 3:
                assert decoder.drop([0, 2]) == [3, 1]  # the last row moves into the first hole
                rows = [rows[3], rows[1]]
            feed = [(7 * step + 3 * i) % 300 + 1 for i in range(len(rows))]
            logits = decoder.decode(feed, [len(r) for r in rows])
            for i, token in enumerate(feed):
                rows[i].append(token)
                torch.testing.assert_close(logits[i], reference(rows[i]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decoder_kind", ["static", "dynamic"])
def test_vocab_subset_logits_are_the_full_logits_at_those_ids(decoder_kind: str, tiny_qwen2_dir: Path) -> None:
    """Prefill and decode over a vocabulary subset give the full logits' columns at the subset's ids (the static
    path projects with the subset's rows of lm_head, the dynamic one slices)."""
    model = _load(tiny_qwen2_dir)
    ids = torch.arange(3, model.config.vocab_size, 5)
    with torch.inference_mode():
        cpu = torch.device("cpu")
        static = decoder_kind == "static"
        decoder: Any = _cpu_decoder(model, slots=2, cache_len=256) if static else DynamicDecoder(model, cpu)
        subset = decoder.vocab_subset(ids)
        assert subset.vocab_size == model.config.vocab_size
        rows = [list(PROMPTS[0]), list(PROMPTS[1])]
        for prompt in rows:
            logits = decoder.prefill(prompt, subset)
            full = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            assert logits.shape == (1, len(ids))
            torch.testing.assert_close(logits[0], full[ids], atol=1e-4, rtol=1e-4)
            decoder.join()
        logits = decoder.decode([5, 6], [len(r) for r in rows], subset)
        for i, token in enumerate((5, 6)):
            full = model(input_ids=torch.tensor([[*rows[i], token]])).logits[0, -1]
            torch.testing.assert_close(logits[i], full[ids], atol=1e-4, rtol=1e-4)


def test_near_full_vocab_subset_copies_its_rows_only_while_the_copy_is_small(
    tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subset of all ids but one: its rows of lm_head are copied while that copy is small (the mask pass and the
    projection rows it saves pay for it); over ``SUBSET_COPY_BYTES`` the decoder slices full logits instead. Either
    way the logits are the full logits at the subset's ids."""
    model = _load(tiny_qwen2_dir)
    vocab = model.config.vocab_size
    ids = torch.arange(1, vocab)
    prompt = list(PROMPTS[0])
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        decoder = _cpu_decoder(model, slots=1, cache_len=256)
        small = decoder.vocab_subset(ids)
        assert small.weight_t is not None and small.weight_t.shape == (model.config.hidden_size, vocab - 1)
        monkeypatch.setattr(_static, "SUBSET_COPY_BYTES", 0)
        large = decoder.vocab_subset(ids)
        assert large.weight_t is None
        for subset in (small, large):
            logits = decoder.prefill(prompt, subset)
            torch.testing.assert_close(logits[0], full[ids], atol=1e-4, rtol=1e-4)
        # A smaller share is always copied, whatever its size.
        assert decoder.vocab_subset(ids[: vocab // 2]).weight_t is not None


def test_failed_capture_falls_back_to_eager(tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph capture that raises does not fail the step (nor later ones): the decoder goes on eagerly."""
    model = _load(tiny_qwen2_dir)
    with torch.inference_mode():
        decoder = _cpu_decoder(model, slots=2, cache_len=256)
        decoder.use_graphs = True  # as on CUDA; the capture itself is made to fail

        def broken_capture(batch: int, columns: int) -> None:
            raise RuntimeError("capture failed")

        monkeypatch.setattr(decoder, "_capture", broken_capture)
        prompt = list(PROMPTS[0])
        decoder.prefill(prompt)
        decoder.join()
        logits = decoder.decode([5], [len(prompt)])
        expected = model(input_ids=torch.tensor([[*prompt, 5]])).logits[0, -1]
        torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)
        assert decoder.use_graphs is False and decoder.graphs_captured == 0


def test_layout_refusals(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        inspect_layout(_load(tiny_gpt2_dir), 256)
    windowed = _load(_mistral(tmp_path / "mistral-window", 64))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        inspect_layout(windowed, 256)
    inspect_layout(windowed, 64)  # a window that covers the whole cache hides nothing


# --- the backend on the static path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
async def test_greedy_matches_dynamic(arch: str, request: pytest.FixtureRequest) -> None:
    """Greedy ids of concurrent requests on the static path equal their solo runs on the dynamic path, also past
    the first length bucket (llama: llama3 RoPE scaling, qwen3: q/k norms, mistral: no window)."""
    model_dir = request.getfixturevalue(arch)
    requests = [
        make_request(p, request_id=f"g{i}", max_tokens=LONG - 10 * i, temperature=0.0) for i, p in enumerate(PROMPTS)
    ]
    assert all(len(r.prompt_token_ids) + r.sampling.max_tokens > MIN_LENGTH_BUCKET for r in requests)
    async with _started(model_dir, cache_implementation="dynamic") as backend:
        dynamic = await _solo(backend, requests)
    async with _started(model_dir, cache_implementation="static") as backend:
        assert backend._runtime is not None and backend._runtime.cache_implementation == "static"
        static = await _together(backend, requests)
    assert static == dynamic
    assert len({token for ids in dynamic for token in ids}) > 10  # the tiny model does not just repeat itself


@pytest.mark.parametrize("arch", ["tiny_qwen2_dir", "tiny_llama_dir"])
async def test_seeded_sampling_matches_dynamic(arch: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(arch)
    requests = [
        make_request(
            p, request_id=f"s{i}", max_tokens=40, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=i
        )
        for i, p in enumerate(PROMPTS)
    ]
    async with _started(model_dir, cache_implementation="dynamic") as backend:
        dynamic = await _together(backend, requests)
    async with _started(model_dir, cache_implementation="static") as backend:
        static = await _together(backend, requests)
    assert static == dynamic


async def test_near_full_allowed_set_samples_over_its_own_logits(tiny_qwen2_dir: Path) -> None:
    """Allowed ids = the vocabulary minus a few ids the unconstrained model picks: the runtime gives the set logits
    of its own (a subset, not a mask over the full vocabulary), the excluded ids never come out, and greedy and
    seeded draws (penalty included) are the dynamic path's, which masks."""
    async with _started(tiny_qwen2_dir, cache_implementation="dynamic") as backend:
        free = await _solo(backend, [make_request(PROMPTS[0], max_tokens=12, temperature=0.0)])
    excluded = set(free[0][:3])
    vocab = int(json.loads((tiny_qwen2_dir / "config.json").read_text())["vocab_size"])
    allowed = frozenset(range(vocab)) - excluded
    requests = [
        make_request(PROMPTS[0], request_id="g", max_tokens=24, temperature=0.0, allowed_token_ids=allowed),
        make_request(
            PROMPTS[1],
            request_id="s",
            max_tokens=24,
            temperature=0.9,
            top_k=40,
            top_p=0.95,
            repetition_penalty=1.1,
            seed=3,
            allowed_token_ids=allowed,
        ),
    ]
    async with _started(tiny_qwen2_dir, cache_implementation="dynamic") as backend:
        dynamic = await _together(backend, requests)
    async with _started(tiny_qwen2_dir, cache_implementation="static") as backend:
        static = await _together(backend, requests)
        runtime = backend._runtime
        assert runtime is not None and runtime._vocab_subsets[allowed] is not None
    assert static == dynamic
    assert not excluded & {token for ids in static for token in ids}


async def test_loading_writes_no_progress_bar(tiny_qwen2_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A server log gets no "Loading weights" progress bar from transformers, and the caller's setting is kept."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    async with _started(tiny_qwen2_dir):
        pass
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


async def test_rows_joining_and_leaving_midstream(tiny_qwen2_dir: Path) -> None:
    """Requests join a running batch one after another and finish in a different order (rows leave from the
    middle, the last row moves into the hole): every request gets its solo ids."""
    budgets = (120, 30, 90, 15, 60, 45)
    requests = [
        make_request(PROMPTS[i % len(PROMPTS)][i:], request_id=f"j{i}", max_tokens=n, temperature=0.0)
        for i, n in enumerate(budgets)
    ]
    async with _started(tiny_qwen2_dir, cache_implementation="dynamic") as backend:
        dynamic = await _solo(backend, requests)
    async with _started(tiny_qwen2_dir, cache_implementation="static", max_batch_size=4) as backend:
        runtime = backend._runtime
        assert runtime is not None
        solo = await _solo(backend, requests)
        staggered = await _staggered(backend, requests)
        assert runtime.peak_batch >= 3
    assert solo == dynamic
    assert staggered == solo


async def test_abort_midstream_leaves_others_unchanged(tiny_qwen2_dir: Path) -> None:
    requests = [
        make_request(p, request_id=f"a{i}", max_tokens=60, temperature=0.0, seed=i) for i, p in enumerate(PROMPTS)
    ]
    requests[2] = make_request(PROMPTS[2], request_id="a2", max_tokens=60, temperature=1.0, seed=7)
    async with _started(tiny_qwen2_dir, cache_implementation="static") as backend:
        solo = await _solo(backend, requests)
        runs = await _staggered(backend, requests, after=3, stop_at={1: 10})
    assert runs[1] == solo[1][: len(runs[1])] and len(runs[1]) < len(solo[1])
    assert [runs[i] for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]


async def test_static_cache_len_is_the_context(tiny_qwen2_dir: Path) -> None:
    async with _started(tiny_qwen2_dir, cache_implementation="static", static_cache_len=64) as backend:
        runtime = backend._runtime
        assert runtime is not None
        assert backend.capabilities.max_model_len == 64
        prompt = PROMPTS[0]  # 8 ids
        result = await generate(backend, make_request(prompt, max_tokens=1000, temperature=0.0), 60.0)
        assert result.finish_reason == "length" and len(result.token_ids) == 64 - len(prompt)
        # Past validate (max_tokens not capped), the runtime still stops when the cache is full.
        sequence = runtime.submit(make_request(prompt, max_tokens=1000, temperature=0.0), asyncio.get_running_loop())
        chunks = [chunk async for chunk in token_stream(sequence.queue)]
        assert chunks[-1].finish_reason == "length"
        assert tuple(t for c in chunks for t in c.token_ids) == result.token_ids
        # A prompt that fills the cache is refused up front, naming the static cache.
        with pytest.raises(PromptTooLongError, match="static_cache_len"):
            backend.validate(make_request(tuple(range(1, 65)), max_tokens=1))
        ok = backend.validate(make_request(tuple(range(1, 64)), max_tokens=10))
        assert ok.sampling.max_tokens == 1
        assert (await generate(backend, make_request(prompt, max_tokens=5, temperature=0.0), 60.0)).token_ids == (
            result.token_ids[:5]
        )


async def test_static_cache_len_capped_by_max_model_len(tiny_qwen2_dir: Path) -> None:
    async with _started(tiny_qwen2_dir, max_model_len=300, cache_implementation="static") as backend:
        assert backend.capabilities.max_model_len == 300
        assert backend._runtime is not None and "cache_len=300" in backend._runtime.path_description


async def test_auto_is_static_on_cpu_when_the_cache_is_small(tiny_qwen2_dir: Path) -> None:
    async with _started(tiny_qwen2_dir) as backend:
        runtime = backend._runtime
        assert runtime is not None
        assert runtime.cache_implementation == "static" and "auto" in runtime.path_description
        assert backend.capabilities.max_model_len == 1024


async def test_auto_is_dynamic_on_cpu_when_the_cache_is_large(
    tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashtts_torch import _runtime

    monkeypatch.setattr(_runtime, "_available_memory", lambda: 1024)  # 1 KiB free: nothing fits
    async with _started(tiny_qwen2_dir) as backend:
        runtime = backend._runtime
        assert runtime is not None
        assert runtime.cache_implementation == "dynamic" and "available memory" in runtime.path_description
        assert backend.capabilities.max_model_len == 1024


@pytest.mark.parametrize(
    ("fixture", "match"),
    [("tiny_gpt2_dir", "GPT2LMHeadModel"), ("mistral_window_dir", "sliding-window")],
)
async def test_static_refused_for_unsupported_models(fixture: str, match: str, request: pytest.FixtureRequest) -> None:
    backend = TorchBackend(_config(request.getfixturevalue(fixture), cache_implementation="static"))
    with pytest.raises(PluginError, match=match) as info:
        await backend.startup()
    assert "Qwen2ForCausalLM" in info.value.message and "cache_implementation=dynamic" in info.value.message
    assert not backend.ready
    await backend.shutdown()


async def test_static_cache_that_does_not_fit_is_refused(tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(self: StaticDecoder, *args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StaticDecoder, "__init__", out_of_memory)
    backend = TorchBackend(_config(tiny_qwen2_dir, cache_implementation="static", static_cache_len=512))
    with pytest.raises(PluginError, match="does not fit") as info:
        await backend.startup()
    assert "8 slots x 512 columns" in info.value.message and "static_cache_len" in info.value.message
    await backend.shutdown()


@pytest.fixture(scope="module")
def mistral_window_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mistral(tmp_path_factory.mktemp("mistral-window"), 64)


# --- the conformance kit on the static path ----------------------------------------------------------------------


def _kit_config(model_dir: Path, **overrides: Any) -> BackendConfig:
    return _config(model_dir, max_model_len=256, **{"cache_implementation": "static", **overrides})


class TestTorchQwen2Static(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return TorchBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_qwen2_dir: Path) -> BackendConfig:
        return _kit_config(tiny_qwen2_dir)

    @pytest.fixture(scope="class")
    @classmethod
    def admits_by_priority(cls) -> bool:
        return True


class TestTorchLlamaStatic(BackendConformance):
    @pytest.fixture(scope="class")
    @classmethod
    def backend_cls(cls) -> type[BackendBase]:
        return TorchBackend

    @pytest.fixture(scope="class")
    @classmethod
    def backend_config(cls, tiny_llama_dir: Path) -> BackendConfig:
        return _kit_config(tiny_llama_dir)


# --- CUDA graphs (pytest --run-gpu) --------------------------------------------------------------------------------


def _greedy(
    decoder: StaticDecoder, prompts: list[list[int]], steps: int, drop_at: int | None = None
) -> list[list[int]]:
    """Greedy-decode ``prompts`` as one batch straight on the decoder; at step ``drop_at`` rows 0 and 2 leave."""
    out: list[list[int]] = []
    lengths: list[int] = []
    for prompt in prompts:
        out.append([int(decoder.prefill(prompt).argmax())])
        decoder.join()
        lengths.append(len(prompt))
    finished: list[list[int]] = []
    for step in range(steps):
        if step == drop_at and len(out) > 2:
            order = decoder.drop([0, 2])
            finished += [out[0], out[2]]
            out, lengths = [out[i] for i in order], [lengths[i] for i in order]
        picks = decoder.decode([row[-1] for row in out], lengths).argmax(-1).tolist()
        for row, token in zip(out, picks, strict=True):
            row.append(token)
        lengths = [n + 1 for n in lengths]
    decoder.drop(list(range(len(out))))
    return sorted(finished + out)


@pytest.mark.parametrize("size", [3, 5])
def test_padding_to_buckets_gives_the_exact_steps_ids(size: int, tiny_qwen2_dir: Path) -> None:
    """On the CPU a step runs at its exact size; padded to the CUDA buckets (rows in free slots, columns up to the
    bucket) it gives the same greedy ids, across the first length bucket and a compaction."""
    model = _load(tiny_qwen2_dir)
    prompts = [list(PROMPTS[i % len(PROMPTS)][i % 3 :]) for i in range(size)]
    results: list[list[list[int]]] = []
    with torch.inference_mode():
        for pad in (False, True):
            decoder = _cpu_decoder(model, slots=8, cache_len=512)
            assert decoder.pad_to_buckets is False  # the CPU default
            decoder.pad_to_buckets = pad
            steps: list[tuple[int, int]] = []
            step = decoder._step

            def spy(batch: int, columns: int, step: Any = step, steps: list[tuple[int, int]] = steps) -> torch.Tensor:
                steps.append((batch, columns))
                return step(batch, columns)

            decoder._step = spy  # type: ignore[method-assign]
            results.append(_greedy(decoder, prompts, steps=280, drop_at=140))
            batches = {batch for batch, _ in steps}
            columns = {columns for _, columns in steps}
            if pad:
                bucket = {3: 4, 1: 1, 5: 8}  # the batch buckets of 8 slots: 1, 2, 4, 8
                assert batches == {bucket[size], bucket[size - 2]} and columns == {256, 512}
            else:
                assert batches == {size, size - 2} and len(columns) == 280
    exact, padded = results
    assert exact == padded


@pytest.mark.gpu
@pytest.mark.parametrize("size", [1, 3, 4, 8])
def test_cuda_graphs_match_eager(size: int, tiny_qwen2_dir: Path) -> None:
    """bf16 on CUDA: graph replay gives the eager step's ids (same buckets, same kernels), across both length
    buckets and a compaction, and graphs were captured."""
    model = _load(tiny_qwen2_dir, torch.bfloat16, "cuda")
    prompts = [list(PROMPTS[i % len(PROMPTS)][i % 3 :]) for i in range(size)]
    device = torch.device("cuda")
    results: list[list[list[int]]] = []
    decoders: list[StaticDecoder] = []
    with torch.inference_mode():
        for graphs in (False, True):
            layout = inspect_layout(model, 512)
            decoder = StaticDecoder(
                layout, slots=8, cache_len=512, device=device, dtype=torch.bfloat16, cuda_graphs=graphs
            )
            results.append(_greedy(decoder, prompts, steps=300, drop_at=150))
            decoders.append(decoder)
    eager, graphed = results
    assert graphed == eager
    assert decoders[0].graphs_captured == 0
    assert decoders[1].use_graphs and decoders[1].graphs_captured >= 2  # both length buckets at least


@pytest.mark.gpu
async def test_cuda_auto_uses_graphs_and_matches_dynamic(tiny_qwen2_dir: Path) -> None:
    """On CUDA, auto picks the static path with graphs; float32 greedy ids equal the dynamic path's."""
    requests = [make_request(p, request_id=f"c{i}", max_tokens=LONG, temperature=0.0) for i, p in enumerate(PROMPTS)]
    async with _started(tiny_qwen2_dir, device="cuda", cache_implementation="dynamic") as backend:
        dynamic = await _solo(backend, requests)
    async with _started(tiny_qwen2_dir, device="cuda") as backend:
        runtime = backend._runtime
        assert runtime is not None
        assert runtime.cache_implementation == "static" and runtime.cuda_graphs
        static = await _solo(backend, requests)
        together = await _together(backend, requests)
        assert runtime.graphs_captured >= 2
    assert static == dynamic
    assert together == static
