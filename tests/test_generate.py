"""KV-cache generation equals step-by-step argmax decoding with the full model."""

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax.generate import generate
from tests.helpers import random_ids


def _reference_greedy(model, variables_apply, prompt, n, width=16):
    """Argmax decoding by the full forward pass over the whole sequence so far. The row is padded
    to a fixed `width` (causal attention: the padding after the last token changes nothing before
    it), so one compiled program serves every step."""
    ids = list(prompt)
    out = []
    forward = jax.jit(variables_apply)
    for _ in range(n):
        logits = forward(jnp.asarray([ids + [0] * (width - len(ids))]))
        tok = int(jnp.argmax(logits[0, len(ids) - 1]))
        out.append(tok)
        ids.append(tok)
    return out


def test_greedy_cache_matches_full_forward(tiny_llama):
    cfg, params = lj.load_pretrained(tiny_llama)
    model = lj.Llama(cfg)
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    prompts = [random_ids(97, (1, 5), seed=1)[0].tolist(), random_ids(97, (1, 9), seed=2)[0].tolist()]
    got = generate(cfg, params, prompts, lora=lora, lcfg=lcfg, max_new_tokens=6, eos_token_id=-1)
    for p, g in zip(prompts, got):
        ref = _reference_greedy(model, lambda x: lj.apply(model, params, lora, lcfg, x), p, 6)
        assert g == ref
    # the plain base, unscanned
    cfg2, params2 = lj.load_pretrained(tiny_llama, scan_layers=False)
    got = generate(cfg2, params2, prompts[:1], max_new_tokens=4, eos_token_id=-1)
    assert got[0] == _reference_greedy(model, lambda x: lj.Llama(cfg2).apply({"params": params2}, x), prompts[0], 4)


def test_sampling_is_seeded_and_stops_at_eos(tiny_llama):
    cfg, params = lj.load_pretrained(tiny_llama)
    prompts = [[1, 2, 3]] * 3
    a = generate(cfg, params, prompts, max_new_tokens=8, temperature=1.0, top_k=5, seed=3, eos_token_id=-1)
    b = generate(cfg, params, prompts, max_new_tokens=8, temperature=1.0, top_k=5, seed=3, eos_token_id=-1)
    assert a == b and len({tuple(x) for x in a}) > 1
    greedy = generate(cfg, params, prompts[:1], max_new_tokens=8, eos_token_id=-1)[0]
    eos = greedy[2]
    stopped = generate(cfg, params, prompts[:1], max_new_tokens=8, eos_token_id=eos)[0]
    assert stopped == greedy[: greedy.index(eos) + 1]
    assert np.all(np.asarray(a) >= 0)
