"""Matmuls straight from GGUF blocks: the kernel's exact dequantization, its agreement with F.linear, the loader's hand-over."""

from __future__ import annotations

import ctypes
import gc
import weakref
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from torch import nn

from tokenwire.engine import native
from tokenwire.engine.loader import load_gguf, load_model
from tokenwire.engine.models.gguf_linear import (
    MAX_BLOCK_ROWS,
    GGUFLinear,
    block_rows_limit,
    float_weight_parts,
    use_gguf_blocks,
)

from .test_loader import IDS, logits, write_llama_gguf, write_tiny_tokenizer

CPU = torch.device("cpu")
# The quantized types, and the float types a dense checkpoint's weights are packed in.
KERNEL_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F32, Q.F16, Q.BF16]
# Where each K-quant block keeps its float16 scales (gguf-py cannot quantize these types, so the
# tests fill their blocks with random bytes and set the scales to finite values).
K_QUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    if not native.available(CPU, torch.float32):
        pytest.skip("no C++ compiler here")


def quantized(n: int, k: int, qtype: Q, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [n, k] weights as (GGUF blocks [n, bytes], the dequantized float32 matrix gguf gives)."""
    rng = np.random.default_rng(seed)
    if qtype in K_QUANT_SCALES:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, size=(n * k // block_elems, block_bytes), dtype=np.uint8)
        scales = rng.uniform(1e-3, 0.1, size=(data.shape[0], len(K_QUANT_SCALES[qtype]))).astype(np.float16)
        scales[0] = np.float16(3e-7)  # NOTE: a subnormal float16 scale
        for i, offset in enumerate(K_QUANT_SCALES[qtype]):
            data[:, offset : offset + 2] = scales[:, i : i + 1].view(np.uint8)
        data = data.reshape(n, -1)
    else:
        w = rng.standard_normal((n, k), dtype=np.float32)
        w[0] *= 1e-6  # NOTE: a row whose float16 scale is subnormal
        w[1] += 3.0  # and one whose Q4_1 offset is far from zero
        data = gguf.quants.quantize(w, qtype)
    # NOTE: gguf gives F32 and F16 as float arrays: their bytes are the rows the kernel takes.
    rows = np.ascontiguousarray(data.reshape(n, -1)).view(np.uint8)
    return torch.from_numpy(rows.copy()), torch.from_numpy(gguf.quants.dequantize(data, qtype))


def multiply(x: torch.Tensor, qtype: int, blocks: torch.Tensor) -> torch.Tensor:
    """x @ W.T through the kernel, W given as GGUF blocks."""
    return native.quant_linear(x, native.quant_pack(int(qtype), blocks, x.shape[-1]))


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_each_weight_is_the_float32_value_gguf_dequantizes_to(qtype: Q) -> None:
    blocks, dense = quantized(37, 512, qtype)
    # x = I reads the matrix back: out[m, n] = W[n, m] exactly, as every other product is zero.
    assert torch.equal(multiply(torch.eye(512), qtype, blocks), dense.T)


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 64, 65, 200])
def test_matches_f_linear_on_the_dequantized_matrix(qtype: Q, rows: int) -> None:
    blocks, dense = quantized(203, 256, qtype, seed=rows)  # NOTE: 203 outputs: a partial last tile
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    diff = (multiply(x, qtype, blocks) - F.linear(x, dense)).abs()
    # NOTE: two float32 sums of 256 products in different orders differ by at most about
    # 2 * 256 * 2^-24 of the sum of the products' magnitudes.
    assert (diff <= 4e-5 * F.linear(x.abs(), dense.abs())).all()


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(qtype: Q) -> None:
    # Up to 6 rows (12 with AVX-512) use the weights as they unpack, more an unpacked copy, and more
    # than fit in L2 pass over the weights in chunks; every path sums the same products in the same
    # order, so a sequence's logits do not depend on its batch companions.
    weight = native.quant_pack(int(qtype), quantized(64, 768, qtype)[0], 768)
    x = torch.randn(200, 768, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([native.quant_linear(x[i : i + 1], weight) for i in range(0, 200, 7)])
    for rows in (2, 3, 5, 6, 7, 12, 13, 25, 64, 200):
        batch = native.quant_linear(x[:rows], weight)
        assert torch.equal(batch[0:rows:7], alone[: len(range(0, rows, 7))]), rows


def test_takes_strided_rows_and_any_leading_shape() -> None:
    blocks, dense = quantized(40, 64, Q.Q4_1)
    wide = torch.randn(2, 5, 100)
    x = wide[..., 10:74]  # rows 100 floats apart
    out = multiply(x, Q.Q4_1, blocks)
    assert out.shape == (2, 5, 40)
    torch.testing.assert_close(out, F.linear(x, dense), rtol=1e-5, atol=1e-4)
    assert multiply(torch.empty(0, 64), Q.Q4_1, blocks).shape == (0, 40)


def test_refuses_what_it_cannot_read() -> None:
    blocks, _ = quantized(8, 64, Q.Q4_1)
    with pytest.raises(ValueError, match="not a type the kernel handles"):
        native.quant_pack(int(Q.Q2_K), blocks, 64)
    with pytest.raises(ValueError, match="whole number of blocks and match the row size"):
        native.quant_pack(int(Q.Q4_1), blocks, 96)
    with pytest.raises(ValueError, match="whole number of blocks"):
        native.quant_pack(int(Q.Q4_K), blocks, 64)  # K-quant blocks hold 256
    with pytest.raises(ValueError, match="need 2-d uint8 CPU blocks"):
        native.quant_pack(int(Q.Q4_1), blocks.view(-1), 64)
    weight = native.quant_pack(int(Q.Q4_1), blocks, 64)
    with pytest.raises(ValueError, match="need float32"):
        native.quant_linear(torch.randn(2, 64, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match="x has 32 features, the weight takes 64"):
        native.quant_linear(torch.randn(2, 32), weight)
    with pytest.raises(ValueError, match=r"need float32 \[2, 8\] with unit column stride"):
        native.quant_linear(torch.randn(2, 64), weight, out=torch.empty(8, 2).T)
    assert native.quant_row_bytes(int(Q.Q4_1), 64) == 40 and native.quant_row_bytes(int(Q.Q4_K), 512) == 288
    assert native.quant_row_bytes(int(Q.Q4_K), 64) == native.quant_row_bytes(int(Q.Q2_K), 256) == 0


def test_gguf_linear_reads_blocks_for_few_rows_and_the_dense_layer_for_many() -> None:
    blocks, dense_w = quantized(48, 64, Q.Q8_0)
    dense = torch.nn.Linear(64, 48, bias=False)
    dense.weight.data = dense_w
    layer = GGUFLinear(dense, [native.quant_pack(int(Q.Q8_0), blocks, 64)], MAX_BLOCK_ROWS)
    calls: list[int] = []
    dense.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    for rows in (1, MAX_BLOCK_ROWS, MAX_BLOCK_ROWS + 1):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), F.linear(x, dense_w), rtol=1e-5, atol=1e-4)
    assert calls == [MAX_BLOCK_ROWS + 1]


def test_gguf_linear_without_a_dense_copy_reads_the_blocks_for_any_rows() -> None:
    blocks, dense_w = quantized(48, 64, Q.Q4_1)
    layer = GGUFLinear(None, [native.quant_pack(int(Q.Q4_1), blocks, 64)], None)
    x = torch.randn(3 * MAX_BLOCK_ROWS, 64)
    out = layer(x)
    assert torch.equal(out[:5], layer(x[:5]))  # the same path, so the same bits
    torch.testing.assert_close(out, F.linear(x, dense_w), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="dense layer is needed exactly when"):
        GGUFLinear(None, layer.parts, MAX_BLOCK_ROWS)


@pytest.mark.parametrize("max_rows", [MAX_BLOCK_ROWS, None], ids=["with-dense", "blocks-only"])
def test_use_gguf_blocks_wraps_only_layers_the_blocks_fit(max_rows: int | None) -> None:
    blocks, _ = quantized(16, 64, Q.Q4_0)
    model = torch.nn.ModuleDict(
        {"fits": torch.nn.Linear(64, 16, bias=False), "biased": torch.nn.Linear(64, 16), "wrong_shape": torch.nn.Linear(64, 8, bias=False)}
    )
    found = {name: [(int(Q.Q4_0), blocks)] for name in ("fits", "biased", "wrong_shape")}
    found["unknown_type"] = [(int(Q.Q2_K), blocks)]
    dense_weight = weakref.ref(model["fits"].weight)
    assert use_gguf_blocks(model, found, max_rows) == 1
    assert isinstance(model["fits"], GGUFLinear)
    assert not any(isinstance(model[name], GGUFLinear) for name in ("biased", "wrong_shape"))
    # Where the blocks serve every size, nothing holds the dense weight any more.
    gc.collect()
    assert (dense_weight() is None) == (max_rows is None)


# ---- blocks from a checkpoint ------------------------------------------------------------------


def dense_from_blocks(ggml_type: int, blocks: torch.Tensor, in_features: int) -> torch.Tensor:
    return multiply(torch.eye(in_features), ggml_type, blocks).T


def test_the_default_model_hands_over_blocks_for_every_matmul_row_for_row() -> None:
    # NOTE: a model of its own: the hand-over empties the model's store.
    model = load_model(None, dtype="float32", device="cpu", progress=False).model
    found = model.gguf_linear_blocks()
    per_layer = {f"layers.{i}.{m}" for i in range(model.config.num_layers) for m in
                 ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}  # fmt: skip
    assert set(found) == per_layer | {"lm_head"}
    assert [t for t, _ in found["lm_head"]] == [int(Q.Q8_0)]
    assert [t for t, _ in found["layers.0.mlp.down_proj"]] == [int(Q.Q4_1)]
    # Fused q/k/v (q and k un-permuted from llama.cpp's order) and the tied LM head: each block
    # row is the dense weight's row.
    for path in ("layers.0.self_attn.qkv_proj", "layers.29.mlp.gate_up_proj", "lm_head"):
        [(ggml_type, blocks)] = found[path]
        weight = model.get_submodule(path).weight
        assert torch.equal(dense_from_blocks(ggml_type, blocks, weight.shape[1]), weight), path
    assert model.gguf_linear_blocks() == {}


def test_the_engine_serves_every_matmul_of_the_default_model_from_its_blocks() -> None:
    from tokenwire.engine import LLM

    llm = LLM(dtype="float32")  # NOTE: a model of its own: the engine wraps its layers in place
    layers = [m for m in llm.core.loaded.model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 30 * 4 + 1
    # Where the blocks serve every size (AVX2 without AVX-512), no dense copy is kept.
    assert all((m.dense is None) == (block_rows_limit() is None) for m in layers)


def test_blocks_are_kept_only_when_every_shard_has_them(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=False, seed=5)
    # The value projection stays float32, so the fused q/k/v has no blocks for all its rows.
    v = hf_model.model.layers[0].self_attn.v_proj.weight.detach().float().numpy()
    stored = write_llama_gguf(tmp_path / "tiny.gguf", hf_model, Q.Q8_0, override={"blk.0.attn_v.weight": v})
    model = load_gguf(tmp_path / "tiny.gguf", torch.float32, CPU, progress=False).model
    found = model.gguf_linear_blocks()
    assert "layers.0.self_attn.qkv_proj" not in found
    assert {"layers.0.self_attn.o_proj", "layers.0.mlp.gate_up_proj", "lm_head"} <= set(found)
    assert torch.equal(dense_from_blocks(*found["lm_head"][0], hf_model.config.hidden_size), stored["lm_head.weight"])
    # Wrapped, the model computes what it computed dense (decode-sized rows read the blocks).
    before = logits(model, IDS[:4])
    assert use_gguf_blocks(model, found, MAX_BLOCK_ROWS) == len(found)
    assert isinstance(model.lm_head, GGUFLinear)
    torch.testing.assert_close(logits(model, IDS[:4]), before, rtol=1e-4, atol=1e-4)


def test_a_fused_weight_whose_shards_have_different_types_multiplies_from_each(
    tmp_path: Path, make_tiny_hf_llama: Any
) -> None:
    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=False, seed=6)
    # As in a Q4_K_M file, whose q/k/v often has a value of another type than q and k.
    v = hf_model.model.layers[0].self_attn.v_proj.weight.detach().float().numpy()
    v_blocks = gguf.quants.quantize(v, Q.Q4_0)
    write_llama_gguf(tmp_path / "tiny.gguf", hf_model, Q.Q8_0, override={"blk.0.attn_v.weight": (v_blocks, Q.Q4_0)})
    model = load_gguf(tmp_path / "tiny.gguf", torch.float32, CPU, progress=False).model
    found = model.gguf_linear_blocks()
    parts = found["layers.0.self_attn.qkv_proj"]
    assert [t for t, _ in parts] == [int(Q.Q8_0), int(Q.Q4_0)]  # q and k together, then v
    hidden = hf_model.config.hidden_size
    qkv = model.get_submodule("layers.0.self_attn.qkv_proj").weight
    assert torch.equal(torch.cat([dense_from_blocks(t, b, hidden) for t, b in parts]), qkv)
    before = logits(model, IDS[:4])
    assert use_gguf_blocks(model, found, None) == len(found)
    assert len(model.get_submodule("layers.0.self_attn.qkv_proj").parts) == 2
    torch.testing.assert_close(logits(model, IDS[:4]), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALES), ids=lambda q: q.name)
def test_a_k_quant_model_multiplies_from_its_blocks(tmp_path: Path, qtype: Q) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    # gguf-py cannot quantize the K-quants: each matrix becomes random blocks, and the reference
    # model gets what they dequantize to.
    stored = write_llama_gguf(
        tmp_path / "k.gguf", hf_model, qtype, quantize=lambda w, qtype: quantized(*w.shape, qtype)[0].numpy()
    )
    hf_model.load_state_dict(stored, strict=False)
    model = load_gguf(tmp_path / "k.gguf", torch.float32, CPU, progress=False).model
    found = model.gguf_linear_blocks()
    assert set(found) == {"layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_up_proj",
                          "layers.0.mlp.down_proj", "lm_head"}  # fmt: skip
    for path, [(ggml_type, blocks)] in found.items():
        assert ggml_type == int(qtype)
        weight = model.get_submodule(path).weight
        assert torch.equal(dense_from_blocks(ggml_type, blocks, weight.shape[1]), weight), path
    assert use_gguf_blocks(model, found, None) == 5
    diff = (logits(model, IDS[:5]) - logits(hf_model, IDS[:5])).abs().max().item()
    assert diff < 1e-3 * logits(hf_model, IDS[:5]).abs().max().item()


def test_no_blocks_are_kept_for_a_bfloat16_model(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    write_llama_gguf(tmp_path / "tiny.gguf", make_tiny_hf_llama(tmp_path / "hf", tied=True), Q.Q4_1)
    model = load_gguf(tmp_path / "tiny.gguf", torch.bfloat16, CPU, progress=False).model
    assert model.gguf_linear_blocks() == {}


def test_the_portable_build_gives_the_same_bits(portable_kernels: ctypes.CDLL) -> None:
    # NOTE: the plain C++ loops must dequantize as gguf does and sum as the AVX2 path does.
    lib = portable_kernels
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tw_quant_packed_bytes.argtypes, lib.tw_quant_packed_bytes.restype = [i32, i64, i64], i64
    lib.tw_quant_pack.argtypes, lib.tw_quant_pack.restype = [i32, p, i64, i64, i64, p, i32], i32
    lib.tw_quant_linear.argtypes, lib.tw_quant_linear.restype = [i32, p, i64, i64, i64, p, i64, p, i64, i32], i32
    x = torch.cat([torch.eye(256), torch.randn(9, 256, generator=torch.Generator().manual_seed(3))])
    for qtype in KERNEL_TYPES:
        blocks, dense = quantized(37, 256, qtype)
        packed = torch.empty(lib.tw_quant_packed_bytes(int(qtype), 256, 37), dtype=torch.uint8)
        assert lib.tw_quant_pack(int(qtype), blocks.data_ptr(), blocks.shape[1], 256, 37, packed.data_ptr(), 2) == 0
        assert torch.equal(packed, native.quant_pack(int(qtype), blocks, 256).data), qtype.name
        out = torch.empty(x.shape[0], 37)
        rc = lib.tw_quant_linear(int(qtype), x.data_ptr(), 256, x.shape[0], 256, packed.data_ptr(), 37, out.data_ptr(), 37, 2)
        assert rc == 0 and torch.equal(out[:256], dense.T), qtype.name
        assert torch.equal(out[256:], multiply(x[256:], qtype, blocks)), qtype.name


@pytest.mark.parametrize("qtype", KERNEL_TYPES, ids=lambda q: q.name)
def test_the_avx512_variants_give_the_avx2_bits(avx2_kernels: ctypes.CDLL, qtype: Q) -> None:
    # NOTE: every row count from 1 to 26 (each tile size, alone and as the first of several), more
    # tiles, a pass over the weights in chunks of K, and a partial last panel.
    lib = avx2_kernels
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tw_quant_linear.argtypes, lib.tw_quant_linear.restype = [i32, p, i64, i64, i64, p, i64, p, i64, i32], i32
    k, n = 1536, 45
    weight = native.quant_pack(int(qtype), quantized(n, k, qtype, seed=5)[0], k)
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(6))
    for rows in [*range(1, 27), 37, 300]:
        ours = native.quant_linear(x[:rows], weight)
        avx2 = torch.empty(rows, n)
        assert lib.tw_quant_linear(int(qtype), x.data_ptr(), k, rows, k, weight.data.data_ptr(), n, avx2.data_ptr(), n, 2) == 0
        assert torch.equal(ours, avx2), rows


def test_dense_weights_are_packed_in_the_narrowest_float_type_that_holds_them() -> None:
    gen = torch.Generator().manual_seed(8)
    model = nn.ModuleDict({
        "bf16": nn.Linear(64, 48, bias=False),
        "f16": nn.Linear(64, 48, bias=False),
        "f32": nn.Linear(64, 48, bias=False),
        "biased": nn.Linear(64, 48),
        "odd": nn.Linear(40, 48, bias=False),  # in_features not a multiple of the kernel's 32
    })  # fmt: skip
    with torch.no_grad():
        weights = torch.randn(48, 64, generator=gen)
        model["bf16"].weight.copy_(weights.bfloat16().float())
        model["f16"].weight.copy_(weights.half().float())  # float16's extra mantissa bits: not bfloat16
        model["f32"].weight.copy_(weights)
    found = float_weight_parts(model)
    assert {path: [t for t, _ in parts] for path, parts in found.items()} == {"bf16": [30], "f16": [1], "f32": [0]}
    for path, [(ggml_type, raw)] in found.items():
        weight = model[path].weight
        assert torch.equal(dense_from_blocks(ggml_type, raw, 64), weight), path
        x = torch.randn(5, 64, generator=gen)
        torch.testing.assert_close(multiply(x, ggml_type, raw), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_dense_checkpoint_runs_its_matmuls_from_packed_values(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    from tokenwire.engine import LLM, SamplingParams

    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=True, seed=9)
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # as most checkpoints are stored
    write_tiny_tokenizer(tmp_path / "bf16", hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [IDS, IDS[:5], [3, 1, 4, 1, 5, 9, 2, 6]]
    llm = LLM(model=str(tmp_path / "bf16"), dtype="float32", kv_cache_memory=1 << 22)
    model = llm.core.runner.model
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 2 * 4 + 1 and not any(isinstance(m, nn.Linear) for m in model.modules())
    assert {p.ggml_type for m in layers for p in m.parts} == {30}, "bfloat16 values, kept in bfloat16"
    # Where the packed values serve every step (AVX2 without AVX-512), the whole stack is one call.
    assert (model._stack() is not None) == (block_rows_limit() is None)
    plain = LLM(model=str(tmp_path / "bf16"), dtype="float32", kv_cache_memory=1 << 22, native_kernels=False)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in plain.generate(prompts, params)]


def test_the_dense_copy_a_gguf_layer_keeps_is_not_packed_again() -> None:
    layer = nn.Linear(64, 48, bias=False)
    blocks = torch.from_numpy(gguf.quants.quantize(layer.weight.detach().numpy(), Q.Q8_0))
    model = nn.ModuleDict({"gguf": GGUFLinear(layer, [native.quant_pack(int(Q.Q8_0), blocks, 64)], MAX_BLOCK_ROWS)})
    assert float_weight_parts(model) == {}
