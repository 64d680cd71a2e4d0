"""Tiny Spark-TTS ``LLM/`` folder whose greedy output is a valid Spark acoustic-token structure.

The real Spark-TTS LLM is Qwen2.5-0.5B with 13493 non-special added tokens (models.md §A.9). The engine parses the
model's *decoded text* with regular expressions, so tests of the Spark engine (prompt building, parsing, voice reuse,
streaming, detokenisation) need a model that, for every prompt kind of §A.10 / reference-behaviour §3.4.3–3.4.4,
continues with the structure the real model was trained to produce. :func:`build_tiny_spark_llm` writes such a
folder: a tiny ``Qwen2ForCausalLM`` (same tokenizer layout, same added tokens in the same order, ids shifted because
the base BPE is tiny) scripted with a :class:`~flashtts_core.testing.tiny_llm.TokenScript` bigram table:

* controllable mode, after ``<|end_style_label|>``: ``<|start_acoustic_token|><|pitch_value_P|><|speed_value_V|>
  <|end_acoustic_token|><|start_global_token|>`` + 32 distinct globals + ``<|end_global_token|>``, then the semantic
  part below;
* after ``<|end_global_token|>`` (clone mode, or later segments that re-use the acoustic fragment):
  ``<|start_semantic_token|>`` + a chain of ``semantic_tokens`` distinct ``<|bicodec_semantic_s|>`` +
  ``<|end_semantic_token|><|im_end|>`` (the engine stops at the first of these two);
* after any semantic token outside the chain (clone with transcript: the prompt ends with the reference's semantic
  tokens): the chain from its first token; a chain token continues the chain.

``semantic_tokens=0`` gives the degenerate model (``<|start_semantic_token|><|end_semantic_token|><|im_end|>``, and
any semantic token is followed by ``<|end_semantic_token|>``) for the engine's "no semantic tokens" error path.
The chosen tokens come from :func:`spark_script_info`, so tests can assert exact outputs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashtts_core.testing.cache import cached_build
from flashtts_core.testing.tiny_llm import QWEN2_NONSPECIAL_ADDED, QWEN2_SPECIALS, TokenScript, build_tiny_qwen2

__all__ = (
    "SPARK_ADDED_TOKENS",
    "SPARK_GLOBAL_TOKENS",
    "SPARK_SEMANTIC_CODES",
    "SparkScriptInfo",
    "build_tiny_spark_llm",
    "spark_script_info",
    "tiny_spark_llm_dir",
)

#: Number of global (speaker) tokens per utterance and size of the semantic codebook of the released model.
SPARK_GLOBAL_TOKENS = 32
SPARK_SEMANTIC_CODES = 8192

_SPARK_TASKS = (
    "vc",
    "tts",
    "asr",
    "s2s",
    "t2s",
    "cap",
    "understand",
    "controllable_tts",
    "prompt_tts",
    "edit",
)
_SPARK_SPANS = ("content", "style_label", "style_prompt", "acoustic_token", "global_token", "semantic_token")
_SPARK_RANGES = (
    ("bicodec_global", 4096),
    ("bicodec_semantic", SPARK_SEMANTIC_CODES),
    ("pitch_value", 1001),
    ("pitch_var_value", 11),
    ("pitch_label", 5),
    ("pitch_var_label", 5),
    ("speed_value", 11),
    ("speed_label", 5),
    ("loudness_value", 31),
    ("loudness_label", 5),
    ("age", 5),
    ("gender", 3),
    ("emotion", 101),
)

#: The 13493 non-special tokens Spark-TTS adds to the Qwen2.5 tokenizer, in the order (and so relative ids) of §A.9.
SPARK_ADDED_TOKENS: tuple[str, ...] = (
    *(f"<|{name}_{i}|>" for name, count in _SPARK_RANGES for i in range(count)),
    *(f"<|task_{task}|>" for task in _SPARK_TASKS),
    *(f"<|start_{span}|>" for span in _SPARK_SPANS),
    *(f"<|end_{span}|>" for span in _SPARK_SPANS),
)
assert len(SPARK_ADDED_TOKENS) == 13493


def _semantic(code: int) -> str:
    return f"<|bicodec_semantic_{code}|>"


def _global(code: int) -> str:
    return f"<|bicodec_global_{code}|>"


@dataclass(frozen=True)
class SparkScriptInfo:
    """The tokens a scripted tiny Spark LLM emits (codec indices and token strings), for exact test assertions."""

    pitch_value: int
    speed_value: int
    global_ids: tuple[int, ...]
    semantic_ids: tuple[int, ...]

    @property
    def acoustic_prefix_tokens(self) -> tuple[str, ...]:
        """Controllable-mode acoustic fragment, ``<|start_acoustic_token|>`` … ``<|end_global_token|>``."""
        return (
            "<|start_acoustic_token|>",
            f"<|pitch_value_{self.pitch_value}|>",
            f"<|speed_value_{self.speed_value}|>",
            "<|end_acoustic_token|>",
            "<|start_global_token|>",
            *(_global(g) for g in self.global_ids),
            "<|end_global_token|>",
        )

    @property
    def acoustic_prefix(self) -> str:
        """The acoustic fragment as text (what the engine stores for voice reuse)."""
        return "".join(self.acoustic_prefix_tokens)

    @property
    def semantic_chain_tokens(self) -> tuple[str, ...]:
        """The chain of distinct semantic tokens, in order."""
        return tuple(_semantic(s) for s in self.semantic_ids)

    @property
    def continuation_tokens(self) -> tuple[str, ...]:
        """Completion after a semantic token outside the chain (clone prompt with transcript)."""
        return (*self.semantic_chain_tokens, "<|end_semantic_token|>", "<|im_end|>")

    @property
    def clone_completion_tokens(self) -> tuple[str, ...]:
        """Completion after ``<|end_global_token|>`` (clone without transcript, or re-used acoustic fragment)."""
        return ("<|start_semantic_token|>", *self.continuation_tokens)

    @property
    def controllable_completion_tokens(self) -> tuple[str, ...]:
        """Completion after ``<|end_style_label|>`` (controllable mode)."""
        return (*self.acoustic_prefix_tokens, *self.clone_completion_tokens)

    def script(self) -> TokenScript:
        """The :class:`TokenScript` that makes a tiny Qwen2 model emit these completions."""
        first_semantic = _semantic(self.semantic_ids[0]) if self.semantic_ids else "<|end_semantic_token|>"
        chain = (
            "<|end_style_label|>",
            *self.acoustic_prefix_tokens,
            "<|start_semantic_token|>",
            *self.semantic_chain_tokens,
            "<|end_semantic_token|>",
            "<|im_end|>",
        )
        transitions = dict(itertools.pairwise(chain))
        fallbacks = ((tuple(_semantic(i) for i in range(SPARK_SEMANTIC_CODES)), first_semantic),)
        return TokenScript(transitions=transitions, fallbacks=fallbacks)


def spark_script_info(*, semantic_tokens: int = 150, seed: int = 0) -> SparkScriptInfo:
    """Deterministically choose the scripted pitch/speed values, 32 distinct globals and the semantic chain."""
    if not 0 <= semantic_tokens <= SPARK_SEMANTIC_CODES:
        raise ValueError(f"semantic_tokens must be in 0..{SPARK_SEMANTIC_CODES}, got {semantic_tokens}")
    rng = np.random.default_rng((seed, 0x5A4B))  # own stream: independent of the weight init for the same seed
    globals_ = rng.choice(4096, size=SPARK_GLOBAL_TOKENS, replace=False)
    semantics = rng.choice(SPARK_SEMANTIC_CODES, size=semantic_tokens, replace=False)
    return SparkScriptInfo(
        pitch_value=int(rng.integers(0, 1001)),
        speed_value=int(rng.integers(0, 11)),
        global_ids=tuple(int(g) for g in globals_),
        semantic_ids=tuple(int(s) for s in semantics),
    )


def build_tiny_spark_llm(
    llm_dir: Path | str, *, semantic_tokens: int = 150, seed: int = 0, scripted: bool = True
) -> Path:
    """Write the tiny Spark ``LLM/`` folder (Qwen2ForCausalLM, eos ``<|im_end|>``) into ``llm_dir``; return it.

    Tokenizer: tiny byte-level BPE + the 14 Qwen2.5 specials + Qwen2.5's 8 non-special added tokens +
    :data:`SPARK_ADDED_TOKENS` (so the 22 Qwen tokens and the Spark block keep their real relative order).
    ``scripted=True`` makes greedy decoding follow :func:`spark_script_info` (untied embeddings);
    ``scripted=False`` gives a plain random model with tied embeddings like the real one.
    """
    info = spark_script_info(semantic_tokens=semantic_tokens, seed=seed)
    return build_tiny_qwen2(
        llm_dir,
        special_tokens=QWEN2_SPECIALS,
        added_tokens=QWEN2_NONSPECIAL_ADDED + SPARK_ADDED_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        max_position_embeddings=32768,
        tie_word_embeddings=not scripted,
        script=info.script() if scripted else None,
        seed=seed,
    )


def tiny_spark_llm_dir(*, semantic_tokens: int = 150, seed: int = 0, scripted: bool = True) -> Path:
    """Return a cached :func:`build_tiny_spark_llm` folder (built on first use; see :mod:`.cache`)."""
    params = {"semantic_tokens": semantic_tokens, "seed": seed, "scripted": scripted}
    return cached_build(
        "spark-llm",
        params,
        lambda path: build_tiny_spark_llm(path, semantic_tokens=semantic_tokens, seed=seed, scripted=scripted),
    )
