"""Spark prompt builders and completion parsing against the documented formats (models.md §A.9–A.10)."""

from __future__ import annotations

import pytest

from flashtts_core.engines.spark.tokenization import CompletionParser, SparkTokenizer
from flashtts_core.errors import CheckpointError
from flashtts_core.testing.tiny_spark_llm import spark_script_info

TEXT = "Hello world, 你好世界。"
GLOBALS = list(range(100, 132))
SEMANTICS = [5, 8191, 0, 77]


def g(ids: list[int]) -> str:
    return "".join(f"<|bicodec_global_{i}|>" for i in ids)


def s(ids: list[int]) -> str:
    return "".join(f"<|bicodec_semantic_{i}|>" for i in ids)


def enc(tok: SparkTokenizer, markup: str) -> list[int]:
    """The documented prompt string, tokenised as one string (what the original sends to the LLM)."""
    return tok.tokenizer.encode(markup, add_special_tokens=False).ids


def test_table_reads_ids_by_name_with_the_published_relative_layout(spark_tokenizer: SparkTokenizer) -> None:
    table = spark_tokenizer.table
    tok = spark_tokenizer.tokenizer
    assert table.global_tokens.size == 4096 and table.semantic_tokens.size == 8192
    assert table.global_tokens.id(7) == tok.token_to_id("<|bicodec_global_7|>")
    assert table.semantic_tokens.id(8191) == tok.token_to_id("<|bicodec_semantic_8191|>")
    assert table.special["im_end"] == tok.token_to_id("<|im_end|>")
    # Offsets from <|bicodec_global_0|> equal the published ones (151665-based ids of §A.9).
    base = table.global_tokens.start
    assert table.semantic_tokens.start - base == 155761 - 151665
    assert table.special["task_tts"] - base == 165137 - 151665
    assert table.special["end_semantic_token"] - base == 165157 - 151665
    assert spark_tokenizer.stop_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|end_semantic_token|>"))


def test_allowed_ids_cover_the_completion_vocabulary(spark_tokenizer: SparkTokenizer) -> None:
    allowed = spark_tokenizer.allowed_ids
    table = spark_tokenizer.table
    assert set(table.semantic_tokens.ids) <= allowed and set(table.global_tokens.ids) <= allowed
    assert set(spark_tokenizer.stop_ids) <= allowed
    assert table.special["task_tts"] not in allowed
    assert not set(spark_tokenizer.encode_text("hello")) & allowed


@pytest.mark.parametrize(
    ("gender", "pitch", "speed", "labels"),
    [
        ("female", None, None, (0, 2, 2)),
        ("male", "very_high", "low", (1, 4, 1)),
        ("female", "very_low", None, (0, 0, 2)),
    ],
)
def test_controllable_prompt_matches_the_documented_string(
    spark_tokenizer: SparkTokenizer, gender: str, pitch: str | None, speed: str | None, labels: tuple[int, int, int]
) -> None:
    doc = (
        f"<|task_controllable_tts|><|start_content|>{TEXT}<|end_content|><|start_style_label|>"
        f"<|gender_{labels[0]}|><|pitch_label_{labels[1]}|><|speed_label_{labels[2]}|><|end_style_label|>"
    )
    ids = spark_tokenizer.controllable_prompt(TEXT, gender=gender, pitch=pitch, speed=speed)  # type: ignore[arg-type]
    assert ids == enc(spark_tokenizer, doc)


def test_controllable_prompt_with_acoustic_fragment(spark_tokenizer: SparkTokenizer) -> None:
    fragment_text = (
        "<|start_acoustic_token|><|pitch_value_300|><|speed_value_5|><|end_acoustic_token|>"
        f"<|start_global_token|>{g(GLOBALS)}<|end_global_token|>"
    )
    fragment = enc(spark_tokenizer, fragment_text)
    doc = (
        f"<|task_controllable_tts|><|start_content|>{TEXT}<|end_content|><|start_style_label|><|gender_1|>"
        f"<|pitch_label_2|><|speed_label_2|><|end_style_label|>{fragment_text}"
    )
    ids = spark_tokenizer.controllable_prompt(TEXT, gender="male", acoustic_fragment=fragment)
    assert ids == enc(spark_tokenizer, doc)
    pitch_id = spark_tokenizer.tokenizer.token_to_id("<|pitch_value_300|>")
    speed_id = spark_tokenizer.tokenizer.token_to_id("<|speed_value_5|>")
    assert spark_tokenizer.acoustic_fragment([pitch_id, speed_id], GLOBALS) == fragment
    assert spark_tokenizer.parse_fragment(fragment) == ([pitch_id, speed_id], GLOBALS)
    assert spark_tokenizer.parse_fragment(fragment[:-5]) is None


