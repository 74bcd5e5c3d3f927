"""The Llama-like families (Qwen2, Qwen3, Mistral) against transformers and PEFT: tiny random models
built with transformers, saved with save_pretrained and loaded from disk, every weight perturbed
(biases and norms included). For each: fp32 logits, a real PEFT adapter loaded with `load_peft`, our
`save_peft` export loaded in PEFT, and the merged export loaded by `AutoModelForCausalLM`, all within
FP32_ATOL. Mistral's sliding window runs narrower than the sequence; a model_type not implemented
is refused in one line."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import attention as attention_module
from tests.helpers import (
    TINY,
    check_peft_both_ways,
    hf_model,
    make_hf_tiny,
    max_diff,
    our_logits,
    random_ids,
    report_diff,
    torch_logits_of,
)

IDS = random_ids(TINY["vocab_size"], (2, 13), seed=3)

# name -> (model_type, config overrides); each differs from Llama where its family does
FAMILIES = {
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=12)),  # explicit head_dim, not hidden / heads (8)
    "qwen3-bias": ("qwen3", dict(attention_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=5)),  # narrower than the 13-token sequence
}


ours = functools.partial(our_logits, ids=IDS)  # (cfg, params, lora=None, lcfg=None) -> logits of IDS
torch_out = functools.partial(torch_logits_of, ids=IDS)  # a torch model's logits of IDS
report = functools.partial(report_diff, "families")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    model_type, overrides = FAMILIES[name]
    path = make_hf_tiny(tmp_path_factory.mktemp(name) / "model", model_type, **overrides)
    cfg, params = lj.load_pretrained(path, attention="xla")
    return name, path, cfg, params


def test_logits_match_transformers(family):
    name, path, cfg, params = family
    model_type, overrides = FAMILIES[name]
    assert cfg.model_type == model_type
    layer = params["layers"]["self_attn"]
    assert ("bias" in layer["q_proj"]) == (model_type == "qwen2" or overrides.get("attention_bias", False))
    assert ("bias" in layer["o_proj"]) == bool(overrides.get("attention_bias", False))
    assert ("q_norm" in layer) == (model_type == "qwen3")
    if "head_dim" in overrides:
        assert cfg.head_dim == overrides["head_dim"] and layer["q_norm"]["scale"].shape == (2, overrides["head_dim"])
    logits = ours(cfg, params)
    report(f"{name} logits", max_diff(logits, torch_out(hf_model(path))))
    if cfg.sliding_window is not None:  # the window is narrower than the sequence and changes the result
        assert cfg.sliding_window < IDS.shape[1]
        assert max_diff(logits, ours(cfg.replace(sliding_window=None), params)) > 1e-3


def test_peft_both_ways_and_merged_export(family, tmp_path):
    name, path, cfg, params = family
    check_peft_both_ways(path, cfg, params, tmp_path, IDS, "families", name)


def test_unsupported_model_type_refused(tmp_path):
    import transformers

    transformers.GPTNeoXConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    ).save_pretrained(tmp_path)
    with pytest.raises(lj.ConfigError) as info:
        lj.load_pretrained(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "model_type='gpt_neox' is not supported" in message
    for supported in ("'llama'", "'qwen2'", "'qwen3'", "'mistral'"):
        assert supported in message


def test_sliding_window_refused_by_pallas_and_kept_on_cudnn(monkeypatch):
    """A window narrower than the sequence is never silently dropped by a kernel that lacks it: the
    Pallas kernels refuse it, and "auto" keeps such a window on cuDNN (which takes it) even where it
    would otherwise hand a packed row to Pallas."""
    monkeypatch.setattr(attention_module, "_platform", lambda: "gpu")
    calls = []
    monkeypatch.setattr(
        attention_module, "_cudnn_packed", lambda q, *a, window=None, **k: calls.append(("packed", window)) or q
    )
    monkeypatch.setattr(
        attention_module.jax.nn,
        "dot_product_attention",
        lambda q, *a, local_window_size=None, **k: calls.append(("cudnn", local_window_size)) or q,
    )
    q = jnp.zeros((1, 16, 4, 8), jnp.bfloat16)
    kv = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
    seg = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(lj.ConfigError, match="sliding_window=4 .*Pallas kernels take no window"):
        attention_module.attention(q, kv, kv, implementation="pallas", sliding_window=4)
    with pytest.raises(lj.ConfigError, match="packed attention needs the most segments.*no sliding window"):
        attention_module.attention(q, kv, kv, seg, sliding_window=4)  # auto could not fall back to Pallas
    huge = attention_module.CUDNN_PACKED_STATS_LIMIT  # statistics past the limit: auto would pick Pallas
    attention_module.attention(q, kv, kv, seg, max_segments=huge, sliding_window=4)
    attention_module.attention(q, kv, kv, implementation="cudnn", sliding_window=4)
    attention_module.attention(q, kv, kv, implementation="cudnn", sliding_window=16)  # no narrower than t
    assert calls == [("packed", 4), ("cudnn", (3, 0)), ("cudnn", None)]


def test_sliding_window_only_for_mistral():
    with pytest.raises(lj.ConfigError, match="sliding_window=8 is implemented for model_type 'mistral' only"):
        lj.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, sliding_window=8)


def test_qwen_sliding_layers_refused(tmp_path):
    make_hf_tiny(tmp_path, "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(lj.ConfigError, match="qwen2 with use_sliding_window=true"):
        lj.load_pretrained(tmp_path)


def test_sliding_window_decoding_matches_full_forward(tmp_path):
    """Decoding against a KV cache honours the window as the full forward does (token by token)."""
    from lora_jax.models.llama import init_kv_cache

    cfg, params = lj.load_pretrained(make_hf_tiny(tmp_path, "mistral", sliding_window=4), attention="xla")
    model = lj.build_model(cfg)
    ids = jnp.asarray(IDS)
    full = ours(cfg, params)
    step = jax.jit(lambda p, x, c, i: model.apply({"params": p}, x, cache=c, cache_index=i))
    cache = init_kv_cache(cfg, ids.shape[0], ids.shape[1])
    steps = []
    for i in range(ids.shape[1]):
        logits, cache = step(params, ids[:, i : i + 1], cache, i)
        steps.append(np.asarray(logits[:, 0]))
    report("mistral window decoding", max_diff(np.stack(steps, 1), full))
