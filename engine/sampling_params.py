"""Per-request sampling and stopping parameters, validated once at the edge of the engine."""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field

from tokenwire.engine.errors import InvalidRequestError

# Hard bounds on what one request may ask for; documented in the proto and the README.
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 256
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    Attributes:
        temperature: softmax temperature in [0, 100]; 0 is greedy.
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: nucleus mass in (0, 1].
        min_p: drop tokens below min_p times the top probability, in [0, 1].
        repetition_penalty: in [0.01, 10]; 1 is off. Applies to prompt and generated tokens.
        presence_penalty: in [-2, 2]; applies to generated tokens.
        frequency_penalty: in [-2, 2]; applies to generated tokens, times their count.
        seed: per-request seed; same seed and prompt give the same output whatever shares the batch.
        max_tokens: most tokens to generate; None means up to the context length.
        min_tokens: fewest tokens before EOS, a stop token or a stop string may end the request.
        stop: stop strings (up to 16; one string is one stop string); the text ends before the first one.
        stop_token_ids: up to 256 tokens that end the request (kept in token ids, not in text).
        ignore_eos: keep going past the model's EOS tokens.
        logprobs: return the sampled token's log probability.
        top_logprobs: also return this many best alternatives (0 to 20).
        skip_special_tokens: leave special tokens out of the text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # NOTE: every field is checked for its type too: a float where an integer belongs, or NaN,
        # would otherwise pass the range checks and fail later inside an engine step.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, _real(name, getattr(self, name)))
        for name in ("top_k", "min_tokens", "top_logprobs"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        for name in ("seed", "max_tokens"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _integer(name, getattr(self, name)))
        # Lists are accepted for convenience and frozen into tuples so params stay hashable; one
        # string is one stop string (not a string of one-character stops).
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(_integer("stop_token_ids", t) for t in self.stop_token_ids))
        _check_range("temperature", self.temperature, 0.0, 100.0)
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        # NOTE: a floor, not just > 0: dividing a logit by a tiny penalty overflows to inf.
        _check_range("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, 10.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequestError(f"seed must be in [0, 2^64), got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1 when set, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str):
                raise InvalidRequestError(f"stop strings must be strings, got {type(s).__name__}")
            if not s or len(s) > MAX_STOP_STRING_LEN:
                raise InvalidRequestError(
                    f"stop strings must be 1 to {MAX_STOP_STRING_LEN} characters, got {len(s)}"
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be >= 0")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    # NOTE: `not lo <= value <= hi` is also true for NaN, which must be rejected too.
    if not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be in [{lo:g}, {hi:g}], got {value}")


def _real(name: str, value: object) -> float:
    # bool is an int to Python, but never a meaningful temperature or penalty.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    # NOTE: operator.index takes Python, numpy and torch integers and refuses floats, even 5.0.
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}") from None