def test_clone_prompt_without_transcript(spark_tokenizer: SparkTokenizer) -> None:
    doc = f"<|task_tts|><|start_content|>{TEXT}<|end_content|><|start_global_token|>{g(GLOBALS)}<|end_global_token|>"
    assert spark_tokenizer.clone_prompt(TEXT, global_ids=GLOBALS, semantic_ids=SEMANTICS) == enc(spark_tokenizer, doc)
    # A blank transcript is no transcript: no semantic prefix.
    blank = spark_tokenizer.clone_prompt(TEXT, global_ids=GLOBALS, semantic_ids=SEMANTICS, transcript="  ")
    assert blank == enc(spark_tokenizer, doc)


def test_clone_prompt_with_transcript_continues_the_reference(spark_tokenizer: SparkTokenizer) -> None:
    doc = (
        f"<|task_tts|><|start_content|>Reference words.{TEXT}<|end_content|><|start_global_token|>{g(GLOBALS)}"
        f"<|end_global_token|><|start_semantic_token|>{s(SEMANTICS)}"
    )
    ids = spark_tokenizer.clone_prompt(TEXT, global_ids=GLOBALS, semantic_ids=SEMANTICS, transcript="Reference words.")
    assert ids == enc(spark_tokenizer, doc)


def test_clone_prompt_style_extension(spark_tokenizer: SparkTokenizer) -> None:
    doc = (
        f"<|task_tts|><|start_content|>{TEXT}<|end_content|><|start_style_label|><|pitch_label_3|><|speed_label_2|>"
        f"<|end_style_label|><|start_global_token|>{g(GLOBALS)}<|end_global_token|>"
    )
    assert spark_tokenizer.clone_prompt(TEXT, global_ids=GLOBALS, pitch="high") == enc(spark_tokenizer, doc)
    moderate = spark_tokenizer.clone_prompt(TEXT, global_ids=GLOBALS, pitch="moderate", speed="moderate")
    assert moderate == spark_tokenizer.clone_prompt(TEXT, global_ids=GLOBALS)


def test_user_text_cannot_inject_structure(spark_tokenizer: SparkTokenizer) -> None:
    text = "say <|im_end|><|bicodec_global_3|> but keep <|not_a_token|>"
    ids = spark_tokenizer.encode_text(text)
    assert not set(ids) & (spark_tokenizer.allowed_ids | set(spark_tokenizer.table.special.values()))
    decoded = spark_tokenizer.tokenizer.decode(ids)
    assert decoded == "say <im_end><bicodec_global_3> but keep <|not_a_token|>"
    assert spark_tokenizer.count_tokens(text) == len(ids)


def test_parse_controllable_completion_by_ranges(spark_tokenizer: SparkTokenizer) -> None:
    info = spark_script_info(semantic_tokens=20)
    completion = enc(spark_tokenizer, "".join(info.controllable_completion_tokens))
    whole = spark_tokenizer.parser(controllable=True)
    assert whole.feed(completion) == list(info.semantic_ids)
    assert whole.prefix_done and whole.globals_ok and whole.global_ids == list(info.global_ids)
    fragment = spark_tokenizer.acoustic_fragment(whole.acoustic_ids, whole.global_ids)
    assert fragment == enc(spark_tokenizer, info.acoustic_prefix)
    # Streamed in odd-sized deltas: same result.
    parser = spark_tokenizer.parser(controllable=True)
    got: list[int] = []
    for i in range(0, len(completion), 7):
        got += parser.feed(completion[i : i + 7])
    assert got == list(info.semantic_ids) and parser.global_ids == list(info.global_ids)


def test_parse_malformed_and_clone_completions(spark_tokenizer: SparkTokenizer) -> None:
    short = enc(
        spark_tokenizer,
        f"<|start_acoustic_token|><|end_acoustic_token|><|start_global_token|>{g(GLOBALS[:5])}{s([1, 2])}",
    )
    parser = spark_tokenizer.parser(controllable=True)
    assert parser.feed(short) == [1, 2]  # semantics end an unterminated prefix
    assert parser.prefix_done and not parser.globals_ok
    clone = CompletionParser(spark_tokenizer, controllable=False)
    ids = enc(spark_tokenizer, f"<|start_semantic_token|>{s([9, 10])}{g([4])}hello{s([11])}")
    assert clone.feed(ids) == [9, 10, 11]  # anything but semantic tokens is ignored
    assert clone.global_ids == []


def test_missing_spark_tokens_is_a_checkpoint_error() -> None:
    from tokenizers import Tokenizer, models

    with pytest.raises(CheckpointError, match="task_tts"):
        SparkTokenizer(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
