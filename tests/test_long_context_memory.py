"""Long-context memory: remat policy "offload" (each layer's input, the one activation scanned layers
stack for the backward pass, kept in host memory) and `mlp_chunk_tokens` (the MLP over chunks of the
sequence), in every family. Both change where or when activations live, never the numbers: loss and
adapter gradients equal the plain "full" remat run. The CPU compiles a host transfer to nothing, so
the offload is checked in the program JAX builds (the stacked residual's memory space); the chunked
MLP's saving is checked in the compiled program's temporary memory."""

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.errors import ConfigError
from lora_jax.models import common
from lora_jax.models.llama import LlamaMLP

SEQ = 20  # not a multiple of the chunk: the padded tail is exercised
CHUNK = 8

CONFIGS = {
    "llama": lambda **kw: lj.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention="xla", **kw,
    ),
    "gpt2": lambda **kw: lj.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, attention="xla", **kw),
    "gemma3": lambda **kw: lj.Gemma3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attention="xla", **kw,
    ),
}  # fmt: skip


def _setup(cfg, ids):
    model = lj.build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # b != 0: adapters count
    split = lj.split_trainable(params, lj.init_lora(params, lcfg, jax.random.key(1)), lcfg)

    def loss(trainable, frozen):
        p, lo = lj.combine(trainable, frozen)
        return jnp.mean(jnp.square(lj.apply(model, p, lo, lcfg, ids)))

    return params, split, loss


