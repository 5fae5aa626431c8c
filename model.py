"""The target: a Llama-style decoder in plain PyTorch (Meta's llama3 `model.py`, gpt-fast).

`Transformer.forward(tokens, input_pos, mask, cache)` returns the logits and the final-norm
feature f_t that EAGLE drafters read (eq. 3). Explicit positions and a boolean mask let one call
score a whole draft tree (a node sees the prefix and its ancestors, at position prefix length +
depth): verification (eq. 5) is one target call. `KVCache.keep` then keeps the accepted path.

The static path (`StaticCache`, `StaticSteps`) computes the same with fixed shapes -- a cache of
S slots written at slot tensors and read through a mask, trees padded to buckets -- so its steps
compile once (`compile_step`: torch.compile, CUDA graphs on a GPU); the eager path stays the
reference it is tested against.

Sections: config · layers · KV cache (sliced; static) · model · static steps · sampling
(`logits_to_probs`, `generate_plain`) · identity, budgets, timing · CLI. Loading a target
from its files is extras/checkpoint.py's `load_target`.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
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
    n_kv_heads: int = 3            # grouped-query attention: n_heads / n_kv_heads share a K/V head
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
            raise TapsError(f"n_heads={self.n_heads} is not a multiple of "
                            f"n_kv_heads={self.n_kv_heads}")


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

    def forward(self, x, cos, sin, mask, cache, layer: int, slots=None):
        """cache: a `KVCache` (keys of [0, length + T)), or with `slots` a `StaticCache` (keys of
        all S slots, the new ones written at slots (T,); mask (B or 1, 1, T, S) hides the rest)."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)                  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)                 # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)                               # per head, over hd
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slots is not None:
            k, v = cache.write(layer, slots, k, v)                              # (B, nkv, S, hd)
        elif cache is not None:
            k, v = cache.update(layer, k, v)                                    # (B, nkv, L+T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B,nh,T,hd)
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

    def forward(self, x, cos, sin, mask, cache=None, layer=0, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slots)
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
            raise TapsError(f"KV cache is full ({L} + {T} > max_len {self.max_len}): raise max_len "
                            f"or shorten the prompt")
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


# Fixed shapes for the static path (torch.compile, CUDA graphs): a cache of S slots, S from a few
# lengths, and trees padded to a few sizes, so each step function compiles a handful of times.
STATIC_UNIT = 256                                # cache lengths S: 256 * 2**i
TREE_BUCKETS = (1, 8, 16, 32, 64, 128, 256)      # tree sizes (AutoTree verifies up to 256 nodes)


def static_length(n: int) -> int:
    """The cache length S that holds n slots: the smallest 256 * 2**i >= n."""
    S = STATIC_UNIT
    while S < n:
        S *= 2
    return S


def bucket(n: int) -> int:
    """The fixed size a tree of n nodes is padded to: the smallest of TREE_BUCKETS >= n."""
    for b in TREE_BUCKETS:
        if n <= b:
            return b
    raise TapsError(f"a tree of {n} nodes exceeds the largest static size {TREE_BUCKETS[-1]}; "
                    f"draft a smaller tree")


