"""Static slot KV cache and (on CUDA) graph-captured decoding for Llama-family decoders.

Why: the dynamic path calls the transformers model for every decoding step. On a GPU a step of a 0.5B model is a
thousand small kernels launched one by one from Python, so the step time is launch overhead, not arithmetic. Here the
KV cache is preallocated once, at fixed addresses, so that the whole decoding step of a batch can be recorded as one
CUDA graph and replayed with a single launch.

Which models: the decoder layers of Llama, Mistral, Qwen2 and Qwen3 as transformers implements them (pre-norm
blocks, q/k/v/o projections, optional per-head q/k RMSNorm (Qwen3), RoPE, a gated MLP). The loaded modules are
reused as they are (``q_proj(x)``, ``mlp(x)``, the norms, ``rotary_emb``), so weights, biases, activation and every
position-independent RoPE scaling (linear, llama3, yarn, ...) come from transformers; only the attention and the
cache handling are written here. :func:`inspect_layout` refuses anything else.

Cache layout: keys and values of every layer in one tensor each, ``(layers, slots, kv_heads, cache_len, head_dim)``,
``slots`` = ``max_batch_size``. The active sequences are kept compacted in slots ``0..b-1`` (row ``i`` of the
scheduler's batch is slot ``i``): when rows leave, the last rows move into the holes (only their used columns are
copied), so a step of ``b`` rows reads the contiguous views ``cache[:, :b]``, no gather. A sequence's token at
position ``p`` lives in column ``p``; nothing is padded, each row's attention mask is ``column <= position``.

Decoding step of ``b`` rows (:meth:`StaticDecoder._step`): ids and positions come from two static buffers
``(slots,)``; the batch is padded to a bucket ``B`` (1, 2, 4, ... up to ``slots``) and attention reads ``L`` columns,
``L`` a length bucket (256, 512, ... up to ``cache_len``) above the longest row. Padded rows get id 0 at position 0 in
slots no sequence uses, so their cache writes land in free slots and their outputs are ignored. On CUDA (with
``cuda_graphs``) each ``(B, L)`` pair is captured once, lazily, into a graph sharing one memory pool with the others;
a step then is: copy ids/positions into the buffers, replay, read ``logits[:b]``. Sampling stays outside the graph
(the scheduler's ``sample_batch``). Without graphs on CUDA the same function runs eagerly with the same buckets; on
the CPU it runs eagerly at the exact batch size over exactly the columns the longest row needs (no graph to reuse).

Prefill runs eagerly, one sequence at a time: causal attention over its own prompt, keys/values written into the
next free slot, logits of the last position only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashtts_torch._runtime import VocabSubset

__all__ = (
    "MIN_LENGTH_BUCKET",
    "SUBSET_COPY_BYTES",
    "SUBSET_COPY_SHARE",
    "SUPPORTED_ARCHITECTURES",
    "ModelLayout",
    "StaticDecoder",
    "UnsupportedModelError",
    "apply_rope",
    "batch_buckets",
    "inspect_layout",
    "length_buckets",
    "rotate_half",
)

logger = logging.getLogger(__name__)

#: Model classes whose decoder layers the static path implements (checked together with the module layout).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

#: A vocabulary subset above this share of the vocabulary gets its own copy of the output projection's rows only
#: when that copy takes at most SUBSET_COPY_BYTES (:meth:`StaticDecoder.vocab_subset`).
SUBSET_COPY_SHARE = 0.9
SUBSET_COPY_BYTES = 64 * 2**20

#: Smallest attention length bucket (columns read by a decoding step); buckets double up to the cache length.
MIN_LENGTH_BUCKET = 256

# Graph capture needs a few eager runs first (cuBLAS/SDPA workspaces, lazy initialisation) on a side stream.
_WARMUP_RUNS = 2

Module = Callable[[torch.Tensor], torch.Tensor]


class UnsupportedModelError(ValueError):
    """The loaded model is not one the static path can run; the message says why."""


@dataclass(frozen=True)
class _Layer:
    """The modules of one decoder layer that the static path calls, and its attention scale."""

    input_norm: Module
    q_proj: Module
    k_proj: Module
    v_proj: Module
    o_proj: Module
    q_norm: Module | None
    k_norm: Module | None
    post_norm: Module
    mlp: Module
    scaling: float


@dataclass(frozen=True)
class ModelLayout:
    """What :func:`inspect_layout` found: the modules to call and the attention shape shared by every layer."""

    embed: Module
    layers: tuple[_Layer, ...]
    norm: Module
    lm_head: Module
    rotary_emb: Any  # rotary_emb(x, position_ids (1, n)) -> (cos, sin), each (1, n, head_dim)
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


def _out_features(module: Any) -> int | None:
    features = getattr(module, "out_features", None)
    if isinstance(features, int):
        return features
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _sliding_window_problem(config: Any, cache_len: int) -> str | None:
    """Why sliding-window attention rules the static path out, or ``None`` when no window is active or the window
    covers the whole cache (then it never hides a key and full attention is the same thing)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        active = "sliding_attention" in layer_types
    elif hasattr(config, "use_sliding_window"):  # Qwen2/Qwen3 configs of older transformers
        active = bool(config.use_sliding_window)
    else:  # Mistral: a window, when set, applies to every layer
        active = True
    if not active or int(window) >= cache_len:
        return None
    return (
        f"sliding-window attention (window {window}) is active and shorter than the static cache ({cache_len} "
        f"columns); set static_cache_len <= {window} or use cache_implementation=dynamic"
    )


