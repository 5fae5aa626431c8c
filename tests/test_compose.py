"""Composing specialist drafters (taps.py's composition section): merged-tree packing against
hand-built trees, the de-duplicated trie, weight averaging at the endpoints, routing by draft-side
quantities, exact losslessness of the real composition functions, greedy equivalence, bad input."""
import dataclasses
import json
import math
import random
from functools import partial

import pytest
import torch
from hypothesis import given, settings, strategies as st

import eval as ev
import extras.autotree
import extras.report as report
from extras.autotree import AutoTree, verify_table
from model import TapsError, generate_plain
from taps import (COMPOSE, Drafter, Sampling, Stats, TorchRandom, Tree, TreeShape, average,
                  generate, merge, prune, route, route_entropy, tag, verify_tree)
from conftest import (EXACT_CASES, Target, drafts, entropies_of, lossless, near_oracle, node_tokens,
                      outcomes, prompts, sharper, tiny, tree_call)
from test_eval import setup  # noqa: F401 -- eval.py's tiny setup (a fixture)

# who drafted a node (`Tree.origin`), and whose nodes a call verified (`Stats.routed`)
NONE, D0, D1, BOTH = frozenset(), frozenset({0}), frozenset({1}), frozenset({0, 1})


def small_trees():
    #  a: 0 -> 1 (x=5) -> 2 (x=6)        b: 0 -> 1 (x=5) -> 3 (x=7)
    #           \\-> 3 (x=8)                    \\-> 2 (x=9)
    a = tag(Tree([4, 5, 6, 8], [None, 0, 1, 0], [0, -0.5, -1.0, -2.0], [None, 1.0, 0.5, 1.0]), 0)
    b = tag(Tree([4, 5, 9, 7], [None, 0, 0, 1], [0, -0.2, -3.0, -0.4], [None, 2.0, 2.0, 0.1]), 1)
    return a, b


# ----------------------------------------------------------------------------- merged trees

def test_a_merged_tree_keeps_each_subtree_mask():
    a, b = small_trees()
    m = merge([a, b])
    # root, a's non-root nodes (1..3), b's non-root nodes (4..6) with parents offset by 3
    assert m.tokens == (4, 5, 6, 8, 5, 9, 7)
    assert m.parents == (None, 0, 1, 0, 0, 0, 4)
    assert m.origin == (NONE, D0, D0, D0, D1, D1, D1)
    assert m.logq == (0, -0.5, -1.0, -2.0, -0.2, -3.0, -0.4)
    assert m.depths == (0, 1, 2, 1, 1, 1, 2)        # verifier positions: prefix length + depth
    T, F = True, False
    assert m.mask.tolist() == [
        [T, F, F, F, F, F, F],
        [T, T, F, F, F, F, F],
        [T, T, T, F, F, F, F],
        [T, F, F, T, F, F, F],
        [T, F, F, F, T, F, F],
        [T, F, F, F, F, T, F],
        [T, F, F, F, T, F, T]]
    # path (retrieve) indices: a's as they were, b's offset by len(a) - 1
    assert ([m.path_to(leaf) for leaf, kids in enumerate(m.children) if not kids]   # by leaf index
            == [[0, 1, 2], [0, 3], [0, 5], [0, 4, 6]])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(2, 4))
def test_merged_mask_is_block_diagonal_as_in_the_study(seed, k):
    """The study's _merge_trees: [root | tree 1 | tree 2 ...], each block its own tree's mask,
    column 0 visible to all, nothing across blocks; positions are each tree's own."""
    trees = drafts(seed, 4, (1,), k)
    m = merge(trees)
    n = len(m)
    expect = torch.zeros(n, n, dtype=torch.bool)
    expect[:, 0] = True
    pos, at = [0], 1
    for t in trees:
        s = len(t) - 1
        expect[at:at + s, at:at + s] = t.mask[1:, 1:]
        pos += t.depths[1:]
        at += s
    assert torch.equal(m.mask, expect)
    assert m.depths == tuple(pos)
    assert len(m) == 1 + sum(len(t) - 1 for t in trees)


def token_paths(tree):
    return {node_tokens(tree, i) for i in range(len(tree))}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(1, 4), V=st.integers(2, 4))
