"""The static-shape path (model.py: StaticCache, StaticSteps, compile_step) against today's eager
forward: bit for bit in float64 (prefill, decode, trees padded to any bucket, keep after a
non-first branch, the drafter's layer at every depth), traced whole by torch.compile, and free of
recompiles once warm."""
import functools
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import conftest
import taps
from model import (StaticCache, StaticSteps, TapsError, bucket, compile_step, generate_plain,
                   pad_path, pad_tree, static_length, static_mask)

V = 97
tiny = functools.partial(conftest.tiny, V=V, tie=True)        # float64, 2 layers, GQA 4/2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no graph or recompile count carries over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def math_sdpa():
    """The exact comparisons run SDPA's math kernel: the CPU flash kernel's sums over keys depend
    on the key count (vector tails), so there today's L + T keys and the static S keys can differ
    in the last bit for some lengths (1 ulp at 5 or 7 keys); the math kernel adds masked keys as
    exact zeros, which shows the two paths compute the same thing."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def random_parents(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [-1] + [rnd.randrange(i) for i in range(1, n)]


def tree_tensors(parents):
    """Ancestor mask (N, N) and depths (N,) of a tree given by parent ids (parents precede)."""
    n = len(parents)
    mask, depths = torch.eye(n, dtype=torch.bool), [0] * n
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
        depths[i] = depths[parents[i]] + 1
    return mask, torch.tensor(depths)


def sliced_tree(m, prefix, tokens, parents):
    """Today's eager path: prefix into a KVCache, then the tree in one call; features (N, H)."""
    cache = m.new_cache(1, 512)
    m(prefix, cache=cache)
    mask, depths = tree_tensors(parents)
    _, h = m(tokens[None], prefix.shape[1] + depths[None], mask[None], cache, head=False)
    return h[0], cache


def padded(tokens, parents, size, garbage: int):
    """pad_tree's tensors with random tokens and depths in the pad rows (their outputs are dropped,
    so nothing they hold may reach a real row)."""
    mask, depths = tree_tensors(parents)
    tok, dep, rows, n = pad_tree(tokens, mask, depths, size)
    g = torch.Generator().manual_seed(garbage)
    N = len(parents)
    tok[0, N:] = torch.randint(V, (size - N,), generator=g)
    dep[N:] = torch.randint(50, (size - N,), generator=g)
    return tok, dep, rows, n


# ------------------------------------------------------------------------- eager, float64: exact

@torch.inference_mode()
def test_prefill_and_decode_equal_the_sliced_cache_exactly(math_sdpa):
    m = tiny()
    prompt = torch.randint(V, (1, 70))                     # two prefill chunks
    steps = StaticSteps(m)
    logits, h = steps.prefill(prompt)
    ref, h_ref = m(prompt)
    assert torch.equal(logits, ref[:, -1]) and torch.equal(h, h_ref)
    assert int(steps.cache.length) == 70
    cache = m.new_cache(1, 256)
    m(prompt, cache=cache)
    for tok in (5, 0, 96, 5):
        x = torch.tensor([[tok]])
        assert torch.equal(steps.decode(x), m(x, cache=cache)[0][:, -1])
    assert int(steps.cache.length) == cache.length == 74


@pytest.mark.parametrize("n_nodes, sizes", [(1, (1, 8)), (13, (16, 64)), (61, (64, 128))])
@torch.inference_mode()
def test_trees_padded_to_any_bucket_score_exactly_as_today(n_nodes, sizes, math_sdpa):
    """The study's 61-node tree fits bucket 64; the same tree padded further, with garbage in
    the pad tokens and depths, leaves every real row identical."""
    m = tiny()
    prefix = torch.randint(V, (1, 9))
    parents = random_parents(n_nodes, seed=n_nodes)
    tokens = torch.randint(V, (n_nodes,))
    ref, _ = sliced_tree(m, prefix, tokens, parents)
    assert bucket(n_nodes) == sizes[0]
    for size in sizes:
        steps = StaticSteps(m)
        steps.prefill(prefix)
        h = steps.score(*padded(tokens, parents, size, garbage=size))
        assert torch.equal(h[0, :n_nodes], ref), size
        assert int(steps.cache.length) == 9                # a tree is provisional until keep


@pytest.mark.parametrize("path", [[0, 2, 4], [0, 1, 3, 5], [0]])
@torch.inference_mode()
def test_keep_after_any_branch_then_decode_exactly(path, math_sdpa):
    """[0, 2, 4] takes the root's second child: its rows move down past the rejected branch."""
    m = tiny()
    prefix = torch.randint(V, (1, 7))
    parents, tokens = [-1, 0, 0, 1, 2, 3], torch.tensor([40, 41, 42, 43, 44, 45])
    _, cache = sliced_tree(m, prefix, tokens, parents)
    cache.keep(7, path)
    steps = StaticSteps(m)
    steps.prefill(prefix)
    steps.score(*padded(tokens, parents, 8, garbage=1))
    steps.keep(*pad_path(path, 8, "cpu"))
    assert int(steps.cache.length) == cache.length == 7 + len(path)
    for tok in (9, 10):
        x = torch.tensor([[tok]])
        assert torch.equal(steps.decode(x), m(x, cache=cache)[0][:, -1])
    # and a second tree on top of the kept path
    h_ref = m(tokens[None, :3], cache.length + torch.tensor([[0, 1, 1]]),
              tree_tensors([-1, 0, 0])[0][None], cache, head=False)[1]
    h = steps.score(*padded(tokens[:3], [-1, 0, 0], 8, garbage=2))
    assert torch.equal(h[:, :3], h_ref)
    for i in range(m.args.n_layers):
        assert all(torch.isfinite(buf).all() for buf in steps.cache.kv(i))   # never a NaN


def test_the_mask_keeps_pad_rows_and_real_rows_apart():
    parents = random_parents(5, seed=3)
    mask, depths = tree_tensors(parents)
    _, _, rows, n = pad_tree(torch.arange(5), mask, depths, 8)
    length, S = torch.tensor(20), 256
    slots = length + torch.arange(8)
    m = static_mask(rows, n, slots, length, S)[0, 0]                    # (T, S)
    assert m.shape == (8, S) and m.any(-1).all()                       # every row sees a key
    assert torch.equal(m[5:], torch.nn.functional.one_hot(slots[5:], S).bool())  # pads: own slot
    assert not m[:5, 25:].any()                                        # reals: never a pad slot
    assert m[:5, :20].all() and torch.equal(m[:5, 20:25], mask)        # prefix, then ancestors


def drafter_step(drafter, target, cache, tokens, feats, pos, slots, rows, n):
    """The drafter on the static path, as taps.py would call it: the generic Block with (slots,
    static_mask) over a one-layer StaticCache. Draft logits (B, T, V) and features (B, T, H)."""
    mask = static_mask(rows, n, slots, cache.length, cache.size)
    x = drafter.fc(torch.cat([target.embed_tokens(tokens), feats], dim=-1))
    cos, sin = target.rope(pos, x.dtype)
    h = drafter.layers[0](x, cos, sin, mask, cache, 0, slots)
    return drafter.head(target, h).float(), h


def record_drafter_calls(monkeypatch, target, drafter, prompt, shape):
    """Every Drafter call of one prefix feed and one draft_tree, with inputs and outputs."""
    calls, forward = [], taps.Drafter.forward

    def recording(self, target, tokens, feats, cache=None, input_pos=None, mask=None, **kw):
        L = cache.length
        out = forward(self, target, tokens, feats, cache, input_pos, mask, **kw)
        calls.append(dict(tokens=tokens, feats=feats, pos=input_pos, mask=mask, L=L, out=out))
        return out
    monkeypatch.setattr(taps.Drafter, "forward", recording)
    _, f = target(prompt)
    state = taps.DraftState(drafter, drafter.new_cache(256))
    state.extend(prompt[0, 1:], f[0, :-1])
    taps.draft_tree(state, target, int(prompt[0, -1]), shape)
    return calls


@torch.inference_mode()
def test_the_drafter_layer_at_every_depth_equals_today(monkeypatch, math_sdpa):
    m = tiny()
    drafter = taps.Drafter.random(m)
    prompt = torch.randint(V, (1, 8))
    shape = taps.TreeShape(top_k=3, depth=4, total_tokens=None)
    calls = record_drafter_calls(monkeypatch, m, drafter, prompt, shape)
    assert len(calls) == 1 + shape.depth
    a = drafter.args
    cache = StaticCache(1, a.n_kv_heads, a.head_dim, 256, torch.float64, "cpu")
    # the prefix feed: a causal chain, padded to its bucket
    feed = calls[0]
    P, T = feed["tokens"].shape[1], bucket(feed["tokens"].shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, T - P) if x.dim() == 3 else (0, T - P))
    _, h = drafter_step(drafter, m, cache, pad(feed["tokens"]), pad(feed["feats"]),
                        torch.arange(T)[None], torch.arange(T),
                        torch.ones(T, T, dtype=torch.bool).tril(), torch.tensor(P))
    assert torch.equal(h[:, :P], feed["out"][1])
    assert torch.equal(drafter.head(m, h[:, P - 1:P]).float(), feed["out"][0])
    cache.length.add_(P)
    # each depth: the frontier of k nodes in a window of depth * k slots after the prefix
    k, W = shape.top_k, shape.depth * shape.top_k
    for d, call in enumerate(calls[1:], 1):
        assert call["L"] == P + (d - 1) * k and call["tokens"].shape == (1, k)   # fed so far
        rows = torch.zeros(k, W, dtype=torch.bool)
        rows[:, :d * k] = call["mask"][0, :, P:]
        logits, h = drafter_step(drafter, m, cache, call["tokens"], call["feats"], call["pos"],
                                 P + (d - 1) * k + torch.arange(k), rows, torch.tensor(k))
        assert torch.equal(logits, call["out"][0]) and torch.equal(h, call["out"][1]), d


