"""Device meshes and the one table from logical axis names to mesh axes.

Every parameter's logical axes follow from its path (the tree mirrors HF names, so this is a table,
not code paths): a kernel's axes are its family's layout's (`lora_jax.models.layout`); an adapter's
`a` takes its kernel's input axis, `b` its output axis, rank replicated. A layer stack (each
layout's `layers`: Llama's `layers`, GPT-2's `h`) adds the leading `layers` axis.

Quantised kernels shard along the axes of the kernel they replace: an NF4/int8 `QuantizedKernel`
keeps the `[..., in, out]` layout (its arrays' path key is `kernel`); an `Fp8Kernel` stores its
codes transposed, `[..., out, in]` (path key `kernel_t`: the kernel's axes with the last two
swapped), and its per-channel scales `[..., out]` (path key `bias`: the output axis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.errors import ConfigError
from lora_jax.models.layout import LAYER_STACKS, LAYOUTS

__all__ = [
    "make_mesh",
    "DEFAULT_RULES",
    "logical_axes",
    "param_sharding",
    "tree_shardings",
    "batch_sharding",
    "MESH_AXES",
    "rules_with",
    "place",
    "spec_for",
]

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "qkv": "tensor",  # GPT-2's fused q/k/v output
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "rank": None,
    "sweep": None,
}

# (parent, module) -> logical axes of its [in, out] kernel, for every family; parent None: any parent
_KERNEL_AXES = {key: axes for layout in LAYOUTS.values() for key, axes in layout.kernel_axes().items()}
_EMBEDDINGS = {layout.embed: layout.embed_axes for layout in LAYOUTS.values()}


def _module_axes(path: tuple[str, ...]) -> tuple[str, str] | None:
    """The kernel axes of the innermost module on `path` that a layout names."""
    for i in range(len(path) - 2, -1, -1):
        parent = path[i - 1] if i else None
        axes = _KERNEL_AXES.get((parent, path[i])) or _KERNEL_AXES.get((None, path[i]))
        if axes is not None:
            return axes
    return None


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: at most one may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ConfigError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} does not divide the "
            f"{len(devices)} devices; choose sizes whose product is {len(devices)}"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} uses "
            f"{int(np.prod(sizes))} devices but {len(devices)} are present"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(path: Sequence[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a base parameter or adapter leaf, from its path; a leaf named
    `kernel_t` is a kernel stored transposed (`[..., out, in]`, an `Fp8Kernel`'s codes)."""
    path = tuple(str(p) for p in path)
    leaf = path[-1]
    stacked = any(p in LAYER_STACKS for p in path[:-1])
    module = _module_axes(path)
    embedding = next((_EMBEDDINGS[p] for p in path[:-1] if p in _EMBEDDINGS), None)
    if embedding is not None and leaf == "embedding":
        axes: tuple = embedding
    elif module is not None and leaf == "kernel":
        axes = module
    elif module is not None and leaf == "kernel_t":
        axes = module[::-1]
    elif module is not None and leaf == "bias":
        axes = (module[1],)
    elif module is not None and leaf == "a":
        axes = (module[0], "rank")
    elif module is not None and leaf == "b":
        axes = ("rank", module[1])
    elif module is not None and leaf == "m":
        axes = (module[1],)
    else:
        axes = ("norm",) * (ndim - int(stacked))
    if stacked:
        axes = ("layers",) + axes
    if len(axes) < ndim:  # leading axes we do not name (e.g. a sweep axis) stay replicated
        axes = ("sweep",) * (ndim - len(axes)) + axes
    return axes


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> P:
    """Map logical axes to a PartitionSpec; a dimension that the mesh axis does not divide stays
    replicated (sharding it would need padding)."""
    out = []
    used: set[str] = set()
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if names and dim % size == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    return P(*out)


def param_sharding(path, array, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    """The sharding of one leaf (array or ShapeDtypeStruct) at `path` under `rules`."""
    return NamedSharding(mesh, spec_for(logical_axes(path, array.ndim), array.shape, mesh, rules))


def rules_with(overrides) -> dict:
    """DEFAULT_RULES updated with overrides such as {"mlp": "fsdp"}; unknown names are refused."""
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(DEFAULT_RULES))
    if bad:
        raise ConfigError(f"mesh.rules names unknown logical axes {bad}; known: {sorted(DEFAULT_RULES)}")
    for name, target in overrides.items():
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if any(t not in MESH_AXES for t in targets):
            raise ConfigError(f"mesh.rules[{name!r}]={target!r}: mesh axes are {MESH_AXES} (or null)")
    return {**DEFAULT_RULES, **overrides}


def place(tree, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """Put every leaf of a tree on the mesh at its rule's sharding."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def tree_shardings(tree, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """NamedShardings for every leaf of a parameter or adapter tree (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        names = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        return NamedSharding(mesh, spec_for(logical_axes(names, leaf.ndim), leaf.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    batch = tuple(
        n
        for n in (rules["batch"] if not isinstance(rules["batch"], str) else (rules["batch"],))
        if mesh.shape.get(n, 1) > 1
    )
    return NamedSharding(mesh, P(batch or None, *([None] * (ndim - 1))))
