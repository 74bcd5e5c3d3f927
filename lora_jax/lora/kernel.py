"""`lora_dense`: the adapted projection, without ever forming W + s*A@B.

    y = x @ W + s * dropout(x) @ A @ B                                   (LoRA)
    y = f * (x @ W) + f * s * dropout(x) @ A @ B,  f = m / ||W + s*A@B||  (DoRA, norm detached)

The DoRA column norm is expanded so that no `[in, out]` array is derived from A and B:
    ||W_j + s (AB)_j||^2 = ||W_j||^2 + 2s <A^T W, B>_j + s^2 <(A^T A) B, B>_j
which costs two rank-r products instead of a full-size weight.

For a projection at least twice as wide out as in (Llama's gate/up), LoRA rides inside the frozen
matmul, `[x | x A] @ [W ; s B]`, with a hand-written VJP (`_joint_matmul`): no second
[tokens, out] array forward, and one matmul gives both `dy W^T` and `dy (sB)^T` backward.
Its `[x | x A]` and `[dy W^T | dy (sB)^T]` arrays cost a little peak memory at very long context
(8B, 131,072 tokens: ~1.4 GiB), so `fuse_wide=False` (`LlamaConfig.fuse_wide_adapters`) keeps
the separate form there.

A quantised kernel (`lora_jax.quant.QuantizedKernel`, QLoRA) is dequantised here, where it is used:
`quantized_matmul` forms the one `[in, out]` kernel in the compute dtype under `jax.checkpoint`, so
the backward pass dequantises it again instead of keeping it (inside `nn.scan` a kept copy would be
stacked over all layers). Gradients reach the activations and adapters, never the codes.
An FP8 kernel (`lora_jax.fp8.Fp8Kernel`) is not dequantised where the device has FP8 GEMMs: it runs
`fp8_matmul`, both of its GEMMs in FP8; elsewhere it is dequantised like the others.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lora_jax.fp8 import fp8_matmul, is_fp8, uses_fp8_gemm
from lora_jax.lora.dropout import dropout_project, dropped
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
    if is_fp8(kernel) and uses_fp8_gemm(kernel):
        return fp8_matmul(x, kernel)
    return quantized_matmul(x, kernel) if is_quantized(kernel) else _mm(x, kernel)


def dora_column_norm(kernel, a, b, scale):
    """||W + s*A@B|| per output column, from rank-r products only (fp32)."""
    w, a, b = (t.astype(jnp.float32) for t in (kernel, a, b))
    w_sq = jnp.sum(w * w, axis=0)
    cross = jnp.sum((a.T @ w) * b, axis=0)
    lora_sq = jnp.sum(((a.T @ a) @ b) * b, axis=0)
    return jnp.sqrt(jnp.maximum(w_sq + 2 * scale * cross + scale * scale * lora_sq, 0.0))


def _mm_t(a, b):
    """`a @ b.T` over the last axes: `[..., n] x [m, n] -> [..., m]`."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())))


def _over_tokens(a, b):
    """`a^T b` summed over every leading (token) axis: `[..., m] x [..., n] -> [m, n]`."""
    lead = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())))


def _widens(kernel) -> bool:
    """Whether the adapter pays to ride in the frozen matmul (see `_joint_matmul`): for projections
    at least twice as wide out as in (Llama's gate/up), whose [tokens, out] arrays dominate."""
    return kernel.shape[-1] >= 2 * kernel.shape[0]


@jax.custom_vjp
def _joint_matmul(x, u, kernel, sb):
    """`x @ W + u @ sB` (`u = dropout(x) @ A`) as one matmul over a concatenated contraction:
    `[x | u] @ [W ; sB]`.

    Separate, the adapter's product is a second [tokens, out] array that is written, read and
    (for the backward pass) kept beside the frozen one; joined, the frozen matmul's accumulator
    takes it, and in the backward pass the same joint weight gives `dy @ W^T` and the adapter's
    `dy @ sB^T` in one matmul. XLA does not make this rewrite itself, and autodiff of the joined
    form would compute the frozen weight's gradient: hence the hand-written VJP, which forms the
    kernel's gradient only when the kernel is being differentiated.
    """
    return _joint(x, u, kernel, sb)


