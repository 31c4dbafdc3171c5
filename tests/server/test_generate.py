"""The multiplexed Generate stream on the real default model: answers, cancels, in-band errors, half-close."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc as pb_grpc
from tokenwire.engine.config import EngineArgs

pytestmark = pytest.mark.slow

GREEDY = pb.SamplingParams(temperature=0.0)


@contextmanager
def serve_own_engine(
    args: EngineArgs, start_server: Callable[..., Any], engine: Any, loop_thread: Any
) -> Iterator[tuple[Any, grpc.Channel]]:
    """A second engine on the shared engine's weights, behind its own server: (engine, channel)."""
    from tokenwire.engine.async_engine import AsyncEngine

    own = AsyncEngine(args, loaded=engine.core.loaded)
    loop_thread.run(own.start())
    running = None
    try:
        running = start_server(engine_override=own)
        with grpc.insecure_channel(running.address) as channel:
            yield own, channel
    finally:
        if running is not None:
            loop_thread.run(running.server.close())
        loop_thread.run(own.shutdown())


def chat(*turns: tuple[str, str]) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role=role, content=content) for role, content in turns])


def test_greedy_capital_of_france_is_paris(conversation: Callable[..., Any], engine: Any) -> None:
    c = conversation()
    c.send("paris", chat=chat(("user", "What is the capital of France?")), sampling=GREEDY, max_tokens=16)
    c.half_close()
    messages = c.read_all()
    final = c.final_of(messages)
    text = "".join(m.text for m in messages)
    ids = [t for m in messages for t in m.token_ids]
    assert "Paris" in text
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert final.usage.completion_tokens == len(ids) and final.usage.prompt_tokens > 0
    # The deltas add up to the decoded completion (an end-of-sequence token adds no text).
    assert text == engine.core.tokenizer.decode(ids)


def test_many_requests_and_cancels_on_one_stream(
    conversation: Callable[..., Any], engine: Any, blocks_freed: Callable[[], None]
) -> None:
    c = conversation()
    vocab = engine.model_info.vocab_size
    plain = {
        "text": {"text": "The sky is", "max_tokens": 3},
        "tokens": {"tokens": pb.TokenIds(ids=[504, 3458, 314]), "max_tokens": 4},
        "chat": {"chat": chat(("user", "Say hi.")), "max_tokens": 5},
        "seeded": {"text": "Once upon a time", "max_tokens": 4, "sampling": pb.SamplingParams(seed=7)},
        "logprobs": {"text": "1, 2, 3,", "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
    }
    c.cancel("never-opened")  # harmless
    c.send("long-1", text="Count to one thousand:", max_tokens=500, ignore_eos=True, sampling=GREEDY)
    for rid, fields in plain.items():
        c.send(rid, ignore_eos=True, **({"sampling": GREEDY} | fields))
    c.send("long-2", text="List every prime:", max_tokens=500, ignore_eos=True, sampling=GREEDY)
    # Cancel the long requests once each has produced a token, while the others still run.
    seen: set[str] = set()
    c.read_until(lambda r: r.request_id.startswith("long") and seen.add(r.request_id) is None and len(seen) == 2)
    c.cancel("long-1")
    c.cancel("long-2")
    c.cancel("long-1")  # twice: harmless
    c.half_close()
    c.read_all()
    grouped = c.by_request()

    assert set(grouped) == set(plain) | {"long-1", "long-2"}
    for rid, fields in plain.items():
        final = c.final_of(grouped[rid])
        ids = [t for m in grouped[rid] for t in m.token_ids]
        assert final.finish_reason == pb.FINISH_REASON_LENGTH, rid
        assert len(ids) == fields["max_tokens"] == final.usage.completion_tokens, rid
        assert all(0 <= t < vocab for t in ids)
    for rid in ("long-1", "long-2"):
        final = c.final_of(grouped[rid])
        ids = [t for m in grouped[rid] for t in m.token_ids]
        assert final.finish_reason == pb.FINISH_REASON_CANCELLED, rid
        assert 1 <= len(ids) == final.usage.completion_tokens < 500
    logprobs = [lp for m in grouped["logprobs"] for lp in m.logprobs]
    assert len(logprobs) == 3 and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in logprobs)
    # Greedy: the sampled token is the most likely alternative.
    assert all(lp.token_id == lp.top_logprobs[0].token_id for lp in logprobs)
    blocks_freed()


