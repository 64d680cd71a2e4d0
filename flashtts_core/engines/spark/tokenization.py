"""Spark-TTS prompt building and completion parsing, on token ids.

Every id comes from the checkpoint's ``LLM/tokenizer.json`` looked up by token *name* (``<|task_tts|>``,
``<|bicodec_semantic_0|>``, ...): the published tokenizer has them at 151665+ (models.md §A.9) but a tiny test
tokenizer has them elsewhere, and nothing here may assume either.

Why ids and not text (the original formats a prompt string and regex-parses the decoded completion, §3.4.5):

* prompts are assembled from the ids of the structural tokens plus the ids of the user text, so text that happens to
  contain ``<|im_end|>`` or ``<|bicodec_global_7|>`` cannot inject structure (such markup is neutralised first);
* completions are parsed by id *ranges* (the ``<|bicodec_semantic_i|>`` tokens are contiguous), which is exact and
  needs no detokenisation of every streamed delta.

The prompt id sequences are exactly the tokenisation of the documented prompt strings (§A.10, §3.4.3–3.4.4);
``tests/engines/spark/test_tokenization.py`` checks this against the strings themselves.

Shapes: global ids are ``int64 (32,)`` codec indices in ``[0, 4096)``; semantic ids ``int64 (T,)`` in ``[0, 8192)``
(50 tokens per second of 16 kHz audio).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from flashtts_core.errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = (
    "GENDERS",
    "LEVELS",
    "CompletionParser",
    "SparkTokenTable",
    "SparkTokenizer",
    "TokenRange",
)

logger = logging.getLogger(__name__)

#: Pitch/speed label index of each level (``sparktts/utils/token_parser.py``).
LEVELS: dict[str, int] = {"very_low": 0, "low": 1, "moderate": 2, "high": 3, "very_high": 4}
#: Gender label index of each built-in voice.
GENDERS: dict[str, int] = {"female": 0, "male": 1}

Gender = Literal["female", "male"]

# Markup that looks like an added token of a Qwen/Spark tokenizer.
_TOKEN_LIKE = re.compile(r"<\|[^<>|\s]{1,80}\|>")


@dataclass(frozen=True)
class TokenRange:
    """Contiguous ids ``start .. start + size - 1`` of ``<|{name}_0|>`` .. ``<|{name}_{size-1}|>``."""

    name: str
    start: int
    size: int

    def __contains__(self, token_id: object) -> bool:
        return isinstance(token_id, int) and self.start <= token_id < self.start + self.size

    def id(self, index: int) -> int:
        """Token id of ``<|{name}_{index}|>``."""
        if not 0 <= index < self.size:
            raise ValueError(f"{self.name} index {index} is outside 0..{self.size - 1}")
        return self.start + index

    def index(self, token_id: int) -> int:
        """Inverse of :meth:`id` (caller checks membership first)."""
        return token_id - self.start

    @property
    def ids(self) -> range:
        return range(self.start, self.start + self.size)


@dataclass(frozen=True)
class SparkTokenTable:
    """The ids the Spark engine needs, read from a tokenizer by name."""

    # Structural tokens by short name: "task_tts", "start_content", "end_global_token", "im_end", ...
    special: dict[str, int]
    global_tokens: TokenRange  # <|bicodec_global_i|>, 4096 in the released model
    semantic_tokens: TokenRange  # <|bicodec_semantic_i|>, 8192 in the released model
    pitch_values: TokenRange  # <|pitch_value_i|>, generated in the controllable acoustic prefix
    speed_values: TokenRange  # <|speed_value_i|>
    gender_labels: tuple[int, ...]  # <|gender_0|>, <|gender_1|>
    pitch_labels: tuple[int, ...]  # <|pitch_label_0..4|>
    speed_labels: tuple[int, ...]  # <|speed_label_0..4|>
    added_tokens: frozenset[str] = field(default=frozenset(), repr=False)  # every added token's text

    _STRUCTURAL = (
        "task_tts",
        "task_controllable_tts",
        "start_content",
        "end_content",
        "start_style_label",
        "end_style_label",
        "start_acoustic_token",
        "end_acoustic_token",
        "start_global_token",
        "end_global_token",
        "start_semantic_token",
        "end_semantic_token",
        "im_end",
    )

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> SparkTokenTable:
        """Look every needed token up by name; :class:`CheckpointError` naming the first one that is missing."""

        def need(text: str) -> int:
            token_id = tokenizer.token_to_id(text)
            if token_id is None:
                raise CheckpointError(
                    f"the LLM tokenizer has no token {text!r}; --model_path must be a Spark-TTS-0.5B directory "
                    "whose LLM/tokenizer.json has Spark's added tokens"
                )
            return token_id

        def token_range(name: str) -> TokenRange:
            start = need(f"<|{name}_0|>")
            size = 1
            while (token_id := tokenizer.token_to_id(f"<|{name}_{size}|>")) is not None:
                if token_id != start + size:
                    raise CheckpointError(
                        f"the LLM tokenizer's <|{name}_i|> tokens are not contiguous (<|{name}_{size}|> is {token_id}, "
                        f"expected {start + size}); this is not a Spark-TTS tokenizer"
                    )
                size += 1
            return TokenRange(name, start, size)

        special = {name: need(f"<|{name}|>") for name in cls._STRUCTURAL}
        decoder = tokenizer.get_added_tokens_decoder()
        return cls(
            special=special,
            global_tokens=token_range("bicodec_global"),
            semantic_tokens=token_range("bicodec_semantic"),
            pitch_values=token_range("pitch_value"),
            speed_values=token_range("speed_value"),
            gender_labels=tuple(need(f"<|gender_{i}|>") for i in range(len(GENDERS))),
            pitch_labels=tuple(need(f"<|pitch_label_{i}|>") for i in range(len(LEVELS))),
            speed_labels=tuple(need(f"<|speed_label_{i}|>") for i in range(len(LEVELS))),
            added_tokens=frozenset(t.content for t in decoder.values()),
        )

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops at ``<|im_end|>`` (the model's eos) or ``<|end_semantic_token|>`` (FlashTTS)."""
        return (self.special["im_end"], self.special["end_semantic_token"])

    def allowed_ids(self) -> frozenset[int]:
        """Everything a Spark completion may contain: codec tokens, the acoustic values, the framing tokens of the
        acoustic prefix and the stop ids. Used as ``allowed_token_ids`` where the backend supports it, so a sampled
        completion can never wander into text tokens."""
        framing = ("start_acoustic_token", "end_acoustic_token", "start_global_token", "end_global_token")
        ids: set[int] = {self.special[name] for name in framing}
        ids.add(self.special["start_semantic_token"])
        ids.update(self.stop_ids)
        for token_range in (self.global_tokens, self.semantic_tokens, self.pitch_values, self.speed_values):
            ids.update(token_range.ids)
        return frozenset(ids)


