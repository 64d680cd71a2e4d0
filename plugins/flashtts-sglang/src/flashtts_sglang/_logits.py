"""The allowed-id mask as an SGLang custom logit processor (imported only at start-up: it needs sglang and torch).

SGLang has no ``allowed_token_ids`` sampling parameter. A custom logit processor is its per-request hook: the
processor class travels to the scheduler process serialised with dill (by reference, so this module must be
importable there: it is, flashtts-sglang is installed in the same environment), and each request passes its own
``custom_params``. The engine must be started with ``enable_custom_logit_processor=True``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

__all__ = ("AllowedTokenIdsProcessor",)

logger = logging.getLogger(__name__)

_MAX_CACHED_MASKS = 32
# (key, vocab, device, dtype) → additive mask. Module level because SGLang instantiates the processor anew for each
# batch; engines send the same allowed set with every request, so the mask is built once per scheduler process.
_MASKS: OrderedDict[tuple[str, int, str, str], Any] = OrderedDict()


class AllowedTokenIdsProcessor(CustomLogitProcessor):
    """Sets every logit outside the request's ``allowed_token_ids`` to -inf (rows without the param untouched)."""

    def __call__(self, logits: Any, custom_param_list: list[dict[str, Any]] | None = None) -> Any:
        if not custom_param_list:
            return logits
        for row, params in enumerate(custom_param_list):
            if not params or params.get("allowed_token_ids") is None:
                continue
            logits[row] += _mask(params, logits)
        return logits


def _mask(params: dict[str, Any], logits: Any) -> Any:
    import torch

    vocab = int(logits.shape[-1])
    key = (str(params.get("allowed_key")), vocab, str(logits.device), str(logits.dtype))
    mask = _MASKS.get(key)
    if mask is None:
        mask = torch.full((vocab,), float("-inf"), dtype=logits.dtype, device=logits.device)
        ids = torch.tensor(params["allowed_token_ids"], dtype=torch.long, device=logits.device)
        mask[ids] = 0.0
        _MASKS[key] = mask
        if len(_MASKS) > _MAX_CACHED_MASKS:
            _MASKS.popitem(last=False)
    else:
        _MASKS.move_to_end(key)
    return mask
