"""The study's tables and figures from eval.py's results: `python eval.py --report runs/*.json`,
and what eval.py and extras/speed.py measure alike: the method and benchmark names, `Decoding`,
`combine`, `averages`, and `parting` (where greedy speculative output left plain decoding).

Uncertainty: every tau gets a 95% percentile bootstrap interval over prompts (an item's turns stay
together; the average over benchmarks resamples each benchmark on its own), and the study's
comparisons -- in-domain vs out-of-domain specialist, averaged / routed / merged / mixed vs the best
single specialist of each benchmark, merged vs routed, confidence vs entropy routing, RQ2's mixed
drafters -- get paired intervals on the same prompts. Tables 1, 3, 7-8, 9-11 and Figure 6 print as
markdown (`tables`); Figures 6-8 as PNG (`figures`, needs matplotlib). `load_runs` reads and checks
result files (schema 1) and joins the files of one run; `write_json` writes them for eval.py:

    {"schema": 1, "config": {method, compose, lambda, temperature, tree budget, drafters (path,
                             sha256, metadata), target, benchmarks, limit, seed, machine,
                             versions (python, torch, git commit), argv, ...},
     "results": {"<bench>": {"tau", "speedup", "greedy_match", "alpha_by_depth", "entropy",
                             "entropy_hist", "routing", "accepted_from", "mean_tree_size",
                             times, counts, "turns": [...]},
                 ..., "average": {"tau", "speedup"}}}

Sections: what a run measures · uncertainty · tables · result files · figures.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data import BENCHMARKS
from model import TapsError, mean
from extras.runtime import atomic_write, writing
from taps import COMPOSE, Stats


# ----------------------------------------------------------------------------- what a run measures

METHODS = ("single", "average", *(m for m in COMPOSE if m != "single"))
MERGED = ("merged", "merged-dedup")
BENCH_NAMES = {"mt_bench": "MT-Bench", "gsm8k": "GSM8K", "math_500": "MATH-500", "svamp": "SVAMP"}


@dataclass
class Decoding:
    """What every run of an evaluation shares: the budget, sampling and the study tree's shape."""
    max_new_tokens: int = 128
    top_p: float = 1.0
    top_k: int = 10                    # study tree: children per node and frontier width
    depth: int = 5                     # study tree: drafting steps
    seed: int = 0
    compile: Optional[str] = None      # taps.generate's: None eager, else the static path's backend


def combine(stats: list[Stats]) -> Stats:
    """One Stats for many generations: lists concatenated, counts and times summed."""
    out = Stats()
    for s in stats:
        for f in dataclasses.fields(Stats):
            setattr(out, f.name, getattr(out, f.name) + getattr(s, f.name))
    return out


def averages(results: dict) -> dict:
    """A run's "average" entry: tau and speedup averaged over its benchmarks."""
    benches = [b for b in results if b != "average"]
    over = lambda key: mean([results[b][key] for b in benches if results[b][key] is not None], None)
    return {"tau": over("tau"), "speedup": over("speedup")}


# Greedy speculative and plain decoding part only where the target's two best logits are a near-tie
# that two passes round differently: a tree call scores N rows and a one-token call one, their
# matmuls sum in other orders, so a logit can differ by a few units in the last place (ulp) of the
# dtype at its magnitude. Measured in bf16 (results/speed.md): 21 partings, all at most 0.375 apart
# at logits of 16-64 (ulp 0.125-0.25), i.e. within 3 ulps. A parting within TIE_ULPS ulps is such
# rounding; a wrong verifier keeps tokens whole logits behind, far outside it (in fp32 4 ulps at a
# logit of 30 are 8e-6).
TIE_ULPS = 4


def tie_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    """TIE_ULPS units in the last place of `dtype` at the magnitude of the largest of `logits`."""
    finfo = torch.finfo(dtype)
    m = max(float(logits.abs().max()), finfo.tiny)
    return TIE_ULPS * finfo.eps * 2.0 ** math.floor(math.log2(m))


