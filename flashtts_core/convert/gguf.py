"""Hugging Face Qwen2 / Llama checkpoint → GGUF, written with the ``gguf`` package's :class:`GGUFWriter`.

Why our own converter: llama.cpp's ``convert_hf_to_gguf.py`` is not part of any pip package, and it refuses
tokenizers whose pre-tokenizer hash it does not know (``BPE pre-tokenizer was not recognized``), which is every
extended TTS tokenizer (Spark's Qwen2.5 + 13.5k audio tokens, Orpheus' Llama 3 + 28.7k custom tokens) and every tiny
test tokenizer. The TTS LLMs are plain ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` models with byte-level BPE
tokenizers, so the architecture decides the pre-tokenizer (``qwen2`` / ``llama-bpe``) instead of a hash.

What is written, and why each piece matters to llama.cpp:

* hyper-parameters under ``<arch>.*`` (context, sizes, heads, rms eps, rope base and dimension);
* the tokenizer as ``gpt2`` (byte-level BPE): every id up to the embedding size gets a token (ids the tokenizer lacks
  become unused ``[PAD<id>]`` placeholders, because llama.cpp checks the token count against the embedding rows),
  token types (added ``special`` tokens → CONTROL, other added tokens → USER_DEFINED so llama.cpp matches them in
  plain text like Hugging Face does, the rest NORMAL), merges, and bos/eos/pad ids;
* Llama 3 rope scaling as the ``rope_freqs`` tensor (per-frequency divisors), which is how llama.cpp applies it;
* Llama q/k projections with their rows reordered: Hugging Face rotates the two halves of each head
  (``rotate_half``), llama.cpp's ``llama`` architecture rotates adjacent pairs, so each head's rows
  ``[x0..x(d/2-1), y0..y(d/2-1)]`` become ``[x0, y0, x1, y1, ...]``. Qwen2 uses the half-split (NeoX) rope in
  llama.cpp too, so its weights are copied as is;
* no ``output.weight`` when the embeddings are tied (llama.cpp then reuses ``token_embd.weight``).

Weights are read from ``model.safetensors`` or the shards listed in ``model.safetensors.index.json`` with a small
memory-mapped reader (numpy has no bfloat16, so the ``safetensors`` numpy loader cannot read bf16 checkpoints), and
written one tensor at a time, so converting a 3B model needs memory for one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flashtts_core.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np

__all__ = ("OUTTYPES", "OutType", "convert_to_gguf", "find_llm_dir", "llama3_rope_factors")

logger = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "q8_0"]
OUTTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")

# Hugging Face architecture names → gguf architecture names we can write.
_ARCHES: dict[str, str] = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
# The pre-tokenizer (split regex) llama.cpp must use for each architecture's byte-level BPE.
_PRE_TOKENIZERS: dict[str, str] = {"qwen2": "qwen2", "llama": "llama-bpe"}
# Tensors that carry no weights llama.cpp needs (older checkpoints save the rope cache).
_IGNORED_SUFFIXES: tuple[str, ...] = (".rotary_emb.inv_freq",)

# gguf token types (gguf.TokenType values), named here so the vocabulary code needs no gguf import.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


# ------------------------------------------------------------------------------------------------ locating the model


def find_llm_dir(model_dir: Path | str) -> Path:
    """The Hugging Face LLM folder of a model directory, found the way the server finds it.

    Accepts a model root that an installed engine recognises (Spark: ``<root>/LLM``; Orpheus: the root), or an HF
    LLM folder directly (it has ``config.json`` and ``tokenizer.json``), or a root with an ``LLM/`` sub-folder.
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory")
    try:
        from flashtts_core.plugins.registry import get_registry

        for engine in get_registry().engines():
            if engine.detect(root):
                return Path(engine.llm_dir(root))
    except Exception as exc:  # a broken engine plugin must not stop a conversion that the fallbacks can do
        logger.debug("engine detection failed, using the directory layout: %s", exc)
    for candidate in (root, root / "LLM"):
        if (candidate / "config.json").is_file() and (candidate / "tokenizer.json").is_file():
            return candidate
    raise CheckpointError(
        f"{root} has no Hugging Face LLM folder (config.json + tokenizer.json, here or in LLM/); "
        "pass a Spark-TTS or Orpheus model directory or the LLM folder itself"
    )


