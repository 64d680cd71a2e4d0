"""The SNAC 24 kHz decoder that turns Orpheus audio frames into PCM (models.md §B.5).

Loaded from a *local* folder laid out like ``hubertsiuzdak/snac_24khz`` (``config.json`` + ``pytorch_model.bin``)
with the ``snac`` package's own module classes — never from the hub. Loading is strict, unlike the original's
``strict=False``: the whole model (encoder included, since the published file carries it) is built from
``config.json`` and every tensor of the file must fill a parameter of the same shape and vice versa, otherwise a
:class:`~flashtts_core.errors.CheckpointError` names the offending keys. Weight norm is folded after loading (the
parametrisation would otherwise recompute every weight on every call) and the encoder, which decoding never uses,
is dropped to save memory.

The decoder's ``NoiseBlock`` layers add fresh Gaussian noise on every call, as in the original; so two decodes of
the same codes differ slightly (by an amount the trained model learned to keep inaudible).

This module imports torch at module level; the engine imports it lazily in ``startup``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashtts_core.engines.orpheus.tokens import CODEBOOK_SIZE, FRAME_SLOTS, frames_to_snac_codes
from flashtts_core.errors import CheckpointError
from flashtts_core.models.loading import load_state_dict_strict, read_torch_checkpoint

__all__ = ("SNAC_FILES", "SnacDecoder", "load_snac", "read_snac_config", "resolve_snac_dir")

logger = logging.getLogger(__name__)

#: The two files of a SNAC folder.
SNAC_FILES = ("config.json", "pytorch_model.bin")

# The 7-slot frame layout hard-wires three codebooks of 4096 codes with temporal strides 4, 2, 1.
_REQUIRED_STRIDES = [4, 2, 1]


def resolve_snac_dir(model_dir: str | os.PathLike[str], snac_path: str | None) -> Path:
    """``snac_path`` if given, else ``<model_dir>/snac``; a missing folder or file is a :class:`CheckpointError`."""
    path = Path(snac_path).expanduser() if snac_path else Path(model_dir) / "snac"
    if not path.is_dir():
        where = "--snac_path" if snac_path else f"{Path(model_dir)}/snac"
        raise CheckpointError(
            f"the SNAC decoder folder {path} does not exist ({where}); download hubertsiuzdak/snac_24khz "
            "(config.json + pytorch_model.bin) into <model_path>/snac or pass --snac_path"
        )
    missing = [name for name in SNAC_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"the SNAC folder {path} lacks {', '.join(missing)} (expected {', '.join(SNAC_FILES)})")
    return path


def read_snac_config(snac_dir: Path) -> dict[str, Any]:
    """``config.json`` of a SNAC folder, checked against what the Orpheus frame layout needs."""
    path = Path(snac_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    problems = []
    if config.get("codebook_size") != CODEBOOK_SIZE:
        problems.append(f"codebook_size {config.get('codebook_size')!r} (Orpheus needs {CODEBOOK_SIZE})")
    if list(config.get("vq_strides") or []) != _REQUIRED_STRIDES:
        problems.append(f"vq_strides {config.get('vq_strides')!r} (Orpheus needs {_REQUIRED_STRIDES})")
    rates = config.get("decoder_rates")
    if not isinstance(rates, list) or not rates or not all(isinstance(r, int) and r > 0 for r in rates):
        problems.append(f"decoder_rates {rates!r} (a list of positive ints)")
    if problems:
        raise CheckpointError(f"{path} is not a SNAC config Orpheus can use: {'; '.join(problems)}")
    return config


class SnacDecoder:
    """A loaded SNAC model with a numpy batch API: frames ``(F, 7)`` → mono float32 PCM ``(F · 2048,)``."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], device: torch.device, source: Path) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.source = source
        #: Output sample rate (24000 for snac_24khz).
        self.sample_rate = int(config.get("sampling_rate", 24000))
        #: Samples per finest code (the decoder's hop) × finest codes per frame (4) = 2048 for snac_24khz.
        self.samples_per_frame = math.prod(config["decoder_rates"]) * _REQUIRED_STRIDES[0]

    def decode(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Decode each window of frames (an int array ``(F_i, 7)``) to ``F_i · samples_per_frame`` float32 samples.

        Windows of equal length share one forward pass. No padding is ever added: padding a window with extra codes
        would change the audio near its end (the decoder's convolutions see those codes), so unequal windows run in
        separate passes instead.
        """
        results: list[np.ndarray | None] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for index, window in enumerate(windows):
            window = np.asarray(window)
            if window.ndim != 2 or window.shape[1] != FRAME_SLOTS or window.shape[0] == 0:
                raise ValueError(f"a window must have shape (F >= 1, {FRAME_SLOTS}), got {window.shape}")
            by_length.setdefault(window.shape[0], []).append(index)
        with torch.inference_mode():
            for indices in by_length.values():
                stacked = np.stack([np.asarray(windows[i], dtype=np.int64) for i in indices])  # (B, F, 7)
                codes = [torch.from_numpy(c).to(self.device) for c in frames_to_snac_codes(stacked)]
                audio = self.model.decode(codes)  # (B, 1, F · samples_per_frame)
                audio = audio[:, 0, :].float().cpu().numpy()
                for row, i in enumerate(indices):
                    results[i] = np.ascontiguousarray(audio[row], dtype=np.float32)
        return [r for r in results if r is not None]


def _fold_weight_norm(model: torch.nn.Module) -> int:
    """Replace every weight-norm parametrisation by its current weight; returns how many were folded."""
    from torch.nn.utils import parametrize

    folded = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded += 1
    return folded


def load_snac(snac_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SnacDecoder:
    """Build SNAC from ``config.json``, load ``pytorch_model.bin`` strictly, fold weight norm, move to ``device``."""
    from snac import SNAC

    snac_dir = Path(snac_dir)
    config = read_snac_config(snac_dir)
    try:
        model = SNAC(**config)
    except TypeError as exc:
        raise CheckpointError(f"{snac_dir / 'config.json'} has settings the snac package does not know: {exc}") from exc
    weights = snac_dir / "pytorch_model.bin"
    state = read_torch_checkpoint(weights)
    load_state_dict_strict(model, state, source=weights)
    del state
    if config.get("attn_window_size") is not None:
        logger.warning(
            "%s uses local attention (attn_window_size=%s); the windowed decoding's context was sized for the "
            "attention-free snac_24khz, so chunk seams may differ slightly from a one-shot decode",
            snac_dir,
            config["attn_window_size"],
        )
    model.encoder = torch.nn.Identity()  # encoding is never needed; frees about a third of the weights
    folded = _fold_weight_norm(model)
    model.eval().to(device=device, dtype=torch.float32)
    logger.debug("SNAC decoder loaded from %s on %s (%d weight-norm layers folded)", snac_dir, device, folded)
    return SnacDecoder(model, config, torch.device(device), snac_dir)
