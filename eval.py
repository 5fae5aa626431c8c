"""Evaluate task-aware speculative decoding on the study's benchmarks and print its tables.

    python eval.py --compose merged --drafters checkpoints/eagle-math.safetensors checkpoints/eagle-chat.safetensors --limit 5
    python eval.py --compose single,average,route,route-entropy,merged --temperature 0,1 --json runs/demo.json
    python eval.py --report runs/demo-*.json

Methods (--compose, one or a comma-separated list; drafters in --drafters order, math first as in
the study, so lambda weights the first):
  single         each drafter alone, one row per checkpoint
  average        one drafter theta = lam * theta_0 + (1 - lam) * theta_1 (eq. 11); --lam-sweep: Figure 6
  route          each step, only the tree with the highest mean draft confidence is verified (eqs. 12-13)
  route-entropy  each step, the tree with the lowest mean draft entropy (the study's comparison)
  merged         every drafter's tree under one shared root, verified once (lossless: Lemma A.2) on
                 the trie of its token paths, as the study's candidate verification does
  merged-dedup   beyond the study: the same trie built before the call (identical paths united),
                 so the same tokens are accepted with fewer nodes verified
  --equal-budget beyond the study: also run the merged kinds with total_tokens // k nodes per tree,
                 so that a merged tree is no larger than one single tree
Every choice between or within trees uses draft-side quantities only (taps.COMPOSE), so the output
is distributed exactly as the target's own.

Measurement. For every prompt (MT-Bench: both turns, the second continuing the conversation with
the method's own first answer, which losslessness makes a sample of the target's) and every
method, speculative decoding runs, then plain target decoding of exactly as many tokens (no stop
tokens, so the same length) is timed in the same process; a plain timing is reused by the methods
that produce the same (prompt, length) -- at temperature 0 all of them. Per benchmark:
  tau     = new tokens / verifier calls over all its turns (taps.Stats: the prefill token excluded)
  speedup = total plain time / total speculative time
  greedy_match (temperature 0) = share of turns whose output equals plain greedy decoding: must be 1.
Tables (markdown, shaped like the study's): Table 1 (tau and speedup per benchmark and their
average), Table 3 (routing: share of prompts whose majority of steps went to each drafter, and share
of verifier calls), Tables 7-8 (mean entropy of accepted vs rejected draft tokens, draft and target
at T = 1), Tables 9-11 (acceptance rate by depth), Figure 6 (tau vs lambda), merged trees (whose node the
accepted path runs on: in a plain merged tree the branch of the drafter whose copy of the path goes
deepest, the first drafter's where both do; merged-dedup counts a node both drafted as both).

Uncertainty: every tau gets a 95% percentile bootstrap interval over prompts (an item's turns stay
together; the average over benchmarks resamples each benchmark on its own), and the study's
comparisons -- in-domain vs out-of-domain specialist, averaged / routed / merged / mixed vs the best
single specialist of each benchmark, merged vs routed, confidence vs entropy routing -- get paired
intervals on the same prompts.
Figures 6-8 (--figures DIR, matplotlib): tau vs lambda, draft entropy of accepted vs rejected
tokens, acceptance by depth.

Sections, in file order: setup · measurement · speed (make bench) · uncertainty · tables · figures · CLI.

JSON (--json PATH, default runs/eval-<date>-<time>.json): one file per (method, temperature) run, each

    {"schema": 1, "config": {method, compose, lambda, temperature, tree budget, drafters (path, sha256, metadata),
                target, benchmarks, limit, seed, versions (python, torch, git commit), ...},
     "results": {"<bench>": {"tau", "speedup", "greedy_match", "alpha_by_depth", "entropy",
                             "routing", "accepted_from", "mean_tree_size", times, counts, "turns": [...]},
                 ..., "average": {"tau", "speedup"}}}

(--report reads schema 1 only and checks the types of what its tables read), so `results[bench]["tau"]` reads directly. One run writes PATH itself; several write
PATH's stem + "-<method>-T<temperature>" + suffix (e.g. runs/demo-merged-T0.json) next to each
other, and `--report` prints the tables of any set of them. Each file is rewritten (atomically)
after every benchmark, so Ctrl-C loses at most the benchmark in progress; rerun the rest with
--bench and another --json, and --report joins the files of the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data import BENCHMARKS, DataError, load_bench
from model import (DTYPES, TapsError, atomic_write, check_flags, check_writable, clock, context_budget, default_device,
                   describe, generate_plain, load_target, logits_to_probs, machine, mean, one_line_errors, resolve_dtype, writing)
from taps import COMPOSE, EAGLE_WEIGHTS, TREES, AutoTree, Drafter, Stats, TorchRandom, auto_dtype, average, generate, load_for

METHODS = ("single", "average", *(m for m in COMPOSE if m != "single"))
MERGED = ("merged", "merged-dedup")
BENCH_NAMES = {"mt_bench": "MT-Bench", "gsm8k": "GSM8K", "math_500": "MATH-500", "svamp": "SVAMP"}


@dataclass
class Decoding:
    """What every run of an evaluation shares: the new-token budget, sampling and the study tree's shape."""
    max_new_tokens: int = 128
    top_p: float = 1.0
    top_k: int = 10                    # study tree: children per node and frontier width
    depth: int = 5                     # study tree: drafting steps
    seed: int = 0


@dataclass
class Run:
    """One row of the tables: a method at one temperature, with its drafters and what it measured."""
    name: str
    compose: str                       # a taps.COMPOSE key
    drafters: list                     # Drafter objects handed to taps.generate
    temperature: float
    budget: int                        # total_tokens of each drafted tree
    config: dict                       # what the JSON records about this run
    results: dict = field(default_factory=dict)
    auto: Optional[AutoTree] = None    # --tree auto: hardware-sized trees, calibrated over the run's calls

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-") + f"-T{self.temperature:g}"


# ----------------------------------------------------------------------------- setup

def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def versions() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "torch": torch.__version__, "git_commit": commit, "git_dirty": dirty}


