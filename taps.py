"""Task-aware speculative decoding: the EAGLE drafter, EAGLE-2 trees, lossless verification.

Naming, fixed for the whole file: **p is the target** distribution, **q is the draft**
distribution (the study's eqs. 1-2 use the opposite letters, its eq. 5 this one).

* `Drafter` (eq. 3): fc(cat(embed(x_{t+1}), f_t)) -> one Llama layer -> the target's frozen
  LM head (or its rows of a draft vocabulary, FR-Spec / EAGLE-3: q lives on a subset).
* `grow_tree` / `draft_tree` (eq. 6): the EAGLE-2 dynamic tree, `TreeShape` its size.
* `verify_tree` (eq. 5): recursive rejection sampling, each child a point-mass proposal;
  `verify_chain` (eqs. 1-2): classic speculative sampling of a sampled chain.
* `average` (eq. 11), `route` / `route_entropy` (eqs. 12-13), `merge`: composing specialists.
* `generate`: draft -> verify -> keep -> emit -> extend. Each verifier call emits its accepted
  draft tokens plus one drawn by the verifier, and the acceptance length is

      tau = new tokens / verifier calls       (the first token, from prefill, not counted)

All randomness goes through a `RandomSource`, and the verifiers only index, zero and renormalise
probability vectors, so the exact tests run this very code on `fractions.Fraction` vectors with
a random source that enumerates every outcome. Trees sized for the hardware (`--tree auto`) are
extras/autotree.py's `AutoTree`, which `generate` takes as its `tree`.

Sections: sampling · verification · draft trees · the drafter · composing specialists ·
generation (`Stats`, `generate`) · CLI.

    python taps.py --prompt "What is 7 * 6?" --drafter random
    python taps.py --prompt "..." --drafter checkpoints/eagle-math.safetensors   # auto tree, dtype
    python taps.py --prompt "..." --drafter ... --tree study --dtype fp32   # the study's 60/5/10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (PREFILL_CHUNK, STATIC_UNIT, TREE_BUCKETS, Block, KVCache, ModelArgs,
                   StaticCache, StaticSteps, TapsError, Transformer, bucket, build_mask, clock,
                   compile_step, context_budget, logits_to_probs, mean, pad_path, pad_tree,
                   static_mask, target_identity)


# ----------------------------------------------------------------------------- sampling

def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of distributions given as log-probs (..., V) -> (...); 0 log 0 = 0."""
    return torch.special.entr(logp.exp()).sum(-1)


class RandomSource(Protocol):
    """Every random draw of decoding. Tests substitute an enumerator with exact weights."""

    def bernoulli(self, prob) -> bool: ...

    def categorical(self, probs) -> int: ...  # probs need not be normalised


