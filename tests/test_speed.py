"""The speed paths (issue: speculative decoding that is actually faster) under the same losslessness
checks as the study's paths: draft vocabularies, hardware-sized trees (AutoTree), calibration files,
the float residual fallback, and Monte Carlo runs of the real `generate` with negative controls."""
import dataclasses
import json
import math
import random
from collections import Counter
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import taps
from model import TapsError, generate_plain, mean
import extras.autotree
from extras.autotree import AutoTree, auto_dtype, calibrate, verify_table
from extras.checkpoint import load_drafter
from extras.runtime import ISA_LIMITS, describe, machine
from taps import (COMPOSE, Drafter, Sampling, TorchRandom, Tree, average, generate, merge, prune,
                  tag, verify_chain, verify_tree)
from conftest import (DEVICES, EXACT_CASES, broken_sampling, chi_square_p, exact_first_tokens,
                      frac_vector, lossless, near_oracle, prompts, random_tree, rejected_somewhere,
                      sharper, tiny, tree_call)
from train import coverage, draft_vocabulary


def flat_auto(n_max=32, **kw) -> AutoTree:
    """An AutoTree for a machine where scoring any number of tokens costs the same (10 s): every
    node pays, so trees grow deep and wide, and drafting always beats a plain step."""
    return AutoTree(verify_table({1: 10.0, n_max: 10.0}, n_max), **kw)


# ----------------------------------------------------------------------------- draft vocabulary

def test_draft_vocabulary_is_the_most_frequent_target_tokens_with_the_stop_tokens():
    tokens = torch.tensor([5, 5, 5, 9, 9, 2, 7, 7, 7, 7])
    # stop token first, then by count
    assert draft_vocabulary([tokens], 3, 16, stop_ids={0}).tolist() == [0, 5, 7]
    assert draft_vocabulary([tokens], 5, 16, stop_ids={0}).tolist() == [0, 2, 5, 7, 9]
    # unseen tokens by id
    assert draft_vocabulary([tokens], 6, 16).tolist() == [0, 1, 2, 5, 7, 9]
    # corpora weigh by frequency, not by length: 3 of 4 tokens of a short corpus beat 4 of 10 of a
    # long one
    assert draft_vocabulary([tokens, torch.tensor([12, 12, 12, 3])], 2, 16).tolist() == [7, 12]
    assert coverage(torch.tensor([5, 7]), tokens) == pytest.approx(0.7)
    for size in (17, 1):
        with pytest.raises(TapsError, match="choose between 2 .the stop tokens. and 16"):
            draft_vocabulary([tokens], size, 16, stop_ids={0, 1})


def test_draft_head_is_the_target_head_restricted_to_the_vocabulary(tmp_path):
    target = tiny(V=32, name="tiny-a")
    full = Drafter.random(target, 1)
    sub = Drafter.random(target, 1)
    sub.vocab = torch.tensor([0, 3, 4, 10, 31])
    tokens, feats = torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 64, dtype=torch.float64)
    lf, hf = full(target, tokens, feats)
    ls, hs = sub(target, tokens, feats)
    assert torch.equal(hf, hs) and ls.shape == (1, 3, 5)
    assert torch.allclose(ls, lf[..., sub.vocab])
    assert sub.token_ids(torch.tensor([0, 4])).tolist() == [0, 31]
    sub.save(tmp_path / "d.safetensors")
    back = load_drafter(tmp_path / "d.safetensors", target)
    assert torch.equal(back.vocab, sub.vocab) and back.draft_vocab_size == 5
    assert torch.equal(back(target, tokens, feats)[0], ls)


@pytest.mark.parametrize("vocab, msg", [([3, 2], "sorted"), ([0, 40], r"in \[0, 32\)"),
                                        (list(range(33)), "choose 1..32"), ([], "choose 1..32")])
def test_bad_draft_vocabularies_are_refused(vocab, msg):
    target = tiny(V=32)
    d = Drafter.random(target)
    d.vocab = torch.tensor(vocab, dtype=torch.long)
    with pytest.raises(TapsError, match=msg):
        generate(target, d, [1, 2], Sampling(max_new_tokens=4))


