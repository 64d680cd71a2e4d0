"""Tiny random-weight causal LMs in Hugging Face layout, optionally *scripted* to emit a chosen token pattern.

Why: engine, backend and server tests need a real checkpoint folder that every runtime loads (transformers, vLLM,
llama.cpp after conversion, mlx) but that is small enough to build in about a second on a CPU, needs no network and no
committed binaries. The builders here write the same file set as the published checkpoints (``config.json``,
``generation_config.json``, ``model.safetensors`` and the tokenizer files of Qwen2 / Llama 3), with a byte-level BPE
tokenizer learned from a tiny built-in corpus plus caller-chosen special and added tokens.

Random weights produce meaningless token streams, which is fine for backend conformance tests (they only need varied
ids) but not for engine tests, which must see a *valid* audio-token structure come out of plain greedy or sampled
decoding. :class:`TokenScript` solves this without training, by turning the network into a bigram lookup table:

* every ``o_proj`` and ``down_proj`` weight is zero, so each transformer layer adds exactly nothing to the residual
  stream (the other projections stay random, so every tensor is still "real" and exercises the runtime's kernels);
  the last hidden state is therefore ``RMSNorm(embedding(current token))`` and the next-token logits depend on the
  current token only;
* each scripted *source* token gets a unit-norm embedding direction: explicit transition sources get random
  directions orthogonal to a few reserved "group" dimensions; members of a fallback group share their group's
  reserved dimension (one unit axis per group);
* the ``lm_head`` row of each *target* is ``strength`` times the sum of its sources' directions. After the final
  RMSNorm the hidden state of a source is ``sqrt(hidden_size)`` times its direction, so its target's logit is about
  ``strength * sqrt(hidden_size)`` (320 with the defaults) while every other scripted row only sees the small cosine
  between random directions, and unscripted rows are tiny. The margin is verified at build time (at least
  :data:`MIN_SCRIPT_MARGIN` logits, after casting to the checkpoint dtype), so greedy decoding follows the script and
  sampling at temperature ~1 with top-k/top-p picks the scripted token with probability ~1.

Tied embeddings would make ``lm_head`` equal to the embedding, i.e. a symmetric bigram ("a → b" implies "b → a"),
so scripted models require ``tie_word_embeddings=False``.

Unscripted models use plain random init, but with a strong MLP: with std 0.02 everywhere the tied embedding of the
current token dominates the last hidden state and greedy decoding just repeats the prompt's last token, while
conformance tests need varied ids (see ``_MLP_IN_STD``). Their logits are small, so sampling is nearly uniform; a
constant residual channel keeps the padding rows (vocab_size is rounded up to a multiple of 64, as in real
checkpoints) hundreds of logits below the real tokens, so no backend ever has to detokenize an id the tokenizer
lacks (see ``_PAD_GUARD_VALUE``).

Everything is computed with NumPy (``default_rng(seed)``) and written with a small safetensors writer, so builds do
not import torch and are byte-for-byte deterministic for the same arguments (across processes; across machines too,
except that the scripted directions go through LAPACK/BLAS, whose last bits may differ). Building needs the
``tokenizers`` package; the BPE merges are learned with its trainer, whose tie-breaking is deterministic.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = (
    "LLAMA3_SPECIALS",
    "MIN_SCRIPT_MARGIN",
    "QWEN2_NONSPECIAL_ADDED",
    "QWEN2_SPECIALS",
    "TokenScript",
    "TokenizerFlavor",
    "build_bpe_tokenizer",
    "build_tiny_llama",
    "build_tiny_qwen2",
)

logger = logging.getLogger(__name__)

TokenizerFlavor = Literal["qwen2", "llama3"]
WeightDtype = Literal["float32", "bfloat16", "float16"]

#: Qwen2.5 special tokens in id order (151643..151656 in the real vocabulary).
QWEN2_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Qwen2.5 added tokens 151657..151664; the published tokenizer marks them ``special: false``.
QWEN2_NONSPECIAL_ADDED: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

#: The first Llama 3.1/3.2 special tokens (128000..128010 in the real vocabulary).
LLAMA3_SPECIALS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

#: Minimum logit gap between a scripted target and any other token, checked at build time. With it, any other token
#: has probability below exp(-40) * vocab per step at temperature 1, i.e. scripted sampling is exact in practice.
MIN_SCRIPT_MARGIN = 40.0

# Pre-tokenizer regexes of the real tokenizers (Qwen2 splits digits one by one, Llama 3 in groups of up to three).
_REGEX_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REGEX_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = _REGEX_HEAD + r"\p{N}" + _REGEX_TAIL
_LLAMA3_REGEX = _REGEX_HEAD + r"\p{N}{1,3}" + _REGEX_TAIL

# Tiny built-in corpus for learning merges: English and Chinese like the texts the servers synthesise.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is a tiny tokenizer for testing text to speech models.",
    "Speech synthesis turns written text into natural sounding audio, one token at a time.",
    "It was the best of times, it was the worst of times; numbers like 2024 and 3.14 appear too.",
    "Please read the following sentence in a calm and friendly voice.",
    "She said that the weather is nice today, and we should go for a walk in the park.",
    "今天天气很好，我们一起去公园散步吧。",
    "语音合成把文字变成声音。这是一个用于测试的小模型。",
    "你好，世界！欢迎使用语音合成服务，我们的声音听起来很自然。",
    "请用平静友好的语气朗读下面这句话。",
)

# Init scales of unscripted weights (chosen by measuring greedy output variety). With std 0.02 everywhere the tied
# embedding of the current token dominates the last hidden state, so greedy decoding repeats the last token; a large
# o_proj makes the slowly changing attention average dominate (long runs of one token). A strongly non-linear MLP with
# a large down_proj makes the next token a pseudo-random function of the current one instead: 2-layer models with
# the default sizes then give 15-30 distinct ids in 32 greedy tokens.
_EMBED_STD = 0.02
_PROJ_STD = 0.02
_O_PROJ_STD = 0.02
_MLP_IN_STD = 0.2
_DOWN_PROJ_STD = 0.2
# Padding-row guard of unscripted models (see _build_weights): constant residual channel 0 and its output weight.
_PAD_GUARD_VALUE = 0.05
_PAD_GUARD_PENALTY = 1000.0
_PAD_GUARD_NORM = 100.0
# Rows of scripted models that no script targets: tiny, so they can never compete with a scripted target.
_UNSCRIPTED_HEAD_STD = 1e-3


@dataclass(frozen=True)
class TokenScript:
    """Next-token rules that a scripted tiny model follows under greedy (and practically under sampled) decoding.

    ``transitions`` maps a token string to the token string that must follow it. ``fallbacks`` lists groups
    ``(members, target)``: every member that is not itself a transition source is followed by ``target`` (e.g. "any
    semantic token not in the chain → the chain's first token"). A token may belong to at most one group. Tokens that
    the script does not mention are followed by arbitrary (but deterministic) tokens. ``strength`` scales the
    scripted logits (see the module docstring).
    """

    transitions: Mapping[str, str] = field(default_factory=dict)
    fallbacks: Sequence[tuple[Sequence[str], str]] = ()
    strength: float = 40.0

    def __post_init__(self) -> None:
        if self.strength <= 0:
            raise ValueError(f"TokenScript.strength must be positive, got {self.strength}")
        seen: set[str] = set()
        for members, _target in self.fallbacks:
            for token in members:
                if token in seen:
                    raise ValueError(f"token {token!r} is in more than one TokenScript fallback group")
                seen.add(token)


# --------------------------------------------------------------------------------------------------------- tokenizer


def _added_token_dict(content: str, *, special: bool | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    if special is not None:
        entry["special"] = special
    return entry


def _write_json(path: Path, obj: object, *, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")


def _learn_merges(flavor: TokenizerFlavor, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges from the built-in corpus; returns (vocab, merges) with the 256 bytes first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if flavor == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(flavor)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + num_merges,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(_CORPUS) * 2, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges: list[tuple[str, str]] = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append((left, right))
    return vocab, merges


def _pre_tokenizer(flavor: TokenizerFlavor) -> Any:
    from tokenizers import Regex, pre_tokenizers

    regex = _QWEN2_REGEX if flavor == "qwen2" else _LLAMA3_REGEX
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            # Llama 3 ships trim_offsets=True here, Qwen2 False; offsets do not affect ids.
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=flavor == "llama3", use_regex=False),
        ]
    )


def build_bpe_tokenizer(
    out_dir: Path | str,
    *,
    flavor: TokenizerFlavor,
    special_tokens: Sequence[str],
    added_tokens: Sequence[str] = (),
    eos_token: str | None = None,
    bos_token: str | None = None,
    pad_token: str | None = None,
    num_merges: int = 128,
    model_max_length: int = 32768,
) -> Tokenizer:
    """Write a byte-level BPE tokenizer in the published Qwen2 or Llama 3 file layout and return it.

    Ids: the 256 byte tokens and ``num_merges`` learned merges first, then ``special_tokens`` (flagged special, so
    ``skip_special_tokens=True`` drops them), then ``added_tokens`` as *non-special* added tokens in the given order
    (decoding keeps them even with ``skip_special_tokens=True``, as the Spark and Orpheus tokenizers do).

    Defaults: qwen2 → eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos (Qwen adds none); llama3 → bos
    ``<|begin_of_text|>`` (prepended by the post-processor, as Llama 3 does), eos ``<|end_of_text|>``, no pad.
    Named tokens must be among ``special_tokens`` or ``added_tokens``.

    Files: qwen2 → ``tokenizer.json``, ``tokenizer_config.json`` (``Qwen2Tokenizer``), ``vocab.json``,
    ``merges.txt``, ``added_tokens.json``, ``special_tokens_map.json``; llama3 → ``tokenizer.json``,
    ``tokenizer_config.json`` (``PreTrainedTokenizerFast``), ``special_tokens_map.json``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if flavor not in ("qwen2", "llama3"):
        raise ValueError(f"unknown tokenizer flavor {flavor!r}; expected 'qwen2' or 'llama3'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if flavor == "qwen2":
        eos_token = eos_token if eos_token is not None else "<|im_end|>"
        pad_token = pad_token if pad_token is not None else "<|endoftext|>"
    else:
        bos_token = bos_token if bos_token is not None else "<|begin_of_text|>"
        eos_token = eos_token if eos_token is not None else "<|end_of_text|>"
    all_added = list(special_tokens) + list(added_tokens)
    if len(set(all_added)) != len(all_added):
        raise ValueError("special_tokens and added_tokens must be distinct")
    for role, token in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
        if token is not None and token not in all_added:
            raise ValueError(f"{role} {token!r} is not among special_tokens/added_tokens")

    vocab, merges = _learn_merges(flavor, num_merges)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=flavor == "llama3",
        )
    )
    if flavor == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(flavor)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if added_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    if flavor == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        assert bos_token is not None
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos_token}:0 $A:0",
                    pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
                    special_tokens=[(bos_token, bos_id)],
                ),
            ]
        )
    tok.save(str(out / "tokenizer.json"), pretty=True)

    special_set = set(special_tokens)
    ids = {t: tok.token_to_id(t) for t in all_added}
    added_tokens_decoder = {str(ids[t]): _added_token_dict(t, special=t in special_set) for t in all_added}
    named = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)) if v}
    if flavor == "qwen2":
        extra = [t for t in special_tokens if t not in (bos_token, pad_token)]
        config: dict[str, Any] = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": extra,
            "bos_token": bos_token,
            "clean_up_tokenization_spaces": False,
            "eos_token": eos_token,
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": pad_token,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        special_map: dict[str, Any] = {"additional_special_tokens": extra}
        special_map.update({k: _added_token_dict(v) for k, v in named.items()})
        _write_json(out / "vocab.json", vocab, sort_keys=False)
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
        _write_json(out / "added_tokens.json", ids, sort_keys=True)
    else:
        config = {
            "added_tokens_decoder": added_tokens_decoder,
            "bos_token": bos_token,
            "clean_up_tokenization_spaces": False,  # real Llama 3 says true; transformers 5 warns and ignores it
            "eos_token": eos_token,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        if pad_token is not None:
            config["pad_token"] = pad_token
        special_map = {k: _added_token_dict(v) for k, v in named.items()}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    return tok


# ------------------------------------------------------------------------------------------------------------ model


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def _cast_roundtrip(array: np.ndarray, dtype: WeightDtype) -> np.ndarray:
    """The float32 values a tensor will have after being stored as ``dtype`` (for the build-time margin check)."""
    if dtype == "bfloat16":
        return (_to_bf16_bits(array).astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return array.astype(np.float16).astype(np.float32)
    return array.astype(np.float32)


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], dtype: WeightDtype) -> None:
    """Minimal deterministic safetensors writer (header: 8-byte LE length + JSON, then raw little-endian data).

    Written by hand so bfloat16 needs neither torch nor a particular safetensors version.
    """
    st_dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        array = tensors[name]
        if dtype == "bfloat16":
            data = _to_bf16_bits(array).astype("<u2").tobytes()
        elif dtype == "float16":
            data = np.ascontiguousarray(array, dtype="<f2").tobytes()
        else:
            data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": st_dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(header_bytes)))
        fh.write(header_bytes)
        for blob in blobs:
            fh.write(blob)