class TorchRandom:
    """The random source of real runs: a seeded CPU generator (the same stream on every device)."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.u: Optional[float] = None   # the last uniform drawn: a trace shows each test's draw

    def bernoulli(self, prob) -> bool:
        self.u = torch.rand((), generator=self.g).item()
        return self.u < float(prob)  # 1 always, 0 never

    def categorical(self, probs) -> int:
        if probs.max() == probs.sum():   # a point mass (greedy decoding): its token, no draw
            return int(probs.argmax())
        return int(torch.multinomial(probs.detach().float().cpu(), 1, generator=self.g))


# ----------------------------------------------------------------------- verification (eqs. 1-2, 5)

class VerifyTrace(Protocol):
    """What a verifier tells a trace (extras/trace.py's `Trace`, for `--show`), as it happens: each
    acceptance test with the probability it used, and the final draw with the vector it drew from
    (a correction from the residual, or a bonus from p). Values are handed over as used, to be
    read at once: the verifier goes on to modify r in place."""

    def test(self, node: int, child: int, token: int, r, accepted: bool, p=None): ...

    def draw(self, node: int, token: int, r, residual_mass=None): ...


def residual(r, x):
    """Remove a rejected proposal x from r and renormalise (r is the verifier's own copy).

    Nothing is left only when r(x) = 1, which exact arithmetic never rejects; in floats r(x) can
    round just below 1 with no mass elsewhere. r then stays the point mass on x -- what exact
    arithmetic keeps -- instead of becoming 0/0 = NaN.
    """
    r[x] = 0
    total = r.sum()
    if total > 0:
        return r / total
    r[x] = 1
    return r


def verify_tree(tree: "Tree", p_at: Callable[[int], object], rng: RandomSource,
                trace: Optional[VerifyTrace] = None):
    """Recursive rejection sampling down a draft tree (eq. 5); exact for any draft-side tree.

    Each child s is a proposal with probability 1 (a point-mass q), so it is accepted with
    probability min(1, r(s) / 1) = r(s), and on rejection the residual norm(max(0, r - q)) is r
    with r(s) set to 0. p_at(node) is a fresh, writable vector of target probabilities (processed
    by `logits_to_probs`) after that node; any type with indexing, item assignment, .sum() and
    division works (torch tensors, numpy arrays of Fractions). The walk runs on the tree's trie
    (`Tree.trie`): a merged tree's repeated token paths are one node, as in the study's
    candidate-by-candidate verification. Nothing is lost: a second copy of a rejected token has
    r(s) = 0 and could only be rejected again, so a plain merged tree is verified exactly as its
    de-duplicated trie (`merge(dedup=True)`) and draws no extra random numbers.
    Returns (path, x, rejected): accepted node ids from the root (path[0] == 0, each node the
    parent of the next), the token drawn after them (correction, or bonus at a leaf), and the
    children tried and rejected. A trace, if given, is told every test and the draw as made.
    """
    _, kids = tree.trie()
    node, rejected = 0, []
    while True:
        r = p_at(node)
        for s in kids[node]:
            x = tree.tokens[s]
            accepted = rng.bernoulli(r[x])
            if trace is not None:
                trace.test(node, s, x, r[x], accepted)
            if accepted:
                node = s
                break
            rejected.append(s)
            r = residual(r, x)
        else:  # no child accepted (or a leaf, where r is still p): draw from r
            x = rng.categorical(r)
            if trace is not None:
                trace.draw(node, x, r)
            return tree.path_to(node), x, rejected


def verify_chain(tokens: Sequence[int], q: Sequence, p_at: Callable[[int], object],
                 rng: RandomSource, trace: Optional[VerifyTrace] = None):
    """Classic speculative sampling (eqs. 1-2) of a chain tokens[1:], tokens[i] ~ q[i-1].

    q[i] and p_at(i) are the draft and target distributions of the token after position i of
    the chain (position 0 is the root). Accept tokens[i+1] with probability min(1, p/q); on the
    first rejection resample from norm(max(0, p - q)); after a whole chain draw a bonus from p.
    Returns (path, x, rejected) as `verify_tree` does, for the chain's node ids 0..len-1, and
    tells a trace what it tested and drew as `verify_tree` does.
    """
    for i, x in enumerate(tokens[1:]):
        p, qi = p_at(i), q[i]
        a = min(1, p[x] / qi[x])          # eq. 1's acceptance probability
        accepted = rng.bernoulli(a)
        if trace is not None:
            trace.test(i, i + 1, x, a, accepted, p[x])
        if not accepted:
            r = p - qi
            r = r * (r > 0)
            total = r.sum()   # 0 only if p <= q everywhere in floats (p = q is never rejected)
            r = r / total if total > 0 else p
            x = rng.categorical(r)
            if trace is not None:
                trace.draw(i, x, r, total)
            return list(range(i + 1)), x, [i + 1]
    p = p_at(len(tokens) - 1)
    x = rng.categorical(p)
    if trace is not None:
        trace.draw(len(tokens) - 1, x, p)
    return list(range(len(tokens))), x, []


# ----------------------------------------------------------------------------- draft trees (eq. 6)

@dataclass
class Tree:
    """A draft tree, node 0 the root (the last accepted token, not yet seen by the target).

    Parents precede children (parents[i] < i), so trees merge by concatenating lists and
    offsetting parent indices.
    """
    tokens: list[int]
    parents: list[int]        # parents[0] == -1
    logq: list[float]         # cumulative draft log-prob of the node's path, its EAGLE-2 score
    entropy: list[float]      # entropy of the draft distribution the node was drawn from
    origin: list[int] = field(default_factory=list)   # drafter of each node (root -1, several -2)

    def __len__(self):
        return len(self.tokens)

    @property
    def confidence(self) -> list[float]:
        """Path probability under the drafter, exp(logq)."""
        return [math.exp(s) for s in self.logq]

    def depths(self) -> list[int]:
        d = [0] * len(self)
        for i in range(1, len(self)):
            d[i] = d[self.parents[i]] + 1
        return d

    def children(self) -> list[list[int]]:
        c = [[] for _ in self.tokens]
        for i in range(1, len(self)):
            c[self.parents[i]].append(i)
        return c

    def trie(self) -> tuple[list[int], list[list[int]]]:
        """The trie of the tree's token paths, built in one pass, as (first, kids): first[i] is
        the lowest node id with node i's token path (i itself unless merged trees repeat a path);
        kids[f] of a first copy f are the first copies of its children in the trie, one per
        distinct token, gathered from every copy of f, in node order."""
        first, seen, kids = [0], {}, [[] for _ in self.tokens]
        for i in range(1, len(self)):
            first.append(seen.setdefault((first[self.parents[i]], self.tokens[i]), i))
            if first[i] == i:
                kids[first[self.parents[i]]].append(i)
        return first, kids

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root to node."""
        path = [node]
        while path[-1] != 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def path_logq(self) -> list[float]:
        """Each node's score as a rank: the lowest logq on its path from the root. A node is
        accepted only after every node above it, so it is worth no more than the weakest of them.
        An EAGLE-2 tree's scores already fall along every path (log q <= 0), so these are its
        own; a de-duplicated merged tree's united node keeps the first tree's score, and a child
        from another tree can outscore it."""
        score = list(self.logq)
        for i in range(1, len(self)):                     # parents precede children
            score[i] = min(score[i], score[self.parents[i]])
        return score

    def mask(self, device=None) -> torch.Tensor:
        """(N, N) bool: a node attends to itself and its ancestors (and the cached prefix)."""
        m = torch.eye(len(self), dtype=torch.bool)    # built row by row on the CPU, moved once
        for i in range(1, len(self)):
            m[i] |= m[self.parents[i]]
        return m.to(device)


@dataclass(frozen=True)
class TreeShape:
    """The draft tree of eq. 6: each of `depth` steps expands the top_k children of the top_k
    best frontier nodes, then the `total_tokens` best nodes are kept (None: the whole pool). The
    study's EAGLE-2 setting is 10 / 5 / 60. chain=True drafts a sampled chain of depth + 1
    tokens instead, verified by eqs. 1-2."""
    top_k: int = 10
    depth: int = 5
    total_tokens: Optional[int] = 60
    chain: bool = False

    @property
    def nodes(self) -> int:
        """The most non-root nodes a tree of this shape holds: total_tokens, or the whole pool."""
        if self.total_tokens is not None:
            return self.total_tokens
        return self.top_k * (1 + self.depth * self.top_k)

    @property
    def shape(self) -> "TreeShape":
        return self

    def start(self, states: list, target: Transformer, root_token: int):
        pass

    def draft(self, states: list, target: Transformer, root_token: int, compose) -> "Tree":
        """Every drafter's EAGLE-2 tree of this shape, composed into the one to verify."""
        return compose([tag(draft_tree(s, target, root_token, self), i)
                        for i, s in enumerate(states)])

    def record(self, tree: "Tree", accepted: int, seconds: float):
        pass

    def __post_init__(self):
        if self.top_k < 1 or self.depth < 1:
            raise TapsError(f"top_k and depth must be >= 1, got top_k={self.top_k}, "
                            f"depth={self.depth}")
        if self.total_tokens is not None and self.total_tokens < self.depth:
            raise TapsError(f"total_tokens ({self.total_tokens}) must be >= depth ({self.depth})")


class TreePolicy(Protocol):
    """What drafts each verifier call's tree: the study's fixed `TreeShape`, or a policy that sizes
    trees as it goes (extras/autotree.py's `AutoTree`). Whatever it does, it reads draft-side
    quantities and past calls only, so verification stays exactly lossless."""

    @property
    def shape(self) -> TreeShape: ...   # the largest tree it drafts: caches are sized for it

    def start(self, states: list, target: Transformer, root_token: int):
        """Once per generate, after the prompt is fed (timed as prefill)."""

    def draft(self, states: list, target: Transformer, root_token: int, compose) -> Tree:
        """The call's tree from the drafters' states (the root alone: a plain step)."""

    def record(self, tree: Tree, accepted: int, seconds: float):
        """After the call: draft tokens accepted and the call's seconds."""


def grow_tree(root_token: int, logp0: torch.Tensor, expand, shape: TreeShape,
              vocab: Optional[torch.Tensor] = None, more=None) -> Tree:
    """The EAGLE-2 dynamic tree (eq. 6) from draft log-probs.

    logp0: (V,) draft log-probs of the root's children. expand(tokens, slots) runs the drafter
    on the frontier, tokens (k,), whose parents are `slots` (k,) into the previous frontier (None
    for the root's children), and returns the children's log-probs (k, V). Each of the `depth`
    steps adds the top_k children of every frontier node to the pool, scored by cumulative
    log-prob, and makes the top_k of those the next frontier; then `prune` keeps the
    `total_tokens` best. Nodes stay in pool order.
    vocab: (V,) the token id of each log-prob column (None: column i is token i).
    more(pool_scores, frontier_scores), if given, is asked before each step whether to take it
    (`AutoTree`); its answer may depend on draft-side quantities only.
    """
    ids = (lambda i: i) if vocab is None else (lambda i: vocab[i])
    k = min(shape.top_k, logp0.shape[-1])
    score, col = logp0.topk(k)                                        # (k,)
    tok = ids(col)
    pool_tok, pool_score = [tok], [score]
    pool_parent = [torch.full((k,), -1, device=tok.device)]
    pool_ent = [entropy(logp0).expand(k)]
    frontier, slots, n = torch.arange(k, device=tok.device), None, k  # pool ids of the frontier
    for _ in range(shape.depth):
        if more is not None and not more(torch.cat(pool_score), score):
            break
        logp = expand(tok, slots)                                     # (k, V)
        child_lp, child_col = logp.topk(k, dim=-1)                    # (k, k)
        cand = (score[:, None] + child_lp).flatten()                  # (k*k,) cumulative log q
        child_tok = ids(child_col).flatten()
        pool_tok.append(child_tok)
        pool_score.append(cand)
        pool_parent.append(frontier.repeat_interleave(k))
        pool_ent.append(entropy(logp).repeat_interleave(k))
        score, best = cand.topk(k)
        slots, tok, frontier = best // k, child_tok[best], n + best
        n += k * k
    parent = torch.cat(pool_parent) + 1                              # pool ids -> node ids
    pool = Tree(tokens=[root_token] + torch.cat(pool_tok).tolist(), parents=[-1] + parent.tolist(),
                logq=[0.0] + torch.cat(pool_score).tolist(),
                entropy=[math.nan] + torch.cat(pool_ent).tolist())
    return pool if shape.total_tokens is None else prune(pool, shape.total_tokens + 1)


def prune(tree: Tree, n: int) -> Tree:
    """The root and the n - 1 best nodes by score (eq. 6's final rerank), in their order.

    Nodes rank by `Tree.path_logq`, which never rises from parent to child, and ties go to the
    earlier node, a parent before its children: so the kept set is a tree (every kept node's
    parent kept) whatever it is given. On EAGLE-2's trees that is the study's rerank by logq.
    Fixed here, not in `merge`, because this is where a tree must come out, whatever composed
    the input: a de-duplicated merged tree (`AutoTree` prunes it again) can hold a child that
    outscores its parent, and ranking by raw logq kept such a child without its parent.
    """
    if n >= len(tree):
        return tree
    score = tree.path_logq()
    order = sorted(range(1, len(tree)), key=lambda i: -score[i])   # stable: ties by node order
    keep = [0] + sorted(order[:n - 1])
    new_id = {old: new for new, old in enumerate(keep)}
    pick = lambda xs: [xs[i] for i in keep] if xs else []
    return Tree(pick(tree.tokens), [-1] + [new_id[tree.parents[i]] for i in keep[1:]],
                pick(tree.logq), pick(tree.entropy), pick(tree.origin))


# ----------------------------------------------------------------------------- the drafter (eq. 3)

class Drafter(nn.Module):
    """EAGLE-1/2 drafter: fc(cat(embed(x_{t+1}), f_t)) -> one decoder layer -> target LM head.

    Only `fc` and the layer are the drafter's own weights; the embedding, rotary table and LM
    head are the target's, passed in at call time (frozen, shared, never saved twice).
    Parameter names match EAGLE checkpoints (fc.*, layers.0.*).
    """

    def __init__(self, args: ModelArgs, meta: Optional[dict] = None, vocab=None):
        super().__init__()
        self.args = args                          # the target's config with n_layers = 1
        self.meta = dict(meta or {})              # backbone, domain, data, target identity
        self.fc = nn.Linear(2 * args.dim, args.dim, bias=True)
        layer = Block(args)
        layer.input_layernorm = nn.Identity()     # fc's output is not normalised before attention
        self.layers = nn.ModuleList([layer])
        # Draft vocabulary (FR-Spec, EAGLE-3): the sorted token ids the drafter may propose; its
        # head is those rows of the target's head. None: the whole vocabulary (the study's).
        # Verification is always over the whole vocabulary, so it stays lossless.
        self.register_buffer("vocab", None if vocab is None else torch.as_tensor(vocab).long())
        self._head = None                         # (the target head it was cut from, its rows)

    @classmethod
    def for_target(cls, target: Transformer, vocab=None, **meta) -> "Drafter":
        p = target.embed_tokens.weight
        args = dataclasses.replace(target.args, n_layers=1, qk_norm=False)   # EAGLE's Llama layer
        meta = {"target": target.args.name, "vocab_size": target.args.vocab_size,
                "dim": target.args.dim, "fingerprint": target_identity(target)["fingerprint"],
                **meta}
        return cls(args, meta, vocab).to(device=p.device, dtype=p.dtype)

    @property
    def draft_vocab_size(self) -> int:
        return self.args.vocab_size if self.vocab is None else len(self.vocab)

    def head(self, target: Transformer, h):
        """Draft logits (..., H) -> (..., V_draft): the target's head, restricted to `vocab`."""
        if self.vocab is None:
            return target.head(h)
        w = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
        key = (w.data_ptr(), w.dtype, w.device)   # rows cut once per target weight, not per call
        if self._head is None or self._head[0] != key:
            self._head = (key, w[self.vocab.to(w.device)].contiguous())
        return F.linear(h, self._head[1])

    def token_ids(self, idx):
        """Token ids of draft-vocabulary columns (identity for a full-vocabulary drafter)."""
        return idx if self.vocab is None else self.vocab[idx]

    @classmethod
    def random(cls, target: Transformer, seed: int = 0) -> "Drafter":
        """An untrained drafter: verification must still reproduce the target exactly."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls.for_target(target, backbone="eagle", domain="none",
                                  data="untrained (random init)")

    def forward(self, target: Transformer, tokens, feats, cache: Optional[KVCache] = None,
                input_pos=None, mask=None, last_only=False, head=True):
        """tokens (B, T) are x_{t+1}, feats (B, T, H) the features f_t; mask, input_pos as the
        target's. Returns draft logits (B, T, V_draft) for x_{t+2} (or (B, 1, V_draft) with
        last_only; columns are `vocab`'s tokens; None with head=False: training applies the head
        at loss positions only) and the drafter's features (B, T, H), its prediction of f_{t+1},
        which deeper tree nodes read in place of the target's feature.
        """
        B, T = tokens.shape
        L = cache.length if cache is not None else 0
        if input_pos is None:
            input_pos = torch.arange(L, L + T, device=tokens.device).expand(B, T)
        x = self.fc(torch.cat([target.embed_tokens(tokens), feats], dim=-1))  # (B, T, H)
        cos, sin = target.rope(input_pos, x.dtype)
        h = self.layers[0](x, cos, sin, build_mask(mask, B, T, L, tokens.device), cache, 0)
        if cache is not None:
            cache.length = L + T
        if not head:
            return None, h
        return self.head(target, h[:, -1:] if last_only else h).float(), h

    def forward_static(self, target: Transformer, tokens, feats, input_pos, slots, mask,
                       cache: StaticCache):
        """The fixed-shape forward (as `Transformer.forward_static`): T tokens (B, T) and features
        (B, T, H) at rotary positions input_pos (B, T), written at cache slots `slots` (T,),
        attending through mask (1, 1, T, S) (`static_mask`). Returns the drafter's features
        (B, T, H); the head and `cache.length` are the caller's."""
        x = self.fc(torch.cat([target.embed_tokens(tokens), feats], dim=-1))  # (B, T, H)
        cos, sin = target.rope(input_pos, x.dtype)
        return self.layers[0](x, cos, sin, mask, cache, 0, slots)

    def new_cache(self, max_len: int) -> KVCache:
        p = self.fc.weight
        return KVCache(1, 1, self.args.n_kv_heads, max_len, self.args.head_dim, p.dtype, p.device)

    def save(self, path):
        from safetensors.torch import save_file
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            raise TapsError(f"{path}: refusing to save a drafter with non-finite weights")
        meta = {**self.meta, "config": dataclasses.asdict(self.args)}
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"taps": json.dumps(meta)})

    @classmethod
    def load(cls, path, target: Transformer) -> "Drafter":
        """A drafter `save` wrote for this target, or a public EAGLE-1/2 checkpoint directory (the
        file's checks against the target: extras/checkpoint.py's `load_drafter`)."""
        from extras.checkpoint import load_drafter
        return load_drafter(path, target)


