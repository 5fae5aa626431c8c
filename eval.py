"""Evaluate task-aware speculative decoding on the study's benchmarks and print its tables.

    python eval.py --compose merged --drafters checkpoints/eagle-{math,chat}.safetensors --limit 5
    python eval.py --compose single,average,route,route-entropy,merged --temperature 0,1
    python eval.py --report runs/demo-*.json

Methods (--compose, comma-separated; drafters in --drafters order, math first as in the study,
so lambda weights the first):
  single         each drafter alone, one row per checkpoint
  average        one drafter theta = lam * theta_0 + (1 - lam) * theta_1 (eq. 11); --lam-sweep:
                 Figure 6
  route          each call, the tree with the highest mean draft confidence (eqs. 12-13)
  route-entropy  each call, the tree with the lowest mean draft entropy (the study's comparison)
  merged         every drafter's tree under one root, verified once (Lemma A.2) on the trie of its
                 token paths, as the study's candidate verification does
  merged-dedup   beyond the study: that trie built before the call, so fewer nodes are verified
  --equal-budget beyond the study: merged kinds also at total_tokens // k nodes per tree
Every choice uses draft-side quantities only (taps.COMPOSE): the output is the target's own.

Measurement. For every prompt (MT-Bench: both turns, the second continuing the conversation with
the method's own first answer) and method, speculative decoding runs, then plain decoding of
exactly as many tokens is timed in the same process (reused for an identical prompt and length).
Per benchmark: tau = new tokens / verifier calls over all its turns (`taps.Stats`), speedup =
plain time / speculative time, greedy_match (T = 0) = share of turns equal to plain greedy
decoding: 1 in fp32; in bf16 a turn may part at a near-tie that two passes round differently, and
each parting records where and the target's logit gap (extras/report.py's `parting`), so the
tables tell rounding (a note) from a verification error (an ERROR line). Tables shaped like the
study's (1, 3, 7-11, Figure 6), bootstrap intervals and Figures 6-8 are extras/report.py's, from
the results files, as are the method and benchmark names; --speed is extras/speed.py's.
--compile [BACKEND] decodes every run on taps' static path (`taps.generate(compile=...)`, as
`taps.py --compile`), its steps compiled once per model and warmed up before any timing.

Results: one JSON file per (method, temperature) run, {"schema": 1, "config": {...}, "results":
{bench: {"tau", "speedup", ...}, "average": {...}}} (extras/report.py's docstring has the rest).
One run writes --json PATH; several write PATH's stem + "-<method>-T<temperature>" beside it.
Each file is rewritten atomically after every benchmark: Ctrl-C loses at most the benchmark in
progress; --report joins the files of one run.

Sections: setup · measurement · CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data import BENCHMARKS, DataError, data_dir, load_bench
from extras.report import MERGED, METHODS, Decoding, averages, combine, parting
from model import TapsError, clock, context_budget, generate_plain, mean
from taps import COMPILE, Sampling, Stats, TorchRandom, TreeShape, average, generate

@dataclass
class Run:
    """One row of the tables: a method at one temperature, its drafters and what it measured."""
    name: str
    compose: str                       # a taps.COMPOSE key
    drafters: list                     # Drafter objects handed to taps.generate
    temperature: float
    budget: int                        # total_tokens of each drafted tree
    config: dict                       # what the JSON records about this run
    results: dict = field(default_factory=dict)
    auto: object = None                # --tree auto: an extras.autotree.AutoTree

    @property
    def slug(self) -> str:
        return slug(self.name) + f"-T{self.temperature:g}"

    def tree(self, dec: Decoding):
        return self.auto or TreeShape(dec.top_k, dec.depth, self.budget)


# ----------------------------------------------------------------------------- setup

def items(text: str, kind=str) -> list:
    """A comma-separated flag: no empty item (`--bench ,` would select nothing), none twice."""
    parts = [x.strip() for x in text.split(",")]
    if "" in parts:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item; separate the items by "
                                         f"single commas")
    try:
        values = [kind(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None
    twice = repeated(values)
    if twice is not None:
        raise argparse.ArgumentTypeError(f"{twice} is given twice in {text!r}; give each once")
    return values


def repeated(values: list, keys=None):
    """The first of `values` whose key (the value itself unless `keys` are given) came before."""
    keys = values if keys is None else keys
    return next((v for i, v in enumerate(values) if keys[i] in keys[:i]), None)


def floats(text: str) -> list[float]:
    return items(text, float)


def slug(name: str) -> str:
    """A run's name as a file name part."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def drafter_names(paths: list) -> list[str]:
    """Each drafter's row name: its file's stem, with as many parent folders as tell drafters of
    one file name apart (a/eagle-math, b/eagle-math): one name per results file. One file given
    twice is refused."""
    full = [Path(p).resolve() for p in paths]
    twice = repeated(paths, full)
    if twice is not None:
        raise TapsError(f"--drafters {twice}: given twice; give each drafter once")
    parts = [Path(p).parent.parts + (Path(p).stem,) for p in map(str, full)]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(q[-n:]) for q in parts]
        if len({slug(x) for x in names}) == len(names):
            return names
    return [str(p) for p in paths]   # the same path but for its suffix: the names as given


