"""Speculative decoding: the n-gram proposer, how the scheduler fits drafts in, and exact greedy outputs on the real model."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from tokenwire.engine import LLM, FinishReason, SamplingParams
from tokenwire.engine.block_manager import BlockManager
from tokenwire.engine.sampler import Sampler, SamplingState
from tokenwire.engine.scheduler import Scheduler
from tokenwire.engine.sequence import Sequence
from tokenwire.engine.speculative import propose_ngram

# ---- the proposer -----------------------------------------------------------------------------


def test_proposes_what_followed_the_latest_longest_match() -> None:
    #            0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 9, 5, 2, 3, 8, 7, 2, 3]
    # Suffix [2, 3] occurs at 1-2 (then 9) and at 6-7 (then 8, 7): the latest wins.
    assert propose_ngram(tokens, 3, max_ngram=2, min_ngram=1) == [8, 7, 2]
    # A longer match beats a later shorter one: [5, 2, 3] at 0-2 (then 4, 4) over [2, 3] at 6-7.
    tokens = [5, 2, 3, 4, 4, 1, 2, 3, 6, 6, 5, 2, 3]
    assert propose_ngram(tokens, 2, max_ngram=3, min_ngram=1) == [4, 4]


def test_draft_length_and_the_end_of_the_sequence() -> None:
    tokens = [4, 5, 6, 4, 5]
    assert propose_ngram(tokens, 10, max_ngram=2, min_ngram=2) == [6, 4, 5]  # all that follows
    assert propose_ngram(tokens, 1, max_ngram=2, min_ngram=2) == [6]
    assert propose_ngram(tokens, 0) == []


def test_no_draft_without_a_long_enough_match() -> None:
    assert propose_ngram([1, 2, 3, 4], 4) == []
    assert propose_ngram([7], 4) == []
    assert propose_ngram([], 4) == []
    # Only the last token repeats: a 1-gram match, below min_ngram=2.
    assert propose_ngram([1, 9, 2, 9], 4, max_ngram=3, min_ngram=2) == []
    assert propose_ngram([1, 9, 2, 9], 4, max_ngram=3, min_ngram=1) == [2, 9]


def test_runs_of_one_token_propose_more_of_it() -> None:
    assert propose_ngram([3, 3, 3, 3, 3], 2, max_ngram=2, min_ngram=2) == [3]


@pytest.mark.parametrize(("num", "lo", "hi"), [(-1, 1, 2), (2, 0, 2), (2, 3, 2)])
def test_bad_arguments_are_rejected(num: int, lo: int, hi: int) -> None:
    with pytest.raises(ValueError):
        propose_ngram([1, 2, 1, 2], num, max_ngram=hi, min_ngram=lo)


# ---- the scheduler ----------------------------------------------------------------------------


def make_seq(rid: str, prompt: list[int], max_tokens: int = 100) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(), max_tokens=max_tokens, eos_token_ids=frozenset())


def decoding(s: Scheduler, seq: Sequence, token: int = 7) -> None:
    """Admit seq, run its prompt and append one sampled token, so that its next step is a decode."""
    s.add(seq)
    out = s.schedule()
    s.update(out.scheduled)
    seq.append_token(token)


def test_drafts_join_a_decode_and_count_only_when_accepted() -> None:
    s = Scheduler(BlockManager(16, 4), max_num_seqs=4, max_num_batched_tokens=64, drafter=lambda seq, n: [11, 12, 13][:n])
    seq = make_seq("a", [1, 2, 3, 4, 5])
    decoding(s, seq)
    out = s.schedule()
    (item,) = out.scheduled
    assert item.draft_token_ids == (11, 12, 13)
    assert item.num_new_tokens == 4 and item.samples and item.num_sampled_rows == 4
    assert item.input_token_ids == [7, 11, 12, 13]
    assert len(item.block_table) * 4 >= 6 + 3  # room for every draft's KV
    s.update(out.scheduled)
    assert seq.num_computed_tokens == 6  # the drafts are not computed tokens yet
    seq.append_token(11)
    seq.append_token(12)
    seq.append_token(40)  # two drafts accepted, then the model's own token
    s.accept_drafts(seq, 2)
    assert seq.num_computed_tokens == 8 and seq.num_tokens == 9


def test_drafts_fit_the_token_budget_and_max_tokens() -> None:
    drafts = list(range(20, 30))
    s = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=4, drafter=lambda seq, n: drafts[:n])
    seq = make_seq("a", [1, 2, 3], max_tokens=100)
    decoding(s, seq)
    assert s.schedule().scheduled[0].draft_token_ids == (20, 21, 22)  # budget 4 = 1 + 3 drafts
    s2 = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64, drafter=lambda seq, n: drafts[:n])
    short = make_seq("b", [1, 2, 3], max_tokens=3)
    decoding(s2, short)
    # One token out of 3: the next sampled token plus at most one draft fill max_tokens.
    assert s2.schedule().scheduled[0].draft_token_ids == (20,)


def drafts_after_joint_prefill(num_blocks: int, a: Sequence, b: Sequence, drafts: list[int]) -> dict[str, tuple[int, ...]]:
    """Prefill a and b together in a pool of ``num_blocks`` blocks of 4, then schedule their decodes.

    Returns each one's drafts in that decode step, after checking that nothing was preempted.
    """
    s = Scheduler(BlockManager(num_blocks, 4), max_num_seqs=4, max_num_batched_tokens=64, drafter=lambda seq, n: drafts[:n])
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.update(out.scheduled)
    a.append_token(10)
    b.append_token(10)
    out = s.schedule()
    assert not out.preempted and s.num_preemptions == 0
    return {i.seq.request_id: i.draft_token_ids for i in out.scheduled}


def test_drafts_are_dropped_rather_than_preempting() -> None:
    # 3 blocks: "a" holds 2 (6 tokens), "b" holds 1; a's 3 drafts would need a third block.
    got = drafts_after_joint_prefill(3, make_seq("a", [1, 2, 3, 4, 5]), make_seq("b", [6, 7]), [9, 9, 9])
    assert got == {"a": (), "b": ()}


def test_drafts_leave_a_block_for_every_running_sequence() -> None:
    # 4 blocks: "a" and "b" hold one full block each and each needs a second one for its next
    # token. a's 4 drafts would take both free blocks and force b out; they must be dropped.
    got = drafts_after_joint_prefill(4, make_seq("a", [1, 2, 3, 4]), make_seq("b", [5, 6, 7, 8]), [9] * 4)
    assert got == {"a": (), "b": ()}


# ---- the sampler verifying drafts of sampled requests ---------------------------------------------

P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


def draw_many(params: SamplingParams, draft: int, n: int = 40_000) -> torch.Tensor:
    """Frequencies of n draws from P's logits, each row verifying the same draft."""
    states = [SamplingState(params, [1]) for _ in range(n)]
    logits = P.log().expand(n, -1).clone()
    out = Sampler(seed=0)(logits, states, [draft] * n)
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(P)) / n