def check_drafter(drafter: Drafter, target: Transformer):
    d, t = drafter.args, target.args
    if (d.vocab_size, d.dim) != (t.vocab_size, t.dim):
        raise TapsError(f"drafter (vocab {d.vocab_size}, hidden {d.dim}) does not match the "
                        f"target (vocab {t.vocab_size}, hidden {t.dim})")
    check_vocab(drafter.vocab, t.vocab_size)


def check_vocab(vocab, vocab_size: int):
    """A draft vocabulary is sorted, distinct target token ids (train.py adds the stop tokens)."""
    if vocab is None:
        return
    v = torch.as_tensor(vocab).cpu()
    if len(v) == 0 or len(v) > vocab_size:
        raise TapsError(f"draft vocabulary of {len(v)} tokens: choose 1..{vocab_size} "
                        f"(the target's vocabulary)")
    if v.min() < 0 or v.max() >= vocab_size or not bool((v[1:] > v[:-1]).all()):
        raise TapsError(f"draft vocabulary must be sorted, distinct token ids in [0, {vocab_size})")


@dataclass
class DraftState:
    """One drafter's view of the sequence: its KV cache over the accepted prefix, its output at the
    root, and the nodes of the tree being drafted, fed on top of the prefix until `rewind`."""
    drafter: Drafter
    cache: KVCache
    logits: Optional[torch.Tensor] = None   # (V_draft,) draft logits of the token after the root
    h: Optional[torch.Tensor] = None        # (H,) drafter feature at the root, read at depth 1
    pending: list = field(default_factory=list)   # accepted (tokens, features) not yet fed
    fed: int = 0                            # drafted positions fed after the accepted prefix

    def extend(self, tokens: torch.Tensor, feats: torch.Tensor):
        """Pairs (x_{t+1}, f_t) of newly accepted positions: tokens (T,), target features (T, H).
        Fed lazily, in one drafter call at the next draft (`ready`): a call that skips drafting
        costs nothing."""
        self.pending.append((tokens, feats))

    def ready(self, target: Transformer) -> "DraftState":
        if self.pending:
            tokens, feats = (torch.cat(x) for x in zip(*self.pending))
            self.pending = []
            self.logits, self.h = self.feed(target, tokens, feats)
        return self

    def feed(self, target: Transformer, tokens, feats):
        """Accepted pairs (T,), (T, H) into the cache: the draft logits (V_draft,) and the
        drafter's feature (H,) at the last."""
        logits, h = self.drafter(target, tokens[None], feats[None], self.cache, last_only=True)
        return logits[0, -1], h[0, -1]

    def draft(self, target: Transformer, tokens, feats, depth: int, rows):
        """T drafted nodes at `depth` (position prefix + depth - 1): tokens (T,), features (T, H),
        rows (T, W) what each sees of the W drafted slots after the prefix (its ancestors and
        itself, written at slots fed .. fed + T - 1). Returns draft logits (T, V_draft) and the
        drafter's features (T, H)."""
        T, L, dev = len(tokens), self.cache.length - self.fed, tokens.device
        mask = torch.cat([torch.ones(T, L, dtype=torch.bool, device=dev),
                          rows[:, :self.fed + T]], dim=1)[None]     # (1, T, L + fed + T)
        pos = torch.full((1, T), L + depth - 1, device=dev)
        logits, h = self.drafter(target, tokens[None], feats[None], self.cache, pos, mask)
        self.fed += T
        return logits[0], h[0]

    def rewind(self):
        """Drop the drafted nodes: the cache is back to the accepted prefix."""
        self.cache.truncate(self.cache.length - self.fed)
        self.fed = 0


