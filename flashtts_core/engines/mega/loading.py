"""Strict loading of the published MegaTTS3 checkpoints (``*.ckpt``) into our modules.

Container (models.md §C.1): a ``torch.save`` pickle ``{"state_dict": {<sub-model>: {key: tensor}}}`` holding only
tensors and plain containers, so it is read with ``torch.load(weights_only=True)`` (no arbitrary code runs). Key
prefixes ``module.`` (DataParallel) and ``_orig_mod.`` (``torch.compile``) are stripped, as the original does.

Unlike the original (``strict=False``), every component is loaded strictly through
:func:`flashtts_core.models.loading.load_state_dict_strict`: every tensor of the file is consumed (or is a known
inference-unused tensor whose shape is verified), every parameter is filled, shapes must match, and errors name the
keys. The one deliberate exception is the WaveVAE **encoder**: it is not published (only ``decoder.ckpt`` is), and
when a full ``model_only_last.ckpt`` is used instead its encoder tensors are skipped with one log line, because voices
come with precomputed latents.

Each module tree is built on the ``meta`` device from the YAML + tensor shapes (:mod:`.config`) and the file's
tensors are assigned into it, so no memory is spent on a random initialisation.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashtts_core.engines.mega.config import (
    MegaGlobalConfig,
    infer_aligner_dims,
    infer_dit_dims,
    infer_duration_dims,
    infer_rel_encoder_dims,
    infer_wavvae_dims,
    load_global_config,
)
from flashtts_core.engines.mega.modeling_aligner import MegaAligner
from flashtts_core.engines.mega.modeling_dit import MegaDiT
from flashtts_core.engines.mega.modeling_dur import MegaDurationLM, duration_unused_prefixes, duration_unused_shapes
from flashtts_core.engines.mega.modeling_wavvae import MegaWaveVAEDecoder
from flashtts_core.errors import CheckpointError
from flashtts_core.models.loading import load_state_dict_strict

__all__ = (
    "CHECKPOINT_FILES",
    "WAVVAE_ENCODER_PREFIXES",
    "MegaModels",
    "find_checkpoint",
    "load_aligner",
    "load_dit",
    "load_duration_lm",
    "load_mega_models",
    "load_wavvae_decoder",
    "read_mega_checkpoint",
)

logger = logging.getLogger(__name__)

#: component folder → (published file name, sub-dict of ``state_dict``).
CHECKPOINT_FILES: dict[str, tuple[str, str]] = {
    "aligner_lm": ("model_only_last.ckpt", "model"),
    "diffusion_transformer": ("model_only_last.ckpt", "dit"),
    "duration_lm": ("model_only_last.ckpt", "dur_model"),
    "wavvae": ("decoder.ckpt", "model_gen"),
}

#: Key prefixes of the unpublished WaveVAE encoder (present only in a full training checkpoint).
WAVVAE_ENCODER_PREFIXES: tuple[str, ...] = ("encoder.", "proj_to_z.")

_STRIP = ("module.", "_orig_mod.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def find_checkpoint(component_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint of one component: the published file name, else the only ``*.ckpt`` of the folder."""
    folder = Path(component_dir)
    name = CHECKPOINT_FILES.get(folder.name, ("model_only_last.ckpt", ""))[0]
    preferred = folder / name
    if preferred.is_file():
        return preferred
    found = sorted(p for p in folder.glob("*.ckpt") if p.is_file())
    if folder.name == "wavvae":
        found = [p for p in found if p.name != "decoder.ckpt"]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{folder} has no {name} (nor any other .ckpt): download the full MegaTTS3 folder")
    raise CheckpointError(f"{folder} has several .ckpt files ({', '.join(p.name for p in found)}); keep only {name}")


