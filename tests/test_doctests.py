"""The docstrings' examples run (`doctest`, ELLIPSIS and NORMALIZE_WHITESPACE), module by module.

A module in WITH_EXAMPLES must hold at least one example, so that a docstring rewritten without its
example fails here instead of passing with nothing run; every module listed must pass all it holds.
The examples build a tiny random model in memory: no files, no downloads."""

import doctest
import importlib

import pytest

WITH_EXAMPLES = [
    "lora_jax.lora.config",  # LoraConfig
    "lora_jax.lora.tree",  # init_lora, split_trainable / combine, merge, unmerge, count_parameters
    "lora_jax.lora.intercept",  # apply
    "lora_jax.lora.kernel",  # lora_dense
    "lora_jax.lora.optim",  # make_optimizer
    "lora_jax.models.attention",  # segment_mask
]
# examples here are welcome, and must pass, but none is required
MAY_HAVE_EXAMPLES = [
    "lora_jax",
    "lora_jax.run_config",
    "lora_jax.models.llama_config",
    "lora_jax.models.llama",
    "lora_jax.quant",
]


@pytest.mark.parametrize("name", WITH_EXAMPLES + MAY_HAVE_EXAMPLES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (see stdout)"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} has no docstring example; each of its public functions had one"