def test_average_refuses_drafters_with_different_vocabularies():
    target = tiny(V=32)
    a, b = Drafter.random(target, 1), Drafter.random(target, 2)
    a.vocab = torch.tensor([0, 1, 2, 3])
    with pytest.raises(TapsError, match="different draft vocabularies"):
        average([a, b], 0.5)
    b.vocab = torch.tensor([0, 1, 2, 3])
    mid = average([a, b], 0.5)
    assert torch.equal(mid.vocab, a.vocab)
    assert torch.equal(average([a, b], 1.0).fc.weight, a.fc.weight)


# -------------------------------------------------------------- exact losslessness of the new paths

def subset_chain_scheme(target, seed):
    """Chain speculative sampling whose draft distributions live on a random subset of the
    vocabulary (a draft vocabulary): q is zero outside it."""
    V = target.V

    def step(ctx, rng):
        rnd = random.Random(f"subset {seed} {ctx}")
        subset = rnd.sample(range(V), rnd.randint(1, V))
        length = rnd.randint(1, 3)
        tokens, q = [ctx[-1]], []
        for _ in range(length):
            qi = frac_vector(random.Random(f"q {seed} {ctx} {tokens}"), V, zeros=False)
            qi = np.array([w if x in subset else Fraction(0) for x, w in enumerate(qi)],
                          dtype=object)
            q.append(qi / qi.sum())
            tokens.append(rng.categorical(q[-1]))
        path, x, _ = verify_chain(tokens, q, lambda i: target.p(ctx + tuple(tokens[1:i + 1])), rng)
        return tuple(tokens[i] for i in path[1:]) + (x,)
    return step


def sized_scheme(name, target, seed):
    """Trees whose size is chosen each call by the real AutoTree rule from draft-side quantities."""
    V = target.V
    auto = AutoTree(verify_table({1: 1.0, 4: 1.5, 8: 3.0}, 8))

    def step(ctx, rng):
        rnd = random.Random(f"draft {seed} {ctx}")
        # trees drafted from a draft vocabulary
        subset = rnd.sample(range(V), rnd.randint(1, V))
        trees = [random_tree(rnd, V, ctx[-1], max_nodes=10) for _ in range(2)]
        trees = [dataclasses.replace(t,
                                     tokens=[t.tokens[0]]
                                     + [subset[x % len(subset)] for x in t.tokens[1:]])
                 for t in trees]
        # merged-dedup: a united node keeps the first tree's score, so a child can outscore it
        # (prune's old crash)
        tree = merge(trees,
                     dedup=name == "merged-dedup-auto") if name.startswith("merged") else trees[0]
        n = auto.best(torch.tensor(tree.logq[1:]), rnd.random())[0]
        emitted = tree_call(target, prune(tree, n), ctx, rng)
        # WRONG: nothing accepted, so retry with the whole tree
        if name == "resize" and len(emitted) == 1:
            emitted = tree_call(target, tree, ctx, rng)
        return emitted
    return step


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["subset-chain", "auto", "merged-auto", "merged-dedup-auto"]),
       **EXACT_CASES)
def test_draft_vocabularies_and_sized_trees_are_exactly_lossless(name, V, seed, n,
                                                                 half_temperature):
    scheme = subset_chain_scheme if name == "subset-chain" else partial(sized_scheme, name)
    assert lossless(scheme, V, seed, n, half_temperature)


def test_the_same_check_rejects_a_tree_resized_after_verification():
    """Any tree fixed before the verifier's draws is exact, whatever chose its size; choosing again
    after seeing them (here: a retry with a larger tree when nothing was accepted) is not."""
    assert rejected_somewhere(partial(sized_scheme, "resize"), tries=40)


def test_prune_keeps_a_connected_tree_of_the_best_nodes():
    d0, d1 = frozenset({0}), frozenset({1})
    t = Tree([9, 1, 2, 3, 4, 5], [None, 0, 0, 1, 1, 3], [0, -1, -0.5, -1, -3, -2],
             [None] + [0.0] * 5, [frozenset(), d0, d0, d1, d1, d1])
    # root + the 3 best: -0.5 (node 2), -1 (node 1), -1 (node 3, a tie: after its parent)
    p = prune(t, 4)
    assert p.tokens == (9, 1, 2, 3) and p.parents == (None, 0, 0,
                                                      1) and p.origin == (frozenset(), d0, d0, d1)
    assert prune(t, 100) is t and prune(t, 1).tokens == (9,)


def raw_rank_breaks(tree: Tree, n: int) -> bool:
    """Would ranking by raw logq (prune before issue 30) keep a node without its parent?"""
    order = sorted(range(1, len(tree)), key=lambda i: -tree.logq[i])
    keep = {0, *order[:n - 1]}
    return n < len(tree) and any(tree.parents[i] not in keep for i in keep if i)


