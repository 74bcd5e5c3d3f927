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

__all__ = ["Checkpointer", "CheckpointMismatch", "base_fingerprint", "fingerprints_match"]


class CheckpointMismatch(CheckpointFormatError):
    """A checkpoint's saved state does not fit the state it is restored into (other adapter
    shapes or leaves: a different LoRA config). `differences` lists them, trainable leaves first."""

    def __init__(self, directory: str, step: int, differences: list[str]):
        self.directory, self.step, self.differences = directory, step, differences
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        super().__init__(
            f"checkpoint step {step} in {directory} does not fit the state being restored: {differences[0]}{more}"
        )

    def __reduce__(self):
        return type(self), (self.directory, self.step, self.differences)


@jax.jit
def _leaf_stats(leaves):
    def stats(v):
        a = jnp.abs(v.astype(jnp.float32))
        weights = jnp.arange(1, v.size + 1, dtype=jnp.float32).reshape(v.shape) / v.size
        return jnp.stack([jnp.sum(a), jnp.sum(a * a), jnp.sum(a * weights)])

    return [stats(v) for v in leaves]


def base_fingerprint(params) -> dict:
    """What identifies a base: each leaf's path, shape and dtype, and three sums of |w| (plain,
    squared, position-weighted, so a permutation shows). Sums of non-negative terms carry no
    cancellation, so they agree to ~1e-6 across mesh shapes and reduction orders; compare with
    `fingerprints_match`. Cheap on device and replicated on every host."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    stats = jax.device_get(_leaf_stats([v for _, v in leaves]))
    layout = [f"{jax.tree_util.keystr(path)}|{v.shape}|{v.dtype}" for path, v in leaves]
    return {
        "digest": hashlib.sha256("\n".join(layout).encode()).hexdigest()[:16],
        "stats": [[float(x) for x in np.asarray(s)] for s in stats],
    }


def fingerprints_match(a: dict, b: dict, rtol: float = 1e-4) -> bool:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    return (
        a["digest"] == b["digest"]
        and len(a["stats"]) == len(b["stats"])
        and bool(np.allclose(a["stats"], b["stats"], rtol=rtol, atol=0.0))
    )


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the run's two items: `state` and `meta`."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int | None, abstract_state: Any):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointFormatError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
            )
        # Compared before restoring: Orbax's own shape / structure errors run to pages, and its
        # read coroutines keep printing after the failure.
        differences = self.state_differences(step, abstract_state)
        if differences:
            raise CheckpointMismatch(self.directory, step, differences)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return out.state, out.meta

    def state_differences(self, step: int, target: Any) -> list[str]:
        """Where the state saved at `step` and `target` differ in leaves or shapes ([] when they
        fit), trainable leaves first, e.g. "trainable/lora/.../q_proj/a: (64, 16) saved, (64, 8) here"."""
        from etils import epath

        handler = ocp.StandardCheckpointHandler()
        try:
            saved = handler.metadata(epath.Path(self.directory) / str(step) / "state")
        except Exception:  # unreadable metadata: nothing to compare with
            return []
        finally:
            handler.close()
        have = {
            _path_name(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]
            if hasattr(v, "shape")
        }
        want = {
            _path_name(p): tuple(v.shape if hasattr(v, "shape") else np.shape(v))
            for p, v in jax.tree_util.tree_flatten_with_path(target)[0]
        }
        out = []
        for name in sorted(have.keys() | want.keys(), key=lambda n: (not n.startswith("trainable"), n)):
            if name not in want:
                out.append(f"{name}: saved {have[name]}, absent here")
            elif name not in have:
                out.append(f"{name}: {want[name]} here, absent from the checkpoint")
            elif have[name] != want[name]:
                out.append(f"{name}: {have[name]} saved, {want[name]} here")
        return out

    def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise CheckpointFormatError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
            )
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


def _path_name(path) -> str:
    """A key path as "trainable/lora/layers/self_attn/q_proj/a", the same for a NamedTuple field
    (GetAttrKey) and the dict key Orbax's metadata gives it."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)
