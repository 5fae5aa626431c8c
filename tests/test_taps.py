"""taps.py on tiny random targets: trees, drafter checkpoints, bad input, tau, greedy equivalence
(exact, float64) and Monte Carlo losslessness of the real torch path (chi-square, alpha = 1e-6)."""
import json
import math
from collections import Counter
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

from conftest import (DEVICES, broken_sampling, chi_square_p, count_second_copies, entropies_of,
                      exact_first_tokens, near_oracle, node_tokens, prompts, tiny)
from extras.checkpoint import load_drafter
from model import TapsError, generate_plain
from taps import (COMPOSE, DraftState, Drafter, Sampling, Stats, TorchRandom, Tree, TreeShape,
                  draft_tree, generate, grow_tree, main, merge)


# ----------------------------------------------------------------------------- trees

def test_a_tree_knows_its_depths_children_paths_mask_and_confidence():
    #      0
    #    1   2
    #   3 4   5
    #   6
    t = Tree(tokens=[9, 1, 2, 3, 4, 5, 6], parents=[None, 0, 0, 1, 1, 2, 3],
             logq=[0, -1, -2, -1.5, -3, -2.5, -2], entropy=[None] + [0.5] * 6)
    assert t.depths == (0, 1, 1, 2, 2, 2, 3)
    assert t.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())
    assert ([t.path_to(leaf) for leaf, kids in enumerate(t.children) if not kids]
            == [[0, 1, 4], [0, 2, 5], [0, 1, 3, 6]])
    m = t.mask
    assert m[6].tolist() == [True, True, False, True, False, False, True]
    assert m.sum().item() == 1 + 2 + 2 + 3 + 3 + 3 + 4
    assert t.confidence[1] == pytest.approx(math.exp(-1))


def table_expand(V, seed):
    """grow_tree's expand() over a fixed random table of draft log-probs, one row per token path."""
    def logp_of(path):
        g = torch.Generator().manual_seed(hash((seed,) + path) % 2**31)
        return torch.log_softmax(torch.randn(V, generator=g) * 2, -1)

    frontiers = []   # token paths of each expanded frontier

    def expand(tokens, slots):   # slots index the previous frontier: the root alone, (), at first
        parents = [(frontiers[-1] if frontiers else [()])[s] for s in slots.tolist()]
        frontiers.append([p + (x,) for p, x in zip(parents, tokens.tolist())])
        return torch.stack([logp_of(p) for p in frontiers[-1]])
    return logp_of, expand, frontiers


@settings(max_examples=60, deadline=None)
@given(V=st.integers(2, 12), top_k=st.integers(1, 5), depth=st.integers(1, 4), n=st.integers(1, 40),
       seed=st.integers(0, 999))
def test_grow_tree_is_eagle2(V, top_k, depth, n, seed):
    total = max(n, depth)
    k = min(top_k, V)
    trees = []
    for total_tokens in (10**6, total):
        logp_of, expand, frontiers = table_expand(V, seed)
        trees.append(grow_tree(7, logp_of(()), expand, TreeShape(top_k, depth, total_tokens)))
        assert len(frontiers) == depth
    full, small = trees
    assert len(full) - 1 == k + depth * k * k                        # the whole candidate pool
    assert len(small) - 1 == min(total, len(full) - 1)
    for t in (full, small):
        assert t.tokens[0] == 7 and t.parents[0] is None
        assert all(0 <= t.parents[i] < i for i in range(1, len(t)))     # connected, parents first
        assert max(t.depths) <= depth + 1
    # scores are cumulative draft log-probs; every expanded node has its top-k children
    children = full.children
    for i in range(1, len(full)):
        par = full.parents[i]
        lp = logp_of(node_tokens(full, par))
        assert full.logq[i] == pytest.approx(full.logq[par] + lp[full.tokens[i]].item(), abs=1e-5)
        if children[i]:
            assert (sorted(full.tokens[c] for c in children[i])
                    == sorted(logp_of(node_tokens(full, i)).topk(k).indices.tolist()))
    # the frontier at each depth is the top-k by score of that depth's candidates
    d = full.depths
    for level in range(1, depth + 1):
        nodes = [i for i in range(1, len(full)) if d[i] == level]
        best = sorted(nodes, key=lambda i: -full.logq[i])[:k]
        assert {full.logq[i] for i in nodes if children[i]} == {full.logq[i] for i in best}
    # the kept tree is the best `total_tokens` of the pool
    ranked = sorted(range(1, len(full)), key=lambda i: (-full.logq[i], i))[:len(small) - 1]
    assert ({node_tokens(full, i) for i in ranked}
            == {node_tokens(small, i) for i in range(1, len(small))})


