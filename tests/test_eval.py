"""eval.py on a tiny random target with a fake tokenizer and fake benchmark files: well-formed JSON,
every composition equal to plain greedy decoding, tables, the report mode, and bad input."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import eval as ev
from extras.runtime import atomic_write
import extras.report as report
import extras.autotree
import extras.speed
import taps
from conftest import DEVICES, tiny
from taps import Drafter

V = 48


class FakeTokenizer:
    """Characters -> ids (mod V, avoiding the stop id 0); a chat is the turns joined with
    separators."""
    stop_ids = {0}

    def encode_chat(self, messages, add_generation_prompt=False):
        ids = []
        for m in messages:
            ids += [1 if m["role"] == "user" else 2] + [3 + ord(c) % (V - 3) for c in m["content"]]
        ids += [2] if add_generation_prompt else []
        return ids, [0] * len(ids)

    def decode(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A data directory with the four benchmarks, two drafter checkpoints for the tiny target."""
    target = tiny(V=V, name="tiny-eval")
    bench = tmp_path / "data" / "bench"
    bench.mkdir(parents=True)
    for name, turns in (("mt_bench", 2), ("gsm8k", 1), ("math_500", 1), ("svamp", 1)):
        with open(bench / f"{name}.jsonl", "w") as f:
            for i in range(3):
                f.write(json.dumps({"question_id": i, "category": "x",
                                    "turns": [f"{name} question {i} turn {j}"
                                              for j in range(turns)]}) + "\n")
    paths = []
    for seed, domain in ((1, "math"), (2, "chat")):
        d = Drafter.random(target, seed)
        d.meta["domain"] = domain
        paths.append(str(tmp_path / f"eagle-{domain}.safetensors"))
        d.save(paths[-1])
    # eval.py (through load_for) and its speed table load it
    for module in (extras.autotree, extras.speed):
        monkeypatch.setattr(module, "load_target", lambda path, device,
                            dtype: (target, FakeTokenizer()))
    return tmp_path, paths


