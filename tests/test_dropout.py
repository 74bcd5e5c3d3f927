"""LoRA dropout's keep-mask: Bernoulli at the configured rate (to 2**-16), independent elements,
rows and keys, equal to a numpy reference of its stream, the same under `vmap` and sharding (so a
sweep and a mesh train what a single run trains)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.lora.dropout import dropout_keep_mask
from lora_jax.lora.kernel import lora_dense


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_drop_rate_and_independence(rate):
    keep, keep_p = dropout_keep_mask(jax.random.key(3), rate, (1024, 2048))
    n = keep.size
    assert abs(float(keep_p) - (1 - rate)) <= 2.0**-17
    dropped = ~np.asarray(keep).reshape(-1)
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(dropped.mean() - rate) < 5 * sigma
    # the four elements drawn from one 64-bit word, and neighbouring words, are independent
    for lag in (1, 2, 3, 4, 5):
        both = np.mean(dropped[:-lag] & dropped[lag:])
        assert abs(both - rate * rate) < 5 * np.sqrt(rate * rate * (1 - rate * rate) / n), lag


def _reference_mask(key, rate, n):
    """The stream of `keep_bits` in numpy: word i = mix(mix(i ^ k0) + k1), two 16-bit draws each
    (high half first), dropped below round(rate * 2**16)."""

    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x21F0AAAD)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x735A2D97)
        return x ^ (x >> np.uint32(15))

    k = np.asarray(jax.random.key_data(key), np.uint32).reshape(-1)
    k0, k1 = np.bitwise_xor.reduce(k[0::2]), np.bitwise_xor.reduce(k[1::2])
    words = np.arange((n + 1) // 2, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = mix(mix(words ^ k0) + k1)
    draws = np.stack([h >> np.uint32(16), h & np.uint32(0xFFFF)], axis=-1).reshape(-1)[:n]
    return draws >= np.uint32(round(rate * 65536))


@pytest.mark.parametrize("key", [jax.random.key(7), jax.random.key(7, impl="rbg")], ids=["threefry", "rbg"])
def test_mask_equals_the_numpy_reference(key):
    keep, keep_p = dropout_keep_mask(key, 0.05, (37, 19))  # 703 elements: a partial last byte
    np.testing.assert_array_equal(np.asarray(keep).reshape(-1), _reference_mask(key, 0.05, 37 * 19))
    assert float(keep_p) == 1 - round(0.05 * 65536) / 65536


def test_mask_rows_bit_positions_and_keys_are_independent():
    """Drop rate per bit position of a byte, the spread of per-row drop counts (binomial), and no
    correlation between rows, between bytes, or between the masks of related keys (fold_in)."""
    rate, rows, d = 0.05, 1024, 2048
    key = jax.random.key(9)
    dropped = ~np.asarray(dropout_keep_mask(key, rate, (rows, d))[0])
    flat = dropped.reshape(-1)
    n = flat.size
    per_position = flat.reshape(-1, 8).mean(axis=0)
    assert np.all(np.abs(per_position - rate) < 5 * np.sqrt(rate * (1 - rate) / (n / 8))), per_position
    counts = dropped.sum(axis=1)
    expected_var = d * rate * (1 - rate)
    assert 0.8 < counts.var() / expected_var < 1.2, counts.var() / expected_var
    tol = 5 * np.sqrt(rate * rate * (1 - rate * rate) / n)
    for lag in (6, 7, 8, 9, 15, 16, 17, 31, 32, 64, d):
        assert abs(np.mean(flat[:-lag] & flat[lag:]) - rate * rate) < tol, lag
    for other in (jax.random.fold_in(key, 1), jax.random.fold_in(key, 2), jax.random.key(10)):
        o = ~np.asarray(dropout_keep_mask(other, rate, (rows, d))[0]).reshape(-1)
        assert abs(np.mean(flat & o) - rate * rate) < tol


def test_keys_give_different_masks_and_traced_rates_work():
    a, _ = dropout_keep_mask(jax.random.key(0), 0.5, (64, 64))
    b, _ = dropout_keep_mask(jax.random.key(1), 0.5, (64, 64))
    assert 0.4 < float(jnp.mean(a != b)) < 0.6
    c, p = jax.jit(dropout_keep_mask, static_argnums=2)(jax.random.key(0), jnp.float32(0.5), (64, 64))
    np.testing.assert_array_equal(a, c)
    assert float(p) == 0.5


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU suite forces 8)")
def test_same_mask_under_vmap_and_sharding():
    keys = jax.random.split(jax.random.key(5), 4)
    rates = jnp.asarray([0.05, 0.1, 0.2, 0.3])
    batched = jax.vmap(lambda k, r: dropout_keep_mask(k, r, (16, 40))[0])(keys, rates)
    single = jnp.stack([dropout_keep_mask(k, r, (16, 40))[0] for k, r in zip(keys, rates)])
    np.testing.assert_array_equal(batched, single)
    mesh = jax.make_mesh((8,), ("data",))
    out = NamedSharding(mesh, PartitionSpec("data", None))
    sharded = jax.jit(lambda k: dropout_keep_mask(k, 0.1, (64, 40))[0], out_shardings=out)(keys[0])
    np.testing.assert_array_equal(sharded, dropout_keep_mask(keys[0], 0.1, (64, 40))[0])


@pytest.mark.parametrize("out_features", [24, 64])  # 64 >= 2 * 16: the joint (fused) path
def test_lora_dense_with_dropout_equals_the_explicit_formula(out_features):
    """`lora_dense` keeps no dropped copy of its input (the mask is drawn again in the backward
    pass); its value and gradients equal autodiff of `x W + s * dropout(x) A B` with that mask."""

    ks = jax.random.split(jax.random.key(11), 6)
    x = jax.random.normal(ks[0], (3, 10, 16))
    w = jax.random.normal(ks[1], (16, out_features))
    a = jax.random.normal(ks[2], (16, 4))
    b = jax.random.normal(ks[3], (4, out_features))
    cot = jax.random.normal(ks[4], (3, 10, out_features))
    key, rate, scale = ks[5], 0.3, 0.5

    def ours(x, a, b):
        return jnp.sum(cot * lora_dense(x, w, a, b, scale, dropout_rng=key, dropout_rate=rate))

    def reference(x, a, b):
        keep, keep_p = dropout_keep_mask(key, rate, x.shape)
        xd = jnp.where(keep, x / keep_p, 0)
        return jnp.sum(cot * (x @ w + scale * (xd @ a) @ b))

    np.testing.assert_allclose(ours(x, a, b), reference(x, a, b), rtol=1e-5)
    for g, r in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(reference, (0, 1, 2))(x, a, b)):
        assert float(jnp.max(jnp.abs(r))) > 1e-2
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    traced = jax.jit(
        jax.grad(lambda x, r: jnp.sum(cot * lora_dense(x, w, a, b, scale, dropout_rng=key, dropout_rate=r)))
    )(x, jnp.float32(rate))
    np.testing.assert_allclose(traced, jax.grad(reference)(x, a, b), rtol=1e-4, atol=1e-4)


def test_dropout_keeps_no_dropped_copy_for_the_backward_pass(capsys):
    """The residuals of an adapted projection under dropout are its inputs (x, A) and the mask as
    packed bits (one byte per eight elements), not a bool mask or a dropped copy of x."""

    x, w, a, b = jnp.ones((64, 32)), jnp.ones((32, 96)), jnp.ones((32, 4)), jnp.ones((4, 96))
    for fuse in (True, False):
        print_saved_residuals(
            lambda x, a, b: jnp.sum(
                lora_dense(x, w, a, b, 0.5, dropout_rng=jax.random.key(0), dropout_rate=0.1, fuse_wide=fuse)
            ),
            x,
            a,
            b,
        )
        lines = capsys.readouterr().out.splitlines()
        token_sized = [ln for ln in lines if "[64,32]" in ln]
        assert len(token_sized) == 1 and "argument x" in token_sized[0], lines
        assert not any(ln.startswith("bool") for ln in lines), lines
        assert any(ln.startswith("u8[256]") for ln in lines), lines  # 64 * 32 / 8