def test_draft_tree_masks_and_positions_match_a_plain_chain_run():
    """Every tree node's score equals the drafter run causally, without a tree, along its path."""
    target = tiny(V=32)
    drafter = Drafter.random(target, 1).double()
    prompt = prompts(32)[0]
    with torch.inference_mode():
        cache = target.new_cache(1, 64)
        _, f = target(torch.tensor([prompt]), cache=cache)
        state = DraftState(drafter, drafter.new_cache(128))
        pairs = torch.tensor(prompt[1:] + [5])
        state.extend(pairs, f[0])
        state.ready(target)
        L = state.cache.length
        tree = draft_tree(state, target, 5, TreeShape(top_k=3, depth=3, total_tokens=20))
        assert state.cache.length == L                              # back to the prefix
        for i in range(1, len(tree)):
            path = node_tokens(tree, i)
            logits, h, logq = state.logits, state.h, 0.0
            for j, x in enumerate(path):
                logq += torch.log_softmax(logits, -1)[x].item()
                if j + 1 < len(path):
                    out, hs = drafter(target, torch.tensor([[x]]), h[None, None], state.cache)
                    logits, h = out[0, -1], hs[0, -1]
            state.cache.truncate(L)
            assert tree.logq[i] == pytest.approx(logq, abs=1e-6)


# ---------------------------------------------------------------- drafter checkpoints and bad input

def test_a_saved_drafter_loads_back_bit_for_bit_with_its_metadata(tmp_path):
    target = tiny(V=32, name="tiny-a")
    d = Drafter.random(target, 3)
    d.meta.update(backbone="hass", domain="math", data="gsm8k train, 100 conversations")
    d.save(tmp_path / "d.safetensors")
    e = load_drafter(tmp_path / "d.safetensors", target)
    assert (e.meta["backbone"] == "hass" and e.meta["domain"] == "math"
            and e.meta["target"] == "tiny-a")
    assert e.meta["vocab_size"] == 32 and e.meta["dim"] == 64
    for k, v in d.state_dict().items():
        assert torch.equal(v, e.state_dict()[k])
    assert set(d.state_dict()) >= {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight",
                                   "layers.0.post_attention_layernorm.weight",
                                   "layers.0.mlp.up_proj.weight"}
    assert not any("input_layernorm" in k or "embed" in k for k in d.state_dict())


@pytest.mark.parametrize("other",
                         [dict(V=48, name="tiny-a"), dict(V=32, dim=32, name="tiny-a"),
                          dict(V=32, name="tiny-b")])
def test_drafter_for_another_target_is_refused(tmp_path, other):
    Drafter.random(tiny(V=32, name="tiny-a"), 0).save(tmp_path / "d.safetensors")
    with pytest.raises(TapsError, match="d.safetensors: drafter was trained for target 'tiny-a'"):
        load_drafter(tmp_path / "d.safetensors", tiny(**other))


def test_a_missing_or_junk_drafter_checkpoint_is_refused(tmp_path):
    target = tiny(V=32)
    with pytest.raises(TapsError, match="no such drafter checkpoint"):
        load_drafter(tmp_path / "missing.safetensors", target)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(TapsError, match="junk.safetensors: not a taps drafter checkpoint"):
        load_drafter(tmp_path / "junk.safetensors", target)


# ------------------------------------------------------------------------- public EAGLE checkpoints

def eagle_checkpoint(path, drafter, target, bias=True, weights="pytorch_model.bin"):
    """A directory as SafeAILab/EAGLE publishes a drafter (cnets.py's names): config.json with
    `bias`, fc.weight [fc.bias], layers.0.* without an input norm, and the target's embedding, in
    fp16."""
    a = drafter.args
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "bias": bias, "hidden_size": a.dim, "intermediate_size": a.hidden_dim,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "num_hidden_layers": 1, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "vocab_size": a.vocab_size, "max_position_embeddings": 2048, "pad_token_id": 0,
        "torch_dtype": "float16"}))
    state = {k: v.half() for k, v in drafter.state_dict().items() if bias or k != "fc.bias"}
    state["embed_tokens.weight"] = target.embed_tokens.weight.detach().half()
    assert not any("input_layernorm" in k for k in state)
    if weights.endswith(".bin"):
        torch.save(state, path / weights)
    else:
        save_file(state, str(path / weights))
    return path