def test_per_request_errors_come_back_in_band(conversation: Callable[..., Any], engine: Any) -> None:
    info = engine.model_info
    c = conversation()
    c.send("ok", text="Hello", max_tokens=6, ignore_eos=True, sampling=GREEDY)
    c.send("ok", text="Hello again", max_tokens=2)  # duplicate of an open id
    c.send("bad-param", text="Hello", sampling=pb.SamplingParams(top_p=1.5))
    c.send("too-long", tokens=pb.TokenIds(ids=[42] * (info.max_context_length + 1)))
    c.send("bad-token", tokens=pb.TokenIds(ids=[1, info.vocab_size + 5]))
    c.send("bad-stop-token", text="Hi", stop_token_ids=[info.vocab_size])
    c.send("no-input", max_tokens=2)
    c.send("", text="Hi")
    c.send("many-logprobs", text="Hi", top_logprobs=50)
    c.half_close()
    c.read_all()
    grouped = c.by_request()

    def error_of(rid: str, index: int = -1) -> pb.RequestError:
        message = grouped[rid][index]
        assert message.finish_reason == pb.FINISH_REASON_ERROR and not message.token_ids
        return message.error

    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error_of("bad-param").code == invalid and "top_p" in error_of("bad-param").message
    assert error_of("too-long").code == invalid and "context length" in error_of("too-long").message
    assert error_of("bad-token").code == invalid and "unknown token id" in error_of("bad-token").message
    assert error_of("bad-stop-token").code == invalid and "stop_token_ids" in error_of("bad-stop-token").message
    assert error_of("no-input").code == invalid and "input" in error_of("no-input").message
    assert error_of("").code == invalid and "request_id" in error_of("").message
    assert error_of("many-logprobs").code == invalid and "top_logprobs" in error_of("many-logprobs").message
    for rid in ("bad-param", "too-long", "bad-token", "bad-stop-token", "no-input", "", "many-logprobs"):
        assert len(grouped[rid]) == 1
    # The duplicate is refused with ALREADY_EXISTS; the open request it collided with goes on.
    duplicate = [m for m in grouped["ok"] if m.finish_reason == pb.FINISH_REASON_ERROR]
    assert len(duplicate) == 1 and duplicate[0].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    rest = [m for m in grouped["ok"] if m is not duplicate[0]]
    final = rest[-1]
    assert [m for m in rest if m.finish_reason] == [final]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and sum(len(m.token_ids) for m in rest) == 6


def test_queue_full_is_in_band_and_the_stream_goes_on(
    start_server: Callable[..., Any], engine: Any, loop_thread: Any, conversation: Callable[..., Any]
) -> None:
    # A second engine on the same weights, admitting one sequence with one waiting behind it.
    args = EngineArgs(kv_cache_memory=8 * 1024 * 1024, max_num_seqs=1, max_queued_requests=1)
    with serve_own_engine(args, start_server, engine, loop_thread) as (_, channel):
        c = conversation(on=pb_grpc.GenerationServiceStub(channel))
        for i in range(6):
            c.send(f"q{i}", text="Hi", max_tokens=2, ignore_eos=True, sampling=GREEDY)
        c.half_close()
        c.read_all()
        grouped = c.by_request()
    assert set(grouped) == {f"q{i}" for i in range(6)}
    finals = {rid: messages[-1] for rid, messages in grouped.items()}
    full = [rid for rid, f in finals.items() if f.finish_reason == pb.FINISH_REASON_ERROR]
    done = [rid for rid, f in finals.items() if f.finish_reason == pb.FINISH_REASON_LENGTH]
    assert full and done and len(full) + len(done) == 6
    for rid in full:
        assert finals[rid].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "queue is full" in finals[rid].error.message


def test_half_close_lets_open_requests_finish(conversation: Callable[..., Any]) -> None:
    c = conversation()
    for rid in ("h1", "h2"):
        c.send(rid, text="Water is", max_tokens=3, ignore_eos=True, sampling=GREEDY)
    c.half_close()  # at once, while both are open
    c.read_all()
    grouped = c.by_request()
    assert c.call.code() == grpc.StatusCode.OK
    for rid in ("h1", "h2"):
        assert grouped[rid][-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(m.token_ids) for m in grouped[rid]) == 3