class StaticCache(nn.Module):
    """The static-shape twin of KVCache: keys and values of `n_layers` layers at S fixed slots.

    One K and one V buffer per layer (module buffers at static addresses, so CUDA graphs write them
    in place; one stacked buffer made compiled code rewrite it whole), zero-initialised and only
    ever written with finite keys: a masked slot then adds exactly nothing (a NaN would, 0 * NaN).
    `length`, a 0-dim device tensor, counts the accepted positions in slots [0, length). A step
    writes its T new tokens at slots given as a device tensor (`write`) and attends over all S
    slots through a boolean mask (`static_mask`): no shape and no Python int changes per step. A
    cache is reused across prompts (`reset`); stale slots past `length` are masked until rewritten.
    """

    def __init__(self, n_layers, n_kv_heads, head_dim, size, dtype, device, batch_size=1):
        super().__init__()
        self.n_layers = n_layers
        shape = (batch_size, n_kv_heads, static_length(size), head_dim)
        for i in range(n_layers):
            for name in (f"k{i}", f"v{i}"):
                buf = torch.zeros(shape, dtype=dtype, device=device)
                torch._dynamo.mark_static_address(buf)
                self.register_buffer(name, buf, persistent=False)
        self.register_buffer("length", torch.zeros((), dtype=torch.long, device=device),
                             persistent=False)

    @property
    def size(self) -> int:
        return self.k0.shape[2]

    def kv(self, layer: int):
        return getattr(self, f"k{layer}"), getattr(self, f"v{layer}")

    def write(self, layer, slots, k, v):
        """Store k, v (B, nkv, T, hd) at `slots` (T,), distinct; return K, V (B, nkv, S, hd)."""
        K, V = self.kv(layer)
        K.index_copy_(2, slots, k)
        V.index_copy_(2, slots, v)
        return K, V

    def keep(self, path, n):
        """Keep the accepted path of a tree scored at slots length + node id: node path[i] moves to
        slot length + i, and length grows by n (0-dim). path (P,) is padded to a fixed P with
        in-range node ids (`pad_path`); its rows past n land beyond the new length, unseen until
        overwritten. One gather and one copy per buffer, whatever the path: a fixed shape."""
        dst = self.length + torch.arange(path.shape[0], device=path.device)   # (P,)
        src = self.length + path
        for layer in range(self.n_layers):
            for buf in self.kv(layer):
                buf.index_copy_(2, dst, buf.index_select(2, src))   # gathered first: no overlap
        self.length.add_(n)

    def reset(self):
        self.length.zero_()

    def fit(self, n: int) -> "StaticCache":
        """This cache if it has n slots, else an empty one of the same layout with room for n (the
        next static length: one more compile per step that uses it)."""
        if n <= self.size:
            return self
        B, nkv, _, hd = self.k0.shape
        return StaticCache(self.n_layers, nkv, hd, n, self.k0.dtype, self.k0.device, B)


def chunks(x: torch.Tensor, size: int):
    """x (B, L, ...) in fixed-shape pieces (B, size, ...), the last zero-padded, each with its real
    length n. Fresh tensors, not views: a compiled step guards strides too."""
    for start in range(0, x.shape[1], size):
        n = min(size, x.shape[1] - start)
        piece = x.new_zeros(x.shape[0], size, *x.shape[2:])
        piece[:, :n] = x[:, start:start + n]
        yield piece, n


def static_mask(rows, n, slots, length, size: int) -> torch.Tensor:
    """The (1, 1, T, S) boolean mask of T new tokens over all S slots of a StaticCache.

    rows (T, W): what each new token sees in the window of W slots from `length` (a tree's
    ancestor mask; each real row includes its own slot). A real row (i < n, n 0-dim) also sees the
    prefix [0, length); a pad row (i >= n) sees only its own slot, slots[i] (T,), so every row sees
    at least one key, and no real row's `rows` may name a pad slot (`pad_tree` keeps them apart).
    """
    T, W = rows.shape
    col = torch.arange(size, device=rows.device)                   # (S,)
    rel = col - length                                             # offset into the window
    window = rows[:, rel.clamp(0, W - 1)] & (rel < W)              # (T, S)
    real = torch.arange(T, device=rows.device)[:, None] < n        # (T, 1)
    return torch.where(real, (rel < 0) | window, col == slots[:, None])[None, None]


def pad_tree(tokens, mask, depths, size: Optional[int] = None):
    """A tree as fixed-shape tensors for `StaticSteps.score`: tokens (N,), its ancestor mask (N, N)
    bool (a node sees itself and its ancestors), depths (N,), padded to `size` (default:
    bucket(N)) on the mask's device. Returns tokens (1, T), depths (T,), rows (T, T), n (0-dim
    tensor N): pad nodes get token 0 and depth 0 and see only themselves; their outputs are
    dropped by the caller (rows n..T-1)."""
    N = mask.shape[0]
    T = bucket(N) if size is None else size
    dev = mask.device
    rows = torch.eye(T, dtype=torch.bool, device=dev)
    rows[:N, :N] = mask
    tokens = F.pad(torch.as_tensor(tokens, device=dev), (0, T - N))
    depths = F.pad(torch.as_tensor(depths, device=dev), (0, T - N))
    return tokens[None], depths, rows, torch.full((), N, device=dev)