# -------------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class _ModelConfig:
    arch: str  # gguf architecture: "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _first_id(value: Any) -> int | None:
    """``eos_token_id`` may be a list in newer configs; llama.cpp stores one id."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _load_config(llm_dir: Path) -> _ModelConfig:
    config = _read_json(llm_dir / "config.json")
    if not config:
        raise CheckpointError(f"{llm_dir} has no config.json")
    archs = config.get("architectures") or []
    arch = next((_ARCHES[a] for a in archs if a in _ARCHES), None)
    if arch is None and config.get("model_type") in ("qwen2", "llama"):
        arch = config["model_type"]
    if arch is None:
        raise CheckpointError(
            f"{llm_dir}: architecture {archs or config.get('model_type')!r} is not supported by convert-gguf "
            f"(supported: {', '.join(_ARCHES)})"
        )
    # transformers 5 moved rope settings into rope_parameters; 4.x has rope_theta + rope_scaling.
    rope_parameters = config.get("rope_parameters") or {}
    rope_theta = float(config.get("rope_theta") or rope_parameters.get("rope_theta") or 10000.0)
    scaling = config.get("rope_scaling") or rope_parameters or None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if kind in (None, "default") else {**scaling, "rope_type": kind}
    generation = _read_json(llm_dir / "generation_config.json")
    num_heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return _ModelConfig(
        arch=arch,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        context_length=int(config.get("max_position_embeddings") or 4096),
        rms_norm_eps=float(config.get("rms_norm_eps") or 1e-6),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(config.get("bos_token_id", generation.get("bos_token_id"))),
        eos_token_id=_first_id(config.get("eos_token_id", generation.get("eos_token_id"))),
        pad_token_id=_first_id(config.get("pad_token_id", generation.get("pad_token_id"))),
    )


def llama3_rope_factors(config_scaling: dict[str, Any], head_dim: int, rope_theta: float) -> list[float]:
    """Per-frequency divisors of Llama 3 rope scaling (the ``rope_freqs`` tensor llama.cpp multiplies in).

    Llama 3 leaves high frequencies (wavelength shorter than ``original / high_freq_factor``) alone, divides low
    frequencies (wavelength longer than ``original / low_freq_factor``) by ``factor`` and blends linearly (in
    ``original / wavelength``) in between; llama.cpp computes ``theta = pos * freq / rope_freqs[i]``.
    """
    factor = float(config_scaling.get("factor", 8.0))
    low = float(config_scaling.get("low_freq_factor", 1.0))
    high = float(config_scaling.get("high_freq_factor", 4.0))
    original = float(config_scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = original / low, original / high
    factors: list[float] = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / rope_theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


# ------------------------------------------------------------------------------------------------------ tokenizer


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" / "eos" / "pad" → id
    add_bos: bool = False
    chat_template: str | None = None


def _token_id(name: Any, lookup: dict[str, int]) -> int | None:
    if isinstance(name, dict):  # tokenizer_config.json may store AddedToken dicts
        name = name.get("content")
    return lookup.get(name) if isinstance(name, str) else None


def _is_byte_level(tokenizer: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(tokenizer.get("pre_tokenizer")) or has(tokenizer.get("decoder"))


def _post_processor_adds_bos(tokenizer: dict[str, Any], bos: str | None) -> bool:
    """Llama 3 prepends ``<|begin_of_text|>`` through a TemplateProcessing post-processor."""
    if bos is None:
        return False

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "TemplateProcessing":
                for piece in node.get("single", []):
                    special = piece.get("SpecialToken") if isinstance(piece, dict) else None
                    if special and special.get("id") == bos:
                        return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tokenizer.get("post_processor"))


def _load_vocab(llm_dir: Path, config: _ModelConfig) -> _Vocab:
    tokenizer = _read_json(llm_dir / "tokenizer.json")
    if not tokenizer:
        raise CheckpointError(f"{llm_dir} has no tokenizer.json (convert-gguf needs the fast tokenizer file)")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(tokenizer):
        raise CheckpointError(
            f"{llm_dir}/tokenizer.json is not a byte-level BPE tokenizer (type {model.get('type')!r}); "
            "convert-gguf supports the Qwen2 and Llama 3 tokenizers"
        )
    vocab: dict[str, int] = model.get("vocab") or {}
    added: dict[int, dict[str, Any]] = {int(t["id"]): t for t in tokenizer.get("added_tokens") or []}
    size = max([config.vocab_size, *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
    if size > config.vocab_size:
        raise CheckpointError(
            f"{llm_dir}: the tokenizer has ids up to {size - 1} but the model's vocab_size is {config.vocab_size}"
        )
    by_id: dict[int, str] = {i: token for token, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        entry = added.get(i)
        if entry is not None:
            tokens.append(entry["content"])
            types.append(_CONTROL if entry.get("special", False) else _USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(_NORMAL)
        else:  # embedding rows beyond the tokenizer (vocab padded to a multiple of 64/128)
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    lookup = {token: i for i, token in enumerate(tokens)}
    tok_config = _read_json(llm_dir / "tokenizer_config.json")
    special_map = _read_json(llm_dir / "special_tokens_map.json")
    ids: dict[str, int] = {}
    for role, fallback in (
        ("bos", config.bos_token_id),
        ("eos", config.eos_token_id),
        ("pad", config.pad_token_id),
    ):
        # The tokenizer's own declaration wins (it is what the engines' tokenizer uses); config ids otherwise.
        found = _token_id(tok_config.get(f"{role}_token"), lookup)
        if found is None:
            found = _token_id(special_map.get(f"{role}_token"), lookup)
        if found is None:
            found = fallback
        if found is not None and 0 <= found < size:
            ids[role] = found
    bos_name = tokens[ids["bos"]] if "bos" in ids else None
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds_bos(tokenizer, bos_name)
    template = tok_config.get("chat_template")
    return _Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        special_ids=ids,
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
    )


# ---------------------------------------------------------------------------------------------------- safetensors


_ST_DTYPES: dict[str, str] = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


@dataclass(frozen=True)
class _StoredTensor:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class _SafetensorsReader:
    """Memory-mapped reader of (sharded) safetensors files that yields float32 numpy arrays, bf16 included."""

    def __init__(self, llm_dir: Path) -> None:
        index = llm_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = _read_json(index).get("weight_map") or {}
            files = sorted({llm_dir / name for name in weight_map.values()})
        elif (llm_dir / "model.safetensors").is_file():
            files = [llm_dir / "model.safetensors"]
        else:
            raise CheckpointError(
                f"{llm_dir} has no model.safetensors or model.safetensors.index.json "
                "(convert-gguf reads safetensors checkpoints only)"
            )
        self.tensors: dict[str, _StoredTensor] = {}
        for path in files:
            self.tensors.update(self._read_header(path))
        self._maps: dict[Path, Any] = {}

    @staticmethod
    def _read_header(path: Path) -> dict[str, _StoredTensor]:
        try:
            with path.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"cannot read the safetensors header of {path}: {exc}") from exc
        base = 8 + length
        out: dict[str, _StoredTensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, unsupported by convert-gguf")
            begin, end = info["data_offsets"]
            out[name] = _StoredTensor(path, info["dtype"], tuple(info["shape"]), base + begin, base + end)
        return out

    def load(self, name: str) -> np.ndarray:
        import numpy as np

        stored = self.tensors[name]
        data = self._maps.get(stored.path)
        if data is None:
            data = self._maps[stored.path] = np.memmap(stored.path, dtype=np.uint8, mode="r")
        raw = np.asarray(data[stored.begin : stored.end]).view(_ST_DTYPES[stored.dtype]).reshape(stored.shape)
        if stored.dtype == "BF16":  # bfloat16 is the upper half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def close(self) -> None:
        self._maps.clear()


# -------------------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _TensorPlan:
    name: str  # gguf name
    shape: tuple[int, ...]  # numpy (row-major) shape of the float data
    qtype: str  # "f32" | "f16" | "q8_0"
    produce: Callable[[], np.ndarray]  # float32 data, loaded only when written


def _reorder_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, interleave the two rope halves: rows [x0..x(h-1), y0..y(h-1)] → [x0, y0, x1, y1, ...]."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_qtype(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """Norms, biases and rope factors stay float32 (llama.cpp expects it); matrices follow ``outtype``, with q8_0
    falling back to f16 for rows that are not a multiple of its 32-value block."""
    if len(shape) < 2 or gguf_name.startswith("rope_freqs") or outtype == "f32":
        return "f32"
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return "q8_0"
    return "f16"


def _plan_tensors(config: _ModelConfig, reader: _SafetensorsReader, outtype: str) -> list[_TensorPlan]:
    import gguf

    arch = gguf.MODEL_ARCH.QWEN2 if config.arch == "qwen2" else gguf.MODEL_ARCH.LLAMA
    name_map = gguf.get_tensor_name_map(arch, config.num_layers)
    names = set(reader.tensors)
    tied = "lm_head.weight" not in names or config.tie_word_embeddings
    plans: list[_TensorPlan] = []
    if config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(config.rope_scaling, config.head_dim, config.rope_theta)

        def rope_freqs() -> np.ndarray:
            import numpy as np

            return np.asarray(factors, dtype=np.float32)

        plans.append(_TensorPlan("rope_freqs.weight", (len(factors),), "f32", rope_freqs))
    unknown: list[str] = []
    for hf_name in sorted(names):
        if hf_name.endswith(_IGNORED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(hf_name)
            continue
        shape = reader.tensors[hf_name].shape
        heads = None
        if config.arch == "llama" and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            heads = config.num_heads
        elif config.arch == "llama" and hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            heads = config.num_kv_heads

        def produce(hf_name: str = hf_name, heads: int | None = heads) -> np.ndarray:
            data = reader.load(hf_name)
            return _reorder_rope_rows(data, heads) if heads is not None else data

        plans.append(_TensorPlan(gguf_name, shape, _tensor_qtype(gguf_name, shape, outtype), produce))
    if unknown:
        raise CheckpointError(
            f"convert-gguf does not know where these {config.arch} tensors go: {', '.join(unknown[:5])}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    embed = next((p for p in plans if p.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError("the checkpoint has no model.embed_tokens.weight")
    if embed.shape[0] != config.vocab_size:
        raise CheckpointError(
            f"the embedding has {embed.shape[0]} rows but config.json has vocab_size {config.vocab_size}"
        )
    return plans


def _encode(plan: _TensorPlan, data: np.ndarray) -> np.ndarray:
    import gguf
    import numpy as np

    if plan.qtype == "f32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if plan.qtype == "f16":
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)


# -------------------------------------------------------------------------------------------------------- writing


def _write_metadata(writer: Any, config: _ModelConfig, vocab: _Vocab, outtype: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    if config.head_dim != config.hidden_size // config.num_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(vocab.tokens))
    scaling = config.rope_scaling
    if scaling is not None:
        kind = scaling["rope_type"]
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
            original = scaling.get("original_max_position_embeddings")
            if original:
                writer.add_rope_scaling_orig_ctx_len(int(original))
        elif kind != "llama3":  # llama3 is the rope_freqs tensor
            raise CheckpointError(f"rope scaling {kind!r} is not supported by convert-gguf (llama3, linear, yarn)")
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS[config.arch])
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if "bos" in vocab.special_ids:
        writer.add_bos_token_id(vocab.special_ids["bos"])
    if "eos" in vocab.special_ids:
        writer.add_eos_token_id(vocab.special_ids["eos"])
    if "pad" in vocab.special_ids:
        writer.add_pad_token_id(vocab.special_ids["pad"])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _byte_shape(plan: _TensorPlan) -> tuple[tuple[int, ...], Any, int, Any]:
    """(shape given to the writer, numpy dtype, byte size, raw gguf type or None) of a planned tensor."""
    import gguf
    import numpy as np

    count = math.prod(plan.shape)
    if plan.qtype == "f32":
        return plan.shape, np.float32, 4 * count, None
    if plan.qtype == "f16":
        return plan.shape, np.float16, 2 * count, None
    qtype = gguf.GGMLQuantizationType.Q8_0
    byte_shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, qtype)
    return byte_shape, np.uint8, math.prod(byte_shape), qtype


def _iter_encoded(plans: list[_TensorPlan]) -> Iterator[tuple[_TensorPlan, np.ndarray]]:
    for plan in plans:
        data = plan.produce()
        if tuple(data.shape) != plan.shape:
            raise CheckpointError(f"tensor {plan.name}: expected shape {plan.shape}, got {tuple(data.shape)}")
        yield plan, _encode(plan, data)


def convert_to_gguf(
    model_dir: Path | str,
    output: Path | str | None = None,
    *,
    outtype: OutType = "f16",
) -> Path:
    """Convert the LLM of ``model_dir`` (see :func:`find_llm_dir`) to one GGUF file and return its path.

    ``output`` defaults to ``<LLM folder>/model.gguf``, where the llama-cpp backend looks first. The file is written
    next to its destination and renamed into place, so a failed or interrupted conversion never leaves a truncated
    GGUF behind. Raises :class:`~flashtts_core.errors.CheckpointError` for checkpoints it cannot convert.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError('convert-gguf needs the gguf package: pip install "flashtts-core[gguf]"') from exc

    llm_dir = find_llm_dir(model_dir)
    out = Path(output).expanduser() if output is not None else llm_dir / "model.gguf"
    config = _load_config(llm_dir)
    vocab = _load_vocab(llm_dir, config)
    reader = _SafetensorsReader(llm_dir)
    plans = _plan_tensors(config, reader, outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, config.arch)
    try:
        _write_metadata(writer, config, vocab, outtype, Path(model_dir).expanduser().resolve().name)
        # Two passes keep memory at one tensor: declare every tensor (shape, type, size), write the header, then
        # convert and append the tensors one by one in the declared order.
        for plan in plans:
            shape, dtype, nbytes, raw = _byte_shape(plan)
            writer.add_tensor_info(plan.name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _plan, data in _iter_encoded(plans):
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    logger.info("wrote %s (%s, %s, %d tensors, %d tokens)", out, config.arch, outtype, len(plans), len(vocab.tokens))
    return out
