"""The data pipeline: formats and their loss masks, packing invariants, the loader's determinism,
exact resume and process sharding, and the one-line message of each bad input.

The tokenizer is a real `tokenizers` char-level tokenizer wrapped in transformers'
`PreTrainedTokenizerFast` (bos added by its post-processor, a small Jinja chat template), so one
character is one token and expected masks can be written by hand.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from lora_jax.data import (
    ROW_KEYS,
    DataConfig,
    DataLoader,
    batch_indices,
    build_datasets,
    detect_format,
    eval_batches,
    first_fit,
    pack_examples,
    pad_examples,
    read_jsonl,
    special_prefix,
    split_heldout,
    tokenize_record,
    truncate_examples,
)
from lora_jax.errors import ConfigError, DataError
from tests.helpers import write_jsonl

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _make_tokenizer(bos: bool = True, chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


def _pieces(tok, ids, mask):
    """The tokens (as strings) where mask is set, joined."""
    return "".join(t for t, m in zip(tok.convert_ids_to_tokens(ids.tolist()), mask) if m)


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "bad",
    [
        dict(seq_len=1),
        dict(seq_len=True),
        dict(eval_fraction=1.0),
        dict(eval_fraction=-0.1),
        dict(overlong="truncte"),
        dict(packing="yes"),
        dict(seed=-1),
        dict(train_file=""),
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DataConfig(**bad)


# ------------------------------------------------------------------------- formats and masks
def test_text_trains_on_every_token(tok):
    assert special_prefix(tok) == [tok.bos_token_id]
    ids, mask = tokenize_record({"text": "ab c"}, "text", tok)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert tok.convert_ids_to_tokens(ids.tolist()) == ["<s>", "a", "b", " ", "c", "</s>"]
    assert mask.all()


def test_prompt_completion_loss_only_on_completion_and_eos(tok):
    rec = {"prompt": "Q: 2+2?", "completion": " A: 4"}
    ids, mask = tokenize_record(rec, "prompt_completion", tok, completion_only=True, add_eos=True)
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    assert "".join(tokens) == "<s>Q: 2+2? A: 4</s>"
    assert _pieces(tok, ids, mask) == " A: 4</s>"
    assert not mask[: 1 + len("Q: 2+2?")].any() and mask[1 + len("Q: 2+2?") :].all()
    _, mask_all = tokenize_record(rec, "prompt_completion", tok, completion_only=False)
    assert mask_all.all()
    ids_no_eos, _ = tokenize_record(rec, "prompt_completion", tok, add_eos=False)
    assert ids_no_eos[-1] != tok.eos_token_id and len(ids_no_eos) == len(ids) - 1


def test_no_bos_when_tokenizer_does_not_add_one():
    plain = _make_tokenizer(bos=False)
    assert special_prefix(plain) == []
    ids, _ = tokenize_record({"prompt": "a", "completion": "b"}, "prompt_completion", plain)
    assert plain.convert_ids_to_tokens(ids.tolist()) == ["a", "b", "</s>"]


def test_messages_loss_only_on_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = tokenize_record({"messages": messages}, "messages", tok)
    assert "".join(tok.convert_ids_to_tokens(ids.tolist())) == (
        "<s><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>yo<|end|>"
        "<|user|>2+2?<|end|><|assistant|>4<|end|></s>"
    )
    # Assistant content and its end-of-turn token (and the final eos); headers are not trained.
    assert _pieces(tok, ids, mask) == "yo<|end|>4<|end|></s>"
    assert ids.tolist().count(tok.bos_token_id) == 1  # the template's bos, not a second one
    _, mask_all = tokenize_record({"messages": messages}, "messages", tok, completion_only=False)
    assert mask_all.all()
    # A conversation ending on a user turn: its eos carries no loss.
    ids, mask = tokenize_record({"messages": messages[:4]}, "messages", tok)
    assert _pieces(tok, ids, mask) == "yo<|end|>"


def test_messages_template_that_ends_with_eos_gets_no_second_eos():
    t = _make_tokenizer(chat_template=CHAT_TEMPLATE.replace("<|end|>", "</s>"))
    ids, mask = tokenize_record(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages", t
    )
    assert ids.tolist().count(t.eos_token_id) == 2 and ids[-1] == t.eos_token_id
    assert _pieces(t, ids, mask) == "b</s>"
    # eos then a newline closes each turn: still no second eos after the newline.
    t = _make_tokenizer(chat_template=CHAT_TEMPLATE.replace("<|end|>", "{{ eos_token }}\n"))
    ids, mask = tokenize_record(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages", t
    )
    tokens = "".join(t.convert_ids_to_tokens(ids.tolist()))
    assert tokens == "<s><|user|>a</s>\n<|assistant|>b</s>\n"
    assert _pieces(t, ids, mask) == "b</s>\n"


def test_messages_template_that_rewrites_earlier_turns_is_refused():
    # Renders a turn differently when it is the last one: assistant spans cannot be located.
    t = _make_tokenizer(
        chat_template="{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match=r"^x:1: the chat template renders messages\[:2\]"):
        tokenize_record(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "messages",
            t,
            where="x:1",
        )


def test_messages_need_a_chat_template():
    t = _make_tokenizer(chat_template=None)
    with pytest.raises(DataError, match="^x:1: 'messages' records need a tokenizer with a chat"):
        tokenize_record({"messages": [{"role": "assistant", "content": "b"}]}, "messages", t, where="x:1")


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"text": "a", "id": 3}, "text"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record, "f:1") == fmt


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"prompt": "a"},
            "f:1: record has 'prompt' but no 'completion'; a prompt/completion record "
            'needs both: {"prompt": ..., "completion": ...}',
        ),
        ({"completion": "a"}, "f:1: record has 'completion' but no 'prompt'"),
        (
            {"input": "a", "output": "b"},
            "f:1: record has fields ['input', 'output']; expected "
            '{"text": ...}, {"prompt": ..., "completion": ...} or',
        ),
        ({"text": "a", "messages": []}, "f:1: record has fields of several formats (text, messages)"),
        ({"text": 3}, "f:1: 'text' is a JSON number, expected a string"),
        ({"prompt": [], "completion": "b"}, "f:1: 'prompt' is a JSON array, expected a string"),
        ({"messages": []}, "f:1: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "f:1: messages[0] has no 'content'; each message needs"),
        ({"messages": ["hi"]}, r"f:1: messages[0] is a JSON string; each message must be an object"),
    ],
)
def test_detect_format_errors_name_the_line_and_fields(record, message):
    with pytest.raises(DataError) as e:
        detect_format(record, "f:1")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- packing
def _random_examples(rng, n, max_len):
    out = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        out.append((rng.integers(1, 100, length).astype(np.int32), rng.random(length) < 0.6))
    return out


def _naive_first_fit(lengths, capacity):
    bins, free = [], []
    for i, length in enumerate(lengths):
        for b, room in enumerate(free):
            if room >= length:
                bins[b].append(i)
                free[b] -= length
                break
        else:
            bins.append([i])
            free.append(capacity - length)
    return bins


def test_first_fit_matches_the_definition(rng):
    lengths = rng.integers(1, 17, 300).tolist()
    assert first_fit(lengths, 16) == _naive_first_fit(lengths, 16)


def test_packed_rows_keep_documents_whole_and_separate(rng):
    seq_len = 16
    examples = _random_examples(rng, 60, seq_len)
    rows = pack_examples(examples, seq_len)
    assert len(rows) < len(examples)
    seen = []
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        for k in ROW_KEYS:
            assert row[k].shape == (seq_len,)
        assert row["loss_mask"].dtype == np.float32 and row["input_ids"].dtype == np.int32
        seg = row["segment_ids"]
        n_docs = seg.max()
        # Segments are 1..n contiguous from the left, then padding (0) to the end.
        assert (np.diff(seg[seg > 0]) >= 0).all() and set(seg[seg > 0]) == set(range(1, n_docs + 1))
        pad = seg == 0
        if pad.any():
            assert pad[np.argmax(pad) :].all()
        for k in ("input_ids", "targets", "loss_mask", "positions"):
            assert not row[k][pad].any()
        for s in range(1, n_docs + 1):
            where = np.flatnonzero(seg == s)
            ids = row["input_ids"][where]
            assert (row["positions"][where] == np.arange(len(where))).all()  # restart per doc
            assert (row["targets"][where[:-1]] == ids[1:]).all()  # next token, same document
            assert row["targets"][where[-1]] == 0 and row["loss_mask"][where[-1]] == 0  # no cross
            seen.append((ids, row["loss_mask"][where]))
    # Every document exactly once, unsplit, and its loss mask is the token mask shifted by one.
    by_content = sorted(seen, key=lambda d: d[0].tolist())
    expected = sorted(examples, key=lambda d: d[0].tolist())
    assert len(by_content) == len(expected)
    for (ids, loss), (want_ids, want_mask) in zip(by_content, expected):
        assert (ids == want_ids).all()
        assert (loss[:-1] == want_mask[1:]).all()


def test_pad_examples_one_document_per_row(rng):
    examples = _random_examples(rng, 5, 8)
    rows = pad_examples(examples, 8)
    assert len(rows) == 5
    for row, (ids, _) in zip(rows, examples):
        assert set(row["segment_ids"].tolist()) <= {0, 1}
        assert (row["input_ids"][: len(ids)] == ids).all() and not row["input_ids"][len(ids) :].any()


def test_truncate_counts_and_pack_refuses_overlong(rng):
    examples = [
        (np.arange(1, 11, dtype=np.int32), np.ones(10, bool)),
        (np.arange(1, 4, dtype=np.int32), np.ones(3, bool)),
    ]
    cut, n = truncate_examples(examples, 8)
    assert n == 1 and [len(i) for i, _ in cut] == [8, 3]
    with pytest.raises(DataError, match="example 0 has 10 tokens"):
        pack_examples(examples, 8)


# -------------------------------------------------------------------------------------- loader
def _rows(n, seq_len=4):
    return [{k: np.full(seq_len, i, np.float32 if k == "loss_mask" else np.int32) for k in ROW_KEYS} for i in range(n)]


def _ids(batch):
    return batch["input_ids"][:, 0].tolist()


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_is_deterministic_and_covers_each_epoch():
    rows = _rows(23)
    a, b = DataLoader(rows, 4, seed=7), DataLoader(rows, 4, seed=7)
    assert a.steps_per_epoch == 5
    batches = _take(a, 15)
    assert [_ids(x) for x in batches] == [_ids(x) for x in _take(b, 15)]
    first = batches[0]
    assert set(first) == set(ROW_KEYS) and first["input_ids"].shape == (4, 4)
    assert first["loss_mask"].dtype == np.float32
    epochs = [sum((_ids(x) for x in batches[e * 5 : (e + 1) * 5]), []) for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == 20  # each epoch: distinct rows, remainder of 3 dropped
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    other = DataLoader(rows, 4, seed=8)
    assert [_ids(x) for x in _take(other, 5)] != [_ids(x) for x in batches[:5]]


@pytest.mark.parametrize("skip", [2, 4, 5, 9])  # mid-epoch, last of epoch, at boundary, later
def test_loader_resumes_exactly(skip):
    rows = _rows(22)
    loader = DataLoader(rows, 4, seed=3)
    _take(loader, skip)
    state = json.loads(json.dumps(loader.get_state()))
    assert {"seed", "epoch", "position"} <= set(state)
    expected = _take(loader, 7)  # crosses at least one epoch boundary
    resumed = DataLoader(rows, 4, seed=0)  # the state's seed wins
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 7)):
        for k in ROW_KEYS:
            np.testing.assert_array_equal(want[k], got[k])


def test_process_shards_are_disjoint_and_form_the_global_batch():
    rows = _rows(50)
    single = DataLoader(rows, 8, seed=1)
    shards = [DataLoader(rows, 8, seed=1, process_index=p, process_count=4) for p in range(4)]
    for step in range(14):  # crosses an epoch boundary (6 steps per epoch)
        want = next(single)
        parts = [next(s) for s in shards]
        assert all(p["input_ids"].shape == (2, 4) for p in parts)
        for k in ROW_KEYS:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])
        got = sum((_ids(p) for p in parts), [])
        assert len(set(got)) == 8
        epoch, position = divmod(step, 6)
        assert _ids(parts[2]) == batch_indices(50, 8, 1, epoch, position, 2, 4).tolist()
    assert {s.get_state()["position"] for s in shards} == {single.get_state()["position"]}


def test_loader_errors():
    with pytest.raises(ConfigError, match="batch_size=6 is the global batch and must divide by process_count=4"):
        DataLoader(_rows(10), 6, seed=0, process_count=4)
    with pytest.raises(DataError, match="^3 training row\\(s\\) is fewer than batch_size=4; lower"):
        DataLoader(_rows(3), 4, seed=0)
    loader = DataLoader(_rows(10), 2, seed=0)
    state = loader.get_state()
    with pytest.raises(DataError, match="saved with n_rows=10 but this loader has n_rows=12"):
        DataLoader(_rows(12), 2, seed=0).set_state(state)


def test_eval_batches_cover_every_row_once_and_pad_the_last():
    rows = _rows(7)
    batches = list(eval_batches(rows, 4))
    assert [b["input_ids"].shape for b in batches] == [(4, 4), (4, 4)]
    assert _ids(batches[0]) + _ids(batches[1])[:3] == list(range(7))
    assert not batches[1]["loss_mask"][3].any() and not batches[1]["segment_ids"][3].any()
    halves = [list(eval_batches(rows, 4, p, 2)) for p in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([halves[0][1]["input_ids"], halves[1][1]["input_ids"]]), batches[1]["input_ids"]
    )


# ---------------------------------------------------------------------------- build_datasets
def test_build_datasets_splits_before_packing(tmp_path, tok):
    records = [{"prompt": f"q{i}:", "completion": f" a{i}", "id": i} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DataConfig(train_file=path, eval_fraction=0.1, seq_len=32, seed=5)
    ds = build_datasets(cfg, tok)
    assert ds.stats["format"] == "prompt_completion"
    assert (ds.stats["n_records"], ds.stats["n_train"], ds.stats["n_eval"]) == (40, 36, 4)
    assert ds.stats["n_truncated"] == 0 and ds.stats["n_dropped"] == 0
    assert ds.stats["n_train_rows"] == len(ds.train_rows) < 36
    json.dumps(ds.stats)
    eval_ids = {r["id"] for r in ds.eval_records}
    assert ds.eval_records == [records[i] for i in sorted(eval_ids)]  # raw, file order
    assert eval_ids == set(split_heldout(40, 0.1, 5)[1].tolist())
    assert build_datasets(cfg, tok).eval_records == ds.eval_records  # deterministic by seed
    assert build_datasets(cfg.replace(seed=6), tok).eval_records != ds.eval_records
    train_text = "".join(tok.convert_ids_to_tokens(np.concatenate([r["input_ids"] for r in ds.train_rows]).tolist()))
    for i in range(40):
        assert (f"q{i}: a{i}</s>" in train_text) == (i not in eval_ids)
    assert sum(r["segment_ids"].max() for r in ds.eval_rows) == 4
    loss = sum(float(r["loss_mask"].sum()) for r in ds.train_rows)
    assert loss == ds.stats["n_loss_tokens"] == sum(len(f" a{i}") + 1 for i in range(40) if i not in eval_ids)
    padded = build_datasets(cfg.replace(packing=False), tok)
    assert len(padded.train_rows) == 36


def test_build_datasets_truncates_and_uses_eval_file(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 50}, {"text": "short"}])
    held = write_jsonl(
        tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    )
    ds = build_datasets(DataConfig(train_file=train, eval_file=held, seq_len=20), tok)
    assert ds.stats["n_truncated"] == 1 and ds.stats["n_train"] == 2 and ds.stats["n_eval"] == 1
    assert ds.stats["eval_format"] == "messages" and len(ds.eval_rows) == 1
    assert max(int(r["segment_ids"].astype(bool).sum()) for r in ds.train_rows) <= 20


def _error(tmp_path, tok, lines, **cfg):
    path = tmp_path / "data.jsonl"
    if lines is not None:
        write_jsonl(path, lines)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(train_file=str(path), eval_fraction=0.0, **cfg), tok)
    message = str(e.value)
    assert "\n" not in message
    return message.replace(str(path), "data.jsonl")


def test_bad_inputs_give_one_clear_line(tmp_path, tok):
    ok = {"prompt": "a", "completion": "b"}
    assert _error(tmp_path, tok, None).startswith("data.jsonl: file not found; check the path")
    assert _error(tmp_path, tok, [ok, "", '{"prompt": "a" "completion": "b"}']) == (
        "data.jsonl:3: malformed JSON (Expecting ',' delimiter at column 16); fix the line or remove it"
    )
    assert _error(tmp_path, tok, [ok, "[1, 2]"]).startswith("data.jsonl:2: record is a JSON array, expected an object")
    assert _error(tmp_path, tok, [ok, {"prompt": "a"}]).startswith(
        "data.jsonl:2: record has 'prompt' but no 'completion'"
    )
    assert _error(tmp_path, tok, ["", "  "]).startswith(
        "data.jsonl: no records (empty file or only blank lines); add one JSON object per line"
    )
    assert _error(tmp_path, tok, [ok, ok, {"text": "c"}]) == (
        "data.jsonl:3: record is in 'text' format but line 1 is 'prompt_completion'; every record "
        "of a file must use one format"
    )
    assert _error(tmp_path, tok, [ok, {"prompt": "p" * 30, "completion": "c"}], seq_len=16, overlong="error") == (
        "data.jsonl:2: record is 33 tokens, longer than seq_len=16; raise data.seq_len, shorten "
        "the record, or set data.overlong=truncate"
    )
    assert _error(tmp_path, tok, [{"prompt": "p" * 30, "completion": "c"}], seq_len=16).startswith(
        "data.jsonl: no training record has a loss token within seq_len=16"
    )
    with pytest.raises(DataError, match=r"1 record\(s\) is too few to hold out eval_fraction=0.05"):
        build_datasets(DataConfig(train_file=write_jsonl(tmp_path / "one.jsonl", [ok])), tok)
    with pytest.raises(ConfigError, match="data.train_file is not set"):
        build_datasets(DataConfig(), tok)
    assert read_jsonl(write_jsonl(tmp_path / "r.jsonl", [ok, "", ok])) == [ok, ok]


def test_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        read_jsonl(path)
