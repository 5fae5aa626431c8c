"""`python model.py --bench [--shape llama3-8b]`: decoding speed against the memory bound.

Plain decoding at batch 1 reads every weight once per token, so tok/s <= copy bandwidth / weight
bytes; the bench prints both, the cost of scoring N tokens, and one call of the study's tree
(draft + verify) against a plain step with the full and a 32k draft vocabulary. `--shape` builds a
named architecture with random weights (`random_target`), so a GPU's figures need no download.
"""
from __future__ import annotations

import torch

from extras.runtime import check_device, describe, machine
from model import ModelArgs, TapsError, Transformer, clock, generate_plain, load_target


# named architectures for `--bench --shape`: random weights, so a speed needs no download
SHAPES = {
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                      hidden_dim=14336, rope_theta=500000.0, tie_embeddings=False),
    "smollm2-135m": dict(),   # the embedded default's shape: ModelArgs' defaults
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=128),
}


def random_target(shape: str, device, dtype) -> Transformer:
    """A target of a named architecture with random weights (N(0, 0.02), norms 1), built directly in
    `dtype` on `device` (an 8B model in fp32 would not fit where its bf16 copy does)."""
    if shape not in SHAPES:
        raise TapsError(f"--shape {shape}: unknown; choose one of {', '.join(SHAPES)}")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(ModelArgs(**SHAPES[shape], name=f"{shape} (random weights)"))
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def copy_bandwidth(device, nbytes: int, reps: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write): decoding's memory bound."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = clock(device)
    for _ in range(reps):
        dst.copy_(src)
    return 2 * nbytes * reps / (clock(device) - t0)


def bench(path, shape, device, dtype, n_new=128):
    """The bench of `path` (None: the embedded default), or of random weights of a named `shape`."""
    check_device(device)
    print(describe(machine(device)) + "\n")
    if shape:
        model = random_target(shape, device, dtype)
        prompt = torch.randint(model.args.vocab_size, (40,),
                               generator=torch.Generator().manual_seed(0))
        return measure(model, prompt.tolist(), device, n_new)
    model, tokenizer = load_target(path, device, dtype)
    prompt, _ = tokenizer.encode_chat([{"role": "user", "content": "Explain how a rainbow forms."}],
                                      add_generation_prompt=True)
    return measure(model, prompt, device, n_new)


@torch.inference_mode()
def measure(model, prompt: list, device, n_new=128):
    """Plain decoding at batch 1 against the memory bound -- every weight is read once per token, so
    tok/s <= copy bandwidth / weight bytes -- then the cost of scoring N tokens, and one call of the
    study's tree (draft + verify) against a plain step, with the full and a 32k draft vocabulary."""
    from taps import Drafter, Sampling, generate
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, 1 << (30 if torch.device(device).type == "cuda" else 28))
    generate_plain(model, prompt, 8)  # warm-up
    t0 = clock(device)
    out = generate_plain(model, prompt, n_new)  # no stop ids: always n_new tokens
    tok_s = len(out) / (clock(device) - t0)
    cache = model.new_cache(1, 1024)
    long_prompt = torch.tensor([(prompt * 600)[:512]], device=device)
    t0 = clock(device)
    model(long_prompt, cache=cache, last_only=True)
    prefill = 512 / (clock(device) - t0)
    score = {}
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        model(long_prompt[:, :n], cache=cache)                      # warm-up of this shape
        cache.truncate(512)
        t0 = clock(device)
        for _ in range(5):
            model(long_prompt[:, :n], cache=cache)
            cache.truncate(512)
        score[n] = 1000 * (clock(device) - t0) / 5
    limit = bandwidth / weights
    print(f"| target | device | dtype | weights (GB) | copy bandwidth (GB/s) | limit tok/s | "
          f"decode tok/s (batch 1, {n_new} new) | of the limit | prefill tok/s (512) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {model.args.name} | {device} | {dtype} | {weights / 1e9:.2f} | {bandwidth / 1e9:.0f} "
          f"| {limit:.0f} | {tok_s:.1f} | {tok_s / limit:.0%} | {prefill:.0f} |\n")
    print("| score N tokens after 512 | " + " | ".join(f"N = {n}" for n in score) + " |")
    print("|---|" + "---|" * len(score))
    print("| ms | " + " | ".join(f"{t:.1f}" for t in score.values()) + " |\n")
    V = model.args.vocab_size
    rows = []
    for name, vocab in (("full", None), ("32k", torch.arange(32000) if V > 32000 else None)):
        if name == "32k" and vocab is None:
            continue   # the full vocabulary is <= 32k already
        drafter = Drafter.random(model)
        drafter.vocab = None if vocab is None else vocab.to(device)
        generate(model, drafter, prompt, Sampling(max_new_tokens=8))         # warm-up
        _, s = generate(model, drafter, prompt, Sampling(max_new_tokens=24))
        draft, verify = 1000 * s.draft_time / s.calls, 1000 * s.verify_time / s.calls
        rows.append(f"| {name} ({drafter.draft_vocab_size}) | {draft:.1f} | {verify:.1f} "
                    f"| {1000 / tok_s:.1f} | {(draft + verify) * tok_s / 1000:.2f} |")
    print("| study tree call (60/5/10), draft vocabulary | draft ms | verify ms | plain step ms | "
          "call / plain step |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
