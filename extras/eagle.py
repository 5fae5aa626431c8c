"""Public EAGLE-1/2 (and HASS) drafters as SafeAILab/EAGLE publishes them, loaded as taps drafters.

extras/checkpoint.py's `load_drafter` hands a checkpoint *directory* here. The architecture is
taps' own -- fc(cat(embed(x_{t+1}), f_t)), one decoder layer, the target's head -- so only names
are mapped, and hidden size, vocabulary and rotary settings are checked against the target.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from model import TapsError, Transformer
from extras.hf import args_from_hf_config, read_json
from taps import Drafter

# a public EAGLE checkpoint's weights: either file
EAGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def load_eagle(path, target: Transformer) -> tuple[Drafter, Path]:
    """A public EAGLE-1/2 (or HASS) drafter as SafeAILab/EAGLE publishes it: a directory with
    config.json (a one-layer Llama config; `bias`, default true, gives fc a bias) and
    pytorch_model.bin or model.safetensors holding fc.weight, [fc.bias] and layers.0.* (no
    input_layernorm), maybe embed_tokens.weight (the target's own copy: unused). It is this
    architecture exactly -- fc(cat(embed(x_{t+1}), f_t)), one layer, the target's head -- so only
    the names are mapped: a missing fc.bias (bias false) is a zero bias. .bin files are read with
    torch.load(weights_only=True) only: no pickled code runs. Returns the drafter (on the CPU) and
    its weight file, which `load_drafter` readies for the target."""
    from safetensors.torch import load_file
    path, t = Path(path), target.args
    config = read_json(path / "config.json")
    if (config.get("hidden_size"), config.get("vocab_size")) != (t.dim, t.vocab_size):
        raise TapsError(f"{path}: EAGLE drafter for hidden size {config.get('hidden_size')}, vocab "
                        f"{config.get('vocab_size')}; the target {t.name!r} has hidden size "
                        f"{t.dim}, vocab {t.vocab_size}")
    args = args_from_hf_config({**config, "num_hidden_layers": 1, "_name_or_path": t.name},
                               str(path / "config.json"))
    if (args.rope_theta, args.rope_scaling) != (t.rope_theta, t.rope_scaling):
        raise TapsError(f"{path}: EAGLE drafter with rope_theta {args.rope_theta} / rope_scaling "
                        f"{args.rope_scaling}, target {t.rope_theta} / {t.rope_scaling}: "
                        f"taps drafters use the target's rotary table")
    weights = next((path / n for n in EAGLE_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise TapsError(f"{path}: no {' or '.join(EAGLE_WEIGHTS)} "
                        f"in this EAGLE checkpoint directory")
    try:
        state = (load_file(str(weights)) if weights.suffix == ".safetensors"
                 else torch.load(weights, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError:   # non-tensor objects: weights_only refuses to run their code
        raise TapsError(f"{weights}: holds pickled objects besides tensors, refused "
                        f"(torch.load weights_only); "
                        f"use a model.safetensors copy of this checkpoint") from None
    except Exception as e:           # truncated or corrupt
        first = (str(e).splitlines() or [""])[0][:160]
        raise TapsError(f"{weights}: unreadable EAGLE weights ({type(e).__name__}: {first}); "
                        f"download the checkpoint again") from None
    state = {k: v for k, v in state.items() if k != "embed_tokens.weight"}
    if "fc.bias" not in state and not config.get("bias", True):
        state["fc.bias"] = torch.zeros(t.dim, dtype=state["fc.weight"].dtype)
    meta = {"target": t.name, "vocab_size": t.vocab_size, "dim": t.dim, "backbone": "eagle",
            "domain": "external", "data": f"external EAGLE checkpoint {path}", "external": "eagle"}
    drafter = Drafter(args, meta)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TapsError(f"{weights}: not an EAGLE-1/2 drafter "
                        f"(missing {', '.join(missing) or 'nothing'}; "
                        f"unexpected {', '.join(unexpected) or 'nothing'})")
    return drafter, weights
