"""Sharded training on 8 CPU devices: the same losses and adapters as one device, every leaf at
its rule's sharding, checkpoints that move between mesh shapes, and 1/8 of the memory per device."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import lora_jax as lj
from lora_jax.checkpoint import Checkpointer
from lora_jax.config import OptimConfig
from lora_jax.demo import DEMO_MODEL
from lora_jax.sharding import DEFAULT_RULES, logical_axes, spec_for
from lora_jax.train.step import init_state, make_schedule, make_train_step, make_tx, shard_state
from tests.helpers import CLI, REPO, unpacked_batch

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
STEPS = 3
# fp32 with different reduction orders across shards: a few ulps of the loss, relative 1e-5.
RTOL, ATOL = 1e-5, 1e-6


def _batches(n, batch=8, seq=32):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(5, 99, (batch, seq)).astype(np.int32)
        out.append(unpacked_batch(ids, np.roll(ids, -1, 1), (rng.random((batch, seq)) > 0.2).astype(np.float32)))
    return out


def _setup(mesh):
    cfg, params = lj.load_pretrained(DEMO_MODEL, mesh=mesh)
    lcfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lora = lj.lora.tree.init_lora(params, lcfg, jax.random.key(0))
    split = lj.split_trainable(params, lora, lcfg)
    ocfg = OptimConfig(lr=1e-2)
    sched = make_schedule(ocfg, 10)
    tx = make_tx(lcfg, ocfg, sched)
    state, frozen, sh = shard_state(init_state(split.trainable, tx, 0), split.frozen, mesh, DEFAULT_RULES)
    step = make_train_step(lj.Llama(cfg), cfg, lcfg, tx, sched, use_segments=False, jit_kwargs=sh.step_jit_kwargs())
    return state, frozen, sh, step


def _run(mesh, n=STEPS):
    state, frozen, sh, step = _setup(mesh)
    losses = []
    for b in _batches(n):
        state, m = step(state, frozen, sh.put_batch(b))
        losses.append(float(m["loss"]))
    return losses, state, frozen


@pytest.fixture(scope="module")
def single():
    return _run(lj.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", MESHES, ids=[f"{d}x{f}x{t}" for d, f, t in MESHES])
def test_sharded_step_equals_single_device(single, shape):
    mesh = lj.make_mesh(*shape)
    losses, state, frozen = _run(mesh)
    np.testing.assert_allclose(losses, single[0], rtol=RTOL)
    for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(single[1].trainable)):
        # Adam moves a coordinate whose gradient is near eps by about lr whatever its size, so
        # rounding from another reduction order can show there; a sharding bug differs by whole
        # steps (lr = 1e-2), 20x this tolerance
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-4)
    # every leaf sits at its rule's sharding
    for tree in (frozen, state.trainable):
        for path, leaf in traverse_util.flatten_dict(tree).items():
            expected = spec_for(logical_axes(path, leaf.ndim), leaf.shape, mesh, DEFAULT_RULES)
            assert leaf.sharding.spec == expected, (path, leaf.sharding.spec, expected)
    q = frozen["params"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads]
    shard = q.addressable_shards[0].data.shape
    assert shard[1] == q.shape[1] // mesh.shape["fsdp"] and shard[2] == q.shape[2] // mesh.shape["tensor"]


def test_fsdp_memory_per_device_is_an_eighth():
    mesh = lj.make_mesh(1, 8, 1)
    _, params = lj.load_pretrained(DEMO_MODEL, mesh=mesh)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    dev0 = jax.devices()[0]
    on_dev0 = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == dev0)
    ratio = on_dev0 / total
    print(f"\nper-device parameter bytes on the (1,8,1) mesh: {on_dev0} of {total} = {ratio:.4f}")
    assert ratio < 1 / 8 + 0.01  # norms (replicated) are the only excess


def test_checkpoint_restores_on_another_mesh(tmp_path):
    batches = _batches(STEPS + 1)
    mesh_a, mesh_b = lj.make_mesh(2, 2, 2), lj.make_mesh(1, 2, 4)
    state, frozen, sh, step = _setup(mesh_a)
    for b in batches[:STEPS]:
        state, _ = step(state, frozen, sh.put_batch(b))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(STEPS, state, {"note": "mesh 2x2x2"})
    ckpt.wait()
    _, loss_a = step(state, frozen, sh.put_batch(batches[STEPS]))

    target, frozen_b, sh_b, step_b = _setup(mesh_b)
    restored, meta = ckpt.restore(STEPS, target)
    ckpt.close()
    assert meta == {"note": "mesh 2x2x2"} and int(restored.step) == STEPS
    a = restored.trainable["lora"]["layers"]["mlp"]["up_proj"]["a"]
    assert a.sharding.mesh.shape == mesh_b.shape
    _, loss_b = step_b(restored, frozen_b, sh_b.put_batch(batches[STEPS]))
    np.testing.assert_allclose(float(loss_b["loss"]), float(loss_a["loss"]), rtol=RTOL)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        lj.make_mesh(3, -1, 1)
    with pytest.raises(ValueError, match="at most one may be -1"):
        lj.make_mesh(-1, -1, 1)
    assert dict(lj.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_two_processes_match_one(tmp_path):
    """A real two-process run (JAX distributed runtime on the CPU, 2 processes x 4 devices) trains,
    checkpoints and ends where one process with 8 devices ends."""
    import os
    import socket
    import subprocess

    from lora_jax.session import load_run

    args = [
        "--no-progress",
        "--set",
        "train.steps=4",
        "--set",
        "train.save_every=2",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.eval_generate=0",
        "--set",
        "train.eval_batches=1",
    ]
    base_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [*CLI, "train", "--output-dir", str(tmp_path / "one"), *args],
            env=dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    ]
    for pid in (0, 1):
        env = dict(
            base_env,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            LORA_JAX_COORDINATOR=f"localhost:{port}",
            LORA_JAX_NUM_PROCESSES="2",
            LORA_JAX_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                [*CLI, "train", "--output-dir", str(tmp_path / "two"), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode()[-2000:]
    one, two = load_run(str(tmp_path / "one")), load_run(str(tmp_path / "two"))
    assert one[5] == two[5] == 4  # both checkpointed the final step
    for a, b in zip(jax.tree.leaves(one[2]), jax.tree.leaves(two[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert os.path.isfile(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
