"""What the engine hands out: per-step request deltas, finished completions, usage and logprobs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenwire.engine.errors import EngineError


class FinishReason(enum.Enum):
    """Why a request ended; mapped to the proto enum in one place (the server's converters)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class TokenLogprob:
    """Log probability of one sampled token and its best alternatives (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass
class RequestOutput:
    """The part of one request that is new since its previous output (what a stream sends).

    ``finish_reason`` is set on a request's last output only; ``usage`` too. ``error`` is set with
    ``FinishReason.ERROR``.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: EngineError | None = None

    @property
    def finished(self) -> bool:
        """True on the request's last output."""
        return self.finish_reason is not None

    def merge(self, later: RequestOutput) -> None:
        """Append a later delta of the same request (a lagging reader gets both in one message)."""
        self.token_ids.extend(later.token_ids)
        self.text += later.text
        self.logprobs.extend(later.logprobs)
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
            self.usage = later.usage
            self.error = later.error


@dataclass
class Completion:
    """A whole finished request, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: EngineError | None = None
