"""The train step's pieces against plain references: the chunked cross-entropy (value and
gradients), gradient accumulation, and the optimizer touching trainable leaves only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.config import REMAT_POLICIES
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
    # a cotangent other than 1 (the hidden-state gradient is made in the forward, then scaled)
    scaled = jax.grad(lambda h, w: -2.5 * f(h, w), argnums=(0, 1))(h, w)
    for got, ref in zip(scaled, jax.grad(lambda h, w: -2.5 * r(h, w), argnums=(0, 1))(h, w)):
        np.testing.assert_allclose(got, ref, atol=3e-5, rtol=1e-5)


def test_chunked_cross_entropy_in_bf16_reads_bf16_logits_as_transformers_does():
    """In bf16 the head writes bf16 logits and the loss upcasts them (transformers' Llama does the
    same): the loss equals log-softmax over the bf16 product, not over an fp32 one."""
    k = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(k[0], (2, 24, 32)).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (32, 97)) * 0.5).astype(jnp.bfloat16)
    t = jax.random.randint(k[2], (2, 24), 0, 97)
    m = jnp.ones((2, 24), jnp.float32)
    got = float(chunked_cross_entropy(h, w, 1, t, m, 16)[0])
    np.testing.assert_allclose(got, float(_reference(h, w, 1, t, m)), rtol=1e-5)
    fp32_logits = float(_reference(h.astype(jnp.float32), w.astype(jnp.float32), 1, t, m))
    assert abs(got - fp32_logits) > 1e-4 * abs(fp32_logits)  # the test can tell the two apart


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_remat_policy_gives_the_gradients_of_none(tiny_llama, policy):
    """Remat changes what is kept or recomputed, never the numbers: loss and adapter gradients
    equal the no-remat step (fp32)."""
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    out = {}
    for p in ("none", policy):
        cfg, params = lj.load_pretrained(tiny_llama, remat_policy=p)
        split = lj.split_trainable(params, lj.init_lora(params, lcfg, jax.random.key(0)), lcfg)
        model = lj.Llama(cfg)
        ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

        def loss(trainable, frozen):
            prm, lo = lj.combine(trainable, frozen)
            return jnp.mean(jnp.square(lj.apply(model, prm, lo, lcfg, ids)))

        out[p] = jax.jit(jax.value_and_grad(loss))(split.trainable, split.frozen)
    np.testing.assert_allclose(out[policy][0], out["none"][0], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(out[policy][1]), jax.tree.leaves(out["none"][1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