def plan(methods: list[str], temperatures: list[float], drafters: list, names: list[str],
         idents: list[dict], shared: dict, total_tokens: int = 60, lams=(0.5,),
         equal_budget: bool = False) -> list[Run]:
    """The runs (rows) asked for: methods x temperatures, `single` once per drafter, `average`
    once per lambda in `lams`, merged kinds also at total_tokens // k nodes with equal_budget."""
    k = len(drafters)
    runs = []
    for t in temperatures:
        for method in methods:
            base = dict(shared, compose=method, temperature=t, tree_budget=total_tokens,
                        equal_budget=False, drafters=idents, **{"lambda": None})
            if method == "single":
                for name, d, ident in zip(names, drafters, idents):
                    config = dict(base, method=name, drafters=[ident])
                    runs.append(Run(name, "single", [d], t, total_tokens, config))
            elif method == "average":
                for lam in lams:
                    name = f"average λ={lam:g}"
                    runs.append(Run(name, "single", [average(drafters, lam)], t, total_tokens,
                                    dict(base, method=name, **{"lambda": lam})))
            else:
                config = dict(base, method=method)
                runs.append(Run(method, method, drafters, t, total_tokens, config))
                if method in MERGED and equal_budget:
                    budget = total_tokens // k
                    name = f"{method}, equal budget ({k}x{budget})"
                    runs.append(Run(name, method, drafters, t, budget, dict(
                        base, method=name, tree_budget=budget, equal_budget=True)))
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
            t0 = clock(dev)   # no stop ids: exactly n tokens
            out = generate_plain(self.target, ids, n, temperature, top_p, generator=g)
            self.memo[key] = (clock(dev) - t0, out)
        return self.memo[key]


def run_item(target, tokenizer, run: Run, item: dict, dec: Decoding, seed: int,
             plain: PlainClock, trace=None) -> list[tuple[dict, Stats]]:
    """All turns of one benchmark item: speculative decoding (its calls traced into an
    extras.trace.Trace, if given), then plain decoding as long."""
    dev = target.embed_tokens.weight.device
    messages, turns = [], []
    for turn, question in enumerate(item["turns"]):
        messages.append({"role": "user", "content": question})
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        t0 = clock(dev)
        sampling = Sampling(run.temperature, dec.top_p, dec.max_new_tokens, tokenizer.stop_ids)
        if trace is not None:
            trace.meta.update(run=run.name, temperature=run.temperature,
                              question_id=item["question_id"], turn=turn + 1)
        out, stats = generate(target, run.drafters, ids, sampling, run.tree(dec), run.compose,
                              TorchRandom(seed + turn), trace, dec.compile)
        spec_s = clock(dev) - t0
        plain_s, ref = plain(ids, len(out), run.temperature, dec.top_p)
        record = {"question_id": item["question_id"], "turn": turn + 1,
                  "new_tokens": stats.new_tokens, "calls": stats.calls, "tau": stats.tau,
                  "spec_s": spec_s, "plain_s": plain_s,
                  "match": out == ref if run.temperature == 0 else None}
        if record["match"] is False:
            record.update(parting(target, ids, out, ref))
        turns.append((record, stats))
        reply = tokenizer.decode([t for t in out if t not in tokenizer.stop_ids])
        messages.append({"role": "assistant", "content": reply})
    return turns


