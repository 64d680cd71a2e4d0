"""Tests for the scripted tiny Spark-TTS LLM: tokenizer layout (§A.9) and exact completions per prompt kind (§A.10)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flashtts_core.testing import cache
from flashtts_core.testing.tiny_spark_llm import (
    SPARK_ADDED_TOKENS,
    SparkScriptInfo,
    build_tiny_spark_llm,
    spark_script_info,
    tiny_spark_llm_dir,
)

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

_TEXT = "Hello world, 你好世界。"
_STYLE = "<|start_style_label|><|gender_1|><|pitch_label_3|><|speed_label_0|><|end_style_label|>"
_REF_GLOBALS = "".join(f"<|bicodec_global_{g}|>" for g in range(100, 132))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("flashtts-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cache.CACHE_DIR_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def spark(cache_root: Path) -> tuple[Any, Any, SparkScriptInfo]:
    path = tiny_spark_llm_dir()
    assert path.parent == cache_root
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return tok, model, spark_script_info()


def _complete(tok: Any, model: Any, prompt: str, **sampling: Any) -> tuple[str, ...]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=400, do_sample=bool(sampling), **sampling)
    return tuple(tok.convert_ids_to_tokens(out[0, ids.shape[1] :].tolist()))


def test_added_tokens_match_spec() -> None:
    assert len(SPARK_ADDED_TOKENS) == len(set(SPARK_ADDED_TOKENS)) == 13493
    base = 151665  # real id of the first Spark token; relative offsets must match models.md §A.9
    for token, real_id in (
        ("<|bicodec_global_0|>", 151665),
        ("<|bicodec_semantic_0|>", 155761),
        ("<|pitch_value_0|>", 163953),
        ("<|pitch_var_value_0|>", 164954),
        ("<|speed_value_0|>", 164975),
        ("<|loudness_value_0|>", 164991),
        ("<|gender_0|>", 165032),
        ("<|emotion_100|>", 165135),
        ("<|task_vc|>", 165136),
        ("<|task_controllable_tts|>", 165143),
        ("<|task_edit|>", 165145),
        ("<|start_content|>", 165146),
        ("<|start_semantic_token|>", 165151),
        ("<|end_content|>", 165152),
        ("<|end_semantic_token|>", 165157),
    ):
        assert SPARK_ADDED_TOKENS.index(token) == real_id - base, token


def test_tokenizer_layout_and_decoding(spark: tuple[Any, Any, SparkScriptInfo]) -> None:
    from tokenizers import Tokenizer

    tok, _, _ = spark
    path = Path(tok.name_or_path)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    # Same relative ids as the real tokenizer: <|endoftext|> 151643, <|task_tts|> 165137, last token 165157.
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|task_tts|>") - endoftext == 165137 - 151643
    assert len(tok) - 1 - endoftext == 165157 - 151643
    spark_ids = tok.convert_tokens_to_ids(["<|bicodec_semantic_5|>", "<|task_tts|>", "<|end_semantic_token|>"])
    assert not any(tok.added_tokens_decoder[i].special for i in spark_ids)
    prompt = (
        f"<|task_tts|><|start_content|>{_TEXT}<|end_content|><|start_global_token|>{_REF_GLOBALS}<|end_global_token|>"
    )
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = tok(prompt)["input_ids"]
    assert ids == raw.encode(prompt).ids
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == prompt  # Spark tokens survive


def test_controllable_prompt(spark: tuple[Any, Any, SparkScriptInfo]) -> None:
    tok, model, info = spark
    prompt = f"<|task_controllable_tts|><|start_content|>{_TEXT}<|end_content|>{_STYLE}"
    completion = _complete(tok, model, prompt)
    assert completion == info.controllable_completion_tokens
    assert len(info.global_ids) == len(set(info.global_ids)) == 32
    assert len(info.semantic_ids) == len(set(info.semantic_ids)) == 150
    assert "".join(completion).startswith(info.acoustic_prefix)
    # Later segments re-use the acoustic fragment: the model then only writes the semantic part.
    assert _complete(tok, model, prompt + info.acoustic_prefix) == info.clone_completion_tokens


def test_clone_prompts(spark: tuple[Any, Any, SparkScriptInfo]) -> None:
    tok, model, info = spark
    clone = (
        f"<|task_tts|><|start_content|>{_TEXT}<|end_content|><|start_global_token|>{_REF_GLOBALS}<|end_global_token|>"
    )
    assert _complete(tok, model, clone) == info.clone_completion_tokens
    chain = set(info.semantic_ids)
    ref = [s for s in (4242, 17, 8191, 0, 1234) if s not in chain][:3]
    with_transcript = clone.replace(_TEXT, "参考文本。" + _TEXT) + "<|start_semantic_token|>"
    with_transcript += "".join(f"<|bicodec_semantic_{s}|>" for s in ref)
    assert _complete(tok, model, with_transcript) == info.continuation_tokens


def test_sampling_follows_script(spark: tuple[Any, Any, SparkScriptInfo]) -> None:
    import torch

    tok, model, info = spark
    torch.manual_seed(0)
    prompt = f"<|task_controllable_tts|><|start_content|>{_TEXT}<|end_content|>{_STYLE}"
    sampled = _complete(tok, model, prompt, temperature=0.9, top_k=50, top_p=0.95)
    assert sampled == info.controllable_completion_tokens


def test_cache_reuse_and_degenerate_model(spark: tuple[Any, Any, SparkScriptInfo], cache_root: Path) -> None:
    first = tiny_spark_llm_dir()
    assert tiny_spark_llm_dir(semantic_tokens=150, seed=0, scripted=True) == first
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    degenerate = tiny_spark_llm_dir(semantic_tokens=0)
    assert degenerate != first and (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache_root.iterdir()) == sorted([first.name, degenerate.name])
    tok = transformers.AutoTokenizer.from_pretrained(degenerate)
    model = transformers.AutoModelForCausalLM.from_pretrained(degenerate).eval()
    info = spark_script_info(semantic_tokens=0)
    prompt = f"<|task_controllable_tts|><|start_content|>{_TEXT}<|end_content|>{_STYLE}"
    completion = _complete(tok, model, prompt)
    assert completion == (
        *info.acoustic_prefix_tokens,
        "<|start_semantic_token|>",
        "<|end_semantic_token|>",
        "<|im_end|>",
    )
    assert _complete(tok, model, "<|task_tts|><|start_semantic_token|><|bicodec_semantic_9|>") == (
        "<|end_semantic_token|>",
        "<|im_end|>",
    )


def test_unscripted_build_is_tied_and_deterministic(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open

    a = build_tiny_spark_llm(tmp_path / "a", scripted=False, seed=5)
    b = build_tiny_spark_llm(tmp_path / "b", scripted=False, seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["Qwen2ForCausalLM"]
    with safe_open(str(a / "model.safetensors"), "np") as fh:
        assert "lm_head.weight" not in set(fh.keys())
