"""Tests for the batched sampler: greedy, seeded draws, filters, temperature, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from tokenwire.engine.sampler import (
    TOP_P_CANDIDATES,
    Sampler,
    SamplingState,
    apply_penalties,
    inverse_cdf_draw,
    process_logits,
)
from tokenwire.engine.sampling_params import SamplingParams

VOCAB = 64
# A small vocabulary with distinct, well-spread logits for the filter and distribution checks.
SMALL_LOGITS = [3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5]


def make_state(
    prompt: Sequence[int] = (1, 2, 3),
    eos: Sequence[int] = (),
    generated: Sequence[int] = (),
    **params: Any,
) -> SamplingState:
    """A sampling state with the given parameters, prompt, EOS ids and already generated tokens."""
    state = SamplingState(SamplingParams(**params), list(prompt), eos)
    for t in generated:
        state.append(t)
    return state


def make_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Random float32 logits [rows, vocab] from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def repeat_rows(values: Sequence[float], rows: int) -> torch.Tensor:
    """The same logits row repeated: [rows, len(values)]."""
    return torch.tensor([list(values)] * rows, dtype=torch.float32)


def draw_many(params: dict[str, Any], logits_row: Sequence[float], n: int = 4000, seed: int = 0) -> Counter[int]:
    """Sample n tokens from one logits row (as n unseeded rows of one batch) and count them."""
    sampler = Sampler(seed=seed)
    states = [make_state(**params) for _ in range(n)]
    return Counter(sampler(repeat_rows(logits_row, n), states).token_ids)


def run_steps(sampler: Sampler, states: list[SamplingState], steps: int, order: list[int]) -> None:
    """Sample `steps` tokens for each state, rows laid out in `order`; step t's logits depend on t only."""
    for t in range(steps):
        row = make_logits(1, seed=100 + t)  # every request sees the same logits at step t
        batch = [states[i] for i in order]
        out = sampler(row.expand(len(batch), -1).contiguous(), batch)
        for state, tok in zip(batch, out.token_ids):
            state.append(tok)


