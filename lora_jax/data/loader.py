"""Deterministic, resumable, process-sharded batches over packed rows.

Written by hand rather than with grain (it does not import grain at all). grain's
``MapDataset.shuffle(seed).repeat().batch(n)`` reshuffles per epoch, but it batches one endless
element stream, so batches straddle epochs and "epoch" / "position" are not part of its state (which
is an opaque ``{"next_index": k}``). Its process sharding (``ds[p::P]``) interleaves rows, while
``jax.make_array_from_process_local_data`` wants each process to hold a *contiguous* block of the
global batch. Getting both from grain takes a custom ``MapDataset`` that remaps indices, which is
this module's arithmetic plus a dependency. Here a batch is a pure function of
``(seed, epoch, position, process)``, so the state is three integers, is identical on every
process, and is independent of the process count (a run may resume on a different number of hosts).

The layout of a batch is that of a row (see `lora_jax.data.pack`) with a leading batch axis:
``input_ids``, ``targets``, ``segment_ids``, ``positions`` int32 and ``loss_mask`` float32, each
``[batch_size // process_count, seq_len]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from lora_jax.data.pack import ROW_KEYS, empty_row
from lora_jax.errors import ConfigError, DataError

__all__ = ["DataLoader", "batch_indices", "steps_per_epoch", "eval_batches"]

Row = Mapping[str, np.ndarray]


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    """Full global batches per epoch; the remainder is dropped (a different one each epoch, since
    the order is reshuffled) so every step has the same shape and compiles once."""
    return n_rows // batch_size


def batch_indices(
    n_rows: int, batch_size: int, seed: int, epoch: int, position: int, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """Row indices of this process's part of global batch ``position`` of ``epoch``.

    The epoch's order is a permutation drawn from ``(seed, epoch)``; global batch ``position`` is
    its slice ``[position * batch_size, (position + 1) * batch_size)`` and process ``p`` takes the
    ``p``-th contiguous ``batch_size // process_count`` of it.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    local = batch_size // process_count
    start = position * batch_size + process_index * local
    return order[start : start + local]


class DataLoader:
    """Endless batches (dicts of ``[local_batch, seq_len]`` numpy arrays) over ``rows``.

    ``batch_size`` is global; each of ``process_count`` processes gets a disjoint contiguous slice
    and together they form the batch a single process would get. `get_state` / `set_state` resume
    exactly: the next batch after ``set_state(s)`` is the one that followed when ``s`` was taken.
    """

    def __init__(self, rows: Sequence[Row], batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("process_count", process_count, 1),
            ("process_index", process_index, 0),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if process_index >= process_count:
            raise ConfigError(f"process_index={process_index} must be < process_count={process_count}")
        if batch_size % process_count:
            raise ConfigError(
                f"batch_size={batch_size} is the global batch and must divide by "
                f"process_count={process_count}; use a multiple of {process_count}"
            )
        if len(rows) < batch_size:
            raise DataError(
                f"{len(rows)} training row(s) is fewer than batch_size={batch_size}; lower the batch size or add data"
            )
        self._rows = rows
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        self._process_index = int(process_index)
        self._process_count = int(process_count)
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self._rows), self._batch_size)

    @property
    def local_batch_size(self) -> int:
        return self._batch_size // self._process_count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._order_epoch != self._epoch:  # one permutation per epoch, not per step
            self._order = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._rows))
            self._order_epoch = self._epoch
        start = self._position * self._batch_size + self._process_index * self.local_batch_size
        batch = _stack([self._rows[i] for i in self._order[start : start + self.local_batch_size]])
        self._position += 1
        if self._position == self.steps_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        return batch

    def get_state(self) -> dict[str, int]:
        """JSON-serialisable; the same on every process. ``position`` counts global batches into
        ``epoch``; ``n_rows`` and ``batch_size`` let `set_state` refuse a state of other data."""
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "n_rows": len(self._rows),
            "batch_size": self._batch_size,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume from `get_state`'s dict; its seed wins, so the continuation is exact."""
        missing = [k for k in ("seed", "epoch", "position") if k not in state]
        if missing:
            raise DataError(
                f"data loader state {dict(state)!r} lacks {missing}; pass the dict that DataLoader.get_state() returned"
            )
        for key, have in (("n_rows", len(self._rows)), ("batch_size", self._batch_size)):
            if key in state and int(state[key]) != have:
                raise DataError(
                    f"data loader state was saved with {key}={state[key]} but this loader has "
                    f"{key}={have}; resume with the same data, seq_len, packing and batch size"
                )
        seed, epoch, position = (int(state[k]) for k in ("seed", "epoch", "position"))
        if seed < 0 or epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise DataError(
                f"data loader state seed={seed}, epoch={epoch}, position={position} "
                f"is out of range (steps_per_epoch={self.steps_per_epoch})"
            )
        self._seed, self._epoch, self._position = seed, epoch, position
        self._order_epoch = -1


def eval_batches(
    rows: Sequence[Row], batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over ``rows`` in global batches of ``batch_size`` (this process's slice).

    The last batch is filled with all-padding rows (``loss_mask`` 0) rather than dropped, so eval
    loss covers every row with one compiled shape; average by summing the loss mask.
    """
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ConfigError(
            f"batch_size={batch_size} must divide by process_count={process_count} "
            f"and process_index={process_index} must be < process_count"
        )
    if not rows:
        return
    seq_len = len(rows[0]["input_ids"])
    local = batch_size // process_count
    for start in range(0, len(rows), batch_size):
        lo = start + process_index * local
        part = list(rows[lo : min(lo + local, len(rows))]) if lo < len(rows) else []
        yield _stack(part + [empty_row(seq_len)] * (local - len(part)))


def _stack(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    return {k: np.stack([row[k] for row in rows]) for k in ROW_KEYS}
