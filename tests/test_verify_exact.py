"""Exact losslessness of taps' verifiers, with rational arithmetic and every random outcome enumerated.

The code under test is the real `taps.verify_tree` / `taps.verify_chain` (the same functions the
torch path calls), fed numpy arrays of `Fraction`s and a random source that, instead of drawing,
branches over all outcomes with their exact weights. On tiny vocabularies (V <= 4) with random
rational target tables and random draft trees, the distribution of the first n emitted tokens
must equal the target's exactly. Known-wrong variants, built as small changes in this file, must
be rejected by the same check.
"""
import random
from collections import defaultdict
from fractions import Fraction

import numpy as np
from hypothesis import given, settings, strategies as st

import taps
from taps import Tree, verify_chain, verify_tree


# ----------------------------------------------------------------------------- exact enumeration

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
        for j in range(len(script), len(rng.script)):  # draws made by default: queue their other options
            todo += [rng.script[:j] + [c] for c in range(1, rng.sizes[j])]
    assert sum(dist.values()) == 1
    return dict(dist)


# ----------------------------------------------------------------------------- random rational models

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
    tree = Tree([root], [-1], [0.0], [0.0])
    depth = [0]
    for _ in range(rnd.randint(0, max_nodes)):
        parent = rnd.choice([i for i in range(len(tree)) if depth[i] < max_depth])
        tree.tokens.append(rnd.randrange(V))
        tree.parents.append(parent)
        tree.logq.append(tree.logq[parent] - rnd.random() * 2)
        tree.entropy.append(0.0)
        depth.append(depth[parent] + 1)
    return tree


def node_tokens(tree, node):
    """Tokens on the path root -> node, the root excluded."""
    out = []
    while node:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return tuple(out[::-1])


# ----------------------------------------------------------------------------- one verifier call per scheme

def drafts(seed, V, ctx, n=1):
    """n draft trees as a function of the context only (the draft side sees nothing else)."""
    rnd = random.Random(f"draft {seed} {ctx}")
    return [random_tree(rnd, V, ctx[-1]) for _ in range(n)]


def tree_call(target, tree, ctx, rng, p_at=None):
    p_at = p_at or (lambda node: target.p(ctx + node_tokens(tree, node)))
    path, x, _ = verify_tree(tree, p_at, rng)
    return tuple(tree.tokens[i] for i in path[1:]) + (x,)


def scheme(name, target, seed):
    V = target.V

    def step(ctx, rng):
        if name == "tree":
            return tree_call(target, drafts(seed, V, ctx)[0], ctx, rng)
        if name == "merged":
            return tree_call(target, taps.merge(drafts(seed, V, ctx, 2)), ctx, rng)
        if name == "routed":      # pick one of two trees by draft confidence: draft-side only, still exact
            return tree_call(target, taps.route(drafts(seed, V, ctx, 2)), ctx, rng)
        if name == "keep_longer":  # WRONG: verify both trees and keep the longer result
            results = [tree_call(target, t, ctx, rng) for t in drafts(seed, V, ctx, 2)]
            return max(results, key=len)
        if name == "raw_bonus":    # WRONG: the bonus token at a leaf drawn without temperature
            tree = drafts(seed, V, ctx)[0]
            leaves = {i for i in range(len(tree)) if not tree.children()[i]}
            p_at = lambda node: (target.raw if node in leaves else target.p)(ctx + node_tokens(tree, node))
            return tree_call(target, tree, ctx, rng, p_at)
        if name == "chain":
            return chain_call(target, seed, ctx, rng)
        raise ValueError(name)
    return step


def chain_call(target, seed, ctx, rng):
    """Classic speculative sampling: draw a chain x_i ~ q_i from random rational draft tables, verify."""
    V = target.V
    length = random.Random(f"len {seed} {ctx}").randint(1, 3)
    tokens, q = [ctx[-1]], []
    for _ in range(length):
        q.append(frac_vector(random.Random(f"q {seed} {ctx} {tokens}"), V))
        tokens.append(rng.categorical(q[-1]))
    path, x, _ = verify_chain(tokens, q, lambda i: target.p(ctx + tuple(tokens[1:i + 1])), rng)
    return tuple(tokens[i] for i in path[1:]) + (x,)


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


def lossless(name, V, seed, n, half_temperature):
    target = Target(V, seed, half_temperature)
    ctx = (seed % V,)
    return spec_dist(scheme(name, target, seed), ctx, n) == target.dist(ctx, n)


# ----------------------------------------------------------------------------- tests

cases = dict(V=st.integers(2, 4), seed=st.integers(0, 10**9), n=st.integers(1, 3), half_temperature=st.booleans())


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["tree", "merged", "routed", "chain"]), **cases)
def test_exactly_lossless(name, V, seed, n, half_temperature):
    assert lossless(name, V, seed, n, half_temperature)


def test_duplicate_sibling_is_never_accepted():
    p = np.array([Fraction(1, 2), Fraction(1, 3), Fraction(1, 6)], dtype=object)
    tree = Tree([0, 1, 1, 2], [-1, 0, 0, 0], [0.0] * 4, [0.0] * 4)
    dist = outcomes(lambda rng: tuple(verify_tree(tree, lambda node: p.copy(), rng)[0]))
    assert all(2 not in path for path in dist)
    assert dist[(0, 1)] == Fraction(1, 3)
    # and the first emitted token is distributed exactly as p
    tokens = outcomes(lambda rng: tree_call(None, tree, (), rng, lambda node: p.copy())[0])
    assert tokens == {0: Fraction(1, 2), 1: Fraction(1, 3), 2: Fraction(1, 6)}


def rejected_somewhere(name, half_temperature=False, tries=30):
    return any(not lossless(name, V=3, seed=seed, n=2, half_temperature=half_temperature) for seed in range(tries))


def test_negative_control_keep_longer():
    assert rejected_somewhere("keep_longer")


def test_negative_control_bonus_without_temperature():
    assert rejected_somewhere("raw_bonus", half_temperature=True)
    assert not rejected_somewhere("raw_bonus", half_temperature=False, tries=5)  # harmless at T = 1


def test_negative_control_unnormalised_residual(monkeypatch):
    def residual(r, x):  # WRONG: zero the rejected token but do not renormalise
        r[x] = 0
        return r
    monkeypatch.setattr(taps, "residual", residual)
    assert rejected_somewhere("tree")