@torch.inference_mode()
def parting(target, ids, out, ref) -> dict:
    """Where greedy speculative output `out` left plain greedy output `ref`: the first differing
    new token, both tokens there, the target's logit gap between them (plain's minus speculative's,
    one pass over the prefix both share) and whether that gap is a near-tie rounding explains
    (`tie_tolerance`); otherwise the verifier kept a token the target does not pick: an error."""
    i = next(j for j, (x, y) in enumerate(zip(out + [None], ref + [None])) if x != y)
    record = {"first_diff": i, "plain_token": None, "spec_token": None, "logit_gap": None,
              "tie_tolerance": None, "near_tie": False}
    if i >= min(len(out), len(ref)):   # one output is a prefix of the other: no tie explains it
        return record
    prefix = torch.tensor([ids + ref[:i]], device=target.embed_tokens.weight.device)
    logits, _ = target(prefix, last_only=True)
    pair = logits[0, -1, [ref[i], out[i]]]                      # (2,) plain's, speculative's
    gap = (pair[0] - pair[1]).item()
    tol = tie_tolerance(pair, target.embed_tokens.weight.dtype)
    return {**record, "plain_token": ref[i], "spec_token": out[i], "logit_gap": gap,
            "tie_tolerance": tol, "near_tie": abs(gap) <= tol}


# ----------------------------------------------------------------------------- uncertainty

BOOTSTRAP = 2000   # resamples of the prompts per interval


def kind(run: dict) -> str:
    """What a run is: "average" (a weight average at some lambda) or its composition, e.g.
    "single"."""
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


def bootstrap(a: list[dict], b: Optional[list[dict]] = None, n: int = BOOTSTRAP, seed: int = 0,
              level: float = 0.95):
    """Percentile bootstrap interval over prompts of the mean over benchmarks (strata) of
    tau = sum(new tokens) / sum(calls), each benchmark resampled on its own; with b, of
    tau_a - tau_b on the prompts both runs measured, one resample serving both (paired). a, b: one
    `item_counts` dict per benchmark. Returns (low, high), or None where a benchmark has fewer than
    2 prompts (one prompt resampled is always itself: no interval)."""
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
        out.append(("in-domain − out-of-domain specialist",
                    {b: singles[home[b][0]] for b in benches},
                    {b: singles[home[b][1]] for b in benches}))
        best = {b: max((singles["math"], singles["chat"]), key=lambda r: get(r, b, "tau") or 0)
                for b in benches}
        candidates = [("averaged (λ = 0.5)", avg), ("routed", by.get("route")),
                      ("merged", by.get("merged"))]
        candidates += [(f"{d}", singles[d]) for d in singles if d not in ("math", "chat")]
        out += [(f"{name} − best single", {b: r for b in benches}, best)
                for name, r in candidates if r]
    pairs = (("merged − routed", "merged", "route"),
             ("confidence − entropy routing", "route", "route-entropy"))
    out += [(name, {b: by[x] for b in benches}, {b: by[y] for b in benches})
            for name, x, y in pairs if x in by and y in by]
    # RQ2: more mixed data, and composing two specialists vs one drafter trained on both corpora
    large = singles.get("mixed-large")
    if large and "mixed-small" in singles:
        out.append(("mixed-large − mixed-small", {b: large for b in benches},
                    {b: singles["mixed-small"] for b in benches}))
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
    """Rows in METHODS order: singles by drafter (the composed drafters in their order, then
    drafters run alone, such as the mixed-data ones, by training conversations: small before large,
    as the study's Table 1), averages by lambda, each merged kind before its equal budget."""
    c, k = run["config"], kind(run)
    d = c["drafters"][0]
    data = d.get("data") if isinstance(d.get("data"), dict) else {}   # external: a description
    first = ((paths.index(d["path"]), 0) if d["path"] in paths
             else (len(paths), data.get("conversations", 0)))
    order = METHODS.index(k) if k in METHODS else len(METHODS)
    return order, first, c["lambda"] or 0, c["equal_budget"]


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
    """(T, its runs in row order, the benchmarks they measured, the composed drafters' paths) per
    temperature."""
    for t in sorted({r["config"]["temperature"] for r in runs}):
        rs = [r for r in runs if r["config"]["temperature"] == t]
        drafter_paths = [d["path"] for d in max((r["config"]["drafters"] for r in rs), key=len)]
        rs.sort(key=lambda r: row_order(r, drafter_paths))
        yield t, rs, [b for b in BENCHMARKS if any(b in r["results"] for r in rs)], drafter_paths


def method(r: dict) -> str:
    return r["config"]["method"]


