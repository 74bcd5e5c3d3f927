"""Optimizers over the trainable/frozen split, composed from optax transforms.

Freezing is "label + set_to_zero" (no optimizer state for frozen leaves); LoRA+ is one more label
(`b` gets `loraplus_lr_ratio` times the learning rate). The label function reads leaf paths, so the
same optimizer works on the trainable subtree the train step differentiates, or on a whole
`{"params", "lora"}` tree.

The result equals transformers + PEFT step for step (`tests/test_train_parity.py`): optax's AdamW
is torch's (bias-corrected moments, `eps` added to the bias-corrected root, decay decoupled and
scaled by the learning rate, on every trainable leaf); clipping is `torch.nn.utils.clip_grad_norm_`'s
rule; LoRA+ groups leaves as `peft.optimizers.create_loraplus_optimizer` does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.tree import is_adapter_leaf, is_trainable
from lora_jax.models.layout import LAYER_STACKS

__all__ = ["lora_labels", "make_optimizer", "clip_by_global_norm"]

Schedule = Callable[[int], float] | float


def _label(path, leaf_value, lcfg: LoraConfig) -> str:
    names = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
    if not is_trainable(names, lcfg):
        return "freeze"
    if is_adapter_leaf(names):
        # PEFT's LoRA+ puts lora_B and every 1-d trainable tensor (DoRA's magnitude) in group B
        return "train_b" if lcfg.loraplus_lr_ratio and names[-1] in ("b", "m") else "train"
    # a 1-d module tensor (a norm's scale) is in LoRA+'s group B too; a scanned layer adds an axis
    ndim = getattr(leaf_value, "ndim", 2) - any(n in LAYER_STACKS for n in names[:-1])
    return "train_b" if lcfg.loraplus_lr_ratio and ndim == 1 else "train"


def lora_labels(tree, lcfg: LoraConfig):
    """'train' / 'train_b' (LoRA+: `b`, DoRA's `m`, 1-d `modules_to_save` tensors) / 'freeze' for
    every leaf of a params/lora tree."""
    return jax.tree_util.tree_map_with_path(lambda p, v: _label(p, v, lcfg), tree)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale the updates by `min(1, max_norm / (norm + 1e-6))`, `torch.nn.utils.clip_grad_norm_`'s
    rule (optax's `clip_by_global_norm` omits the 1e-6)."""

    def update_fn(updates, state, params=None):
        del params
        coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    lcfg: LoraConfig,
    learning_rate: Schedule,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW on trainable leaves, `set_to_zero` on frozen ones, optional global-norm clipping
    before AdamW over the whole gradient tree given: the train step passes the trainable subtree,
    so the norm is that of the trainable gradients, as `clip_grad_norm_` on PEFT's parameters.

    Example, on a tiny random model in memory:

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> cfg = lj.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, scan_layers=False)
    >>> params = lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> lcfg = lj.LoraConfig(r=4, target_modules=("q_proj",), loraplus_lr_ratio=16)
    >>> lora = lj.init_lora(params, lcfg, jax.random.key(1))
    >>> tree = {"params": params, "lora": lora}
    >>> tx = lj.make_optimizer(lcfg, 1e-3)
    >>> state = tx.init(tree)
    >>> updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, tree), state, tree)
    >>> bool((updates["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"] == 0).all())  # frozen
    True
    >>> q = updates["lora"]["layers_0"]["self_attn"]["q_proj"]  # LoRA+: b's step is 16x a's
    >>> round(float(abs(q["b"]).max() / abs(q["a"]).max()))
    16
    """

    def adamw(lr):
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    transforms = {"train": adamw(learning_rate), "freeze": optax.set_to_zero()}
    if lcfg.loraplus_lr_ratio:
        ratio = lcfg.loraplus_lr_ratio
        lr_b = (lambda step: ratio * learning_rate(step)) if callable(learning_rate) else ratio * learning_rate
        transforms["train_b"] = adamw(lr_b)
    tx = optax.partition(transforms, lambda tree: lora_labels(tree, lcfg))
    if clip_norm:
        tx = optax.chain(clip_by_global_norm(clip_norm), tx)
    return tx