@pytest.mark.parametrize("device", conftest.DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_plain_on_the_static_path_equals_today(device, temperature):
    m = tiny(device=device)
    steps = StaticSteps(m)
    for prompt in conftest.prompts(V, n=2, length=6):
        run = lambda s: generate_plain(m, prompt, 20, temperature, stop_ids=(), steps=s,
                                       generator=torch.Generator(device).manual_seed(1))
        assert run(steps) == run(None)


def test_static_sizes_round_up_and_oversized_trees_are_refused():
    assert [static_length(n) for n in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 8192]
    assert [bucket(n) for n in (1, 2, 8, 9, 61, 129, 256)] == [1, 8, 8, 16, 64, 256, 256]
    with pytest.raises(TapsError, match="257 nodes exceeds"):
        bucket(257)
    with pytest.raises(TapsError, match="path of 9 nodes exceeds"):
        pad_path(list(range(9)), 8, "cpu")
    steps = StaticSteps(tiny())
    steps.fit(300)
    assert steps.cache.size == 512


# ----------------------------------------------------------------------------- compiled

@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@torch.inference_mode()
def test_every_step_traces_as_one_graph(backend):
    """fullgraph=True: a graph break or an unsupported in-place op fails here; the traced steps
    compute what the eager ones do."""
    m = tiny()
    ref, fast = StaticSteps(m), StaticSteps(m, backend=backend)
    prompt, parents = torch.randint(V, (1, 70)), random_parents(13, seed=4)
    tokens = torch.randint(V, (13,))
    for s in (ref, fast):
        s.out = [*s.prefill(prompt), s.score(*padded(tokens, parents, 16, garbage=0))]
        s.keep(*pad_path([0, 3, 7], 8, "cpu"))
        s.out.append(s.decode(torch.tensor([[11]])))
    assert all(torch.equal(a, b) for a, b in zip(ref.out, fast.out))
    assert int(fast.cache.length) == 70 + 3 + 1
    # the drafter's step (taps.py's to wire): one graph too
    d = taps.Drafter.random(m)
    cache = StaticCache(1, d.args.n_kv_heads, d.args.head_dim, 256, torch.float64, "cpu")
    step = compile_step(functools.partial(drafter_step, d, m, cache), "cpu", backend)
    args = (torch.randint(V, (1, 8)), torch.randn(1, 8, m.args.dim, dtype=torch.float64),
            torch.arange(8)[None], torch.arange(8), torch.ones(8, 8, dtype=torch.bool).tril(),
            torch.tensor(5))
    out = step(*args)
    cache.length.zero_()
    assert all(torch.equal(a, b) for a, b in zip(out, drafter_step(d, m, cache, *args)))


@torch.inference_mode()
def test_no_recompile_after_warm_up():
    """Prompt lengths, tree sizes within a bucket, paths, temperatures: all tensors or host-side,
    so once each role has its graph nothing compiles again."""
    counters = torch._dynamo.utils.counters
    m = tiny()
    steps = StaticSteps(m, backend="eager")
    generate_plain(m, [3, 1, 4], 5, steps=steps)                      # warm-up: prefill, decode
    steps.score(*padded(torch.arange(9), random_parents(9, 0), 16, 0))
    steps.keep(*pad_path([0, 1], 8, "cpu"))
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n_prompt in (1, 9, 70, 150):
            prompt = [i % V for i in range(n_prompt)]
            assert generate_plain(m, prompt, 6, 0.5, steps=steps) is not None
        for n, path in ((10, [0, 2]), (16, [0, 5, 9, 12])):
            steps.score(*padded(torch.arange(n), random_parents(n, n), 16, n))
            steps.keep(*pad_path(path, 8, "cpu"))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("device", conftest.DEVICES)
@torch.inference_mode()
def test_inductor_decode_matches_eager(device):
    """The one inductor compile of the suite (~30 s cold): the decode step in fp32, against the
    eager static step within a tolerance (vectorised sin/cos differ by ~1e-6). On CUDA it runs as a
    CUDA graph, whose outputs must survive the next replay."""
    m = tiny(dtype=torch.float32, device=device)
    ref, fast = StaticSteps(m), StaticSteps(m)
    compiled = compile_step(fast.decode, device)
    prompt = torch.randint(V, (1, 9), device=device)
    ref.prefill(prompt)
    fast.prefill(prompt)
    outs = []
    for tok in (5, 6, 7, 8):
        x = torch.tensor([[tok]], device=device)
        a, b = ref.decode(x), compiled(x)
        outs.append(b)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.equal(outs[0], outs[1])              # each output is its own tensor
    assert int(fast.cache.length) == 13
