"""Hardware-sized trees (`--tree auto`) and the dtype that pays (`--dtype auto`): beyond the study.

The study's tree (60 nodes, depth 5, top-k 10) is sized for a GPU, where scoring 60 tokens costs
about what scoring one does. On a CPU it costs several plain steps, so the best tree is smaller
and its size depends on the hardware: the target's cost of scoring N tokens is measured once per
machine (`calibrate`), and each call keeps the nodes, and grows the depth, that maximise expected
tokens per second (`AutoTree`); where drafting does not pay, a call is a plain decoding step.
Every input is a draft-side quantity or a past acceptance, so verification stays exactly lossless:
`AutoTree` is a `taps.TreePolicy`, and `taps.generate(target, drafters, prompt,
tree=AutoTree.for_target(target))` runs the same verifier on its trees.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from extras.checkpoint import load_target
from model import TapsError, Transformer, clock, target_identity
from extras.runtime import cache_dir, resolve_dtype
from extras.runtime import atomic_write, machine, writing
from taps import DraftState, Tree, TreeShape, draft_tree, prune, tag


# ----------------------------------------------------------------------------- calibration
# The study's tree (60 nodes, depth 5, top-k 10) is sized for a GPU, where scoring 60 tokens costs
# about what scoring one does. On a CPU it costs 3x (fp32), so the best tree is smaller and its size
# depends on the hardware: measure the target's cost of scoring N tokens once, then pick each call's
# tree from draft-side quantities (which keeps verification exactly lossless, as any tree does).

TREES = ("auto", "study")
AUTO_MAX_NODES = 256
# plain steps before drafting is probed again (at first), drafted calls per probe
EXPLORE, PROBE = 8, 2
CALIBRATION_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@torch.inference_mode()
def measure_verify(target: Transformer, sizes=CALIBRATION_SIZES, prefix: int = 256,
                   reps: int = 5) -> dict:
    """Seconds the target takes to score n new tokens after `prefix` cached ones,
    {n: median of reps}."""
    dev = target.embed_tokens.weight.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(target.args.vocab_size, (1, prefix + max(sizes)), generator=g).to(dev)
    cache = target.new_cache(1, prefix + max(sizes))
    target(ids[:, :prefix], cache=cache, last_only=True)
    out = {}
    for n in sizes:
        times = []
        for _ in range(reps + 1):                    # the first run is a warm-up
            t0 = clock(dev)
            target(ids[:, prefix:prefix + n], cache=cache, last_only=True)
            times.append(clock(dev) - t0)
            cache.truncate(prefix)
        out[n] = sorted(times[1:])[reps // 2]
    return out


def calibration_key(target: Transformer, **what) -> str:
    """Calibrations are per (machine, target, dtype, threads): none from elsewhere is trusted.
    `what` names a measurement other than the verify curve (training's step, `train.auto_amp`)."""
    dev = target.embed_tokens.weight.device
    dtype = str(target.embed_tokens.weight.dtype).removeprefix("torch.")
    return json.dumps({"machine": machine(dev), "device": dev.type,
                       "target": target_identity(target), "dtype": dtype, **what}, sort_keys=True)


def read_curve(entry) -> dict:
    """A saved calibration entry's {n: seconds}; ValueError unless every time is finite and > 0
    (a NaN would silently turn speculation off)."""
    curve = {int(n): float(t) for n, t in entry["verify_s"].items()}
    if not curve or not all(0 < t < math.inf and n >= 1 for n, t in curve.items()):
        raise ValueError("times must be finite and > 0")
    return curve


def cached(key: str, measure, read, doing: str, path: Optional[Path] = None):
    """read(entry) of this machine's entry under `key` in $TAPS_CACHE/calibration.json, measuring it
    (entry = measure(), a dict) once when absent and saying `doing` then. An unreadable entry is
    measured anew (other machines' entries are kept); a cache that cannot be written costs a
    measurement next time, nothing else. read raises ValueError, KeyError, TypeError or
    AttributeError on an entry it cannot use."""
    path = Path(path or cache_dir() / "calibration.json")
    if path.is_dir():
        raise TapsError(f"{path}: is a directory, not a calibration file; "
                        "remove it or set TAPS_CACHE elsewhere")
    saved = {}
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (ValueError, OSError):
            print(f"[{path}: unreadable calibration file; measuring again]", file=sys.stderr)
        saved = saved if isinstance(saved, dict) else {}
        if key in saved:
            try:
                return read(saved[key])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                print(f"[{path}: this machine's calibration is unusable ({e}); measuring again]",
                      file=sys.stderr)
    k = json.loads(key)
    print(f"[{doing} on {k['machine']['cpu']}, {k['machine']['threads']} threads; cached in "
          f"{path}]", file=sys.stderr)
    saved[key] = {**measure(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    advice = "it is measured again next time; set TAPS_CACHE to a writable directory"
    try:
        with writing(path, advice):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: p.write_text(json.dumps(saved, indent=1)))
    except TapsError as e:
        print(f"[{e}]", file=sys.stderr)
    return read(saved[key])


def calibrate(target: Transformer, path: Optional[Path] = None) -> dict:
    """The target's {n: seconds to score n tokens} on this machine, measured once and cached in
    $TAPS_CACHE/calibration.json under `calibration_key` (`cached`)."""
    key = calibration_key(target)
    k = json.loads(key)
    return cached(key, lambda: {"verify_s": measure_verify(target)}, read_curve,
                  f"calibrating tree sizes: {k['target']['name']} in {k['dtype']}", path)


def verify_table(curve: dict, n_max: int) -> torch.Tensor:
    """(n_max + 1,) seconds to score n = 0..n_max tokens: linear between measured sizes,
    extrapolated from the last two beyond them; never decreasing in n (a noisy measurement cannot
    make more cheaper)."""
    n = sorted(curve)
    x = torch.tensor(n, dtype=torch.float64)
    y = torch.tensor([curve[i] for i in n], dtype=torch.float64).cummax(0).values
    grid = torch.arange(n_max + 1, dtype=torch.float64).clamp(min=n[0])
    j = (torch.searchsorted(x, grid, right=True) - 1).clamp(0, max(len(n) - 2, 0))
    if len(n) == 1:
        return y.expand(n_max + 1).clone()
    slope = (y[j + 1] - y[j]) / (x[j + 1] - x[j])
    return y[j] + slope * (grid - x[j])


def curves(target: Transformer) -> dict:
    """The target's calibration (`calibrate`) in fp32 and in bf16: {"fp32": {n: s}, "bf16": ...}."""
    return {"fp32": calibrate(target.float()),
            "bf16": calibrate(copy.deepcopy(target).to(torch.bfloat16))}


def faster_dtype(curve: dict, tokens: int = 16) -> torch.dtype:
    """bf16 when `curves` measured the largest size within `tokens` faster in bf16 than in fp32
    (the least size, below all of them), else fp32."""
    fp32, bf16 = curve["fp32"], curve["bf16"]
    n = max((k for k in fp32 if k <= tokens), default=min(fp32))
    return torch.bfloat16 if bf16[n] < fp32[n] else torch.float32


def auto_dtype(target: Transformer, tokens: int = 16) -> torch.dtype:
    """The dtype that pays for calls scoring about `tokens` tokens at once: a verified tree (16,
    typical) or, for training's features, a whole conversation. bf16 on CUDA; on a CPU, the one
    the calibration measured faster at that size (`faster_dtype`): bf16 on cores with AMX, fp32
    where bf16 is emulated, and on AVX512-BF16 without AMX it can differ by size (16 tokens
    faster in bf16, 256 slower: results/REPORT.md). Decided by measuring, not by CPU flags."""
    if target.embed_tokens.weight.device.type == "cuda":
        return torch.bfloat16
    return faster_dtype(curves(target), tokens)


def load_for(path, device, dtype: Optional[str], tokens: int = 16):
    """(target, tokenizer) in the --dtype named (None: the device's default); 'auto' is bf16 on
    CUDA, and on a CPU loads fp32 and keeps `auto_dtype`'s choice for calls of `tokens`."""
    if dtype != "auto" or str(device).startswith("cuda"):
        return load_target(path, device, resolve_dtype(None if dtype == "auto" else dtype, device))
    target, tokenizer = load_target(path, device, torch.float32)
    return target.to(auto_dtype(target, tokens)), tokenizer


@dataclass
class AutoTree:
    """Each verifier call, the EAGLE-2 tree that maximises expected new tokens per second.

    A node is accepted (at T = 0) only with its whole path, whose draft probability is exp(logq), so
    a call that verifies the root and the nodes S is expected to emit E(S) = 1 + c * sum_S exp(logq)
    tokens; c = (accepted + 1) / (predicted + 1) over the calls so far calibrates the drafter's
    confidence against the acceptances measured. The call costs the drafting done so far, t_draft,
    plus verify_s[N], the measured cost of scoring N = |S| + 1 tokens. So:
      * size: keep the N - 1 best nodes that maximise E / (t_draft + verify_s[N]) (`prune`);
      * depth: grow one more level only while even its best case -- new nodes whose path
        probabilities add up to the frontier's, c * sum exp(frontier) -- would beat the best rate so
        far after paying one more drafting step (timed once per drafter, `step_cost`);
      * top_k: kept at the study's 10 (a drafting step costs about the same for 4 or 10 rows);
      * no tree at all: while drafted calls earn fewer tokens per second than plain steps, a call
        is a plain step (`speculate`), so a weak drafter cannot make decoding much slower.
    Every input is a draft-side quantity or a past acceptance: verification stays exactly lossless.
    """
    verify_s: torch.Tensor            # (n_max + 1,) seconds to score n tokens (`verify_table`)
    top_k: int = 10
    max_depth: int = 8
    accepted: float = 0.0             # accepted draft tokens so far (calibration numerator)
    predicted: float = 0.0            # sum of exp(logq) over the nodes verified so far
    # drafter -> seconds per drafting step
    steps: dict = field(default_factory=weakref.WeakKeyDictionary)
    spec_tokens: float = 0.0          # tokens and seconds of recent drafted calls (moving sums):
    spec_s: float = 0.0               # their ratio is the rate a drafted call earns
    skipped: int = 0                  # plain steps since the last drafted call
    explore: int = EXPLORE            # after this many plain steps, probe drafting again
    probe: int = 0                    # drafted calls left in the current probe
    fresh: bool = False               # the next drafted call starts a fresh rate measurement

    @classmethod
    def for_target(cls, target: Transformer, n_max: int = AUTO_MAX_NODES, **kw) -> "AutoTree":
        return cls(verify_table(calibrate(target), n_max), **kw)

    @property
    def n_max(self) -> int:
        return len(self.verify_s) - 1

    @property
    def shape(self) -> TreeShape:
        """The largest tree a call may verify (what `generate` sizes its caches for)."""
        return TreeShape(self.top_k, self.max_depth, self.n_max)

    @property
    def c(self) -> float:
        return (self.accepted + 1) / (self.predicted + 1)

    def step_cost(self, state: "DraftState", target: Transformer, root_token: int) -> float:
        """Seconds per drafting step of this drafter: trees of depth 3 and 1 timed (median of 3),
        their difference halved."""
        if state.drafter not in self.steps:
            dev = target.embed_tokens.weight.device

            def timed(depth):
                t = clock(dev)
                draft_tree(state, target, root_token, TreeShape(self.top_k, depth, None))
                return clock(dev) - t
            timed(3)                                                      # warm-up
            runs = sorted(timed(3) - timed(1) for _ in range(3))
            self.steps[state.drafter] = max(runs[1], 0.0) / 2
        return self.steps[state.drafter]

    def best(self, logq: torch.Tensor, elapsed: float) -> tuple[int, float, float]:
        """(N, expected tokens, tokens/s) of the best tree: the root and the top N - 1 of `logq`."""
        # on the CPU, beside verify_s
        conf = logq.double().cpu().exp().sort(descending=True).values[:self.n_max - 1]
        expected = 1 + self.c * torch.cat([conf.new_zeros(1), conf.cumsum(0)])      # N = 1, 2, ...
        rate = expected / (elapsed + self.verify_s[1:len(expected) + 1])
        i = int(rate.argmax())
        return i + 1, expected[i].item(), rate[i].item()

    def more(self, step_s: float, dev, t0: float, pool_logq: torch.Tensor,
             frontier_logq: torch.Tensor) -> bool:
        """grow_tree's question before each level (the call began drafting at t0): can one more
        drafting step pay for itself?"""
        elapsed = clock(dev) - t0
        n, expected, rate = self.best(pool_logq, elapsed)
        gain = self.c * frontier_logq.double().exp().sum().item()
        return (expected + gain) / (elapsed + step_s + self.verify_s[n].item()) > rate

    def size(self, tree: Tree, dev, t0: float) -> Tree:
        """The tree pruned to the best size for the time drafting has taken since t0. Nodes are
        valued by the scores `prune` ranks them by (`Tree.path_logq`), so the best N is counted
        over the very nodes prune keeps, a composed tree's included."""
        n, _, _ = self.best(torch.tensor(tree.path_logq[1:]), clock(dev) - t0)
        return prune(tree, n)

    def start(self, states: list, target: Transformer, root_token: int):
        """Time each drafter's step once, here (as prefill): no call's rate carries it."""
        for s in states:
            self.step_cost(s, target, root_token)

    def draft(self, states: list, target: Transformer, root_token: int, compose) -> Tree:
        """Each drafter's tree grown and sized, then composed (and a composed tree sized again);
        the root alone (a plain step) while drafting does not pay (`speculate`)."""
        if not self.speculate():
            return Tree([root_token], [None], [0.0], [None])
        dev = target.embed_tokens.weight.device
        steps = [self.step_cost(s, target, root_token) for s in states]
        t0 = clock(dev)
        trees = [tag(self.size(draft_tree(s, target, root_token,
                                          TreeShape(self.top_k, self.max_depth, None),
                                          functools.partial(self.more, step, dev, t0)),
                               dev, t0), i)
                 for i, (s, step) in enumerate(zip(states, steps))]
        tree = compose(trees)
        return self.size(tree, dev, t0) if len(trees) > 1 else tree

    def speculate(self) -> bool:
        """Draft this call, or take a plain decoding step (a tree of the root alone, N = 1)?
        Plain, while recent drafted calls earned fewer tokens per second than a plain step does
        (1 / verify_s[1]); after `explore` plain steps, a probe of PROBE drafted calls measures
        afresh, and each probe that still does not pay doubles the wait (up to 64 steps). So auto
        is never much slower than plain decoding, whatever the drafter, and the choice uses past
        calls only: still lossless."""
        if not self.spec_s or self.probe:
            self.probe = max(self.probe - 1, 0)
            return True
        if self.spec_tokens / self.spec_s > 1 / self.verify_s[1].item():
            self.explore = EXPLORE
            return True
        if self.skipped >= self.explore:
            self.skipped, self.probe, self.fresh = 0, PROBE - 1, True
            self.explore = min(2 * self.explore, 64)
            return True
        self.skipped += 1
        return False

    def record(self, tree: Tree, accepted: int, seconds: float):
        """After a drafted call: calibrate confidence (c) and the drafted calls' rate (a probe
        starts afresh). A plain step (the root alone) measures neither."""
        if len(tree) == 1:
            return
        self.predicted += sum(math.exp(s) for s in tree.path_logq[1:])   # as `size` valued them
        self.accepted += accepted
        keep = 0.0 if self.fresh else 0.9
        self.spec_tokens = keep * self.spec_tokens + accepted + 1
        self.spec_s = keep * self.spec_s + seconds
        self.fresh = False
