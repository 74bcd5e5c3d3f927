"""LoRA: targeting, the adapter tree (pure), lora_dense, interception and optimizers."""

from lora_jax.lora.intercept import apply, lora_interception
from lora_jax.lora.kernel import lora_dense
from lora_jax.lora.optim import lora_labels, make_optimizer
from lora_jax.lora.targets import Target, plan_targets
from lora_jax.lora.tree import (
    Split,
    combine,
    count_parameters,
    dora_weight_norms,
    init_lora,
    is_trainable,
    merge,
    print_trainable_parameters,
    split_trainable,
    targets_of,
    unmerge,
)

__all__ = [
    "apply",
    "lora_interception",
    "lora_dense",
    "lora_labels",
    "make_optimizer",
    "Target",
    "plan_targets",
    "Split",
    "combine",
    "count_parameters",
    "dora_weight_norms",
    "init_lora",
    "is_trainable",
    "merge",
    "print_trainable_parameters",
    "split_trainable",
    "targets_of",
    "unmerge",
]
