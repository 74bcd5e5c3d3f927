"""Tokenized examples -> fixed-length rows the model trains on.

A row is a dict of numpy arrays of length ``seq_len``:

    input_ids   int32    tokens; 0 in padding
    targets     int32    the next token of the same document; 0 where there is none
    loss_mask   float32  1 where ``targets`` is a loss token of the same document
    segment_ids int32    1, 2, 3, ... per document in the row; 0 = padding
    positions   int32    0, 1, 2, ... restarting at each document (RoPE positions)

Targets are computed here, per document, rather than by shifting a row in the train step: a shift
across a packed row would train the last token of one document to predict the first of the next.
Documents are never split across rows; over-long ones are cut or refused before packing
(`truncate_examples`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lora_jax.errors import DataError

__all__ = [
    "ROW_KEYS",
    "ROW_DTYPES",
    "Example",
    "truncate_examples",
    "first_fit",
    "pack_examples",
    "pad_examples",
    "empty_row",
]

ROW_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
ROW_DTYPES = {
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}

Example = tuple[np.ndarray, np.ndarray]  # (ids int32 [n], loss_mask bool [n]) from tokenize_record


def truncate_examples(examples: Sequence[Example], seq_len: int) -> tuple[list[Example], int]:
    """Keep the first ``seq_len`` tokens of each example; also return how many were cut."""
    out, n_truncated = [], 0
    for ids, mask in examples:
        if len(ids) > seq_len:
            ids, mask, n_truncated = ids[:seq_len], mask[:seq_len], n_truncated + 1
        out.append((ids, mask))
    return out, n_truncated


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices: each example, in order, goes to the first bin it fits in.

    A max-segment-tree over bins' free space finds that bin in O(log n) (a linear scan of open
    bins is quadratic: minutes for a million examples). Unopened bins have full capacity, so the
    leftmost bin with room is either an open one or the next new one, as first-fit requires.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [0] * size + [capacity] * size  # tree[1] is the root; leaves at size..2*size-1
    for node in range(size - 1, 0, -1):
        free[node] = capacity
    bins: list[list[int]] = []
    for index, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise DataError(
                f"example {index} has {length} tokens; each must have 1..seq_len="
                f"{capacity} (truncate over-long examples before packing)"
            )
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(index)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Several documents per row, greedy first-fit in the given order; documents are never split."""
    return _build_rows(examples, first_fit([len(ids) for ids, _ in examples], seq_len), seq_len)


def pad_examples(examples: Sequence[Example], seq_len: int) -> list[dict[str, np.ndarray]]:
    """One document per row, padded to ``seq_len``."""
    for index, (ids, _) in enumerate(examples):
        if not 0 < len(ids) <= seq_len:
            raise DataError(
                f"example {index} has {len(ids)} tokens; each must have 1..seq_len="
                f"{seq_len} (truncate over-long examples before padding)"
            )
    return _build_rows(examples, [[i] for i in range(len(examples))], seq_len)


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row (no loss): fills the last eval batch to full size."""
    return {k: np.zeros(seq_len, ROW_DTYPES[k]) for k in ROW_KEYS}


def _build_rows(examples: Sequence[Example], bins: list[list[int]], seq_len: int) -> list[dict[str, np.ndarray]]:
    # One contiguous [n_rows, seq_len] block per field; rows are views into it (cheap to hold
    # hundreds of thousands, and one allocation instead of five per row).
    block = {k: np.zeros((len(bins), seq_len), ROW_DTYPES[k]) for k in ROW_KEYS}
    for r, members in enumerate(bins):
        offset = 0
        for segment, index in enumerate(members, start=1):
            ids, mask = examples[index]
            n = len(ids)
            sl = slice(offset, offset + n)
            block["input_ids"][r, sl] = ids
            block["targets"][r, offset : offset + n - 1] = ids[1:]
            block["loss_mask"][r, offset : offset + n - 1] = mask[1:]
            block["segment_ids"][r, sl] = segment
            block["positions"][r, sl] = np.arange(n, dtype=np.int32)
            offset += n
    return [{k: block[k][r] for k in ROW_KEYS} for r in range(len(bins))]
