"""Sweeps: K adapter configurations in one compiled, vmapped program on the built-in tiny model.

Each adapter of a sweep must end where a single run of its configuration ends (the real single-run
step, `make_train_step`, on the same batches, same seed); padded rank entries must stay exactly zero;
K configurations must cost one trace/compile; the CLI must refuse bad grids with exit status 2 and
write its results, plots and PEFT adapters.

fp32 tolerance used for "equal to a single run": on every adapter leaf |sweep - single| <= 1e-4 +
1e-4 * |single| per entry and ||sweep - single|| <= 5e-5 * ||single||; 1e-5 on every per-step loss;
the scales exactly. The sweep differs from a single run only in summation order (padded ranks add
exact zeros, the global-norm clip sums padded leaves, XLA fuses the vmapped program differently).
AdamW divides by sqrt(v), so an entry whose gradient is ~1e-8 can move by a visible fraction of a
step on such rounding: after 12 steps at lr 5e-3 the largest entry gap observed is 3.1e-5 (0.6% of
one step), the largest relative leaf-norm gap 1.6e-5, and most leaves agree to ~1e-7.
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.cli import main
from lora_jax.demo import DEMO_MODEL, demo_run_config
from lora_jax.errors import ConfigError
from lora_jax.sweep import ALLOWED_KEYS, expand_grid, parse_grid_args, stack_trees, unstack_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
ATOL, RTOL, REL_NORM = 1e-4, 1e-4, 5e-5

# Three configurations that differ in every swept value at once (rank, alpha, rsLoRA, lr, weight
# decay, dropout), so a mixed-up index (adapter k trained with k's rank but another's lr, scale,
# decay or dropout) cannot pass.
POINTS = [
    {"lora.r": 2, "lora.lora_alpha": 4, "optim.lr": 2e-3},
    {
        "lora.r": 4,
        "lora.lora_alpha": 16,
        "optim.lr": 5e-3,
        "optim.weight_decay": 0.1,
        "lora.use_rslora": True,
        "lora.lora_dropout": 0.1,
    },
    {"lora.r": 8, "lora.lora_alpha": 8, "optim.lr": 1e-3, "optim.weight_decay": 0.05, "lora.lora_dropout": 0.2},
]


SETS = [
    f"train.steps={STEPS}",
    "train.batch_size=4",
    "train.eval_generate=4",
    "train.max_new_tokens=8",
    "train.eval_batches=1",
    "optim.warmup_steps=3",
    "lora.target_modules=[q_proj,v_proj,down_proj]",
]


def _run():
    return demo_run_config().with_overrides(SETS)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    return lora_jax.sweep(_run(), POINTS, output_dir=str(out), progress=False)


# ------------------------------------------------------------------------------------- equivalence
def test_each_adapter_equals_its_single_run(swept):
    """The real single-run path (init_lora, split_trainable, make_schedule, make_tx, init_state,
    make_train_step) on the same batches ends at the same adapter and the same per-step losses."""
    import transformers

    from lora_jax.data import DataLoader, build_datasets
    from lora_jax.hf.load import load_pretrained
    from lora_jax.lora.tree import combine, init_lora, split_trainable
    from lora_jax.models.llama import Llama
    from lora_jax.train.step import init_state, make_schedule, make_train_step, make_tx

    run = _run()
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    datasets = build_datasets(run.data, tokenizer)
    cfg, params = load_pretrained(DEMO_MODEL, dtype="float32")
    model = Llama(cfg)
    loader = DataLoader(datasets.train_rows, run.train.batch_size, run.data.seed)
    batches = [next(loader) for _ in range(STEPS)]
    for k, point in enumerate(swept.points):
        r = point.run
        lora = init_lora(params, r.lora, jax.random.key(r.train.seed))
        split = split_trainable(params, lora, r.lora)
        schedule = make_schedule(r.optim, r.train.steps)
        tx = make_tx(r.lora, r.optim, schedule)
        state = init_state(split.trainable, tx, r.train.seed)
        step = make_train_step(
            model, cfg, r.lora, tx, schedule, chunk_tokens=r.model.loss_chunk_tokens, use_segments=r.data.packing
        )
        losses = []
        for batch in batches:
            state, metrics = step(state, split.frozen, batch)
            losses.append(float(metrics["loss"]))
        _, single = combine(state.trainable, split.frozen)
        mine, lcfg = swept.adapter(k)
        assert lcfg == r.lora
        assert jax.tree.structure(mine) == jax.tree.structure(single)
        for path, got in jax.tree_util.tree_leaves_with_path(mine):
            want = _at(single, path)
            assert got.shape == want.shape, (point.name, path)
            np.testing.assert_allclose(
                np.asarray(got),
                np.asarray(want),
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"{point.name} {jax.tree_util.keystr(path)}",
            )
            diff = np.linalg.norm(np.asarray(got) - np.asarray(want))
            assert diff <= REL_NORM * np.linalg.norm(np.asarray(want)), (point.name, path, diff)
        np.testing.assert_allclose(swept.train_loss[:, k], losses, rtol=0, atol=1e-5, err_msg=point.name)
        assert not np.allclose(np.asarray(jax.tree.leaves(mine)[1]), 0)  # b trained away from 0


def _at(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def test_padded_rank_entries_stay_exactly_zero(swept):
    """r = 2, 4, 8 padded to 8: entries past each adapter's own rank, in A, B and both AdamW
    moments, are exactly 0 after training (with weight decay and dropout on one of them)."""
    rmax = max(p["lora.r"] for p in POINTS)
    a_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(swept.state.trainable) if path[-1].key == "a"]
    assert a_leaves and all(a.shape[-1] == rmax for a in a_leaves)
    checked = 0
    for path, x in jax.tree_util.tree_leaves_with_path(swept.state):
        leaf = getattr(path[-1], "key", None)
        if leaf not in ("a", "b"):
            continue
        x = np.asarray(x)
        for k, p in enumerate(POINTS):
            r = p["lora.r"]
            pad = x[k, ..., r:] if leaf == "a" else x[k, ..., r:, :]
            real = x[k, ..., :r] if leaf == "a" else x[k, ..., :r, :]
            if r < rmax:
                assert pad.size and np.all(pad == 0), (jax.tree_util.keystr(path), k)
                checked += 1
            assert np.any(real != 0), (jax.tree_util.keystr(path), k)
    assert checked == 2 * 2 * 3 * 3  # 2 padded configs x (a, b) x 3 modules x (param, mu, nu)


def test_one_compile_for_all_configurations(swept):
    assert len(swept.points) == len(POINTS)
    assert swept.compiles == {"train_step": 1, "eval_step": 1}


def test_exports_results_and_plots(swept):
    from lora_jax.hf.load import load_pretrained
    from lora_jax.hf.peft import load_peft

    out = swept.output_dir
    _, params = load_pretrained(DEMO_MODEL, dtype="float32")
    for k, point in enumerate(swept.points):
        d = os.path.join(out, "adapters", point.name)
        with open(os.path.join(d, "adapter_config.json")) as f:
            conf = json.load(f)
        assert (conf["r"], conf["lora_alpha"], conf["use_rslora"]) == (
            point.run.lora.r,
            point.run.lora.lora_alpha,
            point.run.lora.use_rslora,
        )
        loaded, lcfg = load_peft(d, params)
        mine, _ = swept.adapter(k)
        for path, got in jax.tree_util.tree_leaves_with_path(loaded):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(_at(mine, path)))
        a = jax.tree.leaves(loaded["layers"]["self_attn"]["q_proj"])[0]
        assert a.shape[-1] == point.run.lora.r  # no padding in the export
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [p.name for p in swept.points]
    for key in (*ALLOWED_KEYS, "train_loss_final", "eval_loss", "exact_match", "steps"):
        assert all(r[key] != "" for r in rows), key
    with open(os.path.join(out, "results.json")) as f:
        rec = json.load(f)
    assert len(rec["rows"]) == len(POINTS) and rec["compiles"]["train_step"] == 1
    assert all(len(v) == STEPS for v in rec["train_loss"].values())
    for png in ("loss_curves.png", "heatmap.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for r in swept.rows:
        assert r["eval_loss"] < r["eval_loss_before"]
        assert 0.0 <= r["exact_match"] <= 1.0


# --------------------------------------------------------------------------------------- the grid
def test_grid_parser_and_product():
    grid = parse_grid_args(["lora.r=4,8,16,32", "lora.lora_alpha=8,16,32", "optim.lr=1e-4,3e-4"])
    assert grid == {"lora.r": [4, 8, 16, 32], "lora.lora_alpha": [8, 16, 32], "optim.lr": [1e-4, 3e-4]}
    assert all(isinstance(v, int) for v in grid["lora.r"])
    assert parse_grid_args(["lora.use_rslora=false,true"]) == {"lora.use_rslora": [False, True]}
    points = expand_grid(demo_run_config(), grid)
    assert len(points) == 24 and len({p.name for p in points}) == 24
    assert points[0].name == "r4_alpha8_lr0.0001"
    assert (points[-1].run.lora.r, points[-1].run.lora.lora_alpha, points[-1].run.optim.lr) == (32, 32, 3e-4)
    assert points[-1].run.lora.target_modules == demo_run_config().lora.target_modules


def test_grid_values_are_parsed_by_their_field():
    """Grid text is read by the field's annotation, as --set reads it: a list value stays one value
    (commas inside brackets do not split it), so a list field is refused by name, not mis-split."""
    from lora_jax.sweep import parse_grid_arg, parse_grid_value, split_grid_values

    assert split_grid_values("[q_proj, v_proj],all-linear") == ["[q_proj, v_proj]", "all-linear"]
    assert split_grid_values("4, 8,16") == ["4", "8", "16"]
    assert parse_grid_value("lora.target_modules", "[q_proj, v_proj]") == ["q_proj", "v_proj"]
    assert parse_grid_value("lora.target_modules", "all-linear") == "all-linear"
    assert parse_grid_value("optim.lr", "1e-4") == 1e-4 and parse_grid_value("lora.r", "8") == 8
    with pytest.raises(ConfigError, match="lora.layers_to_transform=.*; use"):
        parse_grid_value("lora.layers_to_transform", "[a]")
    with pytest.raises(ConfigError, match="'lora.target_modules' cannot be swept"):
        parse_grid_arg("lora.target_modules=[q_proj, v_proj],all-linear")
    with pytest.raises(ConfigError, match="grid lora.r='4.5' must be an integer"):
        parse_grid_arg("lora.r=4,4.5")


def test_sweep_file_text_values_are_parsed_by_their_field(tmp_path):
    from lora_jax.cli import build_parser
    from lora_jax.sweep_cli import build_sweep

    spec = tmp_path / "s.yaml"
    spec.write_text(
        'lora: {target_modules: "[q_proj, v_proj]"}\ntrain: {output_dir: "1e5"}\ngrid: {lora.r: ["4", 8]}\n'
    )
    run, grid, _ = build_sweep(build_parser().parse_args(["sweep", "--sweep", str(spec)]))
    assert (run.lora.target_modules, run.train.output_dir, grid) == (("q_proj", "v_proj"), "1e5", {"lora.r": [4, 8]})
    spec.write_text("optim: {lr: fast}\ngrid: {lora.r: [4]}\n")
    with pytest.raises(ConfigError, match=r"--sweep .*s.yaml: optim.lr='?fast'?; use a number"):
        build_sweep(build_parser().parse_args(["sweep", "--sweep", str(spec)]))


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"lora.target_modules": [["q_proj"]]}, "cannot be swept.*allowed keys: lora.r"),
        ({"lora.rr": [4]}, "did you mean lora.r"),
        ({"lora.r": []}, "no values"),
        ({}, "grid is empty"),
        ({"lora.r": [4, 4]}, "repeats"),
        ({"lora.r": [0]}, "r=0 must be a positive integer"),
        ({"optim.lr": ["fast"]}, "must be a number"),
        ({"lora.use_rslora": [1]}, "true or false"),
    ],
)
def test_bad_grids_are_config_errors(grid, match):
    with pytest.raises(ConfigError, match=match):
        expand_grid(demo_run_config(), grid)


def test_pissa_is_refused():
    run = demo_run_config().with_overrides(["lora.init_lora_weights=pissa"])
    with pytest.raises(ConfigError, match="pissa"):
        lora_jax.sweep(run, {"lora.r": [4, 8]}, progress=False)


def test_missing_matplotlib_is_one_config_error_before_training(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"need matplotlib.*pip install 'lora-jax\[plots\]'"):
        lora_jax.sweep(_run(), {"lora.r": [4]}, output_dir=str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_stack_unstack_round_trip():
    trees = [{"a": jnp.ones((3, 2)), "s": jnp.float32(k)} for k in range(2)]
    trees[1]["a"] = jnp.full((3, 5), 2.0)
    stacked, shapes = stack_trees(trees)
    assert stacked["a"].shape == (2, 3, 5) and float(stacked["a"][0, :, 2:].sum()) == 0.0
    for k in range(2):
        back = unstack_tree(stacked, k, shapes)
        assert back["a"].shape == trees[k]["a"].shape
        np.testing.assert_array_equal(back["a"], trees[k]["a"])


# -------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grid", "lora.r"], "is not KEY=V1,V2"),
        (["--grid", "lora.r=4,,8"], "has an empty value"),
        (["--grid", "lora.r="], "has an empty value"),
        (["--grid", "=4,8"], "has no key"),
        (["--grid", "lora.target_modules=q_proj"], "cannot be swept"),
        (["--grid", "model.path=x"], "allowed keys: lora.r, lora.lora_alpha"),
        (["--grid", "lora.r=4", "--grid", "lora.r=8"], "given twice"),
        (["--sweep", "no/such/file.yaml"], "no such file"),
        (["--adapters-per-pass", "0"], "--adapters-per-pass 0: use a positive integer"),
    ],
)
def test_cli_bad_grid_exits_2(argv, message, capsys, tmp_path):
    assert main(["sweep", "--output-dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-jax: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_sweep_file_layering(tmp_path):
    from lora_jax.cli import build_parser
    from lora_jax.sweep_cli import build_sweep

    path = os.path.join(REPO, "experiments", "sweeps", "demo_rank_alpha.yaml")
    args = build_parser().parse_args(
        ["sweep", "--sweep", path, "--grid", "optim.lr=1e-3,2e-3", "--set", "train.steps=7"]
    )
    run, grid, out = build_sweep(args)
    assert grid == {"lora.r": [4, 8, 16, 32], "lora.lora_alpha": [8, 16, 32], "optim.lr": [1e-3, 2e-3]}
    assert (run.train.steps, run.train.batch_size, run.optim.warmup_steps) == (7, 32, 20)
    assert out == "runs/sweep-rank-alpha"
    good = tmp_path / "good.yaml"
    good.write_text("optim: {lr: 1e-4}\nset: {train.batch_size: 8}\ngrid: {lora.r: [4, 8]}\n")
    run, grid, out = build_sweep(build_parser().parse_args(["sweep", "--sweep", str(good)]))
    assert (run.optim.lr, run.train.batch_size, grid, out) == (1e-4, 8, {"lora.r": [4, 8]}, "runs/sweep")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {lora.r: [4]}\nsteps: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        build_sweep(build_parser().parse_args(["sweep", "--sweep", str(bad)]))
    for name in os.listdir(os.path.join(REPO, "experiments", "sweeps")):
        if name.endswith(".yaml"):  # every shipped sweep file parses and expands
            run, grid, _ = build_sweep(
                build_parser().parse_args(["sweep", "--sweep", os.path.join(REPO, "experiments", "sweeps", name)])
            )
            assert expand_grid(run, grid)


def test_cli_end_to_end(swept, tmp_path, capsys):
    """`lora-jax sweep --sweep FILE` with the fixture's configurations (a list in the file), so it
    runs the very program the fixture compiled (the persistent compilation cache serves it)."""
    import yaml

    spec = tmp_path / "points.yaml"
    spec.write_text(yaml.safe_dump({"grid": POINTS, "set": SETS}))
    out = tmp_path / "sw"
    argv = ["sweep", "--sweep", str(spec), "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "best first" in text and "1 compile(s)" in text
    for name in ("results.csv", "results.json", "loss_curves.png", "heatmap.png", "sweep.json"):
        assert (out / name).is_file(), name
    names = [p.name for p in swept.points]
    assert sorted(os.listdir(out / "adapters")) == sorted(names)
    for name in names:
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names
    for r, mine in zip(rows, swept.rows):  # the same training, so the same numbers
        assert float(r["train_loss_final"]) == pytest.approx(mine["train_loss_final"], abs=1e-6)
    assert main(argv) == 2  # a second sweep into the same directory needs --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_sweep_axis_sharded_over_a_mesh(swept):
    """With a mesh, the K axis of the adapter/optimizer state is split over its data axis (one
    configuration per device here) and the results are those of the unsharded sweep (fp32, up to
    summation order: |diff| <= 1e-4 on adapter entries, 1e-5 on losses)."""
    from lora_jax.sharding import make_mesh

    mesh = make_mesh(data=len(POINTS), fsdp=1, tensor=1, devices=jax.devices()[: len(POINTS)])
    res = lora_jax.sweep(_run(), POINTS, progress=False, mesh=mesh)
    a = jax.tree.leaves(res.state.trainable)[0]
    assert a.sharding.spec[0] == "data" and len(a.sharding.device_set) == len(POINTS)
    assert res.compiles == {"train_step": 1, "eval_step": 1}
    np.testing.assert_allclose(res.train_loss, swept.train_loss, rtol=0, atol=1e-5)
    for k in range(len(POINTS)):
        got, _ = res.adapter(k)
        want, _ = swept.adapter(k)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="do not divide over the mesh"):
        lora_jax.sweep(_run(), POINTS[:2], progress=False, mesh=mesh)


@pytest.mark.parametrize("per_pass", [None, 2])
def test_adapters_per_pass_trains_the_same(swept, per_pass):
    """All K vmapped at once (None) and two per pass (3 = 2 + a remainder of 1) end where the
    default (one per pass on a CPU) ends: the same adapters and losses, up to summation order."""
    from lora_jax.sweep import resolve_adapters_per_pass

    assert resolve_adapters_per_pass("auto") == (1 if jax.default_backend() == "cpu" else None)
    res = lora_jax.sweep(_run(), POINTS, progress=False, adapters_per_pass=per_pass, export=False)
    assert res.compiles == {"train_step": 1, "eval_step": 1}
    np.testing.assert_allclose(res.train_loss, swept.train_loss, rtol=0, atol=1e-5)
    for k in range(len(POINTS)):
        for x, y in zip(jax.tree.leaves(res.adapter(k)[0]), jax.tree.leaves(swept.adapter(k)[0])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [0, -1, 1.5, "two", True])
def test_bad_adapters_per_pass_is_a_config_error(value):
    from lora_jax.sweep import resolve_adapters_per_pass

    with pytest.raises(ConfigError, match="adapters_per_pass"):
        resolve_adapters_per_pass(value)


def test_ranking_metric_is_one_that_tells_configurations_apart():
    from lora_jax.sweep import metric_of as _metric_of
    from lora_jax.sweep import rank_rows as _rank

    rows = [{"exact_match": 0.0, "eval_loss": 2.0}, {"exact_match": 0.0, "eval_loss": 1.5}]
    assert _metric_of(rows) == "eval_loss"
    assert [r["eval_loss"] for r in _rank(rows, "eval_loss")] == [1.5, 2.0]
    rows[0]["exact_match"] = 0.5
    assert _metric_of(rows) == "exact_match"
    assert _rank(rows, "exact_match")[0]["exact_match"] == 0.5
    assert _metric_of([{"exact_match": None, "eval_loss": None, "train_loss_final": 1.0}]) == "train_loss_final"
