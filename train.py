"""Train task-aware drafters: EAGLE (eq. 4) and HASS (eqs. 7-9) objectives, the loop, the CLI.

    python train.py --domain math --backbone eagle        # -> checkpoints/eagle-math.safetensors
    make train DOMAIN=chat BACKBONE=hass SIZE=demo
    torchrun --standalone --nproc_per_node 4 train.py --domain math --size full --features online

For a conversation x_0..x_{n-1} with target features f_0..f_{n-1} (extras/features.py: cached once
per size, or computed online, bit-identical), the drafter at position t reads cat(embed(x_{t+1}),
f_t) and outputs f_hat_{t+1}. It is scored against the target's f_{t+1} and against p =
softmax(head(f_{t+1})), the target's distribution of x_{t+2}, with q = softmax(head(f_hat_{t+1})),
only where x_{t+2} is an assistant token:
  * EAGLE, eq. 4:  L = v_w SmoothL1(f_hat, f) + p_w CE(p, q),  v_w = 1.0, p_w = 0.1, with EAGLE's
    uniform noise U(-0.5, 0.5) * 0.2 * 512 / n on the input features.
  * HASS, eqs. 7-9: the EAGLE terms, top-K distillation -sum_{x in top10(p)} p(x) log q(x) (p not
    renormalised, weight 1.0), and harmonized context alignment: steps j = 1, 2 rerun the drafter
    on its own detached step-(j-1) features, and `align_mask` gives position t exactly the context
    a depth-j draft node has at inference. The loss sums steps 0..2: three passes, as
    HArmonizedSS/HASS's train/main.py runs them (its forward_num_total = 3 counts the plain pass).

Optimisation (EAGLE/HASS defaults): AdamW, betas (0.9, 0.95), gradients clipped by value at 0.5,
linear warmup then linear decay, bf16 autocast where a step measures faster so (`auto_amp`;
--amp / --no-amp force it). Each epoch writes the drafter (atomically), the held-out top-1
agreement on math and chat (printed, and logged to <out>.jsonl) and the training state
<out>.state.pt (also every --save-interval seconds); --resume reproduces an uninterrupted run
exactly (each step's input noise is seeded by step and rank).
torchrun: extras/distributed.py. A draft vocabulary (--draft-vocab; 0 = every token, the study's)
is the most frequent target tokens over both domains' training sets of the size
(`draft_vocabulary`), so every drafter of a size shares it and can be averaged.

Sections: losses (pure functions) · draft vocabulary · drafter passes (HASS alignment) · training
loop · CLI.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import DataError
from extras.distributed import SINGLE, World, check_split, wrap
from extras.features import HELDOUT_DOMAINS, MIXES, SHARD_SIZE, logits
from extras.runtime import atomic_write, writing
from model import ModelArgs, TapsError, Transformer, clock, target_identity
from taps import Drafter, flag

BACKBONES = {  # HASS = EAGLE + top-K distillation (eq. 7) + context alignment (eqs. 8-9)
    "eagle": dict(topk_w=0.0, align_steps=0),
    "hass": dict(topk_w=1.0, align_steps=2),
}
SIZES = {   # n_train: conversations per domain (None: the whole training split)
    # minutes on a CPU; the lr is high because the run is short
    "demo": dict(n_train={"math": 1000, "chat": 400}, max_len=320, n_heldout=24, epochs=3, lr=1e-3,
                 batch_size=2, warmup=0.05),
    # GSM8K's whole train split (685k assistant tokens) and about as many chat tokens: one EAGLE
    # drafter in about an hour on 2 cores once the features are cached (--features-only)
    "cpu": dict(n_train={"math": None, "chat": 1140}, max_len=1024, n_heldout=48, epochs=6, lr=1e-3,
                batch_size=2, warmup=0.02),
    # the whole corpus and EAGLE's lr: for a GPU (Llama-3-8B-Instruct in bf16)
    "full": dict(n_train={"math": None, "chat": None}, max_len=2048, n_heldout=200, epochs=20,
                 lr=3e-5, batch_size=8, warmup=0.01),
}
TRAIN_DOMAINS = ("math", "chat", *MIXES)   # MIXES: RQ2's mixtures of both domains' caches
DRAFT_VOCAB = 4096   # tokens a drafter proposes from (results/speed.md: tau and speed per size)


@dataclass
class TrainConfig:
    """A run. None: the size's value (SIZES) or the backbone's (BACKBONES). A field with a "help"
    is train.py's flag of the same name (`extras.runtime.add_fields`)."""
    domain: str = flag("math", f"training corpus: {', '.join(TRAIN_DOMAINS)} (mixtures read the "
                       f"caches of both domains at the size)")
    backbone: str = flag("eagle", f"objective: {', '.join(BACKBONES)}")
    size: str = flag("demo", f"configuration: {', '.join(SIZES)}")
    n_train: Optional[int] = flag(None, "conversations per training domain (default: the size's)")
    max_len: Optional[int] = flag(None, "tokens per conversation, longer ones truncated "
                                        "(default: the size's)")
    n_heldout: Optional[int] = flag(None, "held-out conversations per domain for agreement "
                                          "(default: the size's)")
    epochs: Optional[int] = flag(None, "passes over the training data (default: the size's)")
    lr: Optional[float] = flag(None, "peak learning rate (default: the size's)")
    batch_size: Optional[int] = flag(None, "conversations per step, right-padded "
                                           "(default: the size's)")
    warmup: Optional[float] = None   # fraction of all steps spent in linear warmup
    v_w: float = 1.0                 # feature regression weight (eq. 4)
    p_w: float = 0.1                 # cross-entropy weight (eq. 4)
    topk_w: Optional[float] = None   # HASS top-K distillation weight (eq. 7); 0 for EAGLE
    topk: int = 10
    align_steps: Optional[int] = None  # HASS alignment steps (eqs. 8-9); 0 for EAGLE
    noise: float = 0.2               # EAGLE's uniform input-feature noise, scaled by 512 / length
    grad_clip: float = 0.5           # clip each gradient value to [-0.5, 0.5], as EAGLE does
    head_chunk: int = 2048           # loss positions per full-vocabulary logit block
    draft_vocab: int = flag(0, "draft vocabulary (Drafter.vocab): the most frequent target tokens "
                               "in the training data (0 = every token, as the study; train.py's "
                               "default %(default)s)")
    amp: bool = True                 # bf16 autocast (the CLI measures which is faster: auto_amp)
    seed: int = flag(0, "seeds the drafter's weights, the batch order and the input noise")

    def __post_init__(self):
        for name, value, known in (("domain", self.domain, TRAIN_DOMAINS),
                                   ("backbone", self.backbone, BACKBONES),
                                   ("size", self.size, SIZES)):
            if value not in known:
                raise TapsError(f"unknown {name} {value!r}; choose one of {', '.join(known)}")
        for name, value in {**SIZES[self.size], **BACKBONES[self.backbone]}.items():
            if name != "n_train" and getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("max_len", "n_heldout", "epochs", "batch_size", "topk"):
            least = 3 if name == "max_len" else 1
            if getattr(self, name) < least:
                raise TapsError(f"{name} must be at least {least}, got {getattr(self, name)}")

    @property
    def steps(self) -> int:
        """Drafter passes per batch: the plain pass plus the alignment steps."""
        return 1 + self.align_steps

    def corpus_sizes(self, domains=None) -> dict:
        """Conversations per domain in the size's feature caches (None: the whole split); a
        mixture reads the math and chat caches of its size."""
        domains = domains or (HELDOUT_DOMAINS if self.domain in MIXES else (self.domain,))
        n = lambda d: SIZES[self.size]["n_train"][d] if self.n_train is None else self.n_train
        return {d: n(d) for d in domains}