def read_mega_checkpoint(path: str | os.PathLike[str], sub: str) -> dict[str, torch.Tensor]:
    """``state_dict[sub]`` of a MegaTTS3 ``.ckpt`` with ``module.``/``_orig_mod.`` stripped (safe unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a loadable MegaTTS3 checkpoint (only tensor pickles are accepted): {exc}"
        ) from exc
    states = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(states, Mapping):
        raise CheckpointError(f"{path} has no 'state_dict' mapping: is this a MegaTTS3 .ckpt?")
    state = states.get(sub)
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path}: state_dict has no {sub!r} entry (found: {', '.join(map(str, states)) or 'none'})"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict[{sub!r}] must map names to tensors; found {key!r}")
        name = _strip(key)
        if name in out:
            raise CheckpointError(f"{path}: key {key!r} duplicates {name!r} once prefixes are stripped")
        out[name] = value
    return out


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _finish(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> None:
    """Inference mode, no gradients, on ``device`` with floating-point tensors in ``dtype``."""
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)


def load_aligner(
    component_dir: str | os.PathLike[str],
    config: MegaGlobalConfig,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MegaAligner:
    path = find_checkpoint(component_dir)
    state = read_mega_checkpoint(path, CHECKPOINT_FILES["aligner_lm"][1])
    dims = infer_aligner_dims(_shapes(state), heads=config.aligner_heads)
    with torch.device("meta"):
        model = MegaAligner(dims)
    load_state_dict_strict(model, state, source=path, assign=True)
    _finish(model, device, dtype)
    return model


def load_dit(
    component_dir: str | os.PathLike[str],
    config: MegaGlobalConfig,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MegaDiT:
    path = find_checkpoint(component_dir)
    state = read_mega_checkpoint(path, CHECKPOINT_FILES["diffusion_transformer"][1])
    dims = infer_dit_dims(_shapes(state), heads=config.dit_heads)
    with torch.device("meta"):
        model = MegaDiT(dims)
    load_state_dict_strict(model, state, source=path, assign=True)
    _finish(model, device, dtype)
    return model


def load_duration_lm(
    component_dir: str | os.PathLike[str],
    config: MegaGlobalConfig,
    yaml_config: Mapping[str, Any],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MegaDurationLM:
    path = find_checkpoint(component_dir)
    state = read_mega_checkpoint(path, CHECKPOINT_FILES["duration_lm"][1])
    shapes = _shapes(state)
    dims = infer_duration_dims(
        shapes, yaml_config, heads=config.dur_num_heads, source=str(Path(component_dir) / "config.yaml")
    )
    text_encoder = infer_rel_encoder_dims(shapes, "encoder.") if dims.lm_use_enc else None
    with torch.device("meta"):
        model = MegaDurationLM(dims, text_encoder)
    load_state_dict_strict(
        model,
        state,
        source=path,
        unused=duration_unused_shapes(dims),
        allowed_extra_prefixes=duration_unused_prefixes(dims),
        assign=True,
    )
    _finish(model, device, dtype)
    return model


def load_wavvae_decoder(
    component_dir: str | os.PathLike[str],
    config: MegaGlobalConfig,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MegaWaveVAEDecoder:
    path = find_checkpoint(component_dir)
    state = read_mega_checkpoint(path, CHECKPOINT_FILES["wavvae"][1])
    encoder_keys = [k for k in state if k.startswith(WAVVAE_ENCODER_PREFIXES)]
    if encoder_keys:
        logger.info(
            "%s: skipping %d WaveVAE encoder tensors (voices bring their latents as .npy files)",
            path,
            len(encoder_keys),
        )
    dims = infer_wavvae_dims({k: v for k, v in _shapes(state).items() if k not in encoder_keys}, config)
    with torch.device("meta"):
        model = MegaWaveVAEDecoder(dims)
    load_state_dict_strict(model, state, source=path, allowed_extra_prefixes=WAVVAE_ENCODER_PREFIXES, assign=True)
    model.fold_weight_norm()  # in float32, before any cast
    _finish(model, device, dtype)
    return model


@dataclass
class MegaModels:
    """Every in-process component of a MegaTTS3 directory (the G2P LLM runs on the backend)."""

    config: MegaGlobalConfig
    aligner: MegaAligner
    dit: MegaDiT
    duration: MegaDurationLM
    wavvae: MegaWaveVAEDecoder

    def check(self) -> None:
        """Cross-component consistency (raises :class:`CheckpointError`)."""
        problems = []
        if self.dit.dims.latent_dim != self.wavvae.dims.latent_dim:
            problems.append(f"DiT latent {self.dit.dims.latent_dim} != WaveVAE latent {self.wavvae.dims.latent_dim}")
        if self.wavvae.samples_per_frame != self.config.hop_size * self.config.vae_stride:
            problems.append("the WaveVAE does not produce hop_size x vae_stride samples per latent frame")
        if self.dit.frames_per_latent != self.config.vae_stride:
            problems.append(f"the DiT downsamples mel frames by {self.dit.frames_per_latent}, not vae_stride")
        if "tone" not in self.duration.ling_label_embed_layers:
            problems.append("the duration LM has no tone embedding")
        if problems:
            raise CheckpointError("inconsistent MegaTTS3 directory: " + "; ".join(problems))


def load_mega_models(
    model_dir: str | os.PathLike[str],
    *,
    aligner_device: str = "cpu",
    device: str = "cpu",
    aligner_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.float32,
) -> MegaModels:
    """Load the aligner (on ``aligner_device`` in ``aligner_dtype``) and the DiT, duration LM and WaveVAE decoder (on
    ``device`` in ``dtype``), strictly.

    A half ``dtype`` stores the weights in it; the model code then runs them under autocast to that dtype (see
    :func:`.modeling_dit.autocast_like`), which keeps norms, softmax and the sampler state in float32.
    """
    root = Path(model_dir)
    config, dur_yaml = load_global_config(root)
    models = MegaModels(
        config=config,
        aligner=load_aligner(root / "aligner_lm", config, aligner_device, aligner_dtype),
        dit=load_dit(root / "diffusion_transformer", config, device, dtype),
        duration=load_duration_lm(root / "duration_lm", config, dur_yaml, device, dtype),
        wavvae=load_wavvae_decoder(root / "wavvae", config, device, dtype),
    )
    models.check()
    logger.info(
        "loaded the MegaTTS3 models from %s (aligner on %s in %s, the rest on %s in %s)",
        root,
        aligner_device,
        aligner_dtype,
        device,
        dtype,
    )
    return models