@dataclass(frozen=True)
class _Shape:
    arch: Literal["qwen2", "llama"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """``count`` unit vectors in ``dim`` dimensions: orthonormal when possible, else random with low coherence."""
    if count == 0:
        return np.zeros((0, dim), dtype=np.float64)
    gauss = rng.standard_normal((max(count, dim), dim))
    if count <= dim:
        q, _ = np.linalg.qr(gauss[:dim].T)  # (dim, dim) orthonormal columns
        return q.T[:count].copy()
    rows = gauss[:count] / np.linalg.norm(gauss[:count], axis=1, keepdims=True)
    # A few deterministic repulsion steps lower the worst pairwise cosine (random: ~0.55 for 200 rows in 60 dims).
    for _ in range(40):
        gram = rows @ rows.T
        np.fill_diagonal(gram, 0.0)
        rows = rows - 0.1 * (gram**3) @ rows
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _script_tables(
    script: TokenScript, tok: Tokenizer, shape: _Shape, rng: np.random.Generator
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], list[tuple[int, int]]]:
    """Return (embedding rows by id, lm_head rows by id, [(source id, target id)] to verify)."""

    def token_id(token: str) -> int:
        idx = tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"TokenScript token {token!r} is not a single token of the tokenizer")
        return int(idx)

    transitions = {token_id(src): token_id(dst) for src, dst in script.transitions.items()}
    groups: list[tuple[list[int], int]] = []
    for members, target in script.fallbacks:
        member_ids = [i for i in (token_id(m) for m in members) if i not in transitions]
        groups.append((member_ids, token_id(target)))
    hidden = shape.hidden_size
    n_groups = len(groups)
    if n_groups >= hidden // 2:
        raise ValueError(f"too many TokenScript fallback groups ({n_groups}) for hidden_size {hidden}")
    sources = sorted(transitions)
    directions = np.zeros((len(sources), hidden))
    directions[:, n_groups:] = _unit_rows(rng, len(sources), hidden - n_groups)
    embed_rows: dict[int, np.ndarray] = dict(zip(sources, directions, strict=True))
    head_rows: dict[int, np.ndarray] = {}
    checks: list[tuple[int, int]] = []
    for src, dst in transitions.items():
        head_rows[dst] = head_rows.get(dst, np.zeros(hidden)) + script.strength * embed_rows[src]
        checks.append((src, dst))
    for g, (member_ids, target) in enumerate(groups):
        axis = np.zeros(hidden)
        axis[g] = 1.0
        for member in member_ids:
            embed_rows[member] = axis
        head_rows[target] = head_rows.get(target, np.zeros(hidden)) + script.strength * axis
        if member_ids:
            checks.append((member_ids[0], target))  # all members share one embedding: one check covers the group
    return embed_rows, head_rows, checks


