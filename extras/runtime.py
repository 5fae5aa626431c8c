"""What every command line shares, none of it the study: one-line errors, checks of flags, devices
and destinations before any work, atomic writes, and the machine a timing ran on."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from model import TapsError


@contextlib.contextmanager
def one_line_errors(*kinds, interrupted=None, who=lambda: ""):
    """Every CLI's body: a TapsError (or one of `kinds`) is one line `error: ...` on stderr and exit
    status 2, never a traceback; Ctrl-C prints `interrupted` (what is kept: a string, or a function
    asked at that moment) and exits 130 when given. who() names the process (a torchrun rank)."""
    try:
        yield
    except (TapsError, *kinds) as e:
        print(f"error: {who()}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\ninterrupted: {interrupted() if callable(interrupted) else interrupted}",
              file=sys.stderr)
        sys.exit(130)


def check_flags(args):
    """Every float on a parsed command line is finite: NaN or inf (`--temperature inf` would sample
    uniformly) is refused before any model loads."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise TapsError(f"--{name.replace('_', '-')} {v}: not a finite number; "
                                "give a number such as 0.5")


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


def machine(device="cpu") -> dict:
    """What a timing ran on: the CPU model, its matmul-relevant flags, torch threads, the GPU if
    used. `flags_sha` fingerprints the whole flag list, so two VMs of one CPU model but different
    features differ."""
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
            "threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu}


def describe(m: dict) -> str:
    """One line for the top of a speed table: what it was measured on."""
    return (f"# {m['cpu']} ({', '.join(m['flags']) or 'no AVX2'}), {m['threads']} threads, "
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
