"""`build_datasets`: JSONL files -> training rows, eval rows and the raw held-out records.

Order matters and is fixed here: read -> detect format -> split held-out -> tokenize -> cut or
refuse over-long -> pack or pad. The split comes before packing so that no held-out record shares
a row (or a loss) with training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from lora_jax.data.config import DataConfig
from lora_jax.data.formats import detect_file_format, read_jsonl_lines
from lora_jax.data.pack import Example, pack_examples, pad_examples, truncate_examples
from lora_jax.data.tokenize import special_prefix, tokenize_record
from lora_jax.errors import ConfigError, DataError

__all__ = ["Datasets", "build_datasets", "split_heldout", "has_content"]


class Datasets(NamedTuple):
    """What training needs from the data.

    train_rows / eval_rows: packed or padded rows (`lora_jax.data.pack`), eval_rows for eval loss.
    eval_records: the raw held-out records (dicts as in the file), e.g. for generation evals.
    stats: JSON-friendly counts: n_records (in train_file), n_train, n_eval (records), n_truncated
        (train + eval), n_dropped (records with no loss token left, skipped), n_empty (training
        records with nothing to learn but eos: `has_content`; kept), n_tokens and
        n_loss_tokens (train), n_train_rows, n_eval_rows, fill (fraction of train row slots that
        hold a token), format, eval_format.
    """

    train_rows: list[dict[str, np.ndarray]]
    eval_rows: list[dict[str, np.ndarray]]
    eval_records: list[dict]
    stats: dict[str, Any]


def split_heldout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, eval_indices)``, each sorted (file order), eval a seeded random
    ``round(n * fraction)`` records (at least one when ``fraction > 0``)."""
    if fraction <= 0:
        return np.arange(n), np.arange(0)
    n_eval = max(1, int(round(n * fraction)))
    chosen = np.random.default_rng(seed).permutation(n)[:n_eval]
    is_eval = np.zeros(n, dtype=bool)
    is_eval[chosen] = True
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def build_datasets(cfg: DataConfig, tokenizer) -> Datasets:
    """Read, check, split, tokenize and pack ``cfg.train_file`` (and ``cfg.eval_file``)."""
    if not cfg.train_file:
        raise ConfigError(
            "data.train_file is not set; point it at a JSONL file of "
            '{"text"}, {"prompt", "completion"} or {"messages"} records'
        )
    train = read_jsonl_lines(cfg.train_file, cfg.max_record_bytes)
    fmt = detect_file_format(train, cfg.train_file)
    train_where = [f"{cfg.train_file}:{line}" for line, _ in train]
    train_records = [record for _, record in train]
    if cfg.eval_file:
        held = read_jsonl_lines(cfg.eval_file, cfg.max_record_bytes)
        eval_fmt = detect_file_format(held, cfg.eval_file)
        eval_where = [f"{cfg.eval_file}:{line}" for line, _ in held]
        eval_records = [record for _, record in held]
    else:
        eval_fmt = fmt
        train_idx, eval_idx = split_heldout(len(train), cfg.eval_fraction, cfg.seed)
        if len(train_idx) == 0:
            raise DataError(
                f"{cfg.train_file}: {len(train)} record(s) is too few to hold out "
                f"eval_fraction={cfg.eval_fraction} and still train; add records, set "
                "data.eval_fraction=0, or give data.eval_file"
            )
        eval_where = [train_where[i] for i in eval_idx]
        eval_records = [train_records[i] for i in eval_idx]
        train_where = [train_where[i] for i in train_idx]
        train_records = [train_records[i] for i in train_idx]

    n_empty = sum(not has_content(r, fmt, cfg.completion_only_loss) for r in train_records)
    if n_empty == len(train_records):
        raise DataError(_all_empty(cfg, fmt, len(train_records)))
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no eos_token, so data.add_eos cannot append one; set "
            "data.add_eos=false or use a tokenizer that defines eos"
        )
    prefix = special_prefix(tokenizer)
    train_ex, n_cut_train, n_drop_train = _examples(train_records, train_where, fmt, tokenizer, cfg, prefix)
    eval_ex, n_cut_eval, n_drop_eval = _examples(eval_records, eval_where, eval_fmt, tokenizer, cfg, prefix)
    if not train_ex:
        raise DataError(
            f"{cfg.train_file}: no training record has a loss token within seq_len={cfg.seq_len} "
            "(prompts too long, or no assistant turn); raise seq_len or check the records"
        )
    rows_of = pack_examples if cfg.packing else pad_examples
    train_rows = rows_of(train_ex, cfg.seq_len)
    eval_rows = rows_of(eval_ex, cfg.seq_len)
    n_tokens = int(sum(len(ids) for ids, _ in train_ex))
    stats = {
        "format": fmt,
        "eval_format": eval_fmt if eval_records else None,
        "n_records": len(train),
        "n_train": len(train_records),
        "n_eval": len(eval_records),
        "n_truncated": n_cut_train + n_cut_eval,
        "n_dropped": n_drop_train + n_drop_eval,
        "n_empty": n_empty,
        "n_tokens": n_tokens,
        "n_loss_tokens": int(sum(float(row["loss_mask"].sum()) for row in train_rows)),
        "n_train_rows": len(train_rows),
        "n_eval_rows": len(eval_rows),
        "fill": n_tokens / (len(train_rows) * cfg.seq_len),
    }
    return Datasets(train_rows, eval_rows, eval_records, stats)