def identity(path: str, drafter: Drafter) -> dict:
    """Which drafter this is: its file, a fingerprint of the file (of the weights, for an EAGLE
    checkpoint directory), and the metadata it was saved with."""
    path = Path(path)
    weights = next((path / n for n in EAGLE_WEIGHTS if (path / n).is_file()), None) if path.is_dir() else path
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights and weights.is_file() else None
    return {"path": str(path), "sha256_16": digest, **drafter.meta}


def plan(methods: list[str], temperatures: list[float], drafters: list, names: list[str], idents: list[dict],
         shared: dict, total_tokens: int = 60, lams=(0.5,), equal_budget: bool = False) -> list[Run]:
    """The runs (rows) asked for: methods x temperatures, `single` once per drafter, `average` once per
    lambda in `lams`, each merged kind also at total_tokens // k nodes per tree with `equal_budget`."""
    k = len(drafters)
    runs = []
    for t in temperatures:
        for method in methods:
            if method != "single" and k < 2:
                raise TapsError(f"compose {method!r} takes two or more drafters, got {k}")
            base = dict(shared, compose=method, temperature=t, tree_budget=total_tokens, equal_budget=False,
                        drafters=idents, **{"lambda": None})
            if method == "single":
                for name, d, ident in zip(names, drafters, idents):
                    runs.append(Run(name, "single", [d], t, total_tokens, dict(base, method=name, drafters=[ident])))
            elif method == "average":
                for lam in lams:
                    name = f"average λ={lam:g}"
                    runs.append(Run(name, "single", [average(drafters, lam)], t, total_tokens,
                                    dict(base, method=name, **{"lambda": lam})))
            else:
                runs.append(Run(method, method, drafters, t, total_tokens, dict(base, method=method)))
                if method in MERGED and equal_budget:
                    budget = total_tokens // k
                    name = f"{method}, equal budget ({k}x{budget})"
                    runs.append(Run(name, method, drafters, t, budget,
                                    dict(base, method=name, tree_budget=budget, equal_budget=True)))
    return runs


# ----------------------------------------------------------------------------- measurement

class PlainClock:
    """Plain decoding of n tokens after a prompt, timed; reused for an identical (prompt, n, T)."""

    def __init__(self, target, seed):
        self.target, self.seed, self.memo = target, seed, {}

    def __call__(self, ids, n, temperature, top_p=1.0):
        key = (tuple(ids), n, temperature, top_p)
        if key not in self.memo:
            dev = self.target.embed_tokens.weight.device
            g = torch.Generator(device=dev).manual_seed(self.seed)
            t0 = clock(dev)
            out = generate_plain(self.target, ids, n, temperature, top_p, generator=g)   # no stop ids: exactly n tokens
            self.memo[key] = (clock(dev) - t0, out)
        return self.memo[key]


def run_item(target, tokenizer, run: Run, item: dict, dec: Decoding, seed: int, plain: PlainClock) -> list[tuple[dict, Stats]]:
    """All turns of one benchmark item: speculative decoding, then plain decoding of the same length."""
    dev = target.embed_tokens.weight.device
    messages, turns = [], []
    for turn, question in enumerate(item["turns"]):
        messages.append({"role": "user", "content": question})
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        t0 = clock(dev)
        out, stats = generate(target, run.drafters, ids, dec.max_new_tokens, run.temperature, dec.top_p, dec.top_k,
                              dec.depth, run.budget, run.compose, stop_ids=tokenizer.stop_ids,
                              rng=TorchRandom(seed + turn), auto=run.auto)
        spec_s = clock(dev) - t0
        plain_s, ref = plain(ids, len(out), run.temperature, dec.top_p)
        record = {"question_id": item["question_id"], "turn": turn + 1, "new_tokens": stats.new_tokens,
                  "calls": stats.calls, "tau": stats.tau, "spec_s": spec_s, "plain_s": plain_s,
                  "match": out == ref if run.temperature == 0 else None}
        if record["match"] is False:
            record.update(parting(target, ids, out, ref))
        turns.append((record, stats))
        messages.append({"role": "assistant", "content": tokenizer.decode([t for t in out if t not in tokenizer.stop_ids])})
    return turns


@torch.inference_mode()
def parting(target, ids, out, ref) -> dict:
    """Where greedy speculative output left plain greedy output: the first differing position and the
    target's logit margin (top-1 minus top-2) there, as plain decoding computed it. In fp32 they never
    part; in bf16 a tree pass and a one-token pass round differently, so they can at near-ties."""
    i = next(j for j, (x, y) in enumerate(zip(out + [None], ref + [None])) if x != y)
    logits, _ = target(torch.tensor([ids + ref[:i]], device=target.embed_tokens.weight.device), last_only=True)
    top2 = logits[0, -1].topk(2).values
    return {"first_diff": i, "margin": (top2[0] - top2[1]).item()}


def combine(stats: list[Stats]) -> Stats:
    """One Stats for many generations: per-call and per-token lists concatenated, counts and times summed."""
    out = Stats()
    for s in stats:
        for f in dataclasses.fields(Stats):
            setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
    return out


ENTROPY_EDGES = np.linspace(0.0, 12.0, 49)   # nats, 0.25 wide: up to ln(128,256) = 11.76, Llama 3's vocabulary


def shares(values: list[int], k: int) -> list[float]:
    return [values.count(i) / len(values) if values else math.nan for i in range(k)]


