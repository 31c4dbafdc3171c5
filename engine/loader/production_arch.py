"""The seed ProductionTransformer as a loadable architecture: Hugging Face style folders (config.json + safetensors)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tokenwire.engine.loader.architecture import Architecture
from tokenwire.engine.models.production_transformer import ProductionTransformer, ProductionTransformerConfig

ARCHITECTURE_NAME = "ProductionTransformer"
_FIELDS = {f.name for f in dataclasses.fields(ProductionTransformerConfig)}


def config_from_hf(config: Mapping[str, Any]) -> ProductionTransformerConfig:
    """The model's config from config.json: every key that names a config field is used.

    Raises:
        ValueError: a field has an invalid value.
    """
    return ProductionTransformerConfig(**{k: v for k, v in config.items() if k in _FIELDS})


def _no_gguf(metadata: Mapping[str, Any], name: str, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    raise ValueError("ProductionTransformer checkpoints are Hugging Face style folders, not GGUF files")


def _no_gguf_weight(name: str, tensor: torch.Tensor, config: Any) -> tuple[str, torch.Tensor]:
    raise ValueError("ProductionTransformer checkpoints are Hugging Face style folders, not GGUF files")


def build(config: ProductionTransformerConfig, dtype: torch.dtype, device: torch.device) -> ProductionTransformer:
    """An inference-mode model on its device, ready for ``load_weights``."""
    model = ProductionTransformer(config).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def save_folder(model: ProductionTransformer, folder: str | Path) -> Path:
    """Write config.json and model.safetensors so that ``load_model(folder)`` reads the model back.

    The folder also needs the tokenizer's ``tokenizer.json`` (and, for chat, a
    ``tokenizer_config.json`` with a ``chat_template``) to be served.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [ARCHITECTURE_NAME], **dataclasses.asdict(model.config)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # NOTE: named_parameters() lists a tied matrix once; load_weights ties it again.
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


PRODUCTION_TRANSFORMER = Architecture(
    name="production_transformer",
    gguf_names=(),
    hf_names=(ARCHITECTURE_NAME, "production_transformer"),
    config_from_hf=config_from_hf,
    config_from_gguf=_no_gguf,
    gguf_weight=_no_gguf_weight,
    build=build,
)