def has_content(record: dict, fmt: str, completion_only: bool = True) -> bool:
    """Whether a (format-checked) record has any non-blank text the loss is taken on: its text; its
    completion (with `completion_only`, else prompt or completion); an assistant message's content
    (with `completion_only`, else any message's). A record without any learns nothing but eos."""
    if fmt == "text":
        return bool(record["text"].strip())
    if fmt == "prompt_completion":
        return bool(record["completion"].strip() or (not completion_only and record["prompt"].strip()))
    return any(m["content"].strip() for m in record["messages"] if not completion_only or m["role"] == "assistant")


def _all_empty(cfg: DataConfig, fmt: str, n: int) -> str:
    what = {
        "text": "every 'text' is empty or blank",
        "prompt_completion": (
            "every 'completion' is empty or blank"
            if cfg.completion_only_loss
            else "every 'prompt' and 'completion' is empty or blank"
        ),
        "messages": (
            "no assistant message has content"
            if cfg.completion_only_loss
            else "every message's 'content' is empty or blank"
        ),
    }[fmt]
    return (
        f"{cfg.train_file}: no trainable tokens: {what} in all {n} training record(s), so only eos "
        "would be learned; fill in the records (check the field names and the file written)"
    )


def _examples(
    records: Sequence[dict], where: Sequence[str], fmt: str, tokenizer, cfg: DataConfig, prefix: Sequence[int]
) -> tuple[list[Example], int, int]:
    """Tokenized examples that keep at least one loss target, the number cut, the number dropped.

    A record whose loss tokens all fall past ``seq_len`` (or at position 0, which nothing
    predicts) would add only padding work, so it is dropped and counted rather than packed.
    """
    examples = []
    for record, at in zip(records, where):
        ids, mask = tokenize_record(
            record, fmt, tokenizer, cfg.completion_only_loss, cfg.add_eos, where=at, bos_prefix=prefix
        )
        if len(ids) > cfg.seq_len and cfg.overlong == "error":
            raise DataError(
                f"{at}: record is {len(ids)} tokens, longer than "
                f"seq_len={cfg.seq_len}; raise data.seq_len, shorten the record, or "
                "set data.overlong=truncate"
            )
        examples.append((ids, mask))
    examples, n_truncated = truncate_examples(examples, cfg.seq_len)
    kept = [(ids, mask) for ids, mask in examples if mask[1:].any()]
    return kept, n_truncated, len(examples) - len(kept)