class DraftSteps:
    """A drafter's fixed-shape step over a one-layer `StaticCache` of its own, eager or compiled:
    the drafter's twin of model.py's `StaticSteps`. step(tokens, feats, pos, slots, rows, n) writes
    T tokens (1, T) with features (1, T, H) at `slots` (T,) and returns the drafter's features
    (1, T, H); rows (T, W) and n (0-dim) make the mask (`static_mask`). All device tensors of fixed
    shapes, so it compiles once per (T, W, cache length)."""

    def __init__(self, drafter: Drafter, target: Transformer, backend: Optional[str] = None):
        self.drafter, self.target = drafter, target
        self.cache = self.new_cache(STATIC_UNIT)
        dev = drafter.fc.weight.device
        self.step = self._step if backend is None else compile_step(self._step, dev, backend)

    def new_cache(self, size: int) -> StaticCache:
        a, p = self.drafter.args, self.drafter.fc.weight
        return StaticCache(1, a.n_kv_heads, a.head_dim, size, p.dtype, p.device)

    def fit(self, n: int):
        """Room for n slots (what the cache held is dropped)."""
        if n > self.cache.size:
            self.cache = self.new_cache(n)

    def _step(self, tokens, feats, pos, slots, rows, n):
        c = self.cache
        mask = static_mask(rows, n, slots, c.length, c.size)                  # (1, 1, T, S)
        return self.drafter.forward_static(self.target, tokens, feats, pos, slots, mask, c)


@dataclass
class StaticDraftState(DraftState):
    """`DraftState` on the static path: the cache is `steps.cache`, the drafted nodes are written
    in a window of `window` slots after the prefix (never seen once `rewind` forgets them), and
    accepted tokens are fed in chunks of `chunk` (a prompt: of PREFILL_CHUNK), so the drafter runs
    at a few fixed shapes: a feed chunk, the frontier of top_k nodes, a chain's one node."""
    steps: Optional[DraftSteps] = None
    window: int = 0
    chunk: int = 8

    def feed(self, target: Transformer, tokens, feats):
        c, dev, total = self.cache, tokens.device, len(tokens)
        size = self.chunk if total <= self.chunk else PREFILL_CHUNK
        at = torch.arange(size, device=dev)
        rows = torch.ones(size, size, dtype=torch.bool, device=dev).tril()    # causal
        for start in range(0, total, size):
            n = min(size, total - start)
            x = tokens.new_zeros(1, size)                  # fresh tensors: strides are guarded
            x[0, :n] = tokens[start:start + n]
            f = feats.new_zeros(1, size, feats.shape[-1])
            f[0, :n] = feats[start:start + n]
            h = self.steps.step(x, f, (c.length + at)[None], c.length + at, rows,
                                torch.full((), n, device=dev))                 # (1, size, H)
            c.length.add_(n)
        return self.drafter.head(target, h[:, n - 1:n]).float()[0, -1], h[0, n - 1]

    def draft(self, target: Transformer, tokens, feats, depth: int, rows):
        c, dev, T = self.cache, tokens.device, len(tokens)
        window = rows.new_zeros(T, self.window)
        window[:, :rows.shape[1]] = rows                   # one width for every tree and chain
        slots = c.length + self.fed + torch.arange(T, device=dev)                # (T,)
        pos = c.length + torch.full((1, T), depth - 1, device=dev)
        h = self.steps.step(tokens[None].clone(), feats[None].contiguous(), pos, slots, window,
                            torch.full((), T, device=dev))[0]                  # (T, H)
        self.fed += T
        return self.drafter.head(target, h).float(), h

    def rewind(self):
        self.fed = 0              # the drafted slots lie past `length`: masked until overwritten


def draft_tree(state: DraftState, target: Transformer, root_token: int, shape: TreeShape,
               more=None) -> Tree:
    """Run the drafter up to `shape.depth` times over the growing tree (`grow_tree`; `more` may
    stop early); its cache is back to the prefix after. Depth d's frontier of k nodes is fed at
    drafted slots (d - 1) k .. d k - 1, each seeing its ancestors' slots and its own."""
    state.ready(target)
    dev = state.h.device
    k = min(shape.top_k, state.drafter.draft_vocab_size)
    W = shape.depth * k                     # drafted slots: every frontier this shape feeds
    eye = torch.eye(k, dtype=torch.bool, device=dev)
    rows = h = None          # the frontier's mask rows (k, W) over the drafted slots; its features
    depth = 0                # depth of the frontier being expanded

    def expand(tokens, slots):                                        # tokens, slots: (k,)
        nonlocal rows, h, depth
        depth += 1
        if slots is None:    # the root's children read the drafter's feature at the root
            feats, rows = state.h.expand(k, -1), torch.zeros(k, W, dtype=torch.bool, device=dev)
        else:                # deeper nodes read their parent's feature and see its ancestors
            feats, rows = h[slots], rows[slots]
        rows[:, (depth - 1) * k:depth * k] |= eye                      # and themselves
        logits, h = state.draft(target, tokens, feats, depth, rows)   # (k, V_draft), (k, H)
        return torch.log_softmax(logits, dim=-1)

    try:
        logp0 = torch.log_softmax(state.logits, -1)
        return grow_tree(root_token, logp0, expand, shape, state.drafter.vocab, more)
    finally:
        state.rewind()


def draft_chain(state: DraftState, target: Transformer, root_token: int, length: int,
                temperature: float, top_p: float, rng: RandomSource) -> tuple[Tree, torch.Tensor]:
    """Sample a chain x_1..x_length, x_i ~ q_i, for `verify_chain`: a one-child-per-node Tree and
    the draft distributions q (length, V), processed like p (temperature, top-p). A draft
    vocabulary's q is zero outside it: still a valid proposal for eqs. 1-2."""
    state.ready(target)
    logits, h = state.logits, state.h
    vocab, V = state.drafter.vocab, target.args.vocab_size
    tree, q = Tree([root_token], [-1], [0.0], [math.nan]), []
    rows = torch.zeros(1, length - 1, dtype=torch.bool, device=h.device)  # x_i sees x_1..x_i
    try:
        for i in range(length):
            qi = logits_to_probs(logits, temperature, top_p)                  # (V_draft,)
            q.append(qi if vocab is None else qi.new_zeros(V).index_copy(0, vocab, qi))
            x = rng.categorical(q[-1])
            tree.tokens.append(x)
            tree.parents.append(i)
            tree.logq.append(tree.logq[-1] + math.log(q[-1][x]))
            tree.entropy.append(entropy(torch.log_softmax(logits, -1)).item())
            if i + 1 < length:
                rows[0, i] = True
                out, hs = state.draft(target, torch.tensor([x], device=h.device), h[None],
                                      i + 1, rows)
                logits, h = out[0], hs[0]
    finally:
        state.rewind()
    return tree, torch.stack(q)


