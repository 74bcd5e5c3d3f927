"""The family layout (`lora_jax.models.layout`) is right, and everything that reads it covers exactly
its projections: shapes and names against transformers' own modules, the Flax model's tree,
targeting, the HF key table, sharding, quantisation and the FLOP model."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

import lora_jax as lj
from lora_jax import flops, quant
from lora_jax.hf.names import flax_path, hf_entries
from lora_jax.lora.config import ALL_LINEAR
from lora_jax.lora.targets import plan_targets, shape_from_config
from lora_jax.models.layout import LAYOUTS, LLAMA_LAYOUT
from lora_jax.sharding import logical_axes
from tests.helpers import REPO, TINY, module_imports

VARIANTS = {
    "gqa": {},
    "head_dim_bias": dict(head_dim=16, attention_bias=True, mlp_bias=True, num_key_value_heads=1),
}


def _torch_model(**overrides):
    import torch
    import transformers

    with torch.device("meta"):  # shapes and names only
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}))


def _cfg(**overrides) -> lj.LlamaConfig:
    return lj.LlamaConfig.from_hf({**TINY, **overrides, "model_type": "llama"})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_projection_shapes_and_biases_are_transformers(variant):
    torch_model = _torch_model(**VARIANTS[variant])
    cfg = _cfg(**VARIANTS[variant])
    modules = dict(torch_model.named_modules())
    linear = {
        n.rsplit(".", 1)[-1]
        for n, m in modules.items()
        if type(m).__name__ == "Linear" and n.startswith(LLAMA_LAYOUT.hf_layers)
    }
    assert linear == set(LLAMA_LAYOUT.names)  # every per-layer Linear is a projection, and back
    for layer in range(cfg.num_hidden_layers):
        for p in LLAMA_LAYOUT.projections:
            m = modules[LLAMA_LAYOUT.hf_module(layer, p.name)]
            assert tuple(m.weight.shape) == LLAMA_LAYOUT.shape(p.name, cfg)[::-1], p.name
            assert (m.bias is not None) == p.has_bias(cfg), p.name
    # the same shapes from transformers' own config object and from a plain config.json dict
    assert LLAMA_LAYOUT.shapes(torch_model.config) == LLAMA_LAYOUT.shapes(cfg)
    assert LLAMA_LAYOUT.shapes(cfg.to_hf_dict()) == LLAMA_LAYOUT.shapes(cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_key_table_is_the_torch_state_dict(variant):
    torch_model = _torch_model(**VARIANTS[variant])
    want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    got = {e.hf_key: e.hf_shape for e in hf_entries(_cfg(**VARIANTS[variant]))}
    assert got == want


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_flax_model_tree_is_the_layout(scan):
    cfg = _cfg(**VARIANTS["head_dim_bias"]).replace(scan_layers=scan)
    shapes = jax.eval_shape(lambda: lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    flat = {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
    entries = hf_entries(cfg)
    assert set(flat) == {flax_path(e, scan) for e in entries}
    for layer in range(cfg.num_hidden_layers):
        for p in LLAMA_LAYOUT.projections:
            kernel = flat[LLAMA_LAYOUT.module_path(layer, p.name, scan) + ("kernel",)]
            assert kernel[-2:] == LLAMA_LAYOUT.shape(p.name, cfg)


def _projection_kernels(params) -> set[tuple[str, ...]]:
    return {path for path in traverse_util.flatten_dict(params) if quant.is_projection_kernel(path)}


def test_readers_cover_exactly_the_layout():
    cfg = _cfg()
    names = LLAMA_LAYOUT.names
    # targeting: all-linear is the layout's projections, in its order, in every layer
    assert ALL_LINEAR == names
    targets = plan_targets(shape_from_config(cfg), lj.LoraConfig(r=2, target_modules="all-linear"))
    assert [(t.layer, t.name, t.parent) for t in targets] == [
        (i, p.name, p.parent) for i in range(cfg.num_hidden_layers) for p in LLAMA_LAYOUT.projections
    ]
    assert {t.hf_name for t in targets} == {
        n for n, _ in _torch_model().named_modules() if n.rsplit(".", 1)[-1] in names
    }
    # FLOPs: the same names and shapes
    assert flops.ALL_TARGETS == names
    assert flops.projection_shapes(cfg) == LLAMA_LAYOUT.shapes(cfg)
    # HF names: one weight per (layer, projection)
    kernels = [e for e in hf_entries(cfg) if e.path[-1] == "kernel" and e.layer is not None]
    assert [(e.layer, e.path[1]) for e in kernels] == [(i, n) for i in range(cfg.num_hidden_layers) for n in names]
    # quantisation: the projection kernels and nothing else
    params = jax.eval_shape(lambda: lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    assert _projection_kernels(params) == {LLAMA_LAYOUT.module_path(0, n, True) + ("kernel",) for n in names}
    # sharding: each kernel, bias and adapter leaf has its projection's axes
    for p in LLAMA_LAYOUT.projections:
        path = LLAMA_LAYOUT.module_path(0, p.name, True)
        assert logical_axes(path + ("kernel",), 3) == ("layers",) + p.axes
        assert logical_axes(path + ("a",), 3) == ("layers", p.axes[0], "rank")
        assert logical_axes(path + ("b",), 3) == ("layers", "rank", p.axes[1])
    assert logical_axes(("lm_head", "kernel"), 2) == LLAMA_LAYOUT.lm_head_axes
    assert logical_axes(("embed_tokens", "embedding"), 2) == LLAMA_LAYOUT.embed_axes


def test_layouts_agree_where_they_share_names():
    """Sharding and quantisation read every family's layout at once: a (parent, module) pair
    must mean one thing, and every logical axis must have a size and a sharding rule."""
    from lora_jax.sharding import DEFAULT_RULES

    seen: dict = {}
    for layout in LAYOUTS.values():
        assert len(set(layout.names)) == len(layout.names)
        for key, axes in layout.kernel_axes().items():
            assert seen.setdefault(key, axes) == axes, key
            assert set(axes) <= set(DEFAULT_RULES), axes
        assert set(a for p in layout.projections for a in p.axes) <= set(layout.dims(_cfg()))


def test_lora_and_quant_do_not_reach_into_hf():
    """`hf/` builds on `lora/`; the layout is in `models/`, so nothing flows the other way."""
    root = os.path.join(REPO, "lora_jax")
    files = [os.path.join(root, "quant.py"), os.path.join(root, "models", "layout.py")]
    files += [os.path.join(root, "lora", f) for f in os.listdir(os.path.join(root, "lora")) if f.endswith(".py")]
    for f in files:
        bad = sorted(m for m in module_imports(f) if m == "lora_jax.hf" or m.startswith("lora_jax.hf."))
        assert not bad, f"{os.path.relpath(f, REPO)} imports {bad}"
    layout_imports = module_imports(os.path.join(root, "models", "layout.py"))
    assert not any(m.split(".")[0] in ("jax", "flax", "lora_jax") for m in layout_imports)


def test_flops_loads_by_path_without_jax():
    """experiments/bench/peft_bench.py loads flops.py by path in a torch-only process."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('f', 'lora_jax/flops.py')\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'jax' not in sys.modules and 'lora_jax' not in sys.modules\n"
        "print(m.ALL_TARGETS, m.flops_per_token(dict(hidden_size=64, intermediate_size=128, "
        "num_attention_heads=4, num_hidden_layers=2, vocab_size=100), 16, 8))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=100)
    assert out.stdout.strip() == f"{flops.ALL_TARGETS} {flops.flops_per_token(small, 16, 8)}"


def test_split_and_optimizer_labels_share_one_rule():
    cfg = _cfg()
    params = lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    lcfg = lj.LoraConfig(r=2, target_modules="all-linear", use_dora=True, modules_to_save=("lm_head", "norm"))
    lora = lj.init_lora(params, lcfg, jax.random.key(1))
    split = lj.split_trainable(params, lora, lcfg)
    labels = traverse_util.flatten_dict(lj.lora_labels({"params": params, "lora": lora}, lcfg))
    trainable = set(traverse_util.flatten_dict(split.trainable))
    assert trainable == {p for p, label in labels.items() if label != "freeze"}
    assert {p[-1] for p in trainable if p[0] == "lora"} == {"a", "b", "m"}
