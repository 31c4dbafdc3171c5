"""The native bfloat16 matmul (AVX512-BF16): its sums, its batch invariance, and the layers that take it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tokenwire.engine import LLM, SamplingParams, native
from tokenwire.engine.models.packed_linear import NativeBf16Linear, PackedLinear, native_bf16_applies, prepack_linears

needs_kernel = pytest.mark.skipif(
    not native.bf16_linear_available(), reason="this CPU (or the kernels' build) has no AVX512-BF16"
)


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    if not native.available(torch.device("cpu"), torch.float32):
        pytest.skip("no C++ compiler here")


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
# NOTE: tiles cover two panels of 16 outputs: 20 ends in a partial panel of a pair, 45 in a partial
# one alone, 48 in a whole one alone.
@pytest.mark.parametrize("outputs", [20, 45, 48])
def test_sums_in_float32_and_rounds_once_to_bfloat16(rows: int, outputs: int) -> None:
    w, x = bf16(outputs, 576, seed=1), bf16(rows, 576, seed=rows)
    got = native.bf16_linear(x, native.bf16_pack(w)).double()
    exact = x.double() @ w.double().T
    # One rounding to bfloat16 (half a unit in the 8th bit) on top of float32 sums of 576 products.
    bound = 2**-8 * exact.abs() + 576 * 2**-23 * (x.double().abs() @ w.double().abs().T)
    assert ((got - exact).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("outputs", [20, 45, 64, 304])
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(outputs: int) -> None:
    # NOTE: 304 outputs (19 panels) go in pairs of panels on up to 4 threads, fewer outputs or one
    # thread in single panels; both sum every output's pairs in the same order.
    w, x = bf16(outputs, 1536, seed=2), bf16(40, 1536, seed=3)
    packed = native.bf16_pack(w)
    alone = torch.cat([native.bf16_linear(x[i : i + 1], packed) for i in range(40)])
    for rows in (2, 7, 8, 9, 13, 40):
        assert torch.equal(native.bf16_linear(x[:rows], packed), alone[:rows]), rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.bf16_linear(x, packed), alone)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_takes_strided_rows_and_any_leading_shape() -> None:
    packed = native.bf16_pack(bf16(32, 64, seed=4))
    x = bf16(2, 5, 100, seed=5)[..., 10:74]
    out = native.bf16_linear(x, packed)
    assert out.shape == (2, 5, 32) and out.dtype == torch.bfloat16
    assert torch.equal(out, native.bf16_linear(x.contiguous(), packed))
    assert native.bf16_linear(torch.empty(0, 64, dtype=torch.bfloat16), packed).shape == (0, 32)


def test_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="even, positive number of input features"):
        native.bf16_pack(bf16(8, 63, seed=8))
    with pytest.raises(ValueError, match="2-d bfloat16 CPU tensor"):
        native.bf16_pack(torch.randn(8, 64))
    packed = native.bf16_pack(bf16(8, 64, seed=6))
    assert (packed.in_features, packed.out_features) == (64, 8)
    with pytest.raises(ValueError, match="need bfloat16"):
        native.bf16_linear(torch.randn(2, 64), packed)
    with pytest.raises(ValueError, match="x has 32 features, the weight takes 64"):
        native.bf16_linear(bf16(2, 32, seed=7), packed)


def test_prepacking_picks_the_native_layer_where_it_applies() -> None:
    model = nn.Sequential(
        nn.Linear(64, 32, bias=False), nn.Linear(32, 16), nn.Linear(63, 8, bias=False), nn.Linear(8, 8, bias=False)
    ).to(torch.bfloat16)
    model[3].float()
    kernel = native.bf16_linear_available()
    assert [native_bf16_applies(m) for m in model] == [kernel, False, False, False]  # bias, odd K, float32
    assert prepack_linears(model, native_bf16=True) == 4
    assert [type(m) for m in model] == [NativeBf16Linear if kernel else PackedLinear, *[PackedLinear] * 3]


@needs_kernel
def test_a_bfloat16_sequence_decodes_the_same_tokens_alone_and_in_a_batch(seed_model_folder: Path) -> None:
    # NOTE: the batch decodes twelve sequences a step, alone one: every step's matmuls take the
    # kernel. The default model, whose rows of 576 and 1536 inputs oneDNN would sum in another order.
    llm = LLM(dtype="bfloat16", kv_cache_memory=1 << 26)
    layers = [m for m in llm.core.runner.model.modules() if isinstance(m, NativeBf16Linear)]  # type: ignore[attr-defined]
    assert layers, "no layer took the native bfloat16 kernel"
    # NOTE: logprobs compared exactly: the same logits, bit for bit (tokens alone would hide a
    # difference in the last bits).
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time there was a king who"]
    batch = llm.generate(prompts + [f"{i} apples and {i + 1} pears" for i in range(9)], params)
    for prompt, together in zip(prompts, batch):
        llm.reset_prefix_cache()
        alone = llm.generate([prompt], params)[0]
        assert alone.token_ids == together.token_ids
        assert [p.logprob for p in alone.logprobs] == [p.logprob for p in together.logprobs]  # type: ignore[union-attr]
    off = LLM(str(seed_model_folder), dtype="bfloat16", kv_cache_memory=1 << 24, native_kernels=False)
    assert not any(isinstance(m, NativeBf16Linear) for m in off.core.runner.model.modules())  # type: ignore[attr-defined]
