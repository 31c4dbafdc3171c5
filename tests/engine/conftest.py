"""Fixtures shared by the engine tests: a tiny random model with the default model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenwire.engine.loader.production_arch import save_folder
from tokenwire.engine.models.production_transformer import ProductionTransformer, ProductionTransformerConfig
from tokenwire.engine.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def seed_model_folder(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """A tiny random ProductionTransformer with the default model's tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("seed-model")
    tokenizer = Tokenizer.from_gguf(default_model_path)
    torch.manual_seed(0)
    config = ProductionTransformerConfig(
        vocab_size=tokenizer.vocab_size, d_model=64, num_heads=4, num_layers=2, dim_feedforward=128,
        dropout=0.0, max_len=512, tie_weights=False,
    )
    save_folder(ProductionTransformer(config), folder)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return folder
