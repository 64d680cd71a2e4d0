"""``--backend_option key=value`` settings of the mlx-lm backend."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ("MlxOptions",)


class MlxOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Backend-specific options; unknown keys are an error naming the known ones (typos must not pass silently)."""

    # Prompt tokens pushed through the model per step while a prompt is prefilled. mlx-lm's default is 2048; a
    # smaller step lets running sequences get their next token sooner while a long prompt joins the batch.
    prefill_step_size: Annotated[int, Meta(ge=16, le=65536)] = 512
    # How many of the most recent ids (prompt + generated) repetition_penalty looks at. None: all of them, which is
    # what transformers (and the other FlashTTS backends) do; mlx-lm's own default is the last 20.
    repetition_context_size: Annotated[int, Meta(ge=1)] | None = None
    # Let mlx-lm run modelling code shipped with the checkpoint (only for architectures mlx-lm does not know).
    trust_remote_code: bool = False
