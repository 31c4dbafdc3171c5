"""Session-wide fixtures: the default model's file, our loaded model, and the transformers reference (each loaded once)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tokenwire.engine.loader import LoadedModel

# NOTE: torch and the engine are imported inside the fixtures: this conftest also serves the
# client's tests, which must stay light.


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The embedded default model's GGUF file (SmolLM2-135M-Instruct, Q4_1)."""
    from tokenwire.engine.loader import default_model_path as find_default_model

    return find_default_model()


@pytest.fixture(scope="session")
def default_model_f32(default_model_path: Path) -> "LoadedModel":
    """The default model with its tokenizer, float32 on the CPU (bit-comparable across batchings)."""
    from tokenwire.engine.loader import load_model

    return load_model(default_model_path, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="session")
def default_model_bf16(default_model_path: Path) -> "LoadedModel":
    """The default model with its tokenizer, bfloat16 on the CPU (what "auto" serves there)."""
    from tokenwire.engine.loader import load_model

    return load_model(default_model_path, dtype="bfloat16", device="cpu", progress=False)


@pytest.fixture(scope="session")
def hf_reference_tokenizer(default_model_path: Path) -> Any:
    """transformers' tokenizer for the default GGUF (the reference for parity tests)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)


@pytest.fixture(scope="session")
def hf_reference_model(default_model_path: Path) -> Any:
    """transformers' LlamaForCausalLM for the default GGUF, float32, eval (the reference for parity tests)."""
    import torch

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_hf_llama() -> Any:
    """A factory: ``make(folder, tied=..., seed=..., max_shard_size=...)`` saves a tiny random
    transformers LlamaForCausalLM (GQA, rope_theta 500) as safetensors into ``folder`` and returns it.

    Sizes are multiples of 32 so that every weight row fills whole GGUF quantization blocks.
    """
    import torch

    transformers = pytest.importorskip("transformers")

    def make(folder: Path, *, tied: bool, seed: int = 0, max_shard_size: str | None = None) -> Any:
        config = transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            rope_theta=500.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=tied,
            initializer_range=0.3,  # NOTE: larger than the default, so that logits are far from ties.
            bos_token_id=1,
            eos_token_id=2,
        )
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            # Random norm weights too, so that a norm loaded into the wrong place shows.
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
        return model

    return make


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files by name: ca, a server certificate for 127.0.0.1/localhost and a client certificate
    (both signed by ca), and an unrelated other-ca; made with the openssl command line."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command line is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {p.name: p for p in d.iterdir()}