def test_prune_keeps_the_parent_of_a_child_that_outscores_it():
    """A de-duplicated merged tree: 5 is a's node (score -2), its child 7 only b's (-0.5, b being
    surer of 5). Ranked by raw logq, the best node was 7 without its parent (a KeyError); ranked by
    the lowest score on its path, 7 ranks at -2, after its parent."""
    a = tag(Tree([0, 5], [None, 0], [0.0, -2.0], [None, 1.0]), 0)
    b = tag(Tree([0, 5, 7], [None, 0, 1], [0.0, -0.1, -0.5], [None, 1.0, 1.0]), 1)
    m = merge([a, b], dedup=True)
    assert m.tokens == (0, 5, 7) and m.logq == (0.0, -2.0, -0.5) and raw_rank_breaks(m, 2)
    assert m.path_logq == (0.0, -2.0, -2.0)
    assert prune(m, 2).tokens == (0, 5) and prune(m, 3).tokens == (0, 5, 7)


def prune_input(kind: str, rnd: random.Random, V: int) -> Tree:
    """A tree of one kind: EAGLE-2's (scores fall along every path), merged, merged-dedup (a united
    node keeps the first tree's score, so a child may outscore it), or scores in any order. Scores
    are halves, so that ties (parent and child included) are common."""
    trees = [tag(random_tree(rnd, V, 0, max_nodes=12), i) for i in range(rnd.randint(2, 3))]
    tree = merge(trees, dedup=kind == "merged-dedup") if kind.startswith("merged") else trees[0]
    logq = [0.0] + [-rnd.random() * 4 for _ in tree.tokens[1:]] if kind == "any" else tree.logq
    # rounding keeps scores that fall still falling
    logq = [round(2 * x) / 2 for x in logq]
    origin = [frozenset({i}) for i in range(len(tree))]  # node ids: where each kept node came from
    return dataclasses.replace(tree, logq=logq, origin=origin)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(["eagle", "merged", "merged-dedup", "any"]), seed=st.integers(0, 10**9),
       V=st.integers(2, 4), n=st.integers(1, 40))
def test_prune_returns_a_tree_of_the_best_nodes_whatever_it_is_given(kind, seed, V, n):
    tree = prune_input(kind, random.Random(seed), V)
    out = prune(tree, n)
    kept = [min(o) for o in out.origin]
    # the root and n - 1 other nodes (or all of them), in their order
    assert len(out) == min(n, len(tree)) and kept[0] == 0 and kept == sorted(set(kept))
    assert (list(out.tokens) == [tree.tokens[i] for i in kept]
            and list(out.logq) == [tree.logq[i] for i in kept])
    # ancestor-closed: each kept node's parent is kept and is its parent in the pruned tree
    assert all(out.parents[j] < j and kept[out.parents[j]] == tree.parents[i]
               for j, i in enumerate(kept) if j)
    # the best: a node's rank is the lowest score on its path, and no node left out outranks a kept
    # one
    score = list(tree.path_logq)
    assert score == [min(tree.logq[j] for j in tree.path_to(i)) for i in range(len(tree))]
    left = [score[i] for i in range(len(tree)) if i not in set(kept)]
    assert max(left, default=-math.inf) <= min((score[i] for i in kept[1:]), default=math.inf)
    if all(tree.logq[i] <= tree.logq[tree.parents[i]] for i in range(1, len(tree))):
        # EAGLE-2's own trees (and plain merged ones): the study's rerank by logq, ties to the
        # earlier node
        order = sorted(range(1, len(tree)), key=lambda i: -tree.logq[i])
        assert kept == [0] + sorted(order[:n - 1])


# ----------------------------------------------------------------------------- AutoTree

def test_auto_tree_size_follows_the_verify_cost():
    logq = torch.log(torch.tensor([0.9, 0.8, 0.5, 0.1, 0.05]))
    cheap = AutoTree(verify_table({1: 1.0, 8: 1.0}, 8))
    dear = AutoTree(verify_table({1: 1.0, 2: 2.0, 8: 8.0}, 8))   # every token costs a whole step
    assert cheap.best(logq, 0.0)[0] == 6                           # flat cost: keep every node
    n, expected, rate = dear.best(logq, 0.0)
    assert n == 1 and rate == pytest.approx(1.0)                 # no node pays for itself
    # with c = 1: keep nodes while 1 + sum(conf) grows faster than the cost
    mid = AutoTree(verify_table({1: 1.0, 3: 1.2, 6: 2.0}, 8))
    assert mid.best(logq, 0.0)[0] == 3


