"""extras/trace.py: the trace of every verifier call (`taps.py --show`, `--trace`, `--trace-html`).

A call traced by hand (tree, tests, r values, uniforms, path, draw, emitted) and its text
rendering as a snapshot; on a tiny float64 model, the trace's tokens are the generated ones for
every composition at T = 0 and T = 1, and its recorded p are the target's own; by exact
enumeration, the trace alone -- the product of its acceptance tests and draws -- reproduces the
target's distribution (and a wrong verifier's trace does not); the CLIs write what they promise.
"""
import json
import random
import xml.etree.ElementTree as ET
from collections import defaultdict
from fractions import Fraction
from functools import partial
from math import prod

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import model
import taps
from conftest import (EXACT_CASES, drafts, frac_vector, lossless, near_oracle, node_tokens,
                      outcomes, prompts, rejected_somewhere, tiny)
from extras.autotree import AutoTree, verify_table
from extras.checkpoint import load_target
from extras.trace import SCHEMA, Trace, record, render_call, render_html, streamed
from model import logits_to_probs
from taps import Drafter, Sampling, TorchRandom, Tree, TreeShape, average, generate, verify_tree
from test_eval import run, setup   # noqa: F401 (eval.py's tiny setup, a fixture)

SVG = "{http://www.w3.org/2000/svg}svg"


class Scripted:
    """A RandomSource handing out given uniforms (kept in .u as TorchRandom keeps its draws); its
    categorical draws take the likeliest token."""

    def __init__(self, uniforms):
        self.uniforms, self.u = list(uniforms), None

    def bernoulli(self, prob):
        self.u = self.uniforms.pop(0)
        return self.u < prob

    def categorical(self, probs):
        return int(np.argmax(probs))


def hand_call():
    """Tokens a b c d (0-3). Root a; its children b (#1) and c (#2); c's children d (#3), b (#4).
    p after the root (1/8, 1/2, 1/4, 1/8), after c (1/2, 1/4, 0, 1/4); uniforms .75 .25 .5 .5:
      b: r = 1/2, u .75 -> rejected, residual (1/4, 0, 1/2, 1/4), 1/2 of p left
      c: r = 1/2, u .25 -> accepted (p(c) = 1/2 * 1/2 = 1/4)
      d: r = 1/4, u .5  -> rejected, residual (2/3, 1/3, 0, 0), 3/4 left
      b: r = 1/3, u .5  -> rejected, residual (1, 0, 0, 0), 3/4 * 2/3 = 1/2 left (p(b) = 1/4)
      the correction: a, probability 1. Path 0 -> 2, emitted c a.
    The tree is `prune`d from a pool that also drafted d after the root and a after b."""
    pool = Tree([0, 1, 2, 3, 1, 3, 0], [None, 0, 0, 2, 2, 0, 1],
                [0.0, -0.5, -1.0, -2.0, -3.0, -4.0, -5.0], [None] + [0.0] * 6)
    tree = taps.prune(pool, 5)
    assert tree.pool is pool and tree == Tree([0, 1, 2, 3, 1], [None, 0, 0, 2, 2],
                                              [0.0, -0.5, -1.0, -2.0, -3.0], [None] + [0.0] * 4)
    p = {0: [1 / 8, 1 / 2, 1 / 4, 1 / 8], 2: [1 / 2, 1 / 4, 0, 1 / 4]}
    trace = Trace(decode=lambda t: "abcd"[t])
    rng = Scripted([0.75, 0.25, 0.5, 0.5])
    trace.watch(rng=rng)
    path, x, rejected = verify_tree(tree, lambda node: np.array(p[node]), rng, trace)
    trace.call(tree, path, [tree.tokens[i] for i in path[1:]] + [x], 0.001, 0.002)
    return trace.calls[0]


