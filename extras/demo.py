"""`make demo`: the study on the embedded default, small, in five steps that say what they do and
about how long each will take on this machine, then what was shown and where.

    python -m extras.demo [--limit 3] [--limit-1 1] [--dry-run]

The steps: the math and the chat EAGLE drafter at the demo size (each skipped when its checkpoint
exists), both specialists and the three compositions at the study's tree in fp32 (greedy output
checked bit for bit) on --limit items per benchmark at T = 0 and --limit-1 at T = 1, then the
speed table (plain decoding vs the study's tree vs the auto tree, in bf16 too where it pays). A
rerun replaces the demo's own result files in runs/.

Estimates: each step's time on the reference machine (REFERENCE; results/REPORT.md), scaled by
how fast this machine scores tokens or takes a training step in the dtype the step runs in here,
which taps measures once per machine anyway: the calibration behind --tree auto and --dtype auto,
and train.py --amp auto's step timing ($TAPS_CACHE/calibration.json), so the steps then reuse
what this measured.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model import TapsError

DRAFTERS = ("checkpoints/eagle-math.safetensors", "checkpoints/eagle-chat.safetensors")
JSON, SPEED_JSON = Path("runs/demo.json"), Path("runs/demo-speed.json")
TABLES = Path("runs/demo.md")
EVAL = ["eval.py", "--compose", "single,average,route,merged", "--max-new-tokens", "48",
        "--drafters", *DRAFTERS, "--json", str(JSON), "--force"]

# `make demo` measured part by part on the reference machine (results/REPORT.md, "`make demo`,
# measured"): a 2-core Xeon (AVX-512 BF16, no AMX) with ATen and oneDNN limited to AVX2, where
# every part ran in fp32, from a fresh clone. Seconds per part, and the cost that sets it: the
# target scoring tokens ("verify": features, evaluation, speed) or the drafter's training step.
REFERENCE = {"features": (470, "verify"), "train math": (124, "train"),
             "train chat": (74, "train"), "eval T=0": (371, "verify"),
             "eval T=1": (146, "verify"), "speed": (77, "verify")}
REFERENCE_LIMITS = {"eval T=0": 3, "eval T=1": 1}   # items per benchmark those evaluations ran
# The two costs on the reference machine in fp32: scoring N = 64 tokens (--tree auto's
# calibration) and one training step (train.py --amp auto's). On another machine a part takes its
# reference time times the ratio of its kind's cost there, in the dtype it runs in there, to this:
# AMX, emulated bf16 and slower cores each scale the parts their own way, and training by the
# drafter's step, not the target's.
N = 64
REFERENCE_COST = {"verify": 0.121, "train": 0.065}


@dataclass
class Machine:
    """What the estimates read: this machine's calibration per dtype ({"fp32": {n: s}, "bf16":
    ...}), its training step per precision ({"fp32": s, "bf16": s}), the dtype train.py's --dtype
    auto takes for the features (calls of a conversation), the one that pays for verifying a tree
    (the speed table's second dtype), and whether train.py --amp auto trains under autocast."""
    verify_s: dict
    train_step_s: dict
    features: str
    dtype: str
    amp: bool

    @classmethod
    def measure(cls) -> "Machine":
        """Measured once per machine (cached); the steps read the same cache entries."""
        from extras.autotree import curves, faster_dtype   # as --dtype auto decides
        from extras.checkpoint import load_target
        from train import SIZES, auto_amp, step_times   # the scripts' own measurements
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}
        target, _ = load_target(None, "cpu", torch.float32)
        verify_s = curves(target)
        features = faster_dtype(verify_s, tokens=SIZES["demo"]["max_len"])   # a conversation
        dtype = faster_dtype(verify_s)                                       # a tree
        target = target.to(features)                 # keyed by the dtype train.py's target has
        amp, _ = auto_amp(target)
        return cls(verify_s, step_times(target), name[features], name[dtype], amp)

    def seconds(self, part: str, dtype: str, items: int = 0) -> float:
        """`part`'s reference time scaled by what its kind of work costs here in `dtype` (and by
        the items evaluated)."""
        ref_s, kind = REFERENCE[part]
        here = self.verify_s[dtype][N] if kind == "verify" else self.train_step_s[dtype]
        return (ref_s * here / REFERENCE_COST[kind]
                * (items / REFERENCE_LIMITS[part] if part in REFERENCE_LIMITS else 1))


@dataclass
class Step:
    title: str
    argv: list                 # run with this Python, from the repository root
    seconds: float             # the estimate
    skip: str = ""             # why it is skipped, if it is


def plan(m: Machine, limit: int, limit_1: int) -> list[Step]:
    train = "bf16" if m.amp else "fp32"
    steps = []
    for out, domain, parts in ((DRAFTERS[0], "math", ("features", "train math")),
                               (DRAFTERS[1], "chat", ("train chat",))):
        steps.append(Step(f"training the {domain} drafter"
                          + (" (the target's features first)" if domain == "math" else ""),
                          ["train.py", "--domain", domain, "--backbone", "eagle", "--size", "demo"],
                          sum(m.seconds(p, m.features if p == "features" else train)
                              for p in parts),
                          f"{out} exists" if Path(out).exists() else ""))
    steps += [
        Step(f"evaluating both specialists and three compositions at T = 0, {limit} items per "
             f"benchmark, fp32 (greedy output checked bit for bit)",
             EVAL + ["--temperature", "0", "--limit", str(limit)],
             m.seconds("eval T=0", "fp32", limit)),
        Step(f"evaluating them at T = 1, {limit_1} item(s) per benchmark",
             EVAL + ["--temperature", "1", "--limit", str(limit_1)],
             m.seconds("eval T=1", "fp32", limit_1)),
        Step(f"the speed table: plain decoding vs the study's tree vs the auto tree, fp32"
             f"{' and bf16' if m.dtype == 'bf16' else ''}",
             ["eval.py", "--speed", "--max-new-tokens", "64", "--drafters", *DRAFTERS,
              "--json", str(SPEED_JSON), "--force"],
             m.seconds("speed", "fp32") + (m.seconds("speed", "bf16") if m.dtype == "bf16" else 0))]
    return steps


