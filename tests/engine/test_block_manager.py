"""Tests for the KV block manager: allocation, reference counts, prefix caching and eviction."""

from __future__ import annotations

import random

import pytest

from tokenwire.engine.block_manager import BlockManager, hash_block_tokens

BLOCK_SIZE = 4


def make_manager(num_blocks: int = 10, block_size: int = BLOCK_SIZE, prefix_caching: bool = True) -> BlockManager:
    """A fresh manager with a small pool."""
    return BlockManager(num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=prefix_caching)


def make_tokens(num_tokens: int, start: int = 0) -> list[int]:
    """Distinct, predictable token ids ``start .. start + num_tokens - 1``."""
    return list(range(start, start + num_tokens))


def admit(bm: BlockManager, seq_id: str, token_ids: list[int]) -> list[int]:
    """Admit a prompt the way the scheduler does (lookup, allocate, compute, cache); return the hits."""
    hits, num_hit = bm.get_computed_blocks(token_ids)
    assert bm.allocate_slots(seq_id, len(token_ids), hits)
    bm.record_prefix_lookup(len(token_ids), num_hit)
    bm.cache_blocks(seq_id, token_ids, len(token_ids))
    return hits


def ref_counts(bm: BlockManager, block_ids: list[int]) -> list[int]:
    """Reference counts of ``block_ids``, in order."""
    return [bm.ref_count(b) for b in block_ids]


# --- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_blocks": 0, "block_size": 4}, "num_blocks"),
        ({"num_blocks": -3, "block_size": 4}, "num_blocks"),
        ({"num_blocks": 2.5, "block_size": 4}, "num_blocks"),
        ({"num_blocks": 4, "block_size": 0}, "block_size"),
        ({"num_blocks": 4, "block_size": True}, "block_size"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)  # type: ignore[arg-type]