def test_dedup_merge_is_the_trie_of_all_paths(seed, k, V):
    trees = drafts(seed, V, (0,), k)
    d = merge(trees, dedup=True)
    every = set().union(*(token_paths(t) for t in trees))
    assert token_paths(d) == every                   # every input path kept, no new one made
    assert len(d) == len(every)                       # one node per distinct path: a trie
    assert all(0 <= d.parents[i] < i for i in range(1, len(d)))
    for kids in d.children:
        assert len({d.tokens[c] for c in kids}) == len(kids)   # no duplicate siblings left
    assert len(d) <= len(merge(trees))


def test_dedup_merge_by_hand_marks_shared_nodes():
    a, b = small_trees()
    d = merge([a, b], dedup=True)
    # b's 5 is a's node 1 (now drafted by both), b's 7 hangs under it, b's 9 is new
    assert d.tokens == (4, 5, 6, 8, 9, 7) and d.parents == (None, 0, 1, 0, 0, 1)
    assert d.origin == (NONE, BOTH, D0, D0, D1, D1) and d.logq == (0, -0.5, -1.0, -2.0, -3.0, -0.4)
    assert merge([a, tag(Tree(*[list(x) for x in (b.tokens, b.parents, b.logq, b.entropy)]), 0)],
                 dedup=True).origin[1] == D0


def greedy_next(V, seed, path):
    """A deterministic 'target': the token that follows a token path."""
    return random.Random(f"{seed} {path}").randrange(V)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(2, 3), V=st.integers(2, 3))
def test_merged_at_temperature_0_accepts_the_longest_matching_path(seed, k, V):
    """Greedy: a merged tree accepts the longest input path that matches the target -- the study's
    rule (EAGLE's evaluate_posterior takes the best of all candidate paths) -- plain or as a trie,
    also where two drafters' copies of one token path hold different continuations."""
    trees = drafts(seed, V, (0,), k)
    greedy = [()]
    while greedy[-1] in set().union(*(token_paths(t) for t in trees)):
        greedy.append(greedy[-1] + (greedy_next(V, seed, greedy[-1]),))
    best = greedy[-1]                      # the longest matching path plus the target's next token

    def one_hot(tree, node):
        p = torch.zeros(V, dtype=torch.float64)
        p[greedy_next(V, seed, node_tokens(tree, node))] = 1
        return p

    def emitted(tree):
        path, x, _ = verify_tree(tree, lambda node: one_hot(tree, node), TorchRandom(0))
        # a real root-to-node chain
        assert all(tree.parents[b] == a for a, b in zip(path, path[1:]))
        return tuple(tree.tokens[i] for i in path[1:]) + (x,)
    assert emitted(merge(trees, dedup=True)) == best
    assert emitted(merge(trees)) == best


def test_merged_follows_the_second_copy_of_an_accepted_token():
    """By hand: both drafters propose 5; only b continues with the target's 7 under it. The first
    copy of 5 is accepted; the verifier must still try b's 7 (what a first-copy-only walk misses),
    and the statistics must find the target's logits of that path where the verifier computed
    them."""
    a, b = small_trees()
    m = merge([a, b])                                   # tokens [4, 5, 6, 8, 5, 9, 7]

    class Script:                                       # accepts 5 and 7 only
        def bernoulli(self, p):
            return bool(p > 0.5)

        def categorical(self, r):
            return int(r.argmax())

    # what the verifier computed, as TargetHead keeps it
    logits = {}

    def p_at(node):
        logits[node] = torch.zeros(12)
        p = torch.zeros(12)
        p[{(): 5, (5,): 7}.get(node_tokens(m, node), 0)] = 1
        return p
    path, x, rejected = verify_tree(m, p_at, Script())
    assert path == [0, 4, 6] and x == 0 and [m.tokens[i] for i in rejected] == [6]
    # the statistics see one trie: 7 is a leaf, a's 6 (under the other copy of 5) was judged and
    # rejected; 5 was accepted at its first copy, a's (node 1), though the path runs through b's
    # copy (node 4): a is credited, and the draft entropy is a's 1.0 at 5, as the trie merged-dedup
    # builds holds them
    s = Stats()
    s.record(m, path, rejected, entropies_of(logits), 3, 0.0, 0.0)
    assert s.leaf == [True] and s.accepted_from == [D0]
    assert s.draft_entropy_accepted == [1.0, 0.1] and s.draft_entropy_rejected == [0.5]
    assert len(s.target_entropy_accepted) == 2 and len(s.target_entropy_rejected) == 1


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**9), k=st.integers(2, 3), V=st.integers(2, 4), half=st.booleans())
def test_a_merged_tree_is_verified_exactly_as_its_trie(seed, k, V, half):
    """Outcome by outcome of every random draw (not only in distribution): the plain merged tree and
    its de-duplicated trie try the same tokens in the same order and emit the same tokens."""
    target, ctx = Target(V, seed, half), (seed % V,)
    trees = drafts(seed, V, ctx, k)

    def run(tree):
        def call(rng):
            p_at = lambda node: target.p(ctx + node_tokens(tree, node))
            path, x, rejected = verify_tree(tree, p_at, rng)
            return node_tokens(tree, path[-1]) + (x,), tuple(tree.tokens[i] for i in rejected)
        return outcomes(call)
    assert run(merge(trees)) == run(merge(trees, dedup=True))


