"""`lora_dense`: the adapted projection, without ever forming W + s*A@B.

    y = x @ W + s * dropout(x) @ A @ B                                   (LoRA)
    y = f * (x @ W) + f * s * dropout(x) @ A @ B,  f = m / ||W + s*A@B||  (DoRA, norm detached)

The DoRA column norm is expanded so that no `[in, out]` array is derived from A and B:
    ||W_j + s (AB)_j||^2 = ||W_j||^2 + 2s <A^T W, B>_j + s^2 <(A^T A) B, B>_j
which costs two rank-r products instead of a full-size weight.

A quantised kernel (`lora_jax.quant.QuantizedKernel`, QLoRA) is dequantised here, where it is used:
`quantized_matmul` forms the one `[in, out]` kernel in the compute dtype under `jax.checkpoint`, so
the backward pass dequantises it again instead of keeping it (inside `nn.scan` a kept copy would be
stacked over all layers). Gradients reach the activations and adapters, never the codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.quant import dequantize, is_quantized

__all__ = ["lora_dense", "dora_column_norm", "dense", "quantized_matmul"]


def _mm(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.checkpoint
def quantized_matmul(x, qkernel):
    """`x @ dequantize(qkernel)` in the dtype of x; the dequantised kernel is recomputed in the
    backward pass, never saved (the residuals are x and the codes)."""
    return _mm(x, dequantize(qkernel, x.dtype))


def _base_mm(x, kernel):
    return quantized_matmul(x, kernel) if is_quantized(kernel) else _mm(x, kernel)


def dora_column_norm(kernel, a, b, scale):
    """||W + s*A@B|| per output column, from rank-r products only (fp32)."""
    w, a, b = (t.astype(jnp.float32) for t in (kernel, a, b))
    w_sq = jnp.sum(w * w, axis=0)
    cross = jnp.sum((a.T @ w) * b, axis=0)
    lora_sq = jnp.sum(((a.T @ a) @ b) * b, axis=0)
    return jnp.sqrt(jnp.maximum(w_sq + 2 * scale * cross + scale * scale * lora_sq, 0.0))


def _row(v, ndim):
    return v.reshape((1,) * (ndim - 1) + v.shape)


@jax.jit
def lora_dense(x, kernel, a, b, scale, bias=None, magnitude=None, dropout_rng=None,
               dropout_rate=0.0):
    """`x @ kernel (+ bias)` plus the low-rank update, in the dtype of `x`.

    x: [..., in]; kernel: [in, out]; a: [in, r]; b: [r, out]; scale: scalar (alpha/r or alpha/sqrt r);
    magnitude: [out] for DoRA; dropout_rng: a key when dropout is active (training), at
    `dropout_rate` (a number or a traced scalar: a sweep trains each adapter at its own rate).
    """
    dtype = x.dtype
    if not is_quantized(kernel):
        kernel = kernel.astype(dtype)
    base = _base_mm(x, kernel)
    xd = x
    if dropout_rng is not None:
        keep_p = 1.0 - jnp.asarray(dropout_rate, jnp.float32)
        keep = jax.random.bernoulli(dropout_rng, keep_p, x.shape)
        xd = jnp.where(keep, x / keep_p.astype(dtype), 0).astype(dtype)
    s = jnp.asarray(scale, jnp.float32)
    if magnitude is None:
        # the scale goes on B ([r, out]) rather than on the product ([tokens, out]): no
        # output-sized multiply forward or backward, and the add can fuse into the matmul
        y = base + _mm(_mm(xd, a.astype(dtype)), (s * b.astype(jnp.float32)).astype(dtype))
    else:
        low_rank = _mm(_mm(xd, a.astype(dtype)), b.astype(dtype))
        w = dequantize(kernel, dtype) if is_quantized(kernel) else kernel
        norm = jax.lax.stop_gradient(dora_column_norm(w, a, b, s))
        factor = _row(jnp.where(s != 0, magnitude.astype(jnp.float32) / norm, 1.0), x.ndim)
        base_d = base if xd is x else _base_mm(xd, kernel)  # PEFT runs the dropped input through W too
        y = base + ((factor - 1) * base_d + factor * s * low_rank).astype(dtype)
    if bias is not None:
        y = y + _row(bias.astype(dtype), x.ndim)
    return y


@jax.jit
def dense(x, kernel, bias=None):
    """A projection without an adapter: `x @ kernel (+ bias)` in the dtype of x, for a quantised
    kernel as well (what the interceptor runs for an untargeted `nn.Dense` of a QLoRA base)."""
    y = _base_mm(x, kernel if is_quantized(kernel) else kernel.astype(x.dtype))
    if bias is not None:
        y = y + _row(bias.astype(x.dtype), x.ndim)
    return y
