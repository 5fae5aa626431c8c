"""Data parallel training under `torchrun`, as nanoGPT does it: every rank holds the drafter and
takes its share of each global batch (`World.share`); DistributedDataParallel averages the
gradients, so every rank takes the same optimizer step. The loss divides by the global number of
loss positions (`World.count`), so k steps on N ranks are k steps of one process on the same
global batch, up to the input noise, which each rank draws from its own stream. Rank 0 alone
writes checkpoints, logs and the training state; feature extraction is shared out by shard."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from extras.runtime import say_error
from model import TapsError


@dataclass
class World:
    """This process's place in a `torchrun` job: rank `rank` of `size` (0 of 1 without it)."""
    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls, device: str) -> tuple["World", str]:
        """The job torchrun describes in RANK / LOCAL_RANK / WORLD_SIZE, and this rank's device."""
        size = int(os.environ.get("WORLD_SIZE", 1))
        if size == 1:
            return cls(), device
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        except (ValueError, RuntimeError) as e:
            raise TapsError(f"WORLD_SIZE={size} but no torchrun job to join "
                            f"({str(e).splitlines()[0]}); start it with torchrun --standalone "
                            f"--nproc_per_node {size} train.py ...") from None
        return cls(dist.get_rank(), size), device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        """How this rank signs its error lines ("" without torchrun)."""
        return f"rank {self.rank} of {self.size}: " if self.size > 1 else ""

    def share(self, idx: list) -> tuple[list, bool]:
        """This rank's conversations of a global batch, and whether they count. A rank left with
        none (a shard's short last batch) reruns the first with no loss positions: every rank
        must join every gradient exchange."""
        mine = idx[self.rank::self.size]
        return (mine, True) if mine else (idx[:1], False)

    def count(self, n: torch.Tensor) -> float:
        """What a rank divides its sum of n loss terms by: the count over all ranks divided by
        their number, since DDP averages the ranks' gradients: the global batch's mean."""
        if self.size == 1:
            return max(int(n), 1)
        total = n.detach().double().reshape(1).clone()
        dist.all_reduce(total)
        return max(total.item(), 1) / self.size

    def mean(self, values: list) -> list:
        """Floats averaged over the ranks (the logged loss of the global batch)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.size).tolist()

    @contextlib.contextmanager
    def together(self, where: str, kept: str):
        """Collectives with the other ranks: one of them gone (gloo's or nccl's RuntimeError) is
        one line, saying where and what is kept."""
        try:
            yield
        except RuntimeError as e:
            if self.size == 1:
                raise
            raise TapsError(f"another rank stopped{where} ({str(e).splitlines()[0][:120]}); "
                            f"{kept}") from None

    def barrier(self):
        if self.size > 1:
            with self.together("", "what was saved is kept: rerun with --resume"):
                dist.barrier()

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (t: a buffer of the same shape elsewhere)."""
        if self.size > 1:
            dist.broadcast(t, 0)
        return t

    def pick(self, choose, device) -> int:
        """Rank 0's choose() (an int) on every rank; the other ranks never call it, so a choice
        that measures the machine measures it once (train.py --amp auto)."""
        if self.size == 1:
            return choose()
        mine = torch.tensor([choose() if self.main else 0], device=device)
        with self.together(" before training", "nothing was trained yet"):
            return int(self.broadcast(mine))

    def same_dtype(self, target, tokenizer):
        """Rank 0's --dtype auto choice on every rank (each measured its own), so all ranks read
        one feature cache."""
        if self.size > 1:
            kinds = [torch.float32, torch.bfloat16, torch.float16]
            dtype = target.embed_tokens.weight.dtype
            target = target.to(kinds[self.pick(lambda: kinds.index(dtype),
                                               target.embed_tokens.weight.device)])
        return target, tokenizer

    def close(self):
        if self.size > 1:
            dist.destroy_process_group()


SINGLE = World()


def say(line: str, joined: bool) -> int:
    """How a process ends on an error line (`extras.runtime.one_line_errors`); its exit status.
    Under torchrun (which sets TORCHELASTIC_RUN_ID), a refusal before this rank joined the job --
    a check of the flags, which every rank makes alike, with nothing run or written -- is printed
    by rank 0 alone and ends with status 0: torchrun answers any other status with its own report
    of some 45 lines and a traceback after the line, burying what to do. After joining (a rank
    that fails mid-run must fail the job), or without torchrun: the line and status 2."""
    if joined or "TORCHELASTIC_RUN_ID" not in os.environ:
        return say_error(line)
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    return 0


def check_split(batch_size: int, ranks: int):
    if batch_size % ranks:
        raise TapsError(f"--batch-size {batch_size} does not split over {ranks} ranks; give a "
                        f"multiple of {ranks} (each rank takes batch-size / ranks conversations "
                        f"of every step's batch)")


def wrap(objective: nn.Module) -> nn.Module:
    """DDP around the objective (train.py's `Objective`: the loss as a module holding the drafter)
    under torchrun; the objective itself in one process."""
    if objective.world.size == 1:
        return objective
    from torch.nn.parallel import DistributedDataParallel
    dev = objective.drafter.fc.weight.device
    return DistributedDataParallel(objective, device_ids=[dev] if dev.type == "cuda" else None)
