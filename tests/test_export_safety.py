"""Exports never destroy what they did not write: a non-empty target is refused (every byte left as
it was) unless overwrite, which replaces only a previous export; a file at the target is refused; a
failure mid-write leaves the old target and no temporary; and the CLI says so in one line."""

import hashlib
import os

import jax
import pytest

import lora_jax as lj
from lora_jax.cli import main
from lora_jax.demo import DEMO_MODEL
from lora_jax.export import export_checkpoint
from lora_jax.hf.save import is_previous_export, parse_size
from tests.helpers import cli_error

QUICK = [
    "--set",
    "train.steps=2",
    "--set",
    "train.save_every=2",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_generate=0",
    "--set",
    "train.eval_batches=1",
    "--no-progress",
]


def snapshot(root) -> dict:
    """Every file and directory under `root` (and `root` itself): path -> sha256 (None for dirs)."""
    root = os.fspath(root)
    if os.path.isfile(root):
        with open(root, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    out = {".": None}
    for parent, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(parent, d), root)] = None
        for name in files:
            with open(os.path.join(parent, name), "rb") as f:
                out[os.path.relpath(os.path.join(parent, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def user_dir(path):
    """A directory of someone's own files, one of them in a subdirectory."""
    os.makedirs(os.path.join(path, "notes"))
    with open(os.path.join(path, "results.csv"), "w") as f:
        f.write("r,loss\n4,1.25\n")
    with open(os.path.join(path, "notes", "todo.txt"), "w") as f:
        f.write("do not delete\n")
    return os.fspath(path)


def leftovers(parent, name):
    """Temporaries (or set-aside old exports) an export left beside `name`."""
    return sorted(f for f in os.listdir(parent) if f.startswith(name + "."))


@pytest.fixture(scope="module")
def demo():
    cfg, params = lj.load_pretrained(DEMO_MODEL)
    lcfg = lj.LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"))
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    # a second adapter with different weights, to tell an export of one from the other
    lora2 = jax.tree.map(lambda x: x + 0.5 if x.ndim == 3 else x, lora)
    return cfg, params, lcfg, lora, lora2


def _save(kind, out, demo, second=False, **kw):
    cfg, params, lcfg, lora, lora2 = demo
    lo = lora2 if second else lora
    if kind == "peft":
        return lj.save_peft(out, lo, lcfg, cfg, **kw)
    return lj.save_pretrained(out, params, cfg, lora=lo, lcfg=lcfg, tokenizer_dir=DEMO_MODEL, **kw)


KINDS = ["peft", "merged"]


@pytest.mark.parametrize("kind", KINDS)
def test_non_empty_dir_refused_untouched(demo, tmp_path, kind):
    out = user_dir(tmp_path / "mine")
    before = snapshot(out)
    with pytest.raises(lj.ConfigError, match=rf"{out} is not empty.*--overwrite") as e:
        _save(kind, out, demo)
    assert "\n" not in str(e.value)
    # overwrite replaces only a previous export: this is not one
    with pytest.raises(lj.ConfigError, match=rf"{out} is not a previous .*results.csv.*even with --overwrite"):
        _save(kind, out, demo, overwrite=True)
    assert snapshot(out) == before
    assert leftovers(tmp_path, "mine") == []


@pytest.mark.parametrize("kind", KINDS)
def test_previous_export_with_a_user_file_is_not_an_export(demo, tmp_path, kind):
    out = tmp_path / "exp"
    _save(kind, out, demo)
    (out / "README.md").write_text("my model card\n")
    before = snapshot(out)
    with pytest.raises(lj.ConfigError, match="README.md.*even with --overwrite"):
        _save(kind, out, demo, second=True, overwrite=True)
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_replaces_a_previous_export(demo, tmp_path, kind):
    out, ref = tmp_path / "exp", tmp_path / "ref"
    first = _save(kind, out, demo)
    assert first == os.fspath(out) and is_previous_export(out, "peft" if kind == "peft" else "model")
    (tmp_path / "plain").mkdir()  # the export has the permissions of any new directory (umask), not 0700
    assert os.stat(out).st_mode == os.stat(tmp_path / "plain").st_mode
    (tmp_path / "plain").rmdir()
    before = snapshot(out)
    with pytest.raises(lj.ConfigError, match="--overwrite"):
        _save(kind, out, demo, second=True)
    assert snapshot(out) == before
    _save(kind, out, demo, second=True, overwrite=True)
    _save(kind, ref, demo, second=True)
    assert snapshot(out) == snapshot(ref) != before
    assert leftovers(tmp_path, "exp") == []
    # an empty directory is no one's data: written without overwrite
    (tmp_path / "empty").mkdir()
    _save(kind, tmp_path / "empty", demo, second=True)
    assert snapshot(tmp_path / "empty") == snapshot(ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_file_at_target_refused_untouched(demo, tmp_path, kind, overwrite):
    target = tmp_path / "adapter"
    target.write_bytes(b"someone's file")
    with pytest.raises(lj.ConfigError, match=rf"{target} is a file, not a directory"):
        _save(kind, target, demo, overwrite=overwrite)
    assert target.read_bytes() == b"someone's file"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.parametrize("kind", KINDS)
def test_failure_mid_write_keeps_the_old_export(demo, tmp_path, monkeypatch, kind):
    out = tmp_path / "exp"
    _save(kind, out, demo)
    before = snapshot(out)
    from safetensors.numpy import save_file

    calls = []

    def fail_on_second_shard(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2 or kind == "peft":
            save_file(tensors, path, *a, **k)  # a file really lands in the temporary first
            raise OSError("disk full")
        return save_file(tensors, path, *a, **k)

    module = "lora_jax.hf.peft" if kind == "peft" else "lora_jax.hf.save"
    monkeypatch.setattr(f"{module}.save_file", fail_on_second_shard)
    kw = {} if kind == "peft" else {"max_shard_size": 100_000}  # several shards: fail after the first
    with pytest.raises(OSError, match="disk full"):
        _save(kind, out, demo, second=True, overwrite=True, **kw)
    assert calls and all(os.path.dirname(p) != os.fspath(out) for p in calls)  # never into the target
    assert snapshot(out) == before
    assert leftovers(tmp_path, "exp") == []
    # and into a new path: nothing at all is left
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        _save(kind, tmp_path / "new", demo, **kw)
    assert sorted(os.listdir(tmp_path)) == ["exp"]


def test_shard_size_forms():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500mb") == 5 * 10**8
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("2 KiB") == 2048
    assert parse_size(123) == parse_size("123") == 123
    for bad in ("lots", "5XB", "-1GB", "0", "1.5", "", True, 1.0):
        with pytest.raises(lj.ConfigError, match=r"max_shard_size=.* (is not a size|byte).*5GB, 500MB"):
            parse_size(bad)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--output-dir", str(run), *QUICK]) == 0
    return run


@pytest.mark.parametrize("flag", ["--peft", "--merged"])
def test_cli_export_into_non_empty_dir_refused_untouched(run_dir, tmp_path, capsys, flag):
    out = user_dir(tmp_path / "mine")
    before = snapshot(out)
    err = cli_error(capsys, ["export", "--checkpoint", str(run_dir), flag, out])
    assert out in err and "--overwrite" in err
    assert snapshot(out) == before
    # a file, too
    (tmp_path / "f").write_text("x")
    err = cli_error(capsys, ["export", "--checkpoint", str(run_dir), flag, str(tmp_path / "f")])
    assert "is a file" in err and (tmp_path / "f").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["f", "mine"]


def test_training_export_is_a_previous_export(run_dir, tmp_path):
    """RUN/adapter, written by the training loop, is recognised as an export: re-exporting into it
    needs overwrite (so a resumed run's loop passes overwrite=True) and then replaces it."""
    adapter = run_dir / "adapter"
    assert is_previous_export(adapter, "peft")
    before = snapshot(adapter)
    with pytest.raises(lj.ConfigError, match="--overwrite"):
        export_checkpoint(str(run_dir), peft_dir=str(adapter))
    assert snapshot(adapter) == before
    written = export_checkpoint(str(run_dir), peft_dir=str(adapter), merged_dir=str(tmp_path / "m"), overwrite=True)
    assert written == {"step": 2, "peft": str(adapter), "merged": str(tmp_path / "m")}
    assert snapshot(adapter) == before  # the same checkpoint, written again
    assert is_previous_export(tmp_path / "m", "model")
    assert leftovers(run_dir, "adapter") == []


def test_cli_overwrite_flag(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(run_dir), "--merged", str(out)]) == 0
    first = snapshot(out)
    assert main(["export", "--checkpoint", str(run_dir), "--merged", str(out), "--overwrite"]) == 0
    assert snapshot(out) == first
    mine = user_dir(tmp_path / "mine")
    before = snapshot(mine)
    err = cli_error(capsys, ["export", "--checkpoint", str(run_dir), "--peft", mine, "--overwrite"])
    assert "not a previous" in err and snapshot(mine) == before


def test_cli_export_without_checkpoint_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    err = cli_error(capsys, ["export", "--checkpoint", str(run), "--peft", str(tmp_path / "a")])
    assert f"{run} has no checkpoint yet: train it first (lora-jax train --output-dir {run}" in err
    assert "None" not in err and "available" not in err
    assert sorted(os.listdir(run)) == ["run.json"]  # nothing created in the run either
    assert not (tmp_path / "a").exists()


def test_cli_bad_shard_size_one_line(run_dir, tmp_path, capsys):
    err = cli_error(
        capsys, ["export", "--checkpoint", str(run_dir), "--merged", str(tmp_path / "m"), "--max-shard-size", "lots"]
    )
    assert "max_shard_size (--max-shard-size)='lots' is not a size" in err and "5GB" in err
    assert os.listdir(tmp_path) == []


def test_peft_and_merged_into_one_dir_refused(run_dir, tmp_path):
    with pytest.raises(lj.ConfigError, match="give each its own directory"):
        export_checkpoint(str(run_dir), peft_dir=str(tmp_path / "x"), merged_dir=str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


def test_symlink_at_target_refused(demo, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with pytest.raises(lj.ConfigError, match="is a symbolic link"):
        _save("peft", tmp_path / "link", demo)
    assert os.path.islink(tmp_path / "link") and os.listdir(real) == []
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
