"""The registry of architectures the loaders know, looked up by GGUF or Hugging Face name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenwire.engine.loader.architecture import Architecture
from tokenwire.engine.loader.llama_arch import LLAMA
from tokenwire.engine.loader.production_arch import PRODUCTION_TRANSFORMER

_ARCHITECTURES: list[Architecture] = [LLAMA, PRODUCTION_TRANSFORMER]


def register_architecture(arch: Architecture) -> None:
    """Make an architecture loadable; its GGUF and Hugging Face names must be new.

    Raises:
        ValueError: a name is already taken by another architecture.
    """
    for other in _ARCHITECTURES:
        clash = (set(arch.gguf_names) & set(other.gguf_names)) | (set(arch.hf_names) & set(other.hf_names))
        if other.name == arch.name or clash:
            raise ValueError(f"architecture {arch.name!r} clashes with {other.name!r} on {sorted(clash) or arch.name}")
    _ARCHITECTURES.append(arch)


def architecture_for_gguf(name: str) -> Architecture | None:
    """The architecture that reads GGUF files whose ``general.architecture`` is ``name``."""
    return next((a for a in _ARCHITECTURES if name in a.gguf_names), None)


def architecture_for_hf(config: Mapping[str, Any]) -> Architecture | None:
    """The architecture for a Hugging Face config.json (by ``architectures``, then ``model_type``)."""
    names = list(config.get("architectures") or []) + [config.get("model_type")]
    return next((a for name in names for a in _ARCHITECTURES if name in a.hf_names), None)


def known_architectures() -> list[str]:
    """Names of every registered architecture, for error messages."""
    return [a.name for a in _ARCHITECTURES]
