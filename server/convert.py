"""Proto <-> engine conversions, and the one mapping from finish reasons and errors to gRPC codes."""

from __future__ import annotations

import struct

import grpc

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.engine.errors import (
    DuplicateRequestError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
)
from tokenwire.engine.info import ModelInfo
from tokenwire.engine.outputs import FinishReason, RequestOutput, TokenLogprob, Usage
from tokenwire.engine.request import GenerationRequest
from tokenwire.engine.sampling_params import SamplingParams

# Longest request_id a client may use: ids are echoed on every message and land in logs.
MAX_REQUEST_ID_LEN = 256


class ServerUnavailableError(EngineError):
    """The server is not taking this request: the model is loading or the server is draining."""


_FINISH_REASONS: dict[FinishReason | None, pb.FinishReason.ValueType] = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}

# NOTE: looked up along the error's MRO, so a subclass (PromptTooLongError) takes its nearest
# listed ancestor's code and DuplicateRequestError wins over its base InvalidRequestError.
_STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    DuplicateRequestError: grpc.StatusCode.ALREADY_EXISTS,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineDeadError: grpc.StatusCode.UNAVAILABLE,
    ServerUnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def status_code_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code that reports ``error`` (INTERNAL for anything unexpected)."""
    for cls in type(error).__mro__:
        code = _STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def finish_reason_to_pb(reason: FinishReason | None) -> pb.FinishReason.ValueType:
    """The proto enum value of an engine finish reason (None: not finished)."""
    return _FINISH_REASONS[reason]


def finish_reason_label(reason: FinishReason | None) -> str:
    """The lower-case name used in logs and metric labels ("stop", "length", ...)."""
    return "unfinished" if reason is None else reason.value


_FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"})


def float32_decimal(value: float) -> float:
    """The shortest decimal that a proto float field holding ``value`` was sent as.

    The proto's floats are 32-bit: 0.01 arrives as 0.0099999998, under the range's documented
    floor of 0.01, and would be refused. The shortest decimal that rounds to the same float32 is
    the number the client wrote.
    """
    bits = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == bits:
            return candidate
    return value


def sampling_params_from_pb(request: pb.GenerateRequest) -> SamplingParams:
    """Build validated SamplingParams from a GenerateRequest; unset fields keep the engine's defaults.

    Raises:
        InvalidRequestError: a parameter is out of range (the message names it).
    """
    sampling = request.sampling
    kwargs: dict[str, object] = {
        name: float32_decimal(getattr(sampling, name)) if name in _FLOAT_FIELDS else getattr(sampling, name)
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "seed",
        )
        if sampling.HasField(name)
    }
    if request.HasField("max_tokens"):
        kwargs["max_tokens"] = request.max_tokens
    return SamplingParams(
        **kwargs,  # type: ignore[arg-type]
        min_tokens=request.min_tokens,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        logprobs=request.logprobs or request.top_logprobs > 0,
        top_logprobs=request.top_logprobs,
    )


def check_request_id(request_id: str) -> None:
    """Raise InvalidRequestError unless ``request_id`` is a usable stream key."""
    if not request_id:
        raise InvalidRequestError("request_id must not be empty")
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequestError(f"request_id must be at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}")


def generation_request_from_pb(request: pb.GenerateRequest, engine_request_id: str) -> GenerationRequest:
    """Convert one GenerateRequest into the engine's GenerationRequest under a server-unique id.

    Raises:
        InvalidRequestError: no prompt, or a sampling parameter out of range.
    """
    params = sampling_params_from_pb(request)
    kind = request.WhichOneof("input")
    if kind == "text":
        return GenerationRequest(engine_request_id, prompt=request.text, params=params)
    if kind == "tokens":
        return GenerationRequest(engine_request_id, prompt_token_ids=list(request.tokens.ids), params=params)
    if kind == "chat":
        return GenerationRequest(engine_request_id, messages=chat_from_pb(request.chat), params=params)
    raise InvalidRequestError("input must be set: one of text, tokens or chat")


def chat_from_pb(chat: pb.Chat) -> list[dict[str, str]]:
    """Chat messages as the engine takes them."""
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def tokenize_input_from_pb(request: pb.TokenizeRequest) -> tuple[str | None, list[dict[str, str]] | None]:
    """The (text, messages) pair of a TokenizeRequest, exactly one not None.

    Raises:
        InvalidRequestError: neither text nor chat is set.
    """
    kind = request.WhichOneof("input")
    if kind == "text":
        return request.text, None
    if kind == "chat":
        return None, chat_from_pb(request.chat)
    raise InvalidRequestError("input must be set: one of text or chat")


def usage_to_pb(usage: Usage) -> pb.Usage:
    """The proto Usage of an engine Usage."""
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def logprob_to_pb(lp: TokenLogprob) -> pb.TokenLogprob:
    """The proto TokenLogprob of an engine TokenLogprob."""
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_logprobs=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
    )


def output_to_pb(request_id: str, out: RequestOutput) -> pb.GenerateResponse:
    """The GenerateResponse carrying ``out`` to the client, under the client's own ``request_id``."""
    response = pb.GenerateResponse(
        request_id=request_id,
        token_ids=out.token_ids,
        text=out.text,
        logprobs=[logprob_to_pb(lp) for lp in out.logprobs],
        finish_reason=finish_reason_to_pb(out.finish_reason),
    )
    if out.usage is not None:
        response.usage.CopyFrom(usage_to_pb(out.usage))
    if out.finish_reason is FinishReason.ERROR:
        error = out.error if out.error is not None else EngineError("the request failed")
        response.error.code = status_code_for(error).value[0]
        response.error.message = str(error) or type(error).__name__
    return response


def error_output(request_id: str, error: EngineError, usage: Usage | None = None) -> RequestOutput:
    """A final RequestOutput that reports ``error`` for one request."""
    return RequestOutput(request_id=request_id, finish_reason=FinishReason.ERROR, usage=usage, error=error)


def model_info_to_pb(info: ModelInfo) -> pb.GetModelInfoResponse:
    """The proto GetModelInfoResponse of the engine's ModelInfo."""
    return pb.GetModelInfoResponse(
        model_name=info.model_name,
        architecture=info.architecture,
        vocab_size=info.vocab_size,
        max_context_length=info.max_context_length,
        eos_token_ids=list(info.eos_token_ids),
        dtype=info.dtype,
        kv_cache_dtype=info.kv_cache_dtype,
        device=info.device,
        kv_block_size=info.kv_block_size,
        kv_blocks_total=info.kv_blocks_total,
        max_num_seqs=info.max_num_seqs,
        has_chat_template=info.has_chat_template,
    )