def bench_results(items: list[list[tuple[dict, Stats]]], k: int) -> dict:
    """A benchmark's figures from its items' turns (each item a list of (record, Stats))."""
    records = [r for turns in items for r, _ in turns]
    s = combine([st for turns in items for _, st in turns])
    summary = s.summary()
    votes = [Counter(x for _, st in turns for x in st.routed) for turns in items]
    majority = [v.most_common(1)[0][0] for v in votes if v]   # ties: the drafter chosen first
    spec_s, plain_s = sum(r["spec_s"] for r in records), sum(r["plain_s"] for r in records)
    matches = [r["match"] for r in records if r["match"] is not None]
    return {
        "tau": summary["tau"], "speedup": plain_s / spec_s,
        "greedy_match": mean(matches, None),
        "alpha_by_depth": summary["alpha_by_depth"],
        "entropy": {"draft": summary["draft_entropy"], "target": summary["target_entropy"]},
        "entropy_hist": {"edges": ENTROPY_EDGES.tolist(),   # Figure 7: counts of tokens per entropy bin
                         **{who: {k: np.histogram(np.clip(getattr(s, f"{who}_entropy_{k}"), 0, ENTROPY_EDGES[-1]),
                                                  ENTROPY_EDGES)[0].tolist() for k in ("accepted", "rejected")}
                            for who in ("draft", "target")}},
        # routing: the drafter whose tree was verified (-1 = a merged tree), per call and by prompt majority
        "routing": {"per_call": shares(s.routed, k), "per_prompt_majority": shares(majority, k),
                    "merged_calls": s.routed.count(-1) / max(s.calls, 1)},
        # whose node the accepted path started with: each drafter's, then several drafters' (a united
        # node of merged-dedup), then none (nothing accepted)
        "accepted_from": shares(s.accepted_from, k) + [s.accepted_from.count(x) / max(s.calls, 1) for x in (-2, -1)],
        "mean_tree_size": summary["mean_tree_size"],
        "prompts": len(items), "new_tokens": s.new_tokens, "calls": s.calls,
        "spec_s": spec_s, "plain_s": plain_s, "draft_s": s.draft_time, "verify_s": s.verify_time,
        "prefill_s": s.prefill_time, "turns": records,
    }


def averages(results: dict) -> dict:
    benches = [b for b in results if b != "average"]
    over = lambda key: mean([results[b][key] for b in benches if results[b][key] is not None], None)
    return {"tau": over("tau"), "speedup": over("speedup")}


def finite(x):
    """NaN (e.g. a mean over no rejected tokens) -> None, so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


SCHEMA = 1   # the layout of a results file (the module docstring); --report reads this one only


def as_dict(run: Run) -> dict:
    return finite({"schema": SCHEMA, "config": run.config, "results": run.results})


def json_path(base: Path, run: Run, several: bool) -> Path:
    return base.with_name(f"{base.stem}-{run.slug}{base.suffix}") if several else base


def write_json(path: Path, run: Run):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(as_dict(run), indent=1, ensure_ascii=False) + "\n"))


def evaluate(target, tokenizer, runs: list[Run], bench_items: dict, dec: Decoding, json_base: Path) -> set:
    """Every benchmark, every item, every run side by side; results land in run.results and the JSON
    files. Returns the runs (slugs) whose JSON could not be written."""
    from tqdm import tqdm
    plain = PlainClock(target, dec.seed)
    warm = tokenizer.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[0]
    generate_plain(target, warm, 4)                                    # first-call overheads out of the timings
    generate(target, runs[0].drafters, warm, 4, top_k=dec.top_k, depth=dec.depth, total_tokens=runs[0].budget,
             compose=runs[0].compose)
    k, failed = max(len(r.drafters) for r in runs), set()
    for bench, items in bench_items.items():
        per_run = {id(r): [] for r in runs}
        for i, item in enumerate(tqdm(items, desc=bench, unit="prompt", file=sys.stderr)):
            for r in runs:
                per_run[id(r)].append(run_item(target, tokenizer, r, item, dec, dec.seed * 1_000_003 + 1000 * i, plain))
        for r in runs:
            r.results[bench] = bench_results(per_run[id(r)], k)
            r.results["average"] = averages(r.results)
            try:
                write_json(json_path(json_base, r, len(runs) > 1), r)
            except OSError as err:   # the results are still printed; say so once per file
                print(f"error: could not write {json_path(json_base, r, len(runs) > 1)} ({err}); "
                      f"the tables below are all that is kept", file=sys.stderr)
                failed.add(r.slug)
    return failed


# ----------------------------------------------------------------------------- speed (make bench)

SPEED_PAIRS = (("gsm8k", 0), ("mt_bench", 1))   # each specialist on its own domain: (benchmark, drafter index)
PEER = (("HF transformers, greedy", {}), ("HF transformers, prompt lookup", {"prompt_lookup_num_tokens": 10}))


def timed(target, fn, prompts, n) -> tuple[float, list]:
    """Seconds for fn(ids, n) over all prompts (after an 8-token warm-up on the first), and the outputs."""
    dev = target.embed_tokens.weight.device
    fn(prompts[0], 8)
    t0, outs = clock(dev), [fn(ids, n) for ids in prompts]
    return clock(dev) - t0, outs


BUSY = 1.25   # plain decoding this much faster or slower after the speculative runs than before: a busy machine


def speed_rows(target, tokenizer, drafter, prompts, n, study: dict) -> list[dict]:
    """Plain decoding, the study's tree and the auto tree on the same prompts, back to back, T = 0,
    then plain decoding again: ratios are against the mean of the two plain timings, and the two
    disagreeing by more than BUSY means something else ran on the machine meanwhile (`busy`)."""
    stop = tokenizer.stop_ids
    plain_fn = lambda ids, n: generate_plain(target, ids, n, stop_ids=stop)
    before_s, plain = timed(target, plain_fn, prompts, n)
    spec = []
    for name, auto in (("study tree (60/5/10)", None), ("auto tree", AutoTree.for_target(target))):
        spec_s, outs = timed(target, lambda ids, n: generate(target, drafter, ids, n, stop_ids=stop, auto=auto, **study),
                             prompts, n)
        spec.append((name, spec_s, outs))
    after_s, _ = timed(target, plain_fn, prompts, n)
    plain_tok_s = sum(map(len, plain)) / ((before_s + after_s) / 2)
    rows = [{"config": "plain decoding", "tok_s": plain_tok_s, "vs_plain": 1.0,
             "plain_tok_s_before_after": [sum(map(len, plain)) / t for t in (before_s, after_s)],
             "busy": max(before_s, after_s) / min(before_s, after_s) > BUSY}]
    for name, spec_s, outs in spec:
        s = combine([st for _, st in outs])
        tok_s = sum(len(out) for out, _ in outs) / spec_s
        rows.append({"config": name, "tok_s": tok_s, "vs_plain": tok_s / plain_tok_s,
                     "tau": s.tau, "draft_ms": 1000 * s.draft_time / s.calls, "verify_ms": 1000 * s.verify_time / s.calls,
                     "nodes": sum(s.tree_size) / s.calls, "drafted_calls": sum(x > 1 for x in s.tree_size) / s.calls,
                     "greedy_match": f"{sum(out == ref for (out, _), ref in zip(outs, plain))}/{len(plain)}"})
    return rows


def peer_rows(path, dtype, device, tokenizer, prompts, n, plain_tok_s) -> list[dict]:
    """HF transformers on the same weights, prompts and budgets: plain greedy and prompt lookup."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("[peer skipped: transformers is not installed; `make bench` installs it]", file=sys.stderr)
        return []
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    rows = []
    for name, kw in PEER:
        def run(ids, n):
            x = torch.tensor([ids], device=device)
            with torch.inference_mode():
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                   eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=sorted(tokenizer.stop_ids)[0], **kw)
            return y[0, len(ids):].tolist()
        seconds, outs = timed(model.model, run, prompts, n)   # model.model: its embed_tokens tells the device
        tok_s = sum(map(len, outs)) / seconds
        rows.append({"config": name, "tok_s": tok_s, "vs_plain": tok_s / plain_tok_s})
    return rows


