"""Tests for the tiny random-weight LM builders, the token script and the build cache."""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flashtts_core.testing import cache
from flashtts_core.testing.tiny_llm import (
    LLAMA3_SPECIALS,
    QWEN2_NONSPECIAL_ADDED,
    QWEN2_SPECIALS,
    TokenScript,
    build_bpe_tokenizer,
    build_tiny_llama,
    build_tiny_qwen2,
)

pytest.importorskip("tokenizers")

_ADDED = tuple(f"<|bicodec_semantic_{i}|>" for i in range(8)) + tuple(f"<custom_token_{i}>" for i in range(8))
_QWEN2_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
}
_LLAMA3_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load(path: Path) -> tuple[Any, Any]:
    """Load tokenizer and model with transformers; fail on warnings or missing/unexpected keys."""
    transformers = pytest.importorskip("transformers")
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = transformers.AutoTokenizer.from_pretrained(path)
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not handler.messages, handler.messages
    assert not [str(w.message) for w in caught if issubclass(w.category, (UserWarning, FutureWarning))]
    return tok, model.eval()


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen2"), added_tokens=QWEN2_NONSPECIAL_ADDED + _ADDED)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(
        tmp_path_factory.mktemp("llama"), added_tokens=_ADDED, pad_token="<|finetune_right_pad_id|>"
    )


# ------------------------------------------------------------------------------------------------------ tokenizers


@pytest.mark.parametrize("flavor", ["qwen2", "llama3"])
def test_tokenizer_files_and_ids_match_autotokenizer(tmp_path: Path, flavor: str) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    specials = QWEN2_SPECIALS if flavor == "qwen2" else LLAMA3_SPECIALS
    build_bpe_tokenizer(tmp_path, flavor=flavor, special_tokens=specials, added_tokens=_ADDED)  # type: ignore[arg-type]
    assert {p.name for p in tmp_path.iterdir()} == (_QWEN2_FILES if flavor == "qwen2" else _LLAMA3_FILES)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert type(auto).__name__ == ("Qwen2Tokenizer" if flavor == "qwen2" else "TokenizersBackend")
    head = "<|im_start|>" if flavor == "qwen2" else "<|start_header_id|>"
    prompt = f"{head}Hello, world! 今天天气很好 123<|bicodec_semantic_3|><custom_token_7> x{specials[2]}\n"
    for add_special in (True, False):
        ids = auto(prompt, add_special_tokens=add_special)["input_ids"]
        assert ids == raw.encode(prompt, add_special_tokens=add_special).ids
    ids = auto(prompt)["input_ids"]
    bos = raw.token_to_id("<|begin_of_text|>")
    assert (ids[0] == bos) == (flavor == "llama3")  # Llama 3 prepends BOS via its post-processor; Qwen adds none
    assert (
        auto.decode(ids, skip_special_tokens=True)
        == "Hello, world! 今天天气很好 123<|bicodec_semantic_3|><custom_token_7> x\n"
    )
    # Layout: 256 bytes + merges, then specials, then the added tokens in order; a few hundred tokens in all.
    first = raw.token_to_id(specials[0])
    assert [raw.token_to_id(t) for t in (*specials, *_ADDED)] == list(range(first, first + len(specials) + len(_ADDED)))
    assert 300 < first < 512
    assert len(auto) == raw.get_vocab_size() == first + len(specials) + len(_ADDED)
    expected_eos = "<|im_end|>" if flavor == "qwen2" else "<|end_of_text|>"
    assert auto.eos_token == expected_eos


def test_tokenizer_rejects_unknown_named_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eos_token"):
        build_bpe_tokenizer(tmp_path, flavor="qwen2", special_tokens=("<|endoftext|>",), eos_token="<|nope|>")


