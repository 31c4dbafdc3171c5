"""Prepacked oneDNN linear layers: same results as F.linear, swapped in by the engine on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenwire.engine import LLM, SamplingParams
from tokenwire.engine.models.packed_linear import PackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.float32, torch.device("cpu")), reason="torch was built without oneDNN"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (5,), (64,), (2, 7), (0,)])
def test_packed_linear_equals_f_linear(bias: bool, lead: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(dense)
    x = torch.randn(*lead, 96)
    with torch.inference_mode():
        got = packed(x)
        want = dense(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_linear_takes_a_strided_input() -> None:
    torch.manual_seed(1)
    dense = nn.Linear(32, 48, bias=False)
    x = torch.randn(10, 64)[:, :32]  # every row skips 32 values: not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(dense)(x), dense(x), rtol=1e-5, atol=1e-5)


def test_prepack_replaces_every_linear_and_keeps_the_rest() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4), nn.LayerNorm(4)))
    assert prepack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert isinstance(model[2][1], nn.LayerNorm)
    assert prepack_linears(model) == 0  # packing twice is harmless
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_can_prepack_says_no_off_the_cpu_and_for_float16() -> None:
    assert not can_prepack(torch.float32, torch.device("meta"))
    assert not can_prepack(torch.float16, torch.device("cpu"))


def test_engine_output_is_the_same_with_and_without_packing() -> None:
    prompts = ["The capital of France is", "def fib(n):", "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # NOTE: without the native kernels, which would multiply decode rows from the GGUF blocks.
    packed = LLM(dtype="float32", kv_cache_memory=1 << 26, native_kernels=False)
    plain = LLM(dtype="float32", kv_cache_memory=1 << 26, prepack_weights=False, native_kernels=False)
    layers = packed.core.runner.model.layers  # type: ignore[attr-defined]
    assert isinstance(layers[0].mlp.down_proj, PackedLinear)
    assert isinstance(plain.core.runner.model.layers[0].mlp.down_proj, nn.Linear)  # type: ignore[attr-defined]
    got = packed.generate(prompts, params)
    want = plain.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
