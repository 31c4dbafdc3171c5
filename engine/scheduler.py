"""FCFS continuous-batching scheduler: decodes first, then prompt chunks, preemption by recompute."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenwire.engine.block_manager import BlockManager
from tokenwire.engine.sequence import Sequence, SequenceStatus


# Draft tokens for a decoding sequence (speculative decoding), given the most it may take; [] for none.
Drafter = Callable[[Sequence, int], list[int]]


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: compute tokens [num_computed_tokens, +num_new_tokens).

    With ``draft_token_ids``, the last of those tokens are guesses that follow the sequence's last
    token (speculative decoding): the step computes them all, and sampling keeps the ones the model
    agrees with.
    """

    seq: Sequence
    num_new_tokens: int
    block_table: list[int]
    draft_token_ids: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids) == self.seq.num_tokens

    @property
    def input_token_ids(self) -> list[int]:
        """The tokens this step feeds the model: the sequence's uncomputed ones, then the drafts."""
        start = self.seq.num_computed_tokens
        known = self.seq.token_ids[start : start + self.num_new_tokens - len(self.draft_token_ids)]
        return known + list(self.draft_token_ids)

    @property
    def num_sampled_rows(self) -> int:
        """Logit rows the step yields for the sequence when it samples: one, plus one per draft."""
        return 1 + len(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    """What runs this step: single-token decodes, and chunks (prompt pieces, decodes with drafts).

    The runner chooses the flat batch's order (decodes longest first; on CPU, short chunks as
    decode rows), and returns the sampled sequences in that order.
    """

    decodes: list[ScheduledSequence] = field(default_factory=list)
    prefills: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def scheduled(self) -> list[ScheduledSequence]:
        """All scheduled sequences: the decodes, then the chunks."""
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        """Tokens in the flat batch."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to run."""
        return not self.decodes and not self.prefills


class Scheduler:
    """Decides, every step, which tokens of which sequences run.

    Running sequences go first (so a long prompt never stalls decodes), in admission order; then
    waiting ones are admitted first come, first served while the token budget, the sequence limit
    and the KV pool allow. A long prompt is split across steps (chunked prefill). When the pool runs
    dry, the most recently admitted running sequence is preempted: its blocks are freed and it waits
    at the head of the queue to be recomputed (its own prefix blocks often survive in the cache).
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        drafter: Drafter | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.drafter = drafter
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        """Waiting plus running sequences."""
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            drafts = self._drafts(seq, budget) if n == 1 else []
            if drafts:
                # NOTE: guesses never cost a preemption: they take only blocks the pool can spare
                # after keeping one free for every running sequence's own next token.
                end = seq.num_computed_tokens + 1 + len(drafts)
                spare = bm.num_free_blocks - len(self.running)
                if bm.num_blocks_needed(seq.request_id, end) > spare or not bm.allocate_slots(seq.request_id, end):
                    drafts = []
            n += len(drafts)
            while not bm.allocate_slots(seq.request_id, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._add_scheduled(out, seq, n, drafts)
                budget -= n
                i += 1
        # NOTE: no admissions in a step that had to preempt: the pool is under pressure, and a
        # just-preempted sequence must not be re-admitted ahead of the ones it made room for.
        if not out.preempted:
            budget = self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits: list[int] = []
            num_hit = 0
            if seq.num_computed_tokens == 0:
                hits, num_hit = bm.get_computed_blocks(seq.token_ids)
            n = min(seq.num_tokens - num_hit, budget)
            if not bm.allocate_slots(seq.request_id, num_hit + n, hits):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_hit
            if not seq.prefix_lookup_done:
                # Counted once per request: a recompute after preemption is not a new prompt.
                bm.record_prefix_lookup(seq.num_prompt_tokens, num_hit)
                seq.num_cached_prompt_tokens = min(num_hit, seq.num_prompt_tokens)
                seq.prefix_lookup_done = True
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_scheduled(out, seq, n)
            budget -= n
        return budget

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        # A decoding sequence's guesses: within the token budget, and never past its max_tokens
        # (the token sampled after the accepted drafts must fit too).
        if self.drafter is None:
            return []
        room = min(budget - 1, seq.max_tokens - seq.num_output_tokens - 1)
        return self.drafter(seq, room)[:room] if room > 0 else []

    def _add_scheduled(self, out: SchedulerOutput, seq: Sequence, n: int, drafts: list[int] | None = None) -> None:
        item = ScheduledSequence(seq, n, self.block_manager.block_table(seq.request_id), tuple(drafts or ()))
        (out.decodes if n == 1 else out.prefills).append(item)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, scheduled: list[ScheduledSequence]) -> None:
        """Advance progress after the step ran and register the blocks it filled in the prefix cache.

        Drafts do not count here: :meth:`accept_drafts` adds the ones that sampling confirmed.
        """
        for item in scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens - len(item.draft_token_ids)
            # Only tokens whose KV is written count; a freshly sampled token is computed next step.
            self.block_manager.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)

    def accept_drafts(self, seq: Sequence, num_accepted: int) -> None:
        """Count a running sequence's first ``num_accepted`` drafts of this step as computed.

        Their tokens must already be appended to the sequence. The KV written for rejected drafts
        lies past the computed length, where attention never reads and the next steps overwrite it.
        """
        if num_accepted:
            seq.num_computed_tokens += num_accepted
            self.block_manager.cache_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.request_id)
