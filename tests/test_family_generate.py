"""KV-cache generation for every family besides Llama against transformers' greedy
`generate(do_sample=False)`: tiny random models (every weight perturbed) whose decoding runs past
the sliding windows of Mistral and Gemma 3's local layers, prompts of different lengths in one
left-padded batch (each must decode as it does alone in transformers), with and without a PEFT
adapter; scanned and unrolled layers decode the same."""

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.generate import generate
from lora_jax.models.llama import init_kv_cache
from tests.helpers import hf_model, make_hf_family

FAMILIES = ["qwen2", "qwen3", "mistral", "gpt2", "gemma3_text"]
NEW = 12  # prompt + NEW tokens run well past the windows (6) of Mistral and Gemma 3
PROMPTS = [[5, 17, 300, 42, 9], [801, 3, 3, 77, 120, 64, 18, 400, 11]]
# weights drawn this wide make greedy decoding vary from token to token (Gemma's embeddings are
# scaled up by sqrt(hidden), so it needs less)
WEIGHT_STD = {"gemma3_text": 0.1}


def _hf_model(model_dir):
    model = hf_model(model_dir)
    model.generation_config.eos_token_id = None  # the full NEW tokens, as ours with no eos
    model.generation_config.pad_token_id = 0
    return model


def _hf_greedy(model, prompt) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    name = request.param
    return name, _make(tmp_path_factory.mktemp(name) / "model", name)


def _make(out_dir, name):
    return make_hf_family(out_dir, name, with_tokenizer=False, weight_std=WEIGHT_STD.get(name, 0.3))


def _ours(cfg, params, lora=None, lcfg=None):
    return generate(cfg, params, PROMPTS, lora=lora, lcfg=lcfg, max_new_tokens=NEW, eos_token_id=-1, bucket=4)


def test_greedy_equals_transformers(family):
    name, model_dir = family
    cfg, params = lj.load_pretrained(model_dir, attention="xla")
    hf = _hf_model(model_dir)
    expected = [_hf_greedy(hf, p) for p in PROMPTS]
    assert len(set(map(tuple, expected))) == 2 and all(len(set(e)) > 2 for e in expected)  # not degenerate
    assert _ours(cfg, params) == expected, name


def test_greedy_with_adapter_equals_peft(family, tmp_path):
    import peft
    import torch

    name, model_dir = family
    cfg, params = lj.load_pretrained(model_dir, attention="xla")
    torch.manual_seed(2)
    pm = peft.get_peft_model(
        _hf_model(model_dir),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, fan_in_fan_out=name == "gpt2"
        ),
    ).eval()
    with torch.no_grad():  # large enough that the adapter changes what greedy decoding picks
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
    pm.save_pretrained(tmp_path / "adapter")
    expected = [_hf_greedy(pm, p) for p in PROMPTS]
    lora, lcfg = lj.load_peft(tmp_path / "adapter", params)
    got = _ours(cfg, params, lora, lcfg)
    assert got != _ours(cfg, params), f"{name}: the adapter changes nothing"
    assert got == expected, name


@pytest.mark.parametrize("name", ["gpt2", "gemma3_text"])
def test_unrolled_layers_decode_as_scanned(name, tmp_path):
    """Unrolled layers take the Python branch (Gemma 3: the layer type known per layer); logits
    of the cached forward equal the scanned ones, and generation is the same."""

    model_dir = _make(tmp_path / "model", name)
    out = {}
    for scan in (True, False):
        cfg, params = lj.load_pretrained(model_dir, attention="xla", scan_layers=scan)
        ids = jnp.asarray([PROMPTS[1]])
        logits, _ = lj.build_model(cfg).apply(
            {"params": params}, ids, cache=init_kv_cache(cfg, 1, 16), cache_index=0, cache_mask=None
        )
        out[scan] = (np.asarray(logits), _ours(cfg, params))
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-5)
    assert out[True][1] == out[False][1]


def test_prefill_logits_equal_the_full_forward(family):
    """The cached forward over a prompt gives the logits of the plain forward (windows included)."""

    _, model_dir = family
    cfg, params = lj.load_pretrained(model_dir, attention="xla")
    ids = jnp.asarray([PROMPTS[1] + PROMPTS[0]])  # 14 tokens: past the windows
    model = lj.build_model(cfg)
    full = np.asarray(model.apply({"params": params}, ids))
    cached, _ = model.apply({"params": params}, ids, cache=init_kv_cache(cfg, 1, 20), cache_index=0)
    np.testing.assert_allclose(np.asarray(cached), full, atol=1e-5)
