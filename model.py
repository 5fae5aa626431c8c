"""The target model: a Llama-style decoder in plain PyTorch, and its loaders.

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
  loaders       Hugging Face checkpoints (`load_hf`, `save_hf`, `atomic_write`); Llama, Vicuna,
                Mistral, Qwen2, Qwen3
  the default   the embedded default target and a checkpoint's tokenizer (`load_target`, `cache_dir`;
                the GGUF file is read and converted once by extras/gguf.py, the tokenizer is
                extras/tokenizer.py's)
  runtime       devices, dtypes' machine fingerprint (`machine`), `clock`, `mean`, one-line errors,
                checks of flags, destinations and context budgets
  CLI           `main` (its --bench is extras/bench.py's)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")   # per process: torchrun's ranks may write one file
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


# ----------------------------------------------------------------------------- the embedded default target

DEFAULT_TARGET = "SmolLM2-135M-Instruct"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: Optional[str], device) -> torch.dtype:
    """A --dtype name for a device; the default is bf16 on CUDA and fp32 on a CPU."""
    return DTYPES[name or ("bf16" if str(device).startswith("cuda") else "fp32")]


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
        from extras.gguf import export_default   # the GGUF reader is plumbing, not the decoder
        export_default(out)
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


def load_tokenizer(path):
    """The checkpoint's `extras.tokenizer.Tokenizer` (plumbing: turning text into ids is not the study)."""
    from extras.tokenizer import Tokenizer
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
    """Every float on a parsed command line is finite: NaN or inf (`--temperature inf` would sample
    uniformly) is refused before any model loads."""
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
    ap.add_argument("--shape", help="with --bench: random weights of this architecture instead of "
                                                    "a checkpoint (no download), e.g. llama3-8b")
    a = ap.parse_args(argv)
    with one_line_errors():
        if a.export:
            from extras.gguf import export_default
            print(export_default(a.export))
            return
        if not (a.prompt or a.bench):
            ap.error("give --prompt TEXT, --bench or --export DIR")
        check_flags(a)
        if a.max_new_tokens < 0:
            raise TapsError(f"max_new_tokens must be >= 0, got {a.max_new_tokens}")
        dtype = resolve_dtype(a.dtype, a.device)
        if a.bench:
            from extras.bench import bench, random_target
            check_device(a.device)
            print(describe(machine(a.device)) + "\n")
            if a.shape:
                model = random_target(a.shape, a.device, dtype)
                prompt = torch.randint(model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
            else:
                model, tokenizer = load_target(a.target, a.device, dtype)
                prompt, _ = tokenizer.encode_chat([{"role": "user", "content": "Explain how a rainbow forms."}],
                                                  add_generation_prompt=True)
            return bench(model, prompt, a.device, a.max_new_tokens)
        model, tokenizer = load_target(a.target, a.device, dtype)
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        n = context_budget(model, len(ids), a.max_new_tokens, say=True)
        out = generate_plain(model, ids, n, a.temperature, a.top_p, tokenizer.stop_ids, g)
        print(tokenizer.decode([t for t in out if t not in tokenizer.stop_ids]))


if __name__ == "__main__":   # extras/ imports `model`: run the CLI from that module, one copy of its classes
    __import__("model").main()
