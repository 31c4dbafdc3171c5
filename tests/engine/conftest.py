"""Fixtures shared by the engine tests: a tiny random model with the default model's tokenizer, and the
native kernels' portable and AVX2-only builds."""

from __future__ import annotations

import ctypes
import json
import platform
from pathlib import Path

import pytest
import torch

from tokenwire.engine import native
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


@pytest.fixture(scope="session")
def portable_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The native kernels built at the x86-64-v2 level: the plain C++ loops that a CPU without AVX2
    (or another architecture) gets, loaded from a folder of their own."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX2 paths exist on x86 only")
    if native._compiler() is None:
        pytest.skip("no C++ compiler here")
    flags = [f for f in native.compile_flags() if not f.startswith("-march")] + ["-march=x86-64-v2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENWIRE_KERNEL_DIR", str(tmp_path_factory.mktemp("portable-kernels")))
        patch.setattr(native, "compile_flags", lambda: flags)
        return ctypes.CDLL(str(native.build()))


@pytest.fixture(scope="session")
def avx2_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The native kernels built without their AVX-512 variants, on a CPU that runs them: the AVX2
    paths that a CPU without AVX-512 gets, loaded from a folder of their own."""
    if native.quant_vector_bits() != 512:
        pytest.skip("this CPU (or this build) does not run the AVX-512 variants")
    flags = [*native.compile_flags(), "-DTW_NO_AVX512"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENWIRE_KERNEL_DIR", str(tmp_path_factory.mktemp("avx2-kernels")))
        patch.setattr(native, "compile_flags", lambda: flags)
        lib = ctypes.CDLL(str(native.build()))
    assert lib.tw_quant_vector_bits() == 256
    return lib
