"""The pure, jitted train and eval steps.

Gradients are taken with respect to the trainable subtree only (adapters and `modules_to_save`);
the frozen base is an argument, not a closure constant, so it is never baked into the program.
Gradient accumulation sums token-weighted losses over micro-batches, so the result equals one big
batch exactly (up to summation order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.intercept import apply
from lora_jax.lora.optim import make_optimizer
from lora_jax.lora.tree import combine
from lora_jax.models.registry import FamilyConfig
from lora_jax.run_config import OptimConfig
from lora_jax.sharding import batch_sharding, tree_shardings
from lora_jax.train.loss import chunked_cross_entropy, head_weight

__all__ = [
    "TrainState",
    "make_schedule",
    "make_tx",
    "train_step",
    "make_train_step",
    "eval_step",
    "make_eval_step",
    "init_state",
    "shard_state",
    "StepShardings",
]


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    trainable: Any  # {"params": modules_to_save, "lora": a, b, m}
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoints as a plain array)


def make_schedule(ocfg: OptimConfig, total_steps: int) -> Callable:
    """`schedule(count)`: the learning rate of optimizer update `count` (0 for the first), as
    transformers' LambdaLR gives it. A linear warmup from 0 over `warmup_steps` updates, then
    `cosine` (`get_cosine_schedule_with_warmup`; with `min_lr_ratio`, `get_scheduler(
    "cosine_with_min_lr", min_lr_rate=min_lr_ratio)`), `linear` (`get_linear_schedule_with_warmup`;
    its floor `min_lr_ratio` as in the linear decay of `get_wsd_schedule`) or `constant`
    (`get_constant_schedule_with_warmup`) to `total_steps`. A warmup longer than the run stays as
    long (the rate never reaches `lr`) unless `ocfg.truncate_warmup` ends it within the run."""
    warmup = ocfg.warmup_steps
    if ocfg.truncate_warmup:
        warmup = min(warmup, max(total_steps - 1, 0))
    end = ocfg.lr * ocfg.min_lr_ratio
    if ocfg.schedule == "constant":
        decay = optax.constant_schedule(ocfg.lr)
    elif ocfg.schedule == "linear":
        decay = optax.linear_schedule(ocfg.lr, end, max(total_steps - warmup, 1))
    else:
        decay = optax.cosine_decay_schedule(ocfg.lr, max(total_steps - warmup, 1), alpha=ocfg.min_lr_ratio)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, ocfg.lr, warmup), decay], [warmup])


def make_tx(lcfg: LoraConfig, ocfg: OptimConfig, schedule) -> optax.GradientTransformation:
    return make_optimizer(
        lcfg, schedule, weight_decay=ocfg.weight_decay, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, clip_norm=ocfg.clip_norm
    )


def init_state(trainable, tx, seed: int) -> TrainState:
    return TrainState(
        jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.key_data(jax.random.key(seed))
    )


class StepShardings(NamedTuple):
    """Explicit shardings of the step's inputs and outputs on one mesh."""

    state: Any
    frozen: Any
    batch: Any  # one NamedSharding for every [batch, seq] array
    replicated: Any

    def step_jit_kwargs(self) -> dict:
        return {"in_shardings": (self.state, self.frozen, self.batch), "out_shardings": (self.state, self.replicated)}

    def put_batch(self, batch):
        """Host batch -> global array sharded over ("data", "fsdp"); each process passes its slice."""
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch, x), batch)


def shard_state(state: TrainState, frozen, mesh, rules) -> tuple[TrainState, Any, StepShardings]:
    """Place state and frozen base by the logical-axis rules (optimizer moments follow their
    adapters, since their paths end like the adapter's); returns them with the step's shardings."""
    from jax.sharding import NamedSharding, PartitionSpec

    state_sh, frozen_sh = tree_shardings(state, mesh, rules), tree_shardings(frozen, mesh, rules)
    shardings = StepShardings(state_sh, frozen_sh, batch_sharding(mesh, 2, rules), NamedSharding(mesh, PartitionSpec()))
    return jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh), shardings


