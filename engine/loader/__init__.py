"""Model loading: the embedded default model, GGUF files and Hugging Face folders, by architecture."""

from tokenwire.engine.loader.architecture import Architecture, BuiltModel, LoadableModel
from tokenwire.engine.loader.default_model import default_model_path
from tokenwire.engine.loader.devices import resolve_device, resolve_dtype
from tokenwire.engine.loader.gguf_loader import load_gguf, open_gguf
from tokenwire.engine.loader.hf_loader import load_hf
from tokenwire.engine.loader.load import LoadedModel, load_model
from tokenwire.engine.loader.registry import register_architecture

__all__ = [
    "Architecture",
    "BuiltModel",
    "LoadableModel",
    "LoadedModel",
    "default_model_path",
    "load_gguf",
    "load_hf",
    "load_model",
    "open_gguf",
    "register_architecture",
    "resolve_device",
    "resolve_dtype",
]