def test_a_duplicate_sibling_is_skipped_not_rejected():
    """Two drafters proposing the same token under one parent: the second copy has r(s) = 0 after
    the first is rejected; verification skips it (no draw), so it is not a rejected token in the
    statistics."""
    a, b = small_trees()                       # both propose 5 under the root
    m = merge([a, b])

    # rejects every proposal, then takes the most likely token
    class Rejecting:
        draws = 0

        def bernoulli(self, p):
            self.draws += 1
            return False

        def categorical(self, r):
            return int(r.argmax())

    rng = Rejecting()
    path, x, rejected = verify_tree(m, lambda i: torch.full((12,), 1 / 12), rng)
    tokens = [m.tokens[i] for i in rejected]
    assert path == [0] and sorted(tokens) == [5, 8, 9] and rng.draws == 3


def test_dedup_of_identical_trees_is_a_merged_call():
    a, _ = small_trees()
    s = Stats()
    b = tag(Tree(list(a.tokens), list(a.parents), list(a.logq), list(a.entropy)), 1)
    s.record(merge([a, b], dedup=True), [0], [], entropies_of({}), 1, 0.0, 0.0)
    assert s.routed == [BOTH]


def test_routed_names_the_drafter_several_or_none():
    """Stats.routed per call: the drafter whose tree was verified; several drafters' nodes (a merged
    tree); none: the root alone (a plain step, or every tree cut to its root). Before issue 30 the
    root alone was read as 'several drafters'."""
    a, b = small_trees()
    s = Stats()
    for tree in (a, b, merge([a, b]), merge([a, b], dedup=True), merge([prune(a, 1), b]),
                 Tree([4], [None], [0.0], [None]), merge([prune(a, 1), prune(b, 1)])):
        s.record(tree, [0], [], entropies_of({}), 1, 0.0, 0.0)
    assert s.routed == [D0, D1, BOTH, BOTH, D1, NONE, NONE]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**9), k=st.integers(2, 3), V=st.integers(2, 4))
def test_a_merged_call_is_credited_where_its_acceptance_was_decided(seed, k, V):
    """Outcome by outcome: the statistics of a merged call are those of its trie's first copies,
    where verify_tree decided each acceptance -- accepted_from credits the first drafter holding the
    first accepted token (not the copy the final path runs through), and the draft entropies are the
    first copy's. So a plain merged tree and its de-duplicated trie record the same call, except
    that a united node of several drafters is credited to them all."""
    target, ctx = Target(V, seed), (seed % V,)
    rnd = random.Random(seed)
    trees = [tag(t, i) for i, t in enumerate(drafts(seed, V, ctx, k))]
    trees = [dataclasses.replace(t, entropy=[None] + [rnd.random() for _ in t.tokens[1:]])
             for t in trees]

    def run(tree):
        def call(rng):
            logits = {}

            def p_at(node):
                p = target.p(ctx + node_tokens(tree, node))
                # as TargetHead keeps them
                logits[node] = torch.tensor([float(x) for x in p]).log()
                return p
            path, x, rejected = verify_tree(tree, p_at, rng)
            s = Stats()
            s.record(tree, path, rejected, entropies_of(logits), len(path), 0.0, 0.0)
            holders = tuple(i for i, t in enumerate(trees) if len(path) > 1
                            and tree.tokens[path[1]] in [t.tokens[c] for c in t.children[0]])
            return (s.accepted_from[0], holders, s.accepted[0], s.leaf[0],
                    tuple(s.draft_entropy_accepted), tuple(s.draft_entropy_rejected),
                    tuple(s.target_entropy_accepted + s.target_entropy_rejected))
        return outcomes(call)
    plain, trie = run(merge(trees)), run(merge(trees, dedup=True))
    assert all(got == frozenset(holders[:1]) for got, holders, *_ in plain)
    assert all(got == frozenset(holders) for got, holders, *_ in trie)
    assert {o[2:]: w for o, w in plain.items()} == {o[2:]: w for o, w in trie.items()}