# --------------------------------------------------------------- composing specialists (eqs. 11-13)
# Several drafters, one verifier call. A tree composition is a function of the drafted trees
# alone (tokens, parents, draft scores and entropies), so the tree the target sees is fixed
# before the target is consulted and recursive rejection sampling stays exactly lossless
# (Lemma A.2). Picking a tree by what the *target* says (verify both, keep the longer) would not.

def average(drafters: Sequence[Drafter], lam: float) -> Drafter:
    """Weight averaging (eq. 11): theta = lam * theta_0 + (1 - lam) * theta_1 (math first).

    A zero-weight term is left out rather than multiplied by 0, so lam = 1 and lam = 0 return
    the specialists bit for bit (x * 1.0 is exact; x + 0.0 would turn -0.0 into 0.0).
    """
    if len(drafters) != 2:
        raise TapsError(f"weight averaging takes exactly two drafters, got {len(drafters)}")
    if not 0 <= lam <= 1:
        raise TapsError(f"lambda must be in [0, 1], got {lam}")
    a, b = drafters
    if a.meta.get("target") != b.meta.get("target") or a.args != b.args:
        raise TapsError(f"cannot average drafters trained for different targets ("
                        f"{a.meta.get('target')!r} and {b.meta.get('target')!r}) or with "
                        f"different configurations")
    if (a.vocab is None) != (b.vocab is None) or (a.vocab is not None
                                                  and not torch.equal(a.vocab, b.vocab)):
        why = ("train both with the same --draft-vocab" if a.draft_vocab_size != b.draft_vocab_size
               else "the vocabulary comes from the feature caches, so train both from the caches "
                    "of one size on one machine")
        raise TapsError(f"cannot average drafters with different draft vocabularies "
                        f"({a.draft_vocab_size} and {b.draft_vocab_size} tokens): their heads "
                        f"propose different tokens; {why}")
    sa, sb = a.state_dict(), b.state_dict()
    terms = [(w, s) for w, s in ((lam, sa), (1 - lam, sb)) if w]
    state = {}
    for k in sa:
        if k == "vocab":            # token ids, equal in both: not a weight
            state[k] = sa[k]
            continue
        state[k] = terms[0][0] * terms[0][1][k]
        for w, s in terms[1:]:
            state[k] = state[k] + w * s[k]
    out = Drafter(a.args, {**a.meta, "domain": "average", "lambda": lam,
                           "sources": [a.meta.get("domain"), b.meta.get("domain")]}, a.vocab)
    out.load_state_dict(state)
    return out.to(device=a.fc.weight.device, dtype=a.fc.weight.dtype).eval()


def tag(tree: Tree, origin: int) -> Tree:
    """Mark every non-root node as drafted by drafter `origin` (the root is -1)."""
    tree.origin = [-1] + [origin] * (len(tree) - 1)
    return tree


def route(trees: list[Tree]) -> Tree:
    """Confidence routing (eqs. 12-13): the tree whose nodes have the highest mean draft
    confidence exp(logq) (EAGLE-2's path probability, root excluded); ties go to the first.
    An empty tree (the root alone: `AutoTree` found no node worth verifying) loses to any
    other: its mean is -inf, not NaN, which no comparison would let lose."""
    return max(trees, key=lambda t: mean(t.confidence[1:], -math.inf))


def route_entropy(trees: list[Tree]) -> Tree:
    """The study's comparison: the tree whose nodes came from the lowest mean draft entropy; an
    empty tree (mean +inf) loses to any other, as in `route`."""
    return min(trees, key=lambda t: mean(t.entropy[1:], math.inf))


def merge(trees: list[Tree], dedup: bool = False) -> Tree:
    """Pack trees under their shared root: the root, then each tree's non-root nodes in order.

    Parent indices are offset, so each subtree keeps its own mask (`Tree.mask`: a node sees its
    ancestors only, never another subtree) and depth-based positions (`Tree.depths`). With
    dedup, a node whose (parent, token) is already present is united with it: the result is the
    trie of all input paths (every path kept, fewer nodes). A united node keeps the score and
    entropy of the first tree holding it; its origin becomes -2 when trees of different
    drafters hold it.
    """
    if len({t.tokens[0] for t in trees}) != 1:
        raise TapsError("trees to merge must share their root (the same prefix)")
    out = Tree(trees[0].tokens[:1], [-1], [0.0], [math.nan], [-1])
    index = {}                                     # (merged parent, token) -> merged node
    for t in trees:
        new_id = [0]                               # this tree's node -> merged node
        for i in range(1, len(t)):
            key, origin = (new_id[t.parents[i]], t.tokens[i]), t.origin[i] if t.origin else -1
            if dedup and key in index:
                new_id.append(index[key])
                if out.origin[index[key]] != origin:
                    out.origin[index[key]] = -2            # drafted by several drafters
                continue
            new_id.append(len(out))
            index.setdefault(key, len(out))
            out.tokens.append(t.tokens[i])
            out.parents.append(key[0])
            out.logq.append(t.logq[i])
            out.entropy.append(t.entropy[i])
            out.origin.append(origin)
    return out


# How the trees of several drafters become the one tree the target verifies. Any function of
# the trees alone (draft-side quantities only) keeps verification lossless. Weight averaging is
# not here: it makes one drafter (`average`), which then runs as "single".
COMPOSE: dict[str, Callable[[list[Tree]], Tree]] = {
    "single": lambda trees: trees[0], "route": route, "route-entropy": route_entropy,
    "merged": merge, "merged-dedup": lambda trees: merge(trees, dedup=True),
}


# ----------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class Sampling:
    """What `generate` draws and when it stops: p (and a chain's q) after temperature (0 =
    greedy) and top-p, at most max_new_tokens tokens, the last a stop token if one comes."""
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_ids: frozenset = frozenset()

    def __post_init__(self):
        logits_to_probs(torch.zeros(1), self.temperature, self.top_p)   # refused before any work
        if self.max_new_tokens < 1:
            raise TapsError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _calls():
    return field(default_factory=list)


