"""The built-in demonstration's shipped files keep the promises the README makes about them
(no training here: `lora-jax train` itself is exercised by tests/test_train.py)."""

from __future__ import annotations

import json
import os

from lora_jax.demo import DEMO_DIR, DEMO_EVAL, DEMO_TRAIN, demo_run_config

README_PROMPT = "shout: hello world =>"


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _phrase(record):
    prompt = record["prompt"]
    assert prompt.startswith("shout: ") and prompt.endswith(" =>"), prompt
    return prompt[len("shout: ") : -len(" =>")]


def _pairs(phrase):
    words = phrase.split()
    return set(zip(words, words[1:]))


def test_eval_phrases_are_held_out_and_hold_the_readme_example():
    train = [_phrase(r) for r in _records(DEMO_TRAIN)]
    evals = _records(DEMO_EVAL)
    assert evals[0] == {"prompt": README_PROMPT, "completion": " HELLO WORLD"}
    assert len(evals) >= demo_run_config().train.eval_generate
    train_pairs = set().union(*map(_pairs, train))
    train_words = {w for p in train for w in p.split()}
    unseen_word = 0
    for record in evals:
        phrase = _phrase(record)
        assert record["completion"] == " " + phrase.upper()
        assert phrase not in train and not _pairs(phrase) & train_pairs, phrase
        unseen_word += any(w not in train_words for w in phrase.split())
    assert unseen_word >= len(evals) // 2


def test_tokenizer_splits_a_phrase_and_its_shout_alike(demo_tokenizer):
    tok = demo_tokenizer
    assert len(tok) <= 4096
    seq_len = demo_run_config().data.seq_len
    for record in _records(DEMO_TRAIN) + _records(DEMO_EVAL):
        lower = tok.tokenize(" " + _phrase(record))
        upper = tok.tokenize(record["completion"])
        assert [t.upper() for t in lower] == upper, (lower, upper)
        n = len(tok(record["prompt"]).input_ids) + len(upper) + 1  # bos + prompt, completion, eos
        assert n <= seq_len and tok.unk_token not in lower


def test_demo_files_stay_small():
    size = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(DEMO_DIR)
        for f in files
        if "__pycache__" not in root
    )
    assert size < 3_000_000
