"""The native CPU kernels: their build, their agreement with SDPA and the torch layers, the inputs they refuse."""

from __future__ import annotations

import ctypes

import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from tokenwire.engine import LLM, SamplingParams, native
from tokenwire.engine.attention import write_kv
from tokenwire.engine.models.gguf_linear import GGUFLinear
from tokenwire.engine.models.layers import RMSNorm, RotaryEmbedding, enable_native_ops, rotate

HAS_COMPILER = native._compiler() is not None


@pytest.fixture(scope="module")
def kernel() -> native.DecodeKernel:
    found = native.decode_kernel(torch.device("cpu"), torch.float32)
    if found is None:
        pytest.skip("no C++ compiler here")
    return found


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler here")
def test_the_kernel_builds_and_loads_where_a_compiler_exists() -> None:
    # NOTE: the engine falls back to torch quietly apart from one warning; this is the check that
    # the build itself works on a machine set up as the README says.
    assert native.decode_kernel(torch.device("cpu"), torch.float32) is native.paged_decode_attention
    assert native.decode_kernel(torch.device("cpu"), torch.bfloat16) is native.paged_decode_attention
    assert native.decode_kernel(torch.device("cpu"), torch.float16) is None
    # A float16 cache is read by the kernel of a float32 or bfloat16 model.
    assert native.decode_kernel(torch.device("cpu"), torch.float32, torch.float16) is native.paged_decode_attention
    assert native.decode_kernel(torch.device("cpu"), torch.float32, torch.float64) is None
    assert native.decode_kernel(torch.device("meta"), torch.float32) is None
    assert native.prefill_kernel(torch.device("cpu"), torch.float32, torch.float16) is native.paged_prefill_attention
    assert native.prefill_kernel(torch.device("cpu"), torch.float16) is None
    assert native.prefill_kernel(torch.device("cpu"), torch.bfloat16) is native.paged_prefill_attention


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: list[list[int]], lens: list[int], scale: float) -> torch.Tensor:
    """Each sequence's keys gathered densely and attended by SDPA in float32."""
    h_kv, d = k_cache.shape[-2:]
    rows = []
    for s, (table, n) in enumerate(zip(tables, lens)):
        k = k_cache[table].reshape(-1, h_kv, d)[:n].float().transpose(0, 1)
        v = v_cache[table].reshape(-1, h_kv, d)[:n].float().transpose(0, 1)
        rows.append(F.scaled_dot_product_attention(q[s, :, None].float(), k, v, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(rows)


def random_case(seed: int, h_q: int, h_kv: int, d: int, block_size: int, dtype: torch.dtype, num_seqs: int = 12):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = sorted((rng.randint(1, 300) for _ in range(num_seqs)), reverse=True)
    needed = [(n + block_size - 1) // block_size for n in lens]
    ids = list(range(sum(needed) + 5))
    rng.shuffle(ids)
    tables = [[ids.pop() for _ in range(b)] for b in needed]
    num_blocks = len(ids) + sum(needed)
    k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(dtype)
    # A slice of a wider tensor: the kernel must not assume q is contiguous.
    q = torch.randn(num_seqs, h_q, 2 * d, generator=gen).to(dtype)[..., :d]
    width = needed[0] + 2  # padded wider than the longest, as the runner may
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return q, k_cache, v_cache, tables, padded, lens


@pytest.mark.parametrize(
    ("h_q", "h_kv", "d", "block_size"),
    [(9, 3, 64, 16), (4, 4, 32, 4), (8, 1, 16, 1), (6, 2, 80, 32), (8, 2, 128, 16), (4, 2, 36, 8)],
    ids=["gqa3-d64", "mha", "mqa-bs1", "d80", "d128", "d36-not-a-multiple-of-8"],
)
@pytest.mark.parametrize("num_seqs", [12, 1], ids=["task-per-sequence", "task-per-head"])
def test_float32_matches_sdpa(
    kernel: native.DecodeKernel, h_q: int, h_kv: int, d: int, block_size: int, num_seqs: int
) -> None:
    q, kc, vc, tables, padded, lens = random_case(h_q * d + block_size, h_q, h_kv, d, block_size, torch.float32, num_seqs)
    scale = d**-0.5
    out = kernel(q, kc, vc, padded, torch.tensor(lens), scale)
    torch.testing.assert_close(out, reference(q, kc, vc, tables, lens, scale), rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_sdpa_to_bfloat16_precision(kernel: native.DecodeKernel) -> None:
    q, kc, vc, tables, padded, lens = random_case(7, 9, 3, 64, 16, torch.bfloat16)
    out = kernel(q, kc, vc, padded, torch.tensor(lens), 0.125)
    assert out.dtype == torch.bfloat16
    # The kernel computes in float32 and rounds once, so it is as close as the output's own rounding.
    torch.testing.assert_close(out.float(), reference(q, kc, vc, tables, lens, 0.125), rtol=0, atol=2**-7)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("h_q", "h_kv", "d", "num_seqs"),
    [(9, 3, 64, 12), (9, 3, 64, 1), (4, 4, 32, 12), (8, 2, 128, 12), (16, 2, 64, 12), (8, 2, 16, 12), (9, 3, 36, 5)],
    ids=["tiles-of-3", "task-per-head", "mha", "tiles-3+1", "tiles-3+3+2", "d16-eight-token-path", "d36-generic"],
)
def test_a_narrow_cache_gives_what_float32_gives_on_its_values(
    kernel: native.DecodeKernel, cache_dtype: torch.dtype, h_q: int, h_kv: int, d: int, num_seqs: int
) -> None:
    """A 16-bit cache is widened exactly and then computed on as float32: with AVX2 (the tiles that
    load each key once for up to three query heads where D is a multiple of 32, the eight-token
    path elsewhere), the same bits as the float32 kernel over a float32 copy of the cache; the
    generic loops, which the compiler may vectorize differently per type, agree to rounding."""
    q, kc, vc, tables, padded, lens = random_case(11 + d + h_q, h_q, h_kv, d, 16, torch.float32, num_seqs)
    narrow_k, narrow_v = kc.to(cache_dtype), vc.to(cache_dtype)
    out = kernel(q, narrow_k, narrow_v, padded, torch.tensor(lens), d**-0.5)
    assert out.dtype == torch.float32
    wide = kernel(q, narrow_k.float(), narrow_v.float(), padded, torch.tensor(lens), d**-0.5)
    if d % 8 == 0 and native.has_avx2_paths():
        assert torch.equal(out, wide)
    torch.testing.assert_close(out, wide, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, reference(q, narrow_k, narrow_v, tables, lens, d**-0.5), rtol=1e-5, atol=1e-5)


def test_out_of_range_tables_and_lengths_are_refused_before_any_read(kernel: native.DecodeKernel) -> None:
    q, kc, vc, _, padded, lens = random_case(3, 4, 2, 16, 4, torch.float32, num_seqs=3)
    too_long = torch.tensor(lens)
    too_long[0] = padded.shape[1] * 4 + 1
    with pytest.raises(ValueError, match="context length exceeds"):
        kernel(q, kc, vc, padded, too_long, 0.25)
    with pytest.raises(ValueError, match="context length exceeds"):
        kernel(q, kc, vc, padded, torch.tensor([0] + lens[1:]), 0.25)
    outside = padded.clone()
    outside[1, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="outside the pool"):
        kernel(q, kc, vc, outside, torch.tensor(lens), 0.25)
    with pytest.raises(ValueError, match="dtypes"):
        kernel(q.double(), kc, vc, padded, torch.tensor(lens), 0.25)
    with pytest.raises(ValueError, match="both caches one of float32, bfloat16, float16"):
        kernel(q, kc.half(), vc, padded, torch.tensor(lens), 0.25)
    with pytest.raises(ValueError, match="int64"):
        kernel(q, kc, vc, padded.int(), torch.tensor(lens), 0.25)


def test_a_build_is_reused_and_kept_where_told(tmp_path, monkeypatch) -> None:
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("TOKENWIRE_KERNEL_DIR", str(tmp_path / "kernels"))
    path = native.build()
    assert path.parent == tmp_path / "kernels" and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # not compiled again
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert path.stat().st_mode & 0o444 == 0o444  # loadable by a server running as another user


def test_loading_the_kernels_keeps_subnormal_floats(tmp_path, monkeypatch) -> None:
    """The library is compiled with -ffast-math, but loading it must not set flush-to-zero for the process."""
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("TOKENWIRE_KERNEL_DIR", str(tmp_path / "kernels"))
    ctypes.CDLL(str(native.build()))  # a fresh copy: its load-time constructors run now
    tiny = torch.tensor(1e-39, dtype=torch.float32)  # subnormal in float32
    assert tiny.item() != 0.0
    assert (tiny * 2).item() == pytest.approx(2e-39, rel=1e-3)


def test_a_failing_or_missing_compiler_is_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENWIRE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false") or "false")
    with pytest.raises(RuntimeError, match="failed"):
        native.build()
    assert not any(tmp_path.iterdir())
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native.build()


@pytest.mark.slow
def test_the_engine_gives_the_same_tokens_with_and_without_the_kernels(kernel: native.DecodeKernel) -> None:
    # Short prompts and drafts attend as decode rows on the native path, as chunks on torch's.
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4, 5, 6, 7, 8,"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = []
    for native_kernels, speculative_tokens in ((True, 0), (False, 0), (True, 4)):
        llm = LLM(
            dtype="float32", kv_cache_memory=1 << 26, native_kernels=native_kernels, speculative_tokens=speculative_tokens
        )
        assert (llm.core.runner.decode_kernel is not None) == native_kernels
        assert (llm.core.runner.prefill_kernel is not None) == native_kernels
        layer = llm.core.runner.model.layers[0]
        assert layer.mlp.native_ops == layer.self_attn.native_ops == layer.input_layernorm.native_ops == native_kernels
        # The default model's Q4_1/Q8_0 weights: decode rows multiply straight from the blocks.
        model = llm.core.runner.model
        assert isinstance(layer.mlp.gate_up_proj, GGUFLinear) == isinstance(model.lm_head, GGUFLinear) == native_kernels
        assert llm.core.sampler._native_argmax == native_kernels
        runs.append([o.token_ids for o in llm.generate(prompts, params)])
        if speculative_tokens:
            assert llm.stats().accepted_draft_tokens_total > 0
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_row_ops_match_the_torch_layers(kernel: native.DecodeKernel, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    # float32 agrees to rounding; bfloat16 to one step of its 8-bit mantissa where rounding ties differ.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    x = torch.randn(3, 5, 48, generator=gen).to(dtype)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen))
    torch.testing.assert_close(native.rms_norm(x, norm.weight.detach(), 1e-5), norm(x), **tol)

    # q and k side by side in a wider projection row, as Attention._qkv rotates them in place.
    rope = RotaryEmbedding(16, max_positions=64)
    positions = torch.tensor([0, 5, 63, 7])
    cos, sin = rope.tables(positions)
    proj = torch.randn(4, 6 * 16 + 32, generator=gen).to(dtype)
    expected = rotate(proj[:, : 6 * 16].view(4, 6, 16), cos, sin)
    untouched = proj[:, 6 * 16 :].clone()
    native.rotary_(proj[:, : 6 * 16].view(4, 6, 16), cos.squeeze(-2), sin.squeeze(-2))
    torch.testing.assert_close(proj[:, : 6 * 16].view(4, 6, 16), expected, **tol)
    assert torch.equal(proj[:, 6 * 16 :], untouched)

    gate_up = torch.randn(2, 7, 2 * 40, generator=gen).to(dtype)
    torch.testing.assert_close(native.silu_and_mul(gate_up), F.silu(gate_up[..., :40]) * gate_up[..., 40:], **tol)
    # A strided input (every other row) reads the right rows.
    torch.testing.assert_close(native.silu_and_mul(gate_up[:, ::2]), F.silu(gate_up[:, ::2, :40]) * gate_up[:, ::2, 40:], **tol)


def test_row_ops_refuse_what_they_cannot_read(kernel: native.DecodeKernel) -> None:
    with pytest.raises(ValueError, match="weight"):
        native.rms_norm(torch.randn(2, 8), torch.randn(8, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="last dim 8"):
        native.rms_norm(torch.randn(2, 9), torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="tables"):
        native.rotary_(torch.randn(3, 2, 8), torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="even"):
        native.silu_and_mul(torch.randn(2, 7))


@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)],
    ids=["float32", "bfloat16", "float32-into-float16"],
)
def test_the_kv_write_stores_what_index_copy_stores(
    kernel: native.DecodeKernel, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    assert native.kv_writer(torch.device("cpu"), dtype, cache_dtype) is native.write_kv
    gen = torch.Generator().manual_seed(5)
    # k and v as Attention._qkv gives them: [T, H_kv, D] views into a wider projection row.
    proj = torch.randn(7, 4 * 8 + 2 * 2 * 8, generator=gen).to(dtype)
    k, v = proj[:, 4 * 8 : 6 * 8].view(7, 2, 8), proj[:, 6 * 8 :].view(7, 2, 8)
    slots = torch.tensor([3, 17, 0, 40, 41, 9, 63])
    expected = [torch.randn(4, 16, 2, 8, generator=gen).to(cache_dtype) for _ in range(2)]
    caches = [c.clone() for c in expected]
    write_kv(k, v, *expected, slots)
    native.write_kv(k, v, *caches, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_the_kv_write_refuses_what_it_cannot_store(kernel: native.DecodeKernel) -> None:
    k = v = torch.randn(3, 2, 8)
    caches = [torch.zeros(4, 16, 2, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="outside the pool's 64 slots"):
        native.write_kv(k, v, *caches, torch.tensor([1, 64, 2]))
    with pytest.raises(ValueError, match="outside the pool"):
        native.write_kv(k, v, *caches, torch.tensor([1, -1, 2]))
    # NOTE: the slots are checked before the copy, so a refused write leaves the pool as it was.
    assert not caches[0].any() and not caches[1].any()
    with pytest.raises(ValueError, match="int64 slots"):
        native.write_kv(k, v, *caches, torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="H_kv, D"):
        native.write_kv(torch.randn(3, 4, 8), torch.randn(3, 4, 8), *caches, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="one dtype"):
        native.write_kv(k, v, caches[0], caches[1].half(), torch.tensor([1, 2, 3]))


def test_enable_native_ops_switches_each_module_with_a_native_path() -> None:
    model = torch.nn.Sequential(RMSNorm(8), torch.nn.Linear(8, 8), RMSNorm(8))
    assert enable_native_ops(model) == 2
    assert all(m.native_ops for m in model if isinstance(m, RMSNorm))
    assert enable_native_ops(model) == 0


def argmax_cases(seed: int) -> list[torch.Tensor]:
    """Logits with ties, signed zeros, -inf rows and NaNs, of widths around the 8- and 32-wide loops."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for width in (1, 7, 8, 9, 31, 32, 33, 100, 257, 49152):
        x = torch.randint(-3, 3, (6, width), generator=gen).float()  # many ties
        x[1] = torch.where(torch.rand(width, generator=gen) < 0.5, -0.0, 0.0)  # -0 and +0 are equal
        x[2] = float("-inf")
        x[3, torch.rand(width, generator=gen) < 0.1] = float("nan")
        x[4, -1] = float("nan")  # a NaN in the last place, after the row's maximum
        x[5] = torch.randn(width, generator=gen)
        cases.append(x)
    return cases


def test_argmax_gives_the_indices_torch_gives(kernel: native.DecodeKernel) -> None:
    for x in argmax_cases(11):
        assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1)), x.shape
        strided = torch.cat([x, x], dim=1)[:, : x.shape[1]]  # rows a longer stride apart
        assert torch.equal(native.argmax_rows(strided), x.argmax(dim=-1))
    with pytest.raises(ValueError, match="float32"):
        native.argmax_rows(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit column stride"):
        native.argmax_rows(torch.randn(8, 2).T)


def test_the_portable_argmax_gives_the_same_indices(portable_kernels: ctypes.CDLL) -> None:
    fn = portable_kernels.tw_argmax_rows
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes, fn.restype = [p, i64, i64, i64, p, ctypes.c_int], None
    for x in argmax_cases(12):
        out = torch.empty(x.shape[0], dtype=torch.int64)
        fn(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), 2)
        assert torch.equal(out, x.argmax(dim=-1)), x.shape
