"""Conversions at the client's edge: Python arguments to request messages, responses to value types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from google.protobuf.message import Message

from tokenwire.client.errors import InvalidArgumentError, TokenwireError, error_from_code
from tokenwire.client.types import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    HealthStatus,
    ModelInfo,
    SamplingKwargs,
    TokenLogprob,
    Usage,
)
from tokenwire.client.v1 import generation_pb2 as pb

MessageLike = Union[ChatMessage, Mapping[str, str]]
PromptInput = Union[str, Sequence[int], Sequence[MessageLike]]
"""A prompt as `complete_many` takes it: a text, token ids, or chat messages."""

_SAMPLING_KEYS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_REQUEST_KEYS = frozenset(SamplingKwargs.__annotations__) - _SAMPLING_KEYS
_REPEATED_KEYS = frozenset({"stop", "stop_token_ids"})
_FINISH = {
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    pb.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_HEALTH = {0: HealthStatus.UNKNOWN, 1: HealthStatus.SERVING, 2: HealthStatus.NOT_SERVING, 3: HealthStatus.SERVICE_UNKNOWN}


def chat_message(message: MessageLike) -> ChatMessage:
    """A `ChatMessage` from itself or from a mapping with "role" and "content"."""
    if isinstance(message, ChatMessage):
        return message
    if isinstance(message, Mapping):
        try:
            return ChatMessage(role=message["role"], content=message["content"])
        except KeyError as exc:
            raise ValueError(f"chat message {dict(message)!r} needs a {exc.args[0]!r} key") from exc
    raise ValueError(f"chat messages must be ChatMessage or mappings, got {type(message).__name__}")


def _chat_pb(messages: Sequence[MessageLike]) -> pb.Chat:
    if isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of chat messages")
    return pb.Chat(messages=[pb.ChatMessage(role=m.role, content=m.content) for m in map(chat_message, messages)])


def _token_ids_pb(token_ids: Sequence[int]) -> pb.TokenIds:
    if isinstance(token_ids, (str, bytes)) or not token_ids:
        raise ValueError("token_ids must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
        raise ValueError("token_ids must hold non-negative integers only")
    return pb.TokenIds(ids=list(token_ids))


def set_prompt(
    message: pb.GenerateRequest | pb.TokenizeRequest,
    prompt: str | None,
    token_ids: Sequence[int] | None,
    messages: Sequence[MessageLike] | None,
) -> None:
    """Fill a request's prompt from exactly one of a text, token ids or chat messages.

    Raises:
        ValueError: none or several were given, or the one given is empty or malformed.
    """
    given = [name for name, v in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, token_ids or messages, got {given or 'none'}")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        message.text = prompt
    elif token_ids is not None:
        if not isinstance(message, pb.GenerateRequest):
            raise ValueError("token_ids are already tokens: only text or messages can be tokenized")
        message.tokens.CopyFrom(_token_ids_pb(token_ids))
    else:
        message.chat.CopyFrom(_chat_pb(messages))  # type: ignore[arg-type]


def split_prompt(prompt: PromptInput) -> tuple[str | None, Sequence[int] | None, Sequence[MessageLike] | None]:
    """Tell a batch item's kind: a text, a list of token ids, or a list of chat messages.

    Raises:
        ValueError: an empty list, or one that mixes ids and messages.
    """
    if isinstance(prompt, str):
        return prompt, None, None
    items = list(prompt)
    if not items:
        raise ValueError("a prompt must not be an empty list")
    if all(isinstance(t, int) for t in items):
        return None, items, None  # type: ignore[return-value]
    return None, None, items  # type: ignore[return-value]


def generate_request(
    request_id: str,
    *,
    prompt: str | None = None,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[MessageLike] | None = None,
    sampling: Mapping[str, Any],
) -> pb.GenerateRequest:
    """Build one `GenerateRequest` from a prompt and `SamplingKwargs`.

    Raises:
        TypeError: an unknown sampling key, or a value of the wrong type (the message names it).
        ValueError: a bad prompt, or a value protobuf cannot hold (e.g. a negative count).
    """
    request = pb.GenerateRequest(request_id=request_id)
    set_prompt(request, prompt, token_ids, messages)
    for key, value in sampling.items():
        if value is None:
            continue
        if key not in _SAMPLING_KEYS and key not in _REQUEST_KEYS:
            raise TypeError(f"unknown generation argument {key!r}; expected one of {sorted(SamplingKwargs.__annotations__)}")
        target = request.sampling if key in _SAMPLING_KEYS else request
        try:
            if key in _REPEATED_KEYS:
                if isinstance(value, (str, bytes)):
                    raise TypeError(f"a list, not a single {type(value).__name__}")
                getattr(target, key).extend(value)
            else:
                setattr(target, key, value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"generation argument {key}={value!r}: {exc}") from exc
    return request


def cancel_request(request_id: str) -> pb.GenerateRequest:
    """The message that cancels one open request on its stream."""
    return pb.GenerateRequest(request_id=request_id, cancel=True)


def chunk_from_pb(response: pb.GenerateResponse) -> GenerationChunk:
    """A `GenerationChunk` from one `GenerateResponse`."""
    usage = None
    if response.HasField("usage"):
        u = response.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    return GenerationChunk(
        request_id=response.request_id,
        text=response.text,
        token_ids=tuple(response.token_ids),
        logprobs=tuple(
            TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top_logprobs))
            for lp in response.logprobs
        ),
        finish_reason=_FINISH.get(response.finish_reason),
        usage=usage,
    )


def response_error(response: pb.GenerateResponse) -> TokenwireError | None:
    """The typed error a final message carries (FINISH_REASON_ERROR, or a server-side cancel)."""
    if response.finish_reason == pb.FINISH_REASON_ERROR:
        return error_from_code(response.error.code, response.error.message, request_id=response.request_id)
    if response.finish_reason == pb.FINISH_REASON_CANCELLED:
        return error_from_code(1, "the server cancelled the request", request_id=response.request_id)
    return None


def model_info_from_pb(response: pb.GetModelInfoResponse) -> ModelInfo:
    """A `ModelInfo` from a `GetModelInfoResponse`."""
    return ModelInfo(
        model_name=response.model_name,
        architecture=response.architecture,
        vocab_size=response.vocab_size,
        max_context_length=response.max_context_length,
        eos_token_ids=tuple(response.eos_token_ids),
        dtype=response.dtype,
        device=response.device,
        kv_block_size=response.kv_block_size,
        kv_blocks_total=response.kv_blocks_total,
        max_num_seqs=response.max_num_seqs,
        has_chat_template=response.has_chat_template,
        kv_cache_dtype=response.kv_cache_dtype,
    )


def health_status(number: int) -> HealthStatus:
    """The `HealthStatus` for a grpc.health.v1 `ServingStatus` number."""
    return _HEALTH.get(number, HealthStatus.UNKNOWN)


def check_message_size(message: Message, limit: int, request_id: str | None = None) -> None:
    """Refuse a request larger than the message limit before it is sent.

    Sent, the server (or this client's channel) would end the call with RESOURCE_EXHAUSTED: on a
    shared Generate stream, every request open on it, and a retry would only do it again.

    Raises:
        InvalidArgumentError: the message is larger than ``limit`` bytes.
    """
    size = message.ByteSize()
    if size > limit:
        raise InvalidArgumentError(
            f"the request is {size} bytes, over the {limit}-byte message limit (max_message_size here "
            "and the server's --max-message-size); send a shorter prompt or raise both limits",
            request_id=request_id,
        )