def inspect_layout(model: nn.Module, cache_len: int) -> ModelLayout:
    """Check that ``model`` is a supported Llama-family decoder and collect the modules the static path calls.

    Raises :class:`UnsupportedModelError` naming what does not fit (architecture, module layout, sliding window
    shorter than ``cache_len``, a RoPE type whose frequencies depend on the sequence length).
    """
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"the architecture is {name}")
    inner = getattr(model, "model", None)
    missing = [attr for attr in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, attr)]
    lm_head = getattr(model, "lm_head", None)
    if missing or not callable(lm_head):
        what = ", ".join([f"model.{attr}" for attr in missing] + ([] if callable(lm_head) else ["lm_head"]))
        raise UnsupportedModelError(f"{name} lacks {what} (not the transformers module layout)")
    assert inner is not None
    config = model.config
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or "longrope" in rope_type:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} recomputes its frequencies from the sequence length at every step"
        )
    problem = _sliding_window_problem(config, cache_len)
    if problem is not None:
        raise UnsupportedModelError(problem)
    count = int(getattr(config, "num_hidden_layers", len(inner.layers)))
    layers: list[_Layer] = []
    shape: tuple[int, int, int] | None = None
    for index, layer in enumerate(list(inner.layers)[:count]):
        attn = getattr(layer, "self_attn", None)
        parts: dict[str, Any] = {
            "self_attn.q_proj": getattr(attn, "q_proj", None),
            "self_attn.k_proj": getattr(attn, "k_proj", None),
            "self_attn.v_proj": getattr(attn, "v_proj", None),
            "self_attn.o_proj": getattr(attn, "o_proj", None),
            "mlp": getattr(layer, "mlp", None),
            "input_layernorm": getattr(layer, "input_layernorm", None),
            "post_attention_layernorm": getattr(layer, "post_attention_layernorm", None),
        }
        absent = [key for key, module in parts.items() if not callable(module)]
        if absent:
            raise UnsupportedModelError(f"decoder layer {index} lacks {', '.join(absent)}")
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if (q_norm is None) != (k_norm is None):
            raise UnsupportedModelError(f"decoder layer {index} has only one of q_norm/k_norm")
        head_dim = getattr(attn, "head_dim", None)
        q_out, k_out, v_out = (_out_features(parts[f"self_attn.{p}_proj"]) for p in "qkv")
        if not isinstance(head_dim, int) or None in (q_out, k_out, v_out):
            raise UnsupportedModelError(f"decoder layer {index}: cannot read the attention shape")
        assert q_out is not None and k_out is not None
        heads, kv_heads = q_out // head_dim, k_out // head_dim
        if q_out % head_dim or k_out % head_dim or k_out != v_out or not kv_heads or heads % kv_heads:
            raise UnsupportedModelError(f"decoder layer {index}: unexpected projection sizes")
        if shape is not None and shape != (heads, kv_heads, head_dim):
            raise UnsupportedModelError("the decoder layers differ in their attention shapes")
        shape = (heads, kv_heads, head_dim)
        scaling = getattr(attn, "scaling", None)
        layers.append(
            _Layer(
                input_norm=parts["input_layernorm"],
                q_proj=parts["self_attn.q_proj"],
                k_proj=parts["self_attn.k_proj"],
                v_proj=parts["self_attn.v_proj"],
                o_proj=parts["self_attn.o_proj"],
                q_norm=q_norm,
                k_norm=k_norm,
                post_norm=parts["post_attention_layernorm"],
                mlp=parts["mlp"],
                scaling=float(scaling) if isinstance(scaling, (int, float)) else head_dim**-0.5,
            )
        )
    if shape is None:
        raise UnsupportedModelError(f"{name} has no decoder layers")
    vocab_size = _out_features(lm_head)
    if vocab_size is None:
        raise UnsupportedModelError("cannot read the vocabulary size from lm_head")
    heads, kv_heads, head_dim = shape
    embed_weight = getattr(inner.embed_tokens, "weight", None)
    if not isinstance(embed_weight, torch.Tensor) or embed_weight.dim() != 2:
        raise UnsupportedModelError("cannot read the hidden size from model.embed_tokens")
    return ModelLayout(
        embed=inner.embed_tokens,
        layers=tuple(layers),
        norm=inner.norm,
        lm_head=lm_head,
        rotary_emb=inner.rotary_emb,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=int(embed_weight.shape[1]),
        vocab_size=vocab_size,
    )


