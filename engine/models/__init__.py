"""Model architectures the engine runs, and the interface they offer it."""

from tokenwire.engine.models.base import EngineModel, KVCacheSpec
from tokenwire.engine.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["EngineModel", "KVCacheSpec", "LlamaConfig", "LlamaForCausalLM"]