def _joint(x, u, kernel, sb):
    return _mm(jnp.concatenate([x, u], axis=-1), jnp.concatenate([kernel, sb], axis=0))


def _joint_fwd(x, u, kernel, sb):
    # symbolic_zeros=True: each argument arrives as (value, perturbed)
    kernel_trains = kernel.perturbed
    x, u, kernel, sb = (p.value for p in (x, u, kernel, sb))
    return _joint(x, u, kernel, sb), (x, u, kernel, sb, kernel_trains)


def _joint_bwd(res, dy):
    x, u, kernel, sb, kernel_trains = res
    if isinstance(dy, SymbolicZero):
        return None, None, None, None
    d_joint = _mm_t(dy, jnp.concatenate([kernel, sb], axis=0))  # [..., in + r]
    n = kernel.shape[0]
    dx, du = d_joint[..., :n], d_joint[..., n:]  # dy @ W^T, dy @ sB^T
    d_kernel = _over_tokens(x, dy).astype(kernel.dtype) if kernel_trains else None
    return dx, du, d_kernel, _over_tokens(u, dy).astype(sb.dtype)


_joint_matmul.defvjp(_joint_fwd, _joint_bwd, symbolic_zeros=True)


def _row(v, ndim):
    return v.reshape((1,) * (ndim - 1) + v.shape)


@functools.partial(jax.jit, static_argnames=("fuse_wide",))
def lora_dense(x, kernel, a, b, scale, bias=None, magnitude=None, dropout_rng=None, dropout_rate=0.0, fuse_wide=True):
    """`x @ kernel (+ bias)` plus the low-rank update, in the dtype of `x`.

    x: [..., in]; kernel: [in, out]; a: [in, r]; b: [r, out]; scale: scalar (alpha/r or alpha/sqrt r);
    magnitude: [out] for DoRA; dropout_rng: a key when dropout is active (training), at
    `dropout_rate` (a number or a traced scalar: a sweep trains each adapter at its own rate).
    fuse_wide: run a wide projection's adapter inside the frozen matmul (`_joint_matmul`).

    Example:

    >>> import jax.numpy as jnp
    >>> import lora_jax as lj
    >>> x, kernel = jnp.ones((2, 3)), jnp.eye(3)
    >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 3))  # rank 1
    >>> lj.lora_dense(x, kernel, a, b, 0.5).tolist()  # x @ W + 0.5 * (x @ A) @ B = 1 + 0.5 * 3
    [[2.5, 2.5, 2.5], [2.5, 2.5, 2.5]]
    """
    dtype = x.dtype
    if not is_quantized(kernel):
        kernel = kernel.astype(dtype)
    s = jnp.asarray(scale, jnp.float32)
    if magnitude is None:
        if dropout_rng is not None:
            u = dropout_project(x, a.astype(dtype), dropout_rng, jnp.asarray(dropout_rate, jnp.float32))
        else:
            u = _mm(x, a.astype(dtype))
        # the scale goes on B ([r, out]) rather than on the product ([tokens, out]): no
        # output-sized multiply forward or backward
        sb = (s * b.astype(jnp.float32)).astype(dtype)
        if fuse_wide and not is_quantized(kernel) and _widens(kernel):
            y = _joint_matmul(x, u, kernel, sb)
        else:
            y = _base_mm(x, kernel) + _mm(u, sb)
    else:
        xd = x
        if dropout_rng is not None:
            keep, keep_p = dropped(x, dropout_rng, dropout_rate)
            xd = jnp.where(keep, x / keep_p, 0).astype(dtype)
        base = _base_mm(x, kernel)
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