@dataclass
class Stats:
    """Per-generation statistics: lists hold one entry per verifier call unless named per token.
    Entropies (nats, at T = 1) are the study's Tables 7-8: the draft's at each judged token, the
    target's at its parent."""
    accepted: list[int] = _calls()       # draft tokens accepted
    # tokens emitted: accepted + 1, fewer where a stop token or the budget ended the call early
    emitted: list[int] = _calls()
    tree_size: list[int] = _calls()      # nodes verified, root included
    # the drafter whose tree was verified; -2: several drafters' nodes (a merged tree); -1: none,
    # the root alone (a plain step, or every drafter's tree cut to its root by `AutoTree`)
    routed: list[int] = _calls()
    # origin (`Tree.origin`) of the first accepted node's first copy: a drafter; -2: several, a
    # united node of merged-dedup; -1: nothing accepted
    accepted_from: list[int] = _calls()
    leaf: list[bool] = _calls()          # the accepted path ended at a leaf (a bonus token)
    new_tokens: int = 0                  # generated tokens minus the prefill token
    draft_entropy_accepted: list[float] = _calls()    # per token
    draft_entropy_rejected: list[float] = _calls()
    target_entropy_accepted: list[float] = _calls()
    target_entropy_rejected: list[float] = _calls()
    prefill_time: float = 0.0
    draft_time: float = 0.0              # drafter: cache extension + tree drafting
    verify_time: float = 0.0             # target call + rejection sampling + cache keep

    @property
    def calls(self) -> int:
        return len(self.accepted)

    def record(self, tree: Tree, path: list[int], rejected: list[int], logits: dict, emitted: int,
               draft_s: float, verify_s: float):
        """One verifier call: accepted path (node ids from the root), rejected children, the
        target logits computed at visited nodes, and how many of the call's tokens were emitted
        (a stop token or the budget may end it early). A merged tree's copies of a token path
        are one node of its trie, as `verify_tree` walks it: each accepted node counts as its
        first copy, where its acceptance was decided, whichever copy `path` runs through (so
        `accepted_from` and the entropies of merged and merged-dedup trees agree)."""
        first, kids = tree.trie()
        path = [first[i] for i in path]
        self.accepted.append(len(path) - 1)
        self.emitted.append(emitted)
        self.tree_size.append(len(tree))
        origins = set(tree.origin[1:])
        self.routed.append(-1 if not origins else origins.pop() if len(origins) == 1 else -2)
        self.accepted_from.append(tree.origin[path[1]] if len(path) > 1 and tree.origin else -1)
        self.leaf.append(not kids[path[-1]])
        self.draft_time += draft_s
        self.verify_time += verify_s
        # the entropies of judgements whose token was emitted: children of path[j], j < emitted
        parents = set(path[:emitted])
        path = path[:1 + emitted]
        rejected = [s for s in rejected if first[tree.parents[s]] in parents]
        judged = path[1:] + rejected
        if judged:   # p was computed at first copies only (`verify_tree`)
            p_logits = torch.stack([logits[first[tree.parents[i]]] for i in judged])
            h_target = entropy(torch.log_softmax(p_logits, -1)).tolist()
            m = len(path) - 1
            self.draft_entropy_accepted += [tree.entropy[i] for i in path[1:]]
            self.draft_entropy_rejected += [tree.entropy[i] for i in rejected]
            self.target_entropy_accepted += h_target[:m]
            self.target_entropy_rejected += h_target[m:]

    @property
    def tau(self) -> float:
        """Acceptance length: new tokens per verifier call (each call emits accepted + 1, the
        last one fewer where a stop token or the budget ends it)."""
        return self.new_tokens / self.calls if self.calls else math.nan

    def acceptance_by_depth(self) -> list[float]:
        """alpha[d-1]: of the calls that accepted a token at depth d-1 (the root is depth 0) *and
        had a child there to accept*, the share that accepted one at depth d. A path that ended at
        a leaf had nothing below it to accept (its last token was a bonus): not counted. Only
        emitted tokens count, as in tau: where a stop token or the budget ended a call inside its
        accepted path, the acceptances below the cut and the judgement after them are left out."""
        leaf = self.leaf or [False] * self.calls
        emitted = self.emitted or [n + 1 for n in self.accepted]
        ok = [min(n, e) for n, e in zip(self.accepted, emitted)]     # accepted tokens emitted
        # the call's last judgement (every child rejected) was emitted, as its correction token
        failed = [e > n and not end for n, e, end in zip(self.accepted, emitted, leaf)]
        alpha, d = [], 1
        while reached := sum(n >= d or (n == d - 1 and f) for n, f in zip(ok, failed)):
            alpha.append(sum(n >= d for n in ok) / reached)
            d += 1
        return alpha

    def summary(self) -> dict:
        return {"new_tokens": self.new_tokens, "calls": self.calls, "tau": self.tau,
                "alpha_by_depth": [round(x, 3) for x in self.acceptance_by_depth()],
                "mean_tree_size": mean(self.tree_size),
                "draft_entropy": {"accepted": mean(self.draft_entropy_accepted),
                                  "rejected": mean(self.draft_entropy_rejected)},
                "target_entropy": {"accepted": mean(self.target_entropy_accepted),
                                   "rejected": mean(self.target_entropy_rejected)},
                "prefill_s": self.prefill_time, "draft_s": self.draft_time,
                "verify_s": self.verify_time}


class TargetHead:
    """p_at for the verifiers: the target's processed distribution after node i, a fresh copy.

    The LM head (V x H) is the largest matrix a verifier call touches, so it runs only on nodes
    the verification visits. A node's logits are computed together with its chain of first
    children (each node's likeliest draft) in one matmul: on the usual path -- the draft's
    favourites accepted one after another -- the head is read once per call, not once per node.
    """

    def __init__(self, target: Transformer, tree: Tree, h: torch.Tensor, sampling: Sampling):
        self.target, self.h, self.sampling = target, h, sampling
        self.first = [c[0] if c else None for c in tree.children()]
        self.logits: dict[int, torch.Tensor] = {}   # node -> (V,) fp32 target logits

    def __call__(self, i: int):
        if i not in self.logits:
            rows = [i]
            while self.first[rows[-1]] is not None:
                rows.append(self.first[rows[-1]])
            for j, row in zip(rows, self.target.head(self.h[rows]).float()):   # (len(rows), V)
                self.logits[j] = row
        return logits_to_probs(self.logits[i], self.sampling.temperature, self.sampling.top_p)


class KVTarget:
    """The target's side of a decode over today's sliced `KVCache`: the eager path, the reference
    every static path is tested against. prefill(prompt (P,)) -> (logits (V,), features (P, H));
    score(tree) -> features (N, H) of its nodes (provisional); keep(path) keeps the accepted
    path."""

    def __init__(self, target: Transformer, max_len: int):
        self.target, self.cache, self.start = target, target.new_cache(1, max_len), 0
        self.device = target.embed_tokens.weight.device

    def prefill(self, prompt):
        logits, f = self.target(prompt[None], cache=self.cache, last_only=True)
        return logits[0, -1], f[0]

    def score(self, tree: Tree):
        dev, self.start = self.device, self.cache.length
        tokens = torch.tensor([tree.tokens], device=dev)
        pos = self.start + torch.tensor([tree.depths()], device=dev)  # prefix length + depth
        mask = tree.mask(dev)[None] if len(tree) > 1 else None          # a lone root: the prefix
        return self.target(tokens, pos, mask, self.cache, head=False)[1][0]

    def keep(self, path: list[int]):
        self.cache.keep(self.start, path)


class StaticTarget:
    """`KVTarget`'s steps on model.py's `StaticSteps`: each tree padded to its bucket
    (`pad_tree`), each accepted path to `keep_size` (`pad_path`), so every step runs at a fixed
    shape, compiled once."""

    def __init__(self, steps: StaticSteps, size: int, keep_size: int):
        self.steps, self.keep_size, self.target = steps, keep_size, steps.model
        self.device = steps.model.embed_tokens.weight.device
        steps.fit(size)

    def prefill(self, prompt):
        logits, f = self.steps.prefill(prompt[None])
        return logits[0], f[0]

    def score(self, tree: Tree):
        h = self.steps.score(*pad_tree(tree.tokens, tree.mask(self.device), tree.depths()))
        return h[0, :len(tree)]                                   # pad rows dropped

    def keep(self, path: list[int]):
        self.steps.keep(*pad_path(path, self.keep_size, self.device))


# generate(compile=...): None, today's eager path; "static", the static path run eagerly; else a
# torch.compile backend for it ("inductor": the fast one, CUDA graphs on CUDA; "eager" and
# "aot_eager" only trace, the tests' quick check)
COMPILE = ("static", "eager", "aot_eager", "inductor")
_STATIC: OrderedDict = OrderedDict()   # the last few models' static steps, compiled once, reused
STATIC_KEPT = 16


def static_steps(model: nn.Module, key: tuple, build):
    """The static steps of `model` under `key` (backend, ...), built once and reused by every
    later `generate` (eval.py's many prompts): compiled graphs and caches live there. Keyed by the
    model's id, dtype and device (the entry holds the model, so the id stays its own)."""
    p = next(model.parameters())
    key = (id(model), p.dtype, p.device, *key)
    if key not in _STATIC:
        _STATIC[key] = (model, build())
        while len(_STATIC) > STATIC_KEPT:
            _STATIC.popitem(last=False)
    _STATIC.move_to_end(key)
    return _STATIC[key][1]


