"""Batched token sampling: penalties, temperature, top-k/top-p/min-p filters, seeded draws and logprobs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenwire.engine import native
from tokenwire.engine.outputs import TokenLogprob
from tokenwire.engine.sampling_params import SamplingParams

# A filter maps its rows' logits [R, V] and their parameter values to a keep mask [R, V] bool.
_KeepFn = Callable[[torch.Tensor, list[Any]], torch.Tensor]

# Tokens per block of the two-level inverse-CDF draw (see `inverse_cdf_draw`).
CDF_BLOCK = 256
# top_p ranks only this many most likely tokens first; rows whose nucleus is wider rank them all.
TOP_P_CANDIDATES = 256

# NOTE: temperatures this small overflow float32 logits once divided (and are greedy in effect), so
# such rows take the argmax like temperature 0.
GREEDY_TEMPERATURE_EPS = 1e-5


class SamplingState:
    """One request's sampling state: parameters, token history, seeded generator, penalty counts.

    The engine creates one at admission and calls :meth:`append` with every token the request
    generates. Penalty bookkeeping is incremental: a request that uses penalties keeps a prompt
    mask and a per-token count tensor over the vocabulary, built once on first use and updated in
    O(1) per appended token, so a sampling step costs O(batch) Python work, not O(tokens so far).

    Attributes:
        params: the request's validated sampling parameters.
        prompt_token_ids: the prompt's token ids.
        output_token_ids: the tokens generated so far, in order.
        eos_token_ids: the model's end-of-sequence tokens (masked while below ``min_tokens``).
        generator: the request's own generator, seeded from ``params.seed``; None when unseeded
            (the sampler's shared generator is used then).
        greedy: the request takes the argmax (temperature 0 or below ``GREEDY_TEMPERATURE_EPS``,
            or top_k 1).
        uses_penalties: any of the repetition, presence or frequency penalties is on.
        wants_logprobs: the request asked for logprobs (``logprobs`` or ``top_logprobs > 0``).
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        eos_token_ids: Iterable[int] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        """Create the state of a newly admitted request.

        Args:
            params: validated sampling parameters.
            prompt_token_ids: the prompt's token ids (used by the repetition penalty).
            eos_token_ids: the model's end-of-sequence token ids.
            device: where the seeded generator lives; the sampler's logits device is best.
        """
        self.params = params
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        # NOTE: min_tokens masks the tokens that would end the request: stop_token_ids always, EOS
        # only when it ends the request (not with ignore_eos, where EOS is an ordinary token).
        ending = set(params.stop_token_ids)
        if not params.ignore_eos:
            ending |= self.eos_token_ids
        self._min_tokens_ids: tuple[int, ...] = tuple(sorted(ending))
        self.greedy: bool = params.greedy or params.temperature < GREEDY_TEMPERATURE_EPS
        self.uses_penalties: bool = (
            params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        )
        self.wants_logprobs: bool = params.logprobs or params.top_logprobs > 0
        # Built lazily (the vocabulary size comes with the first logits): [V] uint8 and [V] float32.
        # NOTE: not bool/int32: torch.stack of those dtypes runs a slow path on CPU (10-100x).
        self._prompt_mask: torch.Tensor | None = None
        self._output_counts: torch.Tensor | None = None

    @property
    def num_output_tokens(self) -> int:
        """How many tokens the request has generated."""
        return len(self.output_token_ids)

    def append(self, token_id: int) -> None:
        """Record one generated token (O(1))."""
        self.output_token_ids.append(token_id)
        if self._output_counts is not None:
            self._output_counts[token_id] += 1

    def masked_token_ids(self) -> tuple[int, ...]:
        """Token ids that must not be sampled now: the request's ending tokens while below ``min_tokens``."""
        if len(self.output_token_ids) < self.params.min_tokens:
            return self._min_tokens_ids
        return ()

    def penalty_tensors(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt mask and generated-token counts over the vocabulary, built on first use.

        Args:
            vocab_size: number of logits per row.
            device: the logits' device.

        Returns:
            ``(prompt_mask, output_counts)``: ``[V]`` uint8 (1 where the token occurs in the
            prompt) and ``[V]`` float32 (times the token was generated; exact below 2^24).

        Raises:
            ValueError: a prompt or output token id is outside the vocabulary.
        """
        mask, counts = self._prompt_mask, self._output_counts
        if mask is None or counts is None or counts.shape[0] != vocab_size or counts.device != device:
            mask = (_occurrences(self.prompt_token_ids, vocab_size, device, "prompt_token_ids") > 0).to(torch.uint8)
            counts = _occurrences(self.output_token_ids, vocab_size, device, "output_token_ids")
            self._prompt_mask, self._output_counts = mask, counts
        return mask, counts


def _occurrences(ids: list[int], vocab_size: int, device: torch.device, name: str) -> torch.Tensor:
    # counts: [V] float32
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got ids from {min(ids)} to {max(ids)}")
    t = torch.tensor(ids, dtype=torch.int64, device=device)
    return torch.bincount(t, minlength=vocab_size).to(torch.float32)


@dataclass(frozen=True)
class SamplerOutput:
    """One sampling step's result, one entry per row of the logits.

    Attributes:
        token_ids: the sampled token of each row.
        logprobs: per row, the sampled token's logprob and top alternatives, or None when the
            row's request did not ask for logprobs.
    """

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Samples one token per row of a logits batch, each row with its own request's parameters.

    Order of processing, per row (all of it batched as tensors over the rows):

    1. repetition_penalty over prompt and generated tokens (Hugging Face style: a positive logit
       is divided by the penalty, a negative one multiplied);
    2. presence and frequency penalties over generated tokens only (OpenAI style:
       ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``);
    3. temperature (sampled rows only);
    4. while fewer than ``min_tokens`` tokens were generated, ``stop_token_ids`` and (unless
       ``ignore_eos``) the EOS tokens are masked out; ids outside the vocabulary are ignored;
    5. top_k (ties with the k-th logit are kept), top_p (the smallest set of most likely tokens
       whose mass reaches top_p) and min_p (tokens below ``min_p`` times the top probability are
       dropped);
    6. greedy rows (temperature 0 or below ``GREEDY_TEMPERATURE_EPS``, or top_k 1) take the
       argmax of the penalised logits; the others draw from the softmax by inverting its CDF at
       one uniform number per row (see :func:`inverse_cdf_draw`). A seeded row takes its number
       from its own generator, so its tokens depend only on its seed and its logits, not on the
       batch it shares or its row.

    Logprobs are ``log_softmax`` of the model's raw logits, before penalties, temperature and
    filters; they are computed only for rows whose request asked for them.
    """

    def __init__(
        self, seed: int | None = None, device: torch.device | str = "cpu", native_kernels: bool = False
    ) -> None:
        """Create a sampler.

        Args:
            seed: seed of the generator shared by unseeded requests; None seeds it from the OS.
            device: where that generator lives; the logits' device is best.
            native_kernels: take greedy rows' argmax from the native kernel where it reads the
                logits (CPU float32; the same indices as torch's); the engine turns it on with
                its other native kernels.
        """
        self._native_argmax = native_kernels and native.available(torch.device(device), torch.float32)
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, states: Sequence[SamplingState], drafts: Sequence[int | None] | None = None
    ) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: ``[S, V]`` float logits, one row per sequence that samples this step.
            states: the S sequences' sampling states, in row order.
            drafts: per row, a draft token that the row verifies (speculative decoding), or None.
                A sampled row keeps its draft with the draft's probability and otherwise draws
                from its distribution without the draft, so its token has exactly the row's
                distribution; a greedy row takes its argmax either way.

        Returns:
            The sampled tokens and, for rows that asked, their logprobs.

        Raises:
            ValueError: logits is not 2-D floating point, or its rows do not match ``states``
                or ``drafts``.
        """
        _check_batch(logits, states)
        if drafts is not None and len(drafts) != len(states):
            raise ValueError(f"drafts has {len(drafts)} entries but states has {len(states)}")
        if all(s.greedy and not s.uses_penalties and not s.masked_token_ids() for s in states):
            # Fast path: nothing changes the argmax.
            token_ids = argmax(logits, self._native_argmax)  # [S]
        else:
            token_ids = self._sample(process_logits(logits, states), states, drafts)
        ids = token_ids.tolist()
        return SamplerOutput(token_ids=ids, logprobs=compute_logprobs(logits, states, token_ids))

    def _sample(
        self, logits: torch.Tensor, states: Sequence[SamplingState], drafts: Sequence[int | None] | None
    ) -> torch.Tensor:
        # logits: [S, V] processed; returns token_ids: [S] int64
        greedy = [i for i, s in enumerate(states) if s.greedy]
        sampled = [i for i, s in enumerate(states) if not s.greedy]
        token_ids = torch.empty(len(states), dtype=torch.int64, device=logits.device)
        if greedy:
            token_ids[greedy] = argmax(_rows(logits, greedy), self._native_argmax)
        if sampled:
            uniforms = self._uniforms([states[i] for i in sampled], logits.device)  # [R] float64
            rows = _rows(logits, sampled)
            row_drafts = [(j, drafts[i]) for j, i in enumerate(sampled)] if drafts is not None else []
            checked = [(j, d) for j, d in row_drafts if d is not None]
            if checked:
                rows = self._verify_drafts(rows, [j for j, _ in checked], [d for _, d in checked])
            token_ids[sampled] = inverse_cdf_draw(rows, uniforms)
        return token_ids

    def _verify_drafts(self, rows: torch.Tensor, checked: list[int], draft_ids: list[int]) -> torch.Tensor:
        """Speculative sampling against a draft that is one known token (the proposal puts all its mass there).

        Row j keeps draft d with probability p(d) (its logits become d alone) and otherwise loses d
        (its logits there become -inf), so the draw that follows picks from p without d,
        renormalised. Token d thus comes out with probability p(d), and any other token x with
        (1 - p(d)) * p(x) / (1 - p(d)) = p(x). Returns new logits; ``rows`` is not modified.
        """
        out = rows.clone()  # [R, V]
        sub = out[checked]  # [C, V]
        ids = torch.tensor(draft_ids, dtype=torch.int64, device=rows.device).unsqueeze(1)  # [C, 1]
        p_draft = sub.softmax(dim=-1, dtype=torch.float64).gather(1, ids).squeeze(1)  # [C]
        # NOTE: the acceptance draws come from the shared generator: only unseeded requests send
        # drafts, so a seeded request's draws stay its own.
        accept = _uniform(len(checked), self._generator, rows.device) < p_draft  # [C] bool
        only_draft = torch.full_like(sub, float("-inf")).scatter_(1, ids, 0.0)
        without_draft = sub.scatter(1, ids, float("-inf"))
        out[checked] = torch.where(accept.unsqueeze(1), only_draft, without_draft)
        return out

    def _uniforms(self, states: list[SamplingState], device: torch.device) -> torch.Tensor:
        # One U[0, 1) draw per row: a seeded row's from its own generator, the others' from the shared one.
        uniforms = torch.empty(len(states), dtype=torch.float64, device=device)  # [R]
        unseeded = [j for j, s in enumerate(states) if s.generator is None]
        if unseeded:
            uniforms[unseeded] = _uniform(len(unseeded), self._generator, device)
        for j, s in enumerate(states):
            if s.generator is not None:
                uniforms[j] = _uniform(1, s.generator, device)[0]
        return uniforms


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn where the generator lives (a generator only feeds its own device), then moved: [n] float64.
    return torch.rand(n, dtype=torch.float64, device=generator.device, generator=generator).to(device)


def inverse_cdf_draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)`` by inverting its CDF at the given uniforms.

    Two levels keep the draw exact for unlikely tokens at float32 cost: a float64 CDF over blocks
    of ``CDF_BLOCK`` tokens picks the block, a float64 CDF inside that block picks the token.
    (A float32 CDF over a whole vocabulary would round the tail of a peaked distribution away.)
    Tokens with ``-inf`` logits have no mass and are never drawn.

    Args:
        logits: ``[R, V]`` float logits; a row without a finite maximum takes its argmax.
        uniforms: ``[R]`` float64 draws in [0, 1), one per row.

    Returns:
        ``[R]`` int64 token ids: row r gets the token whose CDF interval holds ``uniforms[r]``.
    """
    rows, vocab = logits.shape
    peak = logits.amax(dim=-1, keepdim=True)  # [R, 1]
    finite = torch.isfinite(peak).squeeze(1)  # [R]
    if not bool(finite.all()):
        # NOTE: a row without a finite maximum (every token masked, a penalty that overflowed)
        # has no distribution to draw from. It takes its argmax, so that one request's logits
        # cannot fail the whole batch; the others draw as usual.
        out = logits.nan_to_num(nan=float("-inf")).argmax(dim=-1)
        ok = finite.nonzero().squeeze(1)
        if ok.numel():
            out[ok] = inverse_cdf_draw(logits[ok], uniforms[ok])
        return out
    weights = logits - peak
    weights.exp_()  # [R, V] unnormalised probabilities, -inf -> 0
    num_blocks = -(-vocab // CDF_BLOCK)
    if num_blocks * CDF_BLOCK != vocab:
        weights = torch.nn.functional.pad(weights, (0, num_blocks * CDF_BLOCK - vocab))  # no mass
    blocks = weights.view(rows, num_blocks, CDF_BLOCK)
    # NOTE: summed in float32 (exact enough for 256 terms), then float64 for the running total.
    block_mass = blocks.sum(dim=-1).to(torch.float64)  # [R, NB]
    block, within = _invert_cdf(block_mass, uniforms)  # [R] each
    inner_mass = blocks[torch.arange(rows, device=logits.device), block].to(torch.float64)  # [R, B]
    inner, _ = _invert_cdf(inner_mass, within)
    return block * CDF_BLOCK + inner


def _invert_cdf(mass: torch.Tensor, fraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index whose CDF interval holds ``fraction`` of each row's mass, and where inside it (in [0, 1]).

    Args:
        mass: ``[R, n]`` float64, non-negative, some mass in every row.
        fraction: ``[R]`` float64 in [0, 1).
    """
    cdf = mass.cumsum(dim=-1)  # [R, n]
    total = cdf[:, -1]
    # NOTE: rounding can put the target at the total; capping it just below means the interval
    # found always has mass, so a zero-probability entry is never picked.
    target = torch.minimum(fraction * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, target.unsqueeze(1), right=True)  # [R, 1]: cdf[i-1] <= target < cdf[i]
    upper = cdf.gather(1, index).squeeze(1)
    width = mass.gather(1, index).squeeze(1)
    within = ((target - (upper - width)) / width).clamp_(0.0, 1.0)
    return index.squeeze(1), within


def process_logits(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """The logits each row samples from: penalties, temperature, min_tokens mask and filters applied.

    See :class:`Sampler` for the order and semantics. Greedy rows get penalties and the
    min_tokens mask only. Filtered-out tokens are ``-inf``.

    Args:
        logits: ``[S, V]`` raw logits (not modified).
        states: the S rows' sampling states.

    Returns:
        A new ``[S, V]`` float32 tensor.
    """
    _check_batch(logits, states)
    out = logits.to(torch.float32, copy=True)  # [S, V]
    apply_penalties(out, states)
    sampled = [i for i, s in enumerate(states) if not s.greedy]
    if sampled:
        # NOTE: greedy rows divide by 1, which is exact: one pass over all rows, no row gather.
        out.div_(_row_values(out, [1.0 if s.greedy else s.params.temperature for s in states]))
    _apply_min_tokens_mask(out, states)
    vocab_size = out.shape[1]
    top_k_rows = [i for i in sampled if 0 < states[i].params.top_k < vocab_size]
    _apply_filter(out, top_k_rows, [states[i].params.top_k for i in top_k_rows], _top_k)
    top_p_rows = [i for i in sampled if states[i].params.top_p < 1.0]
    _apply_filter(out, top_p_rows, [states[i].params.top_p for i in top_p_rows], _top_p)
    min_p_rows = [i for i in sampled if states[i].params.min_p > 0.0]
    _apply_filter(out, min_p_rows, [states[i].params.min_p for i in min_p_rows], _min_p)
    return out


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Apply repetition, presence and frequency penalties in place (rows without penalties untouched).

    Args:
        logits: ``[S, V]`` float32 logits, modified in place.
        states: the S rows' sampling states.
    """
    rows = [i for i, s in enumerate(states) if s.uses_penalties]
    if not rows:
        return
    vocab_size = logits.shape[1]
    tensors = [states[i].penalty_tensors(vocab_size, logits.device) for i in rows]
    counts = torch.stack([c for _, c in tensors])  # [P, V] float32
    generated = counts > 0  # [P, V] bool
    params = [states[i].params for i in rows]
    sub = _rows(logits, rows)  # [P, V]
    # NOTE: each half is skipped when no row uses it: they are several passes over [P, V] each.
    if any(p.repetition_penalty != 1.0 for p in params):
        rep = _row_values(logits, [p.repetition_penalty for p in params])  # [P, 1]
        seen = torch.stack([m for m, _ in tensors]).view(torch.bool) | generated  # prompt or generated
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        presence = _row_values(logits, [p.presence_penalty for p in params])  # [P, 1]
        frequency = _row_values(logits, [p.frequency_penalty for p in params])  # [P, 1]
        sub = sub - frequency * counts - presence * generated
    if len(rows) == logits.shape[0]:
        logits.copy_(sub)
    else:
        logits[rows] = sub


def compute_logprobs(
    logits: torch.Tensor, states: Sequence[SamplingState], token_ids: torch.Tensor
) -> list[TokenLogprob | None]:
    """Logprobs of the sampled tokens under the raw logits, for the rows that ask.

    Args:
        logits: ``[S, V]`` raw model logits (before penalties, temperature and filters).
        states: the S rows' sampling states.
        token_ids: ``[S]`` the sampled tokens.

    Returns:
        Per row, a :class:`TokenLogprob` with ``top_logprobs`` best alternatives, or None.
    """
    rows = [i for i, s in enumerate(states) if s.wants_logprobs]
    result: list[TokenLogprob | None] = [None] * len(states)
    if not rows:
        return result
    logprobs = torch.log_softmax(_rows(logits, rows).to(torch.float32), dim=-1)  # [L, V]
    chosen = logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1).tolist()  # [L]
    n_top = max(states[i].params.top_logprobs for i in rows)
    top_vals: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if n_top > 0:
        top = logprobs.topk(min(n_top, logprobs.shape[1]), dim=-1)  # values, indices: [L, n_top]
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    sampled_ids = token_ids.tolist()
    for j, i in enumerate(rows):
        n = states[i].params.top_logprobs
        result[i] = TokenLogprob(
            token_id=sampled_ids[i],
            logprob=chosen[j],
            top=tuple(zip(top_ids[j][:n], top_vals[j][:n])),
        )
    return result


def _check_batch(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor [S, V], got {tuple(logits.shape)} {logits.dtype}")
    if logits.shape[0] != len(states):
        raise ValueError(f"logits has {logits.shape[0]} rows but states has {len(states)} entries")


def _row_values(like: torch.Tensor, values: list[float]) -> torch.Tensor:
    # One parameter per row as a column: [R, 1] float32 on the logits' device.
    return torch.tensor(values, dtype=torch.float32, device=like.device).unsqueeze(1)


def _apply_min_tokens_mask(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        # NOTE: ids outside the vocabulary (user-given stop_token_ids) can never be sampled anyway.
        ids = [t for t in s.masked_token_ids() if t < vocab_size]
        rows.extend([i] * len(ids))
        cols.extend(ids)
    if rows:
        logits[rows, cols] = float("-inf")


def argmax(logits: torch.Tensor, native_kernel: bool = False) -> torch.Tensor:
    """Each row's argmax, int64 [R] as ``logits.argmax(dim=-1)`` gives it.

    With ``native_kernel`` (the library loaded), CPU float32 logits go through the native kernel:
    torch's CPU argmax took 1-1.9 ms of a 32-row decode step over SmolLM2's 49,152 logits a row,
    the kernel ~0.13 ms. Others go through torch.
    """
    if (
        native_kernel
        and logits.is_cpu
        and logits.dim() == 2
        and logits.dtype == torch.float32
        and logits.shape[1] > 0
        and logits.stride(1) == 1
    ):
        return native.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    # The given rows of t (ascending, distinct, as every row list here is): t itself, without a
    # copy, when they are all of its rows.
    return t if len(rows) == t.shape[0] else t[rows]


def _apply_filter(logits: torch.Tensor, rows: list[int], values: list[Any], keep_fn: _KeepFn) -> None:
    # Runs a filter on the rows that use it only (values: their parameter), so the others cost nothing.
    if not rows:
        return
    sub = _rows(logits, rows)  # [R, V]
    drop = ~keep_fn(sub, values)
    if sub is logits:
        logits.masked_fill_(drop, float("-inf"))
    else:
        logits[rows] = sub.masked_fill(drop, float("-inf"))


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    # logits: [R, V], every k in [1, V); returns keep: [R, V] bool
    k = torch.tensor(ks, dtype=torch.int64, device=logits.device).unsqueeze(1)  # [R, 1]
    top = logits.topk(max(ks), dim=-1).values  # [R, max_k], descending
    kth = top.gather(1, k - 1)  # [R, 1]
    return logits >= kth


def _top_p(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    # logits: [R, V], every p in (0, 1); returns keep: [R, V] bool
    p = _row_values(logits, ps)  # [R, 1]
    probs = logits.softmax(dim=-1)  # [R, V]
    # NOTE: ranking the whole vocabulary (a full sort) costs some 20 passes over the logits; the
    # nucleus almost always lies within the few hundred most likely tokens, so rank those first
    # and rank everything only for the rows whose candidates hold less than their top_p mass.
    keep, covered = _nucleus(probs, p, min(TOP_P_CANDIDATES, probs.shape[1]))
    if not bool(covered.all()):
        wide = (~covered).nonzero().squeeze(1)
        keep[wide] = _nucleus(probs[wide], p[wide], probs.shape[1])[0]
    return keep


def _nucleus(probs: torch.Tensor, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # probs: [R, V], p: [R, 1]. Ranks the k most likely tokens and keeps those with less than p
    # mass before them; returns keep [R, V] bool, and covered [R] bool: the k tokens hold mass p,
    # so no token outside them belongs to the nucleus.
    top_probs, top_ids = probs.topk(k, dim=-1)  # [R, k] each, most likely first
    cum = top_probs.cumsum(dim=-1)
    # The most likely token has no mass before it (0 < p), so at least one token always stays.
    keep_ranked = (cum - top_probs) < p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_ids, keep_ranked)
    return keep, (cum[:, -1:] >= p).squeeze(1)


def _min_p(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    # logits: [R, V], every min_p in (0, 1]; returns keep: [R, V] bool
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * _row_values(logits, min_ps)  # [R, 1]
    return probs >= threshold
