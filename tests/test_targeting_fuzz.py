"""Targeting against real PEFT, fuzzed: for a tiny transformers model of each family, many random
LoRA configs (name lists, full-match regexes, `all-linear`, `layers_to_transform`, `exclude_modules`,
rank and alpha patterns, rsLoRA) planned by lora_jax and by `peft.get_peft_model`. The adapted
modules, their ranks and scales must be equal; a config one side refuses the other refuses too (save
LoRA on embeddings / lm_head, which PEFT does and lora_jax refuses, naming the module); and a few
exports per family load in `PeftModel.from_pretrained` onto exactly the modules lora_jax adapted."""

import copy
import os
import random
import re
import warnings

import jax
import pytest

import lora_jax as lj
from lora_jax.lora.targets import plan_targets, shape_from_config
from lora_jax.models.layout import layout_of
from tests.helpers import TINY

CONFIGS_PER_FAMILY = 16
EXPORTS_PER_FAMILY = 2
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma3_text"]
PREFIX = "base_model.model."


def _build(model_type: str, out_dir: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if model_type == "gpt2":
        from tests.test_gpt2 import TINY_GPT2

        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2))
    elif model_type == "gemma3_text":
        from tests.test_gemma3 import GEMMA3

        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3))
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **TINY))
    model.eval().save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    out = os.fspath(tmp_path_factory.mktemp(request.param))
    model = _build(request.param, out)
    cfg, params = lj.load_pretrained(out)
    return request.param, out, model, cfg, params


def _random_config(rng: random.Random, layout, num_layers: int) -> dict:
    suffixes = sorted({p.module_name for p in layout.projections} | {p.name for p in layout.projections})
    parents = list(layout.parents)
    others = ["act_fn" if "mlp.act_fn" in layout.layer_extras else "act", parents[-1], layout.layer_norms[0]]
    layers = re.escape(layout.hf_layers)
    i = rng.randrange(num_layers)
    kw: dict = dict(r=rng.choice([1, 2, 4, 8]), lora_alpha=rng.choice([1, 2, 4, 8, 16, 3.5]))
    kind = rng.choice(["names", "names", "regex", "regex", "all-linear"])
    if kind == "names":
        kw["target_modules"] = rng.sample(suffixes, rng.randint(1, 3))
        if rng.random() < 0.1:
            kw["target_modules"].append(rng.choice(others))  # not a projection: refused by both
        if rng.random() < 0.35:
            kw["layers_to_transform"] = sorted(rng.sample(range(num_layers), rng.randint(1, num_layers)))
    else:
        if kind == "regex":
            a, b = rng.sample(suffixes, 2)
            p = rng.choice(parents)
            kw["target_modules"] = rng.choice(
                [
                    rf".*\.({re.escape(a)}|{re.escape(b)})",
                    rf"{layers}\.{i}\..*",  # also the layer's norms, activations...: refused
                    rf".*\.{i}\.{p}\..*(proj|attn|fc)",
                    rf".*{p}\..*",  # the issue's `.*mlp\..*`: matches the activation, refused
                    rf".*\.(0|{num_layers - 1})\..*_proj",
                    r".*",
                ]
            )
        else:
            kw["target_modules"] = "all-linear"
        if kind == "regex" and rng.random() < 0.1:
            kw["layers_to_transform"] = [0]  # PEFT refuses it with a regex target, so must we
    if rng.random() < 0.3:
        kw["exclude_modules"] = rng.choice([[rng.choice(suffixes)], rf".*\.{i}\..*"])
    if rng.random() < 0.4:
        kw["rank_pattern"] = {rng.choice(suffixes): rng.choice([1, 3, 6]), rf".*\.{i}\.{parents[0]}\..*": 5}
    if rng.random() < 0.3:
        kw["alpha_pattern"] = {rng.choice(suffixes): rng.choice([2.0, 12])}
    kw["use_rslora"] = rng.random() < 0.2
    return kw