# -------------------------------------------------------------------------- losses (pure functions)

def feature_loss(f_hat, f, denom=None):
    """Smooth L1 regression of the drafter's features on the target's, (N, H) x 2 -> scalar
    (eq. 4): the mean over positions, or their sum over `denom` (all ranks' positions)."""
    per_position = F.smooth_l1_loss(f_hat.float(), f.float(), reduction="none").mean(-1)
    return per_position.mean() if denom is None else per_position.sum() / denom


def distill_terms(logq, p, k):
    """Per-position CE(p, q) = -sum_x p(x) log q(x) and the HASS top-K term over p's k likeliest
    tokens, not renormalised (eq. 7). logq: (N, V) draft log-probs, p: (N, V) -> 2 x (N,)."""
    top_p, top_i = p.topk(min(k, p.shape[-1]), dim=-1)             # (N, k)
    return -(p * logq).sum(-1), -(top_p * logq.gather(-1, top_i)).sum(-1)


def draft_head(target, drafter: Drafter):
    """The head both distributions are formed with, (..., H) -> (..., V') fp32: the target's
    whole head, or its rows of the drafter's draft vocabulary (`Drafter.head`), where p is the
    target's distribution renormalised over it (as EAGLE-3 trains) and costs V'/V of the head."""
    if drafter is None:
        return lambda h: logits(target, h)
    return lambda h: drafter.head(target, h.to(target.embed_tokens.weight.dtype)).float()


def _head_sums(head, f_hat, f, k, keep):
    with torch.no_grad():
        p = torch.softmax(head(f), dim=-1)                          # (N, V') the target's p
    logq = torch.log_softmax(head(f_hat), dim=-1)                  # (N, V')
    ce, topk = distill_terms(logq, p, k)
    top1 = logq.argmax(-1) == p.argmax(-1)
    return (ce * keep).sum(), (topk * keep).sum(), (top1 * keep).sum()


def head_terms(head, f_hat, f, k, chunk, keep=None, denom=None):
    """Mean CE, mean top-K term and top-1 agreement over N loss positions, (N, H) x 2 -> 3
    scalars (means over the kept positions, or sums over `denom`).

    head: `draft_head`. keep (N,) bool: the positions these terms count (default all); with a
    draft vocabulary, those whose target token is in it -- elsewhere the renormalised p would
    teach q a token the target does not pick (EAGLE-3 masks them too); the feature regression
    keeps them all. Above `chunk` positions the (N, V') logits are formed a block at a time and
    recomputed in backward, so memory stays O(chunk * V') for 128k-token vocabularies."""
    keep = torch.ones(len(f_hat), dtype=torch.bool, device=f_hat.device) if keep is None else keep
    if len(f_hat) <= chunk:
        sums = _head_sums(head, f_hat, f, k, keep)
    else:
        parts = [checkpoint(_head_sums, head, f_hat[i:i + chunk], f[i:i + chunk], k,
                            keep[i:i + chunk], use_reentrant=False)
                 for i in range(0, len(f_hat), chunk)]
        sums = [sum(s) for s in zip(*parts)]
    return [s / (denom or max(int(keep.sum()), 1)) for s in sums]


