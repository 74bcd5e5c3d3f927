"""LoRA dropout's keep-mask: Bernoulli at the configured rate (to 2**-16), independent elements,
the same under `vmap` and sharding (so a sweep and a mesh train what a single run trains)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.lora.kernel import dropout_keep_mask


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