def test_eval_routing_shares_add_up_to_one():
    """eval's routing figures: per call, each drafter's share, the merged calls' and the plain ones'
    add up to 1; by prompt, the majority of the calls that verified one drafter's tree. Before issue
    30 plain calls were counted as merged, and a prompt of plain calls had a 'majority' of neither
    drafter."""

    def item(*routed):
        n = len(routed)
        return [({"spec_s": 1.0, "plain_s": 1.0, "match": None},
                 Stats(accepted=[0] * n, emitted=[1] * n, routed=list(routed),
                       accepted_from=[NONE] * n, new_tokens=n))]
    r = ev.bench_results([item(D0, D0, D1, NONE), item(NONE, NONE, BOTH),
                          item(D1, BOTH, BOTH, D0, D1)], 2)["routing"]
    assert r["per_call"] == [3 / 12,
                             3 / 12] and r["merged_calls"] == 3 / 12 and r["plain_calls"] == 3 / 12
    assert sum(r["per_call"]) + r["merged_calls"] + r["plain_calls"] == 1
    # the second prompt made no decision
    assert r["per_prompt_majority"] == [1 / 2, 1 / 2]


def test_merge_needs_a_shared_root():
    a, b = small_trees()
    b = dataclasses.replace(b, tokens=(99, *b.tokens[1:]))
    with pytest.raises(TapsError, match="share their root"):
        merge([a, b])


# ----------------------------------------------------------------------------- routing

def test_route_by_mean_confidence_and_by_entropy():
    a, b = small_trees()
    # mean exp(logq): a (e^-.5 + e^-1 + e^-2) / 3 = 0.370, b (e^-.2 + e^-3 + e^-.4) / 3 = 0.512
    assert route([a, b]) is b and route([b, a]) is b
    # mean draft entropy: a 0.83, b 1.37 -> the lower is a
    assert route_entropy([a, b]) is a and route_entropy([b, a]) is a
    assert route([a, a]) is a and route([a, dataclasses.replace(a)]) is a   # ties go to the first


def test_an_empty_tree_loses_every_route():
    """The root alone (AutoTree cut a weak drafter's tree) has no mean confidence or entropy: before
    issue 30 it was NaN, every comparison with it false, and the first tree kept even when empty."""
    a, b = small_trees()
    empty = tag(Tree([4], [None], [0.0], [None]), 0)
    # confidence e^-30
    weak = Tree(a.tokens[:2], a.parents[:2], [0.0, -30.0], [None, 50.0], [NONE, D1])
    for fn in (route, route_entropy):
        assert fn([empty, a]) is a and fn([a, empty]) is a and fn([empty, weak]) is weak
        assert fn([empty, empty, b]) is b and fn([empty, weak, b]) is fn([weak, b])
        # nothing else to pick: the first
        assert fn([empty, dataclasses.replace(empty)]) is empty


def test_routing_reads_nothing_but_the_trees():
    """Same draft-side quantities -> same choice, whatever else the trees carry (none of it
    target-side)."""
    a, b = small_trees()
    for fn in (route, route_entropy):
        choice = fn([a, b])
        shuffled = [Tree([t.tokens[0]] + [0] * (len(t) - 1), t.parents, t.logq, t.entropy)
                    for t in (a, b)]
        assert fn(shuffled) is shuffled[[a, b].index(choice)]   # tokens do not matter, scores do


# --------------------------------------------------------- exact losslessness of the real functions