def test_fresh_manager_is_all_free() -> None:
    bm = make_manager(num_blocks=7, block_size=16)
    assert (bm.num_blocks, bm.block_size) == (7, 16)
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (7, 0, 0.0)
    assert (bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (0, 0)


# --- allocation ----------------------------------------------------------------------------------


def test_allocation_takes_lowest_ids_in_order() -> None:
    bm = make_manager()
    assert bm.allocate_slots("a", 9)  # 3 blocks of 4
    assert bm.allocate_slots("b", 4)  # exactly 1 block
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.block_table("b") == [3]
    assert ref_counts(bm, [0, 1, 2, 3, 4]) == [1, 1, 1, 1, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (6, 4, 0.4)


def test_growth_block_by_block_while_decoding() -> None:
    bm = make_manager()
    assert bm.allocate_slots("a", 3)
    assert bm.allocate_slots("other", 1)  # interleaves, so growth ids are not contiguous
    assert bm.block_table("a") == [0]
    for num_tokens in (4, 4):  # still fits in block 0; asking twice allocates nothing
        assert bm.num_blocks_needed("a", num_tokens) == 0
        assert bm.allocate_slots("a", num_tokens)
        assert bm.block_table("a") == [0]
    assert bm.num_blocks_needed("a", 5) == 1
    assert bm.allocate_slots("a", 5)
    assert bm.block_table("a") == [0, 2]
    assert bm.allocate_slots("a", 8)
    assert bm.block_table("a") == [0, 2]
    assert bm.allocate_slots("a", 9)
    assert bm.block_table("a") == [0, 2, 3]
    assert bm.num_used_blocks == 4


def test_block_table_is_a_snapshot() -> None:
    bm = make_manager()
    assert bm.allocate_slots("a", 4)
    table = bm.block_table("a")
    table.append(99)
    assert bm.allocate_slots("a", 5)
    assert bm.block_table("a") == [0, 1]
    assert bm.block_table("unknown") == []


def test_num_blocks_needed() -> None:
    bm = make_manager()
    assert bm.num_blocks_needed("new", 0) == 0
    assert bm.num_blocks_needed("new", 1) == 1
    assert bm.num_blocks_needed("new", 8) == 2
    assert bm.allocate_slots("a", 6)
    assert bm.num_blocks_needed("a", 6) == 0
    assert bm.num_blocks_needed("a", 2) == 0
    assert bm.num_blocks_needed("a", 13) == 2
    with pytest.raises(ValueError, match="num_tokens"):
        bm.num_blocks_needed("a", -1)


def test_allocation_failure_is_all_or_nothing() -> None:
    bm = make_manager(num_blocks=4)
    assert bm.allocate_slots("a", 8)  # blocks 0, 1
    assert not bm.allocate_slots("b", 12)  # needs 3, 2 free
    assert bm.block_table("b") == []
    assert not bm.allocate_slots("a", 17)  # needs 3 more, 2 free
    assert bm.block_table("a") == [0, 1]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (2, 2)
    assert ref_counts(bm, [0, 1, 2, 3]) == [1, 1, 0, 0]
    assert bm.allocate_slots("a", 16)  # exactly what is left
    assert bm.block_table("a") == [0, 1, 2, 3]
    assert bm.num_free_blocks == 0


def test_failed_allocation_with_hits_leaves_hits_untouched() -> None:
    bm = make_manager(num_blocks=4)
    prompt = make_tokens(9)
    admit(bm, "a", prompt)  # blocks 0, 1, 2 (0 and 1 cached)
    bm.free("a")  # 2 -> free list; 1, 0 -> eviction queue
    assert bm.allocate_slots("filler", 8)  # the free list holds enough: no eviction
    assert bm.block_table("filler") == [3, 2]
    hits, num_hit = bm.get_computed_blocks(prompt)
    assert (hits, num_hit) == ([0, 1], 8)
    # 2 evictable blocks, both hits: no room for the third block.
    assert not bm.allocate_slots("b", 9, hits)
    assert bm.block_table("b") == []
    assert ref_counts(bm, [0, 1]) == [0, 0]
    assert bm.get_computed_blocks(prompt) == ([0, 1], 8)
    assert bm.num_free_blocks == 2


def test_allocate_rejects_bad_arguments() -> None:
    bm = make_manager()
    prompt = make_tokens(9)
    admit(bm, "a", prompt)
    hits, _ = bm.get_computed_blocks(prompt)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate_slots("b", -1)
    with pytest.raises(ValueError, match="not empty"):
        bm.allocate_slots("a", 12, hits)
    with pytest.raises(ValueError, match="twice"):
        bm.allocate_slots("b", 12, [0, 0])
    with pytest.raises(ValueError, match="not cached"):
        bm.allocate_slots("b", 12, [2])
    with pytest.raises(ValueError, match="new_computed_blocks"):
        bm.allocate_slots("b", 12, [42])
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate_slots("b", 4, hits)
    assert bm.block_table("b") == []
    assert ref_counts(bm, [0, 1, 2]) == [1, 1, 1]


# --- free ----------------------------------------------------------------------------------------


def test_free_returns_blocks_and_unknown_is_noop() -> None:
    bm = make_manager(num_blocks=4, prefix_caching=False)
    assert bm.allocate_slots("a", 8)
    assert bm.allocate_slots("b", 8)
    assert bm.num_free_blocks == 0
    bm.free("a")
    bm.free("a")  # twice: no-op
    bm.free("never-seen")
    assert bm.block_table("a") == []
    assert (bm.num_free_blocks, bm.num_used_blocks) == (2, 2)
    assert ref_counts(bm, [0, 1, 2, 3]) == [0, 0, 1, 1]
    # Freed uncached blocks join the back of the free list, tail first.
    assert bm.allocate_slots("c", 8)
    assert bm.block_table("c") == [1, 0]


# --- prefix caching ------------------------------------------------------------------------------


def test_second_sequence_with_same_prompt_shares_blocks() -> None:
    bm = make_manager()
    prompt = make_tokens(10)  # 2 full blocks + 2 tokens
    assert admit(bm, "a", prompt) == []
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_cached_blocks == 2  # the partial block is not cached
    assert admit(bm, "b", prompt) == [0, 1]
    assert bm.block_table("b") == [0, 1, 3]
    assert ref_counts(bm, [0, 1, 2, 3]) == [2, 2, 1, 1]
    assert bm.num_used_blocks == 4


def test_partial_block_prompts_share_only_full_blocks() -> None:
    bm = make_manager()
    admit(bm, "a", make_tokens(6))  # block 0 full, block 1 holds 2 tokens
    other = make_tokens(6)[:5] + [77]
    hits, num_hit = bm.get_computed_blocks(other)
    assert (hits, num_hit) == ([0], 4)
    # Same first 4 tokens then a shorter tail: still only the full block.
    assert bm.get_computed_blocks(make_tokens(5)) == ([0], 4)


def test_at_least_one_token_is_left_to_compute() -> None:
    bm = make_manager()
    prompt = make_tokens(12)  # exactly 3 full blocks
    admit(bm, "a", prompt)
    assert bm.num_cached_blocks == 3
    assert bm.get_computed_blocks(prompt) == ([0, 1], 8)
    assert bm.get_computed_blocks(prompt + [99]) == ([0, 1, 2], 12)
    assert bm.get_computed_blocks(prompt[:4]) == ([], 0)
    assert bm.get_computed_blocks([]) == ([], 0)


def test_lookup_takes_no_references_and_counts_nothing() -> None:
    bm = make_manager()
    prompt = make_tokens(9)
    admit(bm, "a", prompt)
    before = (ref_counts(bm, list(range(10))), bm.prefix_queried_tokens, bm.prefix_hit_tokens)
    for _ in range(3):
        assert bm.get_computed_blocks(prompt) == ([0, 1], 8)
    assert (ref_counts(bm, list(range(10))), bm.prefix_queried_tokens, bm.prefix_hit_tokens) == before


def test_cached_blocks_survive_free_and_are_hit_again() -> None:
    bm = make_manager()
    prompt = make_tokens(9)
    admit(bm, "a", prompt)
    bm.free("a")
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == 10
    assert bm.get_computed_blocks(prompt) == ([0, 1], 8)
    assert admit(bm, "b", prompt) == [0, 1]
    # The uncached partial block 2 went back to the free list behind 3..9.
    assert bm.block_table("b") == [0, 1, 3]
    assert ref_counts(bm, [0, 1, 2, 3]) == [1, 1, 0, 1]


def test_decode_tokens_are_cached_as_blocks_fill() -> None:
    bm = make_manager()
    tokens = make_tokens(3)
    admit(bm, "a", tokens)
    assert bm.num_cached_blocks == 0
    for new_token in (100, 101):  # decode two tokens: block 0 fills at 4, position 4 opens block 1
        tokens.append(new_token)
        assert bm.allocate_slots("a", len(tokens))
        bm.cache_blocks("a", tokens, len(tokens))
    assert bm.block_table("a") == [0, 1]
    assert bm.num_cached_blocks == 1
    assert bm.get_computed_blocks(tokens) == ([0], 4)


def test_lru_eviction_order_and_free_list_first() -> None:
    bm = make_manager(num_blocks=6)
    admit(bm, "a", make_tokens(9, start=0))  # blocks 0, 1 cached, 2 not
    admit(bm, "b", make_tokens(9, start=100))  # blocks 3, 4 cached, 5 not
    bm.free("b")  # queue: 4, 3  free list: 5
    bm.free("a")  # queue: 4, 3, 1, 0  free list: 5, 2
    assert bm.num_cached_blocks == 4
    # Never-cached free blocks first, in free order.
    assert bm.allocate_slots("c", 8)
    assert bm.block_table("c") == [5, 2]
    assert bm.num_cached_blocks == 4
    # Then cached ones: least recently freed first, and a sequence's tail before its head.
    assert bm.allocate_slots("c", 12)
    assert bm.block_table("c") == [5, 2, 4]
    assert bm.num_cached_blocks == 3
    assert bm.allocate_slots("c", 20)
    assert bm.block_table("c") == [5, 2, 4, 3, 1]
    assert bm.num_cached_blocks == 1


def test_hit_refreshes_lru_position() -> None:
    bm = make_manager(num_blocks=5)
    first, second = make_tokens(5, start=0), make_tokens(5, start=100)
    admit(bm, "a", first)  # 0 cached, 1 not
    admit(bm, "b", second)  # 2 cached, 3 not
    bm.free("a")  # queue: 0
    bm.free("b")  # queue: 0, 2
    assert admit(bm, "c", first) == [0]  # block 0 leaves the queue...
    bm.free("c")  # ...and comes back behind 2
    assert bm.allocate_slots("d", 4 * 4)  # free list 1, 3, 4, then evict 2 (older than 0 now)
    assert bm.block_table("d") == [1, 3, 4, 2]
    assert bm.get_computed_blocks(first) == ([0], 4)
    assert bm.get_computed_blocks(second) == ([], 0)


def test_eviction_removes_the_hash() -> None:
    bm = make_manager(num_blocks=3)
    prompt = make_tokens(5)
    admit(bm, "a", prompt)  # 0 cached, 1 not
    bm.free("a")
    assert bm.get_computed_blocks(prompt) == ([0], 4)
    assert bm.allocate_slots("b", 12)  # needs all three: evicts block 0
    assert bm.block_table("b") == [2, 1, 0]
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(prompt) == ([], 0)
    # The evicted block is reused plainly: freeing it sends it to the free list, not the queue.
    bm.free("b")
    assert bm.get_computed_blocks(prompt) == ([], 0)
    assert bm.allocate_slots("c", 4)
    assert bm.block_table("c") == [0]


def test_chained_hash_same_block_after_different_prefix_does_not_hit() -> None:
    bm = make_manager()
    shared_block = [7, 7, 7, 7]
    admit(bm, "a", [1, 2, 3, 4] + shared_block + [9])
    assert bm.get_computed_blocks([5, 6, 7, 8] + shared_block + [9]) == ([], 0)
    # Same first block, then a different second one: only the first hits.
    assert bm.get_computed_blocks([1, 2, 3, 4] + [7, 7, 7, 8] + [9]) == ([0], 4)
    first_digest = hash_block_tokens(b"", [1, 2, 3, 4])
    assert hash_block_tokens(b"", shared_block) != hash_block_tokens(first_digest, shared_block)


def test_duplicate_block_keeps_the_first_mapping() -> None:
    bm = make_manager()
    prompt = make_tokens(9)
    # Both admitted before either caches, so both compute the same blocks.
    assert bm.allocate_slots("a", 9)
    assert bm.allocate_slots("b", 9)
    bm.cache_blocks("a", prompt, 9)
    bm.cache_blocks("b", prompt, 9)
    assert bm.num_cached_blocks == 2
    assert bm.get_computed_blocks(prompt) == ([0, 1], 8)
    bm.free("a")
    bm.free("b")  # b's duplicates are unregistered: they go to the free list, ahead of eviction
    assert bm.get_computed_blocks(prompt) == ([0, 1], 8)
    assert bm.allocate_slots("c", 4 * 7)
    assert bm.block_table("c") == [6, 7, 8, 9, 2, 5, 4]
    assert bm.get_computed_blocks(prompt) == ([0, 1], 8)


def test_cache_blocks_is_incremental_and_validates() -> None:
    bm = make_manager()
    tokens = make_tokens(12)
    assert bm.allocate_slots("a", 12)
    bm.cache_blocks("a", tokens, 6)  # a prefill chunk: one full block computed
    assert bm.num_cached_blocks == 1
    bm.cache_blocks("a", tokens, 6)
    assert bm.num_cached_blocks == 1
    bm.cache_blocks("a", tokens, 12)
    assert bm.num_cached_blocks == 3
    assert bm.get_computed_blocks(tokens + [0]) == ([0, 1, 2], 12)
    with pytest.raises(ValueError, match="holds no blocks"):
        bm.cache_blocks("unknown", tokens, 4)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.cache_blocks("a", tokens, 13)
    assert bm.allocate_slots("short", 4)
    with pytest.raises(ValueError, match="block table"):
        bm.cache_blocks("short", tokens, 8)


def test_sequence_admitted_with_hits_continues_the_chain() -> None:
    bm = make_manager()
    prompt = make_tokens(9)
    admit(bm, "a", prompt)
    longer = prompt + make_tokens(8, start=50)  # 17 tokens: blocks 0, 1 hit; 2, 3 new full blocks
    assert admit(bm, "b", longer) == [0, 1]
    assert bm.block_table("b") == [0, 1, 3, 4, 5]
    assert bm.get_computed_blocks(longer + [1]) == ([0, 1, 3, 4], 16)


def test_counters() -> None:
    bm = make_manager()
    prompt = make_tokens(10)
    admit(bm, "a", prompt)
    admit(bm, "b", prompt)
    assert (bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (20, 8)
    bm.record_prefix_lookup(0, 0)
    assert (bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (20, 8)
    with pytest.raises(ValueError, match="num_hit"):
        bm.record_prefix_lookup(4, 5)
    with pytest.raises(ValueError, match=">= 0"):
        bm.record_prefix_lookup(-1, 0)
    assert (bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (20, 8)


def test_prefix_caching_disabled() -> None:
    bm = make_manager(prefix_caching=False)
    prompt = make_tokens(9)
    assert admit(bm, "a", prompt) == []
    assert admit(bm, "b", prompt) == []
    assert bm.block_table("b") == [3, 4, 5]
    assert bm.num_cached_blocks == 0
    bm.free("a")
    assert bm.get_computed_blocks(prompt) == ([], 0)
    assert (bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (18, 0)
    with pytest.raises(ValueError, match="not cached"):
        bm.allocate_slots("c", 9, [0])


def test_reset_prefix_cache() -> None:
    bm = make_manager()
    first, second = make_tokens(9, start=0), make_tokens(9, start=100)
    admit(bm, "a", first)  # 0, 1 cached
    admit(bm, "b", second)  # 3, 4 cached
    bm.free("a")
    assert not bm.reset_prefix_cache()  # b's blocks still hold digests
    assert bm.get_computed_blocks(first) == ([], 0)
    assert bm.get_computed_blocks(second) == ([3, 4], 8)
    assert bm.block_table("b") == [3, 4, 5]
    assert bm.num_free_blocks == 7
    bm.free("b")
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(second) == ([], 0)
    assert bm.num_free_blocks == 10


# --- randomized invariants -----------------------------------------------------------------------


def check_invariants(bm: BlockManager, live: set[str]) -> None:
    """Ref counts match the tables; every block is used or in exactly one free structure."""
    holders = [0] * bm.num_blocks
    for seq_id in live:
        table = bm.block_table(seq_id)
        assert len(set(table)) == len(table), f"{seq_id} holds a block twice"
        for block_id in table:
            holders[block_id] += 1
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == holders
    used = {b for b in range(bm.num_blocks) if holders[b] > 0}
    # NOTE: the free structures are private; reading them is the only way to check disjointness.
    free_list, evictable = list(bm._free_blocks), list(bm._evictable)
    assert len(set(free_list)) == len(free_list)
    assert not set(free_list) & set(evictable)
    assert not used & (set(free_list) | set(evictable))
    assert used | set(free_list) | set(evictable) == set(range(bm.num_blocks))
    assert bm.num_used_blocks == len(used)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert all(bm._block_digest[b] is not None for b in evictable)
    assert all(bm._block_digest[b] is None for b in free_list)
    assert all(bm._block_digest[b] == digest for digest, b in bm._digest_to_block.items())
    assert sum(d is not None for d in bm._block_digest) == bm.num_cached_blocks


def compute_blocks(
    bm: BlockManager, seq_id: str, token_ids: list[int], num_hits: int, written: dict[int, tuple[int, ...]]
) -> None:
    """Cache ``seq_id``'s computed blocks and record, in ``written``, the prefix each block it wrote now holds."""
    bm.cache_blocks(seq_id, token_ids, len(token_ids))
    table = bm.block_table(seq_id)
    # NOTE: hit blocks were written by another sequence; only this sequence's own blocks change.
    for i in range(num_hits, len(token_ids) // bm.block_size):
        written[table[i]] = tuple(token_ids[: (i + 1) * bm.block_size])


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_keep_invariants(seed: int) -> None:
    rng = random.Random(seed)
    bm = make_manager(num_blocks=24, block_size=4)
    # Few distinct prefixes so sequences share and evict often.
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    tokens: dict[str, list[int]] = {}
    num_hits: dict[str, int] = {}
    # Shadow KV contents: block id -> the whole prefix (tokens 0 .. end of block) it holds.
    written: dict[int, tuple[int, ...]] = {}
    next_id = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.35 or not tokens:
            seq_id = f"s{next_id}"
            next_id += 1
            prompt = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
            hits, num_hit = bm.get_computed_blocks(prompt)
            assert num_hit == len(hits) * bm.block_size < len(prompt)
            for i, block_id in enumerate(hits):  # a hit serves exactly this prompt's prefix
                assert written[block_id] == tuple(prompt[: (i + 1) * bm.block_size])
            free_before = bm.num_free_blocks
            if bm.allocate_slots(seq_id, len(prompt), hits):
                bm.record_prefix_lookup(len(prompt), num_hit)
                assert bm.block_table(seq_id)[: len(hits)] == hits
                compute_blocks(bm, seq_id, prompt, len(hits), written)
                tokens[seq_id], num_hits[seq_id] = prompt, len(hits)
            else:
                assert bm.block_table(seq_id) == []
                assert bm.num_free_blocks == free_before
        elif op < 0.75:
            seq_id = rng.choice(sorted(tokens))
            grown = tokens[seq_id] + [rng.randrange(5)]
            table_before = bm.block_table(seq_id)
            if bm.allocate_slots(seq_id, len(grown)):
                assert len(bm.block_table(seq_id)) == -(-len(grown) // bm.block_size)
                compute_blocks(bm, seq_id, grown, num_hits[seq_id], written)
                tokens[seq_id] = grown
            else:
                assert bm.block_table(seq_id) == table_before
        elif op < 0.97:
            seq_id = rng.choice(sorted(tokens))
            bm.free(seq_id)
            del tokens[seq_id], num_hits[seq_id]
        else:
            bm.reset_prefix_cache()
        check_invariants(bm, set(tokens))
    assert bm.prefix_hit_tokens > 0  # the test exercised sharing
    for seq_id in list(tokens):
        bm.free(seq_id)
    check_invariants(bm, set())
    assert (bm.num_free_blocks, bm.num_used_blocks) == (bm.num_blocks, 0)