# --- greedy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("native_kernels", [False, True], ids=["torch", "native"])
def test_greedy_equals_argmax(native_kernels: bool) -> None:
    logits = make_logits(6)
    logits[1, :4] = logits[1].max() + 1.0  # a tie: the first of the maxima wins
    sampler = Sampler(seed=0, native_kernels=native_kernels)
    out = sampler(logits, [make_state(temperature=0.0) for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist() and out.token_ids[1] == 0
    assert out.logprobs == [None] * 6
    # Greedy rows beside sampled ones take the same path.
    mixed = sampler(logits, [make_state(temperature=0.0 if i % 2 else 1.0, seed=i) for i in range(6)])
    assert mixed.token_ids[1::2] == logits.argmax(dim=-1).tolist()[1::2]


def test_top_k_one_equals_greedy() -> None:
    logits = make_logits(6, scale=0.1)  # flat: a real draw would rarely hit the argmax
    out = Sampler(seed=0)(logits, [make_state(temperature=1.5, top_k=1, seed=i) for i in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_temperature_is_greedy_and_finite() -> None:
    logits = make_logits(4, scale=30.0)
    out = Sampler(seed=0)(logits, [make_state(temperature=1e-9) for _ in range(4)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_with_penalty_takes_argmax_of_penalised_logits() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 2.0  # best raw token, but generated twice already
    logits[0, 9] = 1.5
    state = make_state(temperature=0.0, frequency_penalty=1.0, generated=[5, 5])
    assert Sampler(seed=0)(logits, [state]).token_ids == [9]


# --- seeded sampling ---------------------------------------------------------------------------


def test_seeded_sampling_reproducible_and_independent_of_batch_and_row() -> None:
    steps = 12
    alone = make_state(seed=1234)
    run_steps(Sampler(seed=0), [alone], steps, order=[0])

    # The same request again, now sharing the batch with an unseeded and another seeded request,
    # in a different row order and with a differently seeded shared generator.
    again = make_state(seed=1234)
    companions = [make_state(), make_state(seed=99, top_p=0.9)]
    run_steps(Sampler(seed=7), [companions[0], again, companions[1]], steps, order=[2, 1, 0])

    assert again.output_token_ids == alone.output_token_ids
    assert len(set(alone.output_token_ids)) > 1  # the draws were real, not a constant


def test_different_seeds_differ() -> None:
    a, b = make_state(seed=1), make_state(seed=2)
    run_steps(Sampler(seed=0), [a, b], steps=16, order=[0, 1])
    assert a.output_token_ids != b.output_token_ids


def test_unseeded_sampler_seed_makes_batch_reproducible() -> None:
    logits = make_logits(8, scale=0.3)
    first = Sampler(seed=5)(logits, [make_state() for _ in range(8)]).token_ids
    second = Sampler(seed=5)(logits, [make_state() for _ in range(8)]).token_ids
    assert first == second


# --- filters -----------------------------------------------------------------------------------


def _softmax(values: Sequence[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 3}, {0, 1, 2}),
        # Mass of the two best tokens exceeds this top_p, the best alone does not: two stay.
        ({"top_p": _softmax(SMALL_LOGITS)[0] + 0.5 * _softmax(SMALL_LOGITS)[1]}, {0, 1}),
        # p_i / p_max = exp(l_i - 3) >= 0.3 holds for l_i >= 1.796: tokens 0, 1, 2.
        ({"min_p": 0.3}, {0, 1, 2}),
        ({"top_k": 5, "top_p": 0.99, "min_p": 0.3}, {0, 1, 2}),  # min_p is the tightest here
        ({"top_k": 2, "min_p": 0.15}, {0, 1}),  # top_k is the tightest here
    ],
)
def test_filters_never_sample_a_filtered_token(params: dict[str, Any], allowed: set[int]) -> None:
    counts = draw_many({"temperature": 1.0, **params}, SMALL_LOGITS, n=3000)
    assert set(counts) == allowed  # nothing outside, and every kept token does get drawn


def test_top_p_one_and_top_k_zero_keep_everything() -> None:
    logits = repeat_rows(SMALL_LOGITS, 2)
    out = process_logits(logits, [make_state(top_p=1.0, top_k=0), make_state(top_k=len(SMALL_LOGITS))])
    assert torch.equal(out, logits)


def _reference_top_p_keep(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p by sorting the whole row: keep tokens with less than p mass before them. [R, V] bool."""
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    keep_sorted = (probs.cumsum(dim=-1) - probs) < p
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


def test_top_p_matches_a_full_sort_for_peaked_and_flat_rows() -> None:
    vocab = 4 * TOP_P_CANDIDATES
    peaked = make_logits(1, vocab, seed=1)
    peaked[0, :5] += 12.0  # the nucleus lies within the first-ranked candidates
    flat = make_logits(1, vocab, seed=2, scale=0.1)  # its nucleus is wider than the candidates
    logits = torch.cat([peaked, flat])
    out = process_logits(logits, [make_state(top_p=0.9), make_state(top_p=0.9)])
    keep = out > float("-inf")
    assert torch.equal(keep, _reference_top_p_keep(logits, 0.9))
    assert keep[0].sum() <= 5 < TOP_P_CANDIDATES < keep[1].sum()


# --- the draw ----------------------------------------------------------------------------------


def test_inverse_cdf_draw_picks_the_interval_holding_the_uniform() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    uniforms = torch.tensor([0.0, 0.05, 0.15, 0.35, 0.65, 1 - 1e-12], dtype=torch.float64)
    logits = probs.log().expand(len(uniforms), -1)
    assert inverse_cdf_draw(logits, uniforms).tolist() == [0, 0, 1, 2, 3, 3]


def test_inverse_cdf_draw_never_picks_a_zero_probability_token() -> None:
    vocab = 1000  # not a multiple of the block size: the last block is padded
    logits = torch.full((4, vocab), float("-inf"))
    logits[:, [10, 300, 999]] = 0.0
    uniforms = torch.tensor([0.0, 0.34, 0.5, 1 - 1e-16], dtype=torch.float64)
    assert inverse_cdf_draw(logits, uniforms).tolist() == [10, 300, 300, 999]


def test_inverse_cdf_draw_keeps_the_tail_of_a_peaked_distribution() -> None:
    # One token holds all but ~1e-8 of the mass, spread over 1023 tokens of probability ~1.4e-11.
    # A single float32 CDF would round that tail away; the draw must still reach it.
    logits = torch.full((2, 1024), -25.0)
    logits[:, 0] = 0.0
    uniforms = torch.tensor([0.5, 1 - 1e-9], dtype=torch.float64)
    head, tail = inverse_cdf_draw(logits, uniforms).tolist()
    assert head == 0
    assert tail > 0


def test_a_row_without_a_finite_maximum_takes_its_argmax_and_the_others_draw_as_alone() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    normal = probs.log()
    masked = torch.full((4,), float("-inf"))  # every token masked
    overflowed = torch.tensor([1.0, float("inf"), 2.0, float("nan")])  # a penalty went to inf
    logits = torch.stack([normal, masked, overflowed, normal])
    uniforms = torch.tensor([0.15, 0.5, 0.5, 0.65], dtype=torch.float64)
    assert inverse_cdf_draw(logits, uniforms).tolist() == [1, 0, 1, 3]


# --- temperature -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_shapes_the_empirical_distribution(temperature: float) -> None:
    row = [1.0, 0.0, 0.0, 0.0]
    n = 4000
    counts = draw_many({"temperature": temperature}, row, n=n, seed=3)
    expected = _softmax([v / temperature for v in row])[0]  # 0.71 at T=0.5, 0.47 at T=1, 0.35 at T=2
    # Binomial standard deviation is under 0.008 here; 0.03 is a generous bound.
    assert abs(counts[0] / n - expected) < 0.03


def test_temperature_divides_logits() -> None:
    logits = make_logits(2)
    out = process_logits(logits, [make_state(temperature=2.0), make_state(temperature=0.5)])
    torch.testing.assert_close(out, logits * torch.tensor([[0.5], [2.0]]))


# --- penalties ---------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 1], logits[0, 2], logits[0, 3], logits[0, 4] = 2.0, -1.0, 3.0, 5.0
    # Token 1 and 2 are in the prompt, 3 was generated, 4 was never seen.
    state = make_state(prompt=[1, 2], generated=[3], repetition_penalty=2.0)
    out = logits.clone()
    apply_penalties(out, [state])
    expected = logits.clone()
    expected[0, 1], expected[0, 2], expected[0, 3] = 1.0, -2.0, 1.5
    assert torch.equal(out, expected)


def test_presence_and_frequency_penalties_apply_to_generated_tokens_only() -> None:
    logits = make_logits(1)
    state = make_state(prompt=[7], generated=[5, 5, 5, 6], presence_penalty=0.5, frequency_penalty=0.25)
    out = logits.clone()
    apply_penalties(out, [state])
    expected = logits.clone()
    expected[0, 5] -= 0.25 * 3 + 0.5
    expected[0, 6] -= 0.25 * 1 + 0.5
    assert torch.equal(out, expected)  # the prompt token 7 is untouched


def test_penalty_counts_follow_appended_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    state = make_state(frequency_penalty=1.0, generated=[4])
    first = logits.clone()
    apply_penalties(first, [state])  # builds the count tensors
    state.append(4)
    state.append(8)
    second = logits.clone()
    apply_penalties(second, [state])
    assert first[0, 4].item() == -1.0
    assert second[0, 4].item() == -2.0
    assert second[0, 8].item() == -1.0


def test_penalties_leave_other_rows_untouched() -> None:
    logits = make_logits(3)
    out = logits.clone()
    apply_penalties(out, [make_state(generated=[1]), make_state(presence_penalty=1.0, generated=[1]), make_state()])
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    assert out[1, 1].item() == pytest.approx(logits[1, 1].item() - 1.0)


def test_prompt_token_outside_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        apply_penalties(torch.zeros(1, 8), [make_state(prompt=[3, 8], repetition_penalty=1.2)])


# --- min_tokens --------------------------------------------------------------------------------


def _favouring(*token_ids: int) -> torch.Tensor:
    """Logits [1, VOCAB] where the given tokens are by far the best, in that order."""
    logits = torch.zeros(1, VOCAB)
    for rank, t in enumerate(token_ids):
        logits[0, t] = 10.0 - rank
    return logits


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    logits = _favouring(3, 4, 9)  # 3 is EOS, 4 a stop token
    state = make_state(eos=[3], temperature=0.0, min_tokens=2, stop_token_ids=[4, VOCAB + 10])
    sampler = Sampler(seed=0)
    for _ in range(2):
        tok = sampler(logits, [state]).token_ids[0]
        assert tok == 9
        state.append(tok)
    assert sampler(logits, [state]).token_ids == [3]  # min_tokens reached: EOS is allowed again


def test_min_tokens_masks_sampled_rows_too() -> None:
    state = make_state(eos=[3], min_tokens=1, stop_token_ids=[4])
    out = process_logits(_favouring(3, 4, 9), [state])
    assert out[0, 3].item() == out[0, 4].item() == float("-inf")
    assert set(Sampler(seed=0)(_favouring(3, 4).expand(200, -1), [state] * 200).token_ids).isdisjoint({3, 4})


def test_ignore_eos_leaves_eos_unmasked_under_min_tokens() -> None:
    state = make_state(eos=[3], temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    out = process_logits(_favouring(3, 4), [state])
    assert out[0, 3].item() == 10.0
    assert out[0, 4].item() == float("-inf")


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = make_logits(3)
    states = [
        make_state(logprobs=True, top_logprobs=4, temperature=0.7, repetition_penalty=1.5, seed=3),
        make_state(temperature=0.0),
        make_state(logprobs=True, temperature=0.0),
    ]
    out = Sampler(seed=0)(logits, states)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        lp = out.logprobs[row]
        assert lp is not None
        assert lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(expected[row, lp.token_id].item(), abs=1e-6)
    first = out.logprobs[0]
    assert first is not None
    top = expected[0].topk(4)
    assert [t for t, _ in first.top] == top.indices.tolist()
    assert [v for _, v in first.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.logprobs[2] is not None and out.logprobs[2].top == ()


# --- mixed batches and validation --------------------------------------------------------------


def test_mixed_batch_of_greedy_and_sampled_rows() -> None:
    logits = make_logits(4, scale=0.2)
    seeded = make_state(seed=42, top_k=10)
    states = [make_state(temperature=0.0), seeded, make_state(temperature=0.0, presence_penalty=0.5), make_state()]
    out = Sampler(seed=0)(logits, states)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()  # nothing generated yet: no penalty applies
    assert out.token_ids[1] in logits[1].topk(10).indices.tolist()
    assert 0 <= out.token_ids[3] < VOCAB
    solo = Sampler(seed=9)(logits[1:2], [make_state(seed=42, top_k=10)])
    assert solo.token_ids == [out.token_ids[1]]


def test_process_logits_does_not_modify_its_input() -> None:
    logits = make_logits(2)
    before = logits.clone()
    process_logits(logits, [make_state(repetition_penalty=2.0, top_k=3), make_state(temperature=0.5, min_p=0.2)])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("shape", [(3, VOCAB), (VOCAB,)])
def test_logits_not_matching_states_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler(seed=0)(torch.zeros(shape), [make_state(), make_state()])
