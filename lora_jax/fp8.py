"""An FP8 frozen base: projection kernels in `float8_e4m3fn`, multiplied in FP8 on the tensor cores.

A projection kernel `[..., in, out]` becomes an `Fp8Kernel`:

    codes  float8_e4m3fn [..., out, in]   round-to-nearest-even of w / scale, saturated at +-448
    scale  float32       [..., out]       per output channel: absmax of the column / 448, in fp32

    w[i, j] ~= codes[j, i] * scale[j]

The codes are stored transposed (torch's `[out, in]`): cuBLASLt runs FP8 GEMMs only in its "TN"
form, both operands contracting along their minor (last) dimension. Stored so, the forward GEMM
`x[m, in] . codes[out, in]` runs as it is, with no copy; the input gradient contracts `out`, the
major axis of the codes, so XLA transposes the weight (a one-byte-per-element copy the size of one
layer's kernel) rather than an activation. The forward runs in training and in inference alike.

`fp8_matmul(x, kernel)` is `x @ w` in FP8 (`_fp8_fwd` / `_fp8_bwd`, a custom VJP):

    forward   x is scaled per row (per token) to e4m3: s_m = max_k |x[m, k]| / 448; the GEMM
              contracts the e4m3 codes of x and of the kernel, accumulating in fp32 on the tensor
              cores; then y = acc * s_m * scale_j, cast to x's dtype.
    backward  dx = dy @ w^T: the per-channel weight scale moves onto dy (g = dy * scale, fused
              into g's cast), g is scaled per row to `grad_dtype`, then one FP8 GEMM with the
              codes, and dx = acc * s_m. e4m3 by default: with a scale fitted to each row's amax,
              range is never short and e4m3's extra mantissa bit halves the error; e5m2 on request
              (`quantize_fp8(grad_dtype=...)`); `tests/test_fp8.py` measures both. No gradient
              reaches the codes or the scales: the base is frozen.

Both GEMMs write x's dtype (the tensor cores accumulate in fp32 whatever they write), so the
rescaling epilogue reads and writes bf16, not fp32. XLA's GEMM rewriter turns these dots of FP8
operands into cuBLASLt FP8 calls; the same product written as "dequantise, then dot" was turned
into an fp32 GEMM instead, hence the FP8 dtypes on the dot itself.

Scaling per row is current scaling that needs no state and can fuse: the amax is a reduction along
the same row that the cast then reads, the "row reduction, broadcast, elementwise" shape of a
normalisation, which XLA's GPU backend can fuse with the RMSNorm or activation that produced the
row (alone, in experiments/bench/fp8_check.py, it compiled to two passes: the reduction, then the
cast). A per-tensor amax must reduce the whole tensor before the first element can be cast;
delayed scaling (Transformer Engine's amax history) avoids that at the price of state threaded
through every call. Row and channel scales factor out of the contraction exactly, so they are
applied once, to the GEMM's output.

`quantize_fp8(scaling="tensor")` selects another recipe for x and dy (the weight's codes and
per-channel scales unchanged): one power-of-two scale per tensor (`quantize_tensor`), written as
`dot(convert(q) * scale, convert(codes))`, the pattern whose scalar scales XLA's GEMM rewriter
folds into the cuBLASLt FP8 call: no rescaling pass after the input-gradient GEMM, and only the
per-channel multiply after the forward one. The amax is then a reduction over the whole tensor;
rows far smaller than the largest keep fewer significant bits. `experiments/bench/fp8_check.py`
and `cli_bench.py --fp8-scaling` compare the two on the GPU; "row" stays the default.

Where the device has no FP8 GEMM (the CPU, NVIDIA GPUs before Ada/Hopper, TPUs), `fp8_matmul`
is not used: the model runs the same FP8 weights dequantised (`lora_jax.lora.kernel`), and
`uses_fp8_gemm()` logs a notice once. `with_fp8_gemm(params, True)` forces the FP8 arithmetic
anyway (XLA emulates it on the CPU, same operand rounding): how the tests check it against numpy.
The choice is part of the kernel's static spec, hence of every jit cache key, not a global flag
that a cached trace would ignore.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax.errors import ConfigError
from lora_jax.stored_kernel import StoredKernel

__all__ = [
    "Fp8Kernel",
    "Fp8Spec",
    "E4M3",
    "E5M2",
    "fp8_max",
    "fp8_scale",
    "saturate_cast",
    "quantize_rows",
    "quantize_tensor",
    "SCALINGS",
    "quantize_fp8",
    "dequantize_fp8",
    "is_fp8",
    "fp8_matmul",
    "uses_fp8_gemm",
    "with_fp8_gemm",
]

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
_GRAD_DTYPES = ("float8_e4m3fn", "float8_e5m2")
SCALINGS = ("row", "tensor")
_log = logging.getLogger("lora_jax")


def fp8_max(dtype) -> float:
    """The largest finite value of an FP8 type: 448 (e4m3fn), 57344 (e5m2)."""
    return float(jnp.finfo(dtype).max)


def fp8_scale(amax: jax.Array, dtype) -> jax.Array:
    """fp32 scale that maps `amax` onto the FP8 type's largest value (1 where amax is 0, so that an
    all-zero row or channel quantises to zeros rather than NaN)."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax > 0, amax / fp8_max(dtype), 1.0)