def pad_path(path, size: int, device):
    """An accepted path (node ids from the root) as a (size,) tensor for `StaticCache.keep`, padded
    with in-range ids (i itself), and its length as a 0-dim tensor, both on `device` (a compiled
    step's inputs all live there: a CPU input would make CUDA graphs skip the step)."""
    if len(path) > size:
        raise TapsError(f"an accepted path of {len(path)} nodes exceeds the static keep size "
                        f"{size}; pad paths to bucket(depth + 1) of the deepest tree")
    padded = list(path) + list(range(len(path), size))
    return (torch.tensor(padded, device=device), torch.full((), len(path), device=device))


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = (None if args.tie_embeddings
                        else nn.Linear(args.dim, args.vocab_size, bias=False))
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # Module.to(dtype) casts every floating buffer, but the rotary frequencies must stay fp32:
        # in bf16 the angle at position 500 is ~1 rad off. So they are rebuilt after every cast.
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        return self

    def head(self, h):
        """LM head on final-norm features (shared, frozen, by the drafter)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    def rope(self, input_pos, dtype):
        freqs = input_pos[..., None].float() * self.inv_freq           # (B, T, hd/2), always fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]             # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def new_cache(self, batch_size=1, max_len=None, dtype=None, device=None) -> KVCache:
        p = self.embed_tokens.weight
        a = self.args
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, max_len or a.max_seq_len, a.head_dim,
                       dtype or p.dtype, device or p.device)

    def forward(self, tokens, input_pos=None, mask=None, cache: Optional[KVCache] = None,
                last_only=False, head=True):
        """Score T new tokens after the `cache.length` cached ones.

        tokens: (B, T) ids. input_pos: (B, T) rotary positions (default: consecutive after the
        cache). mask: (B, T, T) bool over the new tokens (True = may attend; the cached prefix is
        always visible) or (B, T, S) over all S = cache.length + T keys; default causal.
        Returns logits (B, T, V) (or (B, 1, V) with last_only; None with head=False, for callers
        that apply the LM head where they need it) and the final-norm features (B, T, H).
        """
        B, T = tokens.shape
        L = cache.length if cache is not None else 0
        if input_pos is None:
            input_pos = torch.arange(L, L + T, device=tokens.device).expand(B, T)
        h = self.features(tokens, input_pos, build_mask(mask, B, T, L, tokens.device), cache)
        if cache is not None:
            cache.length = L + T
        if not head:
            return None, h
        logits = self.head(h[:, -1:] if last_only else h)
        return logits.float(), h

    def forward_static(self, tokens, input_pos, slots, mask, cache: "StaticCache", head=True):
        """The fixed-shape forward: T new tokens (B, T) at rotary positions input_pos (B, T), their
        keys and values written at cache slots `slots` (T,), attending through mask (B or 1, 1,
        T, S) over all S slots (`static_mask`). No Python int here changes from step to step, so
        it compiles once per (T, S). Returns logits (B, T, V) (None with head=False) and the
        final-norm features (B, T, H); `cache.length` is the caller's to advance."""
        h = self.features(tokens, input_pos, mask, cache, slots)
        return (self.head(h).float() if head else None), h

    def features(self, tokens, input_pos, attn_mask, cache, slots=None):
        """Embedding, the layers and the final norm: (B, T) ids -> (B, T, H), EAGLE's feature f."""
        x = self.embed_tokens(tokens)                                # (B, T, H)
        cos, sin = self.rope(input_pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, cache, i, slots)
        return self.norm(x)


def build_mask(mask, B, T, L, device):
    """Expand a new-token mask to SDPA's (B, 1, T, L + T) boolean layout; None when unrestricted."""
    if mask is None:
        if T == 1:
            return None  # one new token sees everything cached
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T)
    if mask.shape[-1] == T and L > 0:
        prefix = torch.ones(B, T, L, dtype=torch.bool, device=device)
        mask = torch.cat([prefix, mask.expand(B, T, T)], dim=-1)
    if mask.shape[-2:] != (T, L + T):
        raise TapsError(f"attention mask has shape {tuple(mask.shape)}, expected (B, {T}, {T}) "
                        f"or (B, {T}, {L + T})")
    return mask[:, None]


# ----------------------------------------------------------------------------- static steps

PREFILL_CHUNK = 64   # a prompt is scored eagerly, in chunks of fixed shape: no graph of its own


