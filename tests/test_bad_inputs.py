"""One table of bad inputs, CLI and API: each is refused with one clear line, and nothing is written.

A CLI case runs `lora_jax.cli.main(argv)` in-process and asserts: exit status 2, exactly one line on
stderr naming the bad value, no traceback, nothing on stdout, and no file created or changed (the
case runs in its own empty directory, which is also where the default output directories land).
Loading base weights counts as accepting the input (`_accept_guard`): every case must fail during
argument, config or file validation, before any model loads, which also keeps the table fast.
An API case asserts the exception type and that its message names the value, on one line.
A few cases run through the real `lora-jax` entry point in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import lora_jax as lj
from lora_jax.cli import main
from lora_jax.config import LlamaConfig, LoraConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from lora_jax.demo import DEMO_MODEL, demo_run_config
from lora_jax.errors import ConfigError
from tests import helpers

CLI, API = [], []


def cli(argv: str, expect: str, id: str | None = None):
    """`lora-jax ARGV` (shell words; {out}: the case's own directory, {files}: shared inputs) must
    fail with `expect` in its one stderr line."""
    CLI.append(pytest.param(argv, expect, id=id or argv))


def api(name: str, fn, expect: str, exc=ConfigError):
    API.append(pytest.param(fn, expect, exc, id=name))


T = "train --no-progress --output-dir {out}/run"
S = "sweep --no-progress --output-dir {out}/sweep"
G = "generate --prompt hi"
E = "export --checkpoint {files}/fake_run"

# ------------------------------------------------------------------------ train: --set, one field each
for pair, expect in [
    # optim
    ("optim.clip_norm=-1", "clip_norm=-1"),
    ("optim.clip_norm=0", "clip_norm=0"),
    ("optim.clip_norm=nan", "clip_norm='nan'"),
    ("optim.clip_norm=abc", "clip_norm='abc'"),
    ("optim.b1=5", "b1=5"),
    ("optim.b1=1", "b1=1"),
    ("optim.b2=-0.1", "b2=-0.1"),
    ("optim.b2=1.5", "b2=1.5"),
    ("optim.eps=0", "eps=0"),
    ("optim.eps=-1e-8", "eps=-1e-08"),
    ("optim.eps=inf", "eps='inf'"),
    ("optim.lr=nan", "lr='nan'"),
    ("optim.lr=inf", "lr='inf'"),
    ("optim.lr=-inf", "lr='-inf'"),
    ("optim.lr=.nan", "lr=nan"),
    ("optim.lr=0", "lr=0"),
    ("optim.lr=-1e-4", "lr=-0.0001"),
    ("optim.lr=abc", "lr='abc'"),
    ("optim.lr=true", "lr=True"),
    ("optim.lr=[1e-4]", "lr=[0.0001]"),
    ("optim.warmup_steps=-1", "warmup_steps=-1"),
    ("optim.warmup_steps=2.5", "warmup_steps=2.5"),
    ("optim.min_lr_ratio=2", "min_lr_ratio=2"),
    ("optim.weight_decay=-0.1", "weight_decay=-0.1"),
    ("optim.weight_decay=.inf", "weight_decay=inf"),
    ("optim.schedule=cosin", "schedule='cosin'"),
    ("optim.schedule=5", "schedule='5'"),
    # train
    ("train.eval_batches=0", "eval_batches=0"),
    ("train.eval_every=-5", "eval_every=-5"),
    ("train.steps=abc", "steps='abc'"),
    ("train.steps=1.5", "steps=1.5"),
    ("train.steps=true", "steps=True"),
    ("train.steps=0", "steps=0"),
    ("train.steps=-3", "steps=-3"),
    ("train.steps=1e3", "steps=1000.0"),
    ("train.steps=null", "steps=None"),
    ("train.batch_size=[8]", "batch_size=[8]"),
    ("train.grad_accum=0", "grad_accum=0"),
    ("train.seed=-1", "seed=-1"),
    ("train.seed=x", "seed='x'"),
    ("train.export_peft=maybe", "export_peft='maybe'"),
    ("train.log_every=0", "log_every=0"),
    ("train.save_every=null", "save_every=None"),
    ("train.keep_checkpoints=0", "keep_checkpoints=0"),
    ("train.max_new_tokens=-1", "max_new_tokens=-1"),
    ("train.eval_generate=-1", "eval_generate=-1"),
    ("train.eval_generate=all", "eval_generate='all'"),
    # lora
    ("lora.r=0", "r=0"),
    ("lora.r=1.5", "r=1.5"),
    ("lora.r=abc", "r='abc'"),
    ("lora.r=true", "r=True"),
    ("lora.lora_alpha=0", "lora_alpha=0"),
    ("lora.lora_alpha=nan", "lora_alpha='nan'"),
    ("lora.lora_dropout=1", "lora_dropout=1"),
    ("lora.lora_dropout=-0.1", "lora_dropout=-0.1"),
    ("lora.target_modules=[]", "target_modules is empty ([])"),
    ("lora.target_modules=[gate_proj, 5]", "['gate_proj', 5]"),
    ("lora.target_modules={q_proj: 1}", "{'q_proj': 1}"),
    ("lora.target_modules=[gate_proj", "[gate_proj"),
    ("lora.target_modules=(", "'('"),
    ("lora.use_rslora=maybe", "use_rslora='maybe'"),
    ("lora.use_dora=2", "use_dora=2"),
    ("lora.init_lora_weights=olora", "init_lora_weights='olora'"),
    ("lora.bias=all", "bias='all'"),
    ("lora.loraplus_lr_ratio=-1", "loraplus_lr_ratio=-1"),
    ("lora.loraplus_lr_ratio=abc", "loraplus_lr_ratio='abc'"),
    ("lora.rank_pattern={q_proj: 0}", "'q_proj': 0"),
    ("lora.rank_pattern=abc", "rank_pattern='abc'"),
    ("lora.alpha_pattern={q_proj: .inf}", "'q_proj': inf"),
    ("lora.layers_to_transform=[-1]", "[-1]"),
    ("lora.layers_to_transform=[a]", "['a']"),
    ("lora.exclude_modules=5", "exclude_modules=5"),
    ("lora.modules_to_save={a: 1}", "{'a': 1}"),
    # model
    ("model.dtype=float64", "dtype='float64'"),
    ("model.remat_policy=some", "remat_policy='some'"),
    ("model.loss_chunk_tokens=0", "loss_chunk_tokens=0"),
    ("model.loss_chunk_tokens=abc", "loss_chunk_tokens='abc'"),
    ("model.quantize=int4", "quantize='int4'"),
    ("model.scan_layers=maybe", "scan_layers='maybe'"),
    ("model.fuse_wide_adapters=2", "fuse_wide_adapters=2"),
    ("model.attention=flash", "attention='flash'"),
    # mesh
    ("mesh.data=0", "data=0"),
    ("mesh.fsdp=-2", "fsdp=-2"),
    ("mesh.tensor=1.5", "tensor=1.5"),
    ("mesh.rules={embed: tensr}", "'tensr'"),
    ("mesh.rules={embd: tensor}", "'embd'"),
    ("mesh.rules=[1, 2]", "[1, 2]"),
    ("mesh.rules=abc", "rules='abc'"),
    # data
    ("data.seq_len=1", "seq_len=1"),
    ("data.overlong=cut", "overlong='cut'"),
    ("data.eval_fraction=1", "eval_fraction=1"),
    ("data.packing=maybe", "packing='maybe'"),
    ("data.max_record_bytes=0", "max_record_bytes=0"),
    # the --set syntax
    ("lora.r", "'lora.r'"),
    ("lora=8", "'lora'"),
    ("foo.bar=1", "'foo.bar'"),
    ("lora.rank=4", "lora.rank"),
    ("lora.r.x=4", "lora.r.x"),
]:
    cli(f"{T} --set {shlex.quote(pair)}", expect)

cli(f"{T} --set train.batch_size=6 --set train.grad_accum=4", "batch_size=6")
cli("train --no-progress --set train.output_dir=", "output_dir=''")  # (--output-dir would win over it)

# ------------------------------------------------------------------------ train: flags and files
for argv, expect in [
    ("--config {files}/missing.yaml", "missing.yaml"),
    ("--config {files}/bad.yaml", "bad.yaml: invalid YAML at line 5, column 1: could not find expected ':'"),
    ("--config {files}/list.yaml", "list"),
    ("--config {files}/section.yaml", "lora: 5"),
    ("--config {files}/unknown_section.yaml", "optimizer"),
    ("--config {files}/badtype.yaml", "steps='abc'"),
    ("--config {files}/output_num.yaml", "output_dir=100"),
    ("--config {files}/nan.yaml", "lr=nan"),
    ("--config {files}/binary.yaml", "binary.yaml is not a UTF-8"),
    ("--config {files}", "is a directory"),
    ("--config ''", "--config: '' is empty"),
    ("--model ''", "--model: '' is empty"),
    ("--data ''", "--data: '' is empty"),
    ("--resume --config {files}/good.yaml", "--config {files}/good.yaml"),
    ("--resume --data {files}/x.jsonl", "--data {files}/x.jsonl"),
    ("--resume --model {files}/m", "--model {files}/m"),
    ("--resume --set lora.r=4", "--set lora.r=4"),
    ("--resume --eval-data {files}/e.jsonl", "--eval-data {files}/e.jsonl"),
    ("--resume --quantize nf4", "--quantize nf4"),
    ("--resume --overwrite", "--overwrite"),
    ("--resume", "holds no run"),
    ("--quantize int4", "'int4'"),
    ("--bogus 3", "--bogus"),
    ("--set", "--set: expected one argument"),
    ("--data {files}/nope.jsonl", "nope.jsonl"),
    ("--data {files}/empty.jsonl", "empty.jsonl"),  # an empty corpus
    ("--data {files}/long.jsonl --set data.max_record_bytes=64", "long.jsonl:2"),  # a record over the limit
    ("--eval-data {files}/nope_eval.jsonl", "nope_eval.jsonl"),
    ("--model {files}/nomodel", "nomodel"),
    ("--model {files}/nocfg", "config.json"),
    ("--model {files}/notok", "tokenizer"),  # no tokenizer files
]:
    cli(f"{T} {argv}", expect)

cli("train --no-progress --output-dir ''", "--output-dir: '' is empty")
cli("train --no-progress --output-dir {files}/afile", "afile")  # --output-dir names a file
cli("train --no-progress --output-dir {files}/fake_run", "already holds a run")
cli("train --no-progress --overwrite --output-dir {files}/notarun", "not a lora-jax run directory")
cli("trian", "invalid choice: 'trian'")
cli("", "the following arguments are required: command", id="no-command")

# ------------------------------------------------------------------------ sweep
for argv, expect in [
    ("--grid lora.r=0,4", "r=0"),
    ("--grid optim.lr=nan,1e-4", "'nan'"),
    ("--grid optim.lr=-1,1e-4", "lr=-1"),
    ("--grid lora.lora_dropout=1.5", "lora_dropout=1.5"),
    ("--grid lora.use_rslora=maybe", "'maybe'"),
    ("--grid lora.r", "'lora.r'"),
    ("--grid lora.target_modules=q_proj", "lora.target_modules"),
    ("--sweep {files}/bad.yaml", "bad.yaml: invalid YAML at line 5"),
    ("--sweep {files}/list.yaml", "list"),
    ("--sweep {files}/missing.yaml", "missing.yaml"),
    ("--sweep {files}/sweep_badsection.yaml", "section train"),
    ("--sweep {files}/sweep_badout.yaml", "['a']"),
    ("--sweep {files}/sweep_badset.yaml", "not 5"),
    ("--sweep {files}/sweep_badvalue.yaml", "b1=2"),
    ("--sweep {files}/sweep_unknown.yaml", "'steps'"),
    ("--adapters-per-pass x", "--adapters-per-pass x"),
    ("--adapters-per-pass -2", "--adapters-per-pass -2"),
    ("--set optim.eps=0", "eps=0"),
    ("--set 'mesh.rules={embed: [fsdp, x]}'", "'x'"),
    ("--config {files}/bad.yaml", "bad.yaml"),
    ("--resume", "--resume"),
    ("--quantize int4", "'int4'"),
    ("--output-dir ''", "--output-dir: '' is empty"),
]:
    cli(f"{S} {argv}", expect)

# ------------------------------------------------------------------------ export
cli("export --peft {out}/p", "--checkpoint")
cli("export --checkpoint {files}/nope --peft {out}/p", "nope")
cli(E, "nothing to export")
cli(f"{E} --peft {{out}}/p", "checkpoint")  # a run with no checkpoint
cli(f"{E} --peft {{out}}/p --step -1", "--step: -1")
cli(f"{E} --peft {{out}}/p --step x", "--step: 'x'")
cli(f"{E} --peft {{out}}/p --dtype float64", "'float64'")
cli(f"{E} --peft {{files}}/fake_run", "--peft {files}/fake_run is, or holds, the run")
cli(f"{E} --merged {{files}}", "--merged {files} is, or holds, the run")
cli(f"{E} --peft {{out}}/same --merged {{out}}/same", "both name {out}/same")
cli(f"{E} --peft ''", "--peft: '' is empty")
cli(f"{E} --peft {{files}}/nonempty", "nonempty")  # not empty, and no --overwrite
cli(f"{E} --peft {{files}}/afile", "afile")  # a file
cli(f"{E} --merged {{out}}/m --max-shard-size lots", "lots")
cli(f"{E} --merged {{out}}/m --max-shard-size 0", "max_shard_size")

# ------------------------------------------------------------------------ generate
for argv, expect in [
    ("--temperature -1", "--temperature: -1"),
    ("--temperature nan", "--temperature: nan"),
    ("--temperature inf", "--temperature: inf"),
    ("--temperature hot", "'hot'"),
    ("--top-k -3", "--top-k: -3"),
    ("--top-k 2.5", "'2.5'"),
    ("--top-k 5", "--top-k 5 needs sampling"),
    ("--top-k 5000 --temperature 1", "--top-k 5000 exceeds the vocabulary ("),
    ("--max-new-tokens -5", "--max-new-tokens: -5"),
    ("--max-new-tokens 0", "--max-new-tokens: 0"),
    ("--max-new-tokens abc", "'abc'"),
    ("--max-new-tokens 1000", "--max-new-tokens 1000"),
    ("--seed -1", "--seed: -1"),
    ("--prompt ''", "--prompt ''"),
    ("--adapter {files}/nope", "--adapter {files}/nope"),
    ("--adapter {files}/a --checkpoint {files}/fake_run", "--adapter {files}/a"),
    ("--model {files}/nomodel", "nomodel"),
    ("--model {files}/nocfg", "config.json"),
    ("--model {files}/notok", "tokenizer"),
    ("--model ''", "--model: '' is empty"),
    ("--checkpoint {files}/nope", "nope"),
    ("--checkpoint {files}/fake_run", "checkpoint"),
]:
    cli(f"{G} {argv}", expect)
cli("generate --prompt ''", "--prompt ''")
cli("generate --prompt '   '", "--prompt '   '")
cli("generate", "--prompt")
cli(
    "generate --max-new-tokens 120 --prompt " + shlex.quote("count: " + " ".join(map(str, range(40)))),
    "--max-new-tokens 120 after the prompt",
)


# ------------------------------------------------------------------------ API
def _make(klass):
    return lambda **kw: lambda: klass(**kw)


_optim, _train, _model, _mesh, _lora = map(_make, (OptimConfig, TrainConfig, ModelConfig, MeshConfig, LoraConfig))


nan, inf = math.nan, math.inf
for name, fn, expect in [
    ("OptimConfig(lr=nan)", _optim(lr=nan), "lr=nan"),
    ("OptimConfig(lr='abc')", _optim(lr="abc"), "lr='abc'"),
    ("OptimConfig(lr=None)", _optim(lr=None), "lr=None"),
    ("OptimConfig(b1=1.0)", _optim(b1=1.0), "b1=1.0"),
    ("OptimConfig(b2=-0.5)", _optim(b2=-0.5), "b2=-0.5"),
    ("OptimConfig(eps=0.0)", _optim(eps=0.0), "eps=0.0"),
    ("OptimConfig(clip_norm=-1.0)", _optim(clip_norm=-1.0), "clip_norm=-1.0"),
    ("OptimConfig(clip_norm=inf)", _optim(clip_norm=inf), "clip_norm=inf"),
    ("OptimConfig(warmup_steps=1.5)", _optim(warmup_steps=1.5), "warmup_steps=1.5"),
    ("OptimConfig(weight_decay=True)", _optim(weight_decay=True), "weight_decay=True"),
    ("OptimConfig(schedule=None)", _optim(schedule=None), "schedule=None"),
    ("TrainConfig(steps='10')", _train(steps="10"), "steps='10'"),
    ("TrainConfig(output_dir=1e5)", _train(output_dir=1e5), "output_dir=100000.0"),
    ("TrainConfig(output_dir='')", _train(output_dir=""), "output_dir=''"),
    ("TrainConfig(eval_batches=0)", _train(eval_batches=0), "eval_batches=0"),
    ("TrainConfig(eval_every=-5)", _train(eval_every=-5), "eval_every=-5"),
    ("TrainConfig(seed=1.0)", _train(seed=1.0), "seed=1.0"),
    ("TrainConfig(export_peft='yes')", _train(export_peft="yes"), "export_peft='yes'"),
    ("ModelConfig(path=5)", _model(path=5), "path=5"),
    ("ModelConfig(loss_chunk_tokens=1.5)", _model(loss_chunk_tokens=1.5), "loss_chunk_tokens=1.5"),
    ("ModelConfig(scan_layers=1)", _model(scan_layers=1), "scan_layers=1"),
    ("MeshConfig(rules={'embed': 5})", _mesh(rules={"embed": 5}), "embed: 5"),
    ("MeshConfig(rules='abc')", _mesh(rules="abc"), "rules='abc'"),
    ("MeshConfig(data=True)", _mesh(data=True), "data=True"),
    ("LoraConfig(r=True)", _lora(r=True), "r=True"),
    ("LoraConfig(lora_alpha=inf)", _lora(lora_alpha=inf), "lora_alpha=inf"),
    ("LoraConfig(lora_dropout=True)", _lora(lora_dropout=True), "lora_dropout=True"),
    ("LoraConfig(use_rslora='yes')", _lora(use_rslora="yes"), "use_rslora='yes'"),
    ("LoraConfig(target_modules={'q_proj': 1})", _lora(target_modules={"q_proj": 1}), "{'q_proj': 1}"),
    ("LoraConfig(target_modules='')", _lora(target_modules=""), "target_modules=''"),
    ("LoraConfig(rank_pattern=[1, 2])", _lora(rank_pattern=[1, 2]), "rank_pattern=[1, 2]"),
    ("LoraConfig(loraplus_lr_ratio=nan)", _lora(loraplus_lr_ratio=nan), "loraplus_lr_ratio=nan"),
]:
    api(name, fn, expect)


def _from_dict(d):
    return lambda: RunConfig.from_dict(d)


def _overrides(*pairs):
    return lambda: demo_run_config().with_overrides(list(pairs))


api("from_dict([1, 2])", _from_dict([1, 2]), "not a list")
api("from_dict(optim.lr='abc')", _from_dict({"optim": {"lr": "abc"}}), "lr='abc'")
api("from_dict(lora=5)", _from_dict({"lora": 5}), "lora: 5")
api("from_dict(optimizer)", _from_dict({"optimizer": {}}), "'optimizer'")
api("from_dict(train.stepz)", _from_dict({"train": {"stepz": 1}}), "train.stepz")
api("RunConfig(lora=dict)", lambda: RunConfig(lora={"r": 8}), "lora={'r': 8}")
api("with_overrides(optim.lr=nan)", _overrides("optim.lr=nan"), "lr='nan'")
api("with_overrides(target_modules=[a)", _overrides("lora.target_modules=[a"), "[a")
api("with_overrides(mesh.rules x)", _overrides("mesh.rules={embed: [fsdp, x]}"), "'x'")
api("with_overrides(no =)", _overrides("optim.lr"), "'optim.lr'")
api("LlamaConfig(hidden_size=0)", lambda: LlamaConfig(hidden_size=0), "hidden_size=0")


def _with_demo(fn):
    """fn(cfg, params) on the demo model, loaded once (about a second)."""

    def call():
        if "params" not in _DEMO:
            _DEMO["cfg"], _DEMO["params"] = lj.load_pretrained(DEMO_MODEL)
        return fn(_DEMO["cfg"], _DEMO["params"])

    return call


_DEMO: dict = {}


def _init_lora(**kw):
    def fn(cfg, params):
        import jax

        return lj.init_lora(params, LoraConfig(**kw), jax.random.key(0))

    return _with_demo(fn)


def _generate(prompts=((1, 5, 7),), **kw):
    def fn(cfg, params):
        from lora_jax.generate import generate

        return generate(cfg, params, [list(p) for p in prompts], **kw)

    return _with_demo(fn)


api("init_lora(params={})", lambda: lj.init_lora({}, LoraConfig(), None), "'layers'")
api("init_lora(layers_to_transform=[7])", _init_lora(layers_to_transform=[7]), "[7]")
api("init_lora(target_modules=['qproj'])", _init_lora(target_modules=["qproj"]), "'qproj'")
api("init_lora(rank_pattern=nonexistent)", _init_lora(rank_pattern={"nonexistent": 4}), "'nonexistent'")
api("generate(max_new_tokens=0)", _generate(max_new_tokens=0), "max_new_tokens=0")
api("generate(max_new_tokens=2.5)", _generate(max_new_tokens=2.5), "max_new_tokens=2.5")
api("generate(temperature=-1.0)", _generate(temperature=-1.0), "temperature=-1.0")
api("generate(temperature=nan)", _generate(temperature=nan), "temperature=nan")
api("generate(top_k=-3)", _generate(top_k=-3, temperature=1.0), "top_k=-3")
api("generate(top_k=5, greedy)", _generate(top_k=5), "top_k=5 needs sampling")
api("generate(top_k=1000)", _generate(top_k=1000, temperature=1.0), "top_k=1000 exceeds")
api("generate(seed=-1)", _generate(seed=-1), "seed=-1")
api("generate(prompts=[[]])", _generate(prompts=((),)), "prompt 0 is empty")


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Shared inputs; read-only for the cases (they are snapshotted too)."""
    d = tmp_path_factory.mktemp("inputs")
    texts = {
        "bad.yaml": "optim:\n  lr: 1e-4\n  b1: 0.9\n  b2 0.99\n",  # no colon: a scalar where a key belongs
        "list.yaml": "- lora\n- optim\n",
        "section.yaml": "lora: 5\n",
        "unknown_section.yaml": "optimizer: {lr: 1.0e-4}\n",
        "badtype.yaml": "train: {steps: abc}\n",
        "output_num.yaml": "train: {output_dir: 100}\n",
        "nan.yaml": "optim: {lr: .nan}\n",
        "good.yaml": "lora: {r: 4}\n",
        "sweep_badsection.yaml": "train: 5\ngrid: {lora.r: [4]}\n",
        "sweep_badout.yaml": "output_dir: [a]\ngrid: {lora.r: [4]}\n",
        "sweep_badset.yaml": "set: 5\ngrid: {lora.r: [4]}\n",
        "sweep_badvalue.yaml": "optim: {b1: 2}\ngrid: {lora.r: [4]}\n",
        "sweep_unknown.yaml": "steps: 3\ngrid: {lora.r: [4]}\n",
        "empty.jsonl": "",
        "long.jsonl": '{"text": "short"}\n' + json.dumps({"text": "x" * 200}) + "\n",
        "afile": "not a directory\n",
    }
    for name, text in texts.items():
        (d / name).write_text(text)
    (d / "binary.yaml").write_bytes(b"lora:\n  r: \xff\xfe\x00\n")
    (d / "nocfg").mkdir()
    (d / "notok").mkdir()
    for name in os.listdir(DEMO_MODEL):
        if name == "config.json" or name.endswith(".safetensors"):
            shutil.copy(os.path.join(DEMO_MODEL, name), d / "notok" / name)
    (d / "notarun").mkdir()
    (d / "notarun" / "x.txt").write_text("keep me\n")
    (d / "nonempty").mkdir()
    (d / "nonempty" / "x.txt").write_text("keep me\n")
    (d / "fake_run").mkdir()  # a run directory whose run never saved a checkpoint
    (d / "fake_run" / "run.json").write_text(json.dumps({"run": demo_run_config().to_dict(), "model_path": DEMO_MODEL}))
    (d / "fake_run" / "metrics.jsonl").write_text("")
    return d


def _snapshot(*roots) -> dict:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                out[path] = (st.st_size, st.st_mtime_ns) if name in filenames else "dir"
    return out


class Accepted(Exception):
    """Raised where base weights would load: the input got past every check."""


@pytest.fixture
def _accept_guard(monkeypatch):
    import lora_jax.hf.load

    def refuse(*args, **kwargs):
        raise Accepted("the input was accepted: base weights were about to load")

    monkeypatch.setattr(lora_jax.hf.load, "load_pretrained", refuse)


def _fill(text: str, subs: dict) -> str:
    for key, value in subs.items():
        text = text.replace("{" + key + "}", value)
    return text


def _run_main(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # main returns its status; a SystemExit escaping it is a bug, but measured
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------ the table
@pytest.mark.parametrize("argv, expect", CLI)
def test_cli_bad_input(argv, expect, files, tmp_path, monkeypatch, capsys, _accept_guard):
    subs = {"out": str(tmp_path), "files": str(files)}
    argv = [_fill(a, subs) for a in shlex.split(argv)]
    expect = _fill(expect, subs)
    monkeypatch.chdir(tmp_path)
    roots = [str(tmp_path), str(files)]
    before = _snapshot(*roots)
    code, out, err = _run_main(argv, capsys)
    assert "Traceback" not in out + err, err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-jax: error: "), err
    assert expect in lines[0], f"{expect!r} not in {lines[0]!r}"
    assert out == ""
    assert _snapshot(*roots) == before, "files were written or changed"


@pytest.mark.parametrize("fn, expect, exc", API)
def test_api_bad_input(fn, expect, exc):
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    assert expect in message, f"{expect!r} not in {message!r}"
    assert "\n" not in message


def test_the_table_is_large():
    names = [p.id for p in CLI + API]
    assert len(set(names)) == len(names), "case ids must be distinct"
    assert len(names) >= 100, len(names)


# ------------------------------------------------------------------------ the real entry point
def _entry_point() -> list[str]:
    exe = shutil.which("lora-jax") or os.path.join(os.path.dirname(sys.executable), "lora-jax")
    return [exe] if os.path.exists(exe) else helpers.CLI


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["train", "--set", "optim.lr=nan"], "optim.lr='nan'"),
        (["train", "--config", "{tmp}/bad.yaml"], "(while parsing a flow sequence started at line 1, column 7)"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens: -5"),
        (["sweep", "--grid", "lora.r=0,4"], "r=0"),
        (["export", "--checkpoint", "{tmp}/nope", "--peft", "{tmp}/p"], "nope"),
    ],
    ids=["train-nan", "train-bad-yaml", "generate-max-new-tokens", "sweep-grid", "export-no-run"],
)
def test_entry_point_bad_input(argv, expect, tmp_path):
    (tmp_path / "bad.yaml").write_text("lora: [r: 4\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    before = _snapshot(str(tmp_path))
    r = subprocess.run(_entry_point() + argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect.format(tmp=tmp_path) in lines[0], r.stderr
    assert r.stdout == ""
    assert _snapshot(str(tmp_path)) == before


# ------------------------------------------------------------------------ what the fixes keep working
@pytest.mark.parametrize("command", ["train", "sweep", "export", "generate", None])
def test_help_works(command, capsys):
    argv = [command, "--help"] if command else ["--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lora-jax")
    if command == "train":
        assert "--resume" in out and "refused" in out


def test_set_parses_yaml_lists_maps_and_floats():
    run = demo_run_config().with_overrides(
        [
            "lora.target_modules=[gate_proj, up_proj]",
            "mesh.rules={embed: tensor, mlp: [fsdp, tensor]}",
            "optim.lr=1e-4",
            "optim.eps=1E-6",
            "lora.rank_pattern={q_proj: 4}",
            "train.output_dir=1e5",
            "model.path=null",
            "data.eval_file=~",
            "optim.clip_norm=null",
            "lora.init_lora_weights=false",
        ]
    )
    assert run.lora.target_modules == ("gate_proj", "up_proj")
    assert dict(run.mesh.rules) == {"embed": "tensor", "mlp": ("fsdp", "tensor")}
    assert run.optim.lr == 1e-4 and isinstance(run.optim.lr, float) and run.optim.eps == 1e-6
    assert run.lora.rank_pattern == (("q_proj", 4),)
    assert run.train.output_dir == "1e5"  # a text field takes the text as it is
    assert run.model.path is None and run.data.eval_file is None and run.optim.clip_norm is None
    assert run.lora.init_lora_weights is False


def test_yaml_config_reads_1e_minus_4(tmp_path):
    from lora_jax.run_args import load_run_config

    (tmp_path / "c.yaml").write_text("optim: {lr: 1e-4, eps: 1e-8}\nlora: {lora_alpha: 1e1}\n")
    run = load_run_config(str(tmp_path / "c.yaml"))
    assert (run.optim.lr, run.optim.eps, run.lora.lora_alpha) == (1e-4, 1e-8, 10.0)


def test_flag_values_are_taken_as_they_are():
    from lora_jax.cli import _run_config, build_parser

    args = build_parser().parse_args(["train", "--data", "null", "--model", "it's", "--output-dir", "1e5"])
    run = _run_config(args)
    assert (run.data.train_file, run.model.path, run.train.output_dir) == ("null", "it's", "1e5")


def test_warmup_longer_than_the_run_warns(capsys):
    """A warning, not an error: a short smoke run of a config with a long warmup is common and the
    schedule stays sound (the warmup is cut to the run). The CLI prints it as one line."""
    from lora_jax.errors import ConfigWarning

    run = demo_run_config().with_overrides(["train.steps=5"])  # the demo warms up for 20 steps
    with pytest.warns(ConfigWarning, match="optim.warmup_steps=20 exceeds train.steps=5"):
        run.warn_unusual()
    assert demo_run_config().warn_unusual() == []
    # in the CLI: one warning line, then the (here: bad) input's error line
    assert (
        main(
            [
                "train",
                "--set",
                "train.steps=5",
                "--model",
                "/nonexistent/model",
                "--no-progress",
                "--output-dir",
                "/nonexistent/out",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("lora-jax: warning: optim.warmup_steps=20"), err