def test_auto_tree_falls_back_to_plain_steps_and_probes_again():
    auto = AutoTree(verify_table({1: 0.01, 8: 0.02}, 8), explore=3)
    tree = Tree([0, 1], [None, 0], [0.0, -1.0], [None, 1.0])
    assert auto.speculate()                        # nothing measured yet: draft
    auto.record(tree, 0, 1.0)                      # 1 token in 1 s << 100 tok/s a plain step earns
    # a 2-call probe after 3
    assert [auto.speculate() for _ in range(5)] == [False, False, False, True, True]
    auto.record(tree, 0, 1.0)
    auto.record(tree, 0, 1.0)
    # then after 6
    assert [auto.speculate() for _ in range(8)] == [False] * 6 + [True, True]
    # the probe pays (10 tokens in 1 ms), measured afresh
    auto.record(tree, 9, 0.001)
    auto.record(tree, 9, 0.001)
    assert all(auto.speculate() for _ in range(5)) and auto.explore == 8


def test_calibration_is_cached_per_machine_and_never_trusted_from_elsewhere(tmp_path, monkeypatch,
                                                                             capsys):
    target = tiny(V=32, name="tiny-cal")
    path = tmp_path / "calibration.json"
    calls = []
    monkeypatch.setattr(extras.autotree, "measure_verify",
                        lambda t: calls.append(1) or {1: 0.5, 8: 1.0})
    assert calibrate(target, path) == {1: 0.5, 8: 1.0} and len(calls) == 1
    assert calibrate(target, path) == {1: 0.5, 8: 1.0} and len(calls) == 1      # cached
    saved = json.loads(path.read_text())
    key = next(iter(saved))
    foreign = json.loads(key)
    foreign["machine"]["cpu"] = "Some Other CPU"
    path.write_text(json.dumps({json.dumps(foreign, sort_keys=True): {"verify_s": {"1": 9e9}}}))
    # another machine's: measured anew
    assert calibrate(target, path) == {1: 0.5, 8: 1.0} and len(calls) == 2
    assert len(json.loads(path.read_text())) == 2
    path.write_text("{not json")
    assert calibrate(target, path) == {1: 0.5, 8: 1.0} and len(calls) == 3
    assert "unreadable calibration file; measuring again" in capsys.readouterr().err


def test_auto_dtype_decides_at_the_size_of_the_calls_it_is_for(monkeypatch):
    """AVX512-BF16 without AMX (this session's Xeon): 16 tokens score faster in bf16, 256 slower,
    so trees verify in bf16 and a conversation's features are extracted in fp32."""
    curves = {torch.float32: {1: 0.04, 16: 0.069, 192: 0.255, 256: 0.333},
              torch.bfloat16: {1: 0.04, 16: 0.066, 192: 0.323, 256: 0.466}}
    monkeypatch.setattr(extras.autotree, "calibrate",
                        lambda t: curves[t.embed_tokens.weight.dtype])
    target = tiny(V=32, name="tiny-dtype")
    assert auto_dtype(target) == torch.bfloat16                   # a tree of about 16 nodes
    assert auto_dtype(target, tokens=320) == torch.float32        # up to 320: the 256 size
    assert auto_dtype(target, tokens=100) == torch.bfloat16       # largest size within: 16
    assert auto_dtype(target, tokens=0) == torch.float32          # below every size: 1, a tie


