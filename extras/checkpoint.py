"""What the scripts load: the target (`load_target`: an HF directory, extras/hf.py, or the
embedded default, extras/gguf.py, with its tokenizer), its architecture alone (`target_args`), and
drafters (`load_drafter`: a file `Drafter.save` wrote, checked against the target, or a public
EAGLE checkpoint directory, extras/eagle.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from extras.eagle import EAGLE_WEIGHTS, load_eagle
from extras.gguf import DEFAULT_TARGET, default_target_dir
from extras.hf import args_from_hf_config, load_hf, read_json
from extras.runtime import cache_dir, check_device
from extras.tokenizer import load_tokenizer
from model import ModelArgs, TapsError, Transformer, target_identity
from taps import Drafter, check_vocab


def load_target(path=None, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a Hugging Face checkpoint directory, or the embedded default when
    `path` is None (its GGUF file converted once to such a directory under $TAPS_CACHE). File
    formats and the tokenizer are plumbing, not the study: extras/hf.py, extras/gguf.py,
    extras/tokenizer.py."""
    check_device(device)
    if path:
        return load_hf(path, device, dtype), load_tokenizer(path)
    path = default_target_dir()
    redo = f"delete {path} and rerun to convert it again"
    return load_hf(path, device, dtype, redo), load_tokenizer(path)


def target_args(path):
    """The target's architecture (vocabulary, context) from its config.json, no weights read, so
    that flags are checked against it before any model work; None where that would take work (the
    embedded default not converted yet): the checks then wait for the loaded target."""
    if not path:
        path = cache_dir() / DEFAULT_TARGET
        if not (path / "config.json").is_file():
            return None
    path = Path(path)
    if not path.is_dir():
        raise TapsError(f"{path}: target checkpoint directory not found")
    return args_from_hf_config(read_json(path / "config.json"), str(path / "config.json"))


def load_drafter(path, target: Transformer):
    """A drafter file written by `Drafter.save`, checked against the target it is loaded for
    (name, vocabulary, hidden size, weight fingerprint, draft vocabulary), or a public EAGLE-1/2
    checkpoint directory (extras/eagle.py: the same architecture, other names); either on the
    target's device and dtype, in eval mode (`ready`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if Path(path).is_dir():
        drafter, weights = load_eagle(path, target)
        return ready(drafter, weights, target)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["taps"])
        state = load_file(str(path))
    except FileNotFoundError:
        raise TapsError(f"{path}: no such drafter checkpoint") from None
    except Exception as e:
        raise TapsError(f"{path}: not a taps drafter checkpoint "
                        f"({type(e).__name__}: {e})") from None
    t = target.args
    trained_for = (meta.get("target"), meta.get("vocab_size"), meta.get("dim"))
    if trained_for != (t.name, t.vocab_size, t.dim):
        raise TapsError(f"{path}: drafter was trained for target {meta.get('target')!r} (vocab "
                        f"{meta.get('vocab_size')}, hidden {meta.get('dim')}), not {t.name!r} "
                        f"(vocab {t.vocab_size}, hidden {t.dim})")
    # drafters saved before fingerprints have none
    weights = target_identity(target)["fingerprint"]
    if meta.get("fingerprint", weights) != weights:
        raise TapsError(f"{path}: drafter was trained for other weights of {t.name!r} (fingerprint "
                        f"{meta['fingerprint']}, this target's {weights}); "
                        "train one for this target")
    try:
        check_vocab(state.get("vocab"), t.vocab_size)
    except TapsError as e:
        raise TapsError(f"{path}: {e}; the file is damaged or not from train.py") from None
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    config = {k: v for k, v in meta.pop("config").items() if k in fields}
    drafter = Drafter(ModelArgs(**config), meta, state.get("vocab"))
    drafter.load_state_dict(state)
    return ready(drafter, path, target)


def ready(drafter, path, target: Transformer):
    """A loaded drafter with finite weights, on the target's device and dtype, in eval mode."""
    if not all(torch.isfinite(p).all() for p in drafter.parameters()):
        raise TapsError(f"{path}: drafter weights hold non-finite values (NaN or inf); retrain it")
    p = target.embed_tokens.weight
    return drafter.to(device=p.device, dtype=p.dtype).eval()


def drafter_identity(path, drafter) -> dict:
    """Which drafter a result is of: its file, a fingerprint of the file (of the weights, for an
    EAGLE checkpoint directory), and the metadata it was saved with."""
    path = Path(path)
    weights = path
    if path.is_dir():
        weights = next((path / n for n in EAGLE_WEIGHTS if (path / n).is_file()), None)
    digest = None
    if weights and weights.is_file():
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return {"path": str(path), "sha256_16": digest, **drafter.meta}
