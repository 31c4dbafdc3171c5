"""Model runner: owns the KV pool, turns a scheduled step into one flat batch and returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenwire.engine import hugepages
from tokenwire.engine.attention import (
    AttentionMetadata,
    PrefillChunk,
    PrefillTables,
    build_prefill_batch,
    group_decodes,
)
from tokenwire.engine.models.base import EngineModel, KVCacheSpec
from tokenwire.engine.native import DecodeKernel, KVWriter, PrefillKernel, decode_kernel, kv_writer, prefill_kernel
from tokenwire.engine.scheduler import ScheduledSequence, SchedulerOutput


@dataclass(frozen=True)
class RunnerOutput:
    """Logits of the sequences that sample this step, in the order of ``sampled``.

    Each sequence has ``num_sampled_rows`` consecutive rows: one for its next token, plus one after
    each of its draft tokens.
    """

    sampled: list[ScheduledSequence]
    logits: torch.Tensor  # [sum of num_sampled_rows, vocab] float32


# Chunks of at most this many tokens attend as decode rows when the native decode kernel is
# present (a decode with drafts; without the prefill kernel, also a prompt's short tail after a
# prefix-cache hit); each row rereads its sequence's keys, so longer chunks take a chunk's path.
_MAX_CHUNK_AS_ROWS = 16


def num_blocks_for_budget(spec: KVCacheSpec, dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    """How many blocks of the pool fit in a memory budget."""
    per_block = spec.bytes_per_token(dtype) * block_size
    return budget_bytes // per_block


class ModelRunner:
    """Runs the model over flat batches. The only owner of KV tensors.

    The pool is one pair of tensors per layer, [num_blocks, block_size, H_kv, D], in the cache dtype
    (by default the model's) on the model's device. Block tables come from the block manager as
    plain lists; here they become slot mappings (where new keys go) and padded tables (where
    attention reads).
    """

    def __init__(
        self,
        model: EngineModel,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        batch_prefills: bool | None = None,
        native_kernels: bool = True,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        # NOTE: on CUDA all prompt chunks of a step go through one padded attention call (no Python
        # loop over sequences); on CPU a loop per chunk is faster, since a chunk without earlier
        # context takes SDPA's is_causal path and nothing is padded.
        self.batch_prefills = device.type == "cuda" if batch_prefills is None else batch_prefills
        # NOTE: on CPU, decodes attend through a native kernel that reads keys and values in place
        # (5x faster than gathering them for SDPA at 64 sequences); it is built here, at load time.
        cache_dtype = cache_dtype or dtype
        self.decode_kernel: DecodeKernel | None = decode_kernel(device, dtype, cache_dtype) if native_kernels else None
        # NOTE: and prompt chunks through another, which reads them in place too and skips the key
        # tiles a causal mask hides (1.5-2x SDPA's flash kernel on the default model's chunks in
        # float32, ~4x the math path torch keeps in bfloat16: see native.prefill_kernel).
        self.prefill_kernel: PrefillKernel | None = prefill_kernel(device, dtype, cache_dtype) if native_kernels else None
        # NOTE: and the step's keys and values go into the pool in one call per layer rather than
        # two index_copy_ (about 35 us a layer for a decode token, more than the copy itself).
        self.kv_writer: KVWriter | None = kv_writer(device, dtype, cache_dtype) if native_kernels else None
        spec = model.kv_cache_spec
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (hugepages.zeros(shape, cache_dtype, device), hugepages.zeros(shape, cache_dtype, device))
            for _ in range(spec.num_layers)
        ]

    def _prefill_tables(self, chunks: list[PrefillChunk], tables: list[list[int]]) -> PrefillTables:
        """The chunks' block tables, padded to the widest, and their lengths, for the prefill kernel."""
        width = max(len(t) for t in tables)
        dev = self.device
        return PrefillTables(
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev),
            query_lens=torch.tensor([c.query_len for c in chunks], dtype=torch.long, device=dev),
            context_lens=torch.tensor([c.context_len for c in chunks], dtype=torch.long, device=dev),
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step and return the logits of the sequences that reach their last token."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        sampled: list[ScheduledSequence] = []
        prefills: list[PrefillChunk] = []
        prefill_tables: list[list[int]] = []
        # NOTE: decodes longest first, so that groups of similar lengths are runs of rows (see
        # group_decodes); the flat batch's order is the runner's to choose.
        decodes = sorted(out.decodes, key=lambda d: -d.seq.num_computed_tokens)
        # With the native kernel, a short chunk (a decode with drafts, a tiny prompt) attends as
        # one decode row per token, each with its own context length: cheaper than a chunk's
        # gather and SDPA call per layer, and exact, since each row sees the keys up to its own.
        # With the prefill kernel too, only drafts do: they must give the bits a plain decode
        # gives, and every prompt token then goes through one kernel, which gives a prompt the
        # same bits however the scheduler splits it.
        limit = _MAX_CHUNK_AS_ROWS if self.decode_kernel is not None else 1
        prompts_as_rows = self.prefill_kernel is None or self.batch_prefills
        is_row = [p.num_new_tokens <= limit and (bool(p.draft_token_ids) or prompts_as_rows) for p in out.prefills]
        as_rows = [p for p, row in zip(out.prefills, is_row) if row]
        chunks = [p for p, row in zip(out.prefills, is_row) if not row]
        row_tables: list[list[int]] = []
        row_lens: list[int] = []
        num_rows_items = len(decodes) + len(as_rows)
        for index, item in enumerate(decodes + as_rows + chunks):
            seq, table = item.seq, item.block_table
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            query_start = len(input_ids)
            input_ids.extend(item.input_token_ids)
            pos = range(start, end)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if index < num_rows_items:
                row_tables.extend([table] * item.num_new_tokens)
                row_lens.extend(p + 1 for p in pos)
            else:
                prefill_tables.append(table[: (end + bs - 1) // bs])
                prefills.append(
                    PrefillChunk(
                        query_start=query_start,
                        query_len=item.num_new_tokens,
                        context_len=end,
                        block_table=torch.tensor(table[: (end + bs - 1) // bs], dtype=torch.long, device=self.device),
                    )
                )
            if item.samples:
                rows = item.num_sampled_rows
                sample_idx.extend(range(len(input_ids) - rows, len(input_ids)))
                sampled.append(item)
        dev = self.device
        groups: tuple[tuple[int, int], ...] = ()
        if row_lens:
            num_blocks = [(n + bs - 1) // bs for n in row_lens]
            width = max(num_blocks)
            if self.decode_kernel is None:
                groups = group_decodes(num_blocks)  # rows are decodes only, longest first
            tables = [t[:width] + [0] * (width - min(len(t), width)) for t in row_tables]
            decode_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            decode_lens = torch.tensor(row_lens, dtype=torch.long, device=dev)
        else:
            decode_tables = torch.zeros((0, 1), dtype=torch.long, device=dev)
            decode_lens = torch.zeros((0,), dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode_tokens=len(row_lens),
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            prefills=prefills,
            block_size=bs,
            prefill_batch=build_prefill_batch(prefills, prefill_tables, dev) if self.batch_prefills and prefills else None,
            decode_groups=groups,
            decode_kernel=self.decode_kernel,
            prefill_kernel=self.prefill_kernel,
            kv_writer=self.kv_writer,
            prefill_tables=(
                self._prefill_tables(prefills, prefill_tables)
                if self.prefill_kernel and prefills and not self.batch_prefills
                else None
            ),
        )
        # NOTE: only the rows that sample are wanted past the last layer's KV write: for a
        # 256-token prompt chunk, 1 row of the last layer's attention and MLP and of the LM head's
        # [vocab x d_model] work instead of 256.
        hidden = self.model.forward_flat(
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
            output_rows=torch.tensor(sample_idx, dtype=torch.long, device=dev),
        )
        if not sampled:
            return RunnerOutput(sampled=[], logits=hidden.new_zeros((0, self.model.vocab_size), dtype=torch.float32))
        logits = self.model.compute_logits(hidden)
        return RunnerOutput(sampled=sampled, logits=logits.float())
