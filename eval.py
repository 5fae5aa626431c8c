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

The tables, their bootstrap intervals (every tau over prompts; the study's comparisons paired on
the same prompts) and Figures 6-8 (--figures DIR, matplotlib) are extras/report.py's, drawn from
these runs' dicts; the speed table (--speed, make bench) is extras/speed.py's.

Sections, in file order: setup · measurement (and the results files) · CLI.

JSON (--json PATH, default runs/eval-<date>-<time>.json): one file per (method, temperature) run, each

    {"schema": 1, "config": {method, compose, lambda, temperature, tree budget, drafters (path, sha256, metadata),
                target, benchmarks, limit, seed, versions (python, torch, git commit), ...},
     "results": {"<bench>": {"tau", "speedup", "greedy_match", "alpha_by_depth", "entropy",
                             "routing", "accepted_from", "mean_tree_size", times, counts, "turns": [...]},
                 ..., "average": {"tau", "speedup"}}}

so `results[bench]["tau"]` reads directly (--report reads schema 1 only and checks the types of
what its tables read). One run writes PATH itself; several write
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
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data import BENCHMARKS, DataError, load_bench
from model import TapsError, clock, context_budget, generate_plain, logits_to_probs, mean
from taps import COMPOSE, Drafter, Sampling, Stats, TorchRandom, TreeShape, average, generate

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
    auto: object = None                # --tree auto: an extras.autotree.AutoTree, calibrated over the run's calls

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
    from extras.eagle import EAGLE_WEIGHTS
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
        sampling = Sampling(run.temperature, dec.top_p, dec.max_new_tokens, tokenizer.stop_ids)
        out, stats = generate(target, run.drafters, ids, sampling, run.auto or TreeShape(dec.top_k, dec.depth, run.budget),
                              run.compose, TorchRandom(seed + turn))
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
    from extras.runtime import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(as_dict(run), indent=1, ensure_ascii=False) + "\n"))


def evaluate(target, tokenizer, runs: list[Run], bench_items: dict, dec: Decoding, json_base: Path) -> set:
    """Every benchmark, every item, every run side by side; results land in run.results and the JSON
    files. Returns the runs (slugs) whose JSON could not be written."""
    from tqdm import tqdm
    plain = PlainClock(target, dec.seed)
    warm = tokenizer.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[0]
    generate_plain(target, warm, 4)                                    # first-call overheads out of the timings
    generate(target, runs[0].drafters, warm, Sampling(max_new_tokens=4), TreeShape(dec.top_k, dec.depth, runs[0].budget),
             runs[0].compose)
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


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    from extras.runtime import DTYPES, default_device
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
    ap.add_argument("--tree", choices=("study", "auto"), default="study",
                    help="study (default): the fixed --total-tokens/--depth/--top-k tree, as in the study's tables; "
                         "auto: sized for this machine each call (extras/autotree.py)")
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


def main(argv=None):
    from extras.runtime import check_flags, check_writable, machine, one_line_errors
    args = parse_args(argv)
    dec = Decoding(args.max_new_tokens, args.top_p, args.top_k, args.depth, args.seed)
    from extras.report import figures, load_runs, pyplot, tables   # the study's tables, from the runs' dicts
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
            from extras.speed import speed
            return speed(args.drafters, json_base, dec, args.total_tokens, args.target, args.device, args.limit or 3,
                         args.data_dir)
        from extras.autotree import AutoTree, load_for   # --dtype auto, --tree auto: beyond the study
        target, tokenizer = load_for(args.target, args.device, args.dtype)
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


if __name__ == "__main__":   # extras/ imports `eval`: run the CLI from that module, one copy of its classes
    __import__("eval").main()
