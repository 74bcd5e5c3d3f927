"""Optimizers over the trainable/frozen split, composed from optax transforms.

Freezing is "label + set_to_zero" (no optimizer state for frozen leaves); LoRA+ is one more label
(`b` gets `loraplus_lr_ratio` times the learning rate). The label function reads leaf paths, so the
same optimizer works on the trainable subtree the train step differentiates, or on a whole
`{"params", "lora"}` tree.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from lora_jax.config import LoraConfig

__all__ = ["lora_labels", "make_optimizer"]

Schedule = Callable[[int], float] | float


def _label(path, lcfg: LoraConfig) -> str:
    names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    leaf = names[-1]
    if "lora" in names[:1] or leaf in ("a", "b", "m", "scale") and "params" not in names[:1]:
        if leaf == "scale":
            return "freeze"
        if leaf == "b" and lcfg.loraplus_lr_ratio:
            return "train_b"
        return "train"
    return "train" if any(m in names for m in lcfg.modules_to_save) else "freeze"


def lora_labels(tree, lcfg: LoraConfig):
    """'train' / 'train_b' (LoRA+) / 'freeze' for every leaf of a params/lora tree."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _label(p, lcfg), tree)


def make_optimizer(lcfg: LoraConfig, learning_rate: Schedule, *, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW on trainable leaves, `set_to_zero` on frozen ones, optional global-norm clipping."""
    def adamw(lr):
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    transforms = {"train": adamw(learning_rate), "freeze": optax.set_to_zero()}
    if lcfg.loraplus_lr_ratio:
        ratio = lcfg.loraplus_lr_ratio
        lr_b = (lambda step: ratio * learning_rate(step)) if callable(learning_rate) else ratio * learning_rate
        transforms["train_b"] = adamw(lr_b)
    tx = optax.partition(transforms, lambda tree: lora_labels(tree, lcfg))
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx
