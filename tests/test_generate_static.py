"""`generate` on the static path (compile="static": fixed shapes run eagerly; "eager", "aot_eager":
traced whole by torch.compile) against today's eager path and plain decoding: greedy equality for
single, merged, chain and AutoTree trees, the same calls and acceptances as the eager path, no
recompile once warm. The Monte Carlo tests of tests/test_taps.py run this path too."""
import random
from collections import Counter

import pytest
import torch

import taps
from conftest import (broken_sampling, chi_square_p, exact_first_tokens, near_oracle, prompts,
                      random_tree, tiny)
from extras.autotree import AutoTree, verify_table
from model import TapsError, generate_plain
from taps import Drafter, Sampling, TorchRandom, TreeShape, generate

V = 64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no graph, recompile count or cached step carries over."""
    torch._dynamo.reset()
    taps._STATIC.clear()
    yield
    torch._dynamo.reset()
    taps._STATIC.clear()


def setup(mode: str):
    """(target, drafters, tree, compose) of a decoding mode; a near-oracle drafter, so long paths
    are accepted, except "random" (mostly rejections) and "twice" (one drafter composed with
    itself: each occurrence keeps its own static cache)."""
    target = tiny(V=V, n_layers=2 if mode == "random" else 1)
    d = Drafter.random(target, 1) if mode == "random" else near_oracle(target)
    shape = TreeShape(top_k=3, depth=3, total_tokens=10, chain=mode == "chain")
    if mode in ("merged", "twice"):
        other = d if mode == "twice" else Drafter.random(target, 2)
        return target, [d, other], shape, "merged"
    if mode == "auto":      # a flat verify cost: every call drafts, trees of any size up to 48
        return target, d, AutoTree(verify_table({1: 1.0, 48: 1.0}, 48), max_depth=3), "single"
    return target, d, shape, "single"


@pytest.mark.parametrize("compile", ["static", "aot_eager"])   # "eager": in the recompile test
@pytest.mark.parametrize("mode", ["single", "random", "merged", "twice", "chain", "auto"])
def test_greedy_on_the_static_path_is_exactly_the_target(mode, compile):
    target, drafters, tree, compose = setup(mode)
    accepted = 0
    for prompt in prompts(V, n=2):
        ref = generate_plain(target, prompt, 32)
        fresh = lambda: (AutoTree(tree.verify_s, max_depth=3) if mode == "auto" else tree)
        eager, s_eager = generate(target, drafters, prompt, Sampling(max_new_tokens=32), fresh(),
                                  compose)
        out, s = generate(target, drafters, prompt, Sampling(max_new_tokens=32), fresh(), compose,
                          compile=compile)
        assert out == eager == ref
        if mode != "auto":   # AutoTree's depth also reads the clock: the same output, not calls
            assert (s.accepted, s.tree_size) == (s_eager.accepted, s_eager.tree_size)
        accepted += sum(s.accepted)
        stop = ref[12]       # a stop token: both stop right after its first occurrence
        out, _ = generate(target, drafters, prompt, Sampling(max_new_tokens=32, stop_ids={stop}),
                          fresh(), compose, compile=compile)
        assert out == ref[:ref.index(stop) + 1]
    if mode != "random":     # long accepted paths were exercised, not just corrections
        assert accepted > 30


@torch.inference_mode()
def test_no_recompile_after_warm_up():
    """Prompt lengths, trees, accepted paths and feeds are all tensors of fixed shapes: once one
    generate has built every graph, another prompt compiles nothing."""
    counters = torch._dynamo.utils.counters
    target, drafters, tree, _ = setup("single")
    generate(target, drafters, prompts(V, n=1, length=12)[0], Sampling(1.0, max_new_tokens=16),
             tree, compile="eager")                                              # warm-up
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 5        # target: prefill chunk, tree, keep; drafter: feeds, frontier
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in prompts(V, n=3, length=5):
            generate(target, drafters, prompt, Sampling(1.0, max_new_tokens=16), tree,
                     compile="eager")
    assert counters["stats"]["unique_graphs"] == graphs


def test_bad_compile_backend_and_too_large_a_tree():
    target = tiny(V=V)
    d = Drafter.random(target)
    with pytest.raises(TapsError, match="unknown compile backend 'fast'"):
        generate(target, d, [1, 2], compile="fast")
    with pytest.raises(TapsError, match="exceeds the largest static size"):
        generate(target, d, [1, 2], tree=TreeShape(10, 3, None), compile="static")


def test_one_synchronising_clock_per_verifier_call(monkeypatch):
    """On CUDA `clock` waits for the device: generate reads it twice around prefill and once per
    verifier call, after keep; the draft / verify split reads the host's clock, at the point where
    the drafted tree (or chain) is already on the host."""
    ticks, clock = [], taps.clock
    monkeypatch.setattr(taps, "clock", lambda device: ticks.append(device) or clock(device))
    for mode in ("merged", "chain"):
        target, drafters, tree, compose = setup(mode)
        for compile in (None, "static"):
            ticks.clear()
            _, s = generate(target, drafters, prompts(V)[0], Sampling(max_new_tokens=16), tree,
                            compose, compile=compile)
            assert len(ticks) == s.calls + 2 and s.draft_time > 0 and s.verify_time > 0


@pytest.fixture
def host_head(monkeypatch):
    """The GPU's verifier head on this CPU: every first copy's p in one pass and one host copy."""
    monkeypatch.setattr(taps, "lazy_head", lambda device: False)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.6, 0.8)])
def test_the_host_head_gives_what_the_lazy_head_gives(temperature, top_p):
    """At every node the walk may stand on (a merged tree's first copies), HostHead's p -- one pass,
    one host copy, at T = 0 only each node's token -- is TargetHead's, and so are the entropies."""
    target = tiny(V=V, n_layers=1)
    rnd = random.Random(temperature)
    tree = taps.merge([random_tree(rnd, V, 5, max_nodes=12) for _ in range(2)])
    h = torch.randn(len(tree), target.args.dim, dtype=torch.float64)             # (N, H)
    sampling = Sampling(temperature, top_p)
    host, lazy = (head(target, tree, h, sampling) for head in (taps.HostHead, taps.TargetHead))
    nodes = sorted(set(tree.first))
    assert host.p.shape == (len(nodes), 1 if temperature == 0 else V)   # what crossed to the host
    for i in nodes:
        p, q = host(i), lazy(i)
        assert (p.dtype == q.dtype
                and (torch.equal(p, q) if temperature == 0 else torch.allclose(p, q)))
    assert host.entropies(nodes) == pytest.approx(lazy.entropies(nodes))


@pytest.mark.parametrize("mode", ["merged", "chain", "auto"])
def test_greedy_with_the_batched_host_head(mode, host_head):
    target, drafters, tree, compose = setup(mode)
    for prompt in prompts(V, n=2):
        out, s = generate(target, drafters, prompt, Sampling(max_new_tokens=32), tree, compose,
                          compile="static")
        assert out == generate_plain(target, prompt, 32) and sum(s.accepted) > 10


@pytest.mark.parametrize("mode", ["tree", "chain"])
@pytest.mark.parametrize("wrong", [False, True])
def test_monte_carlo_with_the_batched_host_head(mode, wrong, host_head, monkeypatch):
    """As tests/test_taps.py's Monte Carlo: T = 1, V = 4, the first two tokens are the target's;
    a verifier sampling at temperature 0.5 is rejected."""
    if wrong:
        broken_sampling(monkeypatch, temperature=0.5)
    target = tiny(V=4, n_layers=1)
    drafter = near_oracle(target)
    prompt, n, rng = [1, 2, 3], 1500, TorchRandom(7)
    shape = TreeShape(top_k=2, depth=2, total_tokens=5, chain=mode == "chain")
    samples = [tuple(generate(target, drafter, prompt, Sampling(1.0, max_new_tokens=2), shape,
                              rng=rng, compile="static")[0]) for _ in range(n)]
    p = chi_square_p(Counter(samples), exact_first_tokens(target, prompt, 2), n)
    assert (p < 1e-6) if wrong else (p > 1e-6)