class SparkTokenizer:
    """The LLM tokenizer (``tokenizers`` library, not transformers) plus Spark's prompt formats.

    ``global_count`` is the number of global tokens per utterance (BiCodec ``speaker_encoder.token_num``, 32).
    """

    def __init__(self, tokenizer: Tokenizer, *, global_count: int = 32) -> None:
        self.tokenizer = tokenizer
        self.table = SparkTokenTable.from_tokenizer(tokenizer)
        self.global_count = global_count
        self._allowed = self.table.allowed_ids()

    @classmethod
    def from_file(cls, path: Path | str, *, global_count: int = 32) -> SparkTokenizer:
        """Load ``LLM/tokenizer.json``."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; a Spark-TTS LLM folder has a tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(f"{path} could not be loaded: {exc}") from exc
        return cls(tokenizer, global_count=global_count)

    # --- text ------------------------------------------------------------------------------------------------

    def neutralise(self, text: str) -> str:
        """Turn ``<|name|>`` markup that is an added token of this tokenizer into plain ``<name>`` text.

        The tokenizer matches added tokens anywhere in a string, so without this, user text could close the content
        span early or smuggle codec tokens into the prompt."""

        def fix(match: re.Match[str]) -> str:
            token = match.group(0)
            return f"<{token[2:-2]}>" if token in self.table.added_tokens else token

        return _TOKEN_LIKE.sub(fix, text)

    def encode_text(self, text: str) -> list[int]:
        """Ids of user text (no special tokens added; Qwen adds no BOS)."""
        return list(self.tokenizer.encode(self.neutralise(text), add_special_tokens=False).ids)

    def count_tokens(self, text: str) -> int:
        """LLM token length of ``text``: the unit of ``length_threshold``/``window_size`` when splitting."""
        return len(self.encode_text(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with every token kept (used to persist acoustic fragments as token strings)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_markup(self, text: str) -> list[int]:
        """Ids of trusted token markup (a persisted acoustic fragment): added tokens are *not* neutralised."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    # --- prompts ---------------------------------------------------------------------------------------------

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.table.stop_ids

    @property
    def allowed_ids(self) -> frozenset[int]:
        return self._allowed

    def _style(self, pitch: str | None, speed: str | None) -> tuple[int, int]:
        """(pitch label id, speed label id); a missing level is ``moderate``."""
        try:
            pitch_index, speed_index = LEVELS[pitch or "moderate"], LEVELS[speed or "moderate"]
        except KeyError as exc:
            raise ValueError(f"unknown level {exc.args[0]!r}; use one of {', '.join(LEVELS)}") from None
        return self.table.pitch_labels[pitch_index], self.table.speed_labels[speed_index]

    def controllable_prompt(
        self,
        text: str,
        *,
        gender: Gender,
        pitch: str | None = None,
        speed: str | None = None,
        acoustic_fragment: Sequence[int] | None = None,
    ) -> list[int]:
        """``<|task_controllable_tts|><|start_content|>{text}<|end_content|><|start_style_label|><|gender_G|>
        <|pitch_label_P|><|speed_label_S|><|end_style_label|>`` (§3.4.3; missing levels are ``moderate``).

        ``acoustic_fragment`` (ids ``<|start_acoustic_token|>`` … ``<|end_global_token|>`` of an earlier
        completion) is appended so the model keeps that voice and only generates semantic tokens."""
        s = self.table.special
        pitch_id, speed_id = self._style(pitch, speed)
        ids = [s["task_controllable_tts"], s["start_content"], *self.encode_text(text), s["end_content"]]
        ids += [s["start_style_label"], self.table.gender_labels[GENDERS[gender]], pitch_id, speed_id]
        ids.append(s["end_style_label"])
        if acoustic_fragment:
            ids.extend(acoustic_fragment)
        return ids

    def clone_prompt(
        self,
        text: str,
        *,
        global_ids: Sequence[int],
        semantic_ids: Sequence[int] | None = None,
        transcript: str | None = None,
        pitch: str | None = None,
        speed: str | None = None,
    ) -> list[int]:
        """``<|task_tts|><|start_content|>{transcript}{text}<|end_content|>[style]<|start_global_token|>{globals}
        <|end_global_token|>[<|start_semantic_token|>{reference semantics}]`` (§A.10, §3.4.4).

        With a non-empty transcript the reference's semantic tokens are appended (continuation prompting: the model
        continues the reference's speech with the new text). The style block
        ``<|start_style_label|><|pitch_label_P|><|speed_label_S|><|end_style_label|>`` is FlashTTS's extension and
        only added when pitch or speed is given and not both are ``moderate``."""
        s = self.table.special
        transcript = (transcript or "").strip() or None
        content = f"{transcript}{text}" if transcript else text
        ids = [s["task_tts"], s["start_content"], *self.encode_text(content), s["end_content"]]
        if (pitch or "moderate") != "moderate" or (speed or "moderate") != "moderate":
            pitch_id, speed_id = self._style(pitch, speed)
            ids += [s["start_style_label"], pitch_id, speed_id, s["end_style_label"]]
        ids.append(s["start_global_token"])
        ids.extend(self.table.global_tokens.id(int(g)) for g in global_ids)
        ids.append(s["end_global_token"])
        if transcript and semantic_ids is not None and len(semantic_ids) > 0:
            ids.append(s["start_semantic_token"])
            ids.extend(self.table.semantic_tokens.id(int(x)) for x in semantic_ids)
        return ids

    def acoustic_fragment(self, acoustic_ids: Sequence[int], global_ids: Sequence[int]) -> list[int]:
        """The canonical voice-reuse fragment ``<|start_acoustic_token|>{values}<|end_acoustic_token|>
        <|start_global_token|>{globals}<|end_global_token|>`` (what the model generates in controllable mode)."""
        s = self.table.special
        return [
            s["start_acoustic_token"],
            *acoustic_ids,
            s["end_acoustic_token"],
            s["start_global_token"],
            *(self.table.global_tokens.id(int(g)) for g in global_ids),
            s["end_global_token"],
        ]

    def parse_fragment(self, fragment: Sequence[int]) -> tuple[list[int], list[int]] | None:
        """(acoustic value ids, global codec indices) of a fragment, or ``None`` if it is not one."""
        parser = CompletionParser(self, controllable=True)
        parser.feed(fragment)
        if not parser.prefix_done or not parser.globals_ok:
            return None
        return parser.acoustic_ids, parser.global_ids

    def parser(self, *, controllable: bool) -> CompletionParser:
        return CompletionParser(self, controllable=controllable)


