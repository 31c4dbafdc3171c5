"""One Sequence carries a request from admission to finish: tokens, progress, status, sampling state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenwire.engine.outputs import FinishReason, TokenLogprob, Usage
from tokenwire.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request inside the engine.

    The scheduler counts tokens, not phases: each step a sequence is given tokens until
    ``num_computed_tokens`` reaches ``num_tokens``. A prompt chunk, a decode and a recompute after
    preemption are all the same thing.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # effective limit: params.max_tokens capped by the context length
    eos_token_ids: frozenset[int]
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    prefix_lookup_done: bool = False
    # Attached by the engine at admission (sampler state and detokenizer), kept untyped here so the
    # bookkeeping module does not import the heavier ones.
    sampling_state: object = None
    detokenizer: object = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Tokens generated so far."""
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        """How many tokens were generated."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once a finish reason is set."""
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token (its KV is computed in the next step)."""
        self.token_ids.append(token_id)

    def usage(self) -> Usage:
        """Token counts for the final message."""
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_output_tokens,
            cached_prompt_tokens=self.num_cached_prompt_tokens,
        )