def _stacked_residuals(jaxpr, layers: int, seq: int) -> dict:
    """{memory space: [shapes]} of the `[layers, ..., seq, ...]` outputs of every `layers`-step scan."""
    found: dict = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == layers:
            for v in eqn.outvars:
                if v.aval.ndim >= 3 and v.aval.shape[0] == layers and seq in v.aval.shape[1:]:
                    found.setdefault(str(v.aval.memory_space).rsplit(".", 1)[-1], []).append(v.aval.shape)
        elif eqn.primitive.name != "scan":
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                for k, shapes in _stacked_residuals(sub, layers, seq).items():
                    found.setdefault(k, []).extend(shapes)
    return found


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_offload_keeps_only_the_layer_inputs_and_keeps_them_on_the_host(family):
    """Under scanned layers, "full" stacks each layer's input `[layers, batch, seq, hidden]` on the
    device for the backward pass; "offload" stacks the same on the host and nothing on the device."""
    ids = jnp.zeros((1, SEQ), jnp.int32)
    found = {}
    for policy in ("full", "offload"):
        cfg = CONFIGS[family](scan_layers=True, remat_policy=policy)
        _, split, loss = _setup(cfg, ids)
        jaxpr = jax.make_jaxpr(jax.grad(loss))(split.trainable, split.frozen).jaxpr
        found[policy] = _stacked_residuals(jaxpr, 2, SEQ)
    layer_inputs = [(2, 1, SEQ, 32)]
    assert found["full"] == {"Device": layer_inputs}, found
    assert found["offload"] == {"Host": layer_inputs}, found


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_offload_and_chunked_mlp_give_the_numbers_of_full(family):
    """Loss and every adapter gradient of remat "offload" with the MLP over chunks of 8 tokens (a
    20-token row: the last chunk padded) equal plain "full" remat (fp32); the parameter tree is the
    same, so a chunked model loads the same checkpoints."""
    ids = jax.random.randint(jax.random.key(2), (2, SEQ), 0, 97)
    out, trees = {}, {}
    for policy, chunk in (("full", None), ("offload", CHUNK)):
        cfg = CONFIGS[family](scan_layers=True, remat_policy=policy, mlp_chunk_tokens=chunk)
        params, split, loss = _setup(cfg, ids)
        trees[chunk] = jax.tree.map(jnp.shape, params)
        out[chunk] = jax.jit(jax.value_and_grad(loss))(split.trainable, split.frozen)
    assert trees[CHUNK] == trees[None]
    np.testing.assert_allclose(out[CHUNK][0], out[None][0], rtol=1e-6)
    mlp_grads = 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(out[CHUNK][1]), jax.tree.leaves(out[None][1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7, err_msg=str(path))
        mlp_grads += "mlp" in jax.tree_util.keystr(path) and float(jnp.abs(got).max()) > 0
    assert mlp_grads >= 4  # the MLP adapters (a and b of each projection) get gradients through the chunks


class _ChunkedMLP(nn.Module):
    """One Llama MLP run by `common.token_chunked`, as a block runs it."""

    config: lj.LlamaConfig

    @nn.compact
    def __call__(self, x):
        return common.token_chunked(LlamaMLP(self.config, name="mlp"), x, self.config.mlp_chunk_tokens)


def test_chunked_mlp_draws_a_dropout_mask_per_chunk():
    """With LoRA dropout, chunks must not share one mask. The input repeats one chunk twice: without
    dropout both halves of the output agree; with it they differ."""
    cfg = CONFIGS["llama"](mlp_chunk_tokens=CHUNK)
    half = jax.random.normal(jax.random.key(4), (1, CHUNK, 32))
    x = jnp.concatenate([half, half], axis=1)
    module = _ChunkedMLP(cfg)
    params = module.init(jax.random.key(0), x)["params"]
    lcfg = lj.LoraConfig(r=4, target_modules=("gate_proj",), lora_dropout=0.5)
    k = jax.random.split(jax.random.key(1))
    gate = {"a": jax.random.normal(k[0], (32, 4)), "b": jax.random.normal(k[1], (4, 64)), "scale": jnp.float32(1)}
    lora = {"mlp": {"gate_proj": gate}}
    outs = []
    for deterministic in (True, False):
        with lj.lora_interception(lcfg, deterministic=deterministic):
            y = module.apply({"params": params, "lora": lora}, x, rngs={"dropout": jax.random.key(5)})
        outs.append(float(jnp.abs(y[:, :CHUNK] - y[:, CHUNK:]).max()))
    assert outs[0] < 1e-6 and outs[1] > 1e-3, outs


def _temp_bytes(chunk):
    cfg = lj.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, head_dim=32, attention="xla", scan_layers=True, remat_policy="full",
        mlp_chunk_tokens=chunk,
    )  # fmt: skip
    ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
    model = lj.build_model(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear")
    lora = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lj.init_lora(params, lcfg, jax.random.key(1)))
    split = lj.split_trainable(params, lora, lcfg)

    def loss(trainable, frozen, ids):
        p, lo = lj.combine(trainable, frozen)
        return jnp.sum(lj.apply(model, p, lo, lcfg, ids, return_hidden=True))

    compiled = jax.jit(jax.grad(loss)).lower(split.trainable, split.frozen, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_mlp_bounds_the_mlp_activations():
    """A 1,024-token row through an MLP 32 times wider than the model: over chunks of 128 tokens the
    step's compiled temporary memory is under half of the unchunked step's (each [1024, 1024] fp32
    activation is 4 MiB; a chunk's is 0.5 MiB)."""
    whole, chunked = _temp_bytes(None), _temp_bytes(128)
    assert chunked < 0.5 * whole, (whole, chunked)


def test_offload_is_refused_without_host_memory(monkeypatch):
    """A device that addresses no pinned host memory cannot offload: a ConfigError naming the fix."""
    device = SimpleNamespace(addressable_memories=lambda: [SimpleNamespace(kind="device")])
    monkeypatch.setattr(common.jax, "local_devices", lambda: [device])
    cfg = CONFIGS["llama"](remat_policy="offload")
    with pytest.raises(ConfigError, match="remat_policy='full'"):
        lj.build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_mlp_chunk_tokens_is_a_checked_config_field(family):
    cfg = CONFIGS[family](mlp_chunk_tokens=16384)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["mlp_chunk_tokens"] == 16384
    assert cfg.replace(mlp_chunk_tokens=None).mlp_chunk_tokens is None
    assert CONFIGS[family]().mlp_chunk_tokens is None
    for bad in (0, 1.5, "1024", True):
        with pytest.raises(ConfigError, match="mlp_chunk_tokens"):
            CONFIGS[family](mlp_chunk_tokens=bad)
