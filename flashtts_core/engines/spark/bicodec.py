"""``BiCodec``: the Spark-TTS audio tokenizer behind a numpy API (audio ↔ global + semantic token ids).

The engine needs two operations: turn a reference waveform into 32 global (speaker) ids plus one semantic id per
20 ms, and turn generated ids back into audio. This class loads the published ``Spark-TTS-0.5B`` directory unchanged
(``config.yaml``, ``BiCodec/``, ``wav2vec2-large-xlsr-53/``), strictly: every tensor of ``BiCodec/model.safetensors``
is loaded or verified as a known training-only tensor; anything else raises
:class:`~flashtts_core.errors.CheckpointError`.

Inputs are taken as they are: ``tokenize`` does not resample or normalise (reference decoding and the optional
loudness normalisation happen before, see :mod:`flashtts_core.engines.spark.audio`). Lists are processed as one padded
batch whose results equal one-by-one calls (within float tolerance).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np
import torch

from flashtts_core.engines.spark.audio import reference_clip
from flashtts_core.engines.spark.config import (
    BiCodecConfig,
    SparkRootConfig,
    infer_bicodec_dims,
    load_bicodec_config,
    load_root_config,
)
from flashtts_core.engines.spark.modeling_bicodec import SparkBiCodecModel, bicodec_unused_shapes
from flashtts_core.engines.spark.wav2vec import SparkWav2Vec2Features
from flashtts_core.errors import AudioDecodeError, CheckpointError, InvalidRequestError
from flashtts_core.models.loading import load_state_dict_strict, read_safetensors, read_safetensors_shapes

__all__ = ("BiCodec", "load_bicodec_model")

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def load_bicodec_model(
    codec_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SparkBiCodecModel:
    """Build :class:`SparkBiCodecModel` from ``BiCodec/{config.yaml,model.safetensors}`` (strict, weight norm folded).

    Hard-wired widths are read from the safetensors header first, the module tree is built on the ``meta`` device,
    and the file's tensors are assigned into it; the postnet, the ECAPA x-vector head and ``quantizer.cluster_size``
    are shape-verified and dropped.
    """
    codec_dir = Path(codec_dir)
    config = load_bicodec_config(codec_dir / "config.yaml")
    weights = codec_dir / "model.safetensors"
    dims = infer_bicodec_dims(read_safetensors_shapes(weights))
    with torch.device("meta"):
        model = SparkBiCodecModel(config, dims)
    state = read_safetensors(weights)
    load_state_dict_strict(model, state, source=weights, unused=bicodec_unused_shapes(config, dims), assign=True)
    del state
    model.fold_weight_norm()
    model.eval().to(device=device, dtype=dtype or torch.float32)
    return model


def _as_wave(wav: object, index: int, min_samples: int) -> np.ndarray:
    """Validate one input waveform; returns it as float32 (the caller's array is never written to)."""
    if not isinstance(wav, np.ndarray):
        raise AudioDecodeError(f"waveform {index} must be a numpy array, got {type(wav).__name__}")
    if wav.ndim != 1:
        raise AudioDecodeError(f"waveform {index} must be mono 1-D, got shape {wav.shape}")
    if wav.shape[0] < min_samples:
        raise AudioDecodeError(
            f"waveform {index} is too short: {wav.shape[0]} samples, need at least {min_samples} (one wav2vec2 frame)"
        )
    out = np.asarray(wav, dtype=np.float32)
    if not np.isfinite(out).all():
        raise AudioDecodeError(f"waveform {index} contains NaN or infinite samples")
    return out


def _as_ids(ids: object, what: str, upper: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRequestError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= upper):
        raise InvalidRequestError(f"{what} must lie in [0, {upper}), got range [{arr.min()}, {arr.max()}]")
    return arr


class BiCodec:
    """Spark-TTS audio tokenizer: 16 kHz mono float32 audio ↔ (global ids ``(32,)``, semantic ids ``(T,)``)."""

    def __init__(
        self,
        model: SparkBiCodecModel,
        semantic: SparkWav2Vec2Features,
        *,
        root_config: SparkRootConfig,
        config: BiCodecConfig,
    ) -> None:
        self.model = model
        self.semantic = semantic
        self.root_config = root_config
        self.config = config

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        wav2vec_attn_implementation: str = "eager",
    ) -> BiCodec:
        """Load from a Spark-TTS root directory (``config.yaml``, ``BiCodec/``, ``wav2vec2-large-xlsr-53/``).

        ``dtype`` defaults to float32; FSQ quantisation, the VQ distance and the mel STFT always run in fp32.
        Raises :class:`CheckpointError` when a file is missing or does not match.
        """
        root = Path(model_dir)
        torch_dtype = _resolve_dtype(dtype)
        root_config = load_root_config(root / "config.yaml")
        model = load_bicodec_model(root / "BiCodec", device=device, dtype=torch_dtype)
        config = model.config
        semantic = SparkWav2Vec2Features.from_pretrained(
            root / "wav2vec2-large-xlsr-53", device, torch_dtype, attn_implementation=wav2vec_attn_implementation
        )
        problems = []
        if semantic.hidden_size != config.encoder.input_channels:
            problems.append(
                f"wav2vec2 hidden_size {semantic.hidden_size} != BiCodec encoder.input_channels "
                f"{config.encoder.input_channels}"
            )
        if not root_config.latent_hop_length == model.hop_length == semantic.hop_length:
            problems.append(
                f"hop lengths differ: config.yaml latent_hop_length {root_config.latent_hop_length}, BiCodec "
                f"{model.hop_length}, wav2vec2 {semantic.hop_length}"
            )
        if root_config.sample_rate != config.mel_params.sample_rate:
            problems.append(
                f"sample rates differ: config.yaml {root_config.sample_rate}, BiCodec {config.mel_params.sample_rate}"
            )
        if problems:
            raise CheckpointError(f"{root}: inconsistent Spark-TTS directory: " + "; ".join(problems))
        logger.info("loaded BiCodec from %s on %s (%s)", root, device, torch_dtype)
        return cls(model, semantic, root_config=root_config, config=config)

    # --- facts the engine needs ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def sample_rate(self) -> int:
        """Input and output sample rate (16000)."""
        return self.root_config.sample_rate

    @property
    def hop_length(self) -> int:
        """Samples per semantic token (320): ``detokenize`` returns exactly ``T * hop_length`` samples."""
        return self.model.hop_length

    @property
    def reference_length(self) -> int:
        """Samples in the speaker clip (96000 = 6 s)."""
        return self.root_config.reference_length

    @property
    def num_global_tokens(self) -> int:
        """Global ids per utterance (32 for one FSQ stage)."""
        spk = self.config.speaker_encoder
        return spk.token_num * spk.fsq_num_quantizers

    @property
    def global_codebook_size(self) -> int:
        """Distinct global ids (4096)."""
        return self.config.speaker_encoder.global_codebook_size

    @property
    def semantic_codebook_size(self) -> int:
        """Distinct semantic ids (8192)."""
        return self.config.quantizer.codebook_size

    def num_semantic_tokens(self, num_samples: int) -> int:
        """Semantic tokens for ``num_samples`` input samples: ``floor((L - 400) / 320) + 1``."""
        return self.semantic.num_frames(num_samples)

    # --- audio → tokens --------------------------------------------------------------------------------------------

    @overload
    def tokenize(self, wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def tokenize(self, wav: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]: ...

    def tokenize(
        self, wav: np.ndarray | Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
        """16 kHz mono float32 waveform(s) → ``(global_ids, semantic_ids)``.

        For one array: ``global_ids`` int64 ``(32,)`` in ``[0, 4096)`` from the first 6 s (tiled when shorter) and
        ``semantic_ids`` int64 ``(T,)`` in ``[0, 8192)`` from the whole waveform, ``T = floor((L - 400) / 320) + 1``.
        For a list: two lists of such arrays, computed as one padded batch. Inputs are not modified.
        """
        single = isinstance(wav, np.ndarray)
        items = [wav] if single else list(wav)  # type: ignore[list-item]
        if not items:
            return [], []
        waves = [_as_wave(w, i, self.semantic.min_samples) for i, w in enumerate(items)]
        device = self.device
        with torch.inference_mode():
            clips = np.stack([reference_clip(w, self.reference_length) for w in waves])
            global_ids = self.model.tokenize_global(torch.from_numpy(clips).to(device))  # (B, Q, N)
            features, frames = self.semantic.extract(waves)  # (B, T_max, H)
            mask = _frame_mask(frames, features.shape[1], device, features.dtype)
            semantic_ids = self.model.tokenize_semantic(features.to(self.dtype), mask)  # (B, T_max)
        global_np = global_ids.reshape(len(waves), -1).cpu().numpy().astype(np.int64)
        semantic_np = semantic_ids.cpu().numpy().astype(np.int64)
        globals_out = [global_np[i].copy() for i in range(len(waves))]
        semantic_out = [semantic_np[i, :n].copy() for i, n in enumerate(frames)]
        if single:
            return globals_out[0], semantic_out[0]
        return globals_out, semantic_out

    # --- tokens → audio --------------------------------------------------------------------------------------------

    @overload
    def detokenize(self, global_ids: np.ndarray, semantic_ids: np.ndarray) -> np.ndarray: ...

    @overload
    def detokenize(self, global_ids: Sequence[np.ndarray], semantic_ids: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def detokenize(
        self,
        global_ids: np.ndarray | Sequence[np.ndarray],
        semantic_ids: np.ndarray | Sequence[np.ndarray],
    ) -> np.ndarray | list[np.ndarray]:
        """``(global_ids (32,), semantic_ids (T,))`` → float32 waveform of exactly ``T * 320`` samples in [-1, 1].

        With lists (one global-id array per semantic-id array) the items run as one padded batch and each output is
        trimmed to its own length. ``semantic_ids`` of length 0 give an empty waveform. Ids out of range raise
        :class:`InvalidRequestError`.
        """
        single = isinstance(semantic_ids, np.ndarray)
        if single != isinstance(global_ids, np.ndarray):
            raise InvalidRequestError("pass either one global-id and one semantic-id array, or two lists of arrays")
        sem_items = [semantic_ids] if single else list(semantic_ids)  # type: ignore[list-item]
        glob_items = [global_ids] if single else list(global_ids)  # type: ignore[list-item]
        if len(sem_items) != len(glob_items):
            raise InvalidRequestError(f"{len(glob_items)} global-id arrays for {len(sem_items)} semantic-id arrays")
        spk = self.config.speaker_encoder
        sems: list[np.ndarray] = []
        globs: list[np.ndarray] = []
        for i, (g, s) in enumerate(zip(glob_items, sem_items, strict=True)):
            g_arr = _as_ids(g, f"global ids {i}", self.global_codebook_size)
            if g_arr.size != self.num_global_tokens:
                raise InvalidRequestError(f"global ids {i}: expected {self.num_global_tokens} ids, got {g_arr.size}")
            s_arr = _as_ids(s, f"semantic ids {i}", self.semantic_codebook_size)
            if s_arr.ndim == 2 and s_arr.shape[0] == 1:
                s_arr = s_arr[0]
            if s_arr.ndim != 1:
                raise InvalidRequestError(f"semantic ids {i} must be 1-D, got shape {s_arr.shape}")
            globs.append(g_arr.reshape(spk.fsq_num_quantizers, spk.token_num))
            sems.append(s_arr)
        outputs = self._detokenize_batch(globs, sems)
        return outputs[0] if single else outputs

    def _detokenize_batch(self, globs: list[np.ndarray], sems: list[np.ndarray]) -> list[np.ndarray]:
        lengths = [s.shape[0] for s in sems]
        longest = max(lengths, default=0)
        if longest == 0:
            return [np.zeros(0, dtype=np.float32) for _ in sems]
        padded = np.zeros((len(sems), longest), dtype=np.int64)
        for row, s in zip(padded, sems, strict=True):
            row[: s.shape[0]] = s
        device = self.device
        with torch.inference_mode():
            semantic = torch.from_numpy(padded).to(device)
            global_ids = torch.from_numpy(np.stack(globs)).to(device)
            mask = _frame_mask(lengths, longest, device, self.dtype)
            wav = self.model.detokenize(semantic, global_ids, mask)  # (B, 1, T_max * hop)
            wav_np = wav[:, 0].float().cpu().numpy()
        hop = self.hop_length
        return [wav_np[i, : n * hop].copy() for i, n in enumerate(lengths)]


def _frame_mask(lengths: Sequence[int], frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, 1, frames)`` mask (1 = real frame), or ``None`` when nothing is padded."""
    if all(n == frames for n in lengths):
        return None
    steps = torch.arange(frames, device=device)
    valid = steps.unsqueeze(0) < torch.tensor(list(lengths), device=device).unsqueeze(1)
    return valid.unsqueeze(1).to(dtype)
