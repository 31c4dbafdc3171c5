"""What the loaders need to know of one architecture: how it reads its config and weights, and builds its model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from tokenwire.engine.models.base import EngineModel


@runtime_checkable
class LoadableModel(EngineModel, Protocol):
    """An engine model that accepts checkpoint tensors by name (Hugging Face naming)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (name, tensor) pairs in; raise ValueError for unknown, misshapen or missing ones."""
        ...


@dataclass(frozen=True)
class Architecture:
    """One model architecture as the loaders see it.

    Every callable raises ValueError (with a message naming what is wrong) for a checkpoint it
    cannot take; the loaders turn that into a ModelLoadError naming the file.

    Attributes:
        name: short name reported to clients, e.g. "llama".
        gguf_names: values of GGUF ``general.architecture`` it reads.
        hf_names: config.json ``architectures`` entries or ``model_type`` values it reads.
        config_from_hf: config.json dict -> the model's config.
        config_from_gguf: (GGUF metadata, GGUF architecture name, tensor shapes in torch order) -> config.
        gguf_weight: (GGUF tensor name, tensor, config) -> (Hugging Face name, tensor), undoing any
            layout change the GGUF conversion made.
        build: (config, dtype, device) -> an uninitialized model in inference mode (eval, no
            gradients) to fill with ``load_weights``.
    """

    name: str
    gguf_names: tuple[str, ...]
    hf_names: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    config_from_gguf: Callable[[Mapping[str, Any], str, Mapping[str, tuple[int, ...]]], Any]
    gguf_weight: Callable[[str, torch.Tensor, Any], tuple[str, torch.Tensor]]
    build: Callable[[Any, torch.dtype, torch.device], LoadableModel]


@dataclass(frozen=True)
class BuiltModel:
    """A model read from a checkpoint, before its tokenizer is attached.

    Attributes:
        model: the filled model, in inference mode.
        architecture: the registered architecture that built it.
        config: the model's config.
        name: the checkpoint's own name (GGUF ``general.name``, config.json ``_name_or_path``) or
            the file's or folder's name.
    """

    model: LoadableModel
    architecture: Architecture
    config: Any
    name: str