def speed(drafter_paths: list, path: Path, dec: Decoding, total_tokens: int = 60, target_path=None, device="cpu",
          limit: int = 3, data_dir=None):
    """`make bench`: one table of tok/s per dtype and configuration, each ratio against plain decoding
    in the same dtype and process; then HF transformers (the peer) on the same prompts. The JSON at
    `path` grows by each finished table, so an interrupted benchmark keeps what it printed."""
    from model import default_target_dir
    m = machine(device)
    print(f"{describe(m)}; T = 0, first {limit} prompts, up to {dec.max_new_tokens} new tokens\n")
    target, tokenizer = load_target(target_path, device, resolve_dtype(None, device))
    dtypes = [target.embed_tokens.weight.dtype]
    if device.startswith("cpu") and auto_dtype(target) == torch.bfloat16:
        dtypes.append(torch.bfloat16)                 # fp32, and bf16 where it pays on this CPU
    study = dict(top_k=dec.top_k, depth=dec.depth, total_tokens=total_tokens)
    results = []
    try:
        for dtype, (bench, k) in ((d, pair) for d in dtypes for pair in SPEED_PAIRS):
            target = target.to(dtype)
            drafters = [Drafter.load(p, target) for p in drafter_paths]
            items = load_bench(bench, limit, data_dir)
            prompts = [tokenizer.encode_chat([{"role": "user", "content": it["turns"][0]}], add_generation_prompt=True)[0]
                       for it in items]
            k = min(k, len(drafters) - 1)             # one drafter given: it runs on both benchmarks
            rows = speed_rows(target, tokenizer, drafters[k], prompts, dec.max_new_tokens, study)
            rows += peer_rows(target_path or default_target_dir(), dtype, device, tokenizer, prompts, dec.max_new_tokens,
                              rows[0]["tok_s"])
            for r in rows:
                r.update(dtype=str(dtype).removeprefix("torch."), benchmark=BENCH_NAMES[bench],
                         drafter=Path(drafter_paths[k]).stem)
            print(table(["dtype", "benchmark", "drafter", "configuration", "tok/s", "vs plain", "τ", "draft ms/call",
                         "verify ms/call", "nodes/call", "drafted calls", "greedy = plain"],
                        [[r["dtype"], r["benchmark"], r["drafter"], r["config"], fmt(r["tok_s"], ".1f"),
                          f"{fmt(r['vs_plain'])}×", fmt(r.get("tau")), fmt(r.get("draft_ms"), ".1f"),
                          fmt(r.get("verify_ms"), ".1f"), fmt(r.get("nodes"), ".1f"), pct(r.get("drafted_calls")),
                          r.get("greedy_match", "–")] for r in rows]) + "\n", flush=True)
            if rows[0]["busy"]:
                before, after = rows[0]["plain_tok_s_before_after"]
                print(f"warning: plain decoding ran at {before:.1f} tok/s before and {after:.1f} after the speculative "
                      f"runs: the machine was busy, so these ratios are unreliable; rerun on an idle machine\n",
                      file=sys.stderr)
            results += rows
            with writing(path, "the tables above are all that is kept"):
                atomic_write(path, lambda p: p.write_text(
                    json.dumps({"machine": m, "argv": sys.argv[1:], "rows": finite(results)}, indent=1) + "\n"))
    except KeyboardInterrupt:
        kept = f"the {len(results)} rows above are in {path}" if results else "nothing was measured yet"
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    print(f"[JSON: {path}]")


# ----------------------------------------------------------------------------- uncertainty

BOOTSTRAP = 2000   # resamples of the prompts per interval


def kind(run: dict) -> str:
    """What a run is: "average" (a weight average at some lambda) or its composition, e.g. "single"."""
    c = run["config"]
    return "average" if c["lambda"] is not None else c["compose"]


def item_counts(run: dict, bench: str) -> dict:
    """question_id -> (new tokens, verifier calls) of one benchmark, summed over each item's turns:
    the unit a bootstrap resamples (an MT-Bench item's two turns stay together)."""
    out = {}
    for x in get(run, bench, "turns") or []:
        new, calls = out.get(x["question_id"], (0, 0))
        out[x["question_id"]] = (new + x["new_tokens"], calls + x["calls"])
    return out