# where a parting note points: the fp32 figures that show the verifier exact
EXACT = ("in fp32 greedy output equals plain decoding on every turn (make demo's Table 1; "
         "tests/test_taps_default.py), which is what shows the verifier exact")


def parting_notes(name: str, turns: list[dict], exact: str = EXACT) -> list[str]:
    """What a "greedy = plain" count below all cannot say by itself (`parting` records each
    parting): one note when the partings are near-ties (rounding; `exact` points at the figures
    that prove exactness), and an ERROR line for each parting that is not a near-tie."""
    parted = [x for x in turns if x.get("match") is False]
    ties = [x for x in parted if x.get("near_tie")]
    lines = []
    if ties:
        gap = max(abs(x["logit_gap"]) for x in ties)
        lines.append(f"note: {name}: greedy = plain on {len(turns) - len(parted)}/{len(turns)} "
                     f"turns; {len(ties)} parted at a near-tie (the target's logits of the two "
                     f"tokens at most {gap:.3g} apart, within {TIE_ULPS} units in the last place "
                     f"of the dtype): a rounding parting, not the verifier; {exact}")
    lines += [f"ERROR: {name}: turn {x['turn']} of prompt {x['question_id']} parted from plain "
              f"decoding at new token {x['first_diff']}, where the target prefers plain's token "
              f"by {fmt(x.get('logit_gap'), '.3g')} logits, beyond rounding "
              f"({fmt(x.get('tie_tolerance'), '.3g')}): a verification bug"
              for x in parted if not x.get("near_tie")]
    return lines


def table1(t: float, rs: list[dict], benches: list[str]) -> str:
    """Table 1 at temperature t: tau with its interval and speedup per benchmark, tree size and, at
    T = 0, greedy = plain, with the notes on any greedy parting under it."""
    rows, notes = [], []
    for r in rs:
        turns = [x for b in benches for x in get(r, b, "turns") or []]
        matched = [x for x in turns if x["match"] is not None]
        notes += parting_notes(method(r), matched)
        sizes = [x for b in benches if (x := get(r, b, "mean_tree_size")) is not None]
        counts = [item_counts(r, b) for b in benches]
        rows.append([method(r)]
                    + [f"{fmt(get(r, b, 'tau'))} {interval(bootstrap([c]))} "
                       f"({fmt(get(r, b, 'speedup'))}×)"
                       for b, c in zip(benches, counts)]
                    + [f"{fmt(get(r, 'average', 'tau'))} {interval(bootstrap(counts))} "
                       f"({fmt(get(r, 'average', 'speedup'))}×)",
                       fmt(mean(sizes, None), ".0f")]
                    + ([f"{sum(x['match'] for x in matched)}/{len(matched)}"] if t == 0 else []))
    return (f"### Table 1 (T = {t:g}): acceptance length τ [95% bootstrap interval over prompts] "
            f"(speedup over plain decoding)\n\n"
            + table(["method"] + [BENCH_NAMES[b] for b in benches] + ["average", "nodes/call"]
                    + (["greedy = plain"] if t == 0 else []), rows)
            + "".join(f"\n\n{n}" for n in notes))


