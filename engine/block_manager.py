"""KV block manager: block ids, reference counts, block tables and automatic prefix caching.

The design follows vLLM's KV cache manager (``vllm/v1/core/kv_cache_manager.py`` and
``block_pool.py``), cut down to one plain-Python class:

* The KV pool is ``num_blocks`` blocks of ``block_size`` token positions. A sequence's *block
  table* lists the blocks that hold its positions in order; only this class writes block tables.
* Every block has a reference count: the number of live block tables holding it. Blocks are
  shared between sequences only through prefix hits.
* Prefix caching: once a full block's KV is computed, :meth:`BlockManager.cache_blocks` registers
  it under a chained digest ``H(parent digest || token ids of the block)``, so equal digests mean
  equal whole prefixes, not just equal blocks. A new prompt walks its full blocks through that map
  (:meth:`BlockManager.get_computed_blocks`) and reuses the longest run of hits.
* A free block lives in exactly one of two structures: the *free list* (no digest; FIFO) or the
  *eviction queue* (a digest, ref count 0; least recently freed first). Allocation takes from the
  free list first and only then evicts cached blocks, dropping their digests, so cached prefixes
  live as long as possible. Both are O(1) per block (``deque`` and ``OrderedDict``).

The class is not thread-safe: the engine loop is its only caller.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

# Digest of the (empty) parent of a sequence's first block.
_ROOT_DIGEST = b""


def hash_block_tokens(parent_digest: bytes, token_ids: Sequence[int]) -> bytes:
    """Chained digest of one full block.

    Args:
        parent_digest: digest of the previous block of the same sequence (``b""`` for the first).
        token_ids: the block's token ids.

    Returns:
        A 32-byte BLAKE2b digest covering the parent digest and the token ids.
    """
    # NOTE: a real digest, not hash(): a collision would serve another prompt's keys and values.
    # Token ids are packed as fixed-width little-endian integers so the bytes are unambiguous.
    h = hashlib.blake2b(parent_digest, digest_size=32)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(slots=True)
class _SeqBlocks:
    """One sequence's block table and how far its blocks are registered in the prefix cache."""

    table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    last_digest: bytes = _ROOT_DIGEST