def align_mask(T, j, device=None):
    """Keys visible to each query at alignment step j, (T, (j+1) T) bool (eqs. 8-9).

    Keys are laid out as j+1 blocks of T: block 0 from the target's features, block i >= 1 from
    the drafter's step-i inputs. Query t sees block 0 at positions <= t - j (the accepted prefix)
    and block i at position t - j + i only (its depth-i ancestor in a draft), so its last j
    context positions carry draft features, as at inference. j = 0 is the causal mask."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(T, device=device)[None, :]
    return torch.cat([s <= t - j] + [s == t - j + i for i in range(1, j + 1)], dim=1)


# ----------------------------------------------------------------------------- draft vocabulary

def check_vocab_size(size: int, vocab_size: int, stop_ids=()):
    if size and not len(set(stop_ids)) <= size <= vocab_size:
        raise TapsError(f"--draft-vocab {size}: choose between {len(set(stop_ids))} (the stop "
                        f"tokens) and {vocab_size} (the target's vocabulary), or 0 for the whole "
                        f"vocabulary")


def draft_vocabulary(tokens: list, size: int, vocab_size: int, stop_ids=()) -> torch.Tensor:
    """The `size` most frequent target tokens (FR-Spec / EAGLE-3) as sorted ids, stop tokens
    always in. tokens: one tensor per corpus (the target's own next tokens over it), each
    weighted equally, so a long-winded corpus does not crowd out a terse one. Ties and unseen
    tokens go by id: byte-level BPE numbers tokens in merge order, roughly by frequency."""
    check_vocab_size(size, vocab_size, stop_ids)
    freq = sum(torch.bincount(t, minlength=vocab_size).double() / max(len(t), 1) for t in tokens)
    freq[list(stop_ids)] = math.inf
    return torch.sort(-freq, stable=True).indices[:size].sort().values


def coverage(vocab: torch.Tensor, tokens: torch.Tensor) -> float:
    """Share of `tokens` inside the draft vocabulary: a bound on a draft's top-1 agreement."""
    return torch.isin(tokens, vocab).double().mean().item() if len(tokens) else math.nan


# ----------------------------------------------------------------------------- drafter passes

class KeyValueStack:
    """The drafter's KVCache during training: attention appends each alignment step's keys and
    values and attends over all of them, kept in the autograd graph (KVCache writes in place)."""

    def __init__(self):
        self.k, self.v, self.length = [], [], 0   # length: keys so far, as KVCache counts them

    def update(self, layer, k, v):
        self.k.append(k)
        self.v.append(v)
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


def aligned_passes(drafter, target, tokens, f_in, steps):
    """Yield the drafter's features (B, T, H) at alignment steps 0..steps-1 (eqs. 8-9):
    `Drafter.forward` (eq. 3) without its head, which the loss applies at loss positions only.

    Step 0 reads the target's features; step j reads, at position t, the drafter's own step-(j-1)
    prediction of f_t (detached, as in HASS), so with `align_mask` its output at t is what a
    depth-j draft node after the prefix ending at t - j would get at inference. A position t < j
    has no such prefix: every step keeps the target's f_0 at position 0, so it sees f_0 and draft
    features at 1..t and its output is step t's at t, a depth-t node after the prefix ending at 0
    (HArmonizedSS/HASS's cnets_hass.py masks the same way)."""
    kv, (B, T) = KeyValueStack(), tokens.shape
    pos = torch.arange(T, device=tokens.device).expand(B, T)   # every step re-reads 0..T-1
    for j in range(steps):
        mask = align_mask(T, j, tokens.device)[None]            # over every step's keys so far
        _, h = drafter(target, tokens, f_in, kv, pos, mask, head=False)
        yield h
        f_in = torch.cat([f_in[:, :1], h[:, :-1].detach().to(f_in.dtype)], dim=1)


def drafter_loss(drafter, target, batch, cfg: TrainConfig, g: Optional[torch.Generator] = None,
                 count=None):
    """Eq. 4 (EAGLE) or eqs. 7-9 (HASS) on a padded batch; noise on the input features when `g`
    is given. Returns the loss (summed over alignment steps) and the plain pass's terms (v, ce,
    topk, top1). count(n) turns the batch's number of loss positions into what the terms divide
    by (`World.count` under torchrun: the global mean; default: this batch's mean)."""
    ids, mask, f, lengths = batch["ids"], batch["mask"], batch["feats"], batch["lengths"]
    tokens, f_in, f_next = ids[:, 1:-1], f[:, :-2], f[:, 1:-1]   # (B, T) x_{t+1}; f_t, f_{t+1}
    sel = mask[:, 2:].bool()                                      # (B, T): x_{t+2} is assistant's
    if g is not None:
        scale = cfg.noise * 512 / lengths.to(f_in.dtype)         # (B,) shrinks with length
        noise = torch.rand(f_in.shape, generator=g, device=f_in.device) - 0.5
        f_in = f_in + noise * scale[:, None, None]
    f_tgt = f_next[sel]                                           # (N, H)
    keep = None
    if drafter.vocab is not None:                                 # (N,) target token in vocab
        keep = torch.isin(batch["next"][:, 1:-1][sel], drafter.vocab)
    count = count or (lambda n: max(int(n), 1))
    n_pos = count(sel.sum())
    n_keep = n_pos if keep is None else count(keep.sum())
    head = draft_head(target, drafter)
    total, first = 0.0, None
    # Every step scores the same positions `sel`, weight 1 each, as HArmonizedSS/HASS's
    # train/main_hass.py does (one loss_mask for all forward_num_total = 3 passes, the first j
    # positions of step j unmasked): a selected t < j counts again with step t's loss at t. In a
    # chat none is selected: the first assistant token follows the user's turn and the assistant
    # header, well past t = 2.
    for h in aligned_passes(drafter, target, tokens, f_in, cfg.steps):
        v = feature_loss(h[sel], f_tgt, n_pos)
        ce, topk, top1 = head_terms(head, h[sel], f_tgt, cfg.topk, cfg.head_chunk, keep, n_keep)
        total = total + cfg.v_w * v + cfg.p_w * ce + cfg.topk_w * topk
        first = first or {"v": v.item(), "ce": ce.item(), "topk": topk.item(), "top1": top1.item()}
    return total, first


# ----------------------------------------------------------------------------- training loop

def collate(convs, device):
    """Right-pad conversations into a batch: ids/mask (B, n), feats (B, n, H) fp32, next (B, n),
    lengths (B,)."""
    n = max(len(c["ids"]) for c in convs)
    pad = lambda x: F.pad(x, (0, 0) * (x.dim() - 1) + (0, n - len(x)))
    batch = {k: torch.stack([pad(c[k]) for c in convs]).to(device)
             for k in ("ids", "mask", "feats", "next")}
    batch["ids"], batch["feats"] = batch["ids"].long(), batch["feats"].float()
    batch["lengths"] = torch.tensor([len(c["ids"]) for c in convs], device=device)
    return batch


def epoch_plan(sets, cfg: TrainConfig, epoch):
    """The epoch's batches as (set, shard, conversation indices): shards in random order,
    shuffled within. A function of (seed, epoch) only, so a resumed run replays the batches."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    shards = [(s, i) for s, fs in enumerate(sets) for i in range(len(fs))]
    plan = []
    for k in torch.randperm(len(shards), generator=g).tolist():
        s, i = shards[k]
        order = torch.randperm(sets[s].sizes[i], generator=g).tolist()
        plan += [(s, i, order[b:b + cfg.batch_size]) for b in range(0, len(order), cfg.batch_size)]
    return plan


def autocast(cfg: TrainConfig, device):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=cfg.amp)


@torch.no_grad()
def heldout_agreement(drafter, target, fs, cfg: TrainConfig) -> float:
    """Top-1 agreement of the drafter's argmax (over its draft vocabulary) with the target's
    greedy x_{t+2}, on assistant positions."""
    dev = target.embed_tokens.weight.device
    head = draft_head(target, drafter)     # the drafter's own head: its draft vocabulary
    correct = total = 0
    for i in range(len(fs)):
        convs = fs.shard(i)
        for b in range(0, len(convs), cfg.batch_size):
            batch = collate(convs[b:b + cfg.batch_size], dev)
            sel = batch["mask"][:, 2:].bool()
            with autocast(cfg, dev):
                h = next(aligned_passes(drafter, target, batch["ids"][:, 1:-1],
                                        batch["feats"][:, :-2], 1))
                cols = torch.cat([head(c).argmax(-1) for c in h[sel].split(cfg.head_chunk)])
            correct += (drafter.token_ids(cols) == batch["next"][:, 1:-1][sel]).sum().item()
            total += sel.sum().item()
    return correct / total


class Objective(nn.Module):
    """The training loss (`drafter_loss`) as a module, so DistributedDataParallel can wrap it
    (`extras.distributed.wrap`): its only parameters are the drafter's; the frozen target is held
    outside the module tree (DDP neither broadcasts nor reduces it)."""

    def __init__(self, drafter, target, cfg, world: World = SINGLE):
        super().__init__()
        self.drafter, self.frozen, self.cfg, self.world = drafter, (target,), cfg, world
        target.requires_grad_(False)   # else backward also forms the (V, H) head-weight gradient

    def forward(self, batch, g):
        return drafter_loss(self.drafter, self.frozen[0], batch, self.cfg, g, self.world.count)


def train_step(model: nn.Module, opt, sched, batch, g):
    """One optimizer step of `extras.distributed.wrap(objective)`; returns the global batch's loss
    and terms (its top-1 agreement and, as `positions`, its number of loss positions)."""
    objective = getattr(model, "module", model)   # DDP keeps the wrapped module as .module
    objective.drafter.train()
    with autocast(objective.cfg, batch["ids"].device):
        loss, terms = model(batch, g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_value_(objective.drafter.parameters(), objective.cfg.grad_clip)
    opt.step()
    sched.step()
    world = objective.world
    n = float(batch["mask"][:, 2:].sum())
    loss, top1, positions = world.mean([loss.item(), terms["top1"], n])
    return loss, {**terms, "top1": top1, "positions": round(positions * world.size)}


AMP_STEP = (2, 130)   # the timed step: 2 random conversations of 130 tokens (128 loss positions)


def measure_amp(target: Transformer, reps: int = 3) -> dict:
    """Seconds of one `train_step` (forward, backward, optimizer) of a fresh EAGLE drafter with
    the default draft vocabulary, in fp32 and under bf16 autocast: {"fp32": s, "bf16": s}, each the
    median of `reps` after a warm-up, the two interleaved so that a drifting machine slows both
    alike. Torch's random state is left as it was (a run stays reproducible)."""
    dev = target.embed_tokens.weight.device
    (B, n), V = AMP_STEP, target.args.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(V, (B, n), generator=g)
    batch = {"ids": ids, "mask": torch.ones_like(ids), "next": ids.roll(-1, 1),
             "feats": torch.randn(B, n, target.args.dim, generator=g),
             "lengths": torch.full((B,), n)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    cfg = TrainConfig(draft_vocab=min(DRAFT_VOCAB, V))
    with torch.random.fork_rng(devices=[]):
        drafter = Drafter.for_target(target, torch.arange(cfg.draft_vocab, device=dev)).float()
    model = Objective(drafter, target, cfg)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    noise = torch.Generator(device=dev).manual_seed(0)
    times = {False: [], True: []}
    for _ in range(reps + 1):                        # the first of each is a warm-up
        for amp in times:
            cfg.amp = amp
            t0 = clock(dev)
            train_step(model, opt, sched, batch, noise)
            times[amp].append(clock(dev) - t0)
    return {name: sorted(times[amp][1:])[reps // 2] for name, amp in (("fp32", False),
                                                                       ("bf16", True))}


def read_step_times(entry) -> dict:
    """A saved entry's {"fp32": s, "bf16": s}; ValueError unless both are finite and > 0."""
    s = {k: float(entry["train_step_s"][k]) for k in ("fp32", "bf16")}
    if not all(0 < t < math.inf for t in s.values()):
        raise ValueError("times must be finite and > 0")
    return s


def step_times(target: Transformer, path=None) -> dict:
    """`measure_amp` on this machine, measured once per (machine, target, dtype, threads) and
    cached beside the tree-size calibration (`extras.autotree.cached`)."""
    from extras.autotree import cached, calibration_key
    key = calibration_key(target, measured="training step, fp32 vs bf16 autocast")
    return cached(key, lambda: {"train_step_s": measure_amp(target)}, read_step_times,
                  "timing a training step in fp32 and under bf16 autocast", path)


def auto_amp(target: Transformer, path=None) -> tuple[bool, str]:
    """Training's precision where --amp is not given, and why: bf16 autocast on CUDA; on a CPU,
    whichever of a training step in fp32 and one under bf16 autocast is faster (`step_times`) --
    autocast is about twice as fast on cores with AMX and many times slower where bf16 is
    emulated (results/REPORT.md). Decided by measuring, not by CPU flags, as `--dtype auto` is."""
    if target.embed_tokens.weight.device.type == "cuda":
        return True, "CUDA"
    s = step_times(target, path)
    return s["bf16"] < s["fp32"], (f"a step measured {1000 * s['bf16']:.0f} ms under autocast, "
                                   f"{1000 * s['fp32']:.0f} ms in fp32 on this machine")


def decide_amp(flag: str, target: Transformer, state_file: Path, resume: bool) -> tuple[bool, str]:
    """--amp on | off | auto -> (autocast?, why): forced, the resumed run's own (a resumed run
    must train as it began), or `auto_amp`'s measurement."""
    if flag != "auto":
        return flag == "on", "--amp" if flag == "on" else "--no-amp"
    if resume and state_file.exists():
        try:   # mmap: the config only, not the tensors
            saved = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
            return bool(saved["config"]["amp"]), f"as the run resumed from {state_file}"
        except Exception:   # unreadable: `restore` says so in one line
            pass
    amp, why = auto_amp(target)
    return amp, f"{why}; --amp / --no-amp force it"


def lr_factor(step, warm, total):
    """Linear warmup over `warm` steps, then linear decay to 0 at step `total`."""
    return min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))


