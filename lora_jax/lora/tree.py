"""LoRA as a pure parameter-tree transform.

The adapter tree mirrors the kernel paths it adapts, beside (never inside) the frozen tree:

    params["layers"]["self_attn"]["q_proj"]["kernel"]     [L, in, out]   (frozen)
    lora["layers"]["self_attn"]["q_proj"]["a"]             [L, in, r]     trainable
    lora["layers"]["self_attn"]["q_proj"]["b"]             [L, r, out]    trainable
    lora["layers"]["self_attn"]["q_proj"]["scale"]         [L]            frozen (alpha / r, per layer)
    lora["layers"]["self_attn"]["q_proj"]["m"]             [L, out]       trainable (DoRA magnitude)

With scanned layers every layer shares one shape: a layer the config leaves alone gets zeros and
scale 0 (an exact no-op), and per-layer ranks from `rank_pattern` are zero-padded to the largest,
entries that stay exactly zero under AdamW because their gradients are exactly zero.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.errors import ConfigError
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.targets import ModelShape, Target, model_shape, plan_targets
from lora_jax.models.layout import get_path
from lora_jax.quant import is_quantized, quantize_like

__all__ = [
    "init_lora",
    "merge",
    "unmerge",
    "split_trainable",
    "combine",
    "Split",
    "targets_of",
    "count_parameters",
    "print_trainable_parameters",
    "dora_weight_norms",
    "adapter_paths",
    "build_tree",
    "is_trainable",
    "is_adapter_leaf",
    "TRAINABLE_LEAVES",
]

TRAINABLE_LEAVES = ("a", "b", "m")  # of an adapter module; its "scale" is a constant
_ADAPTER_LEAVES = TRAINABLE_LEAVES + ("scale",)

_node = get_path  # the name tests/test_lora.py reads it by


def is_adapter_leaf(names: tuple[str, ...]) -> bool:
    """Whether a leaf path (keys from the root) is an adapter's: under "lora" in a `{"params",
    "lora"}` tree, or an adapter leaf name outside "params" (a bare adapter tree)."""
    names = tuple(names)
    return names[:1] == ("lora",) or (names[-1] in _ADAPTER_LEAVES and names[:1] != ("params",))


def is_trainable(names: tuple[str, ...], lcfg: LoraConfig) -> bool:
    """The one rule for which leaves train, read by `split_trainable` and the optimizer labels: an
    adapter's a, b and m, and every leaf of a `modules_to_save` module; the rest is frozen."""
    names = tuple(names)
    if is_adapter_leaf(names):
        return names[-1] in TRAINABLE_LEAVES
    return _is_saved_module(names, lcfg)


def targets_of(params, lcfg: LoraConfig) -> list[Target]:
    return plan_targets(model_shape(params), lcfg)


def _kernel(params, t: Target, shape: ModelShape):
    mod = get_path(params, shape.layout.module_path(t.layer, t.name, shape.scan_layers))["kernel"]
    return mod[t.layer] if shape.scan_layers else mod


def _col_norm(w_io):
    """Norm of each output column of an `[in, out]` kernel: PEFT's `linalg.norm(W, dim=1)` on `[out, in]`."""
    return jnp.sqrt(jnp.sum(jnp.square(w_io), axis=-2))


def _init_one(t: Target, w_io, key, init) -> dict[str, jax.Array | np.ndarray]:
    """a [in, r], b [r, out] (fp32) as PEFT initialises them; also returns the kernel PiSSA leaves."""
    ka, kb = jax.random.split(key)
    if init == "pissa":
        w = w_io.astype(jnp.float32)
        u, s, vh = jnp.linalg.svd(w.T, full_matrices=False)  # torch layout [out, in]
        sr = s[: t.r] / t.scale
        a = (jnp.sqrt(sr)[:, None] * vh[: t.r]).T  # lora_A [r, in] -> [in, r]
        b = (u[:, : t.r] * jnp.sqrt(sr)[None, :]).T  # lora_B [out, r] -> [r, out]
        return {"a": a, "b": b}
    if init == "gaussian":
        a = jax.random.normal(ka, (t.fan_in, t.r), jnp.float32) / t.r
    else:  # PEFT default: kaiming_uniform(a=sqrt(5)) on lora_A [r, in]: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(t.fan_in)
        a = jax.random.uniform(ka, (t.fan_in, t.r), jnp.float32, -bound, bound)
    if init is False:  # PEFT leaves nn.Linear's own init on lora_B too: non-zero, for tests
        bound = 1.0 / math.sqrt(t.r)
        b = jax.random.uniform(kb, (t.r, t.fan_out), jnp.float32, -bound, bound)
    else:
        b = np.zeros((t.r, t.fan_out), np.float32)  # host zeros: see `_stack_layers`
    return {"a": a, "b": b}


def init_lora(params, lcfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """The adapter tree for `params` under `lcfg` (pure: params in, adapters out).

    With `init_lora_weights="pissa"` the adapters hold the top singular directions of each kernel;
    the matching base is `unmerge(params, lora, lcfg)` (W minus s*B*A), which the trainer uses.

    Example, on a tiny random model in memory:

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> cfg = lj.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, scan_layers=False)
    >>> params = lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> lcfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    >>> lora = lj.init_lora(params, lcfg, jax.random.key(1))
    >>> q = lora["layers_0"]["self_attn"]["q_proj"]  # beside params["layers_0"]["self_attn"]["q_proj"]
    >>> q["a"].shape, q["b"].shape, float(q["scale"])  # a: [in, r], b: [r, out], scale: alpha / r
    ((16, 4), (4, 16), 2.0)
    >>> bool((q["b"] == 0).all())  # B = 0: the adapted model starts equal to the base
    True
    """
    shape = model_shape(params)
    targets = plan_targets(shape, lcfg)
    needs_kernel = lcfg.use_dora or lcfg.init_lora_weights == "pissa"  # else only shapes matter
    per_target = []
    for idx, t in enumerate(targets):
        w = _kernel(params, t, shape) if needs_kernel else None
        leaves = _init_one(t, w, jax.random.fold_in(key, idx), lcfg.init_lora_weights)
        if lcfg.use_dora:
            assert w is not None  # use_dora implies needs_kernel
            delta = t.scale * leaves["a"] @ leaves["b"]
            leaves["m"] = _col_norm(w.astype(jnp.float32) + delta)
        per_target.append((t, leaves))
    return build_tree(per_target, shape, dtype)


def build_tree(per_target, shape: ModelShape, dtype=jnp.float32) -> dict:
    """The adapter tree from `(Target, leaves)` pairs, leaves being each target's own `a` [in, r],
    `b` [r, out] and DoRA's `m` [out] (`scale` comes from the target): one entry per layer, or with
    scanned layers one stacked entry per projection (`_stack_layers`). Scales are fp32, the rest
    `dtype`. `init_lora` and PEFT import (`lora_jax.hf.peft`) both build their trees here."""
    layout = shape.layout
    by_module: dict[str, dict[int, dict]] = defaultdict(dict)
    for t, leaves in per_target:
        by_module[t.name][t.layer] = {**leaves, "scale": np.float32(t.scale)}
    lora: dict = {}
    for name, per_layer in by_module.items():
        parent, module = layout.parent(name), layout.projection(name).module_name
        if shape.scan_layers:
            entry = _stack_layers(per_layer, shape.num_layers, dtype)
            lora.setdefault(layout.layers, {}).setdefault(parent, {})[module] = entry
        else:
            for layer, leaves in per_layer.items():
                (stack,) = layout.layer_path(layer, scan=False)
                lora.setdefault(stack, {}).setdefault(parent, {})[module] = {
                    k: jnp.asarray(v, jnp.float32 if k == "scale" else dtype) for k, v in leaves.items()
                }
    return lora


def _stack_layers(per_layer: dict[int, dict], num_layers: int, dtype) -> dict:
    """Stack per-layer leaves, zero-padding ranks to the largest and zero-filling absent layers.

    On the host, with numpy: eager `jnp.pad` / `jnp.stack` / `jnp.zeros` compile one small XLA
    program per distinct shape, which made up ~2 s of a rank sweep's start-up on a CPU (every rank
    brings new shapes); the values are the same either way (pure data movement)."""
    r_max = max(v["a"].shape[1] for v in per_layer.values())
    first = next(iter(per_layer.values()))
    fan_in, fan_out = first["a"].shape[0], first["b"].shape[1]
    out = defaultdict(list)
    for layer in range(num_layers):
        leaves = per_layer.get(layer)
        if leaves is None:
            leaves = {
                "a": np.zeros((fan_in, r_max), np.float32),
                "b": np.zeros((r_max, fan_out), np.float32),
                "scale": np.float32(0),
                **({"m": np.zeros((fan_out,), np.float32)} if "m" in first else {}),
            }
        leaves = {k: np.asarray(v) for k, v in leaves.items()}
        pad = r_max - leaves["a"].shape[1]
        out["a"].append(np.pad(leaves["a"], ((0, 0), (0, pad))))
        out["b"].append(np.pad(leaves["b"], ((0, pad), (0, 0))))
        out["scale"].append(leaves["scale"])
        if "m" in leaves:
            out["m"].append(leaves["m"])
    return {k: jnp.asarray(np.stack(v), jnp.float32 if k == "scale" else dtype) for k, v in out.items()}


def adapter_paths(lora) -> list[tuple[str, ...]]:
    """Paths of the adapted modules (each holds a, b, scale[, m])."""
    return sorted({p[:-1] for p in traverse_util.flatten_dict(lora) if p[-1] == "a"})


def _delta(mod: dict) -> jax.Array:
    """scale * A @ B in fp32, `[..., in, out]` (only merge uses this; training never forms it)."""
    a, b = mod["a"].astype(jnp.float32), mod["b"].astype(jnp.float32)
    scale = mod["scale"].astype(jnp.float32)[..., None, None]
    return scale * jnp.einsum("...ir,...ro->...io", a, b)


def dora_weight_norms(params, lora, lcfg: LoraConfig | None = None) -> dict:
    """Column norms of W + s*B*A for each DoRA module: what `unmerge` needs to invert a DoRA merge."""
    norms = {}
    for path in adapter_paths(lora):
        mod = get_path(lora, path)
        if "m" in mod:
            w = get_path(params, path)["kernel"].astype(jnp.float32)
            norms[path] = _col_norm(w + _delta(mod))
    return norms


def merge(params, lora, lcfg: LoraConfig | None = None) -> dict:
    """Plain params with each adapter folded in: W + s*A@B (DoRA: m * (W + s*A@B) / ||W + s*A@B||).
    fp32 arithmetic, cast back to the kernel's dtype once; every other leaf is returned as is.
    A quantised kernel (`lora_jax.quant`: NF4, int8 or FP8) is dequantised in fp32 and merged into a
    plain kernel in the params' dtype (an FP8 base loaded from bf16 merges into bf16).

    Example, on a tiny random model in memory:

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> cfg = lj.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, scan_layers=False)
    >>> model = lj.Llama(cfg)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> lcfg = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # B != 0
    >>> lora = lj.init_lora(params, lcfg, jax.random.key(1))
    >>> merged = lj.merge(params, lora, lcfg)  # plain params: W + s*A@B, no adapters left
    >>> ids = jnp.array([[1, 5, 7, 2]])
    >>> bool(jnp.allclose(model.apply({"params": merged}, ids), lj.apply(model, params, lora, lcfg, ids),
    ...                   atol=1e-5))
    True
    """
    flat = traverse_util.flatten_dict(params)
    for path in adapter_paths(lora):
        mod = get_path(lora, path)
        w = flat[path + ("kernel",)]
        merged = w.astype(jnp.float32) + _delta(mod)
        if "m" in mod:
            norm = _col_norm(merged)
            active = mod["scale"][..., None] != 0  # untargeted (zero-filled) layers stay untouched
            factor = jnp.where(active, mod["m"].astype(jnp.float32) / norm, 1.0)
            merged = merged * factor[..., None, :]
        flat[path + ("kernel",)] = merged.astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def unmerge(params, lora, lcfg: LoraConfig | None = None, *, dora_norms: dict | None = None) -> dict:
    """Inverse of `merge`: W - s*A@B. A DoRA merge is only invertible with the norms it divided by
    (`dora_weight_norms(base, lora)` taken before merging). A quantised kernel stays quantised: the
    residual is requantised with its settings (PiSSA on a QLoRA base).

    Example, on a tiny random model in memory:

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> cfg = lj.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, scan_layers=False)
    >>> params = lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> lcfg = lj.LoraConfig(r=4, target_modules=("q_proj",), init_lora_weights=False)
    >>> lora = lj.init_lora(params, lcfg, jax.random.key(1))
    >>> back = lj.unmerge(lj.merge(params, lora, lcfg), lora, lcfg)  # W + s*A@B - s*A@B
    >>> q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    >>> bool(jnp.allclose(back["layers_0"]["self_attn"]["q_proj"]["kernel"], q, atol=1e-6))
    True
    """
    flat = traverse_util.flatten_dict(params)
    for path in adapter_paths(lora):
        mod = get_path(lora, path)
        w = flat[path + ("kernel",)]
        w32 = w.astype(jnp.float32)
        if "m" in mod:
            if dora_norms is None or path not in dora_norms:
                raise ConfigError(
                    f"unmerge of the DoRA module {'/'.join(path)} needs the weight norms used by merge; "
                    "pass dora_norms=lora_jax.dora_weight_norms(base_params, lora) taken before merging"
                )
            active = mod["scale"][..., None] != 0
            factor = jnp.where(active, mod["m"].astype(jnp.float32) / dora_norms[path], 1.0)
            w32 = w32 / factor[..., None, :]
        residual = w32 - _delta(mod)
        flat[path + ("kernel",)] = quantize_like(residual, w) if is_quantized(w) else residual.astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


class Split(NamedTuple):
    """`trainable`/`frozen` each `{"params": ..., "lora": ...}` holding only their own leaves."""

    trainable: dict
    frozen: dict


def _is_saved_module(path: tuple[str, ...], lcfg: LoraConfig) -> bool:
    """Whether a base leaf belongs to a `modules_to_save` module (PEFT: the name occurs in its path)."""
    return any(m in path for m in lcfg.modules_to_save)


def split_trainable(params, lora, lcfg: LoraConfig) -> Split:
    """Adapters (a, b, m) and `modules_to_save` train; everything else (base, scales) is frozen.

    Example, on a tiny random model in memory:

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> cfg = lj.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, scan_layers=False)
    >>> params = lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> lcfg = lj.LoraConfig(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",))
    >>> lora = lj.init_lora(params, lcfg, jax.random.key(1))
    >>> split = lj.split_trainable(params, lora, lcfg)
    >>> sorted(split.trainable["lora"]["layers_0"]["self_attn"]["q_proj"])  # the scale stays frozen
    ['a', 'b']
    >>> list(split.trainable["params"])  # of the base, only the modules to save
    ['lm_head']
    >>> p, lo = lj.combine(split.trainable, split.frozen)  # and back
    >>> jax.tree.structure((p, lo)) == jax.tree.structure((params, lora))
    True
    """
    flat_p = traverse_util.flatten_dict(params)
    missing = [m for m in lcfg.modules_to_save if not any(m in p for p in flat_p)]
    if missing:
        tops = sorted({p[0] for p in flat_p})
        raise ConfigError(
            f"modules_to_save={list(lcfg.modules_to_save)}: {missing} not in the model; top-level modules are {tops}"
        )
    train: dict = {}
    frozen: dict = {}
    for path, v in flat_p.items():
        if is_quantized(v) and _is_saved_module(path, lcfg):
            raise ConfigError(
                f"modules_to_save={list(lcfg.modules_to_save)} includes the quantised kernel "
                f"{'/'.join(path)}; a quantised base is frozen. Drop it from modules_to_save or "
                "load the model without quantize"
            )
        (train if is_trainable(("params",) + path, lcfg) else frozen)[("params",) + path] = v
    for path, v in traverse_util.flatten_dict(lora).items():
        (train if is_trainable(("lora",) + path, lcfg) else frozen)[("lora",) + path] = v
    unflat = lambda d: traverse_util.unflatten_dict(d) if d else {}
    t, f = unflat(train), unflat(frozen)
    for tree in (t, f):
        tree.setdefault("params", {}), tree.setdefault("lora", {})
    return Split(t, f)


def combine(trainable, frozen) -> tuple[dict, dict]:
    """Inverse of `split_trainable`: `(params, lora)`."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    tree = traverse_util.unflatten_dict(flat)
    return tree.get("params", {}), tree.get("lora", {})


def count_parameters(params, lcfg: LoraConfig) -> tuple[int, int]:
    """(trainable, total) as PEFT's `print_trainable_parameters` counts them: real adapter entries
    (no padding), `modules_to_save` copies counted as trainable and, like PEFT's wrapper, twice in
    the total (original + trained copy).

    Example, on a tiny random model in memory:

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> cfg = lj.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, scan_layers=False)
    >>> params = lj.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> lj.count_parameters(params, lj.LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    (448, 6160)

    Trainable: 2 layers x (q_proj 4 * (16 + 16) + v_proj 4 * (16 + 8)) = 448; the total is the
    base's 5,712 plus those.
    """
    targets = targets_of(params, lcfg)
    lora_n = sum(t.r * (t.fan_in + t.fan_out) + (t.fan_out if lcfg.use_dora else 0) for t in targets)
    flat = traverse_util.flatten_dict(params)
    base_n = sum(int(np.prod(v.shape)) for v in flat.values())
    saved_n = sum(int(np.prod(v.shape)) for p, v in flat.items() if _is_saved_module(p, lcfg))
    return lora_n + saved_n, base_n + lora_n + saved_n


def print_trainable_parameters(params, lcfg: LoraConfig) -> str:
    trainable, total = count_parameters(params, lcfg)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line
