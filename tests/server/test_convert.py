"""Proto <-> engine conversions and the one error/finish-reason to status mapping."""

from __future__ import annotations

import grpc
import pytest

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.engine.errors import (
    DuplicateRequestError,
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from tokenwire.engine.outputs import FinishReason, RequestOutput, TokenLogprob, Usage
from tokenwire.engine.sampling_params import SamplingParams
from tokenwire.server.convert import (
    ServerUnavailableError,
    check_request_id,
    finish_reason_to_pb,
    generation_request_from_pb,
    output_to_pb,
    sampling_params_from_pb,
    status_code_for,
    tokenize_input_from_pb,
)


def make_request(**fields: object) -> pb.GenerateRequest:
    fields.setdefault("request_id", "r1")
    if not {"text", "tokens", "chat"} & fields.keys():
        fields["text"] = "hello"
    return pb.GenerateRequest(**fields)  # type: ignore[arg-type]


def test_unset_sampling_fields_take_engine_defaults() -> None:
    params = sampling_params_from_pb(make_request())
    assert params == SamplingParams()
    assert params.temperature == 1.0 and params.max_tokens is None


def test_set_fields_are_carried() -> None:
    req = make_request(
        max_tokens=7, min_tokens=2, stop=["\n"], stop_token_ids=[5], ignore_eos=True, top_logprobs=3,
        sampling=pb.SamplingParams(temperature=0.0, top_k=4, top_p=0.5, min_p=0.1, repetition_penalty=1.2,
                                   presence_penalty=0.5, frequency_penalty=-0.5, seed=2**63),
    )
    p = sampling_params_from_pb(req)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos) == (7, 2, ("\n",), (5,), True)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed) == (0.0, 4, 0.5, pytest.approx(1.2), 2**63)
    # Asking for alternatives implies asking for the sampled token's logprob.
    assert p.logprobs is True and p.top_logprobs == 3


def test_float_fields_arrive_as_the_decimals_sent() -> None:
    """The proto's floats are 32-bit: the documented floor 0.01 arrives as 0.0099999998 and must
    still be accepted, and every value is the decimal the client wrote."""
    sampling = pb.SamplingParams(temperature=0.7, top_p=0.95, min_p=0.05, repetition_penalty=0.01,
                                 presence_penalty=-2.0, frequency_penalty=1.1)
    assert sampling.repetition_penalty < 0.01  # what the wire holds
    p = sampling_params_from_pb(make_request(sampling=sampling))
    assert (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (
        0.7, 0.95, 0.05, 0.01, -2.0, 1.1,
    )
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        sampling_params_from_pb(make_request(sampling=pb.SamplingParams(repetition_penalty=0.0099)))


def test_explicit_zero_max_tokens_is_rejected_not_ignored() -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        sampling_params_from_pb(make_request(max_tokens=0))


def test_inputs_map_to_the_engine_request() -> None:
    assert generation_request_from_pb(make_request(text="hi"), "s/r1").prompt == "hi"
    tokens = generation_request_from_pb(make_request(tokens=pb.TokenIds(ids=[1, 2])), "s/r1")
    assert list(tokens.prompt_token_ids or ()) == [1, 2] and tokens.prompt is None
    chat = generation_request_from_pb(
        make_request(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])), "s/r1"
    )
    assert chat.messages == [{"role": "user", "content": "hi"}] and chat.request_id == "s/r1"
    with pytest.raises(InvalidRequestError, match="input must be set"):
        generation_request_from_pb(pb.GenerateRequest(request_id="r"), "s/r")
    with pytest.raises(InvalidRequestError, match="input must be set"):
        tokenize_input_from_pb(pb.TokenizeRequest())


def test_request_id_checks() -> None:
    check_request_id("a" * 256)
    with pytest.raises(InvalidRequestError, match="request_id"):
        check_request_id("")
    with pytest.raises(InvalidRequestError, match="request_id"):
        check_request_id("a" * 257)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (PromptTooLongError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (DuplicateRequestError("x"), grpc.StatusCode.ALREADY_EXISTS),
        (QueueFullError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineDeadError("x"), grpc.StatusCode.UNAVAILABLE),
        (ServerUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (EngineError("x"), grpc.StatusCode.INTERNAL),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_code_for_errors(error: BaseException, code: grpc.StatusCode) -> None:
    assert status_code_for(error) is code


def test_every_finish_reason_has_a_proto_value() -> None:
    values = {finish_reason_to_pb(r) for r in FinishReason}
    assert len(values) == len(FinishReason) and pb.FINISH_REASON_UNSPECIFIED not in values
    assert finish_reason_to_pb(None) == pb.FINISH_REASON_UNSPECIFIED


def test_output_to_pb_carries_tokens_usage_logprobs_and_errors() -> None:
    out = RequestOutput(
        "s/r1", token_ids=[3, 4], text="ab", logprobs=[TokenLogprob(3, -0.5, ((3, -0.5), (9, -1.0)))],
        finish_reason=FinishReason.LENGTH, usage=Usage(5, 2, 1),
    )
    msg = output_to_pb("r1", out)
    assert msg.request_id == "r1" and list(msg.token_ids) == [3, 4] and msg.text == "ab"
    assert msg.finish_reason == pb.FINISH_REASON_LENGTH
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_prompt_tokens) == (5, 2, 1)
    assert [t.token_id for t in msg.logprobs[0].top_logprobs] == [3, 9]
    assert not msg.HasField("error")
    failed = output_to_pb("r2", RequestOutput("x", finish_reason=FinishReason.ERROR, error=QueueFullError("full")))
    assert failed.finish_reason == pb.FINISH_REASON_ERROR
    assert failed.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and failed.error.message == "full"
    assert not output_to_pb("r3", RequestOutput("x", token_ids=[1])).HasField("usage")
