"""The client's value types: chunks, completions, usage, model info, chat messages, sampling keys."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypedDict


class FinishReason(str, enum.Enum):
    """Why a generation ended."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


class HealthStatus(str, enum.Enum):
    """A server's answer to the standard gRPC health check."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    SERVICE_UNKNOWN = "service_unknown"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation.

    Attributes:
        role: who speaks: "system", "user" or "assistant".
        content: what is said.
    """

    role: str
    content: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not self.role:
            raise ValueError(f"ChatMessage.role must be a non-empty string, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"ChatMessage.content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request.

    Attributes:
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated.
        cached_prompt_tokens: prompt tokens served from the server's prefix cache.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of one sampled token and its best alternatives.

    Attributes:
        token_id: the sampled token.
        logprob: its log probability under the model.
        top: (token id, log probability) of the most likely tokens at this position, best first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """What one streamed message adds to a generation.

    Attributes:
        request_id: the request it belongs to.
        text: the text the new tokens add (never a partial UTF-8 character).
        token_ids: the new tokens.
        logprobs: their log probabilities, when asked for.
        finish_reason: set on the request's last chunk only.
        usage: token counts, on the last chunk only.
    """

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        """True on the request's last chunk."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole finished generation.

    Attributes:
        request_id: the request's id.
        text: the generated text.
        token_ids: the generated tokens.
        finish_reason: why it ended (STOP or LENGTH; failures raise instead).
        usage: token counts.
        logprobs: per-token log probabilities, when asked for.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage | None
    logprobs: tuple[TokenLogprob, ...] = field(default_factory=tuple)

    @classmethod
    def from_chunks(cls, request_id: str, chunks: list[GenerationChunk]) -> Completion:
        """Join a finished request's chunks into one completion.

        Args:
            request_id: the request's id.
            chunks: all its chunks, the last one carrying the finish reason.

        Raises:
            ValueError: if the last chunk carries no finish reason.
        """
        if not chunks or chunks[-1].finish_reason is None:
            raise ValueError(f"chunks of request {request_id} must end with a finished chunk")
        return cls(
            request_id=request_id,
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=chunks[-1].finish_reason,
            usage=chunks[-1].usage,
            logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        )


@dataclass(frozen=True)
class ModelInfo:
    """The served model and its engine, as `GetModelInfo` describes them.

    Attributes:
        model_name: the model's name.
        architecture: e.g. "llama".
        vocab_size: size of the vocabulary.
        max_context_length: most tokens (prompt plus completion) one request may hold.
        eos_token_ids: tokens that end a completion unless ignore_eos is set.
        dtype: dtype of weights and activations.
        device: where the model runs.
        kv_block_size: tokens per KV cache block.
        kv_blocks_total: blocks in the KV cache pool.
        max_num_seqs: most sequences in one engine step.
        has_chat_template: whether chat prompts are accepted.
        kv_cache_dtype: the KV cache's element type ("" from a server too old to say).
    """

    model_name: str
    architecture: str
    vocab_size: int
    max_context_length: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    device: str
    kv_block_size: int
    kv_blocks_total: int
    max_num_seqs: int
    has_chat_template: bool
    kv_cache_dtype: str = ""


class SamplingKwargs(TypedDict, total=False):
    """The keyword arguments `generate`, `complete` and `complete_many` accept to shape a generation.

    Ranges are checked by the server, which answers a bad value with `InvalidArgumentError`.

    Keys:
        max_tokens: most tokens to generate (default: up to the context length).
        min_tokens: fewest tokens before an end-of-sequence token or stop may end it.
        temperature: 0 to 100; 0 is greedy (server default 1.0).
        top_k: sample among the k most likely tokens; 0 keeps all.
        top_p: nucleus mass in (0, 1].
        min_p: drop tokens less likely than min_p times the best one, in [0, 1].
        repetition_penalty: in [0.01, 10]; 1 is off.
        presence_penalty: in [-2, 2].
        frequency_penalty: in [-2, 2].
        seed: per-request seed for reproducible sampling.
        stop: stop strings; the text ends before the first one.
        stop_token_ids: tokens that end the generation.
        ignore_eos: keep going past the model's end-of-sequence tokens.
        logprobs: return each sampled token's log probability.
        top_logprobs: also return this many best alternatives (0 to 20).
    """

    max_tokens: int
    min_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    stop: list[str] | tuple[str, ...]
    stop_token_ids: list[int] | tuple[int, ...]
    ignore_eos: bool
    logprobs: bool
    top_logprobs: int