def check_compile(compile: Optional[str]):
    if compile is not None and compile not in COMPILE:
        raise TapsError(f"unknown compile backend {compile!r} (choose from {', '.join(COMPILE)})")


class HostHead:
    """`TargetHead`'s p_at on a GPU, with one host synchronisation per verifier call: the LM head
    on every first copy of the trie (each node the walk may stand on, leaves included: a bonus is
    drawn there) in one batched pass -- on a GPU N rows cost about what one does -- p for all of
    them, and one copy of logits and p to the host, where the walk (`verify_tree`, unchanged)
    runs on plain vectors."""

    def __init__(self, target: Transformer, tree: Tree, h: torch.Tensor, sampling: Sampling):
        first, _ = tree.trie()
        nodes = [i for i in range(len(tree)) if first[i] == i]
        logits = target.head(h[nodes]).float()                              # (F, V)
        p = logits_to_probs(logits, sampling.temperature, sampling.top_p)
        logits, p = torch.stack([logits, p]).cpu()                          # the one copy
        self.row = {i: r for r, i in enumerate(nodes)}
        self.p = p
        self.logits = {i: logits[r] for i, r in self.row.items()}          # node -> (V,)

    def __call__(self, i: int):
        return self.p[self.row[i]].clone()


def lazy_head(device) -> bool:
    """The LM head per visited node (`TargetHead`: on a CPU, N rows cost N times one) or on
    every node at once with one host copy (`HostHead`: on a GPU)."""
    return torch.device(device).type != "cuda"


def _emit(out: list[int], new: list[int], sampling: Sampling) -> tuple[int, bool]:
    """Append tokens until a stop token (kept) or the budget: (tokens appended, generation over)."""
    for n, x in enumerate(new, 1):
        out.append(x)
        if x in sampling.stop_ids or len(out) >= sampling.max_new_tokens:
            return n, True
    return len(new), False


def check_compose(compose, k: int, chain=False):
    """A composition by name takes one drafter (single) or several (the others); a chain, one."""
    if isinstance(compose, str):
        if compose not in COMPOSE:
            raise TapsError(f"unknown compose {compose!r} (choose from {', '.join(COMPOSE)})")
        if (compose == "single") != (k == 1):
            need = "exactly one drafter" if compose == "single" else "two or more drafters"
            raise TapsError(f"compose {compose!r} takes {need}, got {k}")
    if chain and k != 1:
        raise TapsError("chain speculative sampling takes exactly one drafter")


def engines(target: Transformer, drafters: list, shape: TreeShape, max_len: int,
            compile: Optional[str]):
    """The target's verifier (`KVTarget`, or `StaticTarget` with compile) and each drafter's
    `DraftState`, with room for a prompt and reply of max_len tokens plus one tree."""
    window = shape.depth * shape.top_k                                  # a tree's drafted slots
    if compile is None:
        return KVTarget(target, max_len), [DraftState(d, d.new_cache(max_len + window))
                                           for d in drafters]
    backend = None if compile == "static" else compile
    keep = bucket(shape.depth + 2)              # the deepest accepted path: root, depth + 1 nodes
    # the largest bucket a tree may need (a larger tree is refused when scored, by `bucket`)
    size = max_len + max(bucket(min(len(drafters) * shape.nodes + 1, TREE_BUCKETS[-1])), keep)
    verifier = StaticTarget(static_steps(target, (backend,), lambda: StaticSteps(
        target, backend=backend)), size, keep)
    states = []
    for i, d in enumerate(drafters):            # the i: one drafter twice needs two caches
        steps = static_steps(d, (backend, id(target), i), lambda: DraftSteps(d, target, backend))
        steps.fit(max_len + window + PREFILL_CHUNK)
        steps.cache.reset()
        states.append(StaticDraftState(d, steps.cache, steps=steps, window=window, chunk=keep))
    return verifier, states


def speculative_tree(policy: "TreePolicy", states: list, verifier, root_token: int, compose,
                     sampling: Sampling, rng: RandomSource, trace=None):
    """One verifier call on a drafted tree: the policy drafts (draft-side quantities only), the
    target scores every node in one call, recursive rejection sampling walks it (eq. 5).
    Returns (tree, features (N, H), p_at, path, x, rejected, seconds drafting)."""
    t0 = clock(verifier.device)
    tree = policy.draft(states, verifier.target, root_token, compose)
    t1 = clock(verifier.device)
    h = verifier.score(tree)                                                  # (N, H)
    head = TargetHead if lazy_head(verifier.device) else HostHead
    p_at = head(verifier.target, tree, h, sampling)
    return (tree, h, p_at, *verify_tree(tree, p_at, rng, trace), t1 - t0)


def speculative_chain(state: DraftState, verifier, root_token: int, length: int,
                      sampling: Sampling, rng: RandomSource, trace=None):
    """One call of classic speculative sampling (eqs. 1-2, gpt-fast's `speculative_decode`): a
    chain of `length` tokens sampled from q, scored by the target in one call, accepted while
    u < p / q. Returns what `speculative_tree` does."""
    t0 = clock(verifier.device)
    tree, q = draft_chain(state, verifier.target, root_token, length, sampling.temperature,
                          sampling.top_p, rng)
    t1 = clock(verifier.device)
    h = verifier.score(tag(tree, 0))                                          # (N, H)
    p_at = (TargetHead if lazy_head(verifier.device) else HostHead)(verifier.target, tree, h,
                                                                   sampling)
    q = q if lazy_head(verifier.device) else q.cpu()                       # beside p
    return (tree, h, p_at, *verify_chain(tree.tokens, q, p_at, rng, trace), t1 - t0)


def prepare(target: Transformer, drafters, prompt_ids, sampling: Sampling, shape: TreeShape,
            compose, compile: Optional[str]):
    """generate's arguments checked (one-line errors before any work) and normalised: (drafters
    as a list, compose as a function, prompt (P,) on the target's device, sampling with the
    budget capped to the context)."""
    drafters = [drafters] if isinstance(drafters, Drafter) else list(drafters)
    for d in drafters:
        check_drafter(d, target)
    check_compose(compose, len(drafters), shape.chain)
    check_compile(compile)
    compose = COMPOSE[compose] if isinstance(compose, str) else compose
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long,
                             device=target.embed_tokens.weight.device).flatten()
    if len(prompt) == 0:
        raise TapsError("the prompt is empty")
    n_new = context_budget(target, len(prompt), sampling.max_new_tokens)
    return drafters, compose, prompt, dataclasses.replace(sampling, max_new_tokens=n_new)