def compile_step(fn, device, backend: str = "inductor"):
    """torch.compile of one step function: one graph (fullgraph), static shapes (dynamic=False);
    on CUDA with CUDA graphs (mode "reduce-overhead"), whose replays overwrite earlier outputs, so
    outputs are cloned here. backend "eager" / "aot_eager" only trace: the tests' check for graph
    breaks and in-place bugs. A role meets a few shapes (tree buckets times cache lengths), so
    dynamo's recompile limit (8 per function) is raised to cover them."""
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # < 2.7
    setattr(cfg, limit, max(getattr(cfg, limit), 64))
    graphs = backend == "inductor" and torch.device(device).type == "cuda"
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend,
                             mode="reduce-overhead" if graphs else None)
    if not graphs:
        return compiled

    def keep_outputs(out):
        if isinstance(out, tuple):
            return tuple(map(keep_outputs, out))
        return out.clone() if isinstance(out, torch.Tensor) else out
    return lambda *args: keep_outputs(compiled(*args))


class StaticSteps:
    """The target's fixed-shape steps over its own `StaticCache`, eager or compiled, per role:

        decode(token)                    (B, 1) ids -> logits (B, V); writes slot `length`, and
                                         length += 1 (plain decoding)
        score(tokens, depths, rows, n)   a padded tree (`pad_tree`), node i at slot length + i
                                         and position length + depth -> features h (B, T, H);
                                         length unchanged: the tree is provisional until `keep`
        keep(path, n)                    the accepted path stays (`pad_path`, `StaticCache.keep`)
        prefill(prompt)                  (B, P) ids -> (logits (B, V) after the last, features
                                         (B, P, H)); length = P. Chunks through `score`, eagerly.

    backend None runs the roles eagerly: the reference, equal to today's `forward` in float64 bit
    for bit under SDPA's math kernel (the CPU flash kernel's sums depend on the key count, so there
    S keys and L + T keys may differ in the last bit). "inductor" compiles each role
    (`compile_step`; CUDA graphs on CUDA), "eager" / "aot_eager" only trace. Every argument is a
    device tensor of a fixed shape and strides (fresh tensors, not views of a longer one), so a
    role compiles once per (tree bucket, cache length). One StaticSteps serves many prompts; `fit`
    grows its cache (a new length: one more compile per role) only when a prompt needs more slots.

    Speculative decoding: per prompt, fit(prompt + budget + the largest bucket or keep size), then
    prefill. Per verifier call: h = score(*pad_tree(tokens, mask, depths)) (a plain step is the
    root alone, bucket 1); p from model.head(h[0, :N]) -- on a GPU for every node in one pass and
    one copy to the host, on a CPU lazily per visited node; the acceptance walk; then
    keep(*pad_path(path, P, device)), one P for the whole run (bucket(deepest tree + 1)); slots
    length .. length + max(T, P) must fit. The drafter keeps a StaticCache(1, ...) of its own, and
    its step is fc -> target.rope -> layers[0](x, cos, sin, static_mask(rows, n, slots,
    cache.length, cache.size), cache, 0, slots) -> head; depth d's frontier of k nodes at slots
    length + (d - 1) k + arange(k), rows (k, depth * k) over the drafted window, its length
    advanced only by accepted tokens (tests/test_static.py's `drafter_step`).
    """

    def __init__(self, model: Transformer, size: int = STATIC_UNIT, backend: Optional[str] = None,
                 batch_size: int = 1):
        self.model = model
        a, p = model.args, model.embed_tokens.weight
        self.cache = StaticCache(a.n_layers, a.n_kv_heads, a.head_dim, size, p.dtype, p.device,
                                 batch_size)
        if backend is not None:
            for role in ("decode", "score", "keep"):
                setattr(self, role, compile_step(getattr(self, role), p.device, backend))

    def fit(self, n: int):
        """Room for n slots (`StaticCache.fit`; what it held is dropped: call before `prefill`)."""
        self.cache = self.cache.fit(n)

    def decode(self, token):
        c = self.cache
        slot = c.length.view(1)                                              # (1,)
        one = torch.ones(1, 1, dtype=torch.bool, device=token.device)
        mask = static_mask(one, 1, slot, c.length, c.size)                   # (1, 1, 1, S)
        logits, _ = self.model.forward_static(token, slot.expand(token.shape[0], 1), slot, mask, c)
        c.length.add_(1)
        return logits[:, -1]                                                 # (B, V)

    def score(self, tokens, depths, rows, n):
        c = self.cache
        B, T = tokens.shape
        slots = c.length + torch.arange(T, device=tokens.device)             # (T,)
        mask = static_mask(rows, n, slots, c.length, c.size)                 # (1, 1, T, S)
        pos = (c.length + depths).expand(B, T)
        return self.model.forward_static(tokens, pos, slots, mask, c, head=False)[1]

    def keep(self, path, n):
        self.cache.keep(path, n)

    def prefill(self, prompt):
        B, P = prompt.shape
        C, dev = PREFILL_CHUNK, prompt.device
        self.fit(-(-P // C) * C)                     # a chunk's pad rows write slots too
        self.cache.reset()
        depths = torch.arange(C, device=dev)
        rows = torch.ones(C, C, dtype=torch.bool, device=dev).tril()          # causal
        hs = []
        for chunk, n in chunks(prompt, C):
            # eager, on the same static cache: one call per prompt, compute-bound, so a compiled
            # graph of its own would add a cold compile (~40 s on a CPU) and save nothing
            n_real = torch.full((), n, device=dev)
            hs.append(StaticSteps.score(self, chunk, depths, rows, n_real)[:, :n])
            self.cache.length.add_(n)
        h = torch.cat(hs, 1)                                                 # (B, P, H)
        return self.model.head(h[:, -1]).float(), h


# ----------------------------------------------------------------------------- sampling

# the least positive temperature: logits (|x| < ~100) / 0.01 stays within fp16's 65504
MIN_TEMPERATURE = 0.01


def logits_to_probs(logits, temperature: float = 1.0, top_p: float = 1.0):
    """The target distribution p after temperature and nucleus (top-p), (..., V) -> (..., V).

    Every draw from the target -- plain sampling, and verification's correction and bonus tokens --
    goes through this one function: sampling from raw logits when T != 1 would be lossy.
    temperature 0 means greedy: a one-hot distribution on the argmax.
    """
    if not 0 <= temperature < math.inf:
        raise TapsError(f"temperature must be finite and >= 0, got {temperature}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise TapsError(f"temperature {temperature} is below {MIN_TEMPERATURE:g}, where logits / "
                        f"temperature overflows half precision; {MIN_TEMPERATURE:g} already "
                        f"samples the likeliest token almost always, 0 always (greedy)")
    if not 0 < top_p <= 1:
        raise TapsError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        # Keep the smallest prefix of tokens (by probability) whose mass reaches top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p       # the mass before it reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.inference_mode()
def generate_plain(model: Transformer, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, stop_ids=(), generator: Optional[torch.Generator] = None,
                   steps: Optional[StaticSteps] = None):
    """Plain autoregressive decoding with a KV cache: what speculative decoding must match.
    steps: the static path (`StaticSteps`, eager or compiled) instead of the sliced KVCache."""
    device = model.embed_tokens.weight.device
    max_new_tokens = context_budget(model, len(prompt_ids), max_new_tokens)
    prompt = torch.tensor([prompt_ids], device=device)
    if steps is None:
        cache = model.new_cache(1, len(prompt_ids) + max_new_tokens + 1)
        logits = model(prompt, cache=cache, last_only=True)[0][:, -1]           # (1, V)
        decode = lambda tok: model(tok, cache=cache)[0][:, -1]
    else:
        steps.fit(len(prompt_ids) + max_new_tokens + 1)
        logits, decode = steps.prefill(prompt)[0], steps.decode
    out = []
    for _ in range(max_new_tokens):
        p = logits_to_probs(logits[0], temperature, top_p)
        tok = p.argmax() if temperature == 0 else torch.multinomial(p, 1, generator=generator)
        out.append(int(tok))
        if out[-1] in stop_ids:
            break
        logits = decode(tok.view(1, 1))
    return out


# ------------------------------------------------------------------------ identity, budgets, timing

def target_identity(target: Transformer) -> dict:
    """Name, vocabulary, hidden size and a weight fingerprint (rounded to bf16, so one target in
    fp32 or bf16 is the same target): drafters and feature caches record whose they are."""
    probe = [target.embed_tokens.weight[:16], target.norm.weight,
             target.layers[0].self_attn.q_proj.weight[:16]]
    digest = hashlib.sha1()
    for w in probe:
        digest.update(w.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    a = target.args
    return {"name": a.name, "vocab_size": a.vocab_size, "dim": a.dim,
            "fingerprint": digest.hexdigest()[:16]}


def context_budget(model: Transformer, n_prompt: int, max_new_tokens: int, say=False) -> int:
    """max_new_tokens capped so that prompt and reply fit the model's context (a budget of 1e9
    would allocate a cache until memory runs out; `say`: one line when it does); a prompt that
    does not fit is refused."""
    n_ctx, name = model.args.max_seq_len, model.args.name or "the target"
    if n_prompt >= n_ctx:
        raise TapsError(f"the prompt has {n_prompt} tokens and {name} reads at most {n_ctx}; "
                        f"shorten it")
    if say and max_new_tokens > n_ctx - n_prompt:
        print(f"[--max-new-tokens {max_new_tokens} capped at {n_ctx - n_prompt}: the context of "
              f"{name} is {n_ctx} tokens]", file=sys.stderr)
    return min(max_new_tokens, n_ctx - n_prompt)


def clock(device) -> float:
    """time.perf_counter() once the device's queued work is done: a CUDA timing is of the work,
    not of its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def mean(xs, empty=math.nan):
    """The mean of a list, `empty` (NaN, or None for JSON) when there is nothing to average."""
    return sum(xs) / len(xs) if len(xs) else empty


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    from extras.gguf import DEFAULT_TARGET
    from extras.runtime import (DTYPES, Parser, add_fields, check_flags, default_device,
                                one_line_errors, refuse_unused, resolve_dtype)
    from taps import Sampling   # its knobs, named and checked alike in every script
    ap = Parser(description="Chat with the target (plain decoding).")
    ap.add_argument("--prompt", help="user message to answer")
    ap.add_argument("--system", help="optional system message")
    ap.add_argument("--target", help=f"HF checkpoint directory (default: {DEFAULT_TARGET})")
    add_fields(ap, Sampling, "max_new_tokens", "temperature", "top_p")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtype", choices=DTYPES, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--export", metavar="DIR",
                    help="write the embedded default target as an HF directory and exit")
    ap.add_argument("--overwrite", action="store_true",
                    help="with --export: replace a previous export in DIR (never other files)")
    ap.add_argument("--bench", action="store_true",
                    help="print decoding speed against the memory bound and exit")
    ap.add_argument("--shape", help="with --bench: random weights of this architecture instead "
                                    "of a checkpoint (no download), e.g. llama3-8b")
    ap.add_argument("--compile", action="store_true",
                    help="decode on the static path, compiled (CUDA graphs on CUDA); with --bench: "
                         "eager vs compiled, back to back")
    a = ap.parse_args(argv)
    with one_line_errors():
        check_flags(a)
        if a.export:
            refuse_unused(ap, a, {"--export", "--overwrite"}, "with --export")
            from extras.gguf import export_default
            return print(export_default(a.export, a.overwrite, "choose another directory"))
        if not (a.prompt or a.bench):
            raise TapsError("give --prompt TEXT, --bench or --export DIR")
        if a.bench:
            refuse_unused(ap, a, {"--bench", "--shape" if a.shape else "--target",
                                  "--max-new-tokens", "--device", "--dtype", "--compile"},
                          "with --bench" + (" --shape" if a.shape else ""))
        else:
            chat = {"--prompt", "--system", "--target", "--max-new-tokens", "--device", "--dtype",
                    "--compile"}
            refuse_unused(ap, a, chat | {"--temperature", "--top-p", "--seed"},
                          "without --bench or --export")
            if a.temperature == 0:
                refuse_unused(ap, a, chat, "at --temperature 0 (greedy)")
        dtype = resolve_dtype(a.dtype, a.device)
        if a.bench:
            from extras.bench import bench
            return bench(a.target, a.shape, a.device, dtype, a.max_new_tokens, a.compile)
        from extras.checkpoint import load_target
        model, tokenizer = load_target(a.target, a.device, dtype)
        messages = [{"role": "system", "content": a.system}] if a.system else []
        messages.append({"role": "user", "content": a.prompt})
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        n = context_budget(model, len(ids), a.max_new_tokens, say=True)
        steps = StaticSteps(model, backend="inductor") if a.compile else None
        out = generate_plain(model, ids, n, a.temperature, a.top_p, tokenizer.stop_ids, g, steps)
        print(tokenizer.decode([t for t in out if t not in tokenizer.stop_ids]))


if __name__ == "__main__":   # extras/ imports `model`: run its CLI from that module, one TapsError
    __import__("model").main()