def test_a_calibration_made_without_isa_limits_is_not_reused_under_them(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes an AMX machine time like one without fast bf16: the same CPU
    under that limit is another machine to the cache, and its tables say so."""
    for k in ISA_LIMITS:
        monkeypatch.delenv(k, raising=False)
    target, path, calls = tiny(V=32, name="tiny-isa"), tmp_path / "calibration.json", []
    monkeypatch.setattr(extras.autotree, "measure_verify", lambda t: calls.append(1) or {1: 0.5})
    calibrate(target, path)
    assert "=" not in describe(machine())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    calibrate(target, path)
    calibrate(target, path)
    assert len(calls) == 2 and len(json.loads(path.read_text())) == 2
    assert "; ONEDNN_MAX_CPU_ISA=AVX2)" in describe(machine())


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Calibrations of tiny test models go to a temporary $TAPS_CACHE, never the user's."""
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "taps-cache"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compose", ["single", "route", "merged", "merged-dedup"])
def test_auto_trees_are_exactly_greedy(compose, device):
    """fp64 tiny targets: deep trees (flat verify cost) and this machine's calibrated trees, with a
    full-vocabulary and a draft-vocabulary drafter, emit exactly the target's greedy tokens; on CUDA
    too (the calibrated cost table lives on the CPU, the drafts' scores on the target's device)."""
    V = 64
    target = tiny(V=V, n_layers=1)
    drafters = [near_oracle(target), Drafter.random(target, 3)]
    drafters[1].vocab = torch.arange(0, V, 3)
    target, drafters = target.to(device), [d.to(device) for d in drafters]
    drafters = drafters[:1] if compose == "single" else drafters
    deep = 0
    for prompt in prompts(V):
        ref = generate_plain(target, prompt, 40)
        out, s = generate(target, drafters, prompt, Sampling(max_new_tokens=40), flat_auto(),
                          compose=compose)
        assert out == ref and max(s.tree_size) <= 32
        deep += sum(a >= 2 for a in s.accepted)
        out, s = generate(target, drafters, prompt, Sampling(max_new_tokens=40),
                          AutoTree.for_target(target), compose=compose)
        assert out == ref
    assert deep > 0 or compose == "route"   # routing may prefer the random drafter's flatter tree


def watch_prune(monkeypatch) -> list[bool]:
    """Wrap AutoTree's prune: per call, whether ranking by raw logq would have kept a node without
    its parent."""
    seen, real = [], extras.autotree.prune
    monkeypatch.setattr(extras.autotree, "prune",
                        lambda tree, n: seen.append(raw_rank_breaks(tree, n)) or real(tree, n))
    return seen


def test_auto_trees_of_a_drafter_and_a_sharper_copy_merged_dedup(monkeypatch):
    """Issue 30's crash (a KeyError in prune before the fix): AutoTree prunes the de-duplicated
    merged tree again, and the sharper copy's children of united nodes outscore them. A stopped
    clock makes the sizes depend on the cost table alone, so the case recurs; T = 0 and 1, a few
    seeds."""
    monkeypatch.setattr(extras.autotree, "clock", lambda dev: 0.0)
    breaks = watch_prune(monkeypatch)
    V = 64
    target = tiny(V=V, n_layers=1)
    drafter = near_oracle(target)
    drafters = [drafter, sharper(drafter, 6.0)]
    for temperature in (0.0, 1.0):
        for seed in range(3):
            for prompt in prompts(V, n=2):
                auto = AutoTree(verify_table({1: 1.0, 64: 1.0 + 63 * 0.05}, 64), max_depth=3)
                out, s = generate(target, drafters, prompt,
                                  Sampling(temperature, max_new_tokens=12), auto, "merged-dedup",
                                  TorchRandom(seed))
                if temperature == 0:
                    assert out == generate_plain(target, prompt, 12)
                assert s.new_tokens == sum(s.emitted) == 11
    assert any(breaks)      # the inputs that crashed were there


# -------------------------------------------------------------------------- the speed table's lines

def speed_row(dtype, bench, config, tok_s, plain_tok_s, parted=()):
    turns = [{"question_id": i, "turn": 1, "match": i not in parted,
              **({"first_diff": 5, "logit_gap": 0.125, "tie_tolerance": 1.0, "near_tie": True}
                 if i in parted else {})}
             for i in range(3)]
    return {"dtype": dtype, "benchmark": bench,
            "drafter": "eagle-math" if bench == "GSM8K" else "eagle-chat", "config": config,
            "tok_s": tok_s, "vs_plain": tok_s / plain_tok_s,
            **({} if config == "plain decoding"
               else {"greedy_match": f"{3 - len(parted)}/3", "turns": turns})}


def speed_rows_of(dtype, plain, study, auto, parted=()):
    return [speed_row(dtype, b, c, t, plain[i], parted if c == "auto tree" else ())
            for i, b in enumerate(("GSM8K", "MT-Bench"))
            for c, t in (("plain decoding", plain[i]), ("study tree (60/5/10)", study[i]),
                         ("auto tree", auto[i]))]


def test_the_speed_lines_read_the_run_and_explain_bf16_partings():
    import extras.speed as xs
    fp32 = speed_rows_of("float32", (30.0, 32.0), (15.0, 22.4), (33.0, 32.64))
    bf16 = speed_rows_of("bfloat16", (28.0, 28.0), (40.0, 28.0), (44.8, 36.4), parted=(0, 2))
    line = xs.study_tree_line(fp32 + bf16)
    assert "in float32 it loses to plain decoding (0.50-0.70× in the speed table)" in line
    assert ("auto tree, sized for this machine, reaches 1.02-1.10× in float32 and 1.30-1.60× in "
            "bfloat16" in line)
    assert xs.verdict_line(fp32 + bf16) == ("Speed on this machine, bfloat16, auto tree vs plain "
                                            "decoding: GSM8K (eagle-math) 44.8 vs 28.0 tok/s "
                                            "(1.60×); MT-Bench (eagle-chat) 36.4 vs 28.0 tok/s "
                                            "(1.30×)")
    # no bf16 that pays, study wins once
    slow = speed_rows_of("float32", (30.0, 32.0), (31.5, 22.4), (33.0, 32.64))
    assert ("it runs at plain decoding (0.70-1.05×" in xs.study_tree_line(slow)
            and "bfloat16" not in xs.study_tree_line(slow))
    assert xs.verdict_line(slow).startswith("Speed on this machine, float32, auto tree vs plain "
                                            "decoding: GSM8K")
    # bf16 timed (a 16-token call calibrated faster) but decoding slower: fp32 is what pays
    no_gain = speed_rows_of("bfloat16", (22.9, 20.7), (15.4, 11.6), (21.8, 18.1))
    assert xs.verdict_line(fp32 + no_gain).startswith("Speed on this machine, float32, auto tree")
    assert "bfloat16" not in xs.study_tree_line(fp32 + no_gain)

    table = xs.speed_table(bf16[:3], fp32)
    notes = [x for x in table.split("\n") if x.startswith(("note", "ERROR"))]
    assert (len(notes) == 1
            and notes[0].startswith("note: bfloat16 GSM8K auto tree: greedy = plain on 1/3 turns"))
    assert notes[0].endswith("the float32 row of this configuration above shows greedy = plain 3/3")
    assert [x for x in xs.speed_table(fp32[:3]).split("\n") if x.startswith("note")] == []


# ---------------------------------------------------------------- a residual that rounds to nothing

class Reject:
    """A random source that rejects every proposal and draws the first token with positive mass."""

    def bernoulli(self, prob):
        return False

    def categorical(self, probs):
        assert not torch.isnan(probs).any()
        return int(torch.nonzero(probs > 0)[0])


def test_a_residual_that_rounds_to_zero_falls_back_safely():
    # float rounding left r(x) just below 1 and nothing elsewhere: a rejection (probability ~1e-7)
    # must not NaN
    tree = Tree([0, 1, 2], [None, 0, 0], [0.0, -0.1, -0.2], [None, 0.0, 0.0])
    p = torch.tensor([0.0, 1.0, 0.0])
    path, x, rejected = verify_tree(tree, lambda i: p.clone(), Reject())
    assert (path, x, rejected) == ([0], 1, [1, 2])
    # chain: p <= q everywhere in floats, so max(0, p - q) is all zeros: draw from p instead
    p, q = torch.tensor([0.25, 0.75, 0.0]), torch.tensor([[0.25, 0.75, 0.0]])
    path, x, _ = verify_chain([0, 1], q, lambda i: p.clone(), Reject())
    assert path == [0] and x == 0


# ----------------------------------------------------------------- Monte Carlo of the real generate


def monte_carlo(device="cpu", n=1200):
    """First 3 tokens of `generate` at T = 0.6, top-p 0.8 with a near-oracle drafter on a draft
    vocabulary and deep auto trees; returns the chi-square p-value and what the runs exercised."""
    target = tiny(V=4, n_layers=1, seed=3)
    drafter = near_oracle(target)
    drafter.vocab = torch.tensor([0, 1, 3])
    target, drafter = target.to(device), drafter.to(device)
    prompt, rng, auto = [0, 3], TorchRandom(11), flat_auto(16, max_depth=2)
    samples, deep, bonus, multi = [], 0, 0, 0
    for _ in range(n):
        out, s = generate(target, drafter, prompt,
                          Sampling(temperature=0.6, top_p=0.8, max_new_tokens=5), auto, rng=rng)
        samples.append(tuple(out[:3]))
        deep += any(a >= 2 for a in s.accepted)
        bonus += any(s.leaf)
        multi += s.calls >= 2
    expected = exact_first_tokens(target, prompt, 3, 0.6, 0.8)
    return chi_square_p(Counter(samples), expected, n), deep / n, bonus / n, multi / n


@pytest.mark.parametrize("device", DEVICES)
def test_monte_carlo_of_generate_with_draft_vocabulary_and_auto_trees(device):
    p, deep, bonus, multi = monte_carlo(device)
    print(f"chi-square p = {p:.3g}; runs with depth >= 2 accepted {deep:.2f}, "
          f"bonus at a leaf {bonus:.2f}, several verifier calls {multi:.2f}")
    assert deep > 0.05 and bonus > 0.05 and multi > 0.05     # the paths under test were exercised
    assert p > 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_the_same_monte_carlo_rejects_sampling_at_the_wrong_temperature(device, monkeypatch):
    """Negative control: a verifier whose p ignores the temperature (T = 1 instead of 0.6)."""
    real = taps.logits_to_probs
    monkeypatch.setattr(taps, "logits_to_probs", lambda logits, temperature,
                        top_p: real(logits, 1.0, top_p))
    p, *_ = monte_carlo(device)
    print(f"wrong temperature: chi-square p = {p:.3g}")
    assert p < 1e-6


def monte_carlo_composed(monkeypatch, n=600):
    """First 3 tokens of `generate` at T = 0.6, top-p 0.8 on auto trees (a stopped clock: sizes from
    the cost tables alone), round robin over route and route-entropy -- a uniform drafter first,
    whose trees AutoTree cuts to the root, beside a near oracle -- and merged-dedup of the near
    oracle and a sharper copy, whose composed trees prune must keep closed. Every run's tokens
    follow the target's distribution. Returns the chi-square p-value, the share of routed calls that
    had an empty tree beside a non-empty one, and the share of merged-dedup calls that raw-logq
    ranking would have broken."""
    monkeypatch.setattr(extras.autotree, "clock", lambda dev: 0.0)
    breaks = watch_prune(monkeypatch)
    target = tiny(V=4, n_layers=1, seed=3)
    oracle = near_oracle(target)
    pairs = {"route": [sharper(Drafter.random(target, 5), 0.0), oracle],
             "merged-dedup": [oracle, sharper(oracle, 6.0)]}
    pairs["route-entropy"] = pairs["route"]
    # where a weak tree / no tree pays
    slope = {"route": 0.3, "route-entropy": 0.3, "merged-dedup": 0.1}
    autos = {k: AutoTree(verify_table({1: 1.0, 16: 1.0 + 15 * slope[k]}, 16), max_depth=3)
             for k in slope}
    routed = []

    def route_watched(name):
        def compose(trees):
            routed.append(min(map(len, trees)) == 1 < max(map(len, trees)))
            return COMPOSE[name](trees)
        return compose
    rng, samples, dedup_calls = TorchRandom(11), [], 0
    for i in range(n):
        name = ("route", "route-entropy", "merged-dedup")[i % 3]
        compose = route_watched(name) if name.startswith("route") else name
        out, s = generate(target, pairs[name], [0, 3],
                          Sampling(temperature=0.6, top_p=0.8, max_new_tokens=3), autos[name],
                          compose, rng)
        samples.append(tuple(out[:3]))
        dedup_calls += s.calls if name == "merged-dedup" else 0
    expected = exact_first_tokens(target, [0, 3], 3, 0.6, 0.8)
    return chi_square_p(Counter(samples), expected, n), mean(routed), sum(breaks) / dedup_calls


@pytest.mark.parametrize("wrong", [False, True])
def test_monte_carlo_of_routing_past_empty_trees_and_pruning_merged_dedup_trees(wrong, monkeypatch):
    """Issue 30's two paths in the real generate: the route over an empty tree, the fixed prune;
    with a negative control (a verifier whose p ignores the temperature)."""
    if wrong:
        broken_sampling(monkeypatch, temperature=1.0)
    p, empty, broken = monte_carlo_composed(monkeypatch)
    print(f"chi-square p = {p:.3g}; routed calls with an empty tree beside a non-empty one "
          f"{empty:.2f}, merged-dedup calls raw ranking broke {broken:.2f}")
    if wrong:
        assert p < 1e-6
    else:
        assert empty > 0.2 and broken > 0.05      # the paths under test were exercised
        assert p > 1e-6
