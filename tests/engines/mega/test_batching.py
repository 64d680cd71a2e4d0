"""Batched DiT sampling (padding masks, solo equality, the engine's dynamic batches) and the models' dtype."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flashtts_torch")

from flashtts_core.engines.mega.config import load_global_config  # noqa: E402
from flashtts_core.engines.mega.engine import MegaEngine, _AcousticJob, _Failure, _RequestVoice  # noqa: E402
from flashtts_core.engines.mega.frontend import ReferenceVoice  # noqa: E402
from flashtts_core.engines.mega.g2p import split_merged  # noqa: E402
from flashtts_core.engines.mega.loading import load_dit  # noqa: E402
from flashtts_core.engines.mega.modeling_dit import DiTSample, MegaDiT, amo_sample_batch  # noqa: E402
from flashtts_core.engines.mega.synthesis import MegaSynthesisOptions  # noqa: E402
from flashtts_core.errors import InvalidRequestError  # noqa: E402
from flashtts_core.plugins.types import EngineConfig, SynthesisRequest, VoicePrompt  # noqa: E402
from flashtts_core.testing.tiny_mega import G2P_SCRIPT  # noqa: E402
from tests.engines.mega.conftest import start_engine, stop_engine  # noqa: E402

#: One segment of the tiny checkpoint (see test_engine.SEGMENT_SAMPLES).
SEGMENT_SAMPLES = (30 * 960, 32 * 960)


@pytest.fixture(scope="module")
def dit(mega_dir: Path) -> MegaDiT:
    config, _ = load_global_config(mega_dir)
    return load_dit(mega_dir / "diffusion_transformer", config)


@pytest.fixture(scope="module")
def batching_engine(mega_dir: Path) -> Iterator[MegaEngine]:
    """An engine whose model queue gathers up to 4 items for up to 0.5 s (``--batch_size 4 --wait_timeout 0.5``)."""
    engine = start_engine(mega_dir, config={"batch_size": 4, "wait_timeout": 0.5})
    yield engine
    stop_engine(engine)


def _sample(seed: int, phones: int, frames: int, t_ref: int, **kwargs: Any) -> DiTSample:
    """A random utterance: ``phones`` phones spread over ``4 * frames`` mel frames, a ``t_ref``-frame prompt."""
    gen = torch.Generator().manual_seed(seed)
    mel = 4 * frames
    return DiTSample(
        phones=torch.randint(3, 300, (phones,), generator=gen),
        tones=torch.randint(1, 31, (phones,), generator=gen),
        mel2ph=torch.arange(mel) * phones // mel + 1,
        prompt_latent=torch.randn(t_ref, 32, generator=gen),
        generator=torch.Generator().manual_seed(1000 + seed),
        **kwargs,
    )


def _fresh(sample: DiTSample, seed: int) -> DiTSample:
    return dataclasses.replace(sample, generator=torch.Generator().manual_seed(1000 + seed))


def _pad(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Right-pad 1-D tensors with zeros to ``length`` and stack them."""
    return torch.stack([torch.nn.functional.pad(r, (0, length - r.shape[0])) for r in rows])


