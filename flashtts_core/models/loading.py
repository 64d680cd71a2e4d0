"""Strict checkpoint loading shared by every model family.

Why this exists: the original projects load their published files with ``strict=False`` and only *print* what is
missing, so a renamed, truncated or wrong checkpoint silently yields garbage audio. We load the published files
unchanged but insist that every tensor is accounted for:

* every parameter and persistent buffer of the module is filled from the file, with the same shape;
* every tensor of the file is either loaded, or declared *known but unused* (its expected shape is given and verified,
  e.g. a training-only head we do not build), or matched by an explicitly allowed extra prefix (tolerated without
  verification, e.g. the pre-training heads of a wav2vec2 ``ForPreTraining`` file);
* anything else raises :class:`~flashtts_core.errors.CheckpointError` naming the file and the offending keys
  (missing / unexpected / wrong shape with both shapes).

torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from flashtts_core.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = (
    "LoadReport",
    "check_state_dict",
    "load_state_dict_strict",
    "read_safetensors",
    "read_safetensors_shapes",
    "read_torch_checkpoint",
    "state_dict_shapes",
)

logger = logging.getLogger(__name__)

#: How many keys of one category an error message lists before it says "and N more".
_MAX_LISTED = 12

Shape = tuple[int, ...]


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a strict load did with the tensors of one file."""

    source: str
    #: Keys copied into the module.
    loaded: tuple[str, ...]
    #: Keys recognised as part of the checkpoint, shape-verified, and deliberately not kept (unused at inference).
    unused: tuple[str, ...]
    #: Keys tolerated through an allowed extra prefix (not verified).
    extra: tuple[str, ...]


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    if len(keys) > _MAX_LISTED:
        shown += f", ... and {len(keys) - _MAX_LISTED} more"
    return shown


def _raise_mismatch(
    source: str | os.PathLike[str],
    missing: Sequence[str],
    unexpected: Sequence[str],
    wrong: Sequence[str],
) -> None:
    parts: list[str] = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes/dtypes ({len(wrong)}): {_listing(wrong)}")
    raise CheckpointError(
        f"checkpoint {os.fspath(source)} does not match the model: "
        + "; ".join(parts)
        + ". Use the published checkpoint files unchanged (a partial download, an edited config or a file of another "
        "model gives this error)."
    )


def check_state_dict(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    *,
    source: str | os.PathLike[str],
    unused: Mapping[str, Sequence[int]] | None = None,
    allowed_extra_prefixes: Sequence[str] = (),
) -> LoadReport:
    """Compare key sets and shapes (no tensors involved) and raise :class:`CheckpointError` on any mismatch.

    ``expected`` maps the module's keys to shapes; ``found`` the file's keys to shapes. ``unused`` lists keys that must
    be present in the file with exactly these shapes but are not loaded. Keys starting with one of
    ``allowed_extra_prefixes`` may be present or absent and are not verified. Returns the partition of ``found``.
    """
    unused = unused or {}
    overlap = sorted(set(expected) & set(unused))
    if overlap:
        raise ValueError(f"keys declared both loaded and unused: {_listing(overlap)}")
    prefixes = tuple(allowed_extra_prefixes)
    missing = sorted(k for k in (*expected, *unused) if k not in found)
    unexpected: list[str] = []
    wrong: list[str] = []
    loaded: list[str] = []
    skipped: list[str] = []
    extra: list[str] = []
    for key in sorted(found):
        shape = tuple(int(d) for d in found[key])
        if key in expected or key in unused:
            want = tuple(int(d) for d in (expected[key] if key in expected else unused[key]))
            if shape != want:
                wrong.append(f"{key}: file {_fmt_shape(shape)} vs expected {_fmt_shape(want)}")
            elif key in expected:
                loaded.append(key)
            else:
                skipped.append(key)
        elif prefixes and key.startswith(prefixes):
            extra.append(key)
        else:
            unexpected.append(key)
    if missing or unexpected or wrong:
        _raise_mismatch(source, missing, unexpected, wrong)
    return LoadReport(source=os.fspath(source), loaded=tuple(loaded), unused=tuple(skipped), extra=tuple(extra))


def state_dict_shapes(module: torch.nn.Module) -> dict[str, Shape]:
    """Shapes of the module's parameters and persistent buffers, keyed like ``state_dict()`` (works on meta)."""
    return {key: tuple(value.shape) for key, value in module.state_dict(keep_vars=True).items()}


def load_state_dict_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike[str],
    unused: Mapping[str, Sequence[int]] | None = None,
    allowed_extra_prefixes: Sequence[str] = (),
    assign: bool = False,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` so that every tensor is consumed and every parameter filled.

    ``source`` is the file path used in error messages. ``unused`` and ``allowed_extra_prefixes`` are described in
    :func:`check_state_dict`. A floating-point tensor where the module holds an integer one (or vice versa) is also a
    mismatch. With ``assign=True`` the file's tensors replace the module's (the way to fill a module built on the
    ``meta`` device); afterwards no parameter or buffer may remain on ``meta``.

    Raises :class:`CheckpointError` naming every offending key; the module is untouched in that case.
    """
    own = module.state_dict(keep_vars=True)
    report = check_state_dict(
        {k: tuple(v.shape) for k, v in own.items()},
        {k: tuple(v.shape) for k, v in state_dict.items()},
        source=source,
        unused=unused,
        allowed_extra_prefixes=allowed_extra_prefixes,
    )
    wrong_kind = [
        f"{key}: file {state_dict[key].dtype} vs expected {own[key].dtype}"
        for key in report.loaded
        if state_dict[key].is_floating_point() != own[key].is_floating_point()
    ]
    if wrong_kind:
        _raise_mismatch(source, (), (), wrong_kind)
    module.load_state_dict({k: state_dict[k] for k in report.loaded}, strict=True, assign=assign)
    if assign:
        left = [name for name, t in _named_tensors(module) if t.is_meta]
        if left:
            raise CheckpointError(
                f"checkpoint {os.fspath(source)} left tensors unfilled (not in the state dict and not computed): "
                f"{_listing(left)}"
            )
    logger.debug(
        "loaded %s: %d tensors, %d known unused, %d tolerated extras",
        report.source,
        len(report.loaded),
        len(report.unused),
        len(report.extra),
    )
    return report


def _named_tensors(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def read_safetensors_shapes(path: str | os.PathLike[str]) -> dict[str, Shape]:
    """Read only the header of a ``.safetensors`` file: key → shape (no tensor data, no torch).

    The format starts with a little-endian u64 header length followed by a JSON object; ``__metadata__`` is skipped.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header: dict[str, Any] = json.loads(fh.read(length))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} not found") from exc
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return {key: tuple(int(d) for d in info["shape"]) for key, info in header.items() if key != "__metadata__"}


def read_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a ``.safetensors`` file; unreadable files raise :class:`CheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def read_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a ``torch.save`` state dict (``pytorch_model.bin``) safely (``weights_only=True``) onto the CPU."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a loadable torch state dict: {exc}") from exc
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path} does not hold a flat state dict (str -> tensor)")
    return dict(obj)