def compose_scheme(fn, target, seed):
    """One verifier call: two or three draft-side trees (random scores and entropies), composed by
    the real taps function, verified by the real verify_tree with rational p and every outcome
    enumerated."""
    def step(ctx, rng):
        rnd = random.Random(f"n {seed} {ctx}")
        trees = [tag(t, i) for i, t in enumerate(drafts(seed, target.V, ctx, rnd.randint(2, 3)))]
        for i, t in enumerate(trees):
            trees[i] = t = dataclasses.replace(t,
                                               entropy=[None]
                                               + [rnd.random() for _ in t.tokens[1:]])
            # cut to its root, as AutoTree cuts a weak drafter's tree
            if rnd.random() < 0.3:
                trees[i] = prune(t, 1)
        return tree_call(target, fn(trees), ctx, rng)
    return step


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(["route", "route-entropy", "merged", "merged-dedup"]), **EXACT_CASES)
def test_every_composition_is_exactly_lossless(name, V, seed, n, half_temperature):
    """The same check rejects keeping the longer of two verified trees (conftest's keep_longer,
    test_verify_exact's negative control)."""
    assert lossless(partial(compose_scheme, COMPOSE[name]), V, seed, n, half_temperature)


# ------------------------------------------------------------------------ weight averaging (eq. 11)

def test_average_endpoints_are_the_specialists_bit_for_bit():
    target = tiny(V=32, dtype=torch.float32)
    a, b = Drafter.random(target, 1), Drafter.random(target, 2)
    with torch.no_grad():
        a.fc.bias[0] = -0.0
    for lam, ref in ((1.0, a), (0.0, b)):
        avg = average([a, b], lam)
        for k, v in ref.state_dict().items():
            w = avg.state_dict()[k]
            assert w.dtype == v.dtype and torch.equal(w.view(torch.int32), v.view(torch.int32)), k
    mid = average([a, b], 0.25)
    for k, v in mid.state_dict().items():
        assert torch.allclose(v, 0.25 * a.state_dict()[k] + 0.75 * b.state_dict()[k])
    assert mid.meta["lambda"] == 0.25 and mid.meta["domain"] == "average"


@pytest.mark.parametrize("lam", [-0.1, 1.5, math.nan])
def test_average_refuses_lambda_outside_0_to_1(lam):
    target = tiny(V=32)
    with pytest.raises(TapsError, match=r"lambda must be in \[0, 1\]"):
        average([Drafter.random(target, 1), Drafter.random(target, 2)], lam)


def test_average_refuses_one_drafter_and_different_targets():
    target = tiny(V=32, name="tiny-a")
    with pytest.raises(TapsError, match="exactly two drafters, got 1"):
        average([Drafter.random(target, 1)], 0.5)
    other = Drafter.random(tiny(V=32, name="tiny-b"), 2)
    with pytest.raises(TapsError, match="different targets"):
        average([Drafter.random(target, 1), other], 0.5)


# ------------------------------------------------------------------- generate with several drafters

@pytest.mark.parametrize("name", ["route", "route-entropy", "merged", "merged-dedup"])
def test_compositions_need_two_drafters(name):
    target = tiny(V=32)
    with pytest.raises(TapsError, match=f"compose '{name}' takes two or more drafters, got 1"):
        generate(target, [Drafter.random(target, 0)], [1, 2, 3], Sampling(max_new_tokens=8),
                 compose=name)


@pytest.mark.parametrize("name", sorted(COMPOSE))
def test_greedy_of_every_composition_is_the_target(name):
    V = 64
    target = tiny(V=V)
    drafters = [Drafter.random(target, s) for s in ((1,) if name == "single" else (1, 2, 3))]
    for prompt in prompts(V, n=2):
        ref = generate_plain(target, prompt, 32)
        out, s = generate(target, drafters, prompt, Sampling(max_new_tokens=32),
                          TreeShape(top_k=4, depth=3, total_tokens=10), compose=name)
        assert out == ref
        assert len(s.routed) == len(s.accepted_from) == s.calls
        # a drafter's tree, a drafter's node
        one = {frozenset({i}) for i in range(len(drafters))}
        if name in ("merged", "merged-dedup"):
            assert all(len(r) > 1 for r in s.routed) and max(s.tree_size) <= 1 + 3 * 10
        else:
            assert set(s.routed) <= one
        assert all(o == NONE if a == 0 else o in one for o, a in zip(s.accepted_from, s.accepted))
    drafter = average(drafters[:2], 0.5) if name != "single" else drafters[0]
    out, _ = generate(target, drafter, prompts(V)[0], Sampling(max_new_tokens=32),
                      TreeShape(top_k=4, depth=3, total_tokens=10))
    assert out == generate_plain(target, prompts(V)[0], 32)