def tables(runs: list[dict], note: str = "") -> str:
    """The study's tables from run dicts {"config", "results"} (one per method and temperature);
    `note` goes under the first Table 1 (the demo's line on the study's tree)."""
    out = []
    for t, rs, benches, drafter_paths in by_temperature(runs):
        names = [BENCH_NAMES[b] for b in benches]
        drafter_names = [Path(p).stem for p in drafter_paths]
        out.append(table1(t, rs, benches) + (f"\n\n{note}" if note and not out else ""))

        rows = []
        for name, a, b in comparisons(rs, benches):
            ca = [item_counts(a[x], x) for x in benches]
            cb = [item_counts(b[x], x) for x in benches]
            taus = [(get(a[x], x, "tau"), get(b[x], x, "tau")) for x in benches]
            delta = [ta - tb if ta is not None and tb is not None else None for ta, tb in taus]
            rows.append([name] + [f"{fmt(d, '+.2f')} {interval(bootstrap([p], [q]))}"
                                  for d, p, q in zip(delta, ca, cb)]
                        + [f"{fmt(mean([d for d in delta if d is not None], None), '+.2f')} "
                           f"{interval(bootstrap(ca, cb))}"])
        if rows:
            out.append(f"### The study's comparisons (T = {t:g}): Δτ [paired 95% bootstrap "
                       f"interval over the same prompts]; an interval that excludes 0 decides\n\n"
                       + table(["comparison"] + names + ["average"], rows))

        routed = [r for r in rs if r["config"]["compose"] in ("route", "route-entropy")]
        if routed:
            rows = [[method(r), name] + [f"{pct(get(r, b, 'routing', 'per_prompt_majority', i))} / "
                                         f"{pct(get(r, b, 'routing', 'per_call', i))}"
                                         for b in benches]
                    for r in routed for i, name in enumerate(drafter_names)]
            rows += [[method(r), "no tree (plain step)"]
                     + [f"– / {pct(get(r, b, 'routing', 'plain_calls'))}" for b in benches]
                     for r in routed if any(get(r, b, "routing", "plain_calls") for b in benches)]
            out.append(f"### Table 3 (T = {t:g}): routing decisions, share of prompts (majority of "
                       f"the calls that verified one drafter's tree) / share of verifier calls\n\n"
                       + table(["method", "drafter"] + names, rows))

        merged = [r for r in rs if r["config"]["compose"] in MERGED]
        if merged:
            rows = [[method(r)] + [" / ".join(pct(x) for x in get(r, b, "accepted_from") or [])
                                   for b in benches]
                    for r in merged]
            out.append(f"### Merged trees (T = {t:g}): the accepted path runs on a branch of "
                       f"{' / '.join(drafter_names)} / both (merged-dedup) / nothing accepted\n\n"
                       + table(["method"] + names, rows))

        for who, n in (("draft", 7), ("target", 8)):
            rows = [[method(r)] + [f"{fmt(get(r, b, 'entropy', who, 'accepted'))} / "
                                   f"{fmt(get(r, b, 'entropy', who, 'rejected'))}"
                                   for b in benches]
                    for r in rs]
            out.append(f"### Table {n} (T = {t:g}): {who} entropy (nats, at T = 1) of accepted / "
                       f"rejected draft tokens\n\n" + table(["method"] + names, rows))

        alphas = {(method(r), b): get(r, b, "alpha_by_depth") or [] for r in rs for b in benches}
        depth = max(map(len, alphas.values()), default=0)
        rows = [[m, BENCH_NAMES[b]] + [fmt(x) for x in a] + ["–"] * (depth - len(a))
                for (m, b), a in alphas.items()]
        out.append(f"### Tables 9-11 (T = {t:g}): acceptance rate by depth (of the calls that "
                   f"reached depth d - 1, the share that accepted a token at depth d)\n\n"
                   + table(["method", "benchmark"] + [f"d={d + 1}" for d in range(depth)], rows))

        sweep = lambda_sweep(rs, drafter_paths)
        if len(sweep) > 1:
            rows = [[fmt(lam, "g")] + [fmt(get(r, b, "tau")) for b in benches]
                    + [fmt(get(r, "average", "tau"))] for lam, r in sweep]
            out.append(f"### Figure 6 (T = {t:g}): τ vs λ (λ weights {drafter_names[0]}, "
                       f"1 - λ {drafter_names[-1]})\n\n"
                       + table(["λ"] + names + ["average"], rows))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- result files

SCHEMA = 1   # the layout of a results file (the module docstring); --report reads this one only


def finite(x):
    """NaN (e.g. a mean over no rejected tokens) -> None, so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def as_dict(run) -> dict:
    """An `eval.Run` as a results file holds it."""
    return finite({"schema": SCHEMA, "config": run.config, "results": run.results})


def json_path(base: Path, run, several: bool) -> Path:
    """Where a run's file goes: `base` itself, or beside it when one evaluation has several runs."""
    return base.with_name(f"{base.stem}-{run.slug}{base.suffix}") if several else base


def write_json(path: Path, run):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(as_dict(run), indent=1, ensure_ascii=False) + "\n"
    atomic_write(path, lambda p: p.write_text(text))


NUM, INT, STR = (int, float, type(None)), (int,), (str,)
# What the tables read of a results file, by type (a key may be missing: a partial or older run).
CONFIG_SHAPE = {"method": STR, "compose": STR, "temperature": (int, float), "lambda": NUM,
                "equal_budget": (bool,), "drafters": [{"path": STR}]}