def bootstrap(a: list[dict], b: Optional[list[dict]] = None, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval over prompts of the mean over benchmarks (strata) of
    tau = sum(new tokens) / sum(calls), each benchmark resampled on its own; with b, of tau_a - tau_b
    on the prompts both runs measured, one resample serving both (paired). a, b: one `item_counts`
    dict per benchmark. Returns (low, high), or None where a benchmark has fewer than 2 prompts (one
    prompt resampled is always itself: no interval)."""
    g = np.random.default_rng(seed)
    stats = np.zeros(n)
    for k, sa in enumerate(a):
        sb = b[k] if b is not None else sa
        # a prompt with no verifier call (a one-token reply) has no tau to resample
        keys = sorted((q for q in set(sa) & set(sb) if sa[q][1] and sb[q][1]), key=str)
        if len(keys) < 2:
            return None
        idx = g.integers(0, len(keys), (n, len(keys)))                  # (n, prompts)
        tau = lambda s: (np.array([s[q][0] for q in keys])[idx].sum(1)
                         / np.maximum(np.array([s[q][1] for q in keys])[idx].sum(1), 1))
        stats += (tau(sa) - (tau(sb) if b is not None else 0)) / len(a)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci is not None and all(map(known, ci)) else "–"


def comparisons(rs: list[dict], benches: list[str]) -> list[tuple[str, dict, dict]]:
    """The study's comparisons as (name, run A, run B) pairs, A - B (B may differ per benchmark: a
    dict bench -> run): in-domain vs out-of-domain specialist (math on the math benchmarks, chat on
    MT-Bench), averaged (λ = 0.5) / routed / merged / each mixed-data drafter vs the best single
    specialist of each benchmark, merged vs routed, routing by confidence vs by entropy, and for RQ2
    mixed-large vs mixed-small, routed and merged vs mixed-large."""
    domain = lambda r: r["config"]["drafters"][0].get("domain")
    singles = {domain(r): r for r in rs if kind(r) == "single"}
    by = {kind(r): r for r in rs if kind(r) != "single" and not r["config"]["equal_budget"]}
    avg = next((r for r in rs if r["config"]["lambda"] == 0.5), None)
    out = []
    if "math" in singles and "chat" in singles:
        home = {b: ("chat", "math") if b == "mt_bench" else ("math", "chat") for b in benches}
        out.append(("in-domain − out-of-domain specialist", {b: singles[home[b][0]] for b in benches},
                    {b: singles[home[b][1]] for b in benches}))
        best = {b: max((singles["math"], singles["chat"]), key=lambda r: get(r, b, "tau") or 0) for b in benches}
        candidates = [("averaged (λ = 0.5)", avg), ("routed", by.get("route")), ("merged", by.get("merged"))]
        candidates += [(f"{d}", singles[d]) for d in singles if d not in ("math", "chat")]
        out += [(f"{name} − best single", {b: r for b in benches}, best) for name, r in candidates if r]
    pairs = (("merged − routed", "merged", "route"), ("confidence − entropy routing", "route", "route-entropy"))
    out += [(name, {b: by[x] for b in benches}, {b: by[y] for b in benches}) for name, x, y in pairs if x in by and y in by]
    # RQ2: more mixed data, and composing two specialists vs one drafter trained on both corpora
    large = singles.get("mixed-large")
    if large and "mixed-small" in singles:
        out.append(("mixed-large − mixed-small", {b: large for b in benches}, {b: singles["mixed-small"] for b in benches}))
    out += [(f"{name} − mixed-large", {b: by[k] for b in benches}, {b: large for b in benches})
            for name, k in (("routed", "route"), ("merged", "merged")) if large and k in by]
    return out


# ----------------------------------------------------------------------------- tables

def known(x) -> bool:
    """A number to print: not missing, NaN or infinite (a mean over nothing, a time of 0 s)."""
    return x is not None and not (isinstance(x, float) and not math.isfinite(x))


def fmt(x, spec=".2f"):
    return format(x, spec) if known(x) else "–"


def pct(x):
    return f"{100 * x:.0f}%" if known(x) else "–"


def get(run: dict, *keys):
    """run["results"][k1][k2]..., None where anything is missing (a partial or older run)."""
    x = run["results"]
    for k in keys:
        if isinstance(x, dict):
            x = x.get(k)
        elif isinstance(x, list) and k < len(x):
            x = x[k]
        else:
            return None
    return x


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def row_order(run: dict, paths: list[str]):
    """Rows in METHODS order: singles by drafter (the composed drafters in their order, then drafters
    run alone, such as the mixed-data ones, by training conversations: small before large, as the
    study's Table 1), averages by lambda, each merged kind before its equal budget."""
    c, k = run["config"], kind(run)
    d = c["drafters"][0]
    first = (paths.index(d["path"]), 0) if d["path"] in paths else (len(paths), (d.get("data") or {}).get("conversations", 0))
    return METHODS.index(k) if k in METHODS else len(METHODS), first, c["lambda"] or 0, c["equal_budget"]


def lambda_sweep(rs: list[dict], drafter_paths: list[str]) -> list[tuple[float, dict]]:
    """(lambda, run) of the averaged runs, sorted; lambda = 1 and 0 are the first and second drafter
    bit for bit, so their single runs stand in where no average was run there."""
    sweep = {r["config"]["lambda"]: r for r in rs if kind(r) == "average"}
    singles = {r["config"]["drafters"][0]["path"]: r for r in rs if kind(r) == "single"}
    if sweep and len(drafter_paths) == 2:
        for lam, path in ((1.0, drafter_paths[0]), (0.0, drafter_paths[1])):
            if lam not in sweep and path in singles:
                sweep[lam] = singles[path]
    return sorted(sweep.items())


def by_temperature(runs: list[dict]):
    """(T, its runs in row order, the benchmarks they measured, the composed drafters' paths) per temperature."""
    for t in sorted({r["config"]["temperature"] for r in runs}):
        rs = [r for r in runs if r["config"]["temperature"] == t]
        drafter_paths = [d["path"] for d in max((r["config"]["drafters"] for r in rs), key=len)]
        rs.sort(key=lambda r: row_order(r, drafter_paths))
        yield t, rs, [b for b in BENCHMARKS if any(b in r["results"] for r in rs)], drafter_paths


def method(r: dict) -> str:
    return r["config"]["method"]


def tables(runs: list[dict]) -> str:
    """The study's tables from run dicts {"config", "results"} (one per method and temperature)."""
    out = []
    for t, rs, benches, drafter_paths in by_temperature(runs):
        names = [BENCH_NAMES[b] for b in benches]
        drafter_names = [Path(p).stem for p in drafter_paths]

        rows = []
        for r in rs:
            turns = [x for b in benches for x in get(r, b, "turns") or []]
            matches = [x["match"] for x in turns if x["match"] is not None]
            margins = [x["margin"] for x in turns if x.get("margin") is not None]
            parted = f" (parted where the target's top-2 logits were ≤ {max(margins):.3f} apart)" if margins else ""
            sizes = [x for b in benches if (x := get(r, b, "mean_tree_size")) is not None]
            counts = [item_counts(r, b) for b in benches]
            rows.append([method(r)]
                        + [f"{fmt(get(r, b, 'tau'))} {interval(bootstrap([c]))} ({fmt(get(r, b, 'speedup'))}×)"
                           for b, c in zip(benches, counts)]
                        + [f"{fmt(get(r, 'average', 'tau'))} {interval(bootstrap(counts))} "
                           f"({fmt(get(r, 'average', 'speedup'))}×)", fmt(mean(sizes, None), ".0f")]
                        + ([f"{sum(matches)}/{len(matches)}{parted}"] if t == 0 else []))
        out.append(f"### Table 1 (T = {t:g}): acceptance length τ [95% bootstrap interval over prompts] (speedup "
                   f"over plain decoding)\n\n"
                   + table(["method"] + names + ["average", "nodes/call"] + (["greedy = plain"] if t == 0 else []), rows))

        rows = []
        for name, a, b in comparisons(rs, benches):
            ca, cb = [item_counts(a[x], x) for x in benches], [item_counts(b[x], x) for x in benches]
            taus = [(get(a[x], x, "tau"), get(b[x], x, "tau")) for x in benches]
            delta = [ta - tb if ta is not None and tb is not None else None for ta, tb in taus]
            rows.append([name] + [f"{fmt(d, '+.2f')} {interval(bootstrap([p], [q]))}" for d, p, q in zip(delta, ca, cb)]
                        + [f"{fmt(mean([d for d in delta if d is not None], None), '+.2f')} {interval(bootstrap(ca, cb))}"])
        if rows:
            out.append(f"### The study's comparisons (T = {t:g}): Δτ [paired 95% bootstrap interval over the same prompts]; "
                       f"an interval that excludes 0 decides\n\n" + table(["comparison"] + names + ["average"], rows))

        routed = [r for r in rs if r["config"]["compose"] in ("route", "route-entropy")]
        if routed:
            rows = [[method(r), name] + [f"{pct(get(r, b, 'routing', 'per_prompt_majority', i))} / "
                                         f"{pct(get(r, b, 'routing', 'per_call', i))}" for b in benches]
                    for r in routed for i, name in enumerate(drafter_names)]
            out.append(f"### Table 3 (T = {t:g}): routing decisions, share of prompts (majority of steps) / "
                       f"share of verifier calls\n\n" + table(["method", "drafter"] + names, rows))

        merged = [r for r in rs if r["config"]["compose"] in MERGED]
        if merged:
            rows = [[method(r)] + [" / ".join(pct(x) for x in get(r, b, "accepted_from") or []) for b in benches]
                    for r in merged]
            out.append(f"### Merged trees (T = {t:g}): the accepted path runs on a branch of "
                       f"{' / '.join(drafter_names)} / both (merged-dedup) / nothing accepted\n\n"
                       + table(["method"] + names, rows))

        for who, n in (("draft", 7), ("target", 8)):
            rows = [[method(r)] + [f"{fmt(get(r, b, 'entropy', who, 'accepted'))} / "
                                   f"{fmt(get(r, b, 'entropy', who, 'rejected'))}" for b in benches] for r in rs]
            out.append(f"### Table {n} (T = {t:g}): {who} entropy (nats, at T = 1) of accepted / rejected draft "
                       f"tokens\n\n" + table(["method"] + names, rows))

        alphas = {(method(r), b): get(r, b, "alpha_by_depth") or [] for r in rs for b in benches}
        depth = max(map(len, alphas.values()), default=0)
        rows = [[m, BENCH_NAMES[b]] + [fmt(x) for x in a] + ["–"] * (depth - len(a)) for (m, b), a in alphas.items()]
        out.append(f"### Tables 9-11 (T = {t:g}): acceptance rate by depth (of the calls that reached depth d - 1, "
                   f"the share that accepted a token at depth d)\n\n"
                   + table(["method", "benchmark"] + [f"d={d + 1}" for d in range(depth)], rows))

        sweep = lambda_sweep(rs, drafter_paths)
        if len(sweep) > 1:
            rows = [[fmt(lam, "g")] + [fmt(get(r, b, "tau")) for b in benches] + [fmt(get(r, "average", "tau"))]
                    for lam, r in sweep]
            out.append(f"### Figure 6 (T = {t:g}): τ vs λ (λ weights {drafter_names[0]}, 1 - λ {drafter_names[-1]})\n\n"
                       + table(["λ"] + names + ["average"], rows))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate composed specialist drafters on the study's benchmarks "
                                             "(tau, speedup, routing, entropy, acceptance by depth).")
    ap.add_argument("--compose", default="merged", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                    help=f"one or a comma-separated list of: {', '.join(METHODS)} (default merged)")
    ap.add_argument("--drafters", nargs="+", metavar="CKPT",
                    default=["checkpoints/eagle-math.safetensors", "checkpoints/eagle-chat.safetensors"],
                    help="drafter checkpoints, math first (default: checkpoints/eagle-{math,chat}.safetensors)")
    ap.add_argument("--bench", default=",".join(BENCHMARKS), type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
                    help=f"comma-separated benchmarks (default {','.join(BENCHMARKS)})")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each benchmark (default: all)")
    ap.add_argument("--temperature", type=floats, default=[0.0], help="0 = greedy; a comma-separated list runs each")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--lam", type=float, default=0.5, help="averaging weight of the first drafter (eq. 11)")
    ap.add_argument("--lam-sweep", type=floats, default=None, metavar="L1,L2,...",
                    help="average at each lambda (Figure 6), e.g. 0,0.25,0.5,0.75,1")
    ap.add_argument("--equal-budget", action="store_true",
                    help="also run merged kinds with total_tokens // k nodes per tree (no larger than one tree)")
    ap.add_argument("--tree", choices=TREES, default="study",
                    help="study (default): the fixed --total-tokens/--depth/--top-k tree, as in the study's tables; "
                         "auto: sized for this machine each call (taps.AutoTree)")
    ap.add_argument("--total-tokens", type=int, default=60)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, metavar="PATH",
                    help="where to write the results (default runs/eval-<date>-<time>.json; see the module docstring)")
    ap.add_argument("--force", action="store_true", help="replace existing result files (never read-only ones)")
    ap.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="print the tables of saved runs and exit")
    ap.add_argument("--figures", type=Path, metavar="DIR",
                    help="also write the study's Figures 6-8 as PNG files in DIR (needs matplotlib, an optional extra)")
    ap.add_argument("--target", help="HF checkpoint directory (default: the embedded default target)")
    ap.add_argument("--data-dir", help="data directory (default: $TAPS_DATA or ../shared/data)")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtype", choices=[*DTYPES, "auto"], default=None,
                    help="default: fp32 on CPU (greedy output checkable bit for bit against plain decoding), bf16 on "
                         "CUDA; auto: bf16 where this machine's calibration says it pays")
    ap.add_argument("--speed", action="store_true",
                    help="the speed benchmark (make bench): plain vs study vs auto trees per dtype, and HF transformers")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's; 1 is fastest on a CPU shared with other jobs)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.compose if m not in METHODS]
    if unknown:
        ap.error(f"unknown --compose {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return args


NUM, INT, STR = (int, float, type(None)), (int,), (str,)
# What the tables read of a results file, by type (a key may be missing: a partial or older run).
CONFIG_SHAPE = {"method": STR, "compose": STR, "temperature": (int, float), "lambda": NUM, "equal_budget": (bool,),
                "drafters": [{"path": STR}]}
BENCH_SHAPE = {"tau": NUM, "speedup": NUM, "mean_tree_size": NUM, "alpha_by_depth": [NUM], "accepted_from": [NUM],
               "routing": {"per_call": [NUM], "per_prompt_majority": [NUM]},
               "entropy": {w: {"accepted": NUM, "rejected": NUM} for w in ("draft", "target")},
               "turns": [{"question_id": (int, str), "new_tokens": INT, "calls": INT, "match": (bool, type(None)),
                          "margin": NUM}]}


def misfit(x, shape, where: str) -> Optional[str]:
    """Where x does not have `shape` (a tuple of types, [shape of each item], {key: shape}), else None."""
    if isinstance(shape, tuple):
        ok = isinstance(x, shape) and not (isinstance(x, bool) and bool not in shape)
        return None if ok else f"{where} is {type(x).__name__}"
    if isinstance(shape, list):
        if not isinstance(x, list):
            return f"{where} is {type(x).__name__}, not a list"
        return next((m for i, v in enumerate(x) if (m := misfit(v, shape[0], f"{where}[{i}]"))), None)
    if not isinstance(x, dict):
        return f"{where} is {type(x).__name__}, not an object"
    return next((m for k, s in shape.items() if k in x and (m := misfit(x[k], s, f"{where}.{k}"))), None)


def load_runs(paths: list[Path]) -> list[dict]:
    """Saved runs, checked. Files of the same run (method and temperature), e.g. an interrupted
    evaluation and its completion with --bench set to the remaining benchmarks, are joined."""
    runs = {}
    for p in paths:
        if p.is_dir():
            raise TapsError(f"{p}: is a directory; pass eval.py's JSON files, e.g. {p}/*.json")
        try:
            obj = json.loads(p.read_text())
            if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
                raise ValueError(f"schema {obj.get('schema') if isinstance(obj, dict) else None!r}, "
                                 f"this eval.py reads schema {SCHEMA}")
            c, results = obj["config"], obj["results"]
            problem = misfit(c, CONFIG_SHAPE, "config") or misfit(results, {}, "results") or next(
                (m for b in BENCHMARKS if b in results and (m := misfit(results[b], BENCH_SHAPE, b))), None)
            if problem:
                raise TypeError(problem)
            missing = [k for k in CONFIG_SHAPE if k not in c]
            if missing or not c["drafters"]:
                raise KeyError(f"config.{(missing or ['drafters'])[0]}")
            if not any(b in results for b in BENCHMARKS):
                raise KeyError(f"results of none of the benchmarks {', '.join(BENCHMARKS)}")
            key = (c["method"], c["temperature"])
        except FileNotFoundError:
            raise TapsError(f"{p}: no such file") from None
        except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
            raise TapsError(f"{p}: not an eval.py result ({type(e).__name__}: {e})") from None
        if key in runs:
            runs[key]["results"].update(obj["results"])
            runs[key]["results"]["average"] = averages(runs[key]["results"])
        else:
            runs[key] = obj
    return list(runs.values())


# ----------------------------------------------------------------------------- figures (optional: matplotlib)

def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise TapsError("--figures needs matplotlib, an optional extra: pip install matplotlib") from None
    matplotlib.use("Agg")                     # files only, no display
    import matplotlib.pyplot as plt
    return plt


def figures(runs: list[dict], out: Path) -> list[Path]:
    """The study's Figures 6-8 as PNG files in `out`, per temperature: tau vs lambda, the draft
    entropy of accepted vs rejected tokens (each single drafter, each benchmark), acceptance by depth.
    All are drawn in a staging folder first and moved in together, so an interrupted run never leaves
    a new figure beside a stale one."""
    plt = pyplot()
    with writing(out, "choose another --figures directory"):
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    written = []

    def save(fig, name):
        fig.savefig(staging / name, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)

    try:
        for t, rs, benches, drafter_paths in by_temperature(runs):
            sweep = lambda_sweep(rs, drafter_paths)
            if len(sweep) > 1:
                fig, ax = plt.subplots(figsize=(5, 3.5))
                for b in benches + ["average"]:
                    ax.plot([lam for lam, _ in sweep], [get(r, b, "tau") for _, r in sweep], marker="o",
                            label=BENCH_NAMES.get(b, b), linestyle="--" if b == "average" else "-")
                ax.set(xlabel=f"λ (weight of {Path(drafter_paths[0]).stem})", ylabel="τ", title=f"Figure 6: τ vs λ, T = {t:g}")
                ax.legend(fontsize=8)
                save(fig, f"figure6-T{t:g}.png")
            singles = [r for r in rs if kind(r) == "single" and any(get(r, b, "entropy_hist") for b in benches)]
            if singles:
                fig, axes = plt.subplots(len(singles), len(benches), figsize=(3 * len(benches), 2.2 * len(singles)),
                                         squeeze=False, sharex=True)
                for row, r in zip(axes, singles):
                    for ax, b in zip(row, benches):
                        h = get(r, b, "entropy_hist")
                        for judged in ("accepted", "rejected"):
                            counts = np.array(h["draft"][judged]) if h else np.zeros(0)
                            if counts.sum():
                                ax.stairs(counts / counts.sum(), h["edges"], label=judged, fill=judged == "accepted", alpha=0.6)
                        ax.set_title(f"{method(r)} · {BENCH_NAMES[b]}", fontsize=8)
                        ax.tick_params(labelsize=7)
                axes[0][0].legend(fontsize=7)
                for ax in axes[-1]:
                    ax.set_xlabel("draft entropy (nats)", fontsize=8)
                fig.suptitle(f"Figure 7: draft entropy of accepted vs rejected tokens (share per bin), T = {t:g}", fontsize=9,
                             y=1.02)
                save(fig, f"figure7-T{t:g}.png")
            fig, axes = plt.subplots(1, len(benches), figsize=(3.2 * len(benches), 3), squeeze=False, sharey=True)
            for ax, b in zip(axes[0], benches):
                for r in rs:
                    alpha = get(r, b, "alpha_by_depth") or []
                    ax.plot(range(1, len(alpha) + 1), alpha, marker=".", label=method(r))
                ax.set(title=BENCH_NAMES[b], xlabel="depth d", ylim=(0, 1.02))
                ax.xaxis.get_major_locator().set_params(integer=True)
            axes[0][0].set_ylabel("acceptance rate at depth d")
            axes[0][-1].legend(fontsize=6, loc="lower left")
            fig.suptitle(f"Figure 8: acceptance rate by depth, T = {t:g}", fontsize=9, y=1.03)
            save(fig, f"figure8-T{t:g}.png")
        for path in written:
            os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def main(argv=None):
    args = parse_args(argv)
    dec = Decoding(args.max_new_tokens, args.top_p, args.top_k, args.depth, args.seed)
    with one_line_errors(DataError, interrupted="nothing was evaluated yet"):
        check_flags(args)
        if args.figures:
            pyplot()                                                    # installed? say so before any work
        if args.report:
            runs = load_runs(args.report)
            print(tables(runs))
            if args.figures:
                print(f"[figures: {', '.join(map(str, figures(runs, args.figures)))}]")
            return
        if args.threads is not None:
            if args.threads < 1:
                raise TapsError(f"--threads must be >= 1, got {args.threads} (leave it out for torch's default)")
            torch.set_num_threads(args.threads)
        if args.limit is not None and args.limit < 1:
            raise TapsError(f"--limit must be >= 1, got {args.limit}")
        k = len(args.drafters)
        if args.equal_budget and k > 1 and args.total_tokens // k < args.depth:
            raise TapsError(f"--equal-budget splits --total-tokens {args.total_tokens} into {k} trees of "
                            f"{args.total_tokens // k} nodes, fewer than --depth {args.depth}; "
                            f"give --total-tokens {k * args.depth} or more")
        for t in args.temperature:   # sampling arguments, validated as taps.generate does, before any work
            logits_to_probs(torch.zeros(1), t, args.top_p)
        bench_items = {b: load_bench(b, args.limit, args.data_dir) for b in args.bench}   # unknown names fail early
        json_base = args.json or Path("runs") / time.strftime(("bench" if args.speed else "eval") + "-%Y%m%d-%H%M%S.json")
        check_writable(json_base, "--json", args.force)                     # before any model is loaded
        if args.speed:
            return speed(args.drafters, json_base, dec, args.total_tokens, args.target, args.device, args.limit or 3,
                         args.data_dir)
        target, tokenizer = load_for(args.target, args.device, args.dtype, load_target)
        dec.max_new_tokens = context_budget(target, 1, dec.max_new_tokens, say=True)
        drafters = [Drafter.load(p, target) for p in args.drafters]
        idents = [identity(p, d) for p, d in zip(args.drafters, drafters)]
        shared = {"target": target.args.name, "target_path": args.target, "device": args.device,
                  "dtype": str(target.embed_tokens.weight.dtype), "tree": args.tree, "machine": machine(args.device),
                  "benchmarks": args.bench, "limit": args.limit, **dataclasses.asdict(dec),
                  "total_tokens": args.total_tokens, "versions": versions(),
                  "argv": sys.argv[1:] if argv is None else list(argv)}
        runs = plan(args.compose, args.temperature, drafters, [Path(p).stem for p in args.drafters], idents, shared,
                    args.total_tokens, args.lam_sweep or [args.lam], args.equal_budget)
        if args.tree == "auto":   # each run calibrates its drafters' confidence on its own calls
            for r in runs:
                r.auto = AutoTree.for_target(target)
                r.config.update(tree_budget=None)
        for r in runs:
            check_writable(json_path(json_base, r, len(runs) > 1), "--json", args.force)
        t0 = time.perf_counter()
        try:
            failed = evaluate(target, tokenizer, runs, bench_items, dec, json_base)
        except KeyboardInterrupt:
            print("\ninterrupted: tables of the benchmarks completed so far", file=sys.stderr)
            print(tables([as_dict(r) for r in runs if r.results]))
            sys.exit(130)
        saved = [as_dict(r) for r in runs]
        print(tables(saved))
        if args.figures:
            print(f"[figures: {', '.join(map(str, figures(saved, args.figures)))}]")
    written = [json_path(json_base, r, len(runs) > 1) for r in runs if r.slug not in failed]
    print(f"\n[{len(runs)} runs x {sum(len(v) for v in bench_items.values())} prompts in "
          f"{time.perf_counter() - t0:.0f} s; JSON: {written[0] if written else 'none written (errors above)'}"
          f"{' and the other runs beside it' if len(written) > 1 else ''}"
          f"{f'; {len(failed)} run(s) not written' if written and failed else ''}]")
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
