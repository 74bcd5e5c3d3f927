"""Self-describing Orbax checkpoints of a run.

Each step directory holds the train state (adapters, `modules_to_save`, optimizer state, step, rng)
and a JSON item with the data-loader state, every config and a fingerprint of the base weights, so
resume and export need nothing re-typed and an adapter is never applied to the wrong base. Orbax
writes into a temporary directory and renames it when complete, so a crash during a save leaves
the previous checkpoint intact (an unfinished one is invisible to `latest_step`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.errors import CheckpointFormatError

__all__ = ["Checkpointer", "base_fingerprint"]


@jax.jit
def _leaf_stats(leaves):
    def stats(v):
        v = v.astype(jnp.float32)
        weights = jnp.arange(1, v.size + 1, dtype=jnp.float32).reshape(v.shape) / v.size
        return jnp.stack([jnp.sum(jnp.abs(v)), jnp.sum(v * v), jnp.sum(v * weights)])

    return [stats(v) for v in leaves]


def base_fingerprint(params) -> str:
    """A hash of the base weights' paths, shapes, dtypes and three reductions per leaf (abs sum,
    square sum, position-weighted sum): cheap on device, replicated on every host, and different
    for any other base a user could plausibly point at (a permutation changes the weighted sum)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    stats = jax.device_get(_leaf_stats([v for _, v in leaves]))
    h = hashlib.sha256()
    for (path, v), s in zip(leaves, stats):
        h.update(f"{jax.tree_util.keystr(path)}|{v.shape}|{v.dtype}|".encode())
        # 5 significant digits: stable across mesh shapes (reduction order), not across bases
        h.update("|".join(f"{float(x):.5e}" for x in np.asarray(s)).encode())
    return h.hexdigest()[:16]


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the run's two items: `state` and `meta`."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int | None, abstract_state: Any):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointFormatError(f"no checkpoint for step {step} in {self.directory}; "
                                        f"available: {self.all_steps()}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointFormatError(f"no checkpoint for step {step} in {self.directory}; "
                                        f"available: {self.all_steps()}")
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        if os.path.isfile(path):  # read the JSON item without building the state
            with open(path) as f:
                return step, json.load(f)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return step, out.meta

    def restore_raw_state(self, step: int):
        """The state tree as saved, without a target structure (for export)."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return out.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
