"""LoRA dropout at PEFT's place, the adapter's input: `dropout(x) @ A`, drawn cheaply and never stored.

PEFT draws an independent mask over the input of every adapted projection, so a step draws one
mask element per input element of seven projections per layer: the mask's cost is a visible part
of a training step, which is why its bits and its backward pass are hand-made here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.lora.dropout_mask import dropout_keep_mask, keep_bits, unpack_keep

__all__ = ["keep_bits", "unpack_keep", "dropout_keep_mask", "dropped", "dropout_project", "dropout_project_xla"]


def _mm(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _mm_t(a, b):
    """`a @ b.T` over the last axes: `[..., n] x [m, n] -> [..., m]`."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())))


def _over_tokens(a, b):
    """`a^T b` summed over every leading (token) axis: `[..., m] x [..., n] -> [m, n]`."""
    lead = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())))


def dropped(x, key, rate):
    keep, keep_p = dropout_keep_mask(key, rate, x.shape)
    return keep, keep_p.astype(x.dtype)


def _apply(x, bits, keep_p):
    return jnp.where(unpack_keep(bits, x.shape), x / keep_p, 0).astype(x.dtype)


def dropout_project(x, a, key, rate):
    """`dropout(x) @ a`, the adapter's first product under LoRA dropout, for `x [..., in]`,
    `a [in, r]` and `rate` a number or a traced scalar. On one GPU, for shapes the kernels take
    (`dropout_kernel.fits`), it runs the fused Pallas kernels of lora_jax/lora/dropout_kernel.py,
    which draw the mask where they read x and never write a dropped copy; elsewhere it runs
    `dropout_project_xla`. Both draw `keep_bits`'s mask, so they train the same adapter.
    Over several devices the XLA path runs: a Pallas call is opaque to XLA's sharding
    propagation, which would gather x around it."""
    if jax.default_backend() == "gpu" and jax.device_count() == 1:
        import lora_jax.lora.dropout_kernel as dropout_kernel  # Pallas is loaded only where it runs

        if dropout_kernel.fits(x.shape, a.shape, x.dtype) and a.dtype == x.dtype:
            return dropout_kernel.dropout_project_fused(x, a, key, rate)
    return dropout_project_xla(x, a, key, rate)


@jax.custom_vjp
def dropout_project_xla(x, a, key, rate):
    """`dropout(x) @ a` in XLA (any platform, any shape: the CPU path and the kernels' oracle). For
    the backward pass it keeps the mask as packed bits (1 bit per element) beside x, which the
    frozen matmul keeps anyway: autodiff would keep a dropped copy of x and a bool mask per adapted
    projection (17x the bits), and drawing the mask again would double its cost."""
    return _dropout_project_fwd(x, a, key, rate)[0]


def _dropout_project_fwd(x, a, key, rate):
    bits, keep_p = keep_bits(key, rate, x.size)
    keep_p = keep_p.astype(x.dtype)
    return _mm(_apply(x, bits, keep_p), a), (x, a, bits, keep_p, rate)


def _dropout_project_bwd(res, g):
    x, a, bits, keep_p, rate = res
    # Nothing here depends on the incoming gradient but the products, so XLA could unpack every
    # layer's mask and dropped input at the start of the backward pass and keep them all: tying
    # the bits to the gradient makes them unpacked when this projection's gradient is due.
    bits, g = jax.lax.optimization_barrier((bits, g))
    keep = unpack_keep(bits, x.shape)
    xd = jnp.where(keep, x / keep_p, 0).astype(x.dtype)
    dx = jnp.where(keep, _mm_t(g, a) / keep_p, 0).astype(x.dtype)
    return dx, _over_tokens(xd, g).astype(a.dtype), None, jnp.zeros_like(rate)


dropout_project_xla.defvjp(_dropout_project_fwd, _dropout_project_bwd)
