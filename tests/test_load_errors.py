"""Bad model directories: each refused with a message that names the problem and the fix."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama, dst)
    return dst


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        d = json.load(f)
    d.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(d, f)


def _edit_weights(path, fn):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_not_llama(model_copy):
    _edit_config(model_copy, model_type="gpt_neox")
    with pytest.raises(lj.ConfigError, match="model_type='gpt_neox' is not supported; lora_jax implements 'llama'"):
        lj.load_pretrained(model_copy)


def test_unsupported_rope(model_copy):
    _edit_config(model_copy, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(lj.ConfigError, match="rope type 'yarn' is not implemented"):
        lj.load_pretrained(model_copy)


def test_missing_config(model_copy):
    os.remove(model_copy / "config.json")
    with pytest.raises(lj.ConfigError, match="no config.json"):
        lj.load_pretrained(model_copy)


def test_pickled_weights_refused(model_copy):
    os.remove(model_copy / "model.safetensors")
    (model_copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(lj.CheckpointFormatError, match="never unpickles"):
        lj.load_pretrained(model_copy)


def test_missing_and_unexpected_keys_listed(model_copy):
    def edit(t):
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
        del t["model.layers.1.self_attn.k_proj.weight"]

    _edit_weights(model_copy, edit)
    with pytest.raises(
        lj.CheckpointFormatError,
        match=r"missing tensors: model.layers.1.self_attn.k_proj.weight; "
        r"unexpected tensors: model.layers.0.mlp.extra.weight",
    ):
        lj.load_pretrained(model_copy)


def test_shape_mismatch_names_key_and_shapes(model_copy):
    _edit_weights(model_copy, lambda t: t.update({"model.norm.weight": np.ones((7,), np.float32)}))
    with pytest.raises(lj.CheckpointFormatError, match=r"model.norm.weight has shape \[7\].*implies \[32\]"):
        lj.load_pretrained(model_copy)


def test_truncated_file(model_copy):
    file = model_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(lj.CheckpointFormatError, match="truncated"):
        lj.load_pretrained(model_copy)


def test_save_pretrained_round_trip_is_identical(tiny_llama, tmp_path):
    """transformers -> load_pretrained -> save_pretrained -> the same tensors, sharded too."""
    cfg, params = lj.load_pretrained(tiny_llama)
    for shard in ("5GB", "20KB"):
        out = tmp_path / f"out_{shard}"
        lj.save_pretrained(out, params, cfg, max_shard_size=shard)
        a = load_file(os.path.join(tiny_llama, "model.safetensors"))
        files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
        b = {}
        for f in files:
            b.update(load_file(os.path.join(out, f)))
        assert set(a) == set(b)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert (len(files) > 1) == (shard == "20KB")