def _verify_script(
    embed: np.ndarray, head: np.ndarray, checks: Sequence[tuple[int, int]], eps: float, dtype: WeightDtype
) -> float:
    """Simulate the (layer-free) forward pass of each scripted source; return the smallest logit margin."""
    if not checks:
        return math.inf
    embed_c = _cast_roundtrip(embed, dtype).astype(np.float64)
    head_c = _cast_roundtrip(head, dtype).astype(np.float64)
    sources = np.array([s for s, _ in checks])
    targets = np.array([t for _, t in checks])
    x = embed_c[sources]
    hidden = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps)  # final RMSNorm (weight 1)
    logits = hidden @ head_c.T
    rows = np.arange(len(checks))
    target_logits = logits[rows, targets]
    logits[rows, targets] = -np.inf
    margins = target_logits - logits.max(axis=1)
    worst = int(np.argmin(margins))
    if margins[worst] < MIN_SCRIPT_MARGIN:
        raise ValueError(
            f"scripted transition {sources[worst]} -> {targets[worst]} wins by only {margins[worst]:.1f} logits "
            f"(need {MIN_SCRIPT_MARGIN}); increase hidden_size or TokenScript.strength, or script fewer tokens"
        )
    return float(margins.min())


def _build_weights(
    shape: _Shape,
    *,
    seed: int,
    script: TokenScript | None,
    tok: Tokenizer,
    n_tokens: int,
    eps: float,
    dtype: WeightDtype,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i_size, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q_out, kv_out = shape.num_attention_heads * hd, shape.num_key_value_heads * hd

    def normal(*dims: int, std: float = _PROJ_STD) -> np.ndarray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    tensors: dict[str, np.ndarray] = {}
    embed = normal(shape.vocab_size, h, std=_EMBED_STD)
    embed[n_tokens:] = 0.0  # padding rows beyond the tokenizer
    o_std, down_std = (0.0, 0.0) if script is not None else (_O_PROJ_STD, _DOWN_PROJ_STD)
    if script is None:
        # Keep sampling away from the padding ids (beyond the tokenizer, which backends cannot detokenize): the
        # unscripted logits are small, so near-uniform sampling would otherwise hit them. Channel 0 of the residual
        # stream is a constant (every real embedding has _PAD_GUARD_VALUE there and no layer writes to it), so the
        # final hidden state is always positive on it (amplified by the final norm weight) and a very negative
        # channel-0 weight in the padding rows of the output matrix puts their logits hundreds below the real ones.
        # Real tokens get (nearly) the same shift, which softmax ignores.
        embed[:n_tokens, 0] = _PAD_GUARD_VALUE
        embed[n_tokens:, 0] = -_PAD_GUARD_PENALTY
    for layer in range(shape.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
        tensors[f"{prefix}.self_attn.q_proj.weight"] = normal(q_out, h)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_out, h)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_out, h)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = o_proj = normal(h, q_out, std=1.0) * o_std
        o_proj[0] = 0.0  # residual channel 0 stays constant (see the padding guard above)
        if shape.arch == "qwen2":  # Qwen2 has q/k/v biases, Llama none
            tensors[f"{prefix}.self_attn.q_proj.bias"] = normal(q_out)
            tensors[f"{prefix}.self_attn.k_proj.bias"] = normal(kv_out)
            tensors[f"{prefix}.self_attn.v_proj.bias"] = normal(kv_out)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = normal(i_size, h, std=_MLP_IN_STD)
        tensors[f"{prefix}.mlp.up_proj.weight"] = normal(i_size, h, std=_MLP_IN_STD)
        tensors[f"{prefix}.mlp.down_proj.weight"] = down_proj = normal(h, i_size, std=1.0) * down_std
        down_proj[0] = 0.0
    tensors["model.norm.weight"] = np.ones(h, dtype=np.float32)

    if script is None:
        tensors["model.norm.weight"][0] = _PAD_GUARD_NORM
        tensors["model.embed_tokens.weight"] = embed
        if not shape.tie_word_embeddings:
            head = normal(shape.vocab_size, h, std=_EMBED_STD)
            head[n_tokens:] = 0.0
            head[n_tokens:, 0] = -_PAD_GUARD_PENALTY
            tensors["lm_head.weight"] = head
        return tensors

    head = normal(shape.vocab_size, h, std=_UNSCRIPTED_HEAD_STD)
    head[n_tokens:] = 0.0
    embed_rows, head_rows, checks = _script_tables(script, tok, shape, rng)
    for idx, row in embed_rows.items():
        embed[idx] = row
    for idx, row in head_rows.items():
        head[idx] = row
    margin = _verify_script(embed, head, checks, eps, dtype)
    logger.debug("scripted tiny LM: %d checks, worst logit margin %.1f", len(checks), margin)
    tensors["model.embed_tokens.weight"] = embed
    tensors["lm_head.weight"] = head
    return tensors


