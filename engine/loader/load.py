"""``load_model``: one entry point for the default model, GGUF files and Hugging Face folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenwire.engine.errors import ModelLoadError
from tokenwire.engine.loader.architecture import BuiltModel, LoadableModel
from tokenwire.engine.loader.default_model import default_model_path
from tokenwire.engine.loader.devices import resolve_device, resolve_dtype
from tokenwire.engine.loader.gguf_loader import is_gguf_file, load_gguf, open_gguf
from tokenwire.engine.loader.hf_loader import load_hf


@dataclass
class LoadedModel:
    """A model ready to serve: weights on their device, tokenizer, and what clients are told about it.

    Attributes:
        model: the model (an ``EngineModel`` torch module).
        tokenizer: the model's ``Tokenizer``.
        name: the checkpoint's name.
        architecture: registered architecture name, e.g. "llama".
        dtype: dtype of weights and activations.
        device: where the weights live.
        max_context_length: most positions the model supports.
        eos_token_ids: tokens that end a generation (the tokenizer's, else the checkpoint's).
        source_path: the file or folder it came from.
    """

    model: LoadableModel
    tokenizer: Any
    name: str
    architecture: str
    dtype: torch.dtype
    device: torch.device
    max_context_length: int
    eos_token_ids: list[int]
    source_path: Path


def load_model(
    source: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    progress: bool | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer.

    Args:
        source: None for the embedded default model, a ``.gguf`` file, or a Hugging Face folder
            (config.json, *.safetensors, tokenizer.json).
        dtype: "auto" (see ``resolve_dtype``), "float32", "bfloat16", "float16" or a torch dtype.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N" or a torch device.
        progress: draw a progress bar while loading (None: only when stderr is a terminal).

    Raises:
        ModelLoadError: the source is missing or not a model, or cannot be loaded (the message names
            the file and what is wrong).
        ValueError: an unknown dtype or device.
    """
    path = default_model_path() if source is None else Path(source).expanduser()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    # NOTE: lazy import: the tokenizer module pulls in tokenizers/jinja2, which the model code
    # does not need.
    from tokenwire.engine.tokenizer import Tokenizer

    built: BuiltModel
    if path.is_dir():
        built = load_hf(path, dt, dev, progress)
        tokenizer = Tokenizer.from_hf_dir(path)
    elif is_gguf_file(path) or path.suffix == ".gguf":
        reader = open_gguf(path)
        built = load_gguf(path, dt, dev, progress, reader=reader)
        tokenizer = Tokenizer.from_gguf(path, reader=reader)
    else:
        raise ModelLoadError(f"{path}: not a model (neither a GGUF file nor a folder with config.json)")
    return LoadedModel(
        model=built.model,
        tokenizer=tokenizer,
        name=built.name,
        architecture=built.architecture.name,
        dtype=dt,
        device=dev,
        max_context_length=built.model.max_context_length,
        # NOTE: the tokenizer knows the end-of-turn tokens too; the checkpoint's own list is the fallback.
        eos_token_ids=list(tokenizer.eos_token_ids) or list(getattr(built.config, "eos_token_ids", ())),
        source_path=path,
    )