def test_single_drafter_stats_name_drafter_0():
    target = tiny(V=1)
    _, s = generate(target, Drafter.random(target), [0, 0], Sampling(max_new_tokens=9),
                    TreeShape(top_k=1, depth=2, total_tokens=3))
    assert s.routed == [D0, D0] and s.accepted_from == [D0, D0]
    assert Stats().routed == []


# ------------------------------------------------------------- every composition, every tree policy

COMPOSITIONS = ["single", "average", "route", "route-entropy", "merged", "merged-dedup", "chain"]


@pytest.mark.parametrize("policy", ["study", "auto"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_composition_runs_with_every_tree_policy(policy, temperature):
    """What `taps.py --compose C [--chain] --tree P --temperature T` runs, on tiny models: a near
    oracle, a sharper copy of it (merged-dedup then holds children that outscore their parents:
    prune's old crash) and a uniform drafter (AutoTree cuts its trees to the root: the empty trees
    route once kept). The study's 60/5/10 tree, or an AutoTree on a synthetic cost table (no
    calibration); chain is the CLI's --chain, which takes no tree policy. T = 0 must be the target's
    greedy output."""
    V = 64
    target = tiny(V=V, n_layers=1)
    oracle = near_oracle(target)
    drafters = [oracle, sharper(oracle, 6.0), sharper(Drafter.random(target, 5), 0.0)]
    prompt = prompts(V, n=1)[0]
    ref = generate_plain(target, prompt, 16)
    for name in COMPOSITIONS:
        if name == "chain":
            tree = TreeShape(depth=4, chain=True)
        else:
            tree = (TreeShape() if policy == "study"
                    else AutoTree(verify_table({1: 1.0, 64: 1.0 + 63 * 0.05}, 64)))
        ds = {"single": drafters[:1], "chain": drafters[:1],
              "average": [average(drafters[:2], 0.5)]}.get(name, drafters)
        compose = "single" if name in ("average", "chain") else name
        out, s = generate(target, ds, prompt, Sampling(temperature, max_new_tokens=16), tree,
                          compose, TorchRandom(1))
        assert len(out) == 16 and s.new_tokens == sum(s.emitted) == 15 and s.calls == len(s.routed)
        assert out == ref or temperature > 0, name
        assert all(d <= set(range(len(ds))) for d in s.routed + s.accepted_from)
        if name in ("merged", "merged-dedup") and policy == "study":
            assert all(len(r) > 1 for r in s.routed)


def test_eval_runs_every_composition_on_auto_trees(setup, capsys, monkeypatch):
    """eval.py --tree auto, every method, T = 0 and 1, on the tiny eval setup (test_eval's); a
    synthetic calibration, so none is measured. Routing shares of every run add up to 1 with the
    merged and plain calls."""
    tmp_path, paths = setup
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(extras.autotree, "measure_verify",
                        lambda target: {1: 1.0, 256: 1.0 + 255 * 0.05})
    ev.main(["--drafters", *paths, "--data-dir", str(tmp_path / "data"), "--device", "cpu",
             "--max-new-tokens", "12", "--compose", ",".join(report.METHODS), "--tree", "auto",
             "--limit", "1", "--bench", "gsm8k", "--temperature", "0,1", "--json",
             str(tmp_path / "r" / "auto.json")])
    files = sorted((tmp_path / "r").glob("auto-*.json"))
    # two singles, one run per other method, per temperature
    assert len(files) == 2 * (len(report.METHODS) + 1)
    for f in files:
        obj = json.loads(f.read_text())
        r = obj["results"]["gsm8k"]
        assert obj["config"]["tree"] == "auto" and r["calls"] > 0
        assert r["greedy_match"] == (1.0 if obj["config"]["temperature"] == 0 else None)
        shares = r["routing"]["per_call"] + [r["routing"]["merged_calls"],
                                             r["routing"]["plain_calls"]]
        assert sum(shares) == pytest.approx(1) and sum(r["accepted_from"]) == pytest.approx(1)
    # Table 3 shows a routed run's plain calls (no tree to route) beside its drafters' shares
    route = json.loads((tmp_path / "r" / "auto-route-T0.json").read_text())
    route["results"]["gsm8k"]["routing"].update(per_call=[0.5, 0.25], plain_calls=0.25)
    assert "| route | no tree (plain step) | – / 25% |" in report.tables([route])