BENCH_SHAPE = {"tau": NUM, "speedup": NUM, "mean_tree_size": NUM, "alpha_by_depth": [NUM],
               "accepted_from": [NUM],
               "routing": {"per_call": [NUM], "per_prompt_majority": [NUM], "merged_calls": NUM,
                           "plain_calls": NUM},
               "entropy": {w: {"accepted": NUM, "rejected": NUM} for w in ("draft", "target")},
               "turns": [{"question_id": (int, str), "new_tokens": INT, "calls": INT,
                          "match": (bool, type(None)), "logit_gap": NUM,
                          "near_tie": (bool,)}]}


def misfit(x, shape, where: str) -> Optional[str]:
    """Where x does not have `shape` (a tuple of types, [shape of each item], {key: shape}),
    else None."""
    if isinstance(shape, tuple):
        ok = isinstance(x, shape) and not (isinstance(x, bool) and bool not in shape)
        return None if ok else f"{where} is {type(x).__name__}"
    if isinstance(shape, list):
        if not isinstance(x, list):
            return f"{where} is {type(x).__name__}, not a list"
        return next((m for i, v in enumerate(x)
                     if (m := misfit(v, shape[0], f"{where}[{i}]"))), None)
    if not isinstance(x, dict):
        return f"{where} is {type(x).__name__}, not an object"
    return next((m for k, s in shape.items()
                 if k in x and (m := misfit(x[k], s, f"{where}.{k}"))), None)


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
                schema = obj.get("schema") if isinstance(obj, dict) else None
                raise ValueError(f"schema {schema!r}, this eval.py reads schema {SCHEMA}")
            c, results = obj["config"], obj["results"]
            problem = (misfit(c, CONFIG_SHAPE, "config") or misfit(results, {}, "results")
                       or next((m for b in BENCHMARKS if b in results
                                and (m := misfit(results[b], BENCH_SHAPE, b))), None))
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


# ------------------------------------------------------------------- figures (optional: matplotlib)

def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise TapsError("--figures needs matplotlib, an optional extra: "
                        "pip install matplotlib") from None
    matplotlib.use("Agg")                     # files only, no display
    import matplotlib.pyplot as plt
    return plt


def figures(runs: list[dict], out: Path) -> list[Path]:
    """The study's Figures 6-8 as PNG files in `out`, per temperature: tau vs lambda, the draft
    entropy of accepted vs rejected tokens (each single drafter, each benchmark), acceptance by
    depth. All are drawn in a staging folder first and moved in together, so an interrupted run
    never leaves a new figure beside a stale one."""
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
                    ax.plot([lam for lam, _ in sweep], [get(r, b, "tau") for _, r in sweep],
                            marker="o", label=BENCH_NAMES.get(b, b),
                            linestyle="--" if b == "average" else "-")
                ax.set(xlabel=f"λ (weight of {Path(drafter_paths[0]).stem})", ylabel="τ",
                       title=f"Figure 6: τ vs λ, T = {t:g}")
                ax.legend(fontsize=8)
                save(fig, f"figure6-T{t:g}.png")
            singles = [r for r in rs
                       if kind(r) == "single" and any(get(r, b, "entropy_hist") for b in benches)]
            if singles:
                fig, axes = plt.subplots(len(singles), len(benches),
                                         figsize=(3 * len(benches), 2.2 * len(singles)),
                                         squeeze=False, sharex=True)
                for row, r in zip(axes, singles):
                    for ax, b in zip(row, benches):
                        h = get(r, b, "entropy_hist")
                        for judged in ("accepted", "rejected"):
                            counts = np.array(h["draft"][judged]) if h else np.zeros(0)
                            if counts.sum():
                                ax.stairs(counts / counts.sum(), h["edges"], label=judged,
                                          fill=judged == "accepted", alpha=0.6)
                        ax.set_title(f"{method(r)} · {BENCH_NAMES[b]}", fontsize=8)
                        ax.tick_params(labelsize=7)
                axes[0][0].legend(fontsize=7)
                for ax in axes[-1]:
                    ax.set_xlabel("draft entropy (nats)", fontsize=8)
                fig.suptitle(f"Figure 7: draft entropy of accepted vs rejected tokens "
                             f"(share per bin), T = {t:g}", fontsize=9, y=1.02)
                save(fig, f"figure7-T{t:g}.png")
            fig, axes = plt.subplots(1, len(benches), figsize=(3.2 * len(benches), 3),
                                     squeeze=False, sharey=True)
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