ENTROPY_EDGES = np.linspace(0.0, 12.0, 49)   # nats, 0.25 wide: up to ln(128,256) = 11.76


def shares(drafters: list[frozenset], k: int) -> list[float]:
    """Of all entries (`Stats.routed` or `accepted_from`: who drafted), the share naming each
    drafter 0 .. k - 1 alone."""
    return [drafters.count(frozenset({i})) / len(drafters) if drafters else math.nan
            for i in range(k)]


def bench_results(items: list[list[tuple[dict, Stats]]], k: int) -> dict:
    """A benchmark's figures from its items' turns (each item a list of (record, Stats))."""
    records = [r for turns in items for r, _ in turns]
    s = combine([st for turns in items for _, st in turns])
    summary = s.summary()
    # each prompt's routing decisions: calls that verified one drafter's tree (`Stats.routed`)
    votes = [Counter(d for _, st in turns for d in st.routed if len(d) == 1) for turns in items]
    majority = [v.most_common(1)[0][0] for v in votes if v]   # ties: the drafter chosen first
    spec_s, plain_s = sum(r["spec_s"] for r in records), sum(r["plain_s"] for r in records)
    hist = lambda xs: np.histogram(np.clip(xs, 0, ENTROPY_EDGES[-1]), ENTROPY_EDGES)[0].tolist()
    several = lambda ds: sum(len(d) > 1 for d in ds) / max(s.calls, 1)
    none = lambda ds: ds.count(frozenset()) / max(s.calls, 1)
    return {
        "tau": summary["tau"], "speedup": plain_s / spec_s,
        "greedy_match": mean([r["match"] for r in records if r["match"] is not None], None),
        "alpha_by_depth": summary["alpha_by_depth"],
        "entropy": {"draft": summary["draft_entropy"], "target": summary["target_entropy"]},
        # Figure 7: tokens per entropy bin
        "entropy_hist": {"edges": ENTROPY_EDGES.tolist(), **{
            who: {k: hist(getattr(s, f"{who}_entropy_{k}")) for k in ("accepted", "rejected")}
            for who in ("draft", "target")}},
        # the drafter whose tree was verified, per call -- with the merged calls (several
        # drafters' nodes) and the plain ones (the root alone), shares of all calls adding up to
        # 1 -- and by majority, over the prompts with a routing decision
        "routing": {"per_call": shares(s.routed, k), "per_prompt_majority": shares(majority, k),
                    "merged_calls": several(s.routed), "plain_calls": none(s.routed)},
        # whose node the accepted path started with: each drafter's, then several drafters' (a
        # united node of merged-dedup), then none (nothing accepted)
        "accepted_from": shares(s.accepted_from, k) + [several(s.accepted_from),
                                                        none(s.accepted_from)],
        "mean_tree_size": summary["mean_tree_size"],
        "prompts": len(items), "new_tokens": s.new_tokens, "calls": s.calls,
        "spec_s": spec_s, "plain_s": plain_s, "draft_s": s.draft_time, "verify_s": s.verify_time,
        "prefill_s": s.prefill_time, "turns": records,
    }