def run(tmp_path, paths, *extra, study=True):
    """eval.py on the tiny setup; a small study tree unless study=False (--tree auto refuses its
    flags)."""
    tree = ["--total-tokens", "8", "--depth", "3", "--top-k", "3"] if study else []
    return ev.main(["--drafters", *paths, "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                    "--max-new-tokens", "12", *tree, *extra])


def test_without_json_the_results_still_land_in_runs(setup, capsys, monkeypatch):
    tmp_path, paths = setup
    monkeypatch.chdir(tmp_path)
    run(tmp_path, paths, "--compose", "route", "--limit", "1", "--bench", "svamp")
    files = list((tmp_path / "runs").glob("eval-*.json"))
    assert len(files) == 1 and files[0].name in capsys.readouterr().out
    assert json.loads(files[0].read_text())["results"]["svamp"]["prompts"] == 1


def test_compile_decodes_every_run_on_the_static_path(setup, capsys):
    """--compile BACKEND reaches taps.generate: the static path's steps are built (and traced by
    torch.compile), the run records its backend, and it makes the eager path's calls and tokens."""
    tmp_path, paths = setup
    results = {}
    for backend in (None, "aot_eager"):
        taps._STATIC.clear()
        run(tmp_path, paths, "--compose", "merged", "--limit", "1", "--bench", "svamp", "--json",
            str(tmp_path / f"{backend}.json"), *(["--compile", backend] if backend else []))
        assert bool(taps._STATIC) == (backend is not None)     # the static steps were built
        results[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
        assert results[backend]["config"]["compile"] == backend
    eager, static = (results[b]["results"]["svamp"] for b in (None, "aot_eager"))
    assert static["greedy_match"] == 1.0 and (static["tau"],
                                              static["calls"]) == (eager["tau"], eager["calls"])
    taps._STATIC.clear()
    with pytest.raises(SystemExit):
        run(tmp_path, paths, "--report", str(tmp_path / "None.json"), "--compile")
    assert "--compile" in capsys.readouterr().err


def test_one_composition_writes_the_documented_json(setup, capsys):
    tmp_path, paths = setup
    run(tmp_path, paths, "--compose", "merged", "--limit", "2", "--json",
        str(tmp_path / "out.json"))
    obj = json.loads((tmp_path / "out.json").read_text())
    assert set(obj) == {"schema", "config", "results"} and obj["schema"] == report.SCHEMA
    c = obj["config"]
    assert (c["method"] == "merged" and c["temperature"] == 0 and c["target"] == "tiny-eval"
            and c["seed"] == 0)
    assert [d["domain"] for d in c["drafters"]] == ["math",
                                                    "chat"] and c["drafters"][0]["path"] == paths[0]
    assert len(c["drafters"][0]["sha256_16"]) == 16 and {"python", "torch",
                                                         "git_commit"} <= set(c["versions"])
    assert set(obj["results"]) == {"mt_bench", "gsm8k", "math_500", "svamp", "average"}
    for bench in ("mt_bench", "gsm8k", "math_500", "svamp"):
        r = obj["results"][bench]
        assert isinstance(r["tau"], float) and r["tau"] >= 1 and r["speedup"] > 0
        assert r["greedy_match"] == 1.0
        assert r["prompts"] == 2 and len(r["turns"]) == (4 if bench == "mt_bench" else 2)
        assert r["new_tokens"] == sum(x["new_tokens"] for x in r["turns"])
        assert r["tau"] == pytest.approx(r["new_tokens"] / r["calls"])
        # every verified tree held both drafters' nodes
        assert r["routing"]["merged_calls"] == 1.0
        assert (len(r["accepted_from"]) == 4 and r["accepted_from"][2] == 0
                and sum(r["accepted_from"]) == pytest.approx(1))
        assert r["mean_tree_size"] <= 1 + 2 * 8
        assert set(r["entropy"]) == {"draft",
                                     "target"} and all(0 <= a <= 1 for a in r["alpha_by_depth"])
    assert obj["results"]["average"]["tau"] == pytest.approx(
        sum(obj["results"][b]["tau"] for b in ("mt_bench", "gsm8k", "math_500", "svamp")) / 4)
    out = capsys.readouterr().out
    assert ("### Table 1 (T = 0)" in out and "| merged |" in out and "4/4" not in out
            and "10/10" in out)


def test_every_composition_at_once_matches_plain_greedy(setup, capsys):
    tmp_path, paths = setup
    run(tmp_path, paths, "--compose", ",".join(report.METHODS), "--lam-sweep", "0,0.5,1",
        "--equal-budget", "--limit", "1", "--bench", "mt_bench,gsm8k", "--temperature", "0,1",
        "--json", str(tmp_path / "r" / "all.json"))
    files = sorted((tmp_path / "r").glob("all-*.json"))
    names = {f.name for f in files}
    assert {"all-eagle-math-T0.json", "all-eagle-chat-T1.json", "all-average-0.5-T0.json",
            "all-route-T0.json", "all-route-entropy-T1.json", "all-merged-T0.json",
            "all-merged-dedup-T1.json", "all-merged-equal-budget-2x4-T0.json"} <= names
    # singles 2 + lambdas 3 + route 2 + merged 2 + equal-budget 2 = 11 runs per temperature
    assert len(files) == 22
    runs = [json.loads(f.read_text()) for f in files]
    for r in runs:
        if r["config"]["temperature"] == 0:
            assert all(r["results"][b]["greedy_match"] == 1.0 for b in ("mt_bench", "gsm8k"))
        else:
            assert r["results"]["gsm8k"]["greedy_match"] is None
    by = {(r["config"]["method"], r["config"]["temperature"]): r for r in runs}
    # lambda 1 and 0 are the specialists bit for bit: same acceptance at T = 0
    assert by[("average λ=1", 0)]["results"]["gsm8k"]["tau"] == by[("eagle-math",
                                                                    0)]["results"]["gsm8k"]["tau"]
    assert by[("average λ=0", 0)]["results"]["gsm8k"]["tau"] == by[("eagle-chat",
                                                                    0)]["results"]["gsm8k"]["tau"]
    eq = by[("merged, equal budget (2x4)", 0)]
    assert eq["config"]["tree_budget"] == 4 and eq["results"]["gsm8k"]["mean_tree_size"] <= 1 + 8
    route = by[("route", 0)]["results"]["mt_bench"]["routing"]
    assert (sum(route["per_call"]) == pytest.approx(1)
            and sum(route["per_prompt_majority"]) == pytest.approx(1))
    out = capsys.readouterr().out
    for title in ("Table 1 (T = 0)", "Table 1 (T = 1)", "Table 3 (T = 0)", "Table 7 (T = 1)",
                  "Table 8 (T = 0)", "Tables 9-11 (T = 1)", "Figure 6 (T = 0)",
                  "Merged trees (T = 1)", "The study's comparisons (T = 1)"):
        assert f"### {title}" in out
    for row in ("| in-domain − out-of-domain specialist |", "| averaged (λ = 0.5) − best single |",
                "| routed − best single |", "| merged − best single |", "| merged − routed |"):
        assert row in out
    # --report prints the same tables from the saved files
    ev.main(["--report", *map(str, files)])
    assert capsys.readouterr().out.strip() == out[:out.rindex("\n[")].strip()


def test_report_joins_an_interrupted_run_and_its_completion(setup, capsys):
    tmp_path, paths = setup
    for bench in ("mt_bench", "gsm8k"):
        run(tmp_path, paths, "--compose", "route", "--limit", "1", "--bench", bench, "--json",
            str(tmp_path / f"{bench}.json"))
    capsys.readouterr()
    ev.main(["--report", str(tmp_path / "mt_bench.json"), str(tmp_path / "gsm8k.json")])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| route |")]
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["results"][x]["tau"]
            for x in ("mt_bench", "gsm8k"))
    assert "| method | MT-Bench | GSM8K | average |" in out   # one row with both benchmarks
    assert rows[0].startswith(f"| route | {a:.2f} – (")    # one prompt: no interval
    assert f"| {(a + b) / 2:.2f} – (" in rows[0]


@pytest.mark.parametrize("args, message", [
    (["--compose", "merged"], "compose 'merged' takes two or more drafters, got 1"),
    (["--compose", "route-entropy"], "compose 'route-entropy' takes two or more drafters, got 1"),
    (["--compose", "average"], "compose 'average' takes two or more drafters, got 1"),
])
def test_a_composition_with_one_drafter_is_refused(setup, capsys, args, message):
    tmp_path, paths = setup
    with pytest.raises(SystemExit) as e:
        run(tmp_path, paths[:1], *args, "--limit", "1")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"


@pytest.mark.parametrize("args, message", [
    (["--bench", "gsm8k,humaneval"], "unknown benchmark 'humaneval'"),
    (["--compose", "average", "--lam", "1.5"], "--lam must be in [0, 1]"),
    (["--compose", "average", "--lam-sweep", "0,-0.5"], "--lam-sweep must be in [0, 1]"),
    (["--temperature", "-1"], "temperature must be finite and >= 0"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_bad_input_is_one_line(setup, capsys, args, message):
    tmp_path, paths = setup
    with pytest.raises(SystemExit) as e:
        run(tmp_path, paths, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_drafters_for_different_targets_are_refused(setup, capsys):
    tmp_path, paths = setup
    Drafter.random(tiny(V=V, name="another-target"), 3).save(tmp_path / "other.safetensors")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, [paths[0], str(tmp_path / "other.safetensors")], "--compose", "merged")
    assert e.value.code == 2
    assert "drafter was trained for target 'another-target'" in capsys.readouterr().err


def test_an_unknown_compose_or_a_non_result_report_is_refused(setup, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        ev.main(["--compose", "single,mixture"])
    assert e.value.code == 2 and "unknown --compose mixture" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        ev.main(["--report", str(tmp_path / "junk.json")])
    assert e.value.code == 2 and "not an eval.py result" in capsys.readouterr().err


def test_figures_are_drawn_from_saved_runs(setup, capsys):
    pytest.importorskip("matplotlib",
                        reason="matplotlib is an optional extra (pip install matplotlib)")
    tmp_path, paths = setup
    run(tmp_path, paths, "--compose", "single,average", "--lam-sweep", "0.5", "--limit", "2",
        "--bench", "gsm8k,svamp", "--json", str(tmp_path / "r" / "f.json"))
    files = sorted(map(str, (tmp_path / "r").glob("f-*.json")))
    capsys.readouterr()
    ev.main(["--report", *files, "--figures", str(tmp_path / "figs")])
    pngs = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert pngs == ["figure6-T0.png", "figure7-T0.png", "figure8-T0.png"]
    assert all((tmp_path / "figs" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    accepted = []
    for f in files:
        results = json.loads(open(f).read())["results"]
        for b in ("gsm8k", "svamp"):
            r = results[b]
            hist = r["entropy_hist"]
            assert (sum(hist["draft"]["rejected"]) > 0
                    and len(hist["edges"]) == len(hist["draft"]["accepted"]) + 1)
            # one accepted entropy per emitted draft token: each call but a turn's last emits its
            # own token too
            accepted.append(sum(hist["draft"]["accepted"]))
            assert accepted[-1] <= sum(x["new_tokens"] - x["calls"] + 1 for x in r["turns"])
    assert max(accepted) > 0


def test_figures_without_matplotlib_is_one_line_before_any_work(setup, capsys, monkeypatch):
    import sys
    tmp_path, paths = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # as if not installed
    monkeypatch.setattr(extras.autotree, "load_target",
                        lambda *a: pytest.fail("loaded a model before refusing"))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, paths, "--figures", str(tmp_path / "figs"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("error: --figures needs matplotlib, an optional extra: "
                                         "pip install matplotlib\n")


# ----------------------------------------------------------------------------- bootstrap intervals

def fake_items(rng, n, tau):
    """n prompts whose verifier calls emit about tau tokens each (Poisson-ish counts around tau)."""
    out = {}
    for q in range(n):
        calls = int(rng.integers(5, 40))
        out[q] = (int(rng.binomial(calls * 8, tau / 8)), calls)
    return out


def test_bootstrap_intervals_are_points_for_identical_prompts_and_cover_the_truth():
    assert report.bootstrap([{0: (30, 10), 1: (60, 20)}]) == pytest.approx((3.0, 3.0))
    same = {q: (3 * q + 3, q + 1) for q in range(8)}
    assert report.bootstrap([same], [same]) == (0.0, 0.0)
    assert (report.bootstrap([{}]) is None and report.bootstrap([{0: (5, 2)}]) is None
            and report.interval(None) == "–")
    # calibration: over 200 simulated evaluations of 30 prompts, the 95% interval holds the true
    # ratio of expectations (tau = 2.5) about 95% of the time -- not always, not rarely
    rng = np.random.default_rng(1)
    hits = sum(lo <= 2.5 <= hi
               for lo, hi in (report.bootstrap([fake_items(rng, 30, 2.5)], n=1000, seed=s)
                              for s in range(200)))
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_intervals_see_what_unpaired_ones_miss():
    """A method better by 0.2 tokens per call on every prompt, while prompts vary widely: pairing
    removes the between-prompt spread, so the paired interval excludes 0."""
    rng = np.random.default_rng(2)
    base = fake_items(rng, 20, 2.0)
    better = {q: (new + int(0.2 * calls), calls) for q, (new, calls) in base.items()}
    lo, hi = report.bootstrap([better], [base])
    assert 0.1 < lo <= hi < 0.3
    a, b = report.bootstrap([better]), report.bootstrap([base])
    assert a[0] < b[1]   # the unpaired intervals overlap


def test_the_study_comparisons_pick_the_right_runs():
    def fake(domain, compose="single", lam=None, tau=None):
        return {"config": {"compose": compose, "lambda": lam, "equal_budget": False,
                           "method": f"{domain}-{compose}",
                           "drafters": [{"path": domain, "domain": domain}]}, "results": tau}
    math_, chat = fake("math", tau={"gsm8k": {"tau": 3.0}, "mt_bench": {"tau": 1.2}}), \
        fake("chat", tau={"gsm8k": {"tau": 2.0}, "mt_bench": {"tau": 1.9}})
    avg, small, mixed = fake("avg", lam=0.5), fake("mixed-small"), fake("mixed-large")
    route, merged, entropy = fake("x", "route"), fake("x", "merged"), fake("x", "route-entropy")
    found = {name: (a, b) for name, a, b in report.comparisons([math_, chat, avg, small, mixed,
                                                                route, merged, entropy],
                                                           ["gsm8k", "mt_bench"])}
    assert list(found) == ["in-domain − out-of-domain specialist",
                           "averaged (λ = 0.5) − best single", "routed − best single",
                           "merged − best single", "mixed-small − best single",
                           "mixed-large − best single", "merged − routed",
                           "confidence − entropy routing", "mixed-large − mixed-small",
                           "routed − mixed-large", "merged − mixed-large"]
    assert found["mixed-large − mixed-small"] == ({"gsm8k": mixed, "mt_bench": mixed},
                                                  {"gsm8k": small, "mt_bench": small})
    assert found["merged − mixed-large"] == ({"gsm8k": merged, "mt_bench": merged},
                                             {"gsm8k": mixed, "mt_bench": mixed})
    without = [name for name, _, _ in report.comparisons([math_, chat, route, merged], ["gsm8k"])]
    assert not any("mixed" in name for name in without)
    a, b = found["confidence − entropy routing"]
    assert a == {"gsm8k": route, "mt_bench": route} and b == {"gsm8k": entropy, "mt_bench": entropy}
    a, b = found["in-domain − out-of-domain specialist"]
    assert (a["gsm8k"], b["gsm8k"], a["mt_bench"], b["mt_bench"]) == (math_, chat, chat, math_)
    a, b = found["mixed-large − best single"]
    assert a["gsm8k"] is mixed and b == {"gsm8k": math_, "mt_bench": chat}


def test_table_1_rows_in_the_study_order():
    """Singles in the composed drafters' order, then drafters run alone (the mixed-data ones) small
    before large by their training conversations, then the compositions; file order does not
    matter."""
    def fake(name, compose="single", lam=None, conversations=None):
        d = {"path": name, "data": {"conversations": conversations} if conversations else None}
        return {"config": {"compose": compose, "lambda": lam, "equal_budget": False,
                           "drafters": [d]}, "name": name}
    rows = [fake("large", conversations=8340), fake("math"), fake("math", lam=0.5),
            fake("small", conversations=4170), fake("math", "merged"), fake("chat")]
    rows.sort(key=lambda r: report.row_order(r, ["math", "chat"]))
    assert [(r["name"], report.kind(r)) for r in rows] == [("math", "single"), ("chat", "single"),
                                                           ("small", "single"),
                                                      ("large", "single"), ("math", "average"),
                                                           ("math", "merged")]


def test_single_runs_of_untrained_drafters_are_ordered_into_the_tables(setup, capsys):
    """An untrained drafter's `data` is a description (a string), not training counts: ordering the
    row of a drafter outside the longest drafter list must not read it as a dict."""
    tmp_path, paths = setup
    run(tmp_path, paths, "--compose", "single", "--limit", "1", "--bench", "svamp")
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| eagle-")]
    assert rows[:2] == ["eagle-math", "eagle-chat"]


def test_nan_becomes_null():
    assert report.finite({"a": [math.nan, 1.0],
                          "b": {"c": math.inf}}) == {"a": [None, 1.0], "b": {"c": None}}


class FixedLogits(torch.nn.Module):
    """A target whose next-token logits are `row` after any prefix, in `dtype` (its rounding)."""

    def __init__(self, row, dtype):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(len(row), 2).to(dtype)
        self.row, self.prefixes = torch.tensor(row), []

    def forward(self, ids, last_only=False):
        self.prefixes.append(ids[0].tolist())
        return self.row.view(1, 1, -1).float(), None


def test_a_parting_records_the_two_tokens_logit_gap_and_tells_a_near_tie_from_an_error():
    # plain's token 2; token 1 an eighth below, 3 far below
    row = [0.0, 31.875, 32.0, 20.0]
    bf16 = FixedLogits(row, torch.bfloat16)
    tie = report.parting(bf16, [9, 9], [0, 0, 1], [0, 0, 2])
    assert bf16.prefixes == [[9, 9, 0, 0]]          # the target's logits where the outputs part
    assert tie["first_diff"] == 2 and (tie["plain_token"], tie["spec_token"]) == (2, 1)
    assert tie["logit_gap"] == 0.125 and tie["near_tie"]   # bf16 at 32: ulp 0.25, tolerance 4 ulps
    assert tie["tie_tolerance"] == report.TIE_ULPS * 0.25
    far = report.parting(bf16, [9, 9], [0, 0, 3], [0, 0, 2])
    assert far["logit_gap"] == 12.0 and not far["near_tie"]
    fp32 = report.parting(FixedLogits(row, torch.float32), [9, 9], [0, 0, 1], [0, 0, 2])
    assert fp32["logit_gap"] == 0.125 and not fp32["near_tie"]   # in fp32 an eighth is no rounding
    # an output cut short: never a tie
    short = report.parting(bf16, [9, 9], [0, 0], [0, 0, 2])
    assert short["first_diff"] == 2 and not short["near_tie"] and short["logit_gap"] is None

    turn = lambda q, parted: {"question_id": q, "turn": 1, "match": not parted, **parted}
    note = report.parting_notes("eagle-math", [turn("a", tie), turn("b", {})])
    assert len(note) == 1 and note[0].startswith("note: eagle-math: greedy = plain on 1/2 turns")
    assert "near-tie" in note[0] and "rounding parting" in note[0] and "in fp32" in note[0]
    lines = report.parting_notes("eagle-math", [turn("a", tie), turn("b", far), turn("c", fp32)])
    assert lines[0].startswith("note:") and [
        x[:len("ERROR: eagle-math: turn 1 of prompt b")] for x in lines[1:]] == [
        "ERROR: eagle-math: turn 1 of prompt b", "ERROR: eagle-math: turn 1 of prompt c"]
    assert "by 12 logits" in lines[1] and "a verification bug" in lines[1]
    assert report.parting_notes("eagle-math", [turn("b", {})]) == []


def test_a_verifier_that_keeps_a_wrong_token_is_an_error_in_the_tables(setup, monkeypatch, capsys):
    """Negative control: speculative output with one token the target does not pick (greedy) must
    surface as an ERROR line, not hide as a near-tie note."""
    tmp_path, paths = setup
    real = ev.generate

    def wrong_last_token(*args, **kw):
        out, stats = real(*args, **kw)
        return out[:-1] + [(out[-1] + 1) % V or 1], stats
    monkeypatch.setattr(ev, "generate", wrong_last_token)
    run(tmp_path, paths, "--compose", "merged", "--limit", "1", "--bench", "gsm8k", "--json",
        str(tmp_path / "w.json"))
    out = capsys.readouterr().out
    assert ("ERROR: merged: turn 1 of prompt 0 parted from plain decoding at new token 11" in out
            and "note:" not in out)
    turn = json.loads((tmp_path / "w.json").read_text())["results"]["gsm8k"]["turns"][0]
    assert (turn["match"] is False and turn["first_diff"] == 11 and not turn["near_tie"]
            and turn["logit_gap"] > 0)


def test_auto_trees_record_their_sizes_and_match_plain_greedy(setup, monkeypatch):
    tmp_path, paths = setup
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    run(tmp_path, paths, "--compose", "merged", "--tree", "auto", "--limit", "1", "--bench",
        "gsm8k", "--json", str(tmp_path / "auto.json"), study=False)
    obj = json.loads((tmp_path / "auto.json").read_text())
    assert obj["config"]["tree"] == "auto" and obj["config"]["tree_budget"] is None
    r = obj["results"]["gsm8k"]
    assert r["greedy_match"] == 1.0 and r["mean_tree_size"] >= 1


def test_speed_table_compares_plain_study_and_auto_in_one_process(setup, monkeypatch, capsys):
    tmp_path, paths = setup
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    # HF transformers: an optional extra
    monkeypatch.setattr(extras.speed, "peer_rows", lambda *args: [])
    run(tmp_path, paths, "--speed", "--limit", "1", "--json", str(tmp_path / "speed.json"))
    out = capsys.readouterr().out
    assert "plain decoding" in out and "study tree" in out and "auto tree" in out
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert {r["benchmark"] for r in rows} == {"GSM8K", "MT-Bench"}
    assert {r["drafter"] for r in rows} == {"eagle-math", "eagle-chat"}
    for r in rows:
        assert r["tok_s"] > 0 and r["vs_plain"] > 0
        assert r["config"] == "plain decoding" or (r["tau"] >= 1 and r["greedy_match"] == "1/1")


def test_demo_steps_say_what_they_do_and_estimate_from_this_machines_calibration(
        tmp_path, monkeypatch, capsys):
    import extras.demo as demo
    R, C, N, about = demo.REFERENCE, demo.REFERENCE_COST, demo.N, demo.minutes
    ref = demo.Machine({"fp32": {N: C["verify"]}, "bf16": {N: 9 * C["verify"]}},
                       {"fp32": C["train"], "bf16": 25 * C["train"]}, "fp32", "fp32", False)
    monkeypatch.setattr(demo.Machine, "measure", classmethod(lambda cls: ref))
    monkeypatch.chdir(tmp_path)
    demo.main(["--dry-run"])                    # the reference machine itself: its own times
    out = capsys.readouterr().out
    total = sum(s for s, _ in R.values())
    first = R["features"][0] + R["train math"][0]
    assert f"[make demo: 5 steps, {about(total)} on this machine]" in out
    assert (f"[1/5] training the math drafter (the target's features first) ({about(first)}; "
            f"{about(total)} left in all)" in out)
    assert (f"[2/5] training the chat drafter ({about(R['train chat'][0])}; "
            f"{about(total - first)} left in all)" in out)
    assert ("[5/5] the speed table: plain decoding vs the study's tree vs the auto tree, fp32 "
            f"({about(R['speed'][0])}" in out)
    # an AMX-like machine: scoring in bf16 at 0.4x the reference, fp32 at 0.7x, a training step
    # under autocast at 0.5x: features in bf16, training under autocast, speed in both dtypes
    amx = demo.Machine({"fp32": {N: 0.7 * C["verify"]}, "bf16": {N: 0.4 * C["verify"]}},
                       {"fp32": 0.8 * C["train"], "bf16": 0.5 * C["train"]}, "bf16", "bf16", True)
    steps = demo.plan(amx, 6, 2)
    assert (steps[0].seconds == pytest.approx(0.4 * R["features"][0] + 0.5 * R["train math"][0])
            and steps[1].seconds == pytest.approx(0.5 * R["train chat"][0]))
    assert (steps[2].seconds == pytest.approx(0.7 * R["eval T=0"][0] * 6 / 3)
            and steps[3].seconds == pytest.approx(0.7 * R["eval T=1"][0] * 2 / 1))
    assert steps[4].seconds == pytest.approx((0.7 + 0.4) * R["speed"][0])
    assert "fp32 and bf16" in steps[4].title
    # AVX512-BF16 without AMX: a conversation's features pay in fp32, a tree's scoring in bf16
    mixed = dataclasses.replace(amx, features="fp32", amp=False)
    steps = demo.plan(mixed, 3, 1)
    assert steps[0].seconds == pytest.approx(0.7 * R["features"][0] + 0.8 * R["train math"][0])
    assert steps[4].seconds == pytest.approx((0.7 + 0.4) * R["speed"][0])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / demo.DRAFTERS[0]).write_text("")
    assert [bool(s.skip) for s in demo.plan(ref, 5, 1)] == [True, False, False, False, False]
    with pytest.raises(SystemExit):
        demo.main(["--limit-1", "0"])
    assert capsys.readouterr().err == "error: --limit-1 must be >= 1, got 0\n"


def test_demo_ends_with_what_was_shown_and_where(setup, monkeypatch):
    import extras.demo as demo
    tmp_path, paths = setup
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(extras.speed, "peer_rows", lambda *args: [])
    monkeypatch.chdir(tmp_path)
    for t in ("0", "1"):
        run(tmp_path, paths, "--compose", "single,merged", "--limit", "1", "--bench",
            "gsm8k,mt_bench", "--temperature", t, "--json", str(demo.JSON))
    run(tmp_path, paths, "--speed", "--limit", "1", "--json", str(demo.SPEED_JSON))
    text = demo.summary(90.0)
    rows = json.loads(demo.SPEED_JSON.read_text())["rows"]
    study = extras.speed.study_tree_line(rows)
    assert "Table 1 (T = 0)" in text and f"\n\n{study}\n" in text and "Table 1 (T = 1)" not in text
    assert ("RQ1 specialization" in text and "runs/demo-*-T*.json" in text
            and str(demo.SPEED_JSON) in text)
    assert text.rstrip().endswith(extras.speed.verdict_line(rows))
    md = demo.TABLES.read_text()
    assert (md.index(study) < md.index("The study's comparisons") and "Table 1 (T = 1)" in md
            and "### Speed" in md)


def test_an_unwritable_destination_is_refused_before_any_model_loads(setup, monkeypatch, capsys):
    tmp_path, paths = setup
    monkeypatch.setattr(extras.autotree, "load_target",
                        lambda *args: pytest.fail("a model was loaded"))
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, paths, "--limit", "1", "--json", str(tmp_path / "file.txt" / "r.json"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "cannot write in" in err


def test_a_failed_write_still_prints_the_tables_and_leaves_no_temporary_file(setup, monkeypatch,
                                                                            capsys):
    tmp_path, paths = setup

    def broken(p):
        p.write_text("half")
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(report, "write_json", lambda path, r: atomic_write(path, broken))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, paths, "--compose", "route", "--limit", "1", "--bench", "svamp", "--json",
            str(tmp_path / "r.json"))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "Table 1" in out and "could not write" in err
    assert not list(tmp_path.glob("r.json*"))


def test_existing_results_are_never_replaced_unasked(setup, capsys):
    tmp_path, paths = setup
    dest = tmp_path / "r.json"
    dest.write_text("{}")
    with pytest.raises(SystemExit):
        run(tmp_path, paths, "--compose", "route", "--limit", "1", "--bench", "svamp", "--json",
            str(dest))
    assert "exists; pass --force" in capsys.readouterr().err and dest.read_text() == "{}"
    dest.chmod(0o444)
    with pytest.raises(SystemExit):
        run(tmp_path, paths, "--compose", "route", "--limit", "1", "--bench", "svamp", "--json",
            str(dest), "--force")
    assert "read-only" in capsys.readouterr().err and dest.read_text() == "{}"
    dest.chmod(0o644)
    run(tmp_path, paths, "--compose", "route", "--limit", "1", "--bench", "svamp", "--json",
        str(dest), "--force")
    assert json.loads(dest.read_text())["config"]["method"] == "route"


@pytest.mark.parametrize("device", DEVICES)
def test_one_item_on_each_device_matches_plain_greedy(setup, monkeypatch, device):
    """The whole eval path on the device: loading, study and auto trees, plain timing, the JSON."""
    tmp_path, paths = setup
    target = tiny(V=V, name="tiny-eval").to(device)
    monkeypatch.setattr(extras.autotree, "load_target", lambda path, dev,
                        dtype: (target, FakeTokenizer()))
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    for tree in ("study", "auto"):
        run(tmp_path, paths, "--compose", "merged", "--limit", "1", "--bench", "gsm8k", "--device",
            device, "--tree", tree, "--json", str(tmp_path / f"{tree}.json"), study=tree == "study")
        r = json.loads((tmp_path / f"{tree}.json").read_text())["results"]["gsm8k"]
        assert r["greedy_match"] == 1.0 and r["calls"] >= 1