@torch.inference_mode()
def generate(target: Transformer, drafters, prompt_ids, sampling: Sampling = Sampling(),
             tree: "TreePolicy" = TreeShape(), compose="single",
             rng: Optional[RandomSource] = None, trace=None, compile: Optional[str] = None):
    """Speculative decoding: draft -> verify -> keep -> emit, until `sampling.max_new_tokens` or
    a stop token.

    drafters: a Drafter or a list; each keeps its own KV cache and drafts its own tree every
    call, and `compose` (a name in COMPOSE or a function of the list of trees) makes the one
    tree to verify. tree: the `TreePolicy` that drafts each call's tree: a fixed `TreeShape`
    (the study's by default; chain=True: a sampled chain, eqs. 1-2), or an
    `extras.autotree.AutoTree` that sizes every call's trees for the hardware. trace: None (off),
    or an `extras.trace.Trace`, which records every call: the trees composed, the tree verified,
    each test and draw as the verifier made it (`VerifyTrace`), the path and the tokens emitted.
    compile: None (today's eager path, the reference) or one of COMPILE: the static path, whose
    steps (the target's and each drafter's) are built once per model and backend and reused.
    Returns the generated tokens (prompt excluded; the first from prefill) and `Stats`.
    """
    shape, rng = tree.shape, rng or TorchRandom(0)
    drafters, compose, prompt, sampling = prepare(target, drafters, prompt_ids, sampling, shape,
                                                  compose, compile)
    if trace is not None:   # it sees the trees each call composes, and the uniforms drawn
        compose = trace.watch(compose, rng)
    # room for the prompt, the reply and one whole tree (composed: up to one per drafter)
    max_len = len(prompt) + sampling.max_new_tokens + len(drafters) * shape.nodes + shape.depth + 2
    verifier, states = engines(target, drafters, shape, max_len, compile)
    stats, out = Stats(), []
    t0 = clock(verifier.device)
    logits, f = verifier.prefill(prompt)                                # (V,), (P, H)
    x = rng.categorical(logits_to_probs(logits, sampling.temperature, sampling.top_p))
    _, done = _emit(out, [x], sampling)
    for s in states:   # pairs (x_{t+1}, f_t) over the prompt, ending with the token just sampled
        s.extend(torch.cat([prompt[1:], prompt.new_tensor([x])]), f)
    tree.start(states, target, x)
    stats.prefill_time = clock(verifier.device) - t0
    while not done:
        t0 = clock(verifier.device)
        if shape.chain:
            call = speculative_chain(states[0], verifier, x, shape.depth + 1, sampling, rng, trace)
        else:
            call = speculative_tree(tree, states, verifier, x, compose, sampling, rng, trace)
        drafted, h, p_at, path, x, rejected, draft_s = call
        verifier.keep(path)   # the accepted path's keys and values stay, the rest are dropped
        seconds = clock(verifier.device) - t0
        tree.record(drafted, len(path) - 1, seconds)
        # emit the accepted tokens and the verifier's own; extend the drafters with them
        new = [drafted.tokens[i] for i in path[1:]] + [x]
        emitted, done = _emit(out, new, sampling)
        stats.record(drafted, path, rejected, p_at.logits, emitted, draft_s, seconds - draft_s)
        if trace is not None:
            trace.call(drafted, path, new[:emitted], draft_s, seconds - draft_s)
        for s in states:   # the accepted tokens, with the target's features at their parents
            s.extend(torch.tensor(new, device=verifier.device), h[path])
    stats.new_tokens = len(out) - 1
    return out, stats


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    from extras.autotree import TREES, AutoTree, load_for   # --tree auto, --dtype auto
    from extras.runtime import (DTYPES, Parser, check_device, check_files, check_flags,
                                check_tree_flags, default_device, given, one_line_errors,
                                refuse_unused, target_args)
    from extras.trace import Trace, check_destinations, save, show   # --show, --trace(-html)
    ap = Parser(description="Speculative decoding with EAGLE drafters (lossless: the reply is "
                            "distributed exactly as the target's own).")
    ap.add_argument("--prompt", required=True, help="user message to answer")
    ap.add_argument("--drafter", action="append", required=True, metavar="CKPT",
                    help="drafter checkpoint, or 'random' for an untrained one; repeat to compose")
    ap.add_argument("--compose", default="single", choices=sorted(COMPOSE))
    ap.add_argument("--chain", action="store_true", help="chain speculative sampling, no tree")
    ap.add_argument("--target", help="HF checkpoint directory (default: the embedded default)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--tree", choices=TREES, default="auto",
                    help="auto (default): sized each call for this machine (AutoTree, calibrated "
                         "once); study: the fixed --total-tokens/--depth/--top-k tree")
    ap.add_argument("--total-tokens", type=int, default=60, help="study tree: nodes kept")
    ap.add_argument("--depth", type=int, default=5, help="study tree (and --chain): steps")
    ap.add_argument("--top-k", type=int, default=10, help="study tree: children per node")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto",
                    help="auto (default): bf16 where this machine's calibration says it pays")
    ap.add_argument("--show", action="store_true",
                    help="print every verifier call: its tree, each acceptance test, the draw")
    ap.add_argument("--trace", metavar="FILE.jsonl", help="every verifier call as a JSON line")
    ap.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE,
                    help="decode on the static path (fixed shapes), compiled with this backend "
                         "(default inductor: CUDA graphs on CUDA); 'static' runs it uncompiled")
    ap.add_argument("--trace-html", metavar="FILE.html",
                    help="every verifier call's tree drawn, in one self-contained HTML page")
    args = ap.parse_args(argv)
    with one_line_errors():
        check_flags(args)
        check_compose(args.compose, len(args.drafter), args.chain)
        # the study tree's flags do nothing with an auto tree; a chain reads --depth alone
        idle = ({"--total-tokens", "--top-k", "--tree"} if args.chain else
                {"--total-tokens", "--depth", "--top-k"} if args.tree == "auto" else set())
        refuse_unused(ap, args, given(ap, args) - idle, *(
            ("with --chain (it drafts --depth + 1 tokens)",) if args.chain else
            ("with --tree auto (the default)", "add --tree study to use the fixed tree")))
        if args.temperature == 0:
            refuse_unused(ap, args, given(ap, args) - {"--top-p"}, "at --temperature 0 (greedy)")
        # a chain verifies depth + 1 tokens: its depth is its node budget
        shape = TreeShape(args.top_k, args.depth, args.depth if args.chain else args.total_tokens,
                          args.chain)
        if args.tree == "study" or args.chain:    # before any model work (--dtype auto's)
            check_tree_flags(shape, target_args(args.target))
        check_device(args.device)
        check_files([d for d in args.drafter if d != "random"], "drafter checkpoint")
        check_destinations(args.trace, args.trace_html)
        target, tokenizer = load_for(args.target, args.device, args.dtype)
        drafters = [Drafter.random(target, args.seed + i) if d == "random"   # each its own
                    else Drafter.load(d, target) for i, d in enumerate(args.drafter)]
        if args.tree == "study" or args.chain:
            check_tree_flags(shape, target.args, drafters)   # each drafter's vocabulary
        auto = AutoTree.for_target(target) if args.tree == "auto" and not args.chain else None
        chat = [{"role": "user", "content": args.prompt}]
        ids, _ = tokenizer.encode_chat(chat, add_generation_prompt=True)
        n = context_budget(target, len(ids), args.max_new_tokens, say=True)
        sampling = Sampling(args.temperature, args.top_p, n, frozenset(tokenizer.stop_ids))
        tree = auto or shape
        trace = None
        if args.show or args.trace or args.trace_html:
            trace = Trace(lambda t: tokenizer.decode([t]))
            trace.meta = {k: vars(args)[k] for k in ("prompt", "drafter", "compose", "temperature")}
        out, stats = generate(target, drafters, ids, sampling, tree, args.compose,
                              TorchRandom(args.seed), trace, args.compile)
        if trace is not None:
            save(trace, args.trace, args.trace_html, f"taps --prompt {args.prompt!r}")
    if args.show:
        show(trace)
    print(tokenizer.decode([t for t in out if t not in tokenizer.stop_ids]))
    s = stats.summary()
    wall = s["prefill_s"] + s["draft_s"] + s["verify_s"]
    f = lambda x: "–" if x is None or math.isnan(x) else f"{x:.2f}"   # a mean over nothing
    dtype = str(target.embed_tokens.weight.dtype).removeprefix("torch.")
    print(f"\n[{len(out)} tokens in {wall:.2f} s ({len(out) / wall:.1f} tok/s, {dtype}); "
          f"{s['calls']} verifier calls, tau = {f(s['tau'])}; alpha by depth "
          f"{s['alpha_by_depth']}; {f(s['mean_tree_size'])} nodes/call; draft {s['draft_s']:.2f} "
          f"s, verify {s['verify_s']:.2f} s, prefill {s['prefill_s']:.2f} s]")
    e = {k: f"{f(s[k]['accepted'])}/{f(s[k]['rejected'])}" for k in ("draft_entropy",
                                                                    "target_entropy")}
    print(f"[entropy (nats) accepted/rejected: draft {e['draft_entropy']}, "
          f"target {e['target_entropy']}]")


if __name__ == "__main__":   # extras/ imports `taps`: run its CLI from that module, one TapsError
    __import__("taps").main()