@pytest.mark.parametrize("draft", [0, 1, 4])
def test_verifying_a_draft_keeps_the_rows_distribution(draft: int) -> None:
    freq = draw_many(SamplingParams(temperature=1.0), draft)
    # 40,000 draws: one standard deviation is at most 0.0025.
    assert (freq - P).abs().max().item() < 0.01, freq


def test_a_draft_outside_the_filtered_distribution_is_never_kept() -> None:
    freq = draw_many(SamplingParams(temperature=1.0, top_k=2), draft=4)
    assert freq[4] == 0 and freq[2:].sum() == 0
    assert (freq[:2] - P[:2] / P[:2].sum()).abs().max().item() < 0.01, freq


# ---- the engine on the real model -------------------------------------------------------------

# Prompts that quote themselves (where drafts get accepted) and ones that do not.
PROMPTS: list[object] = [
    "Repeat after me: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog. the quick",
    "The history of the city of Paris begins with a small settlement on an island in the Seine. " * 2 + "Summarize:",
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    "Once upon a time",
]


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(dtype="float32", kv_cache_memory=1 << 27)


@pytest.fixture(scope="module")
def spec() -> LLM:
    return LLM(dtype="float32", kv_cache_memory=1 << 27, speculative_tokens=5)


def test_greedy_output_is_the_same_with_speculation(plain: LLM, spec: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=True, top_logprobs=2)
    before = spec.stats()
    want = [plain.generate([p], params)[0] for p in PROMPTS]
    got = [spec.generate([p], params)[0] for p in PROMPTS]
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.text == w.text
        assert g.finish_reason is FinishReason.LENGTH
        assert [lp.token_id for lp in g.logprobs] == g.token_ids
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    after = spec.stats()
    drafted = after.draft_tokens_total - before.draft_tokens_total
    accepted = after.accepted_draft_tokens_total - before.accepted_draft_tokens_total
    # Both paths ran: drafts the model took and drafts it refused.
    assert 0 < accepted < drafted
    assert after.kv_blocks_used == 0