def test_tokenize_and_model_info(stub: pb_grpc.GenerationServiceStub, engine: Any) -> None:
    text = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=30)
    assert list(text.token_ids) == engine.tokenize(text="Hello world")
    messages = [{"role": "user", "content": "Hi"}]
    chatted = stub.Tokenize(pb.TokenizeRequest(chat=chat(("user", "Hi"))), timeout=30)
    assert list(chatted.token_ids) == engine.tokenize(messages=messages)
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(pb.TokenizeRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    expected = engine.model_info
    assert (info.model_name, info.architecture, info.vocab_size) == (
        expected.model_name, expected.architecture, expected.vocab_size)
    assert info.max_context_length == expected.max_context_length
    assert list(info.eos_token_ids) == list(expected.eos_token_ids) and info.eos_token_ids
    assert (info.dtype, info.kv_cache_dtype, info.device, info.kv_block_size, info.kv_blocks_total) == (
        expected.dtype, expected.kv_cache_dtype, expected.device, expected.kv_block_size, expected.kv_blocks_total)
    assert info.has_chat_template


def test_backpressure_on_unsent_answers_loses_nothing(
    conversation: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenwire.server import stream

    # The reader pauses whenever four answers wait to be written; everything still arrives.
    monkeypatch.setattr(stream, "MAX_UNSENT_RESPONSES", 4)
    c = conversation()
    c.send("ok", text="Hi", max_tokens=2, ignore_eos=True, sampling=GREEDY)
    for i in range(200):
        c.send(f"bad-{i}", text="Hi", sampling=pb.SamplingParams(temperature=-1.0))
    c.half_close()
    c.read_all()
    grouped = c.by_request()
    assert len(grouped) == 201
    assert all(m[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for rid, m in grouped.items() if rid != "ok")
    assert c.final_of(grouped["ok"]).finish_reason == pb.FINISH_REASON_LENGTH


def test_speculative_engine_streams_the_same_greedy_tokens(
    start_server: Callable[..., Any], engine: Any, loop_thread: Any, conversation: Callable[..., Any]
) -> None:
    prompt = "Say it twice: red green blue yellow. red green blue yellow. red"
    plain = conversation()
    plain.send("p", text=prompt, max_tokens=24, ignore_eos=True, sampling=GREEDY)
    plain.half_close()
    want = [t for m in plain.read_all() for t in m.token_ids]

    args = EngineArgs(kv_cache_memory=8 * 1024 * 1024, speculative_tokens=4)
    with serve_own_engine(args, start_server, engine, loop_thread) as (spec, channel):
        c = conversation(on=pb_grpc.GenerationServiceStub(channel))
        c.send("s", text=prompt, max_tokens=24, ignore_eos=True, sampling=GREEDY)
        c.half_close()
        messages = c.read_all()
        accepted = spec.stats().accepted_draft_tokens_total
    final = c.final_of(messages)
    assert [t for m in messages for t in m.token_ids] == want
    assert final.usage.completion_tokens == 24
    assert accepted > 0  # the drafts were used, and the tokens are the same


def test_the_call_limit_counts_generation_calls_and_never_health_checks(
    start_server: Callable[..., Any], conversation: Callable[..., Any], wait_for: Callable[..., None]
) -> None:
    """--max-concurrent-rpcs 1: an open Generate stream holds the one slot for its whole life, so
    other calls get RESOURCE_EXHAUSTED; health checks (the kubelet's probes) are still answered."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = start_server(max_concurrent_rpcs=1)
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        first = conversation(on=stub)
        first.send("a", text="Hello", max_tokens=2, sampling=GREEDY)
        first.read_until(lambda r: r.finish_reason != pb.FINISH_REASON_UNSPECIFIED)  # the stream stays open
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 concurrent calls" in refused.value.details()
        second = conversation(on=stub)
        second.send("b", text="Hello", max_tokens=2, sampling=GREEDY)
        with pytest.raises(grpc.RpcError) as refused_stream:
            second.read_all()
        assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for _ in range(3):
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        first.half_close()
        first.read_all()

        def served() -> bool:
            try:
                return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).vocab_size > 0
            except grpc.RpcError:
                return False

        wait_for(served, what="the slot to be given back when the stream ended")