def minutes(seconds: float) -> str:
    return f"about {max(1, round(seconds / 60))} min"


def eval_files() -> list[Path]:
    """The demo's eval results: one file per method and temperature beside runs/demo.json."""
    return sorted(JSON.parent.glob(f"{JSON.stem}-*-T*.json"))


def summary(elapsed: float) -> str:
    """The demo's last lines: Table 1 with the line on the study's tree beside it, which table
    answers which research question, where the files are, and the speed line for this machine.
    All tables are also written to runs/demo.md."""
    import json
    from extras.report import by_temperature, load_runs, table1, tables
    from extras.runtime import atomic_write
    from extras.speed import speed_table, study_tree_line, verdict_line
    runs = load_runs(eval_files())
    rows = json.loads(SPEED_JSON.read_text())["rows"]
    t, rs, benches, _ = next(by_temperature(runs))
    first, study = table1(t, rs, benches), study_tree_line(rows)
    groups = [[r for r in rows if (r["dtype"], r["benchmark"]) == key]
              for key in dict.fromkeys((r["dtype"], r["benchmark"]) for r in rows)]
    speed = "\n\n".join(speed_table(g, rows[:rows.index(g[0])]) for g in groups)
    atomic_write(TABLES, lambda p: p.write_text(
        tables(runs, note=study)
        + f"\n\n### Speed\n\n{speed}\n\n{verdict_line(rows)}\n"))
    return "\n".join([
        f"\n== make demo: done in {elapsed / 60:.0f} min; what it showed ==\n", first, "",
        study, "",
        "Which table answers which of the study's questions (printed above, all in "
        f"{TABLES}):",
        "  RQ1 specialization: Table 1, eagle-math vs eagle-chat per benchmark, and the "
        "comparison 'in-domain − out-of-domain specialist'",
        "  RQ3 weight averaging: 'averaged (λ = 0.5) − best single'",
        "  RQ4 composition: 'routed / merged − best single', 'merged − routed', Table 3 (routing), "
        "the merged-tree table",
        "  RQ5 routing signal: Table 3 (where confidence routing sends each benchmark), Tables 7-8 "
        "(entropy of accepted vs rejected tokens)",
        "  RQ2 (mixed data) needs larger drafters: make cpu-study; every RQ measured: "
        "results/REPORT.md",
        f"JSON: {JSON.parent}/{JSON.stem}-<method>-T<temperature>.json (tables again: python "
        f"eval.py --report {JSON.parent}/{JSON.stem}-*-T*.json), {SPEED_JSON}",
        verdict_line(rows)])


def main(argv=None):
    from extras.runtime import AT_LEAST_1, Parser, check_flags, one_line_errors
    ap = Parser(description="make demo: train, evaluate, time, explain.")
    ap.add_argument("--limit", type=int, default=3, help="items per benchmark at T = 0")
    ap.add_argument("--limit-1", type=int, default=1, help="items per benchmark at T = 1")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and estimates only")
    with one_line_errors(interrupted="finished steps are kept; make demo skips trained drafters"):
        args = ap.parse_args(argv)
        check_flags(args, limit_1=AT_LEAST_1)
        print("[measuring this machine once (cached): the estimates below scale the reference "
              "machine's times by it]", flush=True)
        m = Machine.measure()
        print(f"[this machine: target features in {m.features}, training "
              f"{'under bf16 autocast' if m.amp else 'in fp32'}, the study's tables in fp32, the "
              f"speed table in fp32{' and bf16' if m.dtype == 'bf16' else ''}]")
        steps = plan(m, args.limit, args.limit_1)
        left = lambda i: sum(s.seconds for s in steps[i:] if not s.skip)
        print(f"[make demo: {len(steps)} steps, {minutes(left(0))} on this machine]", flush=True)
        t0 = time.perf_counter()
        for i, step in enumerate(steps):
            head = f"[{i + 1}/{len(steps)}] {step.title}"
            if step.skip:
                print(f"{head}: skipped, {step.skip}", flush=True)
                continue
            command = f"\n    {sys.executable} {' '.join(step.argv)}" if args.dry_run else ""
            print(f"\n{head} ({minutes(step.seconds)}; {minutes(left(i))} left in all){command}",
                  flush=True)
            if args.dry_run:
                continue
            t = time.perf_counter()
            if subprocess.run([sys.executable, *step.argv]).returncode:
                raise TapsError(f"step {i + 1} ({step.title}) failed (its error is above); "
                                f"rerun make demo: finished steps are kept")
            print(f"[{i + 1}/{len(steps)} done in {(time.perf_counter() - t) / 60:.1f} min]",
                  flush=True)
        if not args.dry_run:
            print(summary(time.perf_counter() - t0))


if __name__ == "__main__":
    main()