def saturate_cast(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """`x / scale` in fp32, clipped to the type's range, rounded to nearest even in `dtype`.
    The clip is what makes it saturate: a plain cast of an out-of-range value to e4m3fn (which
    has no infinity) gives NaN."""
    big = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -big, big).astype(dtype)


def quantize_rows(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(codes, scales `[..., 1]`): each row (last axis) of `x` scaled to its own amax."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = fp8_scale(amax, dtype)
    return saturate_cast(x, scale, dtype), scale


def quantize_tensor(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(codes, scale `[]`): all of `x` scaled by one power of two, the smallest that maps its amax
    within the type's range (so the largest code lies in (max/2, max]). A power of two is exact in
    any float type and in the product: the GEMM can take it as a scalar operand (bf16 or fp32)
    without rounding it, and `codes * scale` is exactly what was cast."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    mantissa, exponent = jnp.frexp(amax / fp8_max(dtype))  # amax / max = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two is its own scale
    scale = jnp.where(amax > 0, jnp.ldexp(jnp.float32(1), exponent), jnp.float32(1))
    return saturate_cast(x, scale, dtype), scale


class Fp8Spec(NamedTuple):
    """The static part of an `Fp8Kernel` (pytree auxiliary data)."""

    in_features: int
    out_features: int
    dtype: str  # of the kernel it replaces (and of `dequantize_fp8` by default)
    grad_dtype: str = "float8_e4m3fn"  # of the output gradient in the input-gradient GEMM
    gemm: bool | None = None  # FP8 GEMMs (True), dequantised (False), or as the device allows (None)
    scaling: str = "row"  # of x and dy in `fp8_matmul`: per row ("row") or one per tensor ("tensor")


class _CodesKey(jax.tree_util.GetAttrKey):
    """Path entry of the codes: `.key` "kernel_t" (for sharding), a kernel stored transposed, so the
    sharding rules give the codes `[..., out, in]` the kernel's logical axes with the last two
    swapped: the split lands on the same dimension of the weight as the kernel's
    (`lora_jax.sharding.logical_axes`)."""

    key: ClassVar[str] = "kernel_t"


class _ScaleKey(jax.tree_util.GetAttrKey):
    """Path entry of the per-channel scales: `.key` "bias", whose logical axis is the kernel's output
    axis, which the scales run along."""

    key: ClassVar[str] = "bias"


class Fp8Kernel(StoredKernel):
    """A frozen projection kernel in FP8 (e4m3fn) with per-output-channel fp32 scales; see the
    module docstring for the layout. Answers `.shape`, `.ndim`, `.size`, `.dtype` as the kernel it
    replaces does; `.astype(dtype)` dequantises and `k[i]` takes layer i, so targeting, merging,
    export and `nn.scan` work on it unchanged."""

    __slots__ = ("codes", "scale", "spec")

    def __init__(self, codes, scale, spec: Fp8Spec):
        self.codes, self.scale, self.spec = codes, scale, spec

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.scale.shape[:-1]) + (self.spec.in_features, self.spec.out_features)

    @property
    def kind(self) -> str:
        return "fp8"

    def arrays(self) -> tuple:
        return (self.codes, self.scale)

    def astype(self, dtype) -> jax.Array:
        """The dequantised kernel `[..., in, out]` in `dtype`."""
        return dequantize_fp8(self, dtype)

    def __getitem__(self, index) -> Fp8Kernel:
        """Index the leading (layer) axes, e.g. `k[3]` is layer 3 of a scanned model's kernel."""
        lead = self.scale.ndim - 1
        if (isinstance(index, tuple) and len(index) > lead) or lead == 0:
            raise IndexError(f"an FP8 kernel can only be indexed on its {lead} leading (layer) axes")
        return Fp8Kernel(self.codes[index], self.scale[index], self.spec)

    def __repr__(self) -> str:
        return (
            f"Fp8Kernel(shape={self.shape}, dtype={self.spec.dtype}, codes={getattr(self.codes, 'shape', None)}, "
            f"scale={getattr(self.scale, 'shape', None)})"
        )


def _unflatten(spec: Fp8Spec, children) -> Fp8Kernel:
    codes, scale = children
    return Fp8Kernel(codes, scale, spec)


jax.tree_util.register_pytree_with_keys(
    Fp8Kernel,
    lambda k: (((_CodesKey("codes"), k.codes), (_ScaleKey("scale"), k.scale)), k.spec),
    _unflatten,
    lambda k: ((k.codes, k.scale), k.spec),
)


def is_fp8(x) -> bool:
    return isinstance(x, Fp8Kernel)


def quantize_fp8(w, *, dtype: Any = None, grad_dtype: str = "float8_e4m3fn", scaling: str = "row") -> Fp8Kernel:
    """Quantise a kernel `[..., in, out]` (any leading axes) to e4m3fn with one fp32 scale per output
    channel (absmax / 448), computed in fp32 from `w` as given; traceable.
    dtype: what `dequantize_fp8` returns by default (default: `w`'s dtype).
    grad_dtype: FP8 type of the output gradient in the backward GEMM ("float8_e4m3fn" or
        "float8_e5m2").
    scaling: how `fp8_matmul` scales x and dy: "row" (one scale per row, applied after the GEMM) or
        "tensor" (one power-of-two scale per tensor, a scalar operand of the GEMM); the weight's
        per-channel scales are the same either way."""
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ConfigError(f"quantize_fp8() takes a kernel [..., in, out]; got shape {list(w.shape)}")
    if grad_dtype not in _GRAD_DTYPES:
        raise ConfigError(f"grad_dtype={grad_dtype!r}; choose one of {_GRAD_DTYPES}")
    if scaling not in SCALINGS:
        raise ConfigError(f"scaling={scaling!r}; choose one of {SCALINGS}")
    in_f, out_f = w.shape[-2:]
    wt = jnp.swapaxes(w.astype(jnp.float32), -1, -2)  # [..., out, in]
    codes, scale = quantize_rows(wt, E4M3)
    spec = Fp8Spec(int(in_f), int(out_f), jnp.dtype(dtype or w.dtype).name, grad_dtype, scaling=scaling)
    return Fp8Kernel(codes, scale[..., 0], spec)


def dequantize_fp8(k: Fp8Kernel, dtype: Any = None) -> jax.Array:
    """The kernel `[..., in, out]` in `dtype` (default: the kernel's own): code x scale in fp32,
    cast once."""
    w = k.codes.astype(jnp.float32) * k.scale[..., None]
    return jnp.swapaxes(w, -1, -2).astype(jnp.dtype(dtype or k.spec.dtype))


# ------------------------------------------------------------------------------ the FP8 GEMMs


def _contract_last(a, b, dtype):
    """`a[..., k] . b[n, k] -> [..., n]`, both operands contracting their minor axis (TN), the
    result in `dtype`."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())), preferred_element_type=dtype)


def _row(v, ndim):
    """A per-channel vector `[out]` shaped to broadcast against `[..., out]` (explicit ranks)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, kernel: Fp8Kernel) -> jax.Array:
    """`x @ w` with both GEMMs (forward, input gradient) in FP8, in the dtype of x; x: [..., in],
    `kernel` one layer's `Fp8Kernel` ([in, out]). No gradient for the kernel (it is frozen)."""
    return _forward(x, kernel)


