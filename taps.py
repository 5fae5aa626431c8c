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

import dataclasses
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (PREFILL_CHUNK, STATIC_UNIT, TREE_BUCKETS, Block, KVCache, ModelArgs,
                   StaticCache, StaticSteps, TapsError, Transformer, bucket, build_mask, chunks,
                   clock, compile_step, context_budget, logits_to_probs, mean, pad_path, pad_tree,
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
    node, rejected = 0, []
    while True:
        r = p_at(node)
        for s in tree.trie[node]:
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

@dataclass(frozen=True)
class Tree:
    """A draft tree, built once and never changed; node 0 is the root (the last accepted token,
    not yet seen by the target). One entry per node in each field, the root's included.

    Parents precede children (parents[i] < i), so trees merge by concatenating and offsetting
    parent indices. What is computed from the tree (`depths`, `children`, `first`, `trie`,
    `mask`) is computed once, when first asked: a pool that `prune` cuts never builds its mask.
    """
    tokens: tuple[int, ...]
    parents: tuple[Optional[int], ...]      # the root has none
    logq: tuple[float, ...]   # cumulative draft log-prob of the node's path (its EAGLE-2 score);
    #                           the root's is log 1 = 0: it is given, not drafted
    entropy: tuple[Optional[float], ...]    # of the draft distribution the node was drawn from;
    #                                         the root's is None: it was not drawn
    # the drafters that drafted each node: one, or several for a node that merge(dedup=True)
    # united; the root's is empty. None (the default): drafter 0 drafted every node (see `tag`)
    origin: Optional[tuple[frozenset[int], ...]] = None
    # what `prune` cut this tree from (a reference, no copy), read by a trace (extras/trace.py)
    # to show the nodes drafted and dropped; not part of the tree: equality ignores it
    pool: Optional["Tree"] = field(default=None, compare=False, repr=False)

    def __post_init__(self):       # lists given are stored as tuples: the tree cannot change
        n, origin = len(self.tokens), self.origin
        if origin is None:
            origin = (frozenset(),) + (frozenset({0}),) * (n - 1)
        for name, value in (("tokens", self.tokens), ("parents", self.parents),
                            ("logq", self.logq), ("entropy", self.entropy), ("origin", origin)):
            if len(value) != n:
                raise ValueError(f"Tree.{name} has {len(value)} entries for {n} nodes")
            object.__setattr__(self, name, tuple(value))

    def __len__(self):
        return len(self.tokens)

    @property
    def confidence(self) -> list[float]:
        """Path probability under the drafter, exp(logq)."""
        return [math.exp(s) for s in self.logq]

    @cached_property
    def depths(self) -> tuple[int, ...]:
        """Each node's depth (the root 0): its position is the prefix length plus its depth."""
        d = [0]
        for p in self.parents[1:]:
            d.append(d[p] + 1)
        return tuple(d)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        c = [[] for _ in self.tokens]
        for i in range(1, len(self)):
            c[self.parents[i]].append(i)
        return tuple(map(tuple, c))

    @cached_property
    def first(self) -> tuple[int, ...]:
        """first[i]: the lowest node id with node i's token path (i itself unless merged trees
        repeat a path), the node of the trie that verifies it."""
        first, seen = [0], {}
        for i in range(1, len(self)):
            first.append(seen.setdefault((first[self.parents[i]], self.tokens[i]), i))
        return tuple(first)

    @cached_property
    def trie(self) -> tuple[tuple[int, ...], ...]:
        """The trie of the tree's token paths: trie[f] of a first copy f (`first`) holds the first
        copies of its children, one per distinct token, gathered from every copy of f, in node
        order (a leaf's and a second copy's are empty)."""
        kids = [[] for _ in self.tokens]
        for i in range(1, len(self)):
            if self.first[i] == i:
                kids[self.first[self.parents[i]]].append(i)
        return tuple(map(tuple, kids))

    @cached_property
    def mask(self) -> torch.Tensor:
        """(N, N) bool on the CPU, read-only by convention: a node attends to itself and its
        ancestors (and the cached prefix)."""
        m = torch.eye(len(self), dtype=torch.bool)    # built row by row on the CPU
        for i in range(1, len(self)):
            m[i] |= m[self.parents[i]]
        return m

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root to node."""
        path = [node]
        while path[-1] != 0:
            path.append(self.parents[path[-1]])
        return path[::-1]

    @cached_property
    def path_logq(self) -> tuple[float, ...]:
        """Each node's score as a rank: the lowest logq on its path from the root. A node is
        accepted only after every node above it, so it is worth no more than the weakest of them.
        An EAGLE-2 tree's scores already fall along every path (log q <= 0), so these are its
        own; a de-duplicated merged tree's united node keeps the first tree's score, and a child
        from another tree can outscore it."""
        score = list(self.logq)
        for i in range(1, len(self)):                     # parents precede children
            score[i] = min(score[i], score[self.parents[i]])
        return tuple(score)


def flag(default, help: str):
    """A config field that is also a command-line flag of that name, with this help (the
    scripts' `extras.runtime.add_fields`): one definition of a knob for every script."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TreeShape:
    """The draft tree of eq. 6: each of `depth` steps expands the top_k children of the top_k
    best frontier nodes, then the `total_tokens` best nodes are kept (None: the whole pool). The
    study's EAGLE-2 setting is 10 / 5 / 60. chain=True drafts a sampled chain of depth + 1
    tokens instead, verified by eqs. 1-2."""
    top_k: int = flag(10, "study tree: children per node")
    depth: int = flag(5, "study tree (and --chain): steps")
    total_tokens: Optional[int] = flag(60, "study tree: nodes kept")
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
    """The EAGLE-2 dynamic tree (eq. 6) from draft log-probs, grown top-down over a frontier.

    The frontier is the nodes whose children are drafted next, the root alone at first. At each
    level every frontier node's top_k children join the pool, scored by cumulative log q, and the
    top_k of them (all, while there are no more) are the next frontier, which the drafter expands:
    `depth` expansions, then `prune` keeps the `total_tokens` best. Nodes stay in pool order.
    logp0: (V,) draft log-probs of the root's children. expand(tokens, slots) runs the drafter on
    a new frontier, tokens (k,), whose parents are `slots` (k,), indices into the previous frontier
    (zeros for the root's children: the root is a frontier of one), and returns their children's
    log-probs (k, V).
    vocab: (V,) the token id of each log-prob column (None: column i is token i).
    more(pool_scores, frontier_scores), if given, is asked before each expansion whether to make
    it (`AutoTree`); its answer may depend on draft-side quantities only.
    """
    ids = (lambda i: i) if vocab is None else (lambda i: vocab[i])
    k = min(shape.top_k, logp0.shape[-1])
    # the frontier: node ids (F,), cumulative log q (F,), its children's log q (F, V); the root
    node = torch.zeros(1, dtype=torch.long, device=logp0.device)
    score, logp = logp0.new_zeros(1), logp0[None]
    pool_tok, pool_parent, pool_score, pool_ent = [], [], [], []   # per level, each (F k,)
    n = 1                                                           # nodes so far: the root
    for level in range(shape.depth + 1):
        child_lp, child_col = logp.topk(k, dim=-1)                     # (F, k)
        cand = (score[:, None] + child_lp).flatten()                   # (F k,) cumulative log q
        child_tok = ids(child_col).flatten()                           # (F k,)
        pool_tok.append(child_tok)
        pool_parent.append(node.repeat_interleave(k))
        pool_score.append(cand)
        pool_ent.append(entropy(logp).repeat_interleave(k))
        if level == shape.depth:
            break
        # the next frontier: the k best candidates (the root's k children: all, in their order,
        # which topk could reorder among ties)
        best = cand.topk(k).indices if len(cand) > k else torch.arange(k, device=cand.device)
        score, slots, tok, node = cand[best], best // k, child_tok[best], n + best   # (k,)
        n += len(cand)
        if more is not None and not more(torch.cat(pool_score), score):
            break
        logp = expand(tok, slots)                                      # (k, V)
    pool = Tree((root_token, *torch.cat(pool_tok).tolist()),
                (None, *torch.cat(pool_parent).tolist()),
                (0.0, *torch.cat(pool_score).tolist()), (None, *torch.cat(pool_ent).tolist()))
    return pool if shape.total_tokens is None else prune(pool, shape.total_tokens + 1)


def prune(tree: Tree, n: int) -> Tree:
    """The root and the n - 1 best nodes by score (eq. 6's final rerank), in their order.

    Nodes rank by `Tree.path_logq`, which never rises from parent to child, and ties go to the
    earlier node, a parent before its children: so the kept set is a tree (every kept node's
    parent kept) whatever it is given. On EAGLE-2's trees that is the study's rerank by logq.
    Fixed here, not in `merge`, because this is where a tree must come out, whatever composed
    the input: a de-duplicated merged tree (`AutoTree` prunes it again) can hold a child that
    outscores its parent, and ranking by raw logq kept such a child without its parent.
    The result keeps a reference to `tree` (`Tree.pool`): a trace shows what was dropped.
    """
    if n >= len(tree):
        return tree
    score = tree.path_logq
    order = sorted(range(1, len(tree)), key=lambda i: -score[i])   # stable: ties by node order
    keep = [0] + sorted(order[:n - 1])
    new_id = {old: new for new, old in enumerate(keep)}
    pick = lambda xs: [xs[i] for i in keep]
    return Tree(pick(tree.tokens), [None] + [new_id[tree.parents[i]] for i in keep[1:]],
                pick(tree.logq), pick(tree.entropy), pick(tree.origin), pool=tree)


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
        a, p = drafter.args, drafter.fc.weight
        self.cache = StaticCache(1, a.n_kv_heads, a.head_dim, STATIC_UNIT, p.dtype, p.device)
        self.step = self._step if backend is None else compile_step(self._step, p.device, backend)

    def fit(self, n: int):
        """Room for n slots (`StaticCache.fit`; what the cache held is dropped)."""
        self.cache = self.cache.fit(n)

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
        for (x, n), (f, _) in zip(chunks(tokens[None], size), chunks(feats[None], size)):
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
    # the frontier's mask rows (F, W) over the drafted slots and its drafter features (F, H): the
    # root's at first, which sees no drafted slot and whose feature the drafter gave at the root
    rows, h = torch.zeros(1, W, dtype=torch.bool, device=dev), state.h[None]
    depth = 0                # depth of the frontier being expanded

    def expand(tokens, slots):                                        # tokens, slots: (k,)
        nonlocal rows, h, depth
        depth += 1
        feats, rows = h[slots], rows[slots]   # each reads its parent's feature, sees its ancestors
        rows[:, (depth - 1) * k:depth * k] |= eye                      # and itself
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
    tokens, logq, ent, q = [root_token], [0.0], [None], []
    rows = torch.zeros(1, length - 1, dtype=torch.bool, device=h.device)  # x_i sees x_1..x_i
    try:
        for i in range(length):
            qi = logits_to_probs(logits, temperature, top_p)                  # (V_draft,)
            q.append(qi if vocab is None else qi.new_zeros(V).index_copy(0, vocab, qi))
            x = rng.categorical(q[-1])
            tokens.append(x)
            logq.append(logq[-1] + math.log(q[-1][x]))
            ent.append(entropy(torch.log_softmax(logits, -1)).item())
            if i + 1 < length:
                rows[0, i] = True
                out, hs = state.draft(target, torch.tensor([x], device=h.device), h[None],
                                      i + 1, rows)
                logits, h = out[0], hs[0]
    finally:
        state.rewind()
    return Tree(tokens, [None, *range(length)], logq, ent), torch.stack(q)


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


def tag(tree: Tree, drafter: int) -> Tree:
    """The tree with every non-root node drafted by `drafter` (a new tree: trees never change)."""
    return dataclasses.replace(tree, origin=(frozenset(),) + (frozenset({drafter}),)
                               * (len(tree) - 1))


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
    entropy of the first tree holding it, and is drafted by every drafter whose tree holds it.
    """
    if len({t.tokens[0] for t in trees}) != 1:
        raise TapsError("trees to merge must share their root (the same prefix)")
    root = trees[0]
    tokens, parents, logq, ent, origin = ([x[0]] for x in (root.tokens, root.parents, root.logq,
                                                            root.entropy, root.origin))
    index = {}                                     # (merged parent, token) -> merged node
    for t in trees:
        new_id = [0]                               # this tree's node -> merged node
        for i in range(1, len(t)):
            key = (new_id[t.parents[i]], t.tokens[i])
            if dedup and key in index:
                new_id.append(index[key])
                origin[index[key]] |= t.origin[i]
                continue
            new_id.append(len(tokens))
            index.setdefault(key, len(tokens))
            tokens.append(t.tokens[i])
            parents.append(key[0])
            logq.append(t.logq[i])
            ent.append(t.entropy[i])
            origin.append(t.origin[i])
    return Tree(tokens, parents, logq, ent, origin)


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
    temperature: float = flag(0.0, "0 = greedy")
    top_p: float = flag(1.0, "keep the most likely tokens up to this total probability (1 = all)")
    max_new_tokens: int = flag(256, "most tokens to generate")
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
    # the drafters whose nodes the verified tree holds: one (its tree was verified), several (a
    # merged tree), none (the root alone: a plain step, or every tree cut to its root by AutoTree)
    routed: list[frozenset[int]] = _calls()
    # the drafters (`Tree.origin`) of the first accepted node's first copy: one, several (a node
    # merge(dedup=True) united), none (nothing accepted)
    accepted_from: list[frozenset[int]] = _calls()
    leaf: list[bool] = _calls()          # the accepted path ended at a leaf (a bonus token)
    new_tokens: int = 0                  # generated tokens minus the prefill token
    draft_entropy_accepted: list[float] = _calls()    # per token
    draft_entropy_rejected: list[float] = _calls()
    target_entropy_accepted: list[float] = _calls()
    target_entropy_rejected: list[float] = _calls()
    prefill_time: float = 0.0
    # seconds, with one synchronising clock per call on CUDA: drafting ends when its tree reaches
    # the host, the call when the accepted path is kept
    draft_time: float = 0.0              # drafter: cache extension + tree drafting
    verify_time: float = 0.0             # target call + rejection sampling + cache keep

    @property
    def calls(self) -> int:
        return len(self.accepted)

    def record(self, tree: Tree, path: list[int], rejected: list[int],
               target_entropy: Callable[[list[int]], list[float]], emitted: int, draft_s: float,
               verify_s: float):
        """One verifier call: accepted path (node ids from the root), rejected children, the
        target's entropies (T = 1) after given nodes the verifier visited (the heads' `entropy`),
        and how many of the call's tokens were emitted (a stop token or the budget may end it
        early). A merged tree's copies of a token path
        are one node of its trie, as `verify_tree` walks it: each accepted node counts as its
        first copy, where its acceptance was decided, whichever copy `path` runs through (so
        `accepted_from` and the entropies of merged and merged-dedup trees agree)."""
        first = tree.first
        path = [first[i] for i in path]
        self.accepted.append(len(path) - 1)
        self.emitted.append(emitted)
        self.tree_size.append(len(tree))
        self.routed.append(frozenset().union(*tree.origin))         # the root's is empty
        self.accepted_from.append(tree.origin[path[1]] if len(path) > 1 else frozenset())
        self.leaf.append(not tree.trie[path[-1]])
        self.draft_time += draft_s
        self.verify_time += verify_s
        # the entropies of judgements whose token was emitted: children of path[j], j < emitted
        parents = set(path[:emitted])
        path = path[:1 + emitted]
        rejected = [s for s in rejected if first[tree.parents[s]] in parents]
        judged = path[1:] + rejected
        if judged:   # p was computed at first copies only (`verify_tree`)
            h_target = target_entropy([first[tree.parents[i]] for i in judged])
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
        self.first = [c[0] if c else None for c in tree.children]
        self.logits: dict[int, torch.Tensor] = {}   # node -> (V,) fp32 target logits

    def __call__(self, i: int):
        if i not in self.logits:
            rows = [i]
            while self.first[rows[-1]] is not None:
                rows.append(self.first[rows[-1]])
            for j, row in zip(rows, self.target.head(self.h[rows]).float()):   # (len(rows), V)
                self.logits[j] = row
        return logits_to_probs(self.logits[i], self.sampling.temperature, self.sampling.top_p)

    def entropies(self, nodes: list[int]) -> list[float]:
        """The target's entropies (nats, at T = 1) after nodes p was computed at (`Stats`)."""
        logits = torch.stack([self.logits[i] for i in nodes])                 # (len(nodes), V)
        return entropy(torch.log_softmax(logits, -1)).tolist()


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
        pos = self.start + torch.tensor([tree.depths], device=dev)    # prefix length + depth
        mask = tree.mask.to(dev)[None] if len(tree) > 1 else None       # a lone root: the prefix
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
        h = self.steps.score(*pad_tree(tree.tokens, tree.mask.to(self.device), tree.depths))
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
    """`TargetHead` on a GPU, with one host synchronisation per verifier call: the LM head on
    every first copy of the trie (each node the walk may stand on, leaves included: a bonus is
    drawn there) in one batched pass -- on a GPU N rows cost about what one does -- and one copy
    to the host of what the walk (`verify_tree`, unchanged) and `Stats` read there: p at every
    node, or at T = 0, where p is one-hot, only its token (F numbers, not F x V), and the
    target's entropies."""

    def __init__(self, target: Transformer, tree: Tree, h: torch.Tensor, sampling: Sampling):
        nodes = [i for i in range(len(tree)) if tree.first[i] == i]
        logits = target.head(h[nodes]).float()                               # (F, V)
        p = logits_to_probs(logits, sampling.temperature, sampling.top_p)    # (F, V)
        self.greedy, self.V = sampling.temperature == 0, p.shape[-1]
        # a one-hot row is its token (a token id < 2^24 is exact in fp32: one copy holds both)
        rows = p.argmax(-1, keepdim=True).float() if self.greedy else p      # (F, 1) or (F, V)
        h_target = entropy(torch.log_softmax(logits, -1))                    # (F,)
        host = torch.cat([rows, h_target[:, None]], dim=1).cpu()             # the one copy
        self.p, self.h_target = host[:, :-1], host[:, -1].tolist()
        self.row = {i: r for r, i in enumerate(nodes)}

    def __call__(self, i: int):
        if not self.greedy:
            return self.p[self.row[i]].clone()
        p = torch.zeros(self.V)                                              # (V,) one-hot
        p[int(self.p[self.row[i], 0])] = 1
        return p

    def entropies(self, nodes: list[int]) -> list[float]:
        return [self.h_target[self.row[i]] for i in nodes]


