"""`--set section.field=value`: each value parsed and checked by its field's annotation
(`lora_jax.run_config.parse_field_value`), a bad one refused in one line, and where configs live."""

from __future__ import annotations

import json
import os

import pytest
from safetensors import safe_open

from lora_jax.cli import main
from lora_jax.data.config import DataConfig
from lora_jax.demo import demo_run_config
from lora_jax.errors import ConfigError
from lora_jax.lora.config import LoraConfig
from lora_jax.run_config import (
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    parse_field_value,
    section_classes,
)
from tests.helpers import REPO, module_imports

SECTIONS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
}


# ------------------------------------------------------------------------ good values, one per field type
@pytest.mark.parametrize(
    "key, text, expect",
    [
        # tuple[str, ...] | Literal | regex: a flow list, one bare name, 'all-linear', or a regex
        ("lora.target_modules", "[gate_proj, up_proj]", ["gate_proj", "up_proj"]),
        ("lora.target_modules", "[q_proj,v_proj]", ["q_proj", "v_proj"]),
        ("lora.target_modules", "q_proj", ["q_proj"]),
        ("lora.target_modules", "self_attn.q_proj", ["self_attn.q_proj"]),
        ("lora.target_modules", "all-linear", "all-linear"),
        ("lora.target_modules", r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
        ("lora.exclude_modules", "[o_proj]", ["o_proj"]),
        ("lora.exclude_modules", "null", None),
        ("lora.modules_to_save", "lm_head", ["lm_head"]),
        ("lora.modules_to_save", "[]", []),
        # tuple[int, ...] | None
        ("lora.layers_to_transform", "[0, 2]", [0, 2]),
        ("lora.layers_to_transform", "1", [1]),
        ("lora.layers_to_transform", "~", None),
        # mappings
        ("lora.rank_pattern", "{q_proj: 4}", {"q_proj": 4}),
        ("lora.rank_pattern", "{}", {}),
        ("lora.alpha_pattern", "{q_proj: 1e1, v_proj: 8}", {"q_proj": 10.0, "v_proj": 8}),
        ("mesh.rules", "{embed: tensor}", {"embed": "tensor"}),
        ("mesh.rules", "{embed: [fsdp, tensor], mlp: null}", {"embed": ["fsdp", "tensor"], "mlp": None}),
        ("mesh.rules", "null", {}),
        # bool | Literal
        ("lora.init_lora_weights", "false", False),
        ("lora.init_lora_weights", "gaussian", "gaussian"),
        ("lora.init_lora_weights", "'pissa'", "pissa"),
        # bool, int, float, float | None
        ("train.export_peft", "false", False),
        ("model.scan_layers", "true", True),
        ("data.seq_len", "64", 64),
        ("mesh.fsdp", "-1", -1),
        ("optim.lr", "1e-4", 1e-4),
        ("optim.lr", "3", 3),
        ("optim.clip_norm", "null", None),
        ("lora.loraplus_lr_ratio", "16", 16),
        # Literal, Literal | None: the text as it is
        ("optim.schedule", "linear", "linear"),
        ("model.quantize", "nf4", "nf4"),
        ("model.quantize", "~", None),
        ("model.remat_policy", "save_qkv", "save_qkv"),
        # str, str | None: the text as it is; quoted, YAML
        ("train.output_dir", "1e5", "1e5"),
        ("train.output_dir", "runs/a: b", "runs/a: b"),
        ("model.path", "null", None),
        ("model.path", "'null'", "null"),
        ("data.eval_file", "", None),
        ("lora.bias", "none", "none"),
    ],
)
def test_each_field_type_parses(key, text, expect):
    section, field = key.split(".")
    value = parse_field_value(SECTIONS[section], field, text)
    assert value == expect and type(value) is type(expect), value
    run = demo_run_config().with_overrides([f"{key}={text}"])  # and the section accepts it
    assert getattr(run, section) == SECTIONS[section](**{**run.to_dict()[section], field: value})


def test_target_modules_list_and_mesh_rules_map():
    assert parse_field_value(LoraConfig, "target_modules", "[gate_proj, up_proj]") == ["gate_proj", "up_proj"]
    assert parse_field_value(MeshConfig, "rules", "{embed: tensor}") == {"embed": "tensor"}
    run = demo_run_config().with_overrides(["lora.target_modules=[gate_proj, up_proj]", "mesh.rules={embed: tensor}"])
    assert run.lora.target_modules == ("gate_proj", "up_proj")
    assert dict(run.mesh.rules) == {"embed": "tensor"}


def test_every_field_reads_back_its_own_value():
    """Each field of each section, written as YAML text (JSON is YAML), parses to a value its
    section takes back unchanged: no field has an annotation the parser cannot read."""
    run = demo_run_config().with_overrides(
        [
            "lora.rank_pattern={q_proj: 4}",
            "mesh.rules={mlp: fsdp}",
            "lora.layers_to_transform=[0]",
            "model.quantize=nf4",
        ]
    )
    d = run.to_dict()
    for name, klass in section_classes().items():
        for field, value in d[name].items():
            parsed = parse_field_value(klass, field, json.dumps(value))
            assert klass(**{**d[name], field: parsed}) == getattr(run, name), (name, field)


def test_unknown_field_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.rank is not a field of LoraConfig"):
        parse_field_value(LoraConfig, "rank", "4")


# ------------------------------------------------------------------------ bad values: exit 2, one line
@pytest.mark.parametrize(
    "pair, expect",
    [
        (
            "lora.target_modules={q_proj: 1}",
            "lora.target_modules={'q_proj': 1}; use a module name or a list of "
            "names such as [q_proj, v_proj], 'all-linear' or a regex",
        ),
        ("lora.target_modules=[gate_proj, 5]", "lora.target_modules=['gate_proj', 5]; use"),
        ("lora.target_modules=1e5", "lora.target_modules=100000.0; use"),
        ("lora.target_modules=[gate_proj", "lora.target_modules=[gate_proj is not valid YAML"),
        ("lora.exclude_modules=5", "lora.exclude_modules=5; use a module name"),
        ("lora.modules_to_save={a: 1}", "lora.modules_to_save={'a': 1}; use a module name"),
        ("lora.layers_to_transform=[a]", "lora.layers_to_transform=['a']; use a layer index or a list"),
        ("lora.layers_to_transform=x.*", "lora.layers_to_transform='x.*'; use a layer index"),
        ("lora.rank_pattern=abc", "lora.rank_pattern='abc'; use a mapping of module regexes to ranks"),
        ("lora.rank_pattern={q_proj: x}", "lora.rank_pattern={'q_proj': 'x'}; use a mapping"),
        ("lora.alpha_pattern=[1]", "lora.alpha_pattern=[1]; use a mapping"),
        ("mesh.rules=[1, 2]", "mesh.rules=[1, 2]; use a mapping of logical axes to mesh axes"),
        ("mesh.rules={embed: 5}", "mesh.rules={'embed': 5}; use a mapping"),
        ("mesh.rules={embed: tensor", "mesh.rules={embed: tensor is not valid YAML"),
        ("mesh.tensor=two", "mesh.tensor='two'; use an integer"),
        ("lora.use_dora=maybe", "lora.use_dora='maybe'; use true or false"),
        ("lora.init_lora_weights=olora", "lora.init_lora_weights='olora'; use true, false, 'gaussian' or 'pissa'"),
        ("lora.init_lora_weights=1", "lora.init_lora_weights=1; use true, false"),
        ("lora.r=[8]", "lora.r=[8]; use an integer"),
        ("train.steps=1.5", "train.steps=1.5; use an integer"),
        ("train.steps=true", "train.steps=True; use an integer"),
        ("data.seq_len=abc", "data.seq_len='abc'; use an integer"),
        ("optim.lr=abc", "optim.lr='abc'; use a number"),
        ("optim.clip_norm=abc", "optim.clip_norm='abc'; use a number or null"),
        ("data.eval_fraction={a: 1}", "data.eval_fraction={'a': 1}; use a number"),
        ("optim.schedule=cosin", "optim.schedule='cosin'; use 'cosine', 'linear' or 'constant'"),
        ("model.quantize=int4", "model.quantize='int4'; use 'nf4', 'int8', 'fp8' or null"),
        ("model.remat_policy=some", "model.remat_policy='some'; use 'none', 'full'"),
        ("model.attention=flash", "model.attention='flash'; use 'auto'"),
        ("lora.r=0", "r=0 must be a positive integer"),  # the range: the section's own check
    ],
)
def test_bad_set_value_is_one_line_exit_2(pair, expect, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--no-progress", "--output-dir", str(tmp_path / "run"), "--set", pair])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("lora-jax: error: "), err
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------ a run through the CLI
def test_cli_train_adapts_exactly_the_listed_modules(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(out),
                "--no-progress",
                "--set",
                "train.steps=2",
                "--set",
                "train.eval_generate=0",
                "--set",
                "train.eval_batches=1",
                "--set",
                "lora.target_modules=[gate_proj, up_proj]",
                "--set",
                "mesh.rules={embed: tensor}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    with open(out / "run.json") as f:
        saved = json.load(f)["run"]
    assert saved["lora"]["target_modules"] == ["gate_proj", "up_proj"]
    assert saved["mesh"]["rules"] == {"embed": "tensor"}
    with open(out / "adapter" / "adapter_config.json") as f:
        assert sorted(json.load(f)["target_modules"]) == ["gate_proj", "up_proj"]
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "np") as f:
        modules = {k.split(".lora_")[0].rsplit(".", 1)[1] for k in f.keys()}
    assert modules == {"gate_proj", "up_proj"}


# ------------------------------------------------------------------------ where configs live
def _imports(relpath: str) -> set[str]:
    return {n for n in module_imports(relpath) if n.startswith("lora_jax")}


def test_config_modules_import_no_cycle():
    """The model config sits at the bottom of the import graph, LoraConfig just above it: neither
    reaches the LoRA code, Hugging Face I/O, training or the run config; models/ never imports lora/."""
    low = {"lora_jax.errors"} | {
        m for m in _imports("lora_jax/models/llama_config.py") if m.startswith("lora_jax.models.")
    }
    assert _imports("lora_jax/models/llama_config.py") == low
    for m in _imports("lora_jax/lora/config.py"):
        assert m in ("lora_jax.errors",) or m.startswith("lora_jax.models."), m
    for name in os.listdir(os.path.join(REPO, "lora_jax", "models")):
        if name.endswith(".py"):
            assert not any(m.startswith("lora_jax.lora") for m in _imports(f"lora_jax/models/{name}")), name


def test_config_reexports_the_moved_names():
    import lora_jax.config as config
    from lora_jax.lora import config as lora_config
    from lora_jax.models import llama_config

    assert config.LoraConfig is lora_config.LoraConfig and config.ALL_LINEAR is lora_config.ALL_LINEAR
    assert config.LlamaConfig is llama_config.LlamaConfig and config.RunConfig is RunConfig
    assert config.REMAT_POLICIES == ("none", "full", "dots", "dots_no_batch", "save_qkv", "save_qkv_out", "offload")
    assert all(hasattr(config, name) for name in config.__all__)