def _forward(x, kernel: Fp8Kernel):
    if kernel.spec.scaling == "tensor":
        xq, sx = quantize_tensor(x, E4M3)
        acc = _contract_last(_scaled_operand(xq, sx, x.dtype), kernel.codes.astype(x.dtype), x.dtype)
        return (acc.astype(jnp.float32) * _row(kernel.scale, acc.ndim)).astype(x.dtype)
    xq, sx = quantize_rows(x, E4M3)
    acc = _contract_last(xq, kernel.codes, x.dtype)  # [..., out]
    return (acc.astype(jnp.float32) * sx * _row(kernel.scale, acc.ndim)).astype(x.dtype)


def _scaled_operand(q, scale, dtype):
    """`convert(q) * scale` in `dtype`, the operand form whose scalar scale XLA's GEMM rewriter folds
    into the cuBLASLt FP8 call (`dot(convert(a_f8) * a_scale, convert(b_f8) * b_scale)`); exact,
    the scale being a power of two."""
    return q.astype(dtype) * scale.astype(dtype)


def _fp8_fwd(x, kernel):
    # the residual is the kernel itself (already in memory): no activation is kept
    return _forward(x, kernel), kernel


def _fp8_bwd(kernel, dy):
    # dy @ (codes * scale)^T = (dy * scale) @ codes^T: the channel scale rides on the gradient's cast
    g = dy.astype(jnp.float32) * _row(kernel.scale, dy.ndim)
    if kernel.spec.scaling == "tensor":
        gq, sg = quantize_tensor(g, jnp.dtype(kernel.spec.grad_dtype))
        operand = _scaled_operand(gq, sg, dy.dtype)
        dx = jax.lax.dot_general(
            operand, kernel.codes.astype(dy.dtype), (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=dy.dtype
        )
        return dx, None
    gq, sg = quantize_rows(g, jnp.dtype(kernel.spec.grad_dtype))
    acc = jax.lax.dot_general(gq, kernel.codes, (((gq.ndim - 1,), (0,)), ((), ())), preferred_element_type=dy.dtype)
    return (acc.astype(jnp.float32) * sg).astype(dy.dtype), None  # y, hence dy, has x's dtype


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


# --------------------------------------------------------------------- where FP8 GEMMs exist


def uses_fp8_gemm(kernel: Fp8Kernel) -> bool:
    """Whether `kernel` multiplies in FP8: its spec's choice (`with_fp8_gemm`), else whether the
    default device has FP8 tensor cores (NVIDIA compute capability 8.9 or higher). Where not, a
    notice is logged once and the model runs the same weights dequantised."""
    return kernel.spec.gemm if kernel.spec.gemm is not None else _device_has_fp8()


def with_fp8_gemm(params, enabled: bool | None):
    """`params` with every `Fp8Kernel` set to multiply in FP8 (True) or dequantised (False) whatever
    the device, or as the device allows (None). For tests and measurements: XLA emulates FP8 GEMMs
    on the CPU with the same rounding of the operands."""
    return jax.tree.map(
        lambda k: Fp8Kernel(k.codes, k.scale, k.spec._replace(gemm=enabled)) if is_fp8(k) else k,
        params,
        is_leaf=is_fp8,
    )


@functools.cache
def _device_has_fp8() -> bool:
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    ok = False
    if device.platform == "gpu" and capability:
        major, minor = (int(v) for v in str(capability).split(".")[:2])
        ok = (major, minor) >= (8, 9)
    if not ok:
        _log.warning(
            "fp8: %s (%s) has no FP8 GEMMs; the FP8 base runs dequantised to the compute dtype "
            "(the same FP8 weights, in bf16/fp32 arithmetic)",
            device.platform,
            device.device_kind,
        )
    return ok
