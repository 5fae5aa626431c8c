"""Exact losslessness of taps' verifiers: rational arithmetic, every random outcome enumerated.

The code under test is the real `taps.verify_tree` / `taps.verify_chain` (the same functions the
torch path calls), fed numpy arrays of `Fraction`s and a random source that, instead of drawing,
branches over all outcomes with their exact weights. On tiny vocabularies (V <= 4) with random
rational target tables and random draft trees, the distribution of the first n emitted tokens
must equal the target's exactly. Known-wrong variants, built as small changes in this file, must
be rejected by the same check.
"""
import random
from fractions import Fraction
from functools import partial

import numpy as np
from hypothesis import given, settings, strategies as st

import taps
from conftest import (EXACT_CASES, drafts, frac_vector, keep_longer, lossless, node_tokens,
                      outcomes, rejected_somewhere, tree_call)
from taps import Tree, verify_chain, verify_tree


# --------------------------------------------------------------------- one verifier call per scheme


def scheme(name, target, seed):
    V = target.V

    def step(ctx, rng):
        if name == "tree":
            return tree_call(target, drafts(seed, V, ctx)[0], ctx, rng)
        if name == "merged":
            return tree_call(target, taps.merge(drafts(seed, V, ctx, 2)), ctx, rng)
        # pick one of two trees by draft confidence: draft-side only, still exact
        if name == "routed":
            return tree_call(target, taps.route(drafts(seed, V, ctx, 2)), ctx, rng)
        if name == "raw_bonus":    # WRONG: the bonus token at a leaf drawn without temperature
            tree = drafts(seed, V, ctx)[0]
            leaves = {i for i in range(len(tree)) if not tree.children[i]}
            p_at = lambda node: (target.raw if node in leaves
                                 else target.p)(ctx + node_tokens(tree, node))
            return tree_call(target, tree, ctx, rng, p_at)
        if name == "chain":
            return chain_call(target, seed, ctx, rng)
        raise ValueError(name)
    return step


def chain_call(target, seed, ctx, rng):
    """Classic speculative sampling: draw a chain x_i ~ q_i from random rational draft tables,
    verify."""
    V = target.V
    length = random.Random(f"len {seed} {ctx}").randint(1, 3)
    tokens, q = [ctx[-1]], []
    for _ in range(length):
        q.append(frac_vector(random.Random(f"q {seed} {ctx} {tokens}"), V))
        tokens.append(rng.categorical(q[-1]))
    path, x, _ = verify_chain(tokens, q, lambda i: target.p(ctx + tuple(tokens[1:i + 1])), rng)
    return tuple(tokens[i] for i in path[1:]) + (x,)


# ----------------------------------------------------------------------------- tests

@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["tree", "merged", "routed", "chain"]), **EXACT_CASES)
def test_every_verifier_scheme_is_exactly_lossless(name, V, seed, n, half_temperature):
    assert lossless(partial(scheme, name), V, seed, n, half_temperature)


def test_duplicate_sibling_is_never_accepted():
    p = np.array([Fraction(1, 2), Fraction(1, 3), Fraction(1, 6)], dtype=object)
    tree = Tree([0, 1, 1, 2], [None, 0, 0, 0], [0.0] * 4, [None] + [0.0] * 3)
    dist = outcomes(lambda rng: tuple(verify_tree(tree, lambda node: p.copy(), rng)[0]))
    assert all(2 not in path for path in dist)
    assert dist[(0, 1)] == Fraction(1, 3)
    # and the first emitted token is distributed exactly as p
    tokens = outcomes(lambda rng: tree_call(None, tree, (), rng, lambda node: p.copy())[0])
    assert tokens == {0: Fraction(1, 2), 1: Fraction(1, 3), 2: Fraction(1, 6)}


def test_keeping_the_longer_of_two_verified_trees_is_caught():
    assert rejected_somewhere(keep_longer)


def test_negative_control_bonus_without_temperature():
    raw_bonus = partial(scheme, "raw_bonus")
    assert rejected_somewhere(raw_bonus, half_temperature=True)
    assert not rejected_somewhere(raw_bonus, half_temperature=False, tries=5)  # harmless at T = 1


def test_negative_control_unnormalised_residual(monkeypatch):
    def residual(r, x):  # WRONG: zero the rejected token but do not renormalise
        r[x] = 0
        return r
    monkeypatch.setattr(taps, "residual", residual)
    assert rejected_somewhere(partial(scheme, "tree"))
