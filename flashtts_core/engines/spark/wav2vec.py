"""Semantic features for BiCodec from the bundled ``wav2vec2-large-xlsr-53/`` folder.

Spark-TTS feeds BiCodec's semantic branch with the average of three intermediate XLSR layers (``hidden_states`` 11,
14 and 16: mid layers carry most phonetic content). We reuse transformers' ``Wav2Vec2Model`` modules (the folder is a
stock Hugging Face checkpoint) but drive them ourselves so that:

* loading is strict: the weight file may be ``pytorch_model.bin`` (read with ``weights_only=True``) or
  ``model.safetensors``, keys may carry the ``wav2vec2.`` prefix of a ``Wav2Vec2ForPreTraining`` file or not, and the
  positional convolution's weight norm may be stored as ``weight_g``/``weight_v`` (older transformers) or
  ``parametrizations.weight.original0/1`` (newer); every encoder tensor must be consumed, missing ones are an error
  naming them, and only the pre-training heads (``quantizer.*``, ``project_hid.*``, ``project_q.*``) are tolerated;
* only the first 16 transformer layers are kept and run (layers 16+ and the final LayerNorm never influence
  ``hidden_states[16]`` of the stable-layer-norm encoder);
* batches of different lengths give the same features as one-by-one calls: inputs are normalised per utterance before
  padding, padded frames are zeroed before the positional convolution and masked out of attention.

``hidden_states[k]`` here means what transformers returns: the input of transformer layer ``k`` (``[0]`` is after the
positional-convolution add).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import Wav2Vec2Config, Wav2Vec2Model
from transformers.masking_utils import create_bidirectional_mask

from flashtts_core.errors import CheckpointError
from flashtts_core.models.loading import load_state_dict_strict, read_safetensors, read_torch_checkpoint

__all__ = ("SPARK_FEATURE_LAYERS", "SparkWav2Vec2Features", "load_wav2vec2_state_dict", "normalize_waveform")

logger = logging.getLogger(__name__)

#: ``hidden_states`` indices averaged into the semantic features (hard-coded by Spark-TTS).
SPARK_FEATURE_LAYERS: tuple[int, ...] = (11, 14, 16)

#: Prefixes of the ``Wav2Vec2ForPreTraining`` heads; tolerated in the file, never loaded.
_PRETRAINING_HEADS = ("quantizer.", "project_hid.", "project_q.")
_PREFIX = "wav2vec2."
_POS_CONV = "encoder.pos_conv_embed.conv."
_WEIGHT_NORM_NAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}
_NORMALIZE_EPS = 1e-7  # Wav2Vec2FeatureExtractor's zero-mean/unit-variance epsilon


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """Per-utterance ``(x - mean) / sqrt(var + 1e-7)`` (population variance) as float32; the input is not modified."""
    x = np.asarray(wav, dtype=np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + _NORMALIZE_EPS)).astype(np.float32, copy=False)


def _find_weights(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory} holds neither model.safetensors nor pytorch_model.bin: copy the wav2vec2-large-xlsr-53 folder "
        "of the Spark-TTS checkpoint unchanged"
    )


def load_wav2vec2_state_dict(path: str | os.PathLike[str], module_keys: Sequence[str]) -> dict[str, Tensor]:
    """Read a wav2vec2 weight file and rename its keys to ``Wav2Vec2Model``'s naming in ``module_keys``.

    Strips the ``wav2vec2.`` prefix of ``ForPreTraining`` files (the heads keep their names and stay extras) and maps
    the positional-convolution weight norm between the ``weight_g/v`` and ``parametrizations`` namings, whichever of
    the two ``module_keys`` uses. No key is dropped here: the strict loader decides.
    """
    path = Path(path)
    raw = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_checkpoint(path)
    own = set(module_keys)
    prefixed = any(key.startswith(_PREFIX) for key in raw)
    renamed: dict[str, Tensor] = {}
    for key, tensor in raw.items():
        name = key[len(_PREFIX) :] if prefixed and key.startswith(_PREFIX) else key
        if name.startswith(_POS_CONV) and name not in own:
            leaf = name[len(_POS_CONV) :]
            for old, new in _WEIGHT_NORM_NAMES.items():
                if leaf == old and _POS_CONV + new in own:
                    name = _POS_CONV + new
                elif leaf == new and _POS_CONV + old in own:
                    name = _POS_CONV + old
        if name in renamed:
            raise CheckpointError(f"{path}: key {key!r} collides with another key after renaming")
        renamed[name] = tensor
    return renamed


def _output_length(length: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    for kernel, stride in zip(kernels, strides, strict=True):
        length = (length - kernel) // stride + 1 if length >= kernel else 0
    return length


def _build_model(config: Wav2Vec2Config, attn_implementation: str) -> Wav2Vec2Model:
    """The wav2vec2 trunk on the meta device with the requested attention kernel (``sdpa`` if that one is not
    usable here)."""
    for kernel in dict.fromkeys((attn_implementation, "sdpa")):
        try:
            config._attn_implementation = kernel
            with torch.device("meta"):
                return Wav2Vec2Model(config)
        except (ImportError, ValueError) as exc:
            logger.warning("wav2vec2 attention %r is not available (%s); using sdpa", kernel, exc)
    raise CheckpointError("no usable attention kernel for wav2vec2 (sdpa failed too)")


class SparkWav2Vec2Features(nn.Module):
    """wav2vec2 trunk truncated after the last layer Spark reads; returns the averaged semantic features."""

    def __init__(
        self,
        model: Wav2Vec2Model,
        *,
        do_normalize: bool = True,
        layers: Sequence[int] = SPARK_FEATURE_LAYERS,
    ) -> None:
        super().__init__()
        self.model = model
        self.do_normalize = do_normalize
        self.layers = tuple(layers)
        config = model.config
        self.hidden_size = int(config.hidden_size)
        self.conv_kernel = tuple(int(k) for k in config.conv_kernel)
        self.conv_stride = tuple(int(s) for s in config.conv_stride)

    @property
    def min_samples(self) -> int:
        """Shortest input that yields one frame (the convolutional receptive field, 400 samples for XLSR)."""
        length = 1
        for kernel, stride in zip(reversed(self.conv_kernel), reversed(self.conv_stride), strict=True):
            length = (length - 1) * stride + kernel
        return length

    @property
    def hop_length(self) -> int:
        """Samples per frame (320 for XLSR)."""
        return int(np.prod(self.conv_stride))

    def num_frames(self, num_samples: int) -> int:
        """Frames for an input of ``num_samples`` samples: ``floor((L - 400) / 320) + 1`` for XLSR."""
        return _output_length(num_samples, self.conv_kernel, self.conv_stride)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        attn_implementation: str = "eager",
    ) -> SparkWav2Vec2Features:
        """Load ``config.json`` (+ ``preprocessor_config.json`` if present) and the weights of a wav2vec2 folder.

        ``attn_implementation`` is the transformers attention kernel of the encoder layers (``eager``, ``sdpa``,
        ``flash_attention_2``); one that cannot be used here (flash-attn not installed) falls back to ``sdpa``
        with a warning, since the features are the same up to float rounding."""
        directory = Path(directory)
        config_path = directory / "config.json"
        try:
            config = Wav2Vec2Config.from_json_file(str(config_path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read wav2vec2 config {config_path}: {exc}") from exc
        needed = max(SPARK_FEATURE_LAYERS)
        if not config.do_stable_layer_norm or config.feat_extract_norm != "layer":
            raise CheckpointError(
                f"{config_path}: expected the stable-layer-norm XLSR layout (do_stable_layer_norm=true, "
                "feat_extract_norm='layer') that Spark-TTS ships"
            )
        if config.num_hidden_layers < needed:
            raise CheckpointError(
                f"{config_path}: num_hidden_layers {config.num_hidden_layers} < {needed}; Spark reads hidden_states"
                f"{list(SPARK_FEATURE_LAYERS)}"
            )
        do_normalize = True
        preprocessor = directory / "preprocessor_config.json"
        if preprocessor.is_file():
            try:
                pre: dict[str, Any] = json.loads(preprocessor.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read {preprocessor}: {exc}") from exc
            do_normalize = bool(pre.get("do_normalize", True))
        weights = _find_weights(directory)

        model = _build_model(config, attn_implementation)
        full_shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        # Keep only the layers that feed hidden_states[16]; the rest are verified and dropped.
        model.encoder.layers = model.encoder.layers[:needed]
        kept = set(model.state_dict(keep_vars=True))
        unused = {k: s for k, s in full_shapes.items() if k not in kept}
        state = load_wav2vec2_state_dict(weights, list(full_shapes))
        load_state_dict_strict(
            model, state, source=weights, unused=unused, allowed_extra_prefixes=_PRETRAINING_HEADS, assign=True
        )
        conv = model.encoder.pos_conv_embed.conv
        if parametrize.is_parametrized(conv, "weight"):
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        model.eval().to(device=device, dtype=dtype or torch.float32)
        logger.info("loaded wav2vec2 from %s (%d of %d layers kept)", weights, needed, config.num_hidden_layers)
        return cls(model, do_normalize=do_normalize)

    def forward(self, input_values: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Normalised, right-padded samples ``(B, L)`` (+ true ``lengths`` ``(B,)``) → time-major ``(B, T, H)``.

        Frames past an item's own length are garbage and must be dropped by the caller (see :meth:`num_frames`).
        """
        hidden = self.model.feature_extractor(input_values).transpose(1, 2)  # (B, T, C_conv)
        hidden, _ = self.model.feature_projection(hidden)  # (B, T, H)
        attention_mask = None
        if lengths is not None:
            frames = torch.tensor([self.num_frames(int(n)) for n in lengths], device=hidden.device)
            valid = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0) < frames.unsqueeze(1)
            if not bool(valid.all()):
                hidden = hidden.masked_fill(~valid.unsqueeze(-1), 0.0)
                attention_mask = create_bidirectional_mask(
                    config=self.model.config, inputs_embeds=hidden, attention_mask=valid
                )
        hidden = hidden + self.model.encoder.pos_conv_embed(hidden)
        states = [hidden]
        for layer in self.model.encoder.layers[: max(self.layers)]:
            out = layer(hidden, attention_mask=attention_mask)
            hidden = out[0] if isinstance(out, tuple) else out
            states.append(hidden)
        return torch.stack([states[k] for k in self.layers]).mean(dim=0)

    def extract(self, wavs: Sequence[np.ndarray]) -> tuple[Tensor, list[int]]:
        """Batch of 1-D float waveforms → padded features ``(B, T_max, H)`` and each item's frame count.

        Each waveform is normalised on its own samples (if the preprocessor says so), then zero-padded.
        """
        param = next(self.model.parameters())
        lengths = [int(w.shape[0]) for w in wavs]
        batch = np.zeros((len(wavs), max(lengths)), dtype=np.float32)
        for row, wav in zip(batch, wavs, strict=True):
            row[: wav.shape[0]] = normalize_waveform(wav) if self.do_normalize else wav
        inputs = torch.from_numpy(batch).to(device=param.device, dtype=param.dtype)
        lengths_t = torch.tensor(lengths) if len(set(lengths)) > 1 else None
        features = self.forward(inputs, lengths_t)
        return features, [self.num_frames(n) for n in lengths]