def lazy_head(device) -> bool:
    """The LM head per visited node (`TargetHead`: on a CPU, N rows cost N times one) or on
    every node at once with one host copy (`HostHead`: on a GPU)."""
    return torch.device(device).type != "cuda"


def target_head(verifier, tree: Tree, h: torch.Tensor, sampling: Sampling):
    """p_at for the verifiers on the verifier's device: `TargetHead` or `HostHead`."""
    head = TargetHead if lazy_head(verifier.device) else HostHead
    return head(verifier.target, tree, h, sampling)


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
    Returns (tree, features (N, H), p_at, path, x, rejected, seconds drafting): timed without a
    synchronising `clock`, as the drafting is done on the device too once its tree is on the
    host (the tree's token ids are host numbers)."""
    t0 = time.perf_counter()
    tree = policy.draft(states, verifier.target, root_token, compose)
    t1 = time.perf_counter()
    h = verifier.score(tree)                                                  # (N, H)
    p_at = target_head(verifier, tree, h, sampling)
    return (tree, h, p_at, *verify_tree(tree, p_at, rng, trace), t1 - t0)


def speculative_chain(state: DraftState, verifier, root_token: int, length: int,
                      sampling: Sampling, rng: RandomSource, trace=None):
    """One call of classic speculative sampling (eqs. 1-2, gpt-fast's `speculative_decode`): a
    chain of `length` tokens sampled from q, scored by the target in one call, accepted while
    u < p / q. Returns what `speculative_tree` does (each token drawn is a host number, so the
    drafting is done when timed)."""
    t0 = time.perf_counter()
    tree, q = draft_chain(state, verifier.target, root_token, length, sampling.temperature,
                          sampling.top_p, rng)
    t1 = time.perf_counter()
    h = verifier.score(tree)             # (N, H); an untagged tree's nodes are drafter 0's
    p_at = target_head(verifier, tree, h, sampling)
    q = q if isinstance(p_at, TargetHead) else q.cpu()                    # beside p
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
        t0 = time.perf_counter()   # no wait: the last call ended on the synchronising clock below
        if shape.chain:
            call = speculative_chain(states[0], verifier, x, shape.depth + 1, sampling, rng, trace)
        else:
            call = speculative_tree(tree, states, verifier, x, compose, sampling, rng, trace)
        drafted, h, p_at, path, x, rejected, draft_s = call
        verifier.keep(path)   # the accepted path's keys and values stay, the rest are dropped
        seconds = clock(verifier.device) - t0   # the call's one synchronising clock (on CUDA)
        tree.record(drafted, len(path) - 1, seconds)
        # emit the accepted tokens and the verifier's own; extend the drafters with them
        new = [drafted.tokens[i] for i in path[1:]] + [x]
        emitted, done = _emit(out, new, sampling)
        stats.record(drafted, path, rejected, p_at.entropies, emitted, draft_s, seconds - draft_s)
        if trace is not None:
            trace.call(drafted, path, new[:emitted], draft_s, seconds - draft_s)
        for s in states:   # the accepted tokens, with the target's features at their parents
            s.extend(torch.tensor(new, device=verifier.device), h[path])
    stats.new_tokens = len(out) - 1
    return out, stats


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    from extras.autotree import TREES, AutoTree, load_for   # --tree auto, --dtype auto
    from extras.checkpoint import load_drafter, target_args
    from extras.runtime import (DTYPES, Parser, add_fields, check_device, check_files,
                                check_flags, check_tree_flags, default_device,
                                one_line_errors, refuse_idle)
    from extras.trace import Trace, check_destinations, save, show   # --show, --trace(-html)
    ap = Parser(description="Speculative decoding with EAGLE drafters (lossless: the reply is "
                            "distributed exactly as the target's own).")
    ap.add_argument("--prompt", required=True, help="user message to answer")
    ap.add_argument("--drafter", action="append", required=True, metavar="CKPT",
                    help="drafter checkpoint, or 'random' for an untrained one; repeat to compose")
    ap.add_argument("--compose", default="single", choices=sorted(COMPOSE))
    ap.add_argument("--chain", action="store_true", help="chain speculative sampling, no tree")
    ap.add_argument("--target", help="HF checkpoint directory (default: the embedded default)")
    add_fields(ap, Sampling, "temperature", "top_p", "max_new_tokens")
    ap.add_argument("--tree", choices=TREES, default="auto",
                    help="auto (default): sized each call for this machine (AutoTree, calibrated "
                         "once); study: the fixed --total-tokens/--depth/--top-k tree")
    add_fields(ap, TreeShape, "total_tokens", "depth", "top_k")
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
        refuse_idle(ap, args, idle, *(
            ("with --chain (it drafts --depth + 1 tokens)",) if args.chain else
            ("with --tree auto (the default)", "add --tree study to use the fixed tree")))
        if args.temperature == 0:
            refuse_idle(ap, args, {"--top-p"}, "at --temperature 0 (greedy)")
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
                    else load_drafter(d, target) for i, d in enumerate(args.drafter)]
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