def test_a_traced_call_records_each_test_and_the_draw_by_hand():
    c = hand_call()
    got = [(t.node, t.child, t.token, t.r, t.p, t.u, t.accepted) for t in c.tests]
    assert got == pytest.approx([(0, 1, 1, 1 / 2, 1 / 2, 0.75, False),
                                 (0, 2, 2, 1 / 2, 1 / 4, 0.25, True),
                                 (2, 3, 3, 1 / 4, 1 / 4, 0.5, False),
                                 (2, 4, 1, 1 / 3, 1 / 4, 0.5, False)])
    d = c.draw
    assert (d.node, d.token, d.text, d.kind) == (2, 0, "a", "correction")
    assert (d.prob, d.residual_mass) == pytest.approx((1, 1 / 2))
    assert c.path == [0, 2] and c.emitted == [2, 0] and c.emitted_text == "ca" and c.tau == 2
    assert c.status() == ["root", "rejected", "accepted", "rejected", "rejected"]
    assert c.q() == pytest.approx([None, np.exp(-0.5), np.exp(-1.0), np.exp(-1.0), np.exp(-2.0)])
    line = record(c)
    assert line["schema"] == SCHEMA and line["tree"]["depth"] == [0, 1, 1, 2, 2]
    assert line["draw"] == {"node": 2, "token": 0, "text": "a", "kind": "correction",
                            "prob": 1.0, "residual_mass": pytest.approx(0.5)}
    assert line["pruned"] == [
        {"id": 5, "token": 3, "text": "d", "parent": 0, "depth": 1, "origin": [0], "logq": -4.0,
         "q": pytest.approx(np.exp(-4.0))},
        {"id": 6, "token": 0, "text": "a", "parent": 1, "depth": 2, "origin": [0], "logq": -5.0,
         "q": pytest.approx(np.exp(-4.5))}]
    assert json.loads(json.dumps(line)) == line


HEADER = ('call 1: 4 nodes, 1 accepted from d0, + correction -> 2 tokens "ca"; tau 2.00 so far; '
          'draft 1.0 ms, verify 2.0 ms\n  "a" #0  (root)\n')
DRAWN = '  drew "a" after #2, the correction from the residual (mass 0.5 left): probability 1'
SNAPSHOT = HEADER + """\
  ├── ✗ "b" #1  q 0.607  p 0.5 r 0.5 u 0.75  (+1 below)
  ├── ✓ "c" #2  q 0.368  p 0.25 r 0.5 u 0.25
  │   ├── ✗ "d" #3  q 0.368  p 0.25 r 0.25 u 0.5
  │   └── ✗ "b" #4  q 0.135  p 0.25 r 0.333 u 0.5
  └── ✂ "d" #5  q 0.0183  pruned
""" + DRAWN
FOLDED = HEADER + """\
  ├── ✓ "c" #2  q 0.368  p 0.25 r 0.5 u 0.25
  │   ├── ✗ "d" #3  q 0.368  p 0.25 r 0.25 u 0.5
  │   └── … 1 more: 1 rejected
  └── … 2 more: 1 rejected, 1 pruned
""" + DRAWN


def test_a_call_renders_as_its_text_snapshot():
    c = hand_call()
    assert render_call(c) == SNAPSHOT
    assert render_call(c, width=1) == FOLDED       # one child per node, the accepted first
    coloured = render_call(c, colour=True)
    assert "\033[32m" in coloured and "\033[31m" in coloured and "\033[" not in SNAPSHOT
    assert '\033[2m✂ "d" #5' in coloured                 # a pruned node: dimmed


# ----------------------------------------------------------------------------- generate, traced

V = 32


@pytest.fixture(scope="module")
def models():
    target = tiny(V=V, n_layers=1)
    return target, near_oracle(target), Drafter.random(target, 1).double()


def traced(models, compose, temperature, tree=TreeShape(3, 3, 8), n=16, seed=0):
    target, d0, d1 = models
    drafters = {"single": d0, "average": average([d0, d1], 0.5)}.get(compose, [d0, d1])
    compose = "single" if compose == "average" else compose
    trace = Trace()
    out, stats = generate(target, drafters, prompts(V)[seed], Sampling(temperature, 1.0, n), tree,
                          compose, TorchRandom(seed), trace)
    return trace, out, stats, (target, drafters, compose)


