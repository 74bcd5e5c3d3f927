"""`DataConfig`: where the training data is and how it becomes fixed-length rows.

Validated at construction so a typo (``overlong="truncte"``, ``seq_len=0``) fails before any file
is read or tokenized, with the field name and the fix in the message.
"""

from __future__ import annotations

import dataclasses
import os

from lora_jax.errors import ConfigError

__all__ = ["DataConfig", "OVERLONG_POLICIES", "DEFAULT_MAX_RECORD_BYTES"]

OVERLONG_POLICIES = ("truncate", "error")

# Why 1 MiB: each line is checked against this before it is parsed or tokenized, because tokenizing
# takes hundreds of times the raw size in memory (a 50 MB line exhausted 24 GiB). 1 MiB of JSON is
# still far more tokens (~170k or more) than any seq_len keeps, so only a record that would mostly be
# truncated anyway is refused, and tokenizing the largest accepted one stays in the hundreds of MB.
DEFAULT_MAX_RECORD_BYTES = 2**20


def _is_int(value) -> bool:
    # bool is an int subclass; `seq_len=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How to read, tokenize, split and pack a JSONL dataset.

    train_file / eval_file: JSONL, one record per line, in one of the TRL formats
        ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages": [{"role", "content"}, ...]}``.
    eval_fraction: held out from ``train_file`` (by ``seed``, before packing, so no eval record
        leaks into a training row) when ``eval_file`` is not given; ignored when it is; 0 = no eval.
    seq_len: tokens per row; a record longer than this is handled by ``overlong``.
    packing: several records per row (attention stays within a record via ``segment_ids``);
        off = one record per row, padded.
    completion_only_loss: loss only on the completion / assistant tokens (and eos), not on the
        prompt, for prompt/completion and messages records; text records always train on all.
    overlong: "truncate" keeps the first ``seq_len`` tokens and counts it in the stats;
        "error" refuses, naming the file and line.
    seed: held-out split and (in the loader) the shuffle order.
    add_eos: append the tokenizer's eos to each record unless it already ends with it, so the
        model learns to stop.
    max_record_bytes: the largest record (one JSONL line, in bytes) that is read; a longer line is
        refused, naming its file and line, before it is parsed or tokenized, so memory stays bounded
        by this limit and not by the file. Raise it for genuinely long records, or split them.
    """

    train_file: str | None = None
    eval_file: str | None = None
    eval_fraction: float = 0.05
    seq_len: int = 512
    packing: bool = True
    completion_only_loss: bool = True
    overlong: str = "truncate"
    seed: int = 0
    add_eos: bool = True
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES

    def __post_init__(self):
        for name in ("train_file", "eval_file"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif not isinstance(value, str) or not value:
                raise ConfigError(f"data.{name}={value!r} must be a path to a JSONL file or null")
        frac = self.eval_fraction
        if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0.0 <= frac < 1.0:
            raise ConfigError(f"data.eval_fraction={frac!r} must be a number in [0, 1) (0 = no held-out eval)")
        object.__setattr__(self, "eval_fraction", float(frac))
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise ConfigError(
                f"data.seq_len={self.seq_len!r} must be an integer >= 2 (a row needs a token and its next-token target)"
            )
        for name in ("packing", "completion_only_loss", "add_eos"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"data.{name}={value!r} must be true or false")
        if self.overlong not in OVERLONG_POLICIES:
            raise ConfigError(f"data.overlong={self.overlong!r}; choose one of {OVERLONG_POLICIES}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"data.seed={self.seed!r} must be a non-negative integer")
        if not _is_int(self.max_record_bytes) or self.max_record_bytes < 2:
            raise ConfigError(
                f"data.max_record_bytes={self.max_record_bytes!r} must be an integer number "
                f"of bytes >= 2 (the longest JSONL line read), e.g. {DEFAULT_MAX_RECORD_BYTES} "
                "(1 MiB, the default)"
            )

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)