def _ours(cfg, kw):
    try:
        lcfg = lj.LoraConfig(**kw)
        shape = shape_from_config(cfg)
        return {shape.layout.hf_module(t.layer, t.name): (t.r, t.scale) for t in plan_targets(shape, lcfg)}
    except lj.ConfigError as e:
        return e


def _adapted(pm) -> dict:
    return {
        name.removeprefix(PREFIX): (m.r["default"], m.scaling["default"])
        for name, m in pm.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def _peft(model, kw):
    import peft

    try:
        with warnings.catch_warnings():  # unmatched pattern keys, Conv1D's fan_in_fan_out: not errors
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    except ValueError as e:
        return e
    return _adapted(pm)


def _same(ours: dict, theirs: dict) -> bool:
    return ours.keys() == theirs.keys() and all(
        ours[k][0] == theirs[k][0] and ours[k][1] == pytest.approx(theirs[k][1], rel=1e-6) for k in ours
    )


def test_module_tree_is_the_models(family):
    """The modules lora_jax checks patterns against are exactly those of the transformers model."""
    _, _, model, cfg, _ = family
    layout = layout_of(cfg)
    n = cfg.num_hidden_layers
    projections = {layout.hf_module(i, p) for i in range(n) for p in layout.names}
    assert set(layout.hf_other_modules(n)) | projections == {name for name, _ in model.named_modules()}


def test_fuzz_targets_equal_peft(family, tmp_path):
    import peft

    model_type, model_dir, model, cfg, params = family
    layout = layout_of(cfg)
    n = cfg.num_hidden_layers
    projections = {layout.hf_module(i, p) for i in range(n) for p in layout.names}
    rng = random.Random(f"targets-{model_type}")
    configs = [dict(r=4, lora_alpha=8, target_modules=r".*mlp\..*")]  # the example
    configs += [_random_config(rng, layout, n) for _ in range(CONFIGS_PER_FAMILY)]
    exported = agreed_refusals = 0
    for kw in configs:
        ours, theirs = _ours(cfg, kw), _peft(model, kw)
        if isinstance(theirs, dict) and not theirs.keys() <= projections:  # PEFT adapts embeddings / lm_head
            extra = sorted(theirs.keys() - projections)
            assert isinstance(ours, lj.ConfigError), (kw, extra)
            assert any(repr(m) in str(ours) for m in extra), (kw, str(ours))
            continue
        if isinstance(ours, Exception) or isinstance(theirs, Exception):
            assert isinstance(ours, Exception) and isinstance(theirs, Exception), (kw, ours, theirs)
            agreed_refusals += 1
            continue
        assert _same(ours, theirs), (kw, ours, theirs)
        if exported < EXPORTS_PER_FAMILY and (isinstance(kw["target_modules"], str) or exported == 0):
            lcfg = lj.LoraConfig(**kw, init_lora_weights=False)
            lora = lj.init_lora(params, lcfg, jax.random.key(0))
            out = lj.save_peft(tmp_path / f"export{exported}", lora, lcfg, cfg)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), out)
            assert _same(ours, _adapted(pm)), (kw, ours, _adapted(pm))
            exported += 1
    assert agreed_refusals >= 1 and exported >= 1


def test_regex_export_lists_the_adapted_modules(family, tmp_path):
    """A regex target is exported as the explicit list of modules lora_jax adapted."""
    import json

    _, _, _, cfg, params = family
    layout = layout_of(cfg)
    lcfg = lj.LoraConfig(r=2, target_modules=rf".*\.1\.{layout.parents[-1]}\..*(proj|fc)")
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    out = lj.save_peft(tmp_path / "regex", lora, lcfg, cfg)
    with open(os.path.join(out, "adapter_config.json")) as f:
        written = json.load(f)["target_modules"]
    shape = shape_from_config(cfg)
    assert written == [layout.hf_module(t.layer, t.name) for t in plan_targets(shape, lcfg)]
    with pytest.raises(lj.ConfigError, match=r"matches '.*\.mlp\.act(_fn)?'.*not a projection"):
        plan_targets(shape, lj.LoraConfig(target_modules=r".*mlp\..*"))
