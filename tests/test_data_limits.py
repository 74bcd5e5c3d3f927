"""Bad input that is not malformed: a record too large to tokenize safely is refused by its raw size,
before parsing, with memory bounded by the limit and not by the file; a corpus with nothing to
train on (all records empty) is refused instead of training bos -> eos."""

import json
import tracemalloc

import pytest

from lora_jax.config import RunConfig
from lora_jax.data import DataConfig, build_datasets, read_jsonl_lines
from lora_jax.demo import DEMO_TRAIN
from lora_jax.errors import ConfigError, DataError
from tests.helpers import cli_error, write_jsonl

LIMIT = 64 * 1024
BIG = 5_000_000


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """Two ordinary records, one single-line record of ~5 MB on line 3, one more after it."""
    path = tmp_path_factory.mktemp("big") / "train.jsonl"
    ok = {"prompt": "2+2=", "completion": "4"}
    big = json.dumps({"prompt": "x" * BIG, "completion": "y"})
    write_jsonl(path, [ok, ok, big, ok])
    return str(path), len(big)


def test_huge_record_refused_with_bounded_memory(big_file, demo_tokenizer):
    path, size = big_file
    cfg = DataConfig(train_file=path, eval_fraction=0.0, max_record_bytes=LIMIT)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            build_datasets(cfg, demo_tokenizer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        f"{path}:3: record is {size} bytes (4.8 MiB), over data.max_record_bytes={LIMIT} (64.0 KiB)"
    ), message
    assert "split it" in message and "--set data.max_record_bytes=8388608" in message
    assert peak < 3 * LIMIT + 256 * 1024, f"peak {peak} bytes while refusing a {size}-byte record"


def test_limit_is_on_the_line_bytes(tmp_path):
    line = json.dumps({"text": "a" * 100})
    n = len(line.encode())
    path = tmp_path / "t.jsonl"
    path.write_bytes(f"{line}\r\n{line}".encode())  # CRLF, and no newline at the end
    assert len(read_jsonl_lines(path, n)) == 2
    with pytest.raises(DataError, match=rf"t.jsonl:1: record is {n} bytes .* over data.max_record_bytes={n - 1} "):
        read_jsonl_lines(path, n - 1)
    path.write_bytes(f'{{"text": "a"}}\n\n{line}'.encode())
    with pytest.raises(DataError, match=rf"t.jsonl:3: record is {n} bytes"):
        read_jsonl_lines(path, n - 1)
    assert len(read_jsonl_lines(path, None)) == 2  # no limit: everything is read


def test_default_limit_keeps_the_demo_data(demo_tokenizer):
    cfg = DataConfig(train_file=DEMO_TRAIN, eval_fraction=0.0)
    assert cfg.max_record_bytes == 2**20
    assert build_datasets(cfg, demo_tokenizer).stats["n_records"] > 0


@pytest.mark.parametrize("bad", [0, 1, -5, True, 1.5, "1MB", None])
def test_max_record_bytes_validated(bad):
    with pytest.raises(ConfigError, match=r"data\.max_record_bytes=.* must be an integer number of bytes"):
        DataConfig(max_record_bytes=bad)


def test_max_record_bytes_settable_and_cli_refusal_is_one_line(big_file, tmp_path, capsys):
    run = RunConfig().with_overrides([f"data.max_record_bytes={LIMIT}"])
    assert run.data.max_record_bytes == LIMIT
    out = tmp_path / "out"
    err = cli_error(
        capsys,
        [
            "train",
            "--output-dir",
            str(out),
            "--no-progress",
            "--data",
            big_file[0],
            "--set",
            f"data.max_record_bytes={LIMIT}",
        ],
    )
    assert f"{big_file[0]}:3: record is" in err and "max_record_bytes" in err
    assert not out.exists()


EMPTY = {
    "text": [{"text": ""}, {"text": "  \n"}, {"text": ""}],
    "prompt_completion": [{"prompt": "", "completion": ""}, {"prompt": "", "completion": " "}],
    "messages": [
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]},
    ],
}


@pytest.mark.parametrize("fmt", sorted(EMPTY))
@pytest.mark.parametrize("completion_only", [True, False])
def test_all_empty_corpus_refused(tmp_path, demo_tokenizer, fmt, completion_only):
    path = write_jsonl(tmp_path / "empty.jsonl", EMPTY[fmt])
    cfg = DataConfig(train_file=path, eval_fraction=0.0, completion_only_loss=completion_only)
    with pytest.raises(DataError) as e:
        build_datasets(cfg, demo_tokenizer)
    message = str(e.value)
    assert message.startswith(f"{path}: no trainable tokens: ") and "\n" not in message
    assert f"in all {len(EMPTY[fmt])} training record(s)" in message


def test_empty_completions_refused_when_only_completions_train(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "question", "completion": ""}] * 2)
    with pytest.raises(DataError, match="no trainable tokens: every 'completion' is empty"):
        build_datasets(DataConfig(train_file=path, eval_fraction=0.0), demo_tokenizer)
    # training on the prompts too, there is something to learn
    ds = build_datasets(DataConfig(train_file=path, eval_fraction=0.0, completion_only_loss=False), demo_tokenizer)
    assert ds.stats["n_empty"] == 0


def test_some_empty_records_are_kept_and_counted(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": ""}, {"text": "hello"}, {"text": " "}])
    ds = build_datasets(DataConfig(train_file=path, eval_fraction=0.0), demo_tokenizer)
    assert ds.stats["n_empty"] == 2 and ds.stats["n_train"] == 3
