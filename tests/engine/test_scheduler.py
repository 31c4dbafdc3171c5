"""Scheduler: token budgets, chunked prefill, admission limits, preemption by recompute, prefix hits."""

from __future__ import annotations

from tokenwire.engine.block_manager import BlockManager
from tokenwire.engine.sampling_params import SamplingParams
from tokenwire.engine.scheduler import Scheduler, SchedulerOutput
from tokenwire.engine.sequence import Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, first_token: int = 100) -> Sequence:
    return Sequence(
        request_id=rid,
        prompt_token_ids=list(range(first_token, first_token + prompt_len)),
        params=SamplingParams(),
        max_tokens=1000,
        eos_token_ids=frozenset(),
    )


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 32) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget)


def run_step(s: Scheduler, out: SchedulerOutput, next_token: int = 7) -> None:
    """Pretend the model ran: advance progress and append a token to every sequence that sampled."""
    s.update(out.scheduled)
    for item in out.scheduled:
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.append_token(next_token)


def shares(out: SchedulerOutput) -> dict[str, int]:
    return {i.seq.request_id: i.num_new_tokens for i in out.scheduled}


def test_long_prompt_is_chunked_and_decodes_keep_running() -> None:
    s = make_scheduler(budget=16)
    short = make_seq("short", 5)
    s.add(short)
    out = s.schedule()
    assert shares(out) == {"short": 5}
    run_step(s, out)
    long = make_seq("long", 40, first_token=500)
    s.add(long)
    out = s.schedule()
    # The running sequence's decode goes first; the long prompt gets the rest of the budget.
    assert [i.seq.request_id for i in out.decodes] == ["short"]
    assert shares(out) == {"short": 1, "long": 15}
    assert not out.prefills[0].samples
    run_step(s, out)
    out = s.schedule()
    assert shares(out) == {"short": 1, "long": 15}
    run_step(s, out)
    out = s.schedule()
    assert shares(out) == {"short": 1, "long": 10}
    assert out.prefills[0].samples  # the last chunk reaches the prompt's end and samples
    run_step(s, out)
    assert long.num_output_tokens == 1


def test_max_num_seqs_limits_admission_fcfs() -> None:
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add(make_seq(f"r{i}", 3, first_token=10 * i))
    out = s.schedule()
    assert list(shares(out)) == ["r0", "r1"]
    assert [q.request_id for q in s.waiting] == ["r2"]


def test_preemption_takes_the_most_recent_and_recomputes_it() -> None:
    # 4 blocks of 4 tokens: two sequences of 6 tokens take 2 blocks each; growth forces preemption.
    s = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq("a", 6, first_token=0), make_seq("b", 6, first_token=50)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert shares(out) == {"a": 6, "b": 6}
    run_step(s, out)  # both now have 7 tokens, 6 computed
    run_step(s, s.schedule())  # both compute position 6; 8 tokens now, 7 computed
    run_step(s, s.schedule())  # both compute position 7, filling block 2; 9 tokens, 8 computed
    out = s.schedule()  # position 8 of each needs a third block: only one can grow
    assert out.preempted == [b]
    assert shares(out) == {"a": 1}
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert list(s.waiting) == [b]
    assert s.num_preemptions == 1
    s.finish(a)
    out = s.schedule()
    # b comes back and recomputes its context (prompt + generated), then samples. Its tail block
    # was evicted to let a grow; its first block was still cached, so 9 - 4 tokens are recomputed.
    assert shares(out) == {"b": 5}
    assert b.num_computed_tokens == 4
    assert out.prefills[0].samples


def test_prefix_hit_skips_cached_blocks_and_is_counted_once() -> None:
    s = make_scheduler(num_blocks=16, block_size=4)
    first = make_seq("first", 10)
    s.add(first)
    run_step(s, s.schedule())
    s.finish(first)
    again = make_seq("again", 10)
    s.add(again)
    out = s.schedule()
    assert shares(out) == {"again": 2}  # 8 of 10 prompt tokens (two full blocks) were cached
    assert again.num_cached_prompt_tokens == 8
    bm = s.block_manager
    assert (bm.prefix_queried_tokens, bm.prefix_hit_tokens) == (20, 8)


def test_finish_frees_blocks_of_waiting_and_running() -> None:
    s = make_scheduler(max_num_seqs=1)
    a, b = make_seq("a", 9), make_seq("b", 9, first_token=300)
    s.add(a)
    s.add(b)
    s.schedule()
    assert s.block_manager.num_used_blocks == 3
    s.finish(b)  # still waiting
    s.finish(a)  # running
    assert s.block_manager.num_used_blocks == 0
    assert s.num_unfinished == 0
