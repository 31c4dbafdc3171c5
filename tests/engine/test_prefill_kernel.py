"""The native prompt-attention kernel: causal attention of prompt chunks through block tables, against dense attention."""

from __future__ import annotations

import ctypes
import random

import pytest
import torch
import torch.nn.functional as F

from tokenwire.engine import native


@pytest.fixture(scope="module")
def kernel() -> native.PrefillKernel:
    found = native.prefill_kernel(torch.device("cpu"), torch.float32)
    if found is None:
        pytest.skip("no C++ compiler here")
    return found


# (query tokens, context length after them) per chunk: a whole prompt, a chunk after earlier
# context, a single token, chunks that cross key tiles of 64 and query tiles, one with one token
# of context.
CHUNKS = [(200, 200), (37, 500), (1, 1), (130, 131), (17, 300), (96, 96), (64, 128)]


def random_case(seed: int, h_q: int, h_kv: int, d: int, block_size: int, chunks: list[tuple[int, int]]):
    """q for all chunks' tokens, a pool with each chunk's blocks shuffled, and padded tables."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = [(length + block_size - 1) // block_size for _, length in chunks]
    ids = list(range(sum(needed) + 3))
    rng.shuffle(ids)
    tables = [[ids.pop() for _ in range(n)] for n in needed]
    num_blocks = len(ids) + sum(needed)
    k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen)
    q = torch.randn(sum(n for n, _ in chunks), h_q, d, generator=gen)
    width = max(needed) + 1  # wider than the longest, as the runner's padding may be
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    query_lens = torch.tensor([n for n, _ in chunks])
    context_lens = torch.tensor([length for _, length in chunks])
    return q, k_cache, v_cache, tables, padded, query_lens, context_lens


def reference(q, k_cache, v_cache, tables, chunks, scale: float) -> torch.Tensor:
    """Each chunk's keys gathered densely and attended in float64 under its causal mask."""
    h_kv, d = k_cache.shape[-2:]
    outs, start = [], 0
    for (n, length), table in zip(chunks, tables):
        k = k_cache[table].reshape(-1, h_kv, d)[:length].double().transpose(0, 1)
        v = v_cache[table].reshape(-1, h_kv, d)[:length].double().transpose(0, 1)
        qs = q[start : start + n].double().transpose(0, 1)
        mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
        outs.append(F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1))
        start += n
    return torch.cat(outs).float()


LAYOUTS = pytest.mark.parametrize(
    ("h_q", "h_kv", "d", "block_size"),
    [(9, 3, 64, 16), (4, 4, 32, 4), (8, 2, 128, 32), (8, 1, 16, 1), (6, 2, 80, 16), (4, 2, 36, 8)],
    ids=["gqa3-d64", "mha-d32", "gqa4-d128", "mqa-d16-bs1", "d80", "d36"],
)


@LAYOUTS
def test_float32_matches_dense_attention(
    kernel: native.PrefillKernel, h_q: int, h_kv: int, d: int, block_size: int
) -> None:
    """Head sizes that are multiples of 32 take the AVX2 tiles (where built), the others the plain loops."""
    q, kc, vc, tables, padded, qlens, clens = random_case(h_q * d + block_size, h_q, h_kv, d, block_size, CHUNKS)
    out = kernel(q, kc, vc, padded, qlens, clens, d**-0.5)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(q, kc, vc, tables, CHUNKS, d**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("d", "h_q", "h_kv"), [(64, 9, 3), (36, 4, 2)], ids=["tiles", "plain-loops"])
def test_a_narrow_cache_gives_the_bits_of_its_float32_copy(
    kernel: native.PrefillKernel, cache_dtype: torch.dtype, d: int, h_q: int, h_kv: int
) -> None:
    """A 16-bit cache is widened exactly as a tile is loaded, then computed on as float32."""
    q, kc, vc, _, padded, qlens, clens = random_case(5, h_q, h_kv, d, 16, CHUNKS)
    narrow_k, narrow_v = kc.to(cache_dtype), vc.to(cache_dtype)
    out = kernel(q, narrow_k, narrow_v, padded, qlens, clens, 0.1)
    assert torch.equal(out, kernel(q, narrow_k.float(), narrow_v.float(), padded, qlens, clens, 0.1))


def test_bfloat16_queries_are_computed_in_float32_and_rounded_once(kernel: native.PrefillKernel) -> None:
    q, kc, vc, tables, padded, qlens, clens = random_case(7, 9, 3, 64, 16, CHUNKS)
    q, kc, vc = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    out = kernel(q, kc, vc, padded, qlens, clens, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, kc, vc, tables, CHUNKS, 0.125), rtol=0, atol=2**-7)


