"""Paged attention through block tables equals dense causal attention, for decodes and prompt chunks."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tokenwire.engine.attention import (
    AttentionMetadata,
    PrefillChunk,
    PrefillTables,
    build_prefill_batch,
    group_decodes,
    paged_attention,
)
from tokenwire.engine.native import DecodeKernel, PrefillKernel, decode_kernel, prefill_kernel

H_Q, H_KV, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 64


def kernel_for(name: str) -> DecodeKernel | None:
    """None for the torch decode path; the native kernel for "native" (skipped where it cannot be built)."""
    if name == "torch":
        return None
    assert name == "native", name
    kernel = decode_kernel(torch.device("cpu"), torch.float32)
    if kernel is None:
        pytest.skip("the native kernel could not be built here (see test_native.py)")
    return kernel


def native_prefill() -> PrefillKernel:
    """The native prefill kernel (the test is skipped where it cannot be built)."""
    kernel = prefill_kernel(torch.device("cpu"), torch.float32)
    if kernel is None:
        pytest.skip("the native kernel could not be built here (see test_native.py)")
    return kernel


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: causal attention over one whole sequence. q: [L, H_q, D]; k, v: [L, H_kv, D]."""
    rep = H_Q // H_KV
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return o.transpose(0, 1)


@pytest.mark.parametrize("decode_path", ["torch", "native"])
@pytest.mark.parametrize("prefill", ["chunk-loop", "batched", "native"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_equals_dense_over_a_mixed_multi_step_schedule(seed: int, prefill: str, decode_path: str) -> None:
    """Three sequences run through several steps of chunks and decodes; every output matches dense.

    Every prefill path: one SDPA call per chunk, all chunks padded into one (CUDA), and the native
    kernel that takes all chunks in one call without padding (CPU).
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lengths = [rng.randint(5, 30) for _ in range(3)]
    qs = [torch.randn(n, H_Q, D, generator=gen) for n in lengths]
    ks = [torch.randn(n, H_KV, D, generator=gen) for n in lengths]
    vs = [torch.randn(n, H_KV, D, generator=gen) for n in lengths]
    expected = [dense(q, k, v) for q, k, v in zip(qs, ks, vs)]
    # Non-contiguous, shuffled block ids for every sequence.
    ids = list(range(NUM_BLOCKS))
    rng.shuffle(ids)
    tables = [[ids.pop() for _ in range((n + BS - 1) // BS)] for n in lengths]
    k_cache = torch.zeros(NUM_BLOCKS, BS, H_KV, D)
    v_cache = torch.zeros(NUM_BLOCKS, BS, H_KV, D)
    done = [0, 0, 0]
    got = [torch.zeros_like(e) for e in expected]
    while any(d < n for d, n in zip(done, lengths)):
        # Each step: sequences with some context decode one token; others take a random chunk.
        plan = []
        for i, n in enumerate(lengths):
            if done[i] >= n:
                continue
            take = 1 if done[i] > 0 and rng.random() < 0.6 else rng.randint(1, n - done[i])
            plan.append((i, take))
        decodes = [(i, t) for i, t in plan if t == 1]
        chunks = [(i, t) for i, t in plan if t > 1]
        order = decodes + chunks
        q = torch.cat([qs[i][done[i] : done[i] + t] for i, t in order])
        k = torch.cat([ks[i][done[i] : done[i] + t] for i, t in order])
        v = torch.cat([vs[i][done[i] : done[i] + t] for i, t in order])
        slots, prefills, prefill_tables, start = [], [], [], 0
        for i, t in order:
            for p in range(done[i], done[i] + t):
                slots.append(tables[i][p // BS] * BS + p % BS)
            if t > 1:
                prefills.append(PrefillChunk(start, t, done[i] + t, torch.tensor(tables[i])))
                prefill_tables.append(tables[i])
            start += t
        width = max([len(tables[i]) for i, _ in decodes], default=1)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            num_decode_tokens=len(decodes),
            decode_block_tables=torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i, _ in decodes]).reshape(len(decodes), width),
            decode_context_lens=torch.tensor([done[i] + 1 for i, _ in decodes], dtype=torch.long),
            prefills=prefills,
            block_size=BS,
            prefill_batch=build_prefill_batch(prefills, prefill_tables, torch.device("cpu")) if prefill == "batched" and prefills else None,
            decode_kernel=kernel_for(decode_path),
            prefill_kernel=native_prefill() if prefill == "native" else None,
            prefill_tables=PrefillTables(
                block_tables=torch.tensor([t + [0] * (max(map(len, prefill_tables)) - len(t)) for t in prefill_tables]),
                query_lens=torch.tensor([c.query_len for c in prefills]),
                context_lens=torch.tensor([c.context_len for c in prefills]),
            )
            if prefill == "native" and prefills
            else None,
        )
        out = paged_attention(q, k, v, k_cache, v_cache, meta)
        start = 0
        for i, t in order:
            got[i][done[i] : done[i] + t] = out[start : start + t]
            start += t
            done[i] += t
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_keys_land_in_their_slots() -> None:
    k_cache = torch.zeros(4, BS, H_KV, D)
    v_cache = torch.zeros(4, BS, H_KV, D)
    k = torch.randn(2, H_KV, D)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([3 * BS + 1, 0 * BS + 2]),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=[],
        block_size=BS,
    )
    paged_attention(torch.randn(2, H_Q, D), k, k.clone(), k_cache, v_cache, meta)
    torch.testing.assert_close(k_cache[3, 1], k[0])
    torch.testing.assert_close(k_cache[0, 2], k[1])
    # Nothing else was written.
    assert int((k_cache != 0).any(dim=-1).any(dim=-1).sum()) == 2


def test_group_decodes_splits_where_padding_would_dominate() -> None:
    assert group_decodes([]) == ()
    assert group_decodes([5]) == ((1, 5),)
    assert group_decodes([10, 9, 7, 6]) == ((4, 10),)  # all within 60% of the longest
    assert group_decodes([24, 20, 12, 11, 4, 3]) == ((2, 24), (4, 12), (6, 4))
    # At most four groups: the last one takes the rest.
    assert group_decodes([100, 50, 25, 12, 6, 3]) == ((1, 100), (2, 50), (3, 25), (6, 12))
    with pytest.raises(ValueError, match="non-increasing"):
        group_decodes([1, 2])


@pytest.mark.parametrize("grouped", [False, True, "native"], ids=["one-call", "grouped", "native"])
def test_decodes_of_very_different_lengths_equal_dense(grouped: bool | str) -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = sorted([2, 3, 5, 9, 14, 22, 35, 60, 61, 90], reverse=True)
    num_blocks = 128
    ids = list(range(num_blocks))
    random.Random(3).shuffle(ids)
    tables = [[ids.pop() for _ in range((n + BS - 1) // BS)] for n in lengths]
    k_cache = torch.zeros(num_blocks, BS, H_KV, D)
    v_cache = torch.zeros(num_blocks, BS, H_KV, D)
    qs = [torch.randn(n, H_Q, D, generator=gen) for n in lengths]
    ks = [torch.randn(n, H_KV, D, generator=gen) for n in lengths]
    vs = [torch.randn(n, H_KV, D, generator=gen) for n in lengths]
    # Every position but the last is already in the pool; this step decodes the last one.
    for table, n, k, v in zip(tables, lengths, ks, vs):
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n - 1)], dtype=torch.long)
        k_cache.view(-1, H_KV, D)[slots] = k[: n - 1]
        v_cache.view(-1, H_KV, D)[slots] = v[: n - 1]
    width = len(tables[0])
    groups = group_decodes([len(t) for t in tables]) if grouped is True else ()
    assert len(groups) > 1 or grouped is not True
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lengths)]),
        num_decode_tokens=len(lengths),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_context_lens=torch.tensor(lengths),
        block_size=BS,
        decode_groups=groups,
        decode_kernel=kernel_for("native" if grouped == "native" else "torch"),
    )
    out = paged_attention(
        torch.stack([q[-1] for q in qs]), torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs]),
        k_cache, v_cache, meta,
    )
    for row, (q, k, v) in enumerate(zip(qs, ks, vs)):
        torch.testing.assert_close(out[row], dense(q, k, v)[-1], rtol=1e-5, atol=1e-5)