def test_stops_inside_accepted_drafts_end_the_text_where_they_should(plain: LLM, spec: LLM) -> None:
    prompt = PROMPTS[0]
    free = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    # A stop string taken from the middle of the greedy continuation, and max_tokens that ends
    # the request in the middle of a run of accepted drafts.
    stop = free.text[20:32]
    for params in (
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[free.token_ids[9]]),
    ):
        want = plain.generate([prompt], params)[0]
        got = spec.generate([prompt], params)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    assert spec.stats().kv_blocks_used == 0


def test_batched_speculation_with_sampled_companions(plain: LLM, spec: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=32, ignore_eos=True)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=32, ignore_eos=True)
    params = [greedy, seeded, penalised, greedy]
    want = plain.generate(PROMPTS, params)
    got = spec.generate(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert spec.stats().kv_blocks_used == 0


def test_prefix_cache_holds_only_accepted_tokens(spec: LLM) -> None:
    # A second request whose prompt is the first one's prompt plus its output must hit the blocks
    # the first one cached (through speculative steps) and continue exactly as the first did.
    prompt = PROMPTS[0]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    first = spec.generate([prompt], params)[0]
    half = first.prompt_token_ids + first.token_ids[:32]
    second = spec.generate([half], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))[0]
    assert second.usage.cached_prompt_tokens >= 32
    assert second.token_ids == first.token_ids[32:]


def test_preemption_and_aborts_with_speculation(plain: LLM) -> None:
    """A pool too small for its sequences, drafts on every step, random aborts: the survivors'
    outputs are the plain ones, every request ends exactly once, and every block comes back."""
    from tokenwire.engine.core import EngineCore
    from tokenwire.engine.request import GenerationRequest

    bytes_per_block = 16 * plain.core.runner.model.kv_cache_spec.bytes_per_token(plain.loaded.dtype)  # type: ignore[attr-defined]
    args = replace(plain.args, kv_cache_memory=8 * bytes_per_block, speculative_tokens=5, speculative_max_batch=8)
    core = EngineCore(plain.loaded, args)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [plain.tokenizer.encode(p if isinstance(p, str) else "Hello there, hello there, hello") for p in PROMPTS]
    prompts += [prompts[0][5:], prompts[1][3:]]
    want = {f"r{i}": c.token_ids for i, c in enumerate(plain.generate([list(p) for p in prompts], params))}
    for i, p in enumerate(prompts):
        core.add_request(GenerationRequest(f"r{i}", prompt_token_ids=list(p), params=params))
    rng = random.Random(5)
    tokens: dict[str, list[int]] = {rid: [] for rid in want}
    finals: dict[str, FinishReason] = {}
    while core.has_unfinished():
        outs = core.step()
        if rng.random() < 0.04 and core.requests:
            aborted = core.abort(rng.choice(sorted(core.requests)))
            assert aborted is not None
            outs.append(aborted)
        for out in outs:
            tokens[out.request_id].extend(out.token_ids)
            if out.finished:
                assert out.request_id not in finals, "exactly one final output per request"
                assert out.finish_reason is not None
                finals[out.request_id] = out.finish_reason
    assert sorted(finals) == sorted(want)
    assert core.scheduler.num_preemptions > 0 and core.accepted_draft_tokens_total > 0
    assert FinishReason.CANCELLED in finals.values() and FinishReason.LENGTH in finals.values()
    for rid, reason in finals.items():
        if reason is FinishReason.CANCELLED:
            assert tokens[rid] == want[rid][: len(tokens[rid])]
        else:
            assert tokens[rid] == want[rid]
    assert core.block_manager.num_used_blocks == 0


def test_unseeded_sampled_requests_speculate_and_seeded_ones_do_not(spec: LLM) -> None:
    prompt = PROMPTS[0]
    before = spec.stats()
    seeded = spec.generate([prompt] * 2, SamplingParams(temperature=0.5, seed=3, max_tokens=24, ignore_eos=True))
    mid = spec.stats()
    assert mid.draft_tokens_total == before.draft_tokens_total  # a seed's tokens depend on the seed alone
    assert seeded[0].token_ids == seeded[1].token_ids
    free = spec.generate([prompt], SamplingParams(temperature=0.3, max_tokens=48, ignore_eos=True))[0]
    after = spec.stats()
    assert len(free.token_ids) == 48 and free.finish_reason is FinishReason.LENGTH
    assert after.accepted_draft_tokens_total > mid.accepted_draft_tokens_total
    assert after.kv_blocks_used == 0
