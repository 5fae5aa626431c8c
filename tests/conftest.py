"""Shared test builders: the one-thread fixture, tiny random targets and drafters, prompts, and the
two tools every losslessness test uses -- exact enumeration with Fractions (`outcomes`, `Target`,
`spec_dist`: the real verifiers fed rational tables and a random source that branches over every
outcome; `lossless` and `EXACT_CASES` the check itself, `rejected_somewhere` and `keep_longer` its
negative controls) and the Monte Carlo check of the real torch path (`exact_first_tokens`,
`chi_square_p`, `broken_sampling` for the negative controls)."""
import copy
import random
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from model import ModelArgs, Transformer, logits_to_probs
import taps
from taps import Drafter, Tree, verify_tree

DEVICES = ["cpu",
           pytest.param("cuda",
                        marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                 reason="no CUDA device"))]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
    OpenMP workers make these tests ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------ tiny targets and drafters

def tiny(V=64, n_layers=2, seed=0, dtype=torch.float64, device="cpu", dim=64, tie=False, name="",
         **kw):
    """A random Llama with 4 query and 2 key/value heads; extra ModelArgs fields in kw."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=V,
                     hidden_dim=128, tie_embeddings=tie, name=name, **kw)
    return Transformer(args).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def near_oracle(target: Transformer) -> Drafter:
    """A drafter that nearly *is* a one-layer target, so that drafts are often accepted.

    With unit-RMS embeddings the target's input norm is the identity, so fc = [I, 0] and a copy of
    the target's layer compute its pre-norm feature (rotary is relative, so the drafter's position
    offset of one does not matter); only the first prompt token, which the drafter never sees, and
    the missing final norm (a per-token temperature) differ.
    """
    assert target.args.n_layers == 1
    e = target.embed_tokens.weight
    e /= e.pow(2).mean(-1, keepdim=True).sqrt()
    d = Drafter.for_target(target)
    H = target.args.dim
    d.fc.weight.zero_()
    d.fc.bias.zero_()
    d.fc.weight[:, :H] = torch.eye(H)
    d.layers[0].load_state_dict({k: v for k, v in target.layers[0].state_dict().items()
                                 if not k.startswith("input_layernorm")})
    return d


def sharper(drafter: Drafter, factor: float) -> Drafter:
    """A copy of drafter whose draft logits are multiplied by factor: the same ranking of tokens,
    more confident for factor > 1, flatter for factor < 1 (0: uniform)."""
    out = copy.deepcopy(drafter)
    out.head = lambda target, h: factor * Drafter.head(out, target, h)
    return out


def prompts(V, n=4, length=7):
    g = torch.Generator().manual_seed(123)
    return [torch.randint(V, (length + i,), generator=g).tolist() for i in range(n)]


# -------------------------------------------------------------------- exact enumeration (Fractions)

class Enumerator:
    """A RandomSource that follows a script of choice indices (0 beyond its end) and keeps the
    exact probability of the choices it made; zero-weight outcomes are never offered."""

    def __init__(self, script):
        self.script, self.sizes, self.weight, self.i = list(script), [], Fraction(1), 0

    def _choose(self, options):
        options = [(v, w) for v, w in options if w > 0]
        if self.i == len(self.script):
            self.script.append(0)
        self.sizes.append(len(options))
        value, w = options[self.script[self.i]]
        self.i += 1
        self.weight *= w
        return value

    def bernoulli(self, prob):
        prob = Fraction(prob)
        return self._choose([(True, prob), (False, 1 - prob)])

    def categorical(self, probs):
        total = sum(probs)
        return self._choose([(i, Fraction(w) / total) for i, w in enumerate(probs)])


def outcomes(run) -> dict:
    """The exact distribution of run(rng) over every sequence of random draws (depth-first)."""
    dist, todo = defaultdict(Fraction), [[]]
    while todo:
        script = todo.pop()
        rng = Enumerator(script)
        result = run(rng)
        dist[result] += rng.weight
        # draws made by default: queue their other options
        for j in range(len(script), len(rng.script)):
            todo += [rng.script[:j] + [c] for c in range(1, rng.sizes[j])]
    assert sum(dist.values()) == 1
    return dict(dist)


def frac_vector(rnd: random.Random, V: int, zeros=True):
    w = [rnd.randint(0 if zeros else 1, 3) for _ in range(V)]
    if not any(w):
        w[rnd.randrange(V)] = 1
    return np.array([Fraction(x, sum(w)) for x in w], dtype=object)


class Target:
    """p(. | context) for every context over V tokens: random rationals with zeros, memoised.
    `raw` is the model's distribution; `p` the processed one at temperature T (T = 1/2 squares and
    renormalises, staying rational)."""

    def __init__(self, V, seed, half_temperature=False):
        self.V, self.seed, self.half = V, seed, half_temperature
        self.table = {}

    def raw(self, ctx):
        if ctx not in self.table:
            self.table[ctx] = frac_vector(random.Random(f"target {self.seed} {ctx}"), self.V)
        return self.table[ctx].copy()

    def p(self, ctx):
        r = self.raw(ctx)
        if self.half:
            r = r * r
            r = r / r.sum()
        return r

    def dist(self, ctx, n) -> dict:
        """Exact distribution of the next n tokens sampled from p."""
        if n == 0:
            return {(): Fraction(1)}
        out = {}
        p = self.p(ctx)
        for x in range(self.V):
            if p[x]:
                for rest, w in self.dist(ctx + (x,), n - 1).items():
                    out[(x,) + rest] = p[x] * w
        return out


def random_tree(rnd: random.Random, V, root, max_nodes=8, max_depth=4) -> Tree:
    """A random draft tree; with V <= 4 duplicate siblings are common."""
    tokens, parents, logq, depth = [root], [None], [0.0], [0]
    for _ in range(rnd.randint(0, max_nodes)):
        parent = rnd.choice([i for i in range(len(tokens)) if depth[i] < max_depth])
        tokens.append(rnd.randrange(V))
        parents.append(parent)
        logq.append(logq[parent] - rnd.random() * 2)
        depth.append(depth[parent] + 1)
    return Tree(tokens, parents, logq, [None] + [0.0] * (len(tokens) - 1))


def entropies_of(logits: dict):
    """`Stats.record`'s target entropies from node -> target logits, as `TargetHead.entropies`
    reads its own."""
    return lambda nodes: taps.entropy(
        torch.log_softmax(torch.stack([logits[i] for i in nodes]), -1)).tolist()


def node_tokens(tree, node):
    """Tokens on the path root -> node, the root excluded."""
    out = []
    while node:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return tuple(out[::-1])


def drafts(seed, V, ctx, n=1):
    """n draft trees as a function of the context only (the draft side sees nothing else)."""
    rnd = random.Random(f"draft {seed} {ctx}")
    return [random_tree(rnd, V, ctx[-1]) for _ in range(n)]


def tree_call(target, tree, ctx, rng, p_at=None):
    p_at = p_at or (lambda node: target.p(ctx + node_tokens(tree, node)))
    path, x, _ = verify_tree(tree, p_at, rng)
    return tuple(tree.tokens[i] for i in path[1:]) + (x,)


def spec_dist(step, ctx, n, memo=None) -> dict:
    """Exact distribution of the first n tokens emitted by repeated verifier calls from ctx."""
    memo = {} if memo is None else memo
    if n == 0:
        return {(): Fraction(1)}
    if (ctx, n) not in memo:
        out = defaultdict(Fraction)
        for emitted, w in outcomes(lambda rng: step(ctx, rng)).items():
            emitted = emitted[:n]
            for rest, w2 in spec_dist(step, ctx + emitted, n - len(emitted), memo).items():
                out[emitted + rest] += w * w2
        memo[(ctx, n)] = dict(out)
    return memo[(ctx, n)]


# what every exactness test draws: a tiny vocabulary, any seed, 1-3 emitted tokens, T = 1 or 1/2
EXACT_CASES = dict(V=st.integers(2, 4), seed=st.integers(0, 10**9), n=st.integers(1, 3),
                   half_temperature=st.booleans())


def lossless(scheme, V, seed, n, half_temperature=False, dist=spec_dist) -> bool:
    """Are the first n tokens emitted from a one-token context by repeated verifier calls
    `scheme(target, seed)(ctx, rng)` distributed exactly as the target's? (`dist` reads that
    distribution from the calls: spec_dist, or another way to the same figures.)"""
    target = Target(V, seed, half_temperature)
    ctx = (seed % V,)
    return dist(scheme(target, seed), ctx, n) == target.dist(ctx, n)


def rejected_somewhere(scheme, half_temperature=False, tries=30, dist=spec_dist) -> bool:
    """A negative control's check: does `lossless` find scheme wrong for some seed (V = 3, n =
    2)?"""
    return any(not lossless(scheme, 3, seed, 2, half_temperature, dist) for seed in range(tries))


def keep_longer(target, seed):
    """WRONG, the negative control of every multi-drafter scheme: verify two drafters' trees and
    keep the longer result (each tree alone is exact; choosing among them after the draws is
    not)."""
    return lambda ctx, rng: max((tree_call(target, t, ctx, rng)
                                 for t in drafts(seed, target.V, ctx, 2)), key=len)


# --------------------------------------------------------------- Monte Carlo of the real torch path

def exact_first_tokens(target, prompt, n, temperature=1.0, top_p=1.0):
    """The target's exact distribution of its first n tokens after temperature and top-p (V^n
    sequences)."""
    V = target.args.vocab_size
    dist = {(): 1.0}
    for _ in range(n):
        seqs = list(dist)
        with torch.inference_mode():
            logits, _ = target(torch.tensor([prompt + list(s) for s in seqs],
                                            device=target.embed_tokens.weight.device))
        p = logits_to_probs(logits[:, -1].double().cpu(), temperature, top_p)
        dist = {s + (x,): dist[s] * p[i, x].item()
                for i, s in enumerate(seqs) for x in range(V) if p[i, x] > 0}
    return dist


def chi_square_p(counts: Counter, expected: dict, n: int) -> float:
    """Pearson chi-square p-value; cells with expectation < 5 are pooled into one. An outcome the
    target gives probability 0 (e.g. a token top-p removed) is impossible: p-value 0."""
    if any(c and expected.get(k, 0) == 0 for k, c in counts.items()):
        return 0.0
    small = [k for k in expected if expected[k] * n < 5]
    cells = [([k], expected[k]) for k in expected if k not in small]
    if small:
        cells.append((small, sum(expected[k] for k in small)))
    stat = sum((sum(counts[k] for k in ks) - n * e) ** 2 / (n * e) for ks, e in cells)
    df = len(cells) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


def broken_sampling(monkeypatch, **wrong):
    """A deliberately wrong verifier: its p is processed with other sampling arguments (e.g.
    temperature)."""
    import taps
    real = taps.logits_to_probs
    monkeypatch.setattr(taps, "logits_to_probs", lambda logits, temperature, top_p: real(
        logits, wrong.get("temperature", temperature), wrong.get("top_p", top_p)))


def count_second_copies(monkeypatch) -> list[bool]:
    """Wrap taps.verify_tree so that `generate` records, per verifier call, whether the accepted
    path ran through a second copy of a token path (a merged tree's trie walk, not a first-copy
    walk)."""
    seen, verify = [], taps.verify_tree

    def counting(tree, p_at, rng, trace=None):
        path, x, rejected = verify(tree, p_at, rng, trace)
        seen.append(any(tree.first[i] != i for i in path))
        return path, x, rejected
    monkeypatch.setattr(taps, "verify_tree", counting)
    return seen
