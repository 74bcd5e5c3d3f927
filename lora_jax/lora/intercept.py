"""Routing targeted projections to `lora_dense` through Flax method interception.

The model knows nothing of LoRA. Inside `lora_interception()`, every `nn.Dense.__call__` whose bound
scope holds a `"lora"` collection entry (its adapter leaves, at the kernel's own path) is replaced
by `lora_dense`; every other call, and `setup`, passes through untouched. Because the replacement
never calls the wrapped method, a `super()` chain cannot fire it twice. Reading the adapters from
the bound module (rather than matching names) is what makes it work inside `nn.scan` and `nn.remat`:
the scan slices the `"lora"` collection per layer exactly as it slices `"params"`.

A Dense whose kernel is quantised (`lora_jax.quant.QuantizedKernel`, a QLoRA base) is intercepted
too, adapter or not: it runs `lora_dense` or `dense`, which dequantise that one kernel on the fly.
So a quantised base runs only inside `lora_interception()` (as `apply`, training and `generate` do).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.lora.config import LoraConfig
from lora_jax.lora.kernel import dense, lora_dense
from lora_jax.quant import is_quantized

__all__ = ["lora_interception", "apply"]


def _has(module: nn.Module, name: str) -> bool:
    return module.has_variable("lora", name)


@contextlib.contextmanager
def lora_interception(
    lcfg: LoraConfig | None = None, *, deterministic: bool = True, dropout_rate=None, fuse_wide: bool = True
):
    """Within this context, adapted `nn.Dense` calls run `lora_dense` with their adapter leaves.

    Dropout (`lcfg.lora_dropout`, or `dropout_rate` when given: a number or a traced scalar) is
    active only when `deterministic=False`; it draws from the module's `"dropout"` rng stream.
    fuse_wide: `lora_dense`'s `fuse_wide` (the model config's `fuse_wide_adapters`).
    """
    rate = dropout_rate
    if rate is None:
        rate = float(lcfg.lora_dropout) if lcfg is not None else 0.0
    # a traced rate (one per adapter in a sweep) may be 0 for some adapters: always draw
    drops = not deterministic and (not isinstance(rate, (int, float)) or rate > 0)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        adapted = _has(module, "a")
        kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
        quantized = is_quantized(kernel)
        if not adapted and not quantized:
            return next_fun(*args, **kwargs)
        (x,) = args
        bias = module.get_variable("params", "bias") if module.use_bias else None
        dtype = module.dtype or (kernel.dtype if quantized else jnp.result_type(x, kernel))
        if not adapted:
            return dense(jnp.asarray(x, dtype), kernel, bias)
        rng = module.make_rng("dropout") if drops else None
        return lora_dense(
            jnp.asarray(x, dtype),
            kernel,
            module.get_variable("lora", "a"),
            module.get_variable("lora", "b"),
            module.get_variable("lora", "scale"),
            bias=bias,
            magnitude=module.get_variable("lora", "m") if _has(module, "m") else None,
            dropout_rng=rng,
            dropout_rate=rate,
            fuse_wide=fuse_wide,
        )

    with nn.intercept_methods(interceptor):
        yield


def _fuses_wide(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "fuse_wide_adapters", True))


def apply(
    model: nn.Module,
    params,
    lora,
    lcfg: LoraConfig | None,
    *args,
    rngs=None,
    deterministic: bool = True,
    dropout_rate=None,
    **kwargs,
):
    """`model.apply` with the adapters in effect: base + adapters via the interceptor.

    Example, on a tiny random model in memory:

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lj
    >>> cfg = lj.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2, num_key_value_heads=1, scan_layers=False)
    >>> model = lj.Llama(cfg)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> lcfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    >>> lora = lj.init_lora(params, lcfg, jax.random.key(1))
    >>> ids = jnp.array([[1, 5, 7, 2]])
    >>> logits = lj.apply(model, params, lora, lcfg, ids)
    >>> logits.shape
    (1, 4, 32)
    >>> bool((logits == model.apply({"params": params}, ids)).all())  # B = 0 at init: the base
    True
    """
    with lora_interception(lcfg, deterministic=deterministic, dropout_rate=dropout_rate, fuse_wide=_fuses_wide(model)):
        return model.apply({"params": params, "lora": lora}, *args, rngs=rngs, **kwargs)
