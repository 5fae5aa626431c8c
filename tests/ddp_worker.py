"""One rank of a data-parallel training job for tests/test_distributed.py; run by torchrun, or by
the test itself with the same environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT cached|online [--stop-at K]
    [--die-at K] torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT - --amp-check

Trains the tiny target's drafter on synthetic conversations (`setup`), the same data and config a
single process uses in the test. --stop-at K: Ctrl-C on every rank at step K (the state is saved
after every step); --die-at K: rank 1 exits at step K without a word, as a killed process would.
--amp-check: no training; each rank's stubbed step timing prefers another precision, and each prints
the --amp auto choice it ends up with."""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
import extras.distributed as D  # noqa: E402
import extras.features as xf  # noqa: E402
import train as T  # noqa: E402
from extras.runtime import one_line_errors  # noqa: E402
from test_train import small_cfg, synthetic_examples, tiny_target  # noqa: E402


def setup(folder: Path, features: str, world=None):
    """(cfg, target, train sets, held-out sets): 10 conversations, global batch 4, no input noise
    (each rank draws its own noise, so only a noise-free run can equal one process)."""
    target = tiny_target()
    train, held = synthetic_examples(10, seed=1), synthetic_examples(3, seed=2)
    if features == "online":
        meta = lambda ex, name: {**xf.features_meta(target, ex, {"domain": name}, 4), "name": name}
        sets = [xf.OnlineSet(target, train, meta(train, "a"), shard_size=4)]
        heldout = {"h": xf.OnlineSet(target, held, meta(held, "h"), shard_size=4)}
    else:
        sets = [xf.build_cache(target, train, folder / "a", {"domain": "a"}, shard_size=4,
                               world=world)]
        heldout = {"h": xf.build_cache(target, held, folder / "h", {"domain": "h"}, shard_size=4,
                                       world=world)}
    return small_cfg(backbone="hass", batch_size=4, noise=0.0,
                     draft_vocab=16), target, sets, heldout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("features")
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("--die-at", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--amp-check", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    world = D.SINGLE
    with one_line_errors(interrupted="stopped", who=lambda: world.name):
        world, _ = D.World.from_env("cpu")
        if a.amp_check:   # rank 0 measures autocast faster, rank 1 would measure it slower
            def measure(target):
                print(f"rank {world.rank} measured")
                return {"fp32": 1.0, "bf16": 0.5 if world.main else 2.0}
            T.measure_amp = measure
            choose = lambda: T.decide_amp("auto", tiny_target(), T.state_path(a.out), False)[0]
            return print(f"rank {world.rank}: amp {bool(world.pick(choose, 'cpu'))}")
        cfg, target, sets, heldout = setup(a.out.parent / "cache", a.features, world)
        real_step, steps = T.train_step, []

        def step(*args):
            steps.append(1)
            if len(steps) == a.stop_at:
                raise KeyboardInterrupt
            if len(steps) == a.die_at and world.rank == 1:
                os._exit(3)
            return real_step(*args)
        T.train_step = step
        T.train(cfg, target, sets, heldout, a.out, resume=a.resume, save_interval=0, world=world)


if __name__ == "__main__":
    main()