class CompletionParser:
    """Incremental parser of generated ids (fed the deltas a backend streams).

    Controllable mode: the completion starts with the acoustic prefix ``<|start_acoustic_token|><|pitch_value_p|>
    <|speed_value_v|><|end_acoustic_token|><|start_global_token|>{globals}<|end_global_token|>``. The prefix ends at
    ``<|end_global_token|>`` (or, for a malformed completion, at the first semantic token); the voice is valid only
    if it held exactly ``global_count`` global tokens. Clone mode has no prefix. After the prefix every
    ``<|bicodec_semantic_i|>`` is a semantic token; anything else is ignored (the original took every regex match).
    """

    def __init__(self, tokenizer: SparkTokenizer, *, controllable: bool) -> None:
        self._table = tokenizer.table
        self._global_count = tokenizer.global_count
        self.controllable = controllable
        self.prefix_done = not controllable
        self.global_ids: list[int] = []  # codec indices from the prefix (controllable mode)
        self.acoustic_ids: list[int] = []  # token ids between <|start_acoustic_token|> and <|end_acoustic_token|>
        self.semantic_ids: list[int] = []  # codec indices, all so far
        self._in_acoustic = False

    @property
    def globals_ok(self) -> bool:
        return len(self.global_ids) == self._global_count

    def feed(self, ids: Iterable[int]) -> list[int]:
        """Consume new ids; return the semantic codec indices among them (in order)."""
        table = self._table
        semantic = table.semantic_tokens
        s = table.special
        new: list[int] = []
        for token_id in ids:
            if not self.prefix_done:
                if token_id == s["end_global_token"]:
                    self.prefix_done = True
                elif token_id in table.global_tokens:
                    self.global_ids.append(table.global_tokens.index(token_id))
                elif token_id == s["start_acoustic_token"]:
                    self._in_acoustic = True
                elif token_id == s["end_acoustic_token"]:
                    self._in_acoustic = False
                elif token_id in semantic or token_id == s["start_semantic_token"]:
                    # Malformed: semantics without a closed global block. Treat the prefix as ended.
                    self.prefix_done = True
                    if token_id in semantic:
                        new.append(semantic.index(token_id))
                elif self._in_acoustic:
                    self.acoustic_ids.append(token_id)
                continue
            if token_id in semantic:
                new.append(semantic.index(token_id))
        self.semantic_ids.extend(new)
        return new