def _loss_sum(
    model,
    cfg: FamilyConfig,
    lcfg: LoraConfig,
    chunk_tokens: int,
    use_segments: bool,
    trainable,
    frozen,
    batch,
    rng,
    deterministic: bool,
    dropout_rate=None,
):
    params, lora = combine(trainable, frozen)
    hidden = apply(
        model,
        params,
        lora,
        lcfg,
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"] if use_segments else None,
        return_hidden=True,
        rngs={"dropout": rng},
        deterministic=deterministic,
        dropout_rate=dropout_rate,
    )
    weight, vocab_axis = head_weight(params, cfg)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma's; the other families have none
    return chunked_cross_entropy(
        hidden, weight, vocab_axis, batch["targets"], batch["loss_mask"], chunk_tokens, softcap
    )


def train_step(
    state: TrainState,
    frozen,
    batch,
    *,
    model,
    cfg: FamilyConfig,
    lcfg: LoraConfig,
    tx,
    schedule,
    grad_accum: int = 1,
    chunk_tokens: int = 8192,
    use_segments: bool = True,
    dropout_rate=None,
):
    """One optimizer step, un-jitted: `(state, metrics)`. `make_train_step` jits it; a sweep vmaps
    it with `tx`, `schedule` and `dropout_rate` built from each adapter's traced values."""

    def loss_and_grad(trainable, batch, rng):
        def f(tr):
            return _loss_sum(model, cfg, lcfg, chunk_tokens, use_segments, tr, frozen, batch, rng, False, dropout_rate)

        (total, n), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        return total, n, grads

    key = jax.random.wrap_key_data(state.rng)
    key, step_key = jax.random.split(key)
    if grad_accum == 1:
        total, n, grads = loss_and_grad(state.trainable, batch, step_key)
    else:
        micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)

        def body(carry, xs):
            mb, i = xs
            t, c, g = loss_and_grad(state.trainable, mb, jax.random.fold_in(step_key, i))
            acc_t, acc_n, acc_g = carry
            return (acc_t + t, acc_n + c, jax.tree.map(jnp.add, acc_g, g)), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (total, n, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": total / denom,
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "tokens": n,
    }
    return TrainState(state.step + 1, trainable, opt_state, jax.random.key_data(key)), metrics


def make_train_step(
    model,
    cfg: FamilyConfig,
    lcfg: LoraConfig,
    tx,
    schedule,
    *,
    grad_accum: int = 1,
    chunk_tokens: int = 8192,
    use_segments: bool = True,
    jit_kwargs: dict | None = None,
):
    """`step(state, frozen, batch) -> (state, metrics)`: `train_step`, jitted with the state donated."""
    step = functools.partial(
        train_step,
        model=model,
        cfg=cfg,
        lcfg=lcfg,
        tx=tx,
        schedule=schedule,
        grad_accum=grad_accum,
        chunk_tokens=chunk_tokens,
        use_segments=use_segments,
    )
    return jax.jit(step, donate_argnums=(0,), **(jit_kwargs or {}))


def eval_step(
    trainable,
    frozen,
    batch,
    *,
    model,
    cfg: FamilyConfig,
    lcfg: LoraConfig,
    chunk_tokens: int = 8192,
    use_segments: bool = True,
):
    """`(loss sum, token count)` of one batch, deterministic and un-jitted (see `train_step`)."""
    return _loss_sum(model, cfg, lcfg, chunk_tokens, use_segments, trainable, frozen, batch, jax.random.key(0), True)


def make_eval_step(model, cfg: FamilyConfig, lcfg: LoraConfig, *, chunk_tokens: int = 8192, use_segments: bool = True):
    """`eval_step(trainable, frozen, batch) -> (loss sum, token count)`, jitted."""
    return jax.jit(
        functools.partial(
            eval_step, model=model, cfg=cfg, lcfg=lcfg, chunk_tokens=chunk_tokens, use_segments=use_segments
        )
    )
