"""`python model.py --bench [--shape llama3-8b]`: decoding speed against the memory bound.

Plain decoding at batch 1 reads every weight once per token, so tok/s <= copy bandwidth / weight
bytes; the bench prints both, the cost of scoring N tokens, and one call of the study's tree
(draft + verify) against a plain step with the full and a 32k draft vocabulary. `--shape` builds a
named architecture with random weights (`random_target`), so a GPU's figures need no download.
`--compile` compares instead today's eager path with the static one, eager and compiled
(`compare`); `gpu_check` (make gpu-check) is the GPU's whole check.
"""
from __future__ import annotations

import torch

from extras.checkpoint import load_target
from extras.runtime import check_device, check_memory, describe, machine, one_line_errors
from model import (ModelArgs, StaticSteps, TapsError, Transformer, bucket, clock, generate_plain,
                   pad_tree)
from taps import Drafter, Sampling, Tree, generate


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
    nbytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    check_memory(nbytes, f"--shape {shape} in {str(dtype).removeprefix('torch.')}", device,
                 "give a smaller --shape or --dtype, or another --device")
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


def bench(path, shape, device, dtype, n_new=128, compile=False):
    """The bench of `path` (None: the embedded default), or of random weights of a named `shape`;
    compile: eager against the compiled static path instead (`compare`)."""
    check_device(device)
    print(describe(machine(device)) + "\n")
    model, prompt = bench_target(path, shape, device, dtype)
    if compile:
        return print_comparison(compare(model, prompt, device, n_new))
    return measure(model, prompt, device, n_new)


def bench_target(path, shape, device, dtype) -> tuple[Transformer, list]:
    """The target and prompt a bench runs: random weights of `shape` with 40 random tokens, or a
    checkpoint with a chat prompt."""
    if shape:
        model = random_target(shape, device, dtype)
        prompt = torch.randint(model.args.vocab_size, (40,),
                               generator=torch.Generator().manual_seed(0))
        return model, prompt.tolist()
    model, tokenizer = load_target(path, device, dtype)
    prompt, _ = tokenizer.encode_chat([{"role": "user", "content": "Explain how a rainbow forms."}],
                                      add_generation_prompt=True)
    return model, prompt


@torch.inference_mode()
def measure(model, prompt: list, device, n_new=128):
    """Plain decoding at batch 1 against the memory bound -- every weight is read once per token, so
    tok/s <= copy bandwidth / weight bytes -- then the cost of scoring N tokens, and one call of the
    study's tree (draft + verify) against a plain step, with the full and a 32k draft vocabulary."""
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


# ----------------------------------------------------------------------------- eager vs compiled
# `model.py --bench --compile`: one process, one dtype, back to back, so the ratios are fair on a
# noisy machine. Rows: today's sliced cache, the static path eager (its reference), and compiled.

SCORE_SIZES = (16, 61)   # an auto-sized CPU tree, and the study's 60 nodes + root (bucket 64)


def random_tree(n: int, device):
    """The ancestor mask (N, N) and depths (N,) of a random `Tree` of n nodes (each node's parent
    drawn from the nodes before it): what a verifier call scores."""
    g = torch.Generator().manual_seed(n)
    parents = [None] + [int(torch.randint(i, (), generator=g)) for i in range(1, n)]
    tree = Tree([0] * n, parents, [0.0] * n, [None] * n)
    return tree.mask.to(device), torch.tensor(tree.depths, device=device)


def timed_call(device, fn) -> tuple[float, object]:
    """(seconds one call of fn takes, its device work included; what it returned)."""
    t0 = clock(device)
    out = fn()
    return clock(device) - t0, out


