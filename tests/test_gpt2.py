"""GPT-2 (`GPT2LMHeadModel`) against transformers and PEFT: a tiny random model built with transformers,
every weight perturbed (biases and LayerNorms included), saved with save_pretrained and loaded from
disk. fp32 logits, a real PEFT adapter (Conv1D, fan_in_fan_out) loaded with `load_peft`, our
`save_peft` export loaded in PEFT, the merged export loaded by `AutoModelForCausalLM`, and the
trainable-parameter count of GPT-2 124M with r=8 on c_attn/c_proj, all as PEFT has them."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models.gpt2_config import GPT2Config
from lora_jax.quant import dequantize, is_quantized
from tests.helpers import hf_model, max_diff, our_logits, random_ids, report_diff, save_random_hf, torch_logits_of

TINY_GPT2 = dict(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
IDS = random_ids(TINY_GPT2["vocab_size"], (2, 13), seed=5)
TARGETS = ["c_attn", "c_proj"]


ours = functools.partial(our_logits, ids=IDS)  # (cfg, params, lora=None, lcfg=None) -> logits of IDS
torch_out = functools.partial(torch_logits_of, ids=IDS)  # a torch model's logits of IDS
report = functools.partial(report_diff, "gpt2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    return save_random_hf(tmp_path_factory.mktemp("gpt2"), transformers.GPT2Config(**TINY_GPT2))


@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_transformers(model_dir, scan):
    cfg, params = lj.load_pretrained(model_dir, scan_layers=scan)
    assert isinstance(cfg, GPT2Config) and isinstance(lj.build_model(cfg), lj.GPT2)
    assert set(params) == {"wte", "wpe", "ln_f", "h" if scan else "h_0"} | (set() if scan else {"h_1"})
    report(f"logits scan={scan}", max_diff(ours(cfg, params), torch_out(hf_model(model_dir))))


def test_peft_adapter_both_ways_and_merged_export(model_dir, tmp_path):
    import peft
    import torch

    torch.manual_seed(1)
    base = hf_model(model_dir)
    pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, fan_in_fan_out=True)
    pm = peft.get_peft_model(base, pcfg).eval()
    adapter = tmp_path / "peft"
    pm.save_pretrained(os.fspath(adapter))
    want = torch_out(pm)

    cfg, params = lj.load_pretrained(model_dir)
    lora, lcfg = lj.load_peft(adapter, params)
    assert set(lora["h"]["attn"]) == {"c_attn", "c_proj"} and set(lora["h"]["mlp"]) == {"c_proj"}
    got = ours(cfg, params, lora, lcfg)
    report("PEFT adapter loaded", max_diff(got, want))

    ours_dir = tmp_path / "ours"
    lj.save_peft(ours_dir, lora, lcfg, cfg)
    assert json.loads((ours_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    back = peft.PeftModel.from_pretrained(hf_model(model_dir), os.fspath(ours_dir)).eval()
    report("save_peft export in PEFT", max_diff(torch_out(back), got))

    merged = tmp_path / "merged"
    lj.save_pretrained(merged, params, cfg, lora, lcfg)
    report("merged export in transformers", max_diff(torch_out(hf_model(os.fspath(merged))), got))
    # and the merged export reads back
    cfg2, params2 = lj.load_pretrained(merged, scan_layers=False)
    report("merged export reloaded", max_diff(ours(cfg2, params2), got))


def test_gpt2_124m_trainable_parameters_match_peft():
    cfg = GPT2Config()  # n_embd 768, 12 layers, 12 heads, vocab 50257
    model = lj.build_model(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    lcfg = lj.LoraConfig(r=8, target_modules=TARGETS)
    trainable, total = lj.count_parameters(params, lcfg)
    assert trainable == 811_008
    line = lj.print_trainable_parameters(params, lcfg)

    import peft
    import torch
    import transformers

    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, target_modules=TARGETS, fan_in_fan_out=True))
    peft_trainable, peft_total = pm.get_nb_trainable_parameters()
    assert (trainable, total) == (peft_trainable, peft_total)
    assert line.startswith("trainable params: 811,008 || all params: 125,250,816")


def test_packed_segments_match_separate_documents(model_dir):
    cfg, params = lj.load_pretrained(model_dir)
    model = lj.build_model(cfg)
    a, b = IDS[0, :6], IDS[1, :7]
    packed = jnp.asarray(np.concatenate([a, b]))[None]
    seg = jnp.asarray([[1] * 6 + [2] * 7])
    pos = jnp.asarray([list(range(6)) + list(range(7))])
    out = np.asarray(model.apply({"params": params}, packed, pos, seg))
    sep_a = np.asarray(model.apply({"params": params}, jnp.asarray(a)[None]))
    sep_b = np.asarray(model.apply({"params": params}, jnp.asarray(b)[None]))
    report("packed vs separate", max(max_diff(out[:, :6], sep_a), max_diff(out[:, 6:], sep_b)))


def test_refusals(model_dir, tmp_path):
    with pytest.raises(lj.ConfigError, match="scale_attn_by_inverse_layer_idx"):
        GPT2Config.from_hf({**TINY_GPT2, "model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_quantized_base_equals_its_dequantised_weights(model_dir, kind):
    """QLoRA on GPT-2's Conv1D `[in, out]` weights: the quantised base's logits equal those of a
    plain model holding the dequantised kernels, and differ from the original by the rounding."""

    cfg, params = lj.load_pretrained(model_dir, dtype="float32")
    qcfg, qparams = lj.load_pretrained(model_dir, dtype="float32", quantize=kind)
    assert sum(is_quantized(leaf) for leaf in jax.tree.leaves(qparams, is_leaf=is_quantized)) > 0
    deq = jax.tree.map(
        lambda leaf: dequantize(leaf, jnp.float32) if is_quantized(leaf) else leaf, qparams, is_leaf=is_quantized
    )
    ids = jnp.asarray(IDS)
    ours = lj.apply(lj.build_model(qcfg), qparams, {}, None, ids)
    reference = lj.build_model(cfg).apply({"params": deq}, ids)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    original = lj.build_model(cfg).apply({"params": params}, ids)
    assert 1e-3 < float(jnp.max(jnp.abs(ours - original)))