def state_path(out: Path) -> Path:
    return out.with_name(out.stem + ".state.pt")


class Checkpointer:
    """A run's files: the drafter `out`, its log <out>.jsonl and the training state <out>.state.pt
    (the config, the target's identity, the drafter, optimizer and schedule, the progress). A new
    run never replaces a user's drafter or an interrupted run's state; --resume needs a state to
    continue; every write is atomic, the state before the drafter it holds (a failed drafter
    write loses nothing)."""

    def __init__(self, out, cfg: TrainConfig):
        self.out, self.epochs, self.config = Path(out), cfg.epochs, dataclasses.asdict(cfg)
        self.state, self.log = state_path(self.out), self.out.with_name(self.out.stem + ".jsonl")

    def check(self, resume: bool, overwrite: bool):
        """Before any work: what the files already at `out` allow (`check_resume`,
        `refuse_to_replace`)."""
        if resume:
            self.check_resume()
        elif not overwrite:
            self.refuse_to_replace()

    def check_resume(self):
        """--resume with no training state to continue is refused: a fresh start would replace
        the drafter at `out` unasked, or train for hours where a user meant another --out."""
        if not self.state.exists():
            raise TapsError(f"--resume: no training state {self.state} to continue; "
                            + (f"{self.out} holds a drafter: pass --overwrite to train a new one "
                               f"over it, or --out another path" if self.out.is_file() else
                               "leave out --resume to start a new run"))

    def refuse_to_replace(self):
        """A new run never silently replaces a user's drafter or an interrupted run's state."""
        state, epochs = self.state, self.epochs
        if state.exists():
            try:
                done = torch.load(state, map_location="cpu", weights_only=True)["progress"]["epoch"]
            except Exception:   # an unreadable state still belongs to somebody's run
                done = "?"
            if done == epochs:
                raise TapsError(f"{state}: a finished run ({epochs} epochs) is there; pass "
                                f"--overwrite to start over, or --out another path")
            raise TapsError(f"{state}: a run is in progress at epoch {done} of {epochs}; pass "
                            f"--resume to continue or --overwrite to start over")
        if self.out.exists():
            raise TapsError(f"{self.out}: a drafter is already there; pass --overwrite to replace "
                            f"it, or --out another path")

    def restore(self, target, drafter, opt, sched) -> dict:
        """Load the saved training state into the drafter, optimizer and schedule; its
        progress."""
        try:
            saved = torch.load(self.state, map_location=target.embed_tokens.weight.device,
                               weights_only=True)
        except Exception as e:   # truncated or corrupt: torch's and pickle's own error types
            why = type(e).__name__
            raise TapsError(f"{self.state}: unreadable training state ({why}); it is truncated or "
                            f"damaged: rerun with --overwrite to start over") from None
        if saved["config"] != self.config or saved["target"] != target_identity(target):
            raise TapsError(f"{self.state}: saved by a run with another configuration or target; "
                            f"rerun without --resume to start over")
        drafter.load_state_dict(saved["drafter"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        return saved["progress"]

    def save_state(self, target, drafter, opt, sched, progress: dict):
        """All that `restore` needs to continue the run as if uninterrupted."""
        s = {"config": self.config, "target": target_identity(target),
             "drafter": drafter.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "progress": progress}
        with self.saving():
            atomic_write(self.state, lambda p: torch.save(s, p))

    def save_drafter(self, drafter, log: list):
        """After the state that holds it, with the held-out agreement of the last epoch logged."""
        drafter.meta["heldout_top1"] = log[-1]["heldout_top1"]
        lines = "".join(json.dumps(r) + "\n" for r in log)
        with self.saving():
            atomic_write(self.out, drafter.save)
            atomic_write(self.log, lambda p: p.write_text(lines))

    def saving(self):
        return writing(self.out.parent, "free space or fix permissions there, then rerun with "
                                         "--resume")


def check_target_limits(cfg: TrainConfig, limits: ModelArgs):
    """--max-len within the target's context, --draft-vocab within its vocabulary."""
    if cfg.max_len > limits.max_seq_len:
        raise TapsError(f"--max-len {cfg.max_len}: the target reads at most {limits.max_seq_len} "
                        f"tokens; give at most {limits.max_seq_len}")
    if cfg.draft_vocab > limits.vocab_size:
        raise TapsError(f"--draft-vocab {cfg.draft_vocab}: more than the target's vocabulary of "
                        f"{limits.vocab_size} tokens; give at most {limits.vocab_size}, or 0 for "
                        f"every token")


def new_drafter(cfg: TrainConfig, target, train_sets, heldout, vocab_sets, stop_ids, world):
    """The untrained drafter of a run (seeded), its metadata (the data it is trained on), and its
    draft vocabulary, chosen from the target's tokens over `vocab_sets` by rank 0."""
    from extras.runtime import machine
    dev = target.embed_tokens.weight.device
    data = {"corpus": cfg.domain, "max_len": cfg.max_len,
            "conversations": sum(fs.meta["conversations"] for fs in train_sets),
            "tokens": sum(fs.meta["tokens"] for fs in train_sets),
            "size": cfg.size, "epochs": cfg.epochs, "lr": cfg.lr,
            # bit-for-bit reproducible on the same CPU kind with the same thread count only
            "threads": torch.get_num_threads(), "cpu": machine(dev)["cpu"]}
    vocab, meta = None, {}
    if cfg.draft_vocab and not world.main:   # rank 0 reads (or computes) the target's tokens once
        vocab = world.broadcast(torch.empty(cfg.draft_vocab, dtype=torch.long, device=dev))
    elif cfg.draft_vocab:
        vocab = draft_vocabulary([fs.target_tokens() for fs in vocab_sets],
                                 cfg.draft_vocab, target.args.vocab_size, stop_ids)
        world.broadcast(vocab.to(dev))
        cover = {d: round(coverage(vocab, fs.target_tokens()), 4) for d, fs in heldout.items()}
        meta["draft_vocab"] = {"size": cfg.draft_vocab, "coverage": cover}
        print(f"draft vocabulary: {cfg.draft_vocab} of {target.args.vocab_size} tokens; held-out "
              f"coverage of the target's tokens " + ", ".join(f"{d} {c:.3f}"
                                                              for d, c in cover.items()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        drafter = Drafter.for_target(target, vocab, backbone=cfg.backbone, domain=cfg.domain,
                                     data=data, **meta).float()
    return drafter


def epoch_record(epoch, per_epoch, st, drafter, target, heldout, cfg, lr, t0) -> dict:
    """The log of a finished epoch, also printed as a row of the progress table: train loss and
    top-1 agreement, held-out top-1 agreement per domain, loss positions per second."""
    from tqdm import tqdm
    record = {"epoch": epoch + 1, "step": (epoch + 1) * per_epoch,
              "train_loss": st["loss_sum"] / per_epoch, "train_top1": st["top1_sum"] / per_epoch,
              "heldout_top1": {d: heldout_agreement(drafter, target, fs, cfg)
                               for d, fs in heldout.items()},
              "lr": lr, "positions_per_s": round(st["positions"] / max(st["train_s"], 1e-9)),
              "elapsed_s": round(time.perf_counter() - t0, 1)}
    tqdm.write(" | ".join([f"{epoch + 1}", f"{record['step']}", f"{record['train_loss']:.4f}",
                           f"{record['train_top1']:.3f}"]
                          + [f"{a:.3f}" for a in record["heldout_top1"].values()]
                          + [f"{record['positions_per_s']}", f"{record['elapsed_s']:.0f}"]))
    return record


def train(cfg: TrainConfig, target: Transformer, train_sets, heldout: dict, out, resume=False,
          save_interval: float = 120.0, stop_ids=(), overwrite=False, vocab_sets=None,
          world=None) -> Drafter:
    """Train a drafter for `target` on `train_sets`; writes `out` (+ .jsonl log, .state.pt) each
    epoch.

    heldout: {domain: FeatureSet} for the per-epoch agreement table. vocab_sets: the feature sets
    whose target tokens choose the draft vocabulary (default `train_sets`; the CLI passes both
    domains' sets of the size, so every drafter of a size shares one vocabulary). The training
    state is saved atomically every `save_interval` seconds and after each epoch; resume=True
    continues from it. Under torchrun, `world` is this rank (`extras.distributed.World`)."""
    world = world or SINGLE
    check_split(cfg.batch_size, world.size)
    ckpt = Checkpointer(out, cfg)
    ckpt.check(resume, overwrite)
    say = print if world.main else lambda *args, **kw: None
    if world.main:
        ckpt.out.parent.mkdir(parents=True, exist_ok=True)
    dev = target.embed_tokens.weight.device
    drafter = new_drafter(cfg, target, train_sets, heldout, vocab_sets or train_sets, stop_ids,
                          world)
    model = wrap(Objective(drafter, target, cfg, world))
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    per_epoch = len(epoch_plan(train_sets, cfg, 0))
    total = cfg.epochs * per_epoch
    warm = max(1, round(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warm, total))
    g = torch.Generator(device=dev)   # input noise, seeded per (step, rank): no state to resume
    st = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "top1_sum": 0.0, "log": []}
    if resume:
        st = ckpt.restore(target, drafter, opt, sched)
        say(f"resuming {ckpt.out} at epoch {st['epoch'] + 1}, batch {st['batch']} of {per_epoch}"
            if st["epoch"] < cfg.epochs else
            f"resuming {ckpt.out}: all {cfg.epochs} epochs are done, nothing to train")
    save_state = lambda: ckpt.save_state(target, drafter, opt, sched, st)

    from tqdm import tqdm
    say(" | ".join(["epoch", "steps", "train loss", "train top-1"]
                   + [f"held-out top-1 {d}" for d in heldout] + ["loss positions/s", "time (s)"]))
    bar = tqdm(total=cfg.epochs * per_epoch, initial=st["epoch"] * per_epoch + st["batch"],
               unit="step", desc=f"{cfg.backbone}-{cfg.domain}", file=sys.stderr, smoothing=0.05,
               disable=not world.main)
    st.setdefault("positions", 0)    # this epoch's loss positions and seconds of training steps
    st.setdefault("train_s", 0.0)
    next_epoch = dict(batch=0, loss_sum=0.0, top1_sum=0.0, positions=0, train_s=0.0)
    last_save = t0 = time.perf_counter()
    try:   # the bar is closed before any error line, so that line stands alone
        for epoch in range(st["epoch"], cfg.epochs):
            plan = epoch_plan(train_sets, cfg, epoch)
            for b in range(st["batch"], per_epoch):
                s, i, idx = plan[b]
                mine, counts = world.share(idx)
                batch = collate(train_sets[s].batch(i, mine), dev)
                if not counts:
                    batch["mask"].zero_()
                step = epoch * per_epoch + b
                g.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + world.rank)
                t_step = time.perf_counter()
                with world.together(f" at step {step + 1}", f"{ckpt.state} holds the last saved "
                                                           f"state: rerun with --resume"):
                    loss, terms = train_step(model, opt, sched, batch, g)
                if not math.isfinite(loss):
                    raise TapsError(f"step {step + 1}: loss is {loss} on a batch of "
                                    f"{train_sets[s].path(i)}; stopped, the drafter is not saved")
                st["train_s"] += time.perf_counter() - t_step
                st["positions"] += terms["positions"]
                st["loss_sum"] += loss
                st["top1_sum"] += terms["top1"]
                st["batch"] = b + 1
                bar.update()
                bar.set_postfix(loss=f"{st['loss_sum'] / (b + 1):.3f}", refresh=False)
                if world.main and time.perf_counter() - last_save >= save_interval:
                    save_state()
                    last_save = time.perf_counter()
            drafter.eval()
            if not world.main:   # rank 0 scores the held-out sets and writes; the others wait
                st.update(epoch=epoch + 1, **next_epoch)
                world.barrier()
                continue
            record = epoch_record(epoch, per_epoch, st, drafter, target, heldout, cfg,
                                  sched.get_last_lr()[0], t0)
            st.update(epoch=epoch + 1, log=st["log"] + [record], **next_epoch)
            save_state()
            ckpt.save_drafter(drafter, st["log"])
            last_save = time.perf_counter()
            world.barrier()
    finally:
        bar.close()
    if world.main and st["log"] and not ckpt.out.exists():   # a resumed run's drafter write failed
        ckpt.save_drafter(drafter, st["log"])
    return drafter


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    from extras.distributed import say
    from extras.checkpoint import target_args
    from extras.runtime import (DTYPES, Parser, add_fields, check_device, check_flags,
                                check_writable, default_device, one_line_errors, refuse_unused)
    ap = Parser(description="Train a task-aware EAGLE or HASS drafter.")
    add_fields(ap, TrainConfig, "domain", "backbone", "size", domain=None)
    ap.add_argument("--target", help="HF checkpoint directory (default: the embedded default)")
    ap.add_argument("--out", help="the drafter's file (default: "
                                  "checkpoints/<backbone>-<domain>.safetensors)")
    ap.add_argument("--features-only", action="store_true",
                    help="build the size's feature caches (both domains, train and held-out), stop")
    ap.add_argument("--features", choices=("cached", "online"), default="cached",
                    help="cached (default): target features stored once under $TAPS_CACHE; "
                         "online: the target runs inside training, nothing stored")
    ap.add_argument("--resume", action="store_true", help="continue from <out>.state.pt")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over even where <out> or <out>.state.pt exists")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto",
                    help="target dtype for features and the loss (default auto: bf16 on CUDA and "
                         "on CPUs where bf16 measures faster at a conversation's length, else "
                         "fp32)")
    ap.add_argument("--data-dir", help="data directory (default: $TAPS_DATA or ../shared/data)")
    ap.add_argument("--amp", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                    help="bf16 autocast: auto (default) times a training step each way once per "
                         "machine (cached) and takes the faster; --amp alone forces it on")
    ap.add_argument("--no-amp", dest="amp", action="store_const", const="off", default="auto",
                    help="train in fp32, no autocast")
    ap.add_argument("--extract-batch", type=int, default=None,
                    help="conversations per target call (default 1 on CPU, 8 on CUDA)")
    ap.add_argument("--save-interval", type=float, default=120.0,
                    help="seconds between training-state saves")
    add_fields(ap, TrainConfig, "draft_vocab", draft_vocab=DRAFT_VOCAB)
    overridable = ("epochs", "lr", "n_train", "max_len", "n_heldout", "batch_size", "seed")
    add_fields(ap, TrainConfig, *overridable, seed=None)   # --seed: the config's 0 unless given
    args = ap.parse_args(argv)
    out, world = None, None

    def kept() -> str:   # what Ctrl-C leaves, said at that moment
        if out is not None and state_path(out).exists():
            return (f"finished feature shards and the training state {state_path(out)} are kept; "
                    f"rerun with --resume")
        return ("finished feature shards are kept (no training state was saved yet); rerun the "
                "same command")

    with one_line_errors(DataError, interrupted=kept, who=lambda: world.name if world else "",
                         say=lambda line: say(line, joined=world is not None)):
        shard = (lambda v: 1 <= v <= SHARD_SIZE,
                 f"between 1 and {SHARD_SIZE} (the conversations of a feature shard, which "
                 f"batches are drawn from)")
        check_flags(args, batch_size=shard, extract_batch=shard)
        if args.features == "online" and args.features_only:
            raise TapsError("--features-only builds the feature caches, which --features online "
                            "never reads; drop one of the two")
        if args.features_only:
            refuse_unused(ap, args, {"--features-only", "--size", "--target", "--device", "--dtype",
                                     "--data-dir", "--extract-batch", "--n-train", "--max-len",
                                     "--n-heldout"}, "with --features-only (it trains nothing)")
        if not (args.domain or args.features_only):
            raise TapsError("--domain is required (or --features-only)")
        if args.resume and args.overwrite:
            raise TapsError("--resume continues a run and --overwrite starts over; give one")
        if check_device(args.device).type == "cpu" and args.dtype == "fp16":
            raise TapsError("--dtype fp16 on a CPU: CPU autocast and kernels take fp32 or bf16; "
                            "use --dtype bf16 or fp32, or fp16 on --device cuda")
        overrides = {k: getattr(args, k) for k in overridable if getattr(args, k) is not None}
        cfg = TrainConfig(domain=args.domain or "math", backbone=args.backbone, size=args.size,
                          draft_vocab=args.draft_vocab, **overrides)
        check_split(cfg.batch_size, int(os.environ.get("WORLD_SIZE", 1)))   # before joining
        out = Path(args.out or f"checkpoints/{cfg.backbone}-{cfg.domain}.safetensors")
        if not args.features_only:   # the destination, before any extraction or training
            files = Checkpointer(out, cfg)   # its checks; `train` saves under the final cfg
            if args.resume:          # first: check_writable makes --out's folder
                files.check_resume()
            for path in (files.out, files.state):
                check_writable(path, "--out")
            if not (args.resume or args.overwrite):
                files.refuse_to_replace()
        limits = target_args(args.target)           # its config alone, no weights read
        if limits:                                  # else checked once the target is loaded
            check_target_limits(cfg, limits)
        world, device = World.from_env(args.device)
        t0 = time.perf_counter()
        from extras.autotree import load_for   # --dtype auto: bf16 where it measures faster
        target, tokenizer = world.same_dtype(*load_for(args.target, device, args.dtype,
                                                       tokens=cfg.max_len))   # a conversation
        if not limits:
            check_target_limits(cfg, target.args)
        check_vocab_size(cfg.draft_vocab, target.args.vocab_size, tokenizer.stop_ids)
        from extras.features import training_sets   # the target's features: cached, or online
        heldout, train_sets, vocab_sets = training_sets(
            target, tokenizer, cfg, args.data_dir, args.extract_batch, args.features == "online",
            args.features_only, world)
        note = print if world.main else lambda *a: None   # not `say`: the error handler's
        if args.features_only:
            return note(f"[feature caches of size {cfg.size} ready in "
                       f"{time.perf_counter() - t0:.0f} s]")
        def choose() -> bool:   # rank 0 decides (measuring at most once), every rank follows
            amp, why = decide_amp(args.amp, target, state_path(out), args.resume)
            print(f"[training precision: {'bf16 autocast' if amp else 'fp32'} ({why})]")
            return amp
        cfg = dataclasses.replace(cfg, amp=bool(world.pick(choose, device)))
        t1 = time.perf_counter()
        n = sum(fs.meta["conversations"] for fs in train_sets)
        note(f"[target + features ready in {t1 - t0:.0f} s; training {cfg.backbone} on "
            f"{cfg.domain}: {n} conversations, {cfg.epochs} epochs, lr {cfg.lr}]")
        train(cfg, target, train_sets, heldout, out, args.resume, args.save_interval,
              tokenizer.stop_ids, args.overwrite, vocab_sets, world)
        world.close()
        note(f"[{out} (log {out.with_name(out.stem + '.jsonl')}): training "
            f"{time.perf_counter() - t1:.0f} s, total {time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
