"""What every command line shares, none of it the study: one-line errors, checks of flags, devices
and destinations before any work, atomic writes, and the machine a timing ran on."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
import typing
from typing import Optional

import torch

from model import TapsError, logits_to_probs


def say_error(line: str) -> int:
    """Print an error line; the exit status to leave with."""
    print(line, file=sys.stderr)
    return 2


@contextlib.contextmanager
def one_line_errors(*kinds, interrupted=None, who=lambda: "", say=say_error):
    """Every CLI's body: a TapsError (or one of `kinds`) is one line `error: ...` on stderr and exit
    status 2, never a traceback; Ctrl-C prints `interrupted` (what is kept: a string, or a function
    asked at that moment) and exits 130 when given. who() names the process (a torchrun rank);
    say(line) prints the line and returns the exit status (torchrun: `extras.distributed.say`)."""
    try:
        yield
    except (TapsError, *kinds) as e:
        sys.exit(say(f"error: {who()}{e}"))
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\ninterrupted: {interrupted() if callable(interrupted) else interrupted}",
              file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error, not the usage text."""

    def error(self, message):
        sys.exit(say_error(f"error: {message}; python {self.prog} --help lists the flags"))


def add_fields(ap: argparse.ArgumentParser, config, *names: str, **defaults):
    """A flag --field-name for each named field of the config dataclass `config`, its type, default
    and help (metadata "help") the field's own: one definition of a knob for every script, whose
    range `check_flags` checks by the same name (RANGES). defaults: a script's own default for a
    field (None: the config's applies unless the flag is given)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(config)
    for name in names:
        kind = hints[name]
        if typing.get_origin(kind) is typing.Union:   # Optional[int]: an int when given
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind,
                        default=defaults.get(name, fields[name].default),
                        help=fields[name].metadata.get("help"))


def given(ap: argparse.ArgumentParser, args) -> set:
    """The flags whose value is not their default (a string default converted by its type, as
    argparse does), as --names."""
    default = {a.dest: a.type(a.default) if isinstance(a.default, str) and a.type else a.default
               for a in ap._actions}
    return {f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v != default.get(k)}


def refuse_unused(ap, args, used: set, where: str, advice: str = ""):
    """A flag that does nothing `where` (a mode, a tree) is refused, not silently ignored: the
    user believes it applied. used: the --names that do something there (`refuse_idle` names
    instead those that do nothing)."""
    refuse(sorted(given(ap, args) - set(used)), where, advice)


def refuse_idle(ap, args, idle, where: str, advice: str = ""):
    """`refuse_unused` from the other side: the flags of `idle` that were given do nothing
    `where`, and are refused."""
    refuse(sorted(given(ap, args) & set(idle)), where, advice)


def refuse(flags: list, where: str, advice: str = ""):
    if flags:
        one = len(flags) == 1
        raise TapsError(f"{', '.join(flags)} {'does' if one else 'do'} nothing {where}; "
                        f"{advice or ('drop it' if one else 'drop them')}")


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SEED_MAX = 2 ** 32 - 1      # a seed * 1_000_003 + i (eval, train) stays within torch's 64 bits
POOL_MAX = 1 << 20          # study-tree pool nodes: grow_tree keeps each in Python lists (memory)
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
LAMBDA = (lambda v: 0 <= v <= 1, "in [0, 1] (theta = lam * theta_0 + (1 - lam) * theta_1)")
# What every numeric flag may be, by its name (one meaning in every script): a test and the range
# in words. `check_flags` applies it to a parsed command line before any model loads.
RANGES = {
    "max_new_tokens": AT_LEAST_1, "limit": AT_LEAST_1, "top_k": AT_LEAST_1, "depth": AT_LEAST_1,
    "total_tokens": AT_LEAST_1, "epochs": AT_LEAST_1, "n_train": AT_LEAST_1,
    "n_heldout": AT_LEAST_1,
    "seed": (lambda v: 0 <= v <= SEED_MAX, f"between 0 and {SEED_MAX}"),
    "lam": LAMBDA, "lam_sweep": LAMBDA,
    "threads": (lambda v: 1 <= v <= CORES, f"between 1 and {CORES} (the CPU cores this process "
                                           f"may use; more only make the threads wait)"),
    "lr": (lambda v: 0 < v <= 1, "in (0, 1] (each AdamW step moves a weight by about lr)"),
    "max_len": (lambda v: v >= 3, ">= 3 (a drafter learns from position 2 on)"),
    "save_interval": (lambda v: v >= 0, ">= 0 seconds"),
    "draft_vocab": (lambda v: v >= 0, ">= 0 (0: every token)"),
}


def check_flags(args, **ranges):
    """Every number on a parsed command line is finite (`--temperature inf` would sample
    uniformly) and in its range (RANGES, a script's own `ranges`, and sampling's: temperature and
    top_p as `logits_to_probs` takes them), before any model loads; the message names the flag,
    the range and why."""
    ranges = {**RANGES, **ranges}
    for name, value in vars(args).items():
        flag = f"--{name.replace('_', '-')}"
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise TapsError(f"{flag} {v}: not a finite number; give a number such as 0.5")
            if name in ranges and not ranges[name][0](v):
                raise TapsError(f"{flag} must be {ranges[name][1]}, got {v}")
    t = getattr(args, "temperature", None)
    for t in t if isinstance(t, list) else [] if t is None else [t]:
        logits_to_probs(torch.zeros(1), t, getattr(args, "top_p", 1.0))   # sampling's own check


def check_files(paths, what: str):
    """The files a flag names exist, before any model work (a calibration, a conversion)."""
    for path in paths:
        if not Path(path).exists():
            raise TapsError(f"{path}: no such {what}")


def check_tree_flags(shape, args=None, drafters=()):
    """A study tree's flags (a `taps.TreeShape`) against what they allocate: the draft pool (top_k
    children of each of top_k frontier nodes, depth times); with the target's ModelArgs, top_k
    within its vocabulary (and each loaded drafter's) and the tree (or chain: depth + 1 tokens)
    within its context, since one target call verifies it."""
    k, depth = shape.top_k, shape.depth
    if args is not None and not shape.chain:
        for V, whose in [(args.vocab_size, "the target's")] + [
                (len(d.vocab), "the drafter's") for d in drafters if d.vocab is not None]:
            if k > V:
                raise TapsError(f"--top-k {k}: more than {whose} vocabulary of {V} tokens; give "
                                f"at most {V}")
    pool = k * (1 + depth * k)
    if not shape.chain and pool > POOL_MAX:
        raise TapsError(f"--top-k {k} --depth {depth}: the study tree's draft pool would hold "
                        f"{pool:,} nodes, more than {POOL_MAX:,} (memory: each is kept in Python "
                        f"lists); lower --top-k or --depth")
    if args is None:
        return
    n_ctx = args.max_seq_len
    if shape.chain and depth >= n_ctx:
        raise TapsError(f"--depth {depth}: a chain of depth + 1 tokens is verified in one call of "
                        f"the target, whose context is {n_ctx} tokens; give at most {n_ctx - 1}")
    if not shape.chain and shape.nodes > n_ctx:
        raise TapsError(f"--total-tokens {shape.nodes}: a tree is verified in one call of the "
                        f"target, whose context is {n_ctx} tokens; give at most {n_ctx}")


def available_memory(device) -> Optional[int]:
    """Bytes free for new tensors on `device` (None: unknown)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(nbytes: int, what: str, device, advice: str):
    """Refuse an allocation a flag drives before making it, when it cannot fit: one line, not an
    out-of-memory kill minutes later."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise TapsError(f"{what} needs {nbytes / 2 ** 30:.1f} GiB and {device} has "
                        f"{free / 2 ** 30:.1f} GiB free; {advice}")


def check_writable(path: Path, flag: str, replace: bool = True):
    """Before any work: `path` (given by `flag`) can be written, and with replace=False an existing
    file is not replaced unasked (a read-only one never)."""
    if path.is_dir():
        raise TapsError(f"{flag} {path}: is a directory; give a file name")
    if path.exists():
        if not path.stat().st_mode & 0o222:
            raise TapsError(f"{flag} {path}: exists and is read-only; choose another path")
        if not replace:
            raise TapsError(f"{flag} {path}: exists; pass --force to replace it, "
                            "or choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise TapsError(f"{flag} {path}: cannot write in {path.parent} ({err.strerror or err}); "
                        f"choose another path") from None


@contextlib.contextmanager
def writing(where, advice: str):
    """A failed write (read-only disk, full disk, a directory in the way) is one line: where, why,
    what to do."""
    try:
        yield
    except OSError as err:
        raise TapsError(f"{where}: cannot write ({err.strerror or err}); {advice}") from None


def atomic_write(path: Path, write):
    """Write via a temporary file, then rename: an interrupted run leaves no half-written file."""
    # per process: torchrun's ranks may write one file
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        # on a read-only disk this fails too: the first error is the news
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)      # never leave a half-written temporary file behind
        raise


def check_device(device) -> torch.device:
    """A --device that this torch build can run, or a one-line error saying what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TapsError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise TapsError(f"--device {device}: taps runs on cpu and cuda only; use --device cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TapsError(f"--device {device}: this torch build has no CUDA support "
                        "or no GPU is visible; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise TapsError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
               "avx_vnni")
# Environment variables that cap which instructions ATen's and oneDNN's kernels use
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def machine(device="cpu") -> dict:
    """What a timing ran on: the CPU model, its matmul-relevant flags, torch threads, the GPU if
    used. `flags_sha` fingerprints the whole flag list, so two VMs of one CPU model but different
    features differ. `isa_limits` are the ISA_LIMITS set: they cap the kernels below the flags
    (AVX2 makes an AMX machine time like one without fast bf16), so a calibration made without
    them is not reused under them, and a table says it was measured under them."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None
    return {"cpu": cpu, "flags": [f for f in SPEED_FLAGS if f in flags],
            "flags_sha": hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12],
            "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu}


def describe(m: dict) -> str:
    """One line for the top of a speed table: what it was measured on."""
    limits = " ".join(f"{k}={v}" for k, v in m.get("isa_limits", {}).items())  # older: none
    return (f"# {m['cpu']} ({', '.join(m['flags']) or 'no AVX2'}{'; ' + limits if limits else ''}"
            f"), {m['threads']} threads, "
            f"torch {m['torch']}{', ' + m['gpu'] if m['gpu'] else ''}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: Optional[str], device) -> torch.dtype:
    """A --dtype name for a device; the default is bf16 on CUDA and fp32 on a CPU."""
    return DTYPES[name or ("bf16" if str(device).startswith("cuda") else "fp32")]


def cache_dir() -> Path:
    """$TAPS_CACHE (default ~/.cache/taps): the converted default target, feature caches,
    calibrations."""
    return Path(os.environ.get("TAPS_CACHE", Path.home() / ".cache" / "taps"))


def versions() -> dict:
    """What produced a result: Python, torch, and the git commit (dirty: uncommitted changes)."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "torch": torch.__version__, "git_commit": commit,
            "git_dirty": dirty}
