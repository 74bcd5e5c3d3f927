"""The fused Pallas dropout kernels (lora_jax/lora/dropout_kernel.py) in interpret mode against the
XLA path `dropout_project_xla`: the same mask (`keep_bits`'s stream), and the same y, dA and dx, in
fp32 to rounding and in bf16 within a stated bound of an fp32 reference; their Triton lowering for a
GPU is checked on the CPU, so an unsupported primitive shows here rather than on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.lora import dropout_kernel
from lora_jax.lora.dropout import dropout_keep_mask, dropout_project, dropout_project_xla
from lora_jax.lora.dropout_kernel import Blocks, dropout_project_fused

# small tiles, so that the shapes below span several blocks of tokens and features and two token
# slices in the backward pass, the last slice holding a block wholly past the last token
BLOCKS = Blocks(tokens=16, features=32, splits=2)


def _inputs(lead=(2, 37), k=64, r=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (*lead, k), dtype)
    a = jax.random.normal(ks[1], (k, r), dtype)
    g = jax.random.normal(ks[2], (*lead, r), dtype)
    return x, a, g, ks[3]


def _value_and_grads(project, x, a, g, key, rate):
    """y, dx and dA of `sum(g * project(x, a, key, rate))`, under jit with rate traced."""

    @jax.jit
    def run(x, a, rate):
        y, vjp = jax.vjp(lambda x, a: project(x, a, key, rate), x, a)
        return (y, *vjp(g))

    return run(x, a, jnp.float32(rate))


_fused = lambda x, a, key, rate: dropout_project_fused(x, a, key, rate, BLOCKS, True)


def test_tile_mask_is_keep_bits_stream():
    """The mask a kernel tile draws (word e // 2, high half for even e) is `keep_bits`'s."""
    rows, feats = 48, 64
    keep, _ = dropout_keep_mask(jax.random.key(4), 0.3, (rows, feats))
    tile_at = jax.jit(
        lambda row0, col0: dropout_kernel._keep_tile(
            *dropout_kernel._stream(jax.random.key(4), 0.3)[:3], row0, col0, BLOCKS, feats
        )
    )
    for row0, col0 in [(0, 0), (16, 32), (32, 0)]:
        tile = tile_at(row0, col0)
        np.testing.assert_array_equal(tile, keep[row0 : row0 + 16, col0 : col0 + 32])


@pytest.mark.parametrize("r", [16, 8])  # 8: padded to Triton's minimum dot width
def test_fused_equals_xla_in_fp32(r):
    x, a, g, key = _inputs(r=r)  # 74 tokens: not a multiple of the 16-token block
    ours = _value_and_grads(_fused, x, a, g, key, 0.3)
    ref = _value_and_grads(dropout_project_xla, x, a, g, key, 0.3)
    for name, o, e in zip(("y", "dx", "dA"), ours, ref):
        assert o.shape == e.shape and o.dtype == e.dtype, name
        assert float(jnp.max(jnp.abs(e))) > 1.0, name
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-4, err_msg=name)
    assert float(jnp.mean(ours[1] == 0)) > 0.2  # dx is zero where x was dropped


def test_rate_zero_is_the_plain_product():
    x, a, g, key = _inputs()
    y, dx, da = _value_and_grads(_fused, x, a, g, key, 0.0)
    np.testing.assert_allclose(y, x @ a, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, g @ a.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(da, jnp.einsum("btk,btr->kr", x, g), rtol=1e-5, atol=1e-4)


def test_dx_in_xla_equals_dx_in_the_kernel():
    x, a, g, key = _inputs()
    unfused = lambda x, a, key, rate: dropout_project_fused(x, a, key, rate, BLOCKS, True, False)
    for o, e in zip(_value_and_grads(unfused, x, a, g, key, 0.2), _value_and_grads(_fused, x, a, g, key, 0.2)):
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-4)


def test_bf16_within_a_bound_of_fp32():
    """bf16 in and out: each of y, dx, dA within 2**-7 of the largest value of its fp32 reference
    (bf16 keeps 8 bits; the kernels accumulate in fp32 and round once), and no further from it than
    the XLA path is (up to one bf16 step)."""
    x, a, g, key = _inputs(dtype=jnp.bfloat16)
    ref = _value_and_grads(dropout_project_xla, *(v.astype(jnp.float32) for v in (x, a, g)), key, 0.1)
    ours = _value_and_grads(_fused, x, a, g, key, 0.1)
    xla = _value_and_grads(dropout_project_xla, x, a, g, key, 0.1)
    for name, o, x_, e in zip(("y", "dx", "dA"), ours, xla, ref):
        assert o.dtype == jnp.bfloat16, name
        scale = float(jnp.max(jnp.abs(e)))
        err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - e)))
        err_xla = float(jnp.max(jnp.abs(x_.astype(jnp.float32) - e)))
        assert err <= 2.0**-7 * scale, (name, err, scale)
        assert err <= err_xla + 2.0**-8 * scale, (name, err, err_xla)


def test_vmap_over_adapters_with_their_own_rates():
    """A sweep vmaps the step: inputs, factors, keys and rates batched."""
    x, a, g, _ = _inputs(lead=(3, 20))
    a3 = jnp.stack([a, 2 * a, -a])
    keys = jax.random.split(jax.random.key(1), 3)
    rates = jnp.asarray([0.0, 0.2, 0.5])
    grads = lambda f: jax.vmap(jax.value_and_grad(lambda x, a, k, r, g: jnp.sum(g * f(x, a, k, r)), (0, 1)))
    (v, (dx, da)), (v_r, (dx_r, da_r)) = (grads(f)(x, a3, keys, rates, g) for f in (_fused, dropout_project_xla))
    for o, e in ((v, v_r), (dx, dx_r), (da, da_r)):
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-3)


def test_kernels_lower_to_triton_for_a_gpu():
    """The GPU lowering (Pallas to Triton IR) of the forward and backward kernels, bf16, vmapped,
    at the default tile sizes; compiling that IR needs a GPU."""
    x = jax.ShapeDtypeStruct((2, 100, 256), jnp.bfloat16)
    a = jax.ShapeDtypeStruct((2, 256, 16), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((2, 100, 16), jnp.bfloat16)
    keys = jax.ShapeDtypeStruct((2,), jax.random.key(0).dtype)
    rates = jax.ShapeDtypeStruct((2,), jnp.float32)

    def step(x, a, g, key, rate):
        y, vjp = jax.vjp(lambda x, a: dropout_project_fused(x, a, key, rate), x, a)
        return y, vjp(g)

    text = jax.jit(jax.vmap(step)).trace(x, a, g, keys, rates).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2


def test_dispatch_takes_xla_off_the_gpu_and_for_shapes_the_kernels_do_not_take():
    x, a, _, key = _inputs()
    jaxpr = str(jax.make_jaxpr(lambda x, a: dropout_project(x, a, key, 0.1))(x, a))
    assert "pallas_call" not in jaxpr and jax.default_backend() == "cpu"
    assert dropout_kernel.fits((8, 2048), (2048, 16), jnp.bfloat16)
    assert dropout_kernel.fits((2, 8, 5632), (5632, 8), jnp.float16)
    assert not dropout_kernel.fits((8, 2048), (2048, 16), jnp.float32)  # fp32: the XLA path
    assert not dropout_kernel.fits((8, 2040), (2040, 16), jnp.bfloat16)  # in not a multiple of 32
    assert not dropout_kernel.fits((8, 2048), (2048, 256), jnp.bfloat16)  # rank above 128