def batch_buckets(slots: int) -> list[int]:
    """Padded batch sizes of a decoding step: powers of two below ``slots``, then ``slots``."""
    buckets = [1]
    while buckets[-1] * 2 < slots:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != slots:
        buckets.append(slots)
    return buckets


def length_buckets(cache_len: int) -> list[int]:
    """Attention lengths of a decoding step: powers of two from :data:`MIN_LENGTH_BUCKET` below ``cache_len``, then
    ``cache_len``."""
    buckets: list[int] = []
    size = MIN_LENGTH_BUCKET
    while size < cache_len:
        buckets.append(size)
        size *= 2
    buckets.append(cache_len)
    return buckets


def _smallest_at_least(buckets: Sequence[int], value: int) -> int:
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} is above the largest bucket {buckets[-1]}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` → ``(..., d)``: the halves ``[a, b]`` of the last dimension become ``[-b, a]``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the "rotate half" convention: ``x * cos + rotate_half(x) * sin``.

    ``x`` ``(..., d)``; ``cos``/``sin`` broadcastable to it (the angle of dimension ``i`` and ``i + d/2`` is the
    same, as ``rotary_emb`` returns them)."""
    return x * cos + rotate_half(x) * sin


class StaticDecoder:
    """The static-cache decoding path behind the scheduler of :class:`flashtts_torch._runtime.TorchRuntime`.

    Same interface as the dynamic path: :meth:`prefill` one prompt (into the next free slot), :meth:`join` it as the
    last batch row, :meth:`decode` one step for every row, :meth:`drop` rows (returns the new row order). Used by the
    scheduler thread only; construct it under ``torch.inference_mode()``.
    """

    def __init__(
        self,
        layout: ModelLayout,
        *,
        slots: int,
        cache_len: int,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool,
    ) -> None:
        self._layout = layout
        self.slots = slots
        self.capacity = cache_len
        self.device = device
        self.use_graphs = cuda_graphs and device.type == "cuda"
        # CUDA pads every step to its (batch, length) bucket: one graph per bucket, and eager steps (no graphs, or a
        # failed capture) use the same shapes, hence the same kernels and ids. The CPU has no graph to reuse, so it
        # runs the exact batch over exactly the columns the longest row needs (padding would only cost time).
        self.pad_to_buckets = device.type == "cuda"
        self.graphs_captured = 0
        self._batch_buckets = batch_buckets(slots)
        self._length_buckets = length_buckets(cache_len)
        self._groups = layout.heads // layout.kv_heads
        cache_shape = (len(layout.layers), slots, layout.kv_heads, cache_len, layout.head_dim)
        self._keys = torch.zeros(cache_shape, dtype=dtype, device=device)
        self._values = torch.zeros(cache_shape, dtype=dtype, device=device)
        # RoPE of every position, once: (cache_len, head_dim) each, in the model dtype (what rotary_emb returns).
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = layout.rotary_emb(probe, torch.arange(cache_len, device=device)[None])
        self._cos, self._sin = cos[0].to(dtype), sin[0].to(dtype)
        self._rows = torch.arange(slots, device=device)
        self._heads = torch.arange(layout.kv_heads, device=device)
        self._columns = torch.arange(cache_len, device=device)
        self._mask_values = torch.tensor([0.0, float("-inf")], dtype=dtype, device=device)  # visible, hidden
        # Static step inputs: row 0 the ids, row 1 the positions (the column each row's token goes to).
        self._io = torch.zeros((2, slots), dtype=torch.long, device=device)
        # The step's output: the final-normed hidden state of each row (the output projection runs after the step,
        # over the whole vocabulary or a request's allowed ids, so that one captured graph serves both).
        self._hidden = torch.zeros((slots, layout.hidden_size), dtype=dtype, device=device)
        self._lengths: list[int] = []  # tokens in the cache of each active row (row i = slot i)
        self._pending: int | None = None  # prompt length of a prefilled, not yet joined sequence
        self._graphs: dict[tuple[int, int], Any] = {}
        self._pool: Any = None
        self._side_stream: Any = None
        if self.use_graphs:
            self._pool = torch.cuda.graph_pool_handle()
            self._side_stream = torch.cuda.Stream(device=device)

    @staticmethod
    def cache_size(layout: ModelLayout, *, slots: int, cache_len: int, dtype: torch.dtype) -> int:
        """Bytes of the keys and values of a cache of ``slots`` x ``cache_len``."""
        item = torch.empty(0, dtype=dtype).element_size()
        return 2 * len(layout.layers) * slots * layout.kv_heads * cache_len * layout.head_dim * item

    @property
    def cache_bytes(self) -> int:
        """Bytes of this decoder's keys and values."""
        return 2 * self._keys.numel() * self._keys.element_size()

    @property
    def num_rows(self) -> int:
        return len(self._lengths)

    # --- scheduler interface ---------------------------------------------------------------------------------

    def vocab_subset(self, ids: torch.Tensor) -> VocabSubset:
        """``ids`` as a vocabulary of their own, with a copy of their rows of the output projection. Full logits,
        then sliced, where that copy is not worth it: an ``lm_head`` of another kind than a plain linear layer, or a
        subset that is nearly the whole vocabulary (the projection would shrink by a few percent) and whose copy
        would be large (over :data:`SUBSET_COPY_BYTES`; a small one always pays, the mask pass it saves included)."""
        lm_head = self._layout.lm_head
        vocab_size = self._layout.vocab_size
        if not isinstance(lm_head, nn.Linear):
            return VocabSubset(ids, vocab_size)
        copy_bytes = ids.numel() * lm_head.weight.shape[1] * lm_head.weight.element_size()
        if ids.numel() > SUBSET_COPY_SHARE * vocab_size and copy_bytes > SUBSET_COPY_BYTES:
            return VocabSubset(ids, vocab_size)
        bias = None if lm_head.bias is None else lm_head.bias.index_select(0, ids)
        return VocabSubset(ids, vocab_size, lm_head.weight.index_select(0, ids), bias)

    def _project(self, hidden: torch.Tensor, vocab: VocabSubset | None) -> torch.Tensor:
        """Logits of final-normed hidden states ``(rows, hidden)``: ``(rows, vocab)``, or ``(rows, n)``."""
        if vocab is None:
            return self._layout.lm_head(hidden)
        return vocab.project(hidden, self._layout.lm_head)

    def prefill(self, prompt: Sequence[int], vocab: VocabSubset | None = None) -> torch.Tensor:
        """Run ``prompt`` (``S`` ids) alone, write its keys/values into slot ``num_rows`` at columns ``0..S-1``;
        returns the logits of its last position, ``(1, vocab)`` (over ``vocab`` when given: ``(1, n)``)."""
        size = len(prompt)
        slot = len(self._lengths)
        if size > self.capacity:
            raise ValueError(f"the prompt has {size} tokens but the static cache holds {self.capacity}")
        if slot >= self.slots:
            raise RuntimeError(f"no free slot in the static cache ({self.slots} slots)")
        layout = self._layout
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        x = layout.embed(ids)[None]  # (1, S, hidden)
        cos, sin = self._cos[:size], self._sin[:size]  # (S, head_dim), broadcast over (1, heads, S, head_dim)
        for index, layer in enumerate(layout.layers):
            h = layer.input_norm(x)
            q = layer.q_proj(h).view(1, size, layout.heads, layout.head_dim)
            k = layer.k_proj(h).view(1, size, layout.kv_heads, layout.head_dim)
            v = layer.v_proj(h).view(1, size, layout.kv_heads, layout.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin)  # (1, heads, S, head_dim)
            k = apply_rope(k.transpose(1, 2), cos, sin)  # (1, kv_heads, S, head_dim)
            v = v.transpose(1, 2)
            self._keys[index, slot, :, :size] = k[0]
            self._values[index, slot, :, :size] = v[0]
            if self._groups > 1:
                k = k.repeat_interleave(self._groups, dim=1)
                v = v.repeat_interleave(self._groups, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scaling)
            x = x + layer.o_proj(attn.transpose(1, 2).reshape(1, size, layout.heads * layout.head_dim))
            x = x + layer.mlp(layer.post_norm(x))
        self._pending = size
        return self._project(layout.norm(x[:, -1]), vocab)  # (1, vocab | n)

    def join(self) -> None:
        """Make the last prefilled sequence the batch's last row (it already sits in that slot)."""
        assert self._pending is not None, "join() without prefill()"
        self._lengths.append(self._pending)
        self._pending = None

    def decode(self, ids: Sequence[int], positions: Sequence[int], vocab: VocabSubset | None = None) -> torch.Tensor:
        """One step for every row: row ``i`` feeds ``ids[i]`` at ``positions[i]`` (its current length). Returns the
        next-token logits ``(b, vocab)``, or ``(b, n)`` over ``vocab``: the projection of the step's hidden states,
        outside the captured graph."""
        size = len(ids)
        assert size == len(self._lengths) == len(positions), "decode() rows differ from the joined rows"
        longest = max(positions) + 1
        if longest > self.capacity:
            raise RuntimeError(f"a row reached the end of the static cache ({self.capacity} columns)")
        if self.pad_to_buckets:
            padded = _smallest_at_least(self._batch_buckets, size)
            columns = _smallest_at_least(self._length_buckets, longest)
        else:
            padded, columns = size, longest
        pad = [0] * (padded - size)
        host = torch.tensor([list(ids) + pad, list(positions) + pad], dtype=torch.long)
        self._io[:, :padded].copy_(host)
        graph = self._graphs.get((padded, columns)) if self.use_graphs else None
        if graph is None and self.use_graphs:
            try:
                graph = self._capture(padded, columns)
            except Exception:
                # A capture that fails once (out of memory for the graph pool, an op that cannot be captured) would
                # fail every later step of this bucket: decode eagerly from now on instead of failing requests.
                logger.warning(
                    "capturing the decoding step (batch %d, %d columns) failed; decoding eagerly from now on",
                    padded,
                    columns,
                    exc_info=True,
                )
                self.use_graphs = False
                self._graphs.clear()
        if graph is not None:
            graph.replay()
        else:
            self._step(padded, columns)
        self._lengths = [position + 1 for position in positions]
        return self._project(self._hidden[:size], vocab)

    def drop(self, rows: Sequence[int]) -> list[int]:
        """Remove batch rows and compact: each hole below the new row count receives the last remaining row
        (only its used columns are copied). Returns, for each new row, the index of the old row now in it."""
        count = len(self._lengths)
        gone = set(rows)
        remaining = count - len(gone)
        order = list(range(remaining))
        holes = [row for row in sorted(gone) if row < remaining]
        movers = [row for row in range(remaining, count) if row not in gone]
        for hole, mover in zip(holes, movers, strict=True):
            used = self._lengths[mover]
            self._keys[:, hole, :, :used] = self._keys[:, mover, :, :used]
            self._values[:, hole, :, :used] = self._values[:, mover, :, :used]
            order[hole] = mover
        self._lengths = [self._lengths[row] for row in order]
        return order

    def clear(self) -> None:
        """Forget every row (after a failed step); the cache contents of free slots do not matter."""
        self._lengths = []
        self._pending = None

    def close(self) -> None:
        """Release the graphs and the cache."""
        self.clear()
        self._graphs.clear()
        self._pool = self._side_stream = None
        empty = torch.empty(0, device=self.device)
        self._keys = self._values = self._hidden = empty

    # --- the step ----------------------------------------------------------------------------------------------

    def _step(self, batch: int, columns: int) -> torch.Tensor:
        """The decoding step of the first ``batch`` slots over ``columns`` cache columns: reads ids/positions from
        ``self._io[:, :batch]``, writes each row's key/value at its position and its final-normed hidden state
        into ``self._hidden[:batch]``. No host synchronisation, fixed shapes: graph-capturable."""
        layout = self._layout
        heads, kv_heads, head_dim = layout.heads, layout.kv_heads, layout.head_dim
        ids, positions = self._io[0, :batch], self._io[1, :batch]  # (B,), (B,)
        # Where each row's new key/value goes in a layer's cache flattened to (slots * kv_heads * cache_len,
        # head_dim): slot = row, column = position. (B * kv_heads,), distinct, so index_copy_ is deterministic.
        slot_heads = self._rows[:batch, None] * kv_heads + self._heads[None]  # (B, kv_heads)
        targets = (slot_heads * self.capacity + positions[:, None]).view(-1)
        x = layout.embed(ids)  # (B, hidden)
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # (B, 1, head_dim)
        # (B, 1, 1, L): a row sees its own columns up to its position; broadcast over kv heads and query groups.
        # Additive (0 / -inf in the model dtype), built once per step: a boolean mask is converted in every layer.
        visible = (self._columns[None, :columns] <= positions[:, None])[:, None, None]
        mask = torch.where(visible, self._mask_values[0], self._mask_values[1])
        for index, layer in enumerate(layout.layers):
            h = layer.input_norm(x)
            q = layer.q_proj(h).view(batch, heads, head_dim)
            k = layer.k_proj(h).view(batch, kv_heads, head_dim)
            v = layer.v_proj(h).view(batch, kv_heads, head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys, values = self._keys[index], self._values[index]  # (slots, kv_heads, cache_len, head_dim)
            keys.view(-1, head_dim).index_copy_(0, targets, k.reshape(-1, head_dim))
            values.view(-1, head_dim).index_copy_(0, targets, v.reshape(-1, head_dim))
            # GQA without repeating K/V: the query heads of one kv head become that head's "query positions".
            attn = F.scaled_dot_product_attention(
                q.view(batch, kv_heads, self._groups, head_dim),
                keys[:batch, :, :columns],
                values[:batch, :, :columns],
                attn_mask=mask,
                scale=layer.scaling,
            )  # (B, kv_heads, groups, head_dim)
            x = x + layer.o_proj(attn.reshape(batch, heads * head_dim))
            x = x + layer.mlp(layer.post_norm(x))
        hidden = self._hidden[:batch]
        hidden.copy_(layout.norm(x))
        return hidden

    def _capture(self, batch: int, columns: int) -> Any:
        """Capture ``_step(batch, columns)`` into a CUDA graph (after eager warm-up runs on a side stream, which
        write the same keys/values as the replay that follows)."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self._side_stream.wait_stream(current)
            with torch.cuda.stream(self._side_stream):
                for _ in range(_WARMUP_RUNS):
                    self._step(batch, columns)
            current.wait_stream(self._side_stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (an audio codec on the same GPU) do not break the capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._step(batch, columns)
        self._graphs[(batch, columns)] = graph
        self.graphs_captured += 1
        logger.debug("captured the decoding step for batch %d over %d columns", batch, columns)
        return graph
