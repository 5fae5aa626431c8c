"""`make bench` (`eval.py --speed`): plain decoding, the study's tree and the auto tree on the same
prompts, back to back in one process, per dtype, then HF transformers (the peer) on the same
weights, prompts and budgets. Every ratio is against plain decoding in the same dtype and process;
plain decoding is timed before and after the speculative runs, and a busy machine is flagged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from data import load_bench
from extras.report import BENCH_NAMES, Decoding, combine, parting
from extras.report import finite
from extras.report import fmt, parting_notes, pct, table
from extras.autotree import AutoTree, auto_dtype
from extras.checkpoint import load_drafter, load_target
from model import clock, generate_plain
from extras.runtime import resolve_dtype
from extras.runtime import atomic_write, describe, machine, writing
from taps import Sampling, TreeShape, generate


# each specialist on its own domain: (benchmark, drafter index)
SPEED_PAIRS = (("gsm8k", 0), ("mt_bench", 1))
PEER = (("HF transformers, greedy", {}),
        ("HF transformers, prompt lookup", {"prompt_lookup_num_tokens": 10}))


def timed(target, fn, prompts, n) -> tuple[float, list]:
    """Seconds for fn(ids, n) over all prompts (after an 8-token warm-up on the first), and the
    outputs."""
    dev = target.embed_tokens.weight.device
    fn(prompts[0], 8)
    t0, outs = clock(dev), [fn(ids, n) for ids in prompts]
    return clock(dev) - t0, outs


# plain decoding this much faster or slower after the speculative runs than before: a busy machine
BUSY = 1.25


def speed_rows(target, tokenizer, drafter, prompts, n, study: TreeShape) -> list[dict]:
    """Plain decoding, the study's tree and the auto tree on the same prompts, back to back, T = 0,
    then plain decoding again: ratios are against the mean of the two plain timings, and the two
    disagreeing by more than BUSY means something else ran on the machine meanwhile (`busy`)."""
    stop = tokenizer.stop_ids
    plain_fn = lambda ids, n: generate_plain(target, ids, n, stop_ids=stop)
    before_s, plain = timed(target, plain_fn, prompts, n)
    runs = []
    for name, tree in (("study tree (60/5/10)", study), ("auto tree", AutoTree.for_target(target))):
        spec = lambda ids, n: generate(target, drafter, ids,
                                       Sampling(max_new_tokens=n, stop_ids=stop), tree)
        spec_s, outs = timed(target, spec, prompts, n)
        runs.append((name, spec_s, outs))
    after_s, _ = timed(target, plain_fn, prompts, n)
    plain_tok_s = sum(map(len, plain)) / ((before_s + after_s) / 2)
    rows = [{"config": "plain decoding", "tok_s": plain_tok_s, "vs_plain": 1.0,
             "plain_tok_s_before_after": [sum(map(len, plain)) / t for t in (before_s, after_s)],
             "busy": max(before_s, after_s) / min(before_s, after_s) > BUSY}]
    for name, spec_s, outs in runs:
        s = combine([st for _, st in outs])
        tok_s = sum(len(out) for out, _ in outs) / spec_s
        turns = [{"question_id": i, "turn": 1, "match": out == ref,
                  **({} if out == ref else parting(target, ids, out, ref))}
                 for i, ((out, _), ref, ids) in enumerate(zip(outs, plain, prompts))]
        matches = sum(x["match"] for x in turns)
        rows.append({"config": name, "tok_s": tok_s, "vs_plain": tok_s / plain_tok_s,
                     "tau": s.tau, "draft_ms": 1000 * s.draft_time / s.calls,
                     "verify_ms": 1000 * s.verify_time / s.calls,
                     "nodes": sum(s.tree_size) / s.calls,
                     "drafted_calls": sum(x > 1 for x in s.tree_size) / s.calls,
                     "greedy_match": f"{matches}/{len(plain)}", "turns": turns})
    return rows


COLUMNS = ["dtype", "benchmark", "drafter", "configuration", "tok/s", "vs plain", "τ",
           "draft ms/call", "verify ms/call", "nodes/call", "drafted calls", "greedy = plain"]


def speed_table(rows: list[dict], earlier: list[dict] = ()) -> str:
    """The rows of one dtype and benchmark as a markdown table, and under it a line for each row
    whose greedy output parted from plain decoding (`parting_notes`), pointing at the row of the
    same configuration in float32 among `earlier` rows (the proof of exactness)."""
    out = table(COLUMNS, [[r["dtype"], r["benchmark"], r["drafter"], r["config"],
                           fmt(r["tok_s"], ".1f"), f"{fmt(r['vs_plain'])}×", fmt(r.get("tau")),
                           fmt(r.get("draft_ms"), ".1f"), fmt(r.get("verify_ms"), ".1f"),
                           fmt(r.get("nodes"), ".1f"), pct(r.get("drafted_calls")),
                           r.get("greedy_match", "–")] for r in rows])
    for r in (r for r in rows if "turns" in r):
        fp32 = next((e for e in earlier if e["dtype"] == "float32" and e["config"] == r["config"]
                     and e["benchmark"] == r["benchmark"]), None)
        exact = {} if fp32 is None else {"exact": f"the float32 row of this configuration above "
                                                  f"shows greedy = plain {fp32['greedy_match']}"}
        for line in parting_notes(f"{r['dtype']} {r['benchmark']} {r['config']}", r["turns"],
                                  **exact):
            out += f"\n\n{line}"
    return out


def vs_plain(rows: list[dict], config: str, dtype: str) -> str:
    """The speed-ups of one configuration (its name's start) in one dtype over the benchmarks,
    as a range: "0.48-0.84" (empty when not measured)."""
    xs = sorted(r["vs_plain"] for r in rows if r["config"].startswith(config)
                and r["dtype"] == dtype and r["vs_plain"] is not None)
    return "" if not xs else fmt(xs[0]) if len(xs) == 1 or fmt(xs[0]) == fmt(xs[-1]) \
        else f"{fmt(xs[0])}-{fmt(xs[-1])}"


def paying_dtype(rows: list[dict]) -> str:
    """The dtype that pays on this machine, as the speed run measured it: the one whose auto trees
    decode the most tokens per second over the benchmarks (bf16 is timed where a 16-token call
    calibrated faster, which on AVX512-BF16 without AMX can still decode slower)."""
    tok_s = {}
    for r in rows:
        if r["config"] == "auto tree":
            tok_s[r["dtype"]] = tok_s.get(r["dtype"], 0.0) + r["tok_s"]
    return max(tok_s, key=tok_s.get)


def study_tree_line(rows: list[dict]) -> str:
    """One line for beside Table 1, read from a speed run's rows: the study's tree against plain
    decoding in the dtype of the study's tables (the first measured: fp32 on a CPU), and the auto
    tree on the same drafters, in that dtype and in the one that pays."""
    base, paying = rows[0]["dtype"], paying_dtype(rows)
    study = [r["vs_plain"] for r in rows if r["config"].startswith("study tree")
             and r["dtype"] == base]
    auto = [r["vs_plain"] for r in rows if r["config"] == "auto tree"]
    also = f" and {vs_plain(rows, 'auto tree', paying)}× in {paying}" if paying != base else ""
    return (f"Table 1's speed-ups are the study's 60-node tree, sized for a GPU: on this CPU in "
            f"{base} it {'loses to' if max(study) < 1 else 'runs at'} plain decoding "
            f"({vs_plain(rows, 'study tree', base)}× in the speed table), "
            f"{'while' if max(auto) > 1 else 'and'} the auto tree, sized for this machine, "
            f"{'reaches' if max(auto) > 1 else 'runs at'} {vs_plain(rows, 'auto tree', base)}× "
            f"in {base}{also}. τ, not the speed-up, is the study's hardware-independent measure.")


def verdict_line(rows: list[dict]) -> str:
    """The speed line that matters on this machine: plain decoding vs the auto tree, per
    benchmark, in the dtype that pays (`paying_dtype`)."""
    paying = paying_dtype(rows)
    mine = [r for r in rows if r["dtype"] == paying]
    plain = {r["benchmark"]: r["tok_s"] for r in mine if r["config"] == "plain decoding"}
    parts = [f"{r['benchmark']} ({r['drafter']}) {r['tok_s']:.1f} vs {plain[r['benchmark']]:.1f} "
             f"tok/s ({fmt(r['vs_plain'])}×)" for r in mine if r["config"] == "auto tree"]
    return f"Speed on this machine, {paying}, auto tree vs plain decoding: {'; '.join(parts)}"


def peer_rows(path, dtype, device, tokenizer, prompts, n, plain_tok_s) -> list[dict]:
    """HF transformers on the same weights, prompts and budgets: plain greedy and prompt lookup."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("[peer skipped: transformers is not installed; `make bench` installs it]",
              file=sys.stderr)
        return []
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    rows = []
    for name, kw in PEER:
        def run(ids, n):
            x = torch.tensor([ids], device=device)
            with torch.inference_mode():
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                   do_sample=False, eos_token_id=sorted(tokenizer.stop_ids),
                                   pad_token_id=sorted(tokenizer.stop_ids)[0], **kw)
            return y[0, len(ids):].tolist()
        # model.model: its embed_tokens tells the device
        seconds, outs = timed(model.model, run, prompts, n)
        tok_s = sum(map(len, outs)) / seconds
        rows.append({"config": name, "tok_s": tok_s, "vs_plain": tok_s / plain_tok_s})
    return rows