CASES = ["single", "average", "route", "route-entropy", "merged", "merged-dedup", "chain",
         "merged-auto"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("case", CASES)
def test_the_trace_holds_every_call_as_it_happened(models, case, temperature):
    tree = {"chain": TreeShape(3, 3, 8, chain=True),
            "merged-auto": AutoTree(verify_table({1: 1.0, 48: 1.0}, 48), max_depth=3)}.get(
                case, TreeShape(3, 3, 8))
    compose = {"chain": "single", "merged-auto": "merged"}.get(case, case)
    for seed in range(3):
        trace, out, stats, (target, drafters, comp) = traced(models, compose, temperature, tree,
                                                             seed=seed)
        assert len(trace.calls) == stats.calls
        assert [t for c in trace.calls for t in c.emitted] == out[1:]
        untraced, _ = generate(target, drafters, prompts(V)[seed], Sampling(temperature, 1.0, 16),
                               tree, comp, TorchRandom(seed))
        assert untraced == out                     # tracing draws nothing and changes nothing
        for c, accepted, routed, source in zip(trace.calls, stats.accepted, stats.routed,
                                               stats.accepted_from):
            assert (c.accepted_from() or [frozenset()])[0] == source
            assert len(c.path) - 1 == accepted
            made = [c.tree.tokens[i] for i in c.path[1:]] + [c.draw.token]
            assert c.emitted == made[:len(c.emitted)] and c.emitted
            for t in c.tests:   # what TorchRandom drew decided each test, as the trace says
                assert t.accepted == (t.u < t.r) and 0 <= t.r <= 1
                assert t.r in (0, 1) or temperature > 0   # greedy: p is a point mass
            assert [t.child for t in c.tests if t.accepted] == [c.first[i] for i in c.path[1:]]
            several = compose not in ("single", "average") and len(c.tree) > 1
            assert (c.routing is not None) == several
            if several:
                assert c.routing.chosen == routed and len(c.routing.trees) == 2
        assert trace.calls[-1].tau == pytest.approx(stats.tau)


def paths(parents, tokens) -> list[tuple]:
    """Each node's token path from the root (parents precede children)."""
    out = [()]
    for p, t in zip(parents[1:], tokens[1:]):
        out.append(out[p] + (t,))
    return out


@pytest.mark.parametrize("compose", ["single", "route", "merged", "merged-dedup"])
def test_the_trace_records_the_nodes_prune_dropped(models, compose):
    """A study shape whose total_tokens (8) is below its pool (3 + 3 * 9 = 30 per drafter): the
    verified tree and the pruned nodes are, drafter by drafter, the pool (every node once, by
    token path), and a pruned node hangs from a verified node, directly or through pruned ones."""
    trace, *_ = traced(models, compose, 1.0, TreeShape(3, 3, 8))
    for c in trace.calls:
        n, cut = len(c.tree), c.pruned
        assert [x.id for x in cut] == list(range(n, n + len(cut)))
        parents = [*c.tree.parents, *(x.parent for x in cut)]
        tokens = [*c.tree.tokens, *(x.token for x in cut)]
        origin = [*c.origin, *(x.origin for x in cut)]
        assert all(x.parent < x.id and x.depth == 1 + ([*c.tree.depths, *(y.depth for y in cut)]
                                                       [x.parent]) for x in cut)
        every = paths(parents, tokens)
        for d in c.routing.chosen if c.routing else [0]:
            mine = [every[i] for i in range(1, len(every)) if d in origin[i]]
            assert len(mine) == len(set(mine)) == 3 + 3 * 3 ** 2   # top_k + depth top_k^2
        if compose in ("single", "route"):   # the verified tree is a drafter's own: its pool
            pool = c.tree.pool
            assert len(cut) == len(pool) - n == 30 + 1 - 9
            assert sorted(every) == sorted(paths(pool.parents, pool.tokens))
            assert {x.origin for x in cut} <= {c.origin[1]}


def test_recorded_p_is_the_target_own(models):
    """At T = 1 the first call's root tests: p(s) recorded = the target's probability of s after
    the prompt and the prefill token, from a plain forward pass (to fp32 rounding: the verifier's
    logits are fp32, and p after a rejection is r(s) times the fp32 residual's mass)."""
    trace, out, _, (target, _, _) = traced(models, "merged", 1.0)
    c = trace.calls[0]
    with torch.inference_mode():
        logits, _ = target(torch.tensor([prompts(V)[0] + out[:1]]))
    p = logits_to_probs(logits[0, -1], 1.0, 1.0)
    root = [t for t in c.tests if t.node == 0]
    assert root and [t.p for t in root] == pytest.approx([p[t.token].item() for t in root],
                                                         rel=1e-6)


# ------------------------------------------------------------------ the trace alone is a proof

def traced_call(scheme, target, seed, ctx, rng):
    """One verifier call on rational tables, traced: (emitted, probability by the trace)."""
    trace = Trace()
    trace.watch(rng=rng)
    if scheme == "chain":
        length = random.Random(f"len {seed} {ctx}").randint(1, 3)
        tokens, q = [ctx[-1]], []
        for _ in range(length):   # the draft side: proposals drawn from q (their weight: q(x))
            q.append(frac_vector(random.Random(f"q {seed} {ctx} {tokens}"), target.V))
            tokens.append(rng.categorical(q[-1]))
        path, x, _ = taps.verify_chain(tokens, q, lambda i: target.p(ctx + tuple(tokens[1:i + 1])),
                                       rng, trace)
        tree = Tree(tokens, [None, *range(length)], [0.0] * len(tokens), [None] + [0.0] * length)
        drafted = prod(q[i][t] for i, t in enumerate(tokens[1:]))
    else:
        trees = drafts(seed, target.V, ctx, 2)
        tree = {"tree": trees[0], "merged": taps.merge(trees), "routed": taps.route(trees),
                "merged-dedup": taps.merge(trees, dedup=True)}[scheme]
        path, x, _ = verify_tree(tree, lambda node: target.p(ctx + node_tokens(tree, node)), rng,
                                 trace)
        drafted = 1
    emitted = tuple(tree.tokens[i] for i in path[1:]) + (x,)
    trace.call(tree, path, list(emitted))
    c = trace.calls[0]
    by_trace = prod((t.r if t.accepted else 1 - t.r) for t in c.tests) * c.draw.prob
    assert drafted * by_trace == rng.weight   # the trace's product is the probability it happened
    return emitted, drafted * by_trace


def traced_scheme(scheme):
    """`lossless`'s scheme: (target, seed) -> one traced call (ctx, rng) -> (emitted, its
    weight)."""
    return lambda target, seed: partial(traced_call, scheme, target, seed)


def dist_by_trace(step, ctx, n, memo=None) -> dict:
    """The first n emitted tokens' distribution, each call weighted by its trace alone."""
    memo = {} if memo is None else memo
    if n == 0:
        return {(): Fraction(1)}
    if (ctx, n) not in memo:
        calls = []
        outcomes(lambda rng: calls.append(step(ctx, rng)) or ())
        out = defaultdict(Fraction)
        for emitted, w in calls:
            for rest, w2 in dist_by_trace(step, ctx + emitted[:n], n - len(emitted[:n]),
                                          memo).items():
                out[emitted[:n] + rest] += w * w2
        memo[(ctx, n)] = dict(out)
    return memo[(ctx, n)]


@settings(max_examples=150, deadline=None)
@given(scheme=st.sampled_from(["tree", "merged", "merged-dedup", "routed", "chain"]),
       **EXACT_CASES)
def test_the_trace_alone_reproduces_the_target(scheme, V, seed, n, half_temperature):
    assert lossless(traced_scheme(scheme), V, seed, n, half_temperature, dist_by_trace)


def test_negative_control_a_wrong_verifier_shows_in_its_trace(monkeypatch):
    """An unnormalised residual: the trace still records what was used (its product is each
    outcome's probability), and that distribution is not the target's."""
    def residual(r, x):   # WRONG: zero the rejected token but do not renormalise
        r[x] = 0
        return r
    monkeypatch.setattr(taps, "residual", residual)
    assert rejected_somewhere(traced_scheme("tree"), dist=dist_by_trace)


# ----------------------------------------------------------------------------- files and pages

def test_html_is_one_self_contained_page_with_one_svg_per_call(models, tmp_path):
    trace, *_ = traced(models, "merged-dedup", 1.0)
    page = render_html(trace, "a <title> & more")
    root = ET.fromstring(page)
    assert len(list(root.iter(SVG))) == len(trace.calls) > 1
    pruned = sum(len(c.pruned) for c in trace.calls)            # drawn grey and dashed
    assert pruned and page.count('stroke="#aaaaaa" stroke-width="2" stroke-dasharray') == pruned
    assert "<script" not in page and "src=" not in page and "<link" not in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns="http://www.w3.org/1999/xhtml"', "")   # nothing to fetch: namespaces only


def test_streamed_lines_survive_an_interruption_and_an_error_leaves_nothing(models, tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with streamed(path) as trace:
            generate(models[0], models[1], prompts(V)[0], Sampling(1.0, 1.0, 8), TreeShape(3, 3, 8),
                     rng=TorchRandom(0), trace=trace)
            raise KeyboardInterrupt
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines and all(x["schema"] == SCHEMA for x in lines)
    with pytest.raises(RuntimeError):
        with streamed(tmp_path / "u.jsonl") as trace:
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_eval_trace_has_one_line_per_call(setup, capsys):
    tmp, paths = setup
    run(tmp, paths, "--compose", "route", "--limit", "1", "--bench", "svamp,mt_bench",
        "--json", str(tmp / "r.json"), "--trace", str(tmp / "t.jsonl"))
    results = json.loads((tmp / "r.json").read_text())["results"]
    lines = [json.loads(x) for x in (tmp / "t.jsonl").read_text().splitlines()]
    assert len(lines) == sum(results[b]["calls"] for b in ("svamp", "mt_bench"))
    assert {(x["meta"]["bench"], x["meta"]["turn"]) for x in lines} == {
        ("svamp", 1), ("mt_bench", 1), ("mt_bench", 2)}
    assert all(x["routing"]["compose"] == "route" for x in lines if len(x["tree"]["tokens"]) > 1)
    with pytest.raises(SystemExit):
        run(tmp, paths, "--report", str(tmp / "r.json"), "--trace", str(tmp / "t.jsonl"))
    assert "--trace" in capsys.readouterr().err


def test_bad_trace_destinations_are_one_line_before_any_model_loads(tmp_path, capsys):
    base = ["--prompt", "hi", "--drafter", "random", "--target", str(tmp_path / "missing")]
    for extra, message in [(["--trace", str(tmp_path)], "--trace"),
                           (["--trace-html", str(tmp_path)], "--trace-html"),
                           (["--trace", str(tmp_path / "a"), "--trace-html", str(tmp_path / "a")],
                            "one file")]:
        with pytest.raises(SystemExit) as e:
            taps.main(base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err
        assert err.count("\n") == 1


# ----------------------------------------------------------------------------- the embedded default

@pytest.fixture(scope="module")
def default():
    try:
        return load_target()
    except model.TapsError as e:
        pytest.skip(f"embedded default target unavailable: {e}")


FEW = ["--max-new-tokens", "4", "--depth", "3", "--dtype", "fp32", "--device", "cpu"]
SMALL = [*FEW, "--tree", "study", "--total-tokens", "8", "--top-k", "4"]


def test_show_trace_and_page_on_the_embedded_default(default, tmp_path, capsys):
    """The README's command: a merged tree of two drafters, every call shown, written, drawn."""
    jsonl, page = tmp_path / "t.jsonl", tmp_path / "t.html"
    taps.main(["--prompt", "What is 7 * 6?", "--drafter", "random", "--drafter", "random",
               "--compose", "merged", "--show", "--trace", str(jsonl), "--trace-html", str(page),
               *SMALL])
    out = capsys.readouterr().out
    calls = int(out.split(" verifier calls")[0].rsplit(" ", 1)[1])
    assert [line.startswith(f"call {i + 1}: ") for i, line in enumerate(
        x for x in out.splitlines() if x.startswith("call "))] == [True] * calls
    assert "merged: d0: 8 nodes" in out and "\033[" not in out   # not a terminal: plain text
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == calls and {tuple(x["routing"]["chosen"]) for x in lines} == {(0, 1)}
    assert {tuple(o) for x in lines for o in x["tree"]["origin"][1:]} == {(0,), (1,)}
    assert all(len(x["tree"]["tokens"]) - 1 + len(x["pruned"]) == 2 * (4 + 3 * 4 ** 2)
               for x in lines)                              # two pools of top_k + depth top_k^2
    assert len(list(ET.parse(page).getroot().iter(SVG))) == calls
    assert "and pruned;" in page.read_text()                # what the rerank dropped, drawn


@pytest.mark.parametrize("compose", [["--compose", "route-entropy"], ["--chain"]])
def test_show_on_the_embedded_default_for_other_compositions(default, compose, capsys):
    chain = compose == ["--chain"]
    taps.main(["--prompt", "Hi", *["--drafter", "random"] * (1 if chain else 2), *compose, "--show",
               "--temperature", "1", *(FEW if chain else SMALL)])
    out = capsys.readouterr().out
    assert "call 1: " in out and "drew " in out