@pytest.mark.parametrize("bias, weights",
                         [(True, "pytorch_model.bin"), (False, "model.safetensors")])
def test_a_public_eagle_checkpoint_drafts_exactly_like_the_same_weights_in_taps_format(
        tmp_path, bias, weights):
    target = tiny(V=64, n_layers=1)
    d = Drafter.random(target, 3)
    with torch.no_grad():
        for p in d.parameters():   # fp16-exact weights, so both formats hold the very same numbers
            p.copy_(p.half())
        if not bias:
            d.fc.bias.zero_()
    d.save(tmp_path / "taps.safetensors")
    ours = load_drafter(tmp_path / "taps.safetensors", target)
    theirs = load_drafter(eagle_checkpoint(tmp_path / "eagle", d, target, bias, weights), target)
    assert theirs.meta["external"] == "eagle" and theirs.meta["target"] == target.args.name
    tokens, feats = torch.randint(64, (1, 9)), torch.randn(1, 9, 64, dtype=torch.float64)
    for x, y in zip(ours(target, tokens, feats), theirs(target, tokens, feats)):
        assert torch.equal(x, y)
    for prompt in prompts(64, n=2):
        a, b = (generate(target, dr, prompt, Sampling(temperature=1.0, max_new_tokens=24),
                         TreeShape(top_k=4, depth=3, total_tokens=10), rng=TorchRandom(5))
                for dr in (ours, theirs))
        assert a[0] == b[0] and a[1].accepted == b[1].accepted and a[1].tree_size == b[1].tree_size


def test_a_public_eagle_checkpoint_is_refused_with_one_line(tmp_path):
    target = tiny(V=64, n_layers=1)
    good = eagle_checkpoint(tmp_path / "good", Drafter.random(target), target)
    with pytest.raises(TapsError, match=r"EAGLE drafter for hidden size 64, vocab 64; the target "
                                        r"'' has hidden size 32, vocab 64"):
        load_drafter(good, tiny(V=64, dim=32))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_bytes((good / "config.json").read_bytes())
    raw = (good / "pytorch_model.bin").read_bytes()
    (tmp_path / "cut" / "pytorch_model.bin").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(TapsError, match=r"pytorch_model.bin: unreadable EAGLE weights "
                                        r".*download the checkpoint again"):
        load_drafter(tmp_path / "cut", target)
    torch.save({"fc.weight": torch.zeros(1), "code": Fraction(1, 3)},
               tmp_path / "cut" / "pytorch_model.bin")
    with pytest.raises(TapsError, match=r"holds pickled objects besides tensors, refused "
                                        r"\(torch.load weights_only\)"):
        load_drafter(tmp_path / "cut", target)
    (tmp_path / "cut" / "pytorch_model.bin").unlink()
    with pytest.raises(TapsError, match="no model.safetensors or pytorch_model.bin in this EAGLE "
                                        "checkpoint directory"):
        load_drafter(tmp_path / "cut", target)
    (tmp_path / "cut" / "config.json").unlink()
    with pytest.raises(TapsError, match="config.json: file not found"):
        load_drafter(tmp_path / "cut", target)