@pytest.mark.parametrize(("d", "h_q", "h_kv"), [(64, 9, 3), (36, 4, 2)], ids=["tiles", "plain-loops"])
def test_a_prompt_gets_the_same_bits_however_it_is_split_and_whatever_runs_beside_it(
    kernel: native.PrefillKernel, d: int, h_q: int, h_kv: int
) -> None:
    """The scheduler splits prompts into chunks as the token budget allows, and batches them with
    others: neither may change a query's result (key tiles start at fixed positions, and a row's
    arithmetic does not depend on the other rows of its task)."""
    length = 300
    q, kc, vc, _, padded, _, _ = random_case(9, h_q, h_kv, d, 16, [(length, length)])
    table = padded[:1]
    whole = kernel(q, kc, vc, table, torch.tensor([length]), torch.tensor([length]), 0.2)
    parts, start = [], 0
    for n in (100, 37, 1, 162):
        parts.append(kernel(q[start : start + n], kc, vc, table, torch.tensor([n]), torch.tensor([start + n]), 0.2))
        start += n
    assert torch.equal(torch.cat(parts), whole)
    # The same chunks in one call, in another order, beside a stranger's chunk of 50 tokens.
    gen = torch.Generator().manual_seed(1)
    stranger = torch.randn(50, h_q, d, generator=gen)
    pieces = [(137, 237, 100), (100, 100, 0), (50, 50, None), (63, 300, 237)]  # (tokens, context, start)
    rows = torch.cat([stranger if s is None else q[s : s + n] for n, _, s in pieces])
    out = kernel(
        rows, kc, vc, table.expand(len(pieces), -1), torch.tensor([n for n, _, _ in pieces]), torch.tensor([c for _, c, _ in pieces]), 0.2
    )
    assert torch.equal(torch.cat([out[137:237], out[:137], out[287:]]), whole)


def test_what_the_kernel_cannot_read_is_refused_before_any_read(kernel: native.PrefillKernel) -> None:
    q, kc, vc, _, padded, qlens, clens = random_case(3, 4, 2, 32, 4, [(5, 9), (3, 3)])
    with pytest.raises(ValueError, match="exceeds its block table"):
        kernel(q, kc, vc, padded, qlens, torch.tensor([padded.shape[1] * 4 + 1, 3]), 0.25)
    with pytest.raises(ValueError, match=r"not in \[1, context length\]"):
        kernel(q, kc, vc, padded, qlens, torch.tensor([4, 3]), 0.25)  # 5 queries after -1 tokens
    with pytest.raises(ValueError, match="add up to 7, q has 8 rows"):
        kernel(q, kc, vc, padded, torch.tensor([4, 3]), clens, 0.25)
    outside = padded.clone()
    outside[1, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="outside the pool"):
        kernel(q, kc, vc, outside, qlens, clens, 0.25)
    with pytest.raises(ValueError, match="dtypes"):
        kernel(q.half(), kc, vc, padded, qlens, clens, 0.25)
    with pytest.raises(ValueError, match="int64"):
        kernel(q, kc, vc, padded, qlens.int(), clens, 0.25)
    with pytest.raises(ValueError, match="shapes"):
        kernel(q, kc, vc, padded, qlens[:1], clens, 0.25)


def test_the_portable_build_agrees(portable_kernels: ctypes.CDLL) -> None:
    """The plain loops and the exponential of libm instead of the AVX2 tiles and polynomial."""
    q, kc, vc, tables, padded, qlens, clens = random_case(21, 9, 3, 64, 16, CHUNKS)
    fn = portable_kernels.tw_paged_prefill_attention
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes, fn.restype = [ctypes.c_int] * 2 + [p] * 3 + [i64, p, i64, i64, p, p, p] + [i64] * 5 + [ctypes.c_float, ctypes.c_int], ctypes.c_int
    out = torch.empty_like(q)
    rc = fn(
        0, 0, q.data_ptr(), kc.data_ptr(), vc.data_ptr(), kc.shape[0], padded.data_ptr(), padded.stride(0),
        padded.shape[1], qlens.data_ptr(), clens.data_ptr(), out.data_ptr(), len(CHUNKS), 9, 3, 64, 16, 0.125, 2,
    )  # fmt: skip
    assert rc == 0
    torch.testing.assert_close(out, reference(q, kc, vc, tables, CHUNKS, 0.125), rtol=1e-5, atol=1e-5)
