"""Hugging Face checkpoint directories: config.json <-> `ModelArgs`, safetensors weights (sharded or
not) <-> `Transformer`. Llama, Vicuna, Mistral, Qwen2 and Qwen3; anything the decoder does not
implement is refused by name. Module names equal the HF names minus `model.`: no renaming table.
The other formats (extras/gguf.py, extras/eagle.py) are read into these; extras/checkpoint.py
loads what the scripts ask for."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from extras.runtime import atomic_write
from model import ModelArgs, TapsError, Transformer, rope_inv_freq


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def args_from_hf_config(cfg: dict, where: str) -> ModelArgs:
    """Map an HF config.json to ModelArgs, refusing anything this model does not implement."""
    def refuse(what):
        raise TapsError(f"{where}: {what} is not supported by this Llama implementation; "
                        "use a plain Llama-architecture checkpoint")

    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        refuse(f"model_type {mtype!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {cfg['hidden_act']!r}")
    if cfg.get("mlp_bias"):
        refuse("mlp_bias")
    if mtype != "qwen2" and cfg.get("attention_bias"):
        refuse("attention_bias")
    if (cfg.get("sliding_window") is not None
            and (mtype == "mistral" or cfg.get("use_sliding_window"))):
        refuse(f"sliding-window attention (sliding_window={cfg['sliding_window']})")
    if any(kind != "full_attention" for kind in cfg.get("layer_types") or []):
        refuse(f"layer_types {sorted(set(cfg['layer_types']))} (only full_attention)")
    if cfg.get("quantization_config"):
        refuse("quantization_config")
    # transformers >= 5 writes `rope_parameters` (theta included); older configs `rope_theta` +
    # `rope_scaling`.
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "llama3"):
        refuse(f"rope scaling of type {kind!r} (only 'llama3')")
    try:
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim"), norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=scaling if kind == "llama3" else None,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=mtype == "qwen2", qk_norm=mtype == "qwen3",
            max_seq_len=cfg.get("max_position_embeddings", 8192),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
            name=cfg.get("_name_or_path") or Path(where).parent.name)
    except KeyError as e:
        raise TapsError(f"{where}: required key {e} is missing from the config") from None


def hf_config_from_args(args: ModelArgs) -> dict:
    kind = "qwen3" if args.qk_norm else "qwen2" if args.qkv_bias else "llama"
    arch = {"qwen3": "Qwen3", "qwen2": "Qwen2", "llama": "Llama"}[kind] + "ForCausalLM"
    return {
        "architectures": [arch], "model_type": kind, "_name_or_path": args.name,
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id, "torch_dtype": "float32",
        "attention_bias": False, "mlp_bias": False,
    }


# what to do about a truncated checkpoint file, unless it is a local conversion
DOWNLOAD_AGAIN = "download it again"


def read_json(path: Path, redo: str = DOWNLOAD_AGAIN) -> dict:
    if not path.is_file():
        raise TapsError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TapsError(f"{path}: not valid JSON ({e}); "
                        f"the file may be truncated, {redo}") from None


def read_safetensors(path: Path, dtype, device, redo: str = DOWNLOAD_AGAIN) -> dict:
    from safetensors.torch import load_file
    if not path.is_file():
        raise TapsError(f"{path}: weight file not found")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise TapsError(f"{path}: cannot read safetensors ({e}); "
                        f"the file may be truncated, {redo}") from None
    return {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}


def load_hf(path, device="cpu", dtype=torch.float32, redo: str = DOWNLOAD_AGAIN) -> Transformer:
    """Load a Hugging Face checkpoint directory (config.json + model.safetensors or a sharded
    index); `redo` says what to do about a truncated file."""
    path = Path(path)
    if not path.is_dir():
        raise TapsError(f"{path}: target checkpoint directory not found")
    args = args_from_hf_config(read_json(path / "config.json", redo), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    shards = (sorted(set(read_json(index, redo)["weight_map"].values())) if index.exists()
              else ["model.safetensors"])
    sd = {}
    for shard in shards:
        sd.update(read_safetensors(path / shard, dtype, device, redo))
    sd = {k.removeprefix("model."): v for k, v in sd.items()
          if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise TapsError(f"{path}: weights do not match the config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise TapsError(f"{path}: weight shapes do not match config.json ({reason})") from None
    # non-persistent buffer: rebuild off the meta device
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval()


def save_hf(model: Transformer, path, extra_files: Optional[dict] = None):
    """Write `model` as a standard HF directory: config.json + model.safetensors (+ extra JSON
    files)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {("" if k.startswith("lm_head") else "model.") + k: v.contiguous()
          for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors",
                 lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    files = {"config.json": hf_config_from_args(model.args), **(extra_files or {})}
    for name, obj in files.items():
        atomic_write(path / name,
                     lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False)))
