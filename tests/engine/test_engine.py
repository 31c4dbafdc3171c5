"""The engine end to end on the real default model: batching invariance, preemption, prefix cache, stops, errors."""

from __future__ import annotations

import pytest
import torch

from tokenwire.engine import LLM, FinishReason, InvalidRequestError, PromptTooLongError, SamplingParams
from tokenwire.engine.outputs import Completion

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)

PROMPTS: list[object] = [
    "The capital of France is",
    [{"role": "user", "content": "Name three colours."}],
    "def add(a, b):\n    return",
    "Écrivez une phrase sur la mer:",
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # float32 so that batched and single runs are bit-for-bit comparable.
    return LLM(dtype="float32", max_num_seqs=16, max_num_batched_tokens=64)


def run_alone(llm: LLM, prompts: list[object], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
    per = params if isinstance(params, list) else [params] * len(prompts)
    return [llm.generate([p], sp)[0] for p, sp in zip(prompts, per)]


def test_batched_greedy_equals_alone(llm: LLM) -> None:
    # Different lengths so that sequences join and leave the batch at different steps; the budget
    # of 64 tokens forces the longer prompts to be chunked while others decode.
    params = [SamplingParams(temperature=0.0, max_tokens=8 + 4 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    alone = run_alone(llm, PROMPTS, params)
    together = llm.generate(PROMPTS, params)
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        assert b.finish_reason is FinishReason.LENGTH
        assert b.usage.completion_tokens == len(b.token_ids)
    assert llm.stats().kv_blocks_used == 0


def test_forced_preemption_gives_identical_outputs(llm: LLM) -> None:
    prompts = PROMPTS[:4]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = llm.generate(prompts, params)
    # A pool of 12 blocks of 16 tokens cannot hold four growing sequences at once.
    small = LLM(dtype="float32", kv_cache_memory=12 * 16 * llm.core.runner.model.kv_cache_spec.bytes_per_token(llm.loaded.dtype))
    got = small.generate(prompts, params)
    assert small.stats().num_preemptions > 0
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.text for c in got] == [c.text for c in expected]
    assert small.stats().kv_blocks_used == 0


def test_a_float16_kv_cache_holds_twice_the_tokens_and_keeps_the_answers(llm: LLM) -> None:
    """A float16 cache for the float32 model: twice the blocks in the same memory, a batch gives
    what each request gives alone, and the answers are the float32 cache's (keys and values
    rounded to 11 significant bits moved these logprobs by at most 0.003)."""
    per_token = llm.core.runner.model.kv_cache_spec.bytes_per_token(torch.float32)
    narrow = LLM(dtype="float32", kv_cache_dtype="float16", kv_cache_memory=64 * 16 * per_token, max_num_seqs=16,
                 max_num_batched_tokens=64)
    info = narrow.model_info()
    assert (info.dtype, info.kv_cache_dtype, info.kv_blocks_total) == ("float32", "float16", 128)
    assert all(k.dtype == v.dtype == torch.float16 for k, v in narrow.core.runner.kv_caches)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
    together = narrow.generate(PROMPTS, params)
    assert [c.token_ids for c in run_alone(narrow, PROMPTS, params)] == [c.token_ids for c in together]
    for wide, got in zip(llm.generate(PROMPTS, params), together):
        assert got.token_ids == wide.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(wide.logprobs, got.logprobs)) < 0.01
    assert narrow.stats().kv_blocks_used == 0


def test_prefix_cache_hit_gives_same_output(llm: LLM) -> None:
    system = "You are a careful assistant. Answer from the passages only. " * 6
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}]
    first = llm.generate([chat], GREEDY)[0]
    before = llm.stats()
    second = llm.generate([chat], GREEDY)[0]
    after = llm.stats()
    assert second.token_ids == first.token_ids
    assert second.usage.cached_prompt_tokens >= 64
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == second.usage.cached_prompt_tokens


def test_seeded_sampling_is_reproducible_whatever_the_companions(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["Tell me a story about a cat"], seeded)[0]
    companions = [SamplingParams(temperature=0.8, seed=7, max_tokens=12), SamplingParams(temperature=1.0, max_tokens=20)]
    mixed = llm.generate(
        ["Write a poem", "Tell me a story about a cat", "List fruits"], [companions[0], seeded, companions[1]]
    )
    assert mixed[1].token_ids == alone.token_ids
    other_seed = llm.generate(["Tell me a story about a cat"], SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_across_token_boundary(llm: LLM) -> None:
    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    tok = llm.tokenizer
    # Find a stop string that starts inside one token and ends inside the next one.
    pieces = [tok.decode([t]) for t in full.token_ids]
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 2)
    offset = sum(len(p) for p in pieces[:k])
    stop = full.text[offset + 1 : offset + len(pieces[k]) + 1]
    assert full.text.find(stop) == offset + 1
    got = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert got.finish_reason is FinishReason.STOP
    assert got.text == full.text[: offset + 1]
    assert stop not in got.text


def test_finish_reasons_and_token_stops(llm: LLM) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    done = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=64))[0]
    assert done.finish_reason is FinishReason.STOP
    assert "Paris" in done.text
    assert done.token_ids[-1] in llm.loaded.eos_token_ids
    stop_tok = done.token_ids[2]
    cut = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=[stop_tok]))[0]
    assert cut.token_ids == done.token_ids[:3]
    assert cut.finish_reason is FinishReason.STOP
    longer = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=len(done.token_ids) + 5, min_tokens=len(done.token_ids) + 5))[0]
    assert len(longer.token_ids) == len(done.token_ids) + 5
    assert longer.token_ids[: len(done.token_ids) - 1] == done.token_ids[:-1]


def test_logprobs_and_usage(llm: LLM) -> None:
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5, logprobs=True, top_logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy: the sampled token is the most likely one
        assert lp.logprob <= 0.0
    assert out.usage.prompt_tokens == len(out.prompt_token_ids)


def test_bad_requests_raise_clear_errors(llm: LLM) -> None:
    with pytest.raises(PromptTooLongError, match="context length"):
        llm.generate([[1] * (llm.core.max_model_len + 1)], GREEDY)
    with pytest.raises(InvalidRequestError, match="unknown token id 999999"):
        llm.generate([[1, 999999]], GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        llm.generate([""], GREEDY)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=1.5)
    assert llm.stats().kv_blocks_used == 0