def _build_tiny_causal_lm(
    out_dir: Path | str,
    *,
    arch: Literal["qwen2", "llama"],
    special_tokens: Sequence[str],
    added_tokens: Sequence[str],
    eos_token: str,
    bos_token: str | None,
    pad_token: str | None,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    script: TokenScript | None,
    seed: int,
    dtype: WeightDtype,
    vocab_size: int | None = None,
) -> Path:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if script is not None and tie_word_embeddings:
        raise ValueError(
            "a scripted tiny model needs tie_word_embeddings=False (tied weights make the bigram table symmetric)"
        )
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size must divide by num_attention_heads, and heads by num_key_value_heads")
    head_dim = hidden_size // num_attention_heads
    if head_dim < 32:
        raise ValueError(f"head_dim = hidden_size / num_attention_heads = {head_dim}; vLLM's CPU kernels need >= 32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flavor: TokenizerFlavor = "qwen2" if arch == "qwen2" else "llama3"
    tok = build_bpe_tokenizer(
        out,
        flavor=flavor,
        special_tokens=special_tokens,
        added_tokens=added_tokens,
        eos_token=eos_token,
        bos_token=bos_token,
        pad_token=pad_token,
        model_max_length=max_position_embeddings,
    )
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    shape = _Shape(
        arch=arch,
        vocab_size=max(_round_up(n_tokens, 64), vocab_size or 0),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
    )
    eps = 1e-6 if arch == "qwen2" else 1e-5
    tensors = _build_weights(shape, seed=seed, script=script, tok=tok, n_tokens=n_tokens, eps=eps, dtype=dtype)
    _write_safetensors(out / "model.safetensors", tensors, dtype)

    def tid(token: str | None) -> int | None:
        return None if token is None else tok.token_to_id(token)

    # Qwen2.5 declares <|endoftext|> as bos_token_id although its tokenizer never adds a BOS.
    if arch == "qwen2":
        bos_token = "<|endoftext|>" if "<|endoftext|>" in special_tokens else None
    bos_id = tid(bos_token)
    eos_id, pad_id = tid(eos_token), tid(pad_token)
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": arch,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "rms_norm_eps": eps,
        "tie_word_embeddings": tie_word_embeddings,
        # transformers 4.x and most runtimes read torch_dtype; transformers 5 reads dtype.
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    if arch == "qwen2":
        rope_theta = 1000000.0
        config.update(
            max_window_layers=num_hidden_layers,
            rope_theta=rope_theta,  # transformers 4.x, vLLM, mlx-lm
            rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},  # transformers 5
            sliding_window=max_position_embeddings,
            use_sliding_window=False,
        )
    else:
        rope_theta = 500000.0
        # Llama 3 rope scaling as in Orpheus (factor 32, original context 1/16 of the full one, like 8192/131072);
        # transformers warns unless original_max_position_embeddings < max_position_embeddings.
        scaling = {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(1, max_position_embeddings // 16),
        }
        config.update(
            attention_bias=False,
            head_dim=head_dim,
            mlp_bias=False,
            pretraining_tp=1,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rope_parameters={**scaling, "rope_theta": rope_theta},
        )
    _write_json(out / "config.json", config, sort_keys=True)
    generation: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    if pad_id is not None:
        generation["pad_token_id"] = pad_id
    _write_json(out / "generation_config.json", generation, sort_keys=True)
    return out


def build_tiny_qwen2(
    out_dir: Path | str,
    *,
    special_tokens: Sequence[str] = QWEN2_SPECIALS,
    added_tokens: Sequence[str] = (),
    eos_token: str = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    script: TokenScript | None = None,
    seed: int = 0,
    dtype: WeightDtype = "float32",
    vocab_size: int | None = None,
) -> Path:
    """Write a tiny random-weight ``Qwen2ForCausalLM`` (Qwen2 tokenizer files) into ``out_dir``; return it.

    ``vocab_size`` is the tokenizer length rounded up to a multiple of 64, or the given ``vocab_size`` if larger
    (benchmarks use the real checkpoint's padded vocabulary, whose size matters for the LM head).
    ``bos_token_id`` is ``<|endoftext|>`` as in Qwen2.5 (no BOS is added to prompts). The output is byte-identical
    for identical arguments.
    With ``script``, greedy decoding follows it (needs ``tie_word_embeddings=False``; see :class:`TokenScript`).
    """
    return _build_tiny_causal_lm(
        out_dir,
        arch="qwen2",
        special_tokens=special_tokens,
        added_tokens=added_tokens,
        eos_token=eos_token,
        bos_token=None,
        pad_token=pad_token,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        script=script,
        seed=seed,
        dtype=dtype,
        vocab_size=vocab_size,
    )


def build_tiny_llama(
    out_dir: Path | str,
    *,
    special_tokens: Sequence[str] = LLAMA3_SPECIALS,
    added_tokens: Sequence[str] = (),
    eos_token: str = "<|end_of_text|>",
    bos_token: str = "<|begin_of_text|>",
    pad_token: str | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    script: TokenScript | None = None,
    seed: int = 0,
    dtype: WeightDtype = "float32",
) -> Path:
    """Write a tiny random-weight ``LlamaForCausalLM`` (Llama 3 tokenizer files, BOS added by the post-processor).

    Rope: ``rope_theta`` 500000 and a ``llama3`` scaling dict like Orpheus, written both as ``rope_scaling`` +
    ``rope_theta`` (transformers 4.x, vLLM, mlx-lm) and as ``rope_parameters`` (transformers 5). Otherwise as
    :func:`build_tiny_qwen2`.
    """
    return _build_tiny_causal_lm(
        out_dir,
        arch="llama",
        special_tokens=special_tokens,
        added_tokens=added_tokens,
        eos_token=eos_token,
        bos_token=bos_token,
        pad_token=pad_token,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        script=script,
        seed=seed,
        dtype=dtype,
    )