def evaluate(target, tokenizer, runs: list[Run], bench_items: dict, dec: Decoding,
             json_base: Path, trace=None) -> set:
    """Every benchmark, every item, every run side by side; results land in run.results and the
    JSON files (and every verifier call in `trace`, if given). Returns the runs (slugs) whose JSON
    could not be written."""
    from tqdm import tqdm
    from extras.report import json_path, write_json
    plain = PlainClock(target, dec.seed)
    warm = tokenizer.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[0]
    generate_plain(target, warm, 4)                      # first-call overheads out of the timings
    for r in runs if dec.compile else runs[:1]:          # compiled: each run's drafters' steps
        generate(target, r.drafters, warm, Sampling(max_new_tokens=4),
                 TreeShape(dec.top_k, dec.depth, r.budget), r.compose, compile=dec.compile)
    k, failed = max(len(r.drafters) for r in runs), set()
    for bench, items in bench_items.items():
        if trace is not None:
            trace.meta = {"bench": bench}
        per_run = {id(r): [] for r in runs}
        for i, item in enumerate(tqdm(items, desc=bench, unit="prompt", file=sys.stderr)):
            for r in runs:
                seed = dec.seed * 1_000_003 + 1000 * i
                per_run[id(r)].append(run_item(target, tokenizer, r, item, dec, seed, plain,
                                               trace))
        for r in runs:
            r.results[bench] = bench_results(per_run[id(r)], k)
            r.results["average"] = averages(r.results)
            path = json_path(json_base, r, len(runs) > 1)
            try:
                write_json(path, r)
            except OSError as err:   # the results are still printed; say so once per file
                print(f"error: could not write {path} ({err}); the tables below are all that is "
                      f"kept", file=sys.stderr)
                failed.add(r.slug)
    return failed


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    from extras.runtime import DTYPES, Parser, add_fields, default_device
    ap = Parser(description="Evaluate composed specialist drafters on the study's benchmarks "
                            "(tau, speedup, routing, entropy, alpha).")
    ap.add_argument("--compose", default="merged", type=items,
                    help=f"one or a comma-separated list of: {', '.join(METHODS)} (default merged)")
    ap.add_argument("--drafters", nargs="+", metavar="CKPT",
                    default=["checkpoints/eagle-math.safetensors",
                             "checkpoints/eagle-chat.safetensors"],
                    help="drafter checkpoints, math first (default: checkpoints/eagle-{math,chat})")
    ap.add_argument("--bench", default=",".join(BENCHMARKS), type=items,
                    help=f"comma-separated benchmarks (default {','.join(BENCHMARKS)})")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each benchmark")
    ap.add_argument("--temperature", type=floats, default=[0.0],
                    help="0 = greedy; a comma-separated list runs each")
    add_fields(ap, Sampling, "top_p", "max_new_tokens", max_new_tokens=128)
    ap.add_argument("--lam", type=float, default=0.5, help="averaging weight of the first drafter")
    ap.add_argument("--lam-sweep", type=floats, default=None, metavar="L1,L2,...",
                    help="average at each lambda (Figure 6), e.g. 0,0.25,0.5,0.75,1")
    ap.add_argument("--equal-budget", action="store_true",
                    help="also run merged kinds with total_tokens // k nodes per tree")
    ap.add_argument("--tree", choices=("study", "auto"), default="study",
                    help="study (default): the fixed --total-tokens/--depth/--top-k tree, as in "
                         "the study's tables; auto: sized for this machine each call")
    add_fields(ap, TreeShape, "total_tokens", "depth", "top_k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, metavar="PATH",
                    help="results file (default runs/eval-<date>-<time>.json; see the docstring)")
    ap.add_argument("--force", action="store_true",
                    help="replace existing result files (never read-only ones)")
    ap.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                    help="print the tables of saved runs and exit")
    ap.add_argument("--figures", type=Path, metavar="DIR",
                    help="also write Figures 6-8 as PNG files in DIR (needs matplotlib)")
    ap.add_argument("--target", help="HF checkpoint directory (default: the embedded default)")
    ap.add_argument("--data-dir", help="data directory (default: $TAPS_DATA or ../shared/data)")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--dtype", choices=[*DTYPES, "auto"], default=None,
                    help="default: fp32 on CPU (greedy output checkable bit for bit), bf16 on "
                         "CUDA; auto: bf16 where this machine's calibration says it pays")
    ap.add_argument("--speed", action="store_true", help="the speed benchmark (make bench): plain "
                    "vs study vs auto trees per dtype, and HF transformers")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: "
                    "torch's; 1 is fastest on a CPU shared with other jobs)")
    ap.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE,
                    help="decode on the static path (fixed shapes), compiled with this backend "
                         "(default inductor: CUDA graphs on CUDA); 'static' runs it uncompiled")
    ap.add_argument("--trace", type=Path, metavar="FILE.jsonl",
                    help="every verifier call as a JSON line (extras/trace.py: tree, tests, "
                         "draws); slows the speculative timings")
    args = ap.parse_args(argv)
    unknown = [m for m in args.compose if m not in METHODS]
    if unknown:
        ap.error(f"unknown --compose {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return ap, args


def check_args(ap, args):
    """Everything that can be refused before any model work: each number's range (`check_flags`),
    --trace where nothing is traced, flags that do nothing in the mode asked for, drafters given
    twice or too few for a composition, and the study tree against what it allocates and the
    target's vocabulary and context."""
    from extras.checkpoint import target_args
    from extras.runtime import (check_device, check_flags, check_tree_flags, refuse_idle,
                                refuse_unused)
    check_flags(args)
    if args.trace and (args.report or args.speed):
        raise TapsError("--trace records an evaluation's verifier calls: leave it out with "
                        "--report and --speed")
    idle = lambda flags, where, advice="": refuse_idle(ap, args, flags, where, advice)
    if args.report:
        return refuse_unused(ap, args, {"--report", "--figures"}, "with --report (it prints the "
                             "tables of saved runs)")
    if args.speed:
        refuse_unused(ap, args, {"--speed", "--drafters", "--json", "--force", "--max-new-tokens",
                                 "--top-k", "--depth", "--total-tokens", "--target", "--device",
                                 "--limit", "--data-dir", "--threads"},
                      "with --speed (greedy, on its own benchmarks, trees and dtypes)")
    else:
        if args.tree == "auto":
            idle(["--total-tokens", "--depth", "--top-k", "--equal-budget"], "with --tree auto",
                 "leave out --tree auto for the study tree")
        if "average" not in args.compose:
            idle(["--lam", "--lam-sweep"], "without --compose average")
        elif args.lam_sweep:
            idle(["--lam"], "with --lam-sweep (it gives the weights)")
        if not set(args.compose) & set(MERGED):
            idle(["--equal-budget"], "without --compose merged or merged-dedup")
        if not any(args.temperature):
            idle(["--top-p"], "at --temperature 0 (greedy)")
    check_device(args.device)
    drafter_names(args.drafters)                 # none given twice
    k = len(args.drafters)
    lone = [m for m in args.compose if m != "single" and k < 2 and not args.speed]
    if lone:
        raise TapsError(f"compose {lone[0]!r} takes two or more drafters, got {k}")
    if args.equal_budget and k > 1 and args.total_tokens // k < args.depth:
        raise TapsError(f"--equal-budget splits --total-tokens {args.total_tokens} into {k} trees "
                        f"of {args.total_tokens // k} nodes, fewer than --depth {args.depth}; "
                        f"give --total-tokens {k * args.depth} or more")
    if args.speed or args.tree == "study":
        check_tree_flags(TreeShape(args.top_k, args.depth, args.total_tokens),
                         target_args(args.target))


def load_items(args) -> dict:
    """Each --bench benchmark's items (--limit of them); a benchmark file with none is refused."""
    bench_items = {b: load_bench(b, args.limit, args.data_dir) for b in args.bench}
    empty = [b for b, items in bench_items.items() if not items]
    if empty:
        raise TapsError(f"{data_dir(args.data_dir) / 'bench' / empty[0]}.jsonl holds no "
                        f"items; restore the file, or leave {empty[0]} out of --bench")
    return bench_items


def destinations(args) -> Path:
    """Before any model loads: the results files' base path (--json, default stamped with the
    time), writable as --trace is, and the --drafters files there to read."""
    from extras.runtime import check_files, check_writable
    stamp = ("bench" if args.speed else "eval") + "-%Y%m%d-%H%M%S.json"
    json_base = args.json or Path("runs") / time.strftime(stamp)
    check_writable(json_base, "--json", args.force)
    if args.trace:
        check_writable(args.trace, "--trace")
    check_files(args.drafters, "drafter checkpoint")
    return json_base


def setup(args, dec: Decoding, json_base: Path, argv) -> tuple:
    """The target, its tokenizer and the runs asked for, their drafters loaded and checked against
    the target, each run's results file writable and written by no other run."""
    from extras.autotree import AutoTree, load_for   # --dtype auto, --tree auto
    from extras.checkpoint import drafter_identity, load_drafter
    from extras.report import json_path
    from extras.runtime import check_tree_flags, check_writable, machine, versions
    target, tokenizer = load_for(args.target, args.device, args.dtype)
    dec.max_new_tokens = context_budget(target, 1, dec.max_new_tokens, say=True)
    drafters = [load_drafter(p, target) for p in args.drafters]
    if args.tree == "study":   # each drafter's vocabulary, and the target's if not yet checked
        check_tree_flags(TreeShape(args.top_k, args.depth, args.total_tokens), target.args,
                         drafters)
    idents = [drafter_identity(p, d) for p, d in zip(args.drafters, drafters)]
    shared = {"target": target.args.name, "target_path": args.target, "device": args.device,
              "dtype": str(target.embed_tokens.weight.dtype), "tree": args.tree,
              "machine": machine(args.device), "benchmarks": args.bench, "limit": args.limit,
              **dataclasses.asdict(dec), "total_tokens": args.total_tokens,
              "versions": versions(), "argv": sys.argv[1:] if argv is None else list(argv)}
    runs = plan(args.compose, args.temperature, drafters, drafter_names(args.drafters),
                idents, shared, args.total_tokens, args.lam_sweep or [args.lam],
                args.equal_budget)
    paths = [json_path(json_base, r, len(runs) > 1) for r in runs]
    twice = repeated(paths)            # never one results file written twice in one run
    if twice is not None:
        raise TapsError(f"two runs would write {twice}; name the drafters' files apart")
    if args.tree == "auto":   # each run calibrates its drafters' confidence on its own calls
        for r in runs:
            r.auto = AutoTree.for_target(target)
            r.config.update(tree_budget=None)
    for path in paths:
        check_writable(path, "--json", args.force)
        if args.trace and args.trace.resolve() == path.resolve():
            raise TapsError(f"--trace {args.trace} is a results file of this run; give another")
    return target, tokenizer, runs


def report(args):
    """--report: the tables (and --figures) of saved runs."""
    from extras.report import figures, load_runs, tables
    runs = load_runs(args.report)
    print(tables(runs))
    if args.figures:
        print(f"[figures: {', '.join(map(str, figures(runs, args.figures)))}]")


def summary_line(runs: list[Run], n_prompts: int, seconds: float, json_base: Path,
                 failed: set) -> str:
    """The closing line: what ran, how long, and which results files were written."""
    from extras.report import json_path
    written = [json_path(json_base, r, len(runs) > 1) for r in runs if r.slug not in failed]
    return (f"\n[{len(runs)} runs x {n_prompts} prompts in {seconds:.0f} s; JSON: "
            f"{written[0] if written else 'none written (errors above)'}"
            f"{' and the other runs beside it' if len(written) > 1 else ''}"
            f"{f'; {len(failed)} run(s) not written' if written and failed else ''}]")


def main(argv=None):
    from extras.report import as_dict, figures, pyplot, tables
    from extras.runtime import one_line_errors
    from extras.trace import streamed   # --trace
    ap, args = parse_args(argv)
    dec = Decoding(args.max_new_tokens, args.top_p, args.top_k, args.depth, args.seed, args.compile)
    with one_line_errors(DataError, interrupted="nothing was evaluated yet"):
        check_args(ap, args)
        if args.figures:
            pyplot()                                             # installed? say so before any work
        if args.report:
            return report(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        bench_items = load_items(args)
        json_base = destinations(args)                           # before any model loads
        if args.speed:
            from extras.speed import speed
            return speed(args.drafters, json_base, dec, args.total_tokens, args.target,
                         args.device, args.limit or 3, args.data_dir)
        target, tokenizer, runs = setup(args, dec, json_base, argv)
        t0 = time.perf_counter()
        with streamed(args.trace, lambda t: tokenizer.decode([t])) as trace:
            try:
                failed = evaluate(target, tokenizer, runs, bench_items, dec, json_base, trace)
            except KeyboardInterrupt:
                print("\ninterrupted: tables of the benchmarks completed so far", file=sys.stderr)
                print(tables([as_dict(r) for r in runs if r.results]))
                sys.exit(130)
        saved = [as_dict(r) for r in runs]
        print(tables(saved))
        if args.figures:
            print(f"[figures: {', '.join(map(str, figures(saved, args.figures)))}]")
    print(summary_line(runs, sum(map(len, bench_items.values())), time.perf_counter() - t0,
                       json_base, failed))
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
