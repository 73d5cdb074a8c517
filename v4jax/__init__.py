"""v4jax: DeepSeek-V4 (Flash / Pro) in JAX."""
from .config import ModelConfig
from .model import block_forward, decode_step, forward, forward_train, init_cache, mtp_forward, prefill
from .params import abstract_params, init_params

__all__ = ["ModelConfig", "abstract_params", "init_params", "forward", "forward_train", "block_forward", "mtp_forward", "prefill",
           "decode_step", "init_cache"]
from .checkpoint import load, save
__all__ += ["load", "save"]
from .generate import GenerationResult, Generator
__all__ += ["Generator", "GenerationResult"]