@torch.inference_mode()
def compare(model: Transformer, prompt: list, device, n_new=128, sizes=SCORE_SIZES,
            backend="inductor", reps: int = 3) -> list[dict]:
    """Plain decoding (tok/s over n_new - 1 steps, prefill excluded) and scoring a tree of each of
    `sizes` nodes after the prompt (ms per call), for today's sliced cache, the static path eager,
    and the static path compiled by `backend`, whose first calls (they compile: plain decoding's
    decode step and prefill chunk, then each other tree bucket) are timed apart.
    Each time is the best of `reps` rounds, each round timing every path in turn (a shared
    machine's load then weighs on all alike). One row per path, with whether its greedy tokens
    are today's (in fp32 they should be; in bf16 near-ties may part)."""
    if n_new < 2:
        raise TapsError(f"--max-new-tokens {n_new}: the compiled bench times at least 2 tokens")
    V = model.args.vocab_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, 1 << (30 if torch.device(device).type == "cuda" else 28))
    trees = {n: (torch.randint(V, (n,), generator=torch.Generator().manual_seed(n)).to(device),
                 *random_tree(n, device)) for n in sizes}
    graphs = backend == "inductor" and torch.device(device).type == "cuda"
    paths = {"eager, sliced cache (today)": None, "static cache, eager": StaticSteps(model),
             f"static cache, compiled ({backend}{' + CUDA graphs' if graphs else ''})":
             StaticSteps(model, backend=backend)}
    for steps in list(paths.values())[1:]:   # one cache length for every call: no recompile
        steps.fit(len(prompt) + max(n_new + 1, bucket(max(sizes))))
    decode = lambda steps, n: generate_plain(model, prompt, n, steps=steps)   # n tokens: no stops
    first, best, tokens = {}, {name: {} for name in paths}, {}
    for name, steps in paths.items():
        t_decode = timed_call(device, lambda: decode(steps, 2))[0]
        score = scorer(model, steps, prompt, trees)
        first[name] = (t_decode, timed_call(device, lambda: [score(n) for n in sizes])[0])
    for _ in range(reps):
        for name, steps in paths.items():
            t_new, tokens[name] = timed_call(device, lambda: decode(steps, n_new))
            t_one = timed_call(device, lambda: decode(steps, 1))[0]
            score = scorer(model, steps, prompt, trees)
            times = {"n_new": t_new, "one": t_one,
                     **{n: timed_call(device, lambda: score(n))[0] for n in sizes}}
            best[name] = {k: min(t, best[name].get(k, t)) for k, t in times.items()}
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    return [{"target": model.args.name, "dtype": dtype, "path": name,
             "tok_s": (n_new - 1) / (b["n_new"] - b["one"]), "limit": bandwidth / weights,
             "score_ms": {n: 1000 * b[n] for n in sizes},
             "first_s": first[name] if "compiled" in name else None,
             "same_tokens": tokens[name] == tokens["eager, sliced cache (today)"]}
            for name, b in best.items()]


def scorer(model: Transformer, steps, prompt: list, trees: dict):
    """n -> one verifier call's target pass over trees[n] (tokens, mask, depths) after the prompt,
    whose cache is filled here, outside any timing; the tree is then dropped (not kept)."""
    ids = torch.tensor([prompt], device=model.embed_tokens.weight.device)
    P = len(prompt)
    if steps is None:
        cache = model.new_cache(1, P + max(trees))
        model(ids, cache=cache)

        def sliced(n):
            tokens, mask, depths = trees[n]
            model(tokens[None], P + depths[None], mask[None], cache, head=False)
            cache.truncate(P)
        return sliced
    steps.prefill(ids)   # `compare` fitted the cache for the largest tree
    padded = {n: pad_tree(*tree) for n, tree in trees.items()}
    return lambda n: steps.score(*padded[n])


def print_comparison(rows: list[dict]):
    """One markdown table of `compare`'s rows (several targets and dtypes may share it)."""
    sizes = list(rows[0]["score_ms"])
    print("| target | dtype | path | decode tok/s | of the limit | vs today | "
          + " | ".join(f"score N = {n} (ms)" for n in sizes)
          + f" | N = {sizes[-1]} / plain step | compile s: plain, trees | greedy = today |")
    print("|---" * (9 + len(sizes)) + "|")
    today = {}
    for r in rows:
        base = today.setdefault((r["target"], r["dtype"]), r["tok_s"])
        ms = r["score_ms"]
        first = "–" if r["first_s"] is None else "{:.1f}, {:.1f}".format(*r["first_s"])
        print(f"| {r['target']} | {r['dtype']} | {r['path']} | {r['tok_s']:.1f} "
              f"| {r['tok_s'] / r['limit']:.0%} | {r['tok_s'] / base:.2f}x | "
              + " | ".join(f"{ms[n]:.1f}" for n in sizes)
              + f" | {ms[sizes[-1]] * r['tok_s'] / 1000:.2f} | {first} "
              f"| {'yes' if r['same_tokens'] else 'NO'} |")


# (shape, dtype) of `make gpu-check`: the Llama-3-8B figure, and bf16 against fp32 on the
# embedded default's shape; the study's tree only (each size is one more compile per target)
GPU_CHECK = (("llama3-8b", torch.bfloat16), ("smollm2-135m", torch.bfloat16),
             ("smollm2-135m", torch.float32))


def gpu_check(n_new: int = 64, device="cuda"):
    """`make gpu-check`, after the CUDA-parametrised tests: eager vs the compiled static path (CUDA
    graphs) on random weights of each GPU_CHECK target, one table (each target's rows are also
    printed as they come, so a run cut short still shows what it measured)."""
    with one_line_errors():
        check_device(device)
        print(describe(machine(device)) + "\n", flush=True)
        rows = []
        for shape, dtype in GPU_CHECK:
            model, prompt = bench_target(None, shape, device, dtype)
            rows += compare(model, prompt, device, n_new, sizes=(61,), reps=2)
            print_comparison(rows[-3:])
            print(flush=True)
            del model
            torch._dynamo.reset()      # compiled graphs hold the target: let its memory go
            torch.cuda.empty_cache()
        print_comparison(rows)