def test_padded_dit_rows_equal_solo_rows(dit: MegaDiT) -> None:
    """Padding never reaches a real frame: not through the phone encoder, the strided convolutions (masked between
    them) or the attention (key-padding mask), even with garbage in the padded frames."""
    a, b = _sample(1, phones=6, frames=8, t_ref=3), _sample(2, phones=11, frames=13, t_ref=5)
    phones = _pad([a.phones, b.phones], 11).long()
    tones = _pad([a.tones, b.tones], 11).long()
    mel2ph = _pad([a.mel2ph, b.mel2ph], 52).long()
    with torch.inference_mode():
        solo_a = dit.linguistic_features(a.phones[None], a.tones[None], a.mel2ph[None])
        solo_b = dit.linguistic_features(b.phones[None], b.tones[None], b.mel2ph[None])
        batch = dit.linguistic_features(phones, tones, mel2ph, torch.tensor([32, 52]))
        unmasked = dit.linguistic_features(phones, tones, mel2ph)
    assert batch.shape == (2, 13, 32) and solo_a.shape == (1, 8, 32)
    torch.testing.assert_close(batch[0, :8], solo_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], solo_b[0], atol=1e-5, rtol=1e-5)
    # Without the lengths the second convolution reads the first one's bias-only padding frames: a real leak.
    assert not torch.allclose(unmasked[0, 7], solo_a[0, 7], atol=1e-4)

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 13, 32, generator=gen)
    lat_ctx = torch.randn(2, 13, 32, generator=gen)
    ctx_mask = torch.zeros(2, 13, 1)
    ctx_mask[0, :3], ctx_mask[1, :5] = 1.0, 1.0
    x[0, 8:], lat_ctx[0, 8:], ctx_mask[0, 8:] = 1e3, -1e3, 1.0  # garbage in the padding of row 0
    key_mask = torch.arange(13)[None, :] < torch.tensor([[8], [13]])
    t = torch.tensor([0.3, 0.3])
    with torch.inference_mode():
        v = dit(x, t, batch, lat_ctx, ctx_mask, key_mask)
        v_a = dit(x[:1, :8], t[:1], solo_a, lat_ctx[:1, :8], ctx_mask[:1, :8])
        v_b = dit(x[1:], t[1:], solo_b, lat_ctx[1:], ctx_mask[1:])
        v_unmasked = dit(x, t, batch, lat_ctx, ctx_mask)
    torch.testing.assert_close(v[0, :8], v_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[1], v_b[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_unmasked[0, :8], v_a[0], atol=1e-3)


def test_amo_sample_batch_equals_solo_samples(dit: MegaDiT) -> None:
    """Different lengths, per-item guidance weights, and a different step count (sampled as its own group)."""
    specs: list[tuple[int, dict[str, Any]]] = [
        (1, {"phones": 6, "frames": 8, "t_ref": 3, "steps": 4}),
        (2, {"phones": 11, "frames": 13, "t_ref": 5, "steps": 4, "p_w": 1.0, "t_w": 0.5}),
        (3, {"phones": 7, "frames": 10, "t_ref": 2, "steps": 3, "p_w": 2.0}),
    ]
    samples = [_sample(seed, **kw) for seed, kw in specs]
    batch = amo_sample_batch(dit, samples)
    for (seed, kw), sample, latent in zip(specs, samples, batch, strict=True):
        (alone,) = amo_sample_batch(dit, [_fresh(sample, seed)])
        assert latent.shape == (kw["frames"], 32) and torch.isfinite(latent).all()
        torch.testing.assert_close(latent, alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(latent[: kw["t_ref"]], sample.prompt_latent)
    # The same samples with another noise really give another latent (the comparison above is not vacuous).
    (other,) = amo_sample_batch(dit, [dataclasses.replace(samples[0], generator=torch.Generator().manual_seed(9))])
    assert not torch.allclose(other, batch[0], atol=1e-3)
    with pytest.raises(ValueError, match="longer than the utterance"):
        amo_sample_batch(dit, [_sample(4, phones=3, frames=2, t_ref=3)])


async def _synth(engine: MegaEngine, prompt: VoicePrompt, **options: Any) -> np.ndarray:
    request = SynthesisRequest(request_id=f"b-{id(options)}", text="Hello there.", prompt=prompt, options=options)
    return np.concatenate([chunk.samples async for chunk in engine.synthesize(request)])


async def test_concurrent_requests_share_a_dit_batch(batching_engine: MegaEngine, mega_prompt: VoicePrompt) -> None:
    engine = batching_engine
    options: list[dict[str, Any]] = [{"time_step": 8}, {"time_step": 8, "dur_alpha": 2.0, "p_w": 1.2}]
    before = engine.dit_batch_sizes.copy()
    together = await asyncio.gather(*(_synth(engine, mega_prompt, **o) for o in options))
    assert engine.dit_batch_sizes[2] == before[2] + 1  # the two segments were sampled as one batch of 2
    alone = [await _synth(engine, mega_prompt, **o) for o in options]
    assert engine.dit_batch_sizes[1] == before[1] + 2
    assert together[0].size in SEGMENT_SAMPLES and together[1].size > together[0].size  # different lengths
    for joint, solo in zip(together, alone, strict=True):
        assert joint.size == solo.size
        np.testing.assert_allclose(joint, solo, atol=1e-4 * float(np.abs(solo).max()))


def _job(voice: ReferenceVoice, seed: int, **options: Any) -> _AcousticJob:
    phones, tones = split_merged([145, *G2P_SCRIPT])
    return _AcousticJob(
        _RequestVoice(voice),
        phones,
        tones,
        is_first=True,
        is_final=True,
        options=MegaSynthesisOptions(time_step=4, **options),
        seed=seed,
    )


def test_a_failing_item_fails_alone(
    batching_engine: MegaEngine, mega_prompt: VoicePrompt, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = batching_engine
    voice = ReferenceVoice.from_data(dict(mega_prompt.data))
    broken = dataclasses.replace(voice, latent=voice.latent[:, :16])  # not a 32-channel latent
    jobs = [_job(voice, 1), _job(broken, 2), _job(voice, 3, dur_alpha=1.5, t_w=1.0)]
    solo = [engine._run_jobs([job])[0] for job in (jobs[0], jobs[2])]
    results = engine._run_jobs(jobs)
    assert isinstance(results[1], _Failure) and "not (T_ref, 32)" in str(results[1].error)
    assert solo[0].shape != solo[1].shape
    for latent, expected in zip((results[0], results[2]), solo, strict=True):
        np.testing.assert_allclose(latent, expected, atol=1e-5)

    # A batch that fails as a whole (after drawing noise) is re-run item by item from the saved generator states.
    import flashtts_core.engines.mega.synthesis as synthesis

    real = synthesis.amo_sample_batch

    def fails_when_batched(model: MegaDiT, samples: list[DiTSample]) -> list[Any]:
        if len(samples) > 1:
            for sample in samples:
                torch.randn(7, generator=sample.generator)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, samples)

    monkeypatch.setattr(synthesis, "amo_sample_batch", fails_when_batched)
    before = engine.dit_batch_sizes[1]
    retried = engine._run_jobs([jobs[0], jobs[2]])
    assert engine.dit_batch_sizes[1] == before + 2
    for latent, expected in zip(retried, solo, strict=True):
        np.testing.assert_allclose(latent, expected, atol=1e-5)


def test_two_model_batches_at_once_give_their_solo_results(
    batching_engine: MegaEngine, mega_prompt: VoicePrompt, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``overtake`` relies on: two batches of model work running at the same time in two threads (a first
    chunk's batch beside a running batch of later ones) give each item its solo result, and segments of one request
    planned in both make its duration-LM prompt state once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from flashtts_core.engines.mega import synthesis

    engine = batching_engine
    assert engine._batcher is not None and engine._batcher.overtake
    voice = ReferenceVoice.from_data(dict(mega_prompt.data))
    seeds = ((1, 2), (3, 4))
    solo = [[engine._run_jobs([_job(voice, seed)])[0] for seed in pair] for pair in seeds]

    calls: list[int] = []
    original = synthesis.prepare_prompt

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(synthesis, "prepare_prompt", counted)  # the engine imports it at call time
    shared = _RequestVoice(voice)
    batches = [[_job(voice, seed) for seed in pair] for pair in seeds]
    for batch in batches:
        for job in batch:
            job.voice = shared
    start = threading.Barrier(2)

    def run(batch: list[Any]) -> list[Any]:
        start.wait()
        return engine._run_jobs(batch)

    with ThreadPoolExecutor(2) as pool:  # an exception in either thread is raised here
        results = list(pool.map(run, batches, timeout=120))
    assert len(calls) == 1
    for got, expected in zip(results, solo, strict=True):
        assert len(got) == len(expected)
        for latent, reference in zip(got, expected, strict=True):
            assert not isinstance(latent, _Failure), latent
            np.testing.assert_allclose(latent, reference, atol=1e-5)


def test_dtype_option_and_resolution(mega_engine: MegaEngine) -> None:
    def engine(torch_dtype: str = "auto", **options: Any) -> MegaEngine:
        config = EngineConfig(model_dir=mega_engine.config.model_dir, dtype=torch_dtype, options=options)  # type: ignore[arg-type]
        return MegaEngine(config, mega_engine.backend)

    with pytest.raises(InvalidRequestError, match="dtype"):
        engine(dtype="int8")
    assert engine().model_dtype("cpu") == torch.float32
    assert engine().model_dtype("cuda:0") == torch.float16  # the original's fp16 autocast
    assert engine("bfloat16").model_dtype("cpu") == torch.bfloat16  # --torch_dtype
    assert engine("bfloat16", dtype="float32").model_dtype("cuda") == torch.float32  # the option wins
    assert next(mega_engine._models().dit.parameters()).dtype == torch.float32


def test_bfloat16_on_the_cpu_runs_end_to_end(mega_dir: Path, mega_prompt: VoicePrompt) -> None:
    engine = start_engine(mega_dir, dtype="bfloat16")
    try:
        models = engine._models()
        assert {next(m.parameters()).dtype for m in (models.aligner, models.dit, models.duration, models.wavvae)} == {
            torch.bfloat16
        }

        async def run() -> tuple[VoicePrompt, np.ndarray]:
            from flashtts_core.plugins.types import ReferenceAudio
            from flashtts_core.testing.tiny_mega import tiny_mega_reference

            wav, npy = tiny_mega_reference()
            prompt = await engine.prepare_voice(ReferenceAudio(data=wav, latent=npy))
            return prompt, await _synth(engine, mega_prompt, time_step=4)

        prompt, audio = asyncio.run(run())
    finally:
        stop_engine(engine)
    # The scripted aligner gives the same alignment in bf16; the audio is finite and of the usual length.
    assert (
        ReferenceVoice.from_data(dict(prompt.data)).durations
        == ReferenceVoice.from_data(dict(mega_prompt.data)).durations
    )
    assert audio.dtype == np.float32 and audio.size in SEGMENT_SAMPLES and np.isfinite(audio).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_end_to_end(mega_dir: Path, mega_prompt: VoicePrompt, dtype: str) -> None:
    """The tiny MegaTTS3 on CUDA in fp16/bf16: alignment, two concurrent (batched) requests, streaming."""
    engine = start_engine(
        mega_dir,
        config={"device": "cuda", "detokenizer_device": "cuda", "batch_size": 4, "wait_timeout": 0.5},
        dtype=dtype,
    )
    try:
        models = engine._models()
        assert next(models.dit.parameters()).device.type == "cuda"
        assert next(models.dit.parameters()).dtype == getattr(torch, dtype)

        async def run() -> tuple[VoicePrompt, list[np.ndarray], np.ndarray]:
            from flashtts_core.plugins.types import ReferenceAudio
            from flashtts_core.testing.tiny_mega import tiny_mega_reference

            wav, npy = tiny_mega_reference()
            prompt = await engine.prepare_voice(ReferenceAudio(data=wav, latent=npy))
            both = await asyncio.gather(_synth(engine, prompt), _synth(engine, prompt, dur_alpha=2.0))
            request = SynthesisRequest(request_id="gpu-stream", text="Hello there.", prompt=prompt, stream=True)
            streamed = np.concatenate([c.samples async for c in engine.synthesize(request)])
            return prompt, list(both), streamed

        prompt, both, streamed = asyncio.run(run())
    finally:
        stop_engine(engine)
    assert (
        ReferenceVoice.from_data(dict(prompt.data)).durations
        == ReferenceVoice.from_data(dict(mega_prompt.data)).durations
    )
    assert engine.dit_batch_sizes[2] >= 1
    assert both[0].size in SEGMENT_SAMPLES and both[1].size > both[0].size and streamed.size in SEGMENT_SAMPLES
    for audio in (*both, streamed):
        assert audio.dtype == np.float32 and np.isfinite(audio).all() and 0 < np.abs(audio).max() <= 1.0