def speed(drafter_paths: list, path: Path, dec: Decoding, total_tokens: int = 60, target_path=None,
          device="cpu", limit: int = 3, data_dir=None):
    """`make bench`: one table of tok/s per dtype and configuration, each ratio against plain
    decoding in the same dtype and process; then HF transformers (the peer) on the same prompts.
    The JSON at `path` grows by each finished table, so an interrupted benchmark keeps what it
    printed."""
    from extras.gguf import default_target_dir
    m = machine(device)
    print(f"{describe(m)}; T = 0, first {limit} prompts, up to {dec.max_new_tokens} new tokens\n")
    target, tokenizer = load_target(target_path, device, resolve_dtype(None, device))
    dtypes = [target.embed_tokens.weight.dtype]
    if device.startswith("cpu") and auto_dtype(target) == torch.bfloat16:
        dtypes.append(torch.bfloat16)                 # fp32, and bf16 where it pays on this CPU
    study = TreeShape(dec.top_k, dec.depth, total_tokens)
    results = []
    try:
        for dtype, (bench, k) in ((d, pair) for d in dtypes for pair in SPEED_PAIRS):
            target = target.to(dtype)
            drafters = [load_drafter(p, target) for p in drafter_paths]
            items = load_bench(bench, limit, data_dir)
            prompts = [tokenizer.encode_chat([{"role": "user", "content": it["turns"][0]}],
                                             add_generation_prompt=True)[0]
                       for it in items]
            k = min(k, len(drafters) - 1)   # one drafter given: it runs on both benchmarks
            rows = speed_rows(target, tokenizer, drafters[k], prompts, dec.max_new_tokens, study)
            rows += peer_rows(target_path or default_target_dir(), dtype, device, tokenizer,
                              prompts, dec.max_new_tokens, rows[0]["tok_s"])
            for r in rows:
                r.update(dtype=str(dtype).removeprefix("torch."), benchmark=BENCH_NAMES[bench],
                         drafter=Path(drafter_paths[k]).stem)
            print(speed_table(rows, results) + "\n", flush=True)
            if rows[0]["busy"]:
                before, after = rows[0]["plain_tok_s_before_after"]
                print(f"warning: plain decoding ran at {before:.1f} tok/s before and {after:.1f} "
                      f"after the speculative runs: the machine was busy, so these ratios are "
                      f"unreliable; rerun on an idle machine\n", file=sys.stderr)
            results += rows
            with writing(path, "the tables above are all that is kept"):
                atomic_write(path, lambda p: p.write_text(
                    json.dumps({"machine": m, "argv": sys.argv[1:], "rows": finite(results)},
                               indent=1) + "\n"))
    except KeyboardInterrupt:
        kept = (f"the {len(results)} rows above are in {path}" if results
                else "nothing was measured yet")
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    print(f"[JSON: {path}]")
