"""Paged attention over a flat batch: writes new keys/values into the block pool and attends through block tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from tokenwire.engine.native import DecodeKernel, KVWriter, PrefillKernel


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's run of query tokens in the flat batch (a prompt chunk, or several tokens at once).

    Attributes:
        query_start: index of its first token in the flat batch.
        query_len: how many query tokens it has in this step.
        context_len: tokens of context after this step (earlier cached tokens + query_len).
        block_table: [num_blocks] int64 block ids holding positions 0..context_len-1.
    """

    query_start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor


@dataclass(frozen=True)
class PrefillBatch:
    """All prefill chunks of a step as padded tensors, for one attention call without a Python loop.

    Attributes:
        query_index: [S, Q_max] int64, flat-batch index of each chunk's queries (padding repeats a
            valid index and is masked out).
        query_valid: [S, Q_max] bool, True for real queries; row-major order of the True entries is
            the flat-batch order of the prefill tokens.
        query_pos: [S, Q_max] int64, position of each query in its sequence (0 for padding).
        block_tables: [S, B_max] int64 block ids, padded with 0.
        context_lens: [S] int64, context length after this step.
    """

    query_index: torch.Tensor
    query_valid: torch.Tensor
    query_pos: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor


@dataclass(frozen=True)
class PrefillTables:
    """All prefill chunks of a step as the native prefill kernel takes them (no padding of queries).

    Attributes:
        block_tables: [C, W] int64 block ids of each chunk's context, padded with 0.
        query_lens: [C] int64 query tokens of each chunk, which follow one another in the flat batch.
        context_lens: [C] int64 context length after this step.
    """

    block_tables: torch.Tensor
    query_lens: torch.Tensor
    context_lens: torch.Tensor


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs to know about one flat batch; built by the runner, passed as an argument.

    The flat batch holds the decode tokens first (one per decoding sequence, in order), then the
    prefill chunks. Slots are ``block_id * block_size + offset`` in the flattened pool.

    Attributes:
        slot_mapping: [T] int64, where each token's new key and value are written.
        num_decode_tokens: the first ``num_decode_tokens`` tokens are single-token decodes.
        decode_block_tables: [num_decode, max_blocks] int64, padded with 0 (masked by length).
        decode_context_lens: [num_decode] int64, context length including the new token.
        prefills: the prefill chunks, after the decodes.
        block_size: tokens per KV block.
        prefill_batch: when set, the chunks are attended in one padded call (the runner sets it on
            CUDA, where a Python loop over chunks would cost a kernel launch chain per chunk).
        decode_groups: ``(end_row, num_blocks)`` per group of decodes: rows up to ``end_row`` (from
            the previous group's end) attend over the first ``num_blocks`` columns of their tables.
            Empty: one group of every decode over the whole width. See ``group_decodes``.
        decode_kernel: when set, decodes attend through it, reading keys and values in place
            (``native.paged_decode_attention``); groups and the mask are then unused.
        prefill_kernel: when set (with ``prefill_tables``), every prefill chunk of the step attends
            through it in one call, reading keys and values in place (``native.paged_prefill_attention``).
        prefill_tables: the chunks' tables and lengths for ``prefill_kernel``.
        kv_writer: when set, this step's keys and values are stored through it
            (``native.write_kv``, one call for both) instead of ``write_kv``.
    """

    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor
    prefills: list[PrefillChunk] = field(default_factory=list)
    block_size: int = 16
    prefill_batch: PrefillBatch | None = None
    decode_groups: tuple[tuple[int, int], ...] = ()
    decode_kernel: DecodeKernel | None = None
    prefill_kernel: PrefillKernel | None = None
    prefill_tables: PrefillTables | None = None
    kv_writer: KVWriter | None = None

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        """[num_decode, 1, 1, max_blocks * block_size] bool, True where a decode's key exists.

        Built on first use and shared by every layer of the step.
        """
        length = self.decode_block_tables.shape[1] * self.block_size
        pos = torch.arange(length, device=self.decode_block_tables.device)
        return (pos[None, :] < self.decode_context_lens[:, None])[:, None, None, :]


# A decode group ends where a sequence needs less than this fraction of the group's width: keys
# gathered and attended for padding would then be a large share of the group's work.
_GROUP_WIDTH_RATIO = 0.6
_MAX_DECODE_GROUPS = 4


def group_decodes(num_blocks: list[int]) -> tuple[tuple[int, int], ...]:
    """Split decodes, longest first, into groups of similar length for attention.

    One padded call over all decodes gathers and attends every sequence up to the longest
    one's length; with contexts from 32 to 384 tokens that is about twice the real keys. A few
    groups, each padded only to its own longest member, cut that to about a quarter more at the
    cost of one more call per group.

    Args:
        num_blocks: blocks each decode attends over, in non-increasing order.

    Returns:
        ``(end_row, width)`` per group, as ``AttentionMetadata.decode_groups`` takes them.
    """
    if any(a < b for a, b in zip(num_blocks, num_blocks[1:])):
        raise ValueError("num_blocks must be in non-increasing order")
    groups: list[tuple[int, int]] = []
    for row, blocks in enumerate(num_blocks):
        if not groups:
            groups.append((row + 1, blocks))
            continue
        end, width = groups[-1]
        if blocks < _GROUP_WIDTH_RATIO * width and len(groups) < _MAX_DECODE_GROUPS:
            groups.append((row + 1, blocks))
        else:
            groups[-1] = (row + 1, width)
    return tuple(groups)


def build_prefill_batch(chunks: list[PrefillChunk], tables: list[list[int]], device: torch.device) -> PrefillBatch:
    """Padded index tensors that let attention take every chunk of a step in one call.

    ``tables[i]`` is chunk i's block table as a list (the chunk's tensor would need a device sync).
    """
    q_max = max(c.query_len for c in chunks)
    b_max = max(len(t) for t in tables)
    index = [[c.query_start + min(i, c.query_len - 1) for i in range(q_max)] for c in chunks]
    valid = [[i < c.query_len for i in range(q_max)] for c in chunks]
    pos = [[c.context_len - c.query_len + i if i < c.query_len else 0 for i in range(q_max)] for c in chunks]
    return PrefillBatch(
        query_index=torch.tensor(index, dtype=torch.long, device=device),
        query_valid=torch.tensor(valid, dtype=torch.bool, device=device),
        query_pos=torch.tensor(pos, dtype=torch.long, device=device),
        block_tables=torch.tensor([t + [0] * (b_max - len(t)) for t in tables], dtype=torch.long, device=device),
        context_lens=torch.tensor([c.context_len for c in chunks], dtype=torch.long, device=device),
    )


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's keys and values at their slots.

    Shapes: k, v: [T, H_kv, D]; k_cache, v_cache: [num_blocks, block_size, H_kv, D]; slot_mapping: [T].
    """
    h_kv, d = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, h_kv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, h_kv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Read positions 0..length-1 of one sequence: [length, H_kv, D]."""
    h_kv, d = cache.shape[-2], cache.shape[-1]
    # NOTE: index_select on the block dimension is ~10x faster on CPU than advanced indexing.
    return cache.index_select(0, block_table).reshape(-1, h_kv, d)[:length]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention for a flat batch through the paged KV cache.

    Shapes: q: [T, H_q, D]; k, v: [T, H_kv, D] (this step's, already position-encoded);
    caches: [num_blocks, block_size, H_kv, D], in q's dtype or another (a narrower cache is read back
    in q's dtype). Returns [T, H_q, D]. H_q must be a multiple of H_kv (grouped-query attention).
    """
    (meta.kv_writer or write_kv)(k, v, k_cache, v_cache, meta.slot_mapping)
    nd = meta.num_decode_tokens
    if nd == q.shape[0]:
        return _decode_attention(q, k_cache, v_cache, meta, scale)  # a step of decodes only
    if meta.prefill_kernel is not None and meta.prefill_tables is not None:
        t = meta.prefill_tables
        prefill = meta.prefill_kernel(
            q[nd:], k_cache, v_cache, t.block_tables, t.query_lens, t.context_lens, _scale(q, scale)
        )
        return torch.cat((_decode_attention(q[:nd], k_cache, v_cache, meta, scale), prefill)) if nd else prefill
    out = torch.empty_like(q)
    h_q, h_kv = q.shape[1], k.shape[1]
    gqa = h_q != h_kv
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    if meta.prefill_batch is not None:
        out[nd:] = _batched_prefill_attention(q, k_cache, v_cache, meta.prefill_batch, meta.block_size, scale, gqa)
        return out
    for chunk in meta.prefills:
        s, n = chunk.query_start, chunk.query_len
        qs = q[s : s + n].transpose(0, 1)  # [H_q, n, D]
        if chunk.context_len == n:
            # NOTE: no earlier context: attend to this step's own keys with the is_causal fast path,
            # skipping a gather from the pool. They are rounded as the pool holds them (a no-op
            # unless the cache is narrower), so that a prompt sees the same keys in one chunk or
            # in several.
            ks, vs = (t[s : s + n].to(k_cache.dtype).transpose(0, 1).to(qs.dtype) for t in (k, v))
            o = _chunk_sdpa(qs, ks, vs, None, scale)
        else:
            ks = _gather(k_cache, chunk.block_table, chunk.context_len).transpose(0, 1).to(qs.dtype)
            vs = _gather(v_cache, chunk.block_table, chunk.context_len).transpose(0, 1).to(qs.dtype)
            # Query i sits at position context_len - n + i and sees keys 0..that position.
            q_pos = torch.arange(chunk.context_len - n, chunk.context_len, device=q.device)
            k_pos = torch.arange(chunk.context_len, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [n, context_len], True = attend
            o = _chunk_sdpa(qs, ks, vs, mask, scale)
        out[s : s + n] = o.transpose(0, 1)
    return out


# Chunks with earlier context of at most this many query tokens stack their query heads per KV
# head (see _chunk_sdpa). Against repeating the KV heads, over 1,650-1,800 keys with 3 query heads
# per KV head: 1.81x at 32 queries, 1.25x at 80, 1.19x at 128, 0.96x at 256 (a prompt's tail after
# a prefix-cache hit, the RAG case, is short; a whole long prompt's later chunks are not).
_STACKED_HEADS_MAX_QUERIES = 128


def _chunk_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """One chunk's attention: q [H_q, n, D], k and v [H_kv, L, D]; causal when ``mask`` is None.

    SDPA's flash kernel for the CPU takes only 4-d inputs without ``enable_gqa``; 3-d or grouped
    inputs fall back to the math path, which materializes every score (at 578 tokens of prompt the
    layer's attention took 18 ms that way and 6.6 ms through flash). So in float32 the KV heads are
    repeated for their query heads and a batch axis is added; or, for a short chunk under a mask,
    the query heads of each KV head are stacked as that head's queries, which reads each key once
    for all of them and copies none (the same numbers: each query row is computed alike). Other
    dtypes keep the math path: in bfloat16 the flash kernel moved the default model's top logprob
    for a chat prompt by 0.16 from its float32-attention value (the math path: by 0.01), enough to
    flip a greedy answer.
    """
    group = q.shape[0] // k.shape[0]
    if q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=group > 1)
    if group > 1 and mask is not None and q.shape[1] <= _STACKED_HEADS_MAX_QUERIES:
        h_kv, n, d = k.shape[0], q.shape[1], q.shape[2]
        stacked = q.reshape(h_kv, group * n, d)  # KV head j's query heads j*group.. as its rows
        o = F.scaled_dot_product_attention(stacked[None], k[None], v[None], attn_mask=mask.repeat(group, 1), scale=scale)
        return o[0].reshape(h_kv * group, n, d)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale)
    return o[0]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale a native kernel takes: SDPA's default, 1/sqrt(head size), unless given."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None,
) -> torch.Tensor:
    """One query per sequence; one batched SDPA call per group of decodes (no loop over sequences)."""
    if meta.decode_kernel is not None:
        return meta.decode_kernel(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, _scale(q, scale))
    groups = meta.decode_groups or ((q.shape[0], meta.decode_block_tables.shape[1]),)
    if len(groups) == 1:
        return _decode_group(q, k_cache, v_cache, meta, 0, *groups[0], scale)
    outs, start = [], 0
    for end, width in groups:
        outs.append(_decode_group(q, k_cache, v_cache, meta, start, end, width, scale))
        start = end
    return torch.cat(outs)


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    start: int,
    end: int,
    width: int,
    scale: float | None,
) -> torch.Tensor:
    """Decodes ``start:end`` over the first ``width`` blocks of their tables: [end - start, H_q, D]."""
    num_seqs = end - start
    h_kv, d = k_cache.shape[-2], k_cache.shape[-1]
    length = width * meta.block_size
    # k, v: [S, H_kv, L, D], gathered through the block tables; padding beyond each length is masked.
    flat = meta.decode_block_tables[start:end, :width].reshape(-1)
    ks = k_cache.index_select(0, flat).reshape(num_seqs, length, h_kv, d).transpose(1, 2).to(q.dtype)
    vs = v_cache.index_select(0, flat).reshape(num_seqs, length, h_kv, d).transpose(1, 2).to(q.dtype)
    mask = meta.decode_mask[start:end, ..., :length]
    # NOTE: the query heads that share a KV head go in as that head's queries ([S, H_kv, G, D]),
    # rather than as G heads with the keys repeated (enable_gqa): the same result, and SDPA reads
    # each key once for G queries (17% faster for 64 sequences of 320 tokens on CPU).
    h_q = q.shape[1]
    qg = q[start:end].reshape(num_seqs, h_kv, h_q // h_kv, d)
    o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=mask, scale=scale)
    return o.reshape(num_seqs, h_q, d)


