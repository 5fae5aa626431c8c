"""The tokenizer on tiktoken: byte-level BPE from an HF tokenizer.json (SmolLM2: digits split one by
one, ChatML) or Llama 3's tokenizer.model, and the chat template. `Tokenizer.encode_chat(messages)`
returns ids and a mask of the assistant-produced tokens, built piece by piece from ids: training's
loss mask. Plumbing, not the study's algorithm: extras/checkpoint.py's `load_target` imports it.
"""
from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import tiktoken

from model import TapsError


# ---------------------------------------------------------------------------- Tokenizer on tiktoken

# Llama 3's pre-tokenizer split
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF's Digits(individual_digits) then ByteLevel as one regex: every digit alone, and a
# whitespace run before a digit stays whole (ByteLevel saw it at the end of a piece).
DIGITS_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>"
                    for i in range(2, 258 - len(LLAMA3_SPECIALS))]

# Chat formats, recognised by their control tokens. bos is only set where the model expects it
# in front of every sequence (SmolLM2 has add_bos_token false).
CHAT_FORMATS = {
    "llama3": {"marker": "<|start_header_id|>", "bos": "<|begin_of_text|>",
               "eos": "<|end_of_text|>", "end_of_turn": "<|eot_id|>",
               "stop": ("<|end_of_text|>", "<|eot_id|>")},
    "chatml": {"marker": "<|im_start|>", "bos": None, "eos": "<|im_end|>",
               "end_of_turn": "<|im_end|>", "stop": ("<|im_end|>", "<|endoftext|>")},
}
ROLES = ("system", "user", "assistant")


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies are written."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def _hf_split_pattern(tokenizer):
    """The one regex doing what a tokenizer.json's normalizer + pre_tokenizer do, or None if
    unknown."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    byte_level = (steps[-1]
                  if kinds[-1:] == ["ByteLevel"] and not steps[-1].get("add_prefix_space")
                  else None)
    if tokenizer.get("normalizer") is not None or byte_level is None:
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and byte_level.get("use_regex", True)):
        return DIGITS_PATTERN
    if (kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return steps[0].get("pattern", {}).get("Regex")
    return None


class Tokenizer:
    """Byte-level BPE on tiktoken. The token id is the tiktoken rank: tiktoken merges the pair
    whose result has the lowest rank, which replays the BPE merge list when merge results have
    increasing ids (checked on load; ids matched HF tokenizers on all test strings). Control
    tokens are tiktoken special tokens, so plain text never turns into them."""

    def __init__(self, name, ranks, pattern, specials, default_system=None):
        self.name = name
        self.n_vocab = max([*ranks.values(), *specials.values()]) + 1
        # tiktoken needs every single byte; bytes the vocab lacks (21 for SmolLM2, e.g. \x04) get
        # ids past n_vocab and encode() drops them, as HF tokenizers does for a BPE without
        # unk_token. The only difference from HF: HF goes on merging across the gap inside the
        # pre-token ("!\x04!" is "!!" there, "!", "!" here).
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        ranks = ranks | {b: self.n_vocab + i for i, b in enumerate(missing)}
        self.enc = tiktoken.Encoding(os.path.basename(name), pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.specials = specials
        self.chat_format = next(
            (f for f, spec in CHAT_FORMATS.items() if spec["marker"] in specials), None)
        fmt = CHAT_FORMATS.get(self.chat_format, {})
        self.bos_id = specials.get(fmt.get("bos"))
        self.eos_id = specials.get(fmt.get("eos"))
        self.stop_ids = {specials[t] for t in fmt.get("stop", ()) if t in specials}
        self.default_system = default_system

    @classmethod
    def from_file(cls, path):
        """Load a Llama 3 tokenizer.model (tiktoken BPE file) or an HF byte-level BPE tokenizer.json
        (with tokenizer_config.json beside it, when present, for the chat template)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TapsError(f"{path}: cannot read tokenizer file ({e.strerror}); "
                            f"check the path") from None
        if data.lstrip()[:1] != b"{":
            return cls._from_tiktoken_bpe(data, path)
        try:
            tokenizer = json.loads(data)
        except ValueError:
            raise TapsError(f"{path}: not valid JSON; pass an HF tokenizer.json or a Llama 3 "
                            f"tokenizer.model") from None
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            config = {}
        except ValueError:
            raise TapsError(f"{config_path}: not valid JSON; fix or remove this file") from None
        return cls.from_hf(tokenizer, config, path)

    @classmethod
    def _from_tiktoken_bpe(cls, data, path):
        """Llama 3's tokenizer.model: lines "base64(token bytes) rank", then 256 special tokens."""
        ranks = {}
        try:
            for line in data.split(b"\n"):
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            ranks = {}
        if (sorted(ranks.values()) != list(range(len(ranks)))
                or any(bytes([b]) not in ranks for b in range(256))):
            raise TapsError(f"{path}: not a tiktoken BPE file (lines 'base64 rank' covering all "
                            f"bytes); pass a Llama 3 tokenizer.model "
                            f"or an HF byte-level BPE tokenizer.json")
        specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
        return cls(path, ranks, LLAMA3_PATTERN, specials)

    @classmethod
    def from_hf(cls, tokenizer, config, name):
        """From parsed HF tokenizer.json / tokenizer_config.json dicts of byte-level BPE kind."""
        model = tokenizer.get("model") or {}
        pattern = _hf_split_pattern(tokenizer)
        if (model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict)
                or pattern is None):
            raise TapsError(f"{name}: not a byte-level BPE tokenizer.json (model "
                            f"{model.get('type')!r}); pass an HF byte-level BPE tokenizer.json "
                            f"or a Llama 3 tokenizer.model")
        vocab = model["vocab"]
        specials = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        try:
            ranks = {bytes(to_byte[c] for c in token): i
                     for token, i in vocab.items() if token not in specials}
        except KeyError:
            raise TapsError(f"{name}: vocabulary is not byte-level (GPT-2 byte characters); "
                            f"pass a byte-level BPE tokenizer.json") from None
        last = -1
        for merge in model.get("merges", []):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            merged = vocab.get(left + right, -1)
            if merged <= last:
                raise TapsError(f"{name}: merge {left!r} + {right!r} is out of id order, so ids "
                                f"cannot serve as tiktoken ranks; "
                                f"this BPE vocabulary is not supported")
            last = merged
        template = config.get("chat_template")
        # A hard-coded system turn in a ChatML template is the default system message that
        # SmolLM2's template inserts when a conversation has none.
        default = re.search(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "", re.S)
        return cls(name, ranks, pattern, specials, default[1] if default else None)

    def encode(self, text, bos=False, eos=False):
        """Plain text to ids ("<|...|>" strings stay text); bos/eos add those tokens where the
        tokenizer has them."""
        ids = [i for i in self.enc.encode_ordinary(text) if i < self.n_vocab]
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return head + ids + tail

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def encode_chat(self, messages, add_generation_prompt=False):
        """A conversation in the model's chat format: (ids, mask), mask 1 exactly on the tokens the
        assistant produces (its contents and each closing end-of-turn token). Pieces are encoded
        one by one so the mask follows the ids; this equals encoding the rendered template except
        where a content starts with whitespace that would merge with the header's newline."""
        if self.chat_format is None:
            raise TapsError(f"{self.name}: no known chat format "
                            f"(Llama 3 or ChatML control tokens); use a chat model's tokenizer")
        tok = self.specials
        end_of_turn = tok[CHAT_FORMATS[self.chat_format]["end_of_turn"]]
        if self.chat_format == "llama3":
            def header(role):
                return [tok["<|start_header_id|>"], *self.encode(role), tok["<|end_header_id|>"],
                        *self.encode("\n\n")]
            ids, after_turn = [self.bos_id], []
        else:
            def header(role):
                return [tok["<|im_start|>"], *self.encode(role + "\n")]
            ids, after_turn = [], self.encode("\n")
            if messages and messages[0].get("role") != "system" and self.default_system is not None:
                messages = [{"role": "system", "content": self.default_system}, *messages]
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise TapsError(f"{self.name}: chat message {i} has role {role!r} and content of "
                                f"type {type(content).__name__}; "
                                f"use role system, user or assistant with str content")
            head, body = header(role), self.encode(content) + [end_of_turn]
            ids += head + body + after_turn
            mask += [0] * len(head) + [int(role == "assistant")] * len(body) + [0] * len(after_turn)
        if add_generation_prompt:
            head = header("assistant")
            ids, mask = ids + head, mask + [0] * len(head)
        return ids, mask


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer next to a checkpoint: tokenizer.model (Llama 3's tiktoken file) or
    tokenizer.json."""
    path = Path(path)
    for name in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
        if (path / name).exists():
            return Tokenizer.from_file(path / name)
    raise TapsError(f"{path}: no tokenizer.model or tokenizer.json found next to the checkpoint")
