"""lora_jax: LoRA fine-tuning of Llama-family models in JAX/Flax, exact against PEFT and transformers.

import lora_jax as lj
cfg, params = lj.load_pretrained(path)                 # HF dir -> LlamaConfig, frozen params
model = lj.build_model(cfg)                            # the family's module: lj.Llama(cfg)
lcfg = lj.LoraConfig(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj"))
lora = lj.init_lora(params, lcfg, key)                 # adapter tree, pure
logits = lj.apply(model, params, lora, lcfg, input_ids)
new_ids = lj.generate(cfg, params, [prompt_ids], lora=lora, lcfg=lcfg)
lj.save_peft(out_dir, lora, lcfg, cfg)                 # PEFT adapter dir
lj.save_pretrained(out_dir, params, cfg, lora, lcfg)   # merged HF model dir
cfg, qparams = lj.load_pretrained(path, quantize="nf4")  # QLoRA: NF4 frozen projections
summary = lj.train(run_config)                         # what `lora-jax train` runs
"""

# configs and errors
from lora_jax.data.config import DataConfig
from lora_jax.errors import CheckpointFormatError, ConfigError, DataError, LoraJaxError
from lora_jax.fp8 import Fp8Kernel, with_fp8_gemm  # an FP8 frozen base
from lora_jax.generate import generate, generate_text

# Hugging Face I/O: base checkpoints, PEFT adapters, merged models
from lora_jax.hf.load import load_pretrained
from lora_jax.hf.peft import apply_modules_to_save, load_peft, read_peft_config, save_peft
from lora_jax.hf.save import save_pretrained

# LoRA: the adapter tree (pure), the interceptor, the optimizer
from lora_jax.lora import (
    Split,
    apply,
    combine,
    count_parameters,
    dora_weight_norms,
    init_lora,
    lora_dense,
    lora_interception,
    lora_labels,
    make_optimizer,
    merge,
    print_trainable_parameters,
    split_trainable,
    unmerge,
)
from lora_jax.lora.config import LoraConfig

# the model
from lora_jax.models.gemma3 import Gemma3
from lora_jax.models.gemma3_config import Gemma3Config
from lora_jax.models.gpt2 import GPT2
from lora_jax.models.gpt2_config import GPT2Config
from lora_jax.models.llama import KVCache, Llama, init_kv_cache
from lora_jax.models.llama_config import LlamaConfig
from lora_jax.models.registry import build_model
from lora_jax.quant import QuantizedKernel, dequantize, quantize, quantize_params  # QLoRA's NF4 / int8
from lora_jax.run_config import MeshConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

# training and sweeps
from lora_jax.sharding import make_mesh
from lora_jax.sweep import sweep
from lora_jax.train.loop import TrainingDiverged, TrainingInterrupted, train

__version__ = "0.1.0"

__all__ = [
    # configs and errors
    "LlamaConfig",
    "Gemma3Config",
    "LoraConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "MeshConfig",
    "RunConfig",
    "LoraJaxError",
    "ConfigError",
    "DataError",
    "CheckpointFormatError",
    # the model
    "build_model",
    "Llama",
    "GPT2",
    "GPT2Config",
    "Gemma3",
    "KVCache",
    "init_kv_cache",
    "generate",
    "generate_text",
    # LoRA
    "init_lora",
    "apply",
    "merge",
    "unmerge",
    "split_trainable",
    "combine",
    "Split",
    "lora_dense",
    "lora_interception",
    "make_optimizer",
    "lora_labels",
    "count_parameters",
    "print_trainable_parameters",
    "dora_weight_norms",
    # Hugging Face I/O
    "load_pretrained",
    "save_pretrained",
    "save_peft",
    "load_peft",
    "read_peft_config",
    "apply_modules_to_save",
    # training and sweeps
    "train",
    "TrainingInterrupted",
    "TrainingDiverged",
    "make_mesh",
    "sweep",
    # quantisation
    "quantize",
    "quantize_params",
    "dequantize",
    "QuantizedKernel",
    "Fp8Kernel",
    "with_fp8_gemm",
]
