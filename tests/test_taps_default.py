"""taps on the embedded default target (SmolLM2-135M-Instruct, fp32): LOADS THE 135M MODEL.

Greedy speculative decoding is token-identical to plain greedy decoding on real chat prompts, and
the CLI with `--drafter random` prints exactly the target's own greedy reply.
"""

import pytest
import torch

import model
import taps
from conftest import count_second_copies
from model import TapsError, generate_plain
from extras.autotree import AutoTree, verify_table
from extras.checkpoint import load_target
from taps import Drafter, Sampling, Tree, TreeShape, generate, main

PROMPTS = [
    "What is 7 * 6?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def default():
    try:
        return load_target()
    except TapsError as e:
        pytest.skip(f"embedded default target unavailable: {e}")


@pytest.mark.parametrize("i, n, tree", [(0, 10, TreeShape(top_k=10, depth=5, total_tokens=60)),
                                        (1, 16, TreeShape(top_k=4, depth=4, total_tokens=16)),
                                        (2, 16, TreeShape(top_k=4, depth=3, total_tokens=8))])
def test_default_greedy_is_exactly_the_target(default, i, n, tree):
    target, tok = default
    ids, _ = tok.encode_chat([{"role": "user", "content": PROMPTS[i]}], add_generation_prompt=True)
    ref = generate_plain(target, ids, n, stop_ids=tok.stop_ids)
    sampling = Sampling(max_new_tokens=n, stop_ids=tok.stop_ids)
    out, stats = generate(target, Drafter.random(target, i), ids, sampling, tree)
    assert out == ref
    assert stats.new_tokens == len(out) - 1 and stats.calls >= 1


def test_default_greedy_with_auto_trees_and_a_draft_vocabulary(default, tmp_path, monkeypatch):
    """fp32, --tree auto: this machine's calibrated trees (often plain steps for a random drafter)
    and deep, wide trees (a flat verify cost), with a draft vocabulary of 4,096 tokens."""
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path))
    target, tok = default
    drafter = Drafter.random(target, 5)
    drafter.vocab = torch.tensor(sorted(set(range(4096)) | set(tok.stop_ids)))
    ids, _ = tok.encode_chat([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True)
    ref = generate_plain(target, ids, 12, stop_ids=tok.stop_ids)
    flat = AutoTree(verify_table({1: 10.0, 48: 10.0}, 48), max_depth=4)
    for auto in (flat, AutoTree.for_target(target)):
        out, stats = generate(target, drafter, ids,
                              Sampling(max_new_tokens=12, stop_ids=tok.stop_ids), auto)
        assert out == ref
    assert stats.calls >= 1


def test_cli_random_drafter_prints_the_target_greedy_reply(default, capsys):
    target, tok = default
    ids, _ = tok.encode_chat([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    ref = generate_plain(target, ids, 8, stop_ids=tok.stop_ids)
    main(["--prompt", PROMPTS[0], "--drafter", "random", "--max-new-tokens", "8", "--device", "cpu",
          "--tree", "study", "--total-tokens", "8", "--depth", "3", "--top-k", "4"])
    out = capsys.readouterr().out
    reply = tok.decode([t for t in ref if t not in tok.stop_ids])
    assert out.startswith(reply + "\n")
    assert "tau = " in out and "verifier calls" in out


def test_cli_refuses_a_drafter_for_another_target(default, tmp_path, capsys):
    tiny = model.Transformer(model.ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                             vocab_size=32, hidden_dim=128, name="tiny"))
    Drafter.random(tiny).save(tmp_path / "tiny.safetensors")
    for ckpt, message in [(tmp_path / "tiny.safetensors", "drafter was trained for target 'tiny'"),
                          (tmp_path / "missing.safetensors", "no such drafter checkpoint")]:
        with pytest.raises(SystemExit) as e:
            main(["--prompt", "hi", "--drafter", str(ckpt), "--device", "cpu"])
        err = capsys.readouterr().err
        assert (e.value.code == 2 and err.startswith("error: ") and message in err
                and err.count("\n") == 1)


def test_default_greedy_of_merged_trees_through_second_copies(default, monkeypatch):
    """fp32, compose merged: the first drafter's tree holds the target's next token as a leaf (with
    two wrong siblings), the second the same token with the target's next four below it, so every
    accepted path deeper than 1 runs on through a second copy of a token path (the trie walk of
    `verify_tree`). The trees are read off the target's own greedy reply -- any tree is fine for
    greedy verification, which must still emit exactly the target's tokens and keep the right keys
    and values."""
    target, tok = default
    ids, _ = tok.encode_chat([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True)
    n = 24
    full = ids + generate_plain(target, ids, n, stop_ids=tok.stop_ids)
    drafters = [Drafter.random(target, 1), Drafter.random(target, 2)]

    def oracle_tree(state, target, root, shape, more=None):
        at = state.ready(target).cache.length      # the drafter has seen full[:at] (root excluded)
        assert full[at] == root
        nxt = full[at + 1:at + 5]
        if not nxt:
            return Tree([root], [None], [0.0], [None])
        if state.drafter is drafters[0]:
            wrong = [t for t in range(3) if t != nxt[0]][:2]
            tokens, parents = [root, nxt[0], *wrong], [None, 0, 0, 0]
        else:
            tokens, parents = [root, *nxt], [None, *range(len(nxt))]
        return Tree(tokens, parents, [-float(d) for d in range(len(tokens))],
                    [None] + [0.0] * (len(tokens) - 1))

    monkeypatch.setattr(taps, "draft_tree", oracle_tree)
    second_copies = count_second_copies(monkeypatch)
    out, stats = generate(target, drafters, ids, Sampling(max_new_tokens=n, stop_ids=tok.stop_ids),
                          compose="merged")
    assert out == full[len(ids):]
    print(f"second copies {sum(second_copies)} of {stats.calls} calls, tau {stats.tau:.2f}")
    assert sum(second_copies) >= stats.calls - 1 and stats.tau > 3


def test_cli_compiled_static_path_prints_the_same_reply(default, capsys):
    """`--compile` (here aot_eager: inductor's cold compile is too slow for the suite) decodes on
    the static path and prints the reply the eager path prints."""
    args = ["--prompt", PROMPTS[0], "--drafter", "random", "--max-new-tokens", "16", "--device",
            "cpu"]
    replies = []
    for extra in ([], ["--compile", "aot_eager"]):
        main(args + extra)
        replies.append(capsys.readouterr().out.split("\n[")[0])
    assert replies[0] == replies[1] and len(replies[0]) > 10
