"""Host-side stacking of K adapter trees on a leading axis, and back.

Configurations differ only in rank, so every leaf is zero-padded to the largest shape of the grid
before stacking; the padding is exact zeros that stay zero in training (see `lora_jax.sweep`).
Padding and stacking run in numpy, then one transfer per leaf: done on the device, each distinct
leaf shape would compile a small program of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.lora.tree import init_lora, split_trainable
from lora_jax.sweep.grid import ALLOWED_KEYS

__all__ = ["stack_trees", "unstack_tree", "init_stacked"]


def _shapes(trees) -> list[list[tuple]]:
    return [[tuple(x.shape) for x in jax.tree.leaves(t)] for t in trees]


def stack_trees(trees: Sequence[Any]):
    """Stack trees of equal structure on a new leading axis, zero-padding every leaf to the
    largest shape along each axis (only rank axes differ between LoRA configurations).
    Returns (stacked, shapes): shapes[k] lists tree k's leaf shapes, for `unstack_tree`."""
    return _stack_host(trees), _shapes(trees)


def unstack_tree(stacked, k: int, shapes: Sequence[Sequence[tuple]]):
    """Configuration k of a stacked tree, each leaf sliced back to its own (unpadded) shape."""
    leaves, treedef = jax.tree.flatten(stacked)
    own = shapes[k]
    return jax.tree.unflatten(treedef, [x[k][tuple(slice(0, d) for d in s)] for x, s in zip(leaves, own)])


def init_stacked(params, lcfgs: Sequence, seed: int):
    """The K adapters, each made by `init_lora(params, lcfg_k, key(seed))` and `split_trainable`
    exactly as its single run makes it, zero-padded and stacked on a leading axis. Configurations
    that differ only in dropout share one initialisation (dropout does not enter it).

    Returns (trainable, frozen_lora, shapes, base): base is the frozen part of `params` (shared by
    all K, not copied); shapes = {"trainable": ..., "frozen_lora": ...} for `unstack_tree`.
    """
    made: dict = {}
    trainables, frozen_loras = [], []
    for lc in lcfgs:
        key = lc.replace(lora_dropout=0.0)
        if key not in made:
            split = split_trainable(params, init_lora(params, lc, jax.random.key(seed)), lc)
            made[key] = jax.device_get((split.trainable, split.frozen["lora"]))
        trainables.append(made[key][0])
        frozen_loras.append(made[key][1])
    shapes = {"trainable": _shapes(trainables), "frozen_lora": _shapes(frozen_loras)}
    trainable = _stack_host(trainables)
    frozen_lora = _stack_host(frozen_loras)
    base = split_trainable(params, {}, lcfgs[0]).frozen["params"]
    return trainable, frozen_lora, shapes, base


def _stack_host(trees):
    """`stack_trees` on numpy arrays (host), then one transfer per leaf."""
    flat = [jax.tree.flatten(t) for t in trees]
    treedef = flat[0][1]
    if any(td != treedef for _, td in flat[1:]):
        raise ConfigError(
            "the configurations' adapter trees differ in structure (targets); a "
            "sweep can only vary " + ", ".join(ALLOWED_KEYS)
        )
    out = []
    for i in range(len(flat[0][0])):
        leaves = [np.asarray(f[0][i]) for f in flat]
        target = tuple(max(d) for d in zip(*(x.shape for x in leaves)))
        out.append(
            jnp.asarray(
                np.stack([np.pad(x, [(0, t - d) for d, t in zip(x.shape, target)]) if x.ndim else x for x in leaves])
            )
        )
    return treedef.unflatten(out)