@pytest.mark.parametrize("bad, message", [
    (lambda: TreeShape(total_tokens=3, depth=5), r"total_tokens \(3\) must be >= depth \(5\)"),
    (lambda: TreeShape(top_k=0), "top_k and depth must be >= 1"),
    (lambda: Sampling(temperature=-0.5), "temperature must be finite and >= 0"),
    (lambda: Sampling(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda: Sampling(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda: Sampling(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (lambda: generate(tiny(V=32), Drafter.random(tiny(V=32)), [1, 2, 3], compose="nonsense"),
     "unknown compose 'nonsense'"),
])
def test_bad_tree_and_sampling_arguments_are_refused_by_name(bad, message):
    with pytest.raises(TapsError, match=message):
        bad()


@pytest.mark.parametrize("other", [dict(V=48), dict(V=32, dim=32)])
def test_a_drafter_for_another_vocabulary_or_width_is_refused(other):
    target = tiny(V=32)
    with pytest.raises(TapsError, match="does not match the target"):
        generate(target, Drafter.random(tiny(**other)), [1, 2, 3], Sampling(max_new_tokens=8))


def test_single_compose_takes_one_drafter():
    target = tiny(V=32)
    with pytest.raises(TapsError, match="compose 'single' takes exactly one drafter, got 2"):
        generate(target, [Drafter.random(target, 0), Drafter.random(target, 1)], [1, 2, 3])
    assert "single" in COMPOSE


# ----------------------------------------------------------------------------- tau and statistics

def test_tau_and_acceptance_by_depth_match_their_definitions_by_hand():
    s = Stats(accepted=[2, 0, 3], new_tokens=(2 + 1) + (0 + 1) + (3 + 1))
    assert s.calls == 3 and s.tau == 8 / 3
    # of the calls that reached depth d-1, the share that accepted a token at depth d
    assert s.acceptance_by_depth() == [2 / 3, 2 / 2, 1 / 2, 0 / 1]
    assert math.isnan(Stats().tau)
    # a path that ended at a leaf had no child to accept below it: it leaves that depth's
    # denominator
    s = Stats(accepted=[2, 0, 3], leaf=[True, False, True])
    assert s.acceptance_by_depth() == [2 / 3, 2 / 2, 1 / 1]
    assert Stats(accepted=[6, 6, 6], leaf=[True] * 3).acceptance_by_depth() == [1.0] * 6


def test_entropies_count_only_judgements_whose_token_was_emitted():
    """A stop token (or the budget) can end a call inside its accepted path: judgements below it
    never produced an emitted token and stay out of Tables 7-8's lists (the call itself still
    counts)."""
    #  0 -> 1 (x=5) -> 2 (x=6);  1 -> 3 (x=7) rejected;  0 -> 4 (x=8) rejected
    tree = Tree([4, 5, 6, 7, 8], [None, 0, 1, 1, 0], [0, -1, -2, -3, -4],
                [None, 0.1, 0.2, 0.3, 0.4])
    # entropies log 3 and about log 2
    logits = {0: torch.zeros(3), 1: torch.tensor([0.0, 9.0, 9.0])}
    for emitted, accepted, rejected in ((1, [0.1], [0.4]), (2, [0.1, 0.2], [0.4, 0.3]),
                                        (3, [0.1, 0.2], [0.4, 0.3])):
        s = Stats()
        s.record(tree, [0, 1, 2], [4, 3], entropies_of(logits), emitted, 0.0, 0.0)
        assert (s.accepted == [2] and s.draft_entropy_accepted == accepted
                and s.draft_entropy_rejected == rejected)
        assert (len(s.target_entropy_accepted) == len(accepted)
                and len(s.target_entropy_rejected) == len(rejected))
        assert s.target_entropy_accepted[0] == pytest.approx(math.log(3))


def test_alpha_by_depth_counts_only_emitted_tokens():
    """Like tau, alpha counts what was emitted: where a stop token or the budget ended the last call
    inside its accepted path, the acceptances below the cut and the rejections after them produced
    no token. Before issue 30 they counted (here alpha would read [1, 1, 0] for a call that emitted
    one token)."""
    #  0 -> 1 (x=5) -> 2 (x=6) -> {3 (x=7), 4 (x=8)}: 5 and 6 accepted, 7 and 8 rejected
    tree = Tree([4, 5, 6, 7, 8], [None, 0, 1, 2, 2], [0, -1, -2, -3, -4],
                [None, 0.1, 0.2, 0.3, 0.4])
    logits = {i: torch.zeros(3) for i in range(3)}
    whole, cut = Stats(), Stats()
    # 5, 6 and the correction emitted
    whole.record(tree, [0, 1, 2], [3, 4], entropies_of(logits), 3, 0.0, 0.0)
    # the budget ended the call after 5
    cut.record(tree, [0, 1, 2], [3, 4], entropies_of(logits), 1, 0.0, 0.0)
    assert whole.acceptance_by_depth() == [1, 1, 0] and cut.acceptance_by_depth() == [1]
    # accepted: what verification did
    assert whole.emitted == [3] and cut.emitted == [1] and cut.accepted == [2]
    # a second call accepting 2: cut after them (no judgement at depth 3), its correction emitted (a
    # rejection at depth 3), or its path ended at a leaf (nothing to judge at depth 3)
    assert Stats(accepted=[3, 2], emitted=[4, 2],
                 leaf=[False, False]).acceptance_by_depth() == [1, 1, 1, 0]
    assert Stats(accepted=[3, 2], emitted=[4, 3],
                 leaf=[False, False]).acceptance_by_depth() == [1, 1, 1 / 2, 0]
    assert Stats(accepted=[3, 2], emitted=[4, 3],
                 leaf=[False, True]).acceptance_by_depth() == [1, 1, 1, 0]


def test_tau_and_alpha_count_the_same_tokens():
    """generate with budgets that end the last call inside its path or not: tau's tokens are the
    calls' emitted ones, and alpha reads a cut call as the path of the tokens it emitted."""
    target = tiny(V=16, n_layers=1)
    d = near_oracle(target)
    cuts = 0
    for n in range(6, 16):
        _, s = generate(target, d, prompts(16)[0], Sampling(max_new_tokens=n),
                        TreeShape(top_k=2, depth=4, total_tokens=8))
        assert s.new_tokens == sum(s.emitted) == n - 1 and len(s.emitted) == s.calls
        assert (all(e == a + 1 for a, e in zip(s.accepted[:-1], s.emitted[:-1]))
                and s.emitted[-1] <= s.accepted[-1] + 1)
        # cut inside its path: alpha sees a path of the tokens emitted,
        if s.emitted[-1] <= s.accepted[-1]:
            cuts += 1                          # with nothing judged below it
            emitted = Stats(accepted=s.accepted[:-1] + s.emitted[-1:], leaf=s.leaf[:-1] + [True])
            assert s.acceptance_by_depth() == emitted.acceptance_by_depth()
        else:
            assert s.acceptance_by_depth() == Stats(accepted=s.accepted,
                                                    leaf=s.leaf).acceptance_by_depth()
    # some budgets ended a call inside its accepted path
    assert cuts > 0


def test_tau_on_a_one_token_vocabulary():
    """V = 1: every draft is right. top_k 1, depth 2 -> a 3-node chain, all accepted + 1 bonus per
    call."""
    target = tiny(V=1)
    d = Drafter.random(target)
    out, s = generate(target, d, [0, 0], Sampling(max_new_tokens=9),
                      TreeShape(top_k=1, depth=2, total_tokens=3))
    # 1 prefill token + 2 calls x (3 accepted + 1 bonus) = 9
    assert out == [0] * 9 and s.accepted == [3, 3] and s.new_tokens == 8 and s.tau == 4.0
    assert s.leaf == [True, True] and s.acceptance_by_depth() == [1, 1, 1]
    out, s = generate(target, d, [0, 0], Sampling(max_new_tokens=10),
                      TreeShape(top_k=1, depth=2, total_tokens=3))
    # the third call is cut to its first token: tau counts tokens generated, (10 - 1) / 3
    assert len(out) == 10 and s.calls == 3 and s.tau == 3.0


def test_generate_statistics_agree_with_the_tokens_emitted():
    target = tiny(V=16, n_layers=1)
    d = near_oracle(target)
    out, s = generate(target, d, prompts(16)[0], Sampling(temperature=1.0, max_new_tokens=40),
                      TreeShape(top_k=4, depth=3, total_tokens=12), rng=TorchRandom(1))
    assert len(out) == 40 and s.new_tokens == 39 and s.tau == 39 / s.calls
    assert sum(s.accepted) + s.calls >= s.new_tokens > sum(s.accepted[:-1]) + s.calls - 1
    assert len(s.draft_entropy_accepted) == len(s.target_entropy_accepted) == sum(s.accepted)
    assert len(s.draft_entropy_rejected) == len(s.target_entropy_rejected) > 0
    assert (all(0 <= h <= math.log(16) + 1e-6
                for h in s.draft_entropy_accepted + s.target_entropy_rejected))
    assert s.draft_time > 0 and s.verify_time > 0 and s.tree_size and max(s.tree_size) <= 13
    assert set(s.summary()) >= {"tau", "alpha_by_depth", "draft_entropy", "target_entropy",
                                "draft_s", "verify_s"}


# ----------------------------------------------------------------------------- greedy equivalence

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", ["random-2-layer", "near-oracle-1-layer"])
@pytest.mark.parametrize("chain, top_k, depth, total_tokens",
                         [(False, 10, 5, 60), (False, 3, 4, 10), (False, 3, 3, None),
                          (True, 10, 4, 10)])
def test_greedy_is_exactly_the_target(device, setup, chain, top_k, depth, total_tokens):
    V = 64
    if setup == "random-2-layer":
        target = tiny(V=V, device=device)
        drafter = Drafter.random(target, 1)
    else:
        target = tiny(V=V, n_layers=1, device=device)
        drafter = near_oracle(target)
    accepted = 0
    for prompt in prompts(V):
        ref = generate_plain(target, prompt, 48)
        out, s = generate(target, drafter, prompt, Sampling(max_new_tokens=48),
                          TreeShape(top_k=top_k, depth=depth, total_tokens=total_tokens,
                                    chain=chain))
        assert out == ref
        accepted += sum(s.accepted)
        stop = ref[20]   # a stop token: both stop right after its first occurrence
        out, _ = generate(target, drafter, prompt, Sampling(max_new_tokens=48, stop_ids={stop}),
                          TreeShape(top_k=top_k, depth=depth, total_tokens=total_tokens,
                                    chain=chain))
        assert out == ref[:ref.index(stop) + 1]
    if setup == "near-oracle-1-layer":
        assert accepted > 100   # long accepted paths were exercised, not just corrections


# ------------------------------------------------------------------- Monte Carlo at temperature > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compile", [None, "static"])
@pytest.mark.parametrize("mode", ["tree", "chain", "merged"])
@pytest.mark.parametrize("wrong", [False, True])
def test_monte_carlo_first_tokens_match_the_target(mode, wrong, compile, device, monkeypatch):
    """Temperature 1, V = 4: the first two (and three) generated tokens are distributed as the
    target's; the same test rejects a verifier sampling at temperature 0.5 (its power, shown).
    `merged` verifies a merged tree whose first part is the drafted tree's depth-1 nodes alone, its
    second the whole tree: every accepted path deeper than 1 runs on through a second copy
    (counted)."""
    if wrong:
        broken_sampling(monkeypatch, temperature=0.5)
    target = tiny(V=4, n_layers=1)
    drafter = near_oracle(target).to(device)
    target = target.to(device)

    def stub_then_whole(trees):   # draft-side only: a function of the drafted tree
        t, depth = trees[0], trees[0].depths
        keep = [i for i in range(len(t)) if depth[i] <= 1]
        stub = Tree(*([getattr(t, f)[i] for i in keep]
                      for f in ("tokens", "parents", "logq", "entropy", "origin")))
        return merge([stub, t])
    second_copies = count_second_copies(monkeypatch)
    prompt, n, rng = [1, 2, 3], 1500, TorchRandom(7)
    samples, accepted = [], 0
    for _ in range(n):
        out, s = generate(target, drafter, prompt, Sampling(temperature=1.0, max_new_tokens=3),
                          TreeShape(top_k=2, depth=2, total_tokens=5, chain=mode == "chain"),
                          compose=stub_then_whole if mode == "merged" else "single", rng=rng,
                          compile=compile)
        samples.append(tuple(out))
        accepted += sum(s.accepted)
    # the drafts matter: many tokens come from accepted drafts
    assert accepted > n / 4
    if mode == "merged":
        # the trie walk was exercised, not only first copies
        assert sum(second_copies) > n / 20
    for k in (2, 3):
        p = chi_square_p(Counter(x[:k] for x in samples), exact_first_tokens(target, prompt, k), n)
        print(f"{mode} wrong={wrong} first {k} tokens: chi-square p = {p:.3g}")
        assert (p < 1e-6) if wrong else (p > 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compile", [None, "static"])
@pytest.mark.parametrize("wrong", [False, True])
def test_monte_carlo_with_temperature_and_top_p(wrong, compile, device, monkeypatch):
    """T = 0.6, top-p 0.8 go through the same processing for every draw: still the target's
    distribution; the same test rejects a verifier that ignores top-p."""
    if wrong:
        broken_sampling(monkeypatch, top_p=1.0)
    target = tiny(V=4, n_layers=1, seed=3)
    drafter = near_oracle(target).to(device)
    target = target.to(device)
    prompt, n, rng = [0, 3], 1500, TorchRandom(11)
    samples = [tuple(generate(target, drafter, prompt,
                              Sampling(temperature=0.6, top_p=0.8, max_new_tokens=2),
                              TreeShape(top_k=2, depth=2, total_tokens=5), rng=rng,
                              compile=compile)[0])
               for _ in range(n)]
    expected = exact_first_tokens(target, prompt, 2, 0.6, 0.8)
    p = chi_square_p(Counter(samples), expected, n)
    print(f"T=0.6 top-p=0.8 wrong={wrong} first 2 tokens: chi-square p = {p:.3g}")
    assert (p < 1e-6) if wrong else (p > 1e-6)


def test_cli_reports_errors_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "hi", "--drafter", "random", "--temperature", "-1", "--target",
              "/nonexistent/dir"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
