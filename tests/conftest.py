"""Strict test settings: 8 CPU devices, a persistent compilation cache, warnings as errors
(pyproject); the shared fixtures: a tiny random Llama checkpoint built with transformers + torch and
its loaded forms, the demo model's tokenizer. Plain helpers are in helpers.py."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("LORA_JAX_TEST_CACHE", os.path.expanduser("~/.cache/lora_jax_test_xla"))
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import make_hf_llama  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random GQA Llama saved with transformers' save_pretrained (fp32)."""
    return make_hf_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def bases(tiny_llama):
    """{scan_layers: (LlamaConfig, params)} of `tiny_llama`, loaded once per test module."""
    import lora_jax as lj

    return {scan: lj.load_pretrained(tiny_llama, scan_layers=scan) for scan in (True, False)}


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The built-in demo model's tokenizer (it has a chat template)."""
    import transformers

    from lora_jax.demo import DEMO_MODEL

    return transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
