"""``flashtts convert-gguf``: what the GGUF file holds, and that llama.cpp reads it like transformers reads the source.

The metadata/shape checks need only the ``gguf`` package. The round trips through llama.cpp (tokenizer ids, logits)
need llama-cpp-python and skip with a reason without it; the logit comparison also needs torch + transformers.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flashtts_core.cli import main
from flashtts_core.convert import convert_to_gguf, find_llm_dir
from flashtts_core.convert.gguf import llama3_rope_factors
from flashtts_core.errors import CheckpointError
from flashtts_core.testing.tiny_gguf import build_tiny_gguf

gguf = pytest.importorskip("gguf", reason="the converter needs the gguf package: pip install 'flashtts-core[gguf]'")
pytest.importorskip("tokenizers")

_TOKEN_TYPE = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}


# ------------------------------------------------------------------------------------------------------- helpers


def _field(reader: Any, key: str) -> Any:
    """A scalar, string or array value of a GGUF key."""
    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def _tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _values(tensor: Any) -> np.ndarray:
    """float32 values of a GGUF tensor in numpy (row-major) shape."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """float32 tensors of a single-file f32 safetensors checkpoint."""
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _hf_config(hf_dir: Path) -> dict[str, Any]:
    return json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))


def _convert(hf_dir: Path, tmp_path: Path, outtype: str = "f32") -> Any:
    path = build_tiny_gguf(hf_dir, tmp_path / f"model-{outtype}.gguf", outtype=outtype)  # type: ignore[arg-type]
    return gguf.GGUFReader(path)


def _split_safetensors(src: Path, out_dir: Path) -> None:
    """Rewrite a single-file checkpoint as two shards + ``model.safetensors.index.json`` (bytes copied as is)."""
    raw = src.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    names = sorted(header)
    weight_map: dict[str, str] = {}
    total = 0
    for shard, part in enumerate((names[::2], names[1::2]), start=1):
        filename = f"model-{shard:05d}-of-00002.safetensors"
        new_header: dict[str, Any] = {}
        blobs: list[bytes] = []
        offset = 0
        for name in part:
            begin, end = header[name]["data_offsets"]
            blob = raw[8 + length + begin : 8 + length + end]
            new_header[name] = {**header[name], "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
            total += len(blob)
            weight_map[name] = filename
        encoded = json.dumps(new_header).encode()
        encoded += b" " * (-len(encoded) % 8)
        (out_dir / filename).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            (dst / item.name).write_bytes(item.read_bytes())
    return dst


# ------------------------------------------------------------------------------------------ metadata and shapes


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_metadata_tokenizer_and_shapes(arch: str, tiny_qwen2_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    hf_dir = tiny_qwen2_dir if arch == "qwen2" else tiny_llama_dir
    config = _hf_config(hf_dir)
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    reader = _convert(hf_dir, tmp_path)

    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == config["num_hidden_layers"]
    assert _field(reader, f"{arch}.embedding_length") == config["hidden_size"]
    assert _field(reader, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert _field(reader, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert _field(reader, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, f"{arch}.context_length") == config["max_position_embeddings"]
    assert math.isclose(_field(reader, f"{arch}.rope.freq_base"), config["rope_theta"])
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    assert math.isclose(eps, config["rms_norm_eps"], rel_tol=1e-6)

    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == ("qwen2" if arch == "qwen2" else "llama-bpe")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == config["vocab_size"]
    for token, index in tokenizer["model"]["vocab"].items():
        assert tokens[index] == token and types[index] == _TOKEN_TYPE["normal"]
    for added in tokenizer["added_tokens"]:
        assert tokens[added["id"]] == added["content"]
        assert types[added["id"]] == _TOKEN_TYPE["control" if added["special"] else "user_defined"]
    n_real = max(t["id"] for t in tokenizer["added_tokens"]) + 1
    assert all(t == _TOKEN_TYPE["unused"] for t in types[n_real:])  # padding rows of the embedding
    merges = _field(reader, "tokenizer.ggml.merges")
    assert merges[:3] == [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"][:3]]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert _field(reader, "tokenizer.ggml.add_bos_token") is (arch == "llama")  # Llama 3 prepends BOS, Qwen does not
    if arch == "qwen2":
        assert _field(reader, "tokenizer.ggml.padding_token_id") == config["pad_token_id"]

    tensors = _tensors(reader)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    assert tuple(tensors["token_embd.weight"].shape) == (hidden, vocab)  # gguf lists dimensions innermost first
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    kv_dim = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    assert tuple(tensors["blk.1.attn_k.weight"].shape) == (hidden, kv_dim)
    assert tuple(tensors["blk.0.ffn_down.weight"].shape) == (config["intermediate_size"], hidden)
    assert ("blk.0.attn_q.bias" in tensors) is (arch == "qwen2")
    assert ("rope_freqs.weight" in tensors) is (arch == "llama")


def test_weights_are_copied_exactly(tiny_qwen2_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Qwen2 weights are byte copies; Llama q/k rows are regrouped per head from halves to adjacent pairs."""
    qwen = _tensors(_convert(tiny_qwen2_dir, tmp_path / "q"))
    hf = _hf_tensors(tiny_qwen2_dir)
    np.testing.assert_array_equal(_values(qwen["blk.0.attn_q.weight"]), hf["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(_values(qwen["token_embd.weight"]), hf["model.embed_tokens.weight"])

    config = _hf_config(tiny_llama_dir)
    llama = _tensors(_convert(tiny_llama_dir, tmp_path / "l"))
    hf = _hf_tensors(tiny_llama_dir)
    q_hf = hf["model.layers.0.self_attn.q_proj.weight"]
    q_gguf = _values(llama["blk.0.attn_q.weight"])
    head_dim = config["head_dim"]
    for head in range(config["num_attention_heads"]):
        rows = q_hf[head * head_dim : (head + 1) * head_dim]
        pairs = q_gguf[head * head_dim : (head + 1) * head_dim]
        np.testing.assert_array_equal(pairs[0::2], rows[: head_dim // 2])
        np.testing.assert_array_equal(pairs[1::2], rows[head_dim // 2 :])
    np.testing.assert_array_equal(_values(llama["blk.0.attn_v.weight"]), hf["model.layers.0.self_attn.v_proj.weight"])


def test_llama3_rope_factors_match_transformers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``rope_freqs`` divides transformers' default frequencies into its llama3-scaled ones."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.AutoConfig.from_pretrained(tiny_llama_dir)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    head_dim = config.head_dim
    base = 1.0 / (config.rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
    factors = _values(_tensors(_convert(tiny_llama_dir, tmp_path))["rope_freqs.weight"])
    np.testing.assert_allclose(base / factors, scaled.numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 32.0  # both ends of the llama3 blend occur in the tiny model
    # and the helper gives the same numbers in float64
    np.testing.assert_allclose(
        llama3_rope_factors(config.rope_parameters, head_dim, config.rope_parameters["rope_theta"]), factors, rtol=1e-6
    )


@pytest.mark.parametrize(("outtype", "matrix_type"), [("f16", "F16"), ("q8_0", "Q8_0")])
def test_outtypes(outtype: str, matrix_type: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    tensors = _tensors(_convert(tiny_llama_dir, tmp_path, outtype))
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == matrix_type
    assert tensors["token_embd.weight"].tensor_type.name == matrix_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"
    reference = _hf_tensors(tiny_llama_dir)["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_allclose(_values(tensors["blk.0.ffn_up.weight"]), reference, atol=0.05)


def test_sharded_bf16_checkpoint(tmp_path: Path) -> None:
    """A bf16 checkpoint in two shards converts to the values of its f32 twin rounded to bf16."""
    from flashtts_core.testing.tiny_llm import build_tiny_qwen2

    f32_dir = build_tiny_qwen2(tmp_path / "f32", hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    bf16_dir = build_tiny_qwen2(
        tmp_path / "bf16", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, dtype="bfloat16"
    )
    sharded = _copy_without_weights(bf16_dir, tmp_path / "sharded")
    _split_safetensors(bf16_dir / "model.safetensors", sharded)
    assert not (sharded / "model.safetensors").exists()

    from_shards = _tensors(_convert(sharded, tmp_path / "out"))
    from_f32 = _hf_tensors(f32_dir)
    assert len(from_shards) == len(_tensors(_convert(f32_dir, tmp_path / "out32")))
    embed = _values(from_shards["token_embd.weight"])
    np.testing.assert_allclose(embed, from_f32["model.embed_tokens.weight"], rtol=2**-7, atol=1e-30)
    bits = embed.view(np.uint32)
    assert not np.any(bits & 0xFFFF)  # exactly representable in bf16: the bytes were widened, not re-rounded


def test_untied_model_keeps_lm_head(tmp_path: Path) -> None:
    from flashtts_core.testing.tiny_spark_llm import tiny_spark_llm_dir

    llm_dir = tiny_spark_llm_dir()
    tensors = _tensors(_convert(llm_dir, tmp_path))
    hf = _hf_tensors(llm_dir)
    np.testing.assert_array_equal(_values(tensors["output.weight"]), hf["lm_head.weight"])


def test_model_roots_are_found_like_the_engines_do(tmp_path: Path) -> None:
    from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

    spark = tiny_checkpoint_dir("spark")
    assert find_llm_dir(spark) == spark / "LLM"
    orpheus = tiny_checkpoint_dir("orpheus")
    assert find_llm_dir(orpheus) == orpheus
    assert find_llm_dir(spark / "LLM") == spark / "LLM"
    with pytest.raises(CheckpointError, match="no Hugging Face LLM folder"):
        find_llm_dir(tmp_path)


def test_unsupported_architecture_is_refused(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    broken = _copy_without_weights(tiny_qwen2_dir, tmp_path / "m")
    config = _hf_config(broken)
    config.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (broken / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="not supported"):
        convert_to_gguf(broken, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_cli_writes_into_the_llm_folder(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_without_weights(tiny_llama_dir, tmp_path / "model")
    (model / "model.safetensors").symlink_to(tiny_llama_dir / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-gguf", str(model), "--outtype", "q8_0", "--log_level", "warning"])
    assert exit_info.value.code == 0
    assert (model / "model.gguf").is_file()
    assert "model.gguf" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-gguf", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1


# ------------------------------------------------------------------------------------ round trips through llama.cpp


def _llama_cpp() -> Any:
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (source build: see plugins/flashtts-llamacpp/README.md)"
    )


def _llama(path: Path, **kwargs: Any) -> Any:
    return _llama_cpp().Llama(model_path=str(path), n_threads=1, n_threads_batch=1, verbose=False, **kwargs)


_TEXT = "Hello, world! 今天天气很好 2024 numbers\n  and  spaces"


@pytest.mark.parametrize("family", ["spark", "orpheus"])
def test_llama_cpp_tokenizes_like_hugging_face(family: str, tmp_path: Path) -> None:
    """Text mixed with special tokens and the engines' added (audio) tokens gives the same ids in llama.cpp as in
    the Hugging Face tokenizer, for the Spark (Qwen2 + 13.5k added tokens) and Orpheus (Llama 3 + 28.7k custom tokens)
    tokenizers."""
    _llama_cpp()
    from tokenizers import Tokenizer

    from flashtts_core.testing.checkpoints import tiny_checkpoint_dir

    llm_dir = find_llm_dir(tiny_checkpoint_dir(family))
    if family == "spark":
        specials = "<|im_start|>", "<|task_tts|>", "<|start_content|>", "<|end_content|>", "<|im_end|>"
        added = "<|bicodec_global_3|>", "<|bicodec_semantic_4095|>", "<|bicodec_semantic_0|>"
    else:
        specials = "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"
        added = "<custom_token_3>", "<custom_token_28683>", "<custom_token_10>"
    prompt = f"{specials[0]}{_TEXT}{added[0]}{added[1]} tail{specials[1]}{added[2]}x{''.join(specials[2:])}"
    expected = Tokenizer.from_file(str(llm_dir / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids
    gguf_path = build_tiny_gguf(llm_dir, tmp_path / "model.gguf")
    llm = _llama(gguf_path, vocab_only=True)
    try:
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == expected
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_llama_cpp_logits_match_transformers(
    arch: str, tiny_qwen2_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Same prompt through transformers and through llama.cpp on the f32 GGUF: logits close, argmax equal at every
    position (this checks the tensor mapping, the Llama q/k reordering and the llama3 rope factors)."""
    _llama_cpp()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_dir = tiny_qwen2_dir if arch == "qwen2" else tiny_llama_dir
    prompt = list(range(5, 45)) + list(range(300, 340))  # 80 positions: beyond the llama3 high-frequency band
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    llm = _llama(build_tiny_gguf(hf_dir, tmp_path / "model.gguf"), n_ctx=128, logits_all=True)
    try:
        llm.eval(prompt)
        got = np.asarray(llm.scores[: len(prompt)])
    finally:
        llm.close()
    assert got.shape == expected.shape
    # Real tokens only: the padding rows of the embedding sit ~1000 below them, where f32 rounding alone is ~0.1.
    from tokenizers import Tokenizer

    n_real = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert np.abs(got[:, :n_real] - expected[:, :n_real]).max() < 1e-3
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