# ---------------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_loads_and_unscripted_greedy_is_varied(arch: str, qwen2_dir: Path, llama_dir: Path) -> None:
    import json

    import torch

    path = qwen2_dir if arch == "qwen2" else llama_dir
    assert {p.name for p in path.iterdir()} >= _MODEL_FILES
    tok, model = _load(path)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] % 64 == 0 and len(tok) <= config["vocab_size"] < len(tok) + 64
    assert config["hidden_size"] // config["num_attention_heads"] >= 32
    assert config["eos_token_id"] == tok.eos_token_id
    assert config["tie_word_embeddings"] is True and model.lm_head.weight is model.model.embed_tokens.weight
    assert "rope_theta" in config and "rope_parameters" in config and "torch_dtype" in config
    if arch == "llama":
        assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
        assert config["bos_token_id"] == tok.bos_token_id and config["pad_token_id"] == tok.pad_token_id
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        prompt = torch.randint(0, len(tok), (1, 8), generator=generator)
        out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        new = out[0, 8:].tolist()
        assert len(new) == 32 and len(set(new)) >= 6, new
    # Padding rows (ids beyond the tokenizer) are kept far below every real token, so sampling never returns them.
    with torch.no_grad():
        logits = model(torch.randint(0, len(tok), (2, 16), generator=generator)).logits
    assert (logits[..., : len(tok)].amax(-1) - logits[..., len(tok) :].amax(-1)).min() > 100
    sampled = model.generate(prompt, max_new_tokens=48, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    assert sampled[0, 8:].max().item() < len(tok)


def test_build_is_deterministic(tmp_path: Path, qwen2_dir: Path) -> None:
    again = build_tiny_qwen2(tmp_path / "again", added_tokens=QWEN2_NONSPECIAL_ADDED + _ADDED)
    for name in sorted(_MODEL_FILES | _QWEN2_FILES):
        assert (again / name).read_bytes() == (qwen2_dir / name).read_bytes(), name
    other = build_tiny_qwen2(tmp_path / "other", added_tokens=QWEN2_NONSPECIAL_ADDED + _ADDED, seed=1)
    assert (other / "model.safetensors").read_bytes() != (qwen2_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (qwen2_dir / "tokenizer.json").read_bytes()


def test_invalid_arguments(tmp_path: Path) -> None:
    script = TokenScript(transitions={"<|im_start|>": "<|im_end|>"})
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        build_tiny_qwen2(tmp_path, script=script)
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_qwen2(tmp_path, num_attention_heads=4)
    with pytest.raises(ValueError, match="not a single token"):
        build_tiny_qwen2(tmp_path, tie_word_embeddings=False, script=TokenScript(transitions={"<|nope|>": "a"}))
    with pytest.raises(ValueError, match="more than one"):
        TokenScript(fallbacks=((("a", "b"), "c"), (("b",), "d")))


def test_scripted_llama_bf16_follows_script(tmp_path: Path) -> None:
    import torch

    added = tuple(f"<custom_token_{i}>" for i in range(40))
    chain = ("<|eot_id|>", *added[10:30], "<custom_token_2>", "<|end_of_text|>")
    script = TokenScript(
        transitions=dict(itertools.pairwise(chain)),
        fallbacks=((added[30:], added[10]),),  # any of 30..39 → the chain's first audio token
    )
    path = build_tiny_llama(
        tmp_path, added_tokens=added, tie_word_embeddings=False, script=script, dtype="bfloat16", seed=3
    )
    tok, model = _load(path)
    assert model.dtype == torch.bfloat16
    for prompt, expected in (
        ("<custom_token_3>voice: some text<|eot_id|>", chain[1:]),
        ("<custom_token_3>voice: some text<custom_token_35>", chain[1:]),
        ("<custom_token_3>voice: some text<custom_token_20>", chain[chain.index("<custom_token_20>") + 1 :]),
    ):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        assert tuple(tok.convert_ids_to_tokens(out[0, ids.shape[1] :].tolist())) == expected


# ----------------------------------------------------------------------------------------------------------- cache


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(root))
    yield root


def test_cache_root_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cache.CACHE_DIR_ENV, raising=False)
    assert cache.cache_root() == Path.home() / ".cache" / "flashtts" / "tiny"


def test_cached_build_reuses_and_keys(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def build(path: Path) -> None:
        calls.append(path)
        (path / "weights.bin").write_bytes(b"x")

    first = cache.cached_build("demo", {"a": 1, "b": "x"}, build)
    assert first.parent == cache_dir and first.name.startswith("demo-") and len(first.name) == len("demo-") + 16
    assert (first / "weights.bin").read_bytes() == b"x"
    assert calls[0] != first  # built elsewhere, then moved into place
    assert cache.cached_build("demo", {"b": "x", "a": 1}, build) == first
    assert len(calls) == 1
    assert cache.cached_build("demo", {"a": 2, "b": "x"}, build) != first
    monkeypatch.setattr(cache, "BUILDER_VERSION", cache.BUILDER_VERSION + "-next")
    assert cache.cached_build("demo", {"a": 1, "b": "x"}, build) != first
    assert len(calls) == 3
    assert sorted(p.name.startswith(".") for p in cache_dir.iterdir()) == [False, False, False]


def test_cached_build_failure_and_race(cache_dir: Path) -> None:
    def failing(path: Path) -> None:
        (path / "partial").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.cached_build("demo", {"n": 1}, failing)
    assert list(cache_dir.iterdir()) == []

    final = cache_dir / cache.cache_key("demo", {"n": 2})

    def racing(path: Path) -> None:
        # Another process publishes the same entry while we are still building: we must keep theirs.
        final.mkdir()
        (final / "owner").write_text("other")
        (path / "owner").write_text("us")

    assert cache.cached_build("demo", {"n": 2}, racing) == final
    assert (final / "owner").read_text() == "other"
    assert [p.name for p in cache_dir.iterdir()] == [final.name]
    assert os.environ[cache.CACHE_DIR_ENV] == str(cache_dir)