def _batched_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PrefillBatch,
    block_size: int,
    scale: float | None,
    gqa: bool,
) -> torch.Tensor:
    """Every prefill chunk in one SDPA call: queries padded to the longest chunk, keys to the longest context."""
    num_seqs, max_blocks = batch.block_tables.shape
    h_kv, d = k_cache.shape[-2], k_cache.shape[-1]
    length = max_blocks * block_size
    qs = q[batch.query_index].transpose(1, 2)  # [S, H_q, Q_max, D]
    flat = batch.block_tables.reshape(-1)
    ks = k_cache.index_select(0, flat).reshape(num_seqs, length, h_kv, d).transpose(1, 2).to(q.dtype)
    vs = v_cache.index_select(0, flat).reshape(num_seqs, length, h_kv, d).transpose(1, 2).to(q.dtype)
    k_pos = torch.arange(length, device=q.device)
    # Causal within the context, and nothing past each sequence's length. Padding queries sit at
    # position 0 and see key 0, so no row is fully masked (which would give NaN).
    mask = (k_pos[None, None, :] <= batch.query_pos[:, :, None]) & (
        k_pos[None, None, :] < batch.context_lens[:, None, None]
    )  # [S, Q_max, L]
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)[batch.query_valid]  # [T_prefill, H_q, D]