class BlockManager:
    """Allocates KV blocks to sequences and shares computed prefixes between them.

    Args:
        num_blocks: blocks in the KV pool; ids are ``0 .. num_blocks - 1``, all usable.
        block_size: token positions per block.
        enable_prefix_caching: register computed blocks and serve prefix hits.

    Attributes:
        prefix_queried_tokens: prompt tokens looked up in the prefix cache (monotonic counter).
        prefix_hit_tokens: prompt tokens served from the prefix cache (monotonic counter).

    Raises:
        ValueError: if ``num_blocks`` or ``block_size`` is not a positive integer.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._enable_prefix_caching = bool(enable_prefix_caching)
        self._ref_counts: list[int] = [0] * num_blocks
        self._block_digest: list[bytes | None] = [None] * num_blocks
        self._digest_to_block: dict[bytes, int] = {}
        # Free blocks without a digest, taken from the left; all blocks start here in id order.
        self._free_blocks: deque[int] = deque(range(num_blocks))
        # Free blocks with a digest (ref 0), least recently freed first; values unused.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._seqs: dict[str, _SeqBlocks] = {}
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        """Blocks in the KV pool."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Token positions per block."""
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        """Whether computed blocks are registered and prefix hits served."""
        return self._enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: free-list blocks plus evictable cached blocks (ref 0)."""
        return len(self._free_blocks) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with a reference count above 0 (held by live sequences)."""
        return self._num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._digest_to_block)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by live sequences, in [0, 1]."""
        return self.num_used_blocks / self._num_blocks

    def ref_count(self, block_id: int) -> int:
        """Number of live block tables holding ``block_id``.

        Raises:
            ValueError: if ``block_id`` is not in ``0 .. num_blocks - 1``.
        """
        self._check_block_id("block_id", block_id)
        return self._ref_counts[block_id]

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of ``seq_id``'s block table (empty for an unknown sequence).

        The copy is a snapshot: call again after :meth:`allocate_slots` to see new blocks.
        """
        seq = self._seqs.get(seq_id)
        return list(seq.table) if seq is not None else []

    def num_blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks ``seq_id`` still needs for its table to cover ``num_tokens`` positions.

        Raises:
            ValueError: if ``num_tokens`` is negative.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        seq = self._seqs.get(seq_id)
        have = len(seq.table) if seq is not None else 0
        return max(0, self._cdiv(num_tokens) - have)

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest prefix of full blocks of ``token_ids`` whose KV is cached.

        At least one token is left to compute (the engine needs logits for the last prompt
        token), so a prompt of exactly k full blocks hits at most k - 1 of them. Takes no
        references and changes no counters: the scheduler may look up several times before
        admission succeeds.

        Args:
            token_ids: the prompt (or the whole sequence, when it is recomputed).

        Returns:
            ``(block_ids, num_tokens)``: the hit blocks in order and the tokens they cover;
            ``([], 0)`` when prefix caching is off.
        """
        if not self._enable_prefix_caching:
            return [], 0
        bs = self._block_size
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        hits: list[int] = []
        parent = _ROOT_DIGEST
        for i in range(max_blocks):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self._digest_to_block.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * bs

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Add one admitted request's lookup to the prefix counters.

        Raises:
            ValueError: if a count is negative or ``num_hit`` exceeds ``num_queried``.
        """
        if num_queried < 0 or num_hit < 0:
            raise ValueError(f"num_queried and num_hit must be >= 0, got {num_queried} and {num_hit}")
        if num_hit > num_queried:
            raise ValueError(f"num_hit ({num_hit}) must not exceed num_queried ({num_queried})")
        self.prefix_queried_tokens += num_queried
        self.prefix_hit_tokens += num_hit

    def allocate_slots(self, seq_id: str, num_tokens: int, new_computed_blocks: Sequence[int] = ()) -> bool:
        """Make ``seq_id``'s block table cover ``num_tokens`` positions in total.

        ``new_computed_blocks`` (prefix hits from :meth:`get_computed_blocks`, only while the
        table is still empty) are put first, each gaining a reference; a cached block with ref 0
        leaves the eviction queue. Fresh blocks for the rest come from the free list first, then
        from the eviction queue in least-recently-freed order (an evicted block loses its digest).

        Args:
            seq_id: the sequence.
            num_tokens: positions the table must cover after the call (computed plus scheduled).
            new_computed_blocks: prefix-hit blocks to share.

        Returns:
            True on success. False, with nothing changed (hits untouched too), when there are not
            enough free blocks.

        Raises:
            ValueError: if ``num_tokens`` is negative or smaller than the hits cover, or
                ``new_computed_blocks`` is given for a sequence that already has blocks, or holds
                an invalid, repeated or uncached block id.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        seq = self._seqs.get(seq_id)
        num_have = len(seq.table) if seq is not None else 0
        hits = list(new_computed_blocks)
        if hits:
            self._check_hits(seq_id, num_have, num_tokens, hits)
        num_new = max(0, self._cdiv(num_tokens) - num_have - len(hits))
        if not hits and num_new == 0:
            return True
        # NOTE: hits sitting in the eviction queue count as free now but are about to be taken,
        # so they must not be counted as room for the fresh blocks (nor evicted to make it).
        evictable_hits = sum(1 for b in hits if self._ref_counts[b] == 0)
        if num_new > self.num_free_blocks - evictable_hits:
            return False

        if seq is None:
            seq = self._seqs[seq_id] = _SeqBlocks()
        for block_id in hits:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
        seq.table.extend(hits)
        if hits:
            # The hits are registered already: hashing resumes after them.
            seq.num_hashed_blocks = len(hits)
            seq.last_digest = self._block_digest[hits[-1]]  # type: ignore[assignment]
        for _ in range(num_new):
            block_id = self._take_free_block()
            self._ref_counts[block_id] = 1
            seq.table.append(block_id)
        return True

    def cache_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the digests of ``seq_id``'s blocks that are full within the computed tokens.

        Each block is hashed once (the sequence remembers how far it is registered). When another
        block already holds a digest, that mapping stays and this block stays unregistered.
        No-op when prefix caching is off.

        Args:
            seq_id: the sequence; it must hold blocks.
            token_ids: the sequence's tokens (prompt and output so far).
            num_computed_tokens: tokens whose KV is now written, a prefix of ``token_ids``.

        Raises:
            ValueError: if ``seq_id`` holds no blocks, or ``num_computed_tokens`` is negative,
                exceeds ``len(token_ids)`` or the positions its table covers.
        """
        if not self._enable_prefix_caching:
            return
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"seq_id {seq_id!r} holds no blocks; allocate_slots before cache_blocks")
        if not 0 <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"num_computed_tokens must be in [0, len(token_ids)={len(token_ids)}], got {num_computed_tokens}"
            )
        bs = self._block_size
        num_full = num_computed_tokens // bs
        if num_full > len(seq.table):
            raise ValueError(
                f"num_computed_tokens ({num_computed_tokens}) exceeds the {len(seq.table) * bs} positions "
                f"covered by {seq_id!r}'s block table"
            )
        parent = seq.last_digest
        for i in range(seq.num_hashed_blocks, num_full):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            if parent not in self._digest_to_block:
                block_id = seq.table[i]
                self._digest_to_block[parent] = block_id
                self._block_digest[block_id] = parent
        if num_full > seq.num_hashed_blocks:
            seq.num_hashed_blocks = num_full
            seq.last_digest = parent

    def free(self, seq_id: str) -> None:
        """Drop ``seq_id``'s references and forget its table; unknown ``seq_id`` is a no-op.

        Blocks reaching ref 0 go to the eviction queue if they hold a digest (still reusable by
        :meth:`get_computed_blocks` until evicted), else to the free list.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        # NOTE: reverse order, so that among this sequence's cached blocks the tail is evicted
        # first: the head is the part most likely shared by later prompts (system prompt, few-shot).
        for block_id in reversed(seq.table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._block_digest[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free_blocks.append(block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache as far as possible.

        Evictable cached blocks (ref 0) lose their digests and move to the free list. Blocks held
        by live sequences keep theirs (their owners read them, and other sequences may share them):
        they leave the cache when freed and evicted, or on a later reset once they are free.

        Returns:
            True if no digest remains, False if blocks in use still hold one (call again after
            those sequences finish).
        """
        for block_id in self._evictable:
            digest = self._block_digest[block_id]
            del self._digest_to_block[digest]  # type: ignore[arg-type]
            self._block_digest[block_id] = None
            self._free_blocks.append(block_id)
        self._evictable.clear()
        return not self._digest_to_block

    def _take_free_block(self) -> int:
        """Pop a block for a fresh allocation: free list first, then evict the least recently freed."""
        if self._free_blocks:
            return self._free_blocks.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        digest = self._block_digest[block_id]
        del self._digest_to_block[digest]  # type: ignore[arg-type]
        self._block_digest[block_id] = None
        return block_id

    def _check_hits(self, seq_id: str, num_have: int, num_tokens: int, hits: list[int]) -> None:
        """Reject prefix hits that cannot be shared as asked (a caller bug, not a full pool)."""
        if num_have:
            raise ValueError(f"new_computed_blocks given for {seq_id!r}, whose block table is not empty")
        if len(set(hits)) != len(hits):
            raise ValueError(f"new_computed_blocks holds a block twice: {hits}")
        if num_tokens < len(hits) * self._block_size:
            raise ValueError(
                f"num_tokens ({num_tokens}) is smaller than the {len(hits) * self._block_size} "
                "positions new_computed_blocks cover"
            )
        for block_id in hits:
            self._check_block_id("new_computed_blocks", block_id)
            if self._block_digest[block_id] is None:
                raise ValueError(
                    f"new_computed_blocks holds block {block_id}, which is not cached (evicted since lookup?)"
                )

    def _check_block_id(self, name: str, block_id: int) -> None:
        """Raise ValueError unless ``block_id`` is a valid block id."""
        if not isinstance(block_id, int) or not 0 <= block_id < self._num_blocks:
            raise ValueError(f"{name}: block id must be in [0, {self._num_blocks}), got {block_id!r}")

    def _cdiv(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self._block_size)
