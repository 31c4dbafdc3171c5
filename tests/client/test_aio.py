"""AsyncClient against the scripted server: streaming, multiplexing, cancel, deadline, retries, errors."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from tokenwire.client import (
    AlreadyExistsError,
    AsyncClient,
    ClientClosedError,
    DeadlineExceededError,
    FinishReason,
    HealthStatus,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RetryPolicy,
    TokenwireError,
    UnauthenticatedError,
    UnavailableError,
    UnknownError,
)

if TYPE_CHECKING:
    from tests.client.conftest import ServerLog

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


def run(target: str, body: Callable[[AsyncClient], Awaitable[None]], **options: object) -> None:
    """Run ``body`` with a fresh client on a fresh event loop."""

    async def main() -> None:
        async with AsyncClient(target, retry=FAST_RETRY, **options) as client:  # type: ignore[arg-type]
            await body(client)

    asyncio.run(main())


def test_generate_streams_chunks_in_order_with_finish_usage_and_logprobs(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        chunks = [c async for c in client.generate("count 4", max_tokens=4, logprobs=True, request_id="mine")]
        assert [c.text for c in chunks] == ["0 ", "1 ", "2 ", "3 ", ""]
        assert [c.token_ids for c in chunks[:-1]] == [(0,), (1,), (2,), (3,)]
        assert all(c.request_id == "mine" for c in chunks)
        assert [c.finished for c in chunks] == [False] * 4 + [True]
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        assert chunks[0].logprobs[0].token_id == 0 and chunks[0].logprobs[0].top == ((0, -0.5),)

    run(scripted.target, body)
    assert scripted.log.requests["mine"].max_tokens == 4


def test_complete_tokenize_model_info_health(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        completion = await client.complete("count 3")
        assert (completion.text, completion.token_ids) == ("0 1 2 ", (0, 1, 2))
        assert (await client.complete(token_ids=[5, 6])).token_ids == (0, 1)
        assert (await client.complete(messages=[{"role": "user", "content": "hey"}])).text == "hey"
        assert await client.tokenize("ab") == [97, 98]
        assert await client.tokenize(messages=[{"role": "user", "content": "abc"}]) == [3]
        assert (await client.model_info()).model_name == "scripted"
        assert await client.health() is HealthStatus.SERVING
        assert await client.health("no.such.Service") is HealthStatus.SERVICE_UNKNOWN

    run(scripted.target, body)


def test_concurrent_generations_share_one_stream(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        results = await asyncio.gather(*(client.complete(f"count {n} 0.001") for n in range(1, 11)))
        assert [len(r.token_ids) for r in results] == list(range(1, 11))

    run(scripted.target, body)
    assert scripted.log.streams == 1


def test_leaving_the_loop_early_cancels_that_request_alone(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        other = asyncio.ensure_future(client.complete("count 20 0.005"))
        async for chunk in client.generate("forever", request_id="early"):
            if chunk.token_ids == (2,):
                break
        gc.collect()
        await scripted.async_wait(lambda log: log.finished.get("early") == "cancelled")
        assert len((await other).token_ids) == 20

    run(scripted.target, body)
    assert scripted.log.cancels == ["early"]


@pytest.mark.parametrize("how", ["cancel", "aclose", "async_with", "drop"])
def test_cancel_close_and_drop_send_a_cancel(scripted, how: str) -> None:
    async def body(client: AsyncClient) -> None:
        generation = client.generate("forever", request_id=how)
        await generation.__anext__()
        if how == "cancel":
            generation.cancel()
        elif how == "aclose":
            await generation.aclose()
        elif how == "async_with":
            async with generation:
                pass
        else:
            del generation
            gc.collect()
        await scripted.async_wait(lambda log: log.finished.get(how) == "cancelled")
        if how != "drop":
            assert generation.done
            assert [c async for c in generation] == []

    run(scripted.target, body)
    assert scripted.log.cancels == [how]


def test_cancelling_the_consuming_task_cancels_the_request(scripted) -> None:
    async def consume(client: AsyncClient) -> None:
        async for _ in client.generate("forever", request_id="task"):
            pass

    async def body(client: AsyncClient) -> None:
        task = asyncio.ensure_future(consume(client))
        await scripted.async_wait(lambda log: "task" in log.requests)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await scripted.async_wait(lambda log: log.finished.get("task") == "cancelled")

    run(scripted.target, body)


def test_timeout_raises_deadline_and_cancels_only_that_request(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        other = asyncio.ensure_future(client.complete("count 30 0.005", timeout=None))
        with pytest.raises(DeadlineExceededError) as caught:
            async for _ in client.generate("forever", request_id="slow", timeout=0.1):
                pass
        assert caught.value.request_id == "slow"
        await scripted.async_wait(lambda log: log.finished.get("slow") == "cancelled")
        assert len((await other).token_ids) == 30
        with pytest.raises(DeadlineExceededError):
            await client.complete("forever", timeout=0.05)

    run(scripted.target, body, timeout=30.0)


@pytest.mark.parametrize(
    ("code", "error_type"),
    [(3, InvalidArgumentError), (16, UnauthenticatedError), (13, InternalError), (99, UnknownError)],
)
def test_in_band_errors_raise_typed_exceptions_with_request_id(scripted, code: int, error_type: type) -> None:
    async def body(client: AsyncClient) -> None:
        with pytest.raises(error_type) as caught:
            await client.complete(f"error {code}", request_id="bad")
        assert caught.value.request_id == "bad"
        assert (await client.complete("count 1")).text == "0 "  # the stream goes on

    run(scripted.target, body)
    assert scripted.log.attempts["bad"] == 1


def test_tokens_that_arrive_with_an_error_are_returned_before_it(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        generation = client.generate("tail-error")
        chunk = await generation.__anext__()
        assert (chunk.text, chunk.finish_reason) == ("x", None)
        with pytest.raises(InternalError, match="boom"):
            await generation.__anext__()

    run(scripted.target, body)


def test_overloaded_before_first_token_is_retried(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        assert (await client.complete("busy 2", request_id="retry")).text == "0 1 2 "
        with pytest.raises(ResourceExhaustedError):
            await client.complete("busy 10", request_id="gives-up")

    run(scripted.target, body)
    assert scripted.log.attempts["retry"] == 3
    assert scripted.log.attempts["gives-up"] == FAST_RETRY.max_attempts


def test_broken_stream_retries_unstarted_requests_and_fails_started_ones(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        started = client.generate("forever", request_id="started", timeout=10)
        await started.__anext__()
        retried = await client.complete("drop-first", request_id="unstarted")
        assert retried.text == "0 1 2 "
        with pytest.raises(UnavailableError) as caught:
            async for _ in started:
                pass
        assert caught.value.request_id == "started"
        # The client reconnects for later requests.
        assert (await client.complete("count 2")).text == "0 1 "

    run(scripted.target, body)
    assert scripted.log.attempts["unstarted"] == 2
    assert scripted.log.attempts["started"] == 1
    assert scripted.log.streams >= 2


def test_stream_dropped_after_tokens_is_not_retried(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        with pytest.raises(UnavailableError):
            await client.complete("drop-after 2", request_id="dropped")

    run(scripted.target, body)
    assert scripted.log.attempts["dropped"] == 1


def test_duplicate_open_request_id_is_refused(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        first = client.generate("forever", request_id="same")
        with pytest.raises(AlreadyExistsError):
            client.generate("count 1", request_id="same")
        first.cancel()

    run(scripted.target, body)


def test_closing_the_client_ends_open_generations(scripted) -> None:
    async def main() -> None:
        client = AsyncClient(scripted.target)
        generation = client.generate("forever", request_id="open")
        await generation.__anext__()
        await client.close()
        with pytest.raises(ClientClosedError):
            async for _ in generation:
                pass
        with pytest.raises(ClientClosedError):
            client.generate("count 1")
        await client.close()  # idempotent

    asyncio.run(main())


def test_complete_many_keeps_order_and_can_return_exceptions(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        prompts = ["count 3", [1, 2], [{"role": "user", "content": "hi"}], "count 1"]
        results = await client.complete_many(prompts, concurrency=2)
        assert [r.text for r in results] == ["0 1 2 ", "0 1 ", "hi", "0 "]
        mixed = await client.complete_many(["count 1", "error 3"], return_exceptions=True)
        assert mixed[0].text == "0 " and isinstance(mixed[1], InvalidArgumentError)  # type: ignore[union-attr]
        with pytest.raises(InvalidArgumentError):
            await client.complete_many(["error 3", "forever"])
        # NOTE: "forever" may ride a second stream that is still connecting when the error
        # arrives; its request and then its cancel are queued there, so wait (with the client
        # open) for the server to see both.
        def forever_cancelled(log: ServerLog) -> bool:
            ids = [rid for rid, r in log.requests.items() if r.text == "forever"]
            return len(ids) == 1 and log.finished.get(ids[0]) == "cancelled"

        await scripted.async_wait(forever_cancelled)
        with pytest.raises(ValueError, match="concurrency"):
            await client.complete_many(["count 1"], concurrency=0)

    run(scripted.target, body)


def test_bearer_token_is_sent_on_streams_and_unary_calls(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        await client.complete("count 1")

    run(scripted.target, body, token="s3cret")
    assert scripted.log.metadata[-1]["authorization"] == "Bearer s3cret"


def test_replicas_share_load_and_a_dead_one_is_avoided(scripted, scripted_server_factory) -> None:
    second = scripted_server_factory()

    async def body(client: AsyncClient) -> None:
        await asyncio.gather(*(client.complete("count 2 0.01") for _ in range(8)))

    run([scripted.target, second.target], body)
    assert scripted.log.streams >= 1 and second.log.streams >= 1
    assert sum(scripted.log.attempts.values()) + sum(second.log.attempts.values()) == 8
    assert min(sum(scripted.log.attempts.values()), sum(second.log.attempts.values())) >= 2

    second.reset()

    async def with_dead(client: AsyncClient) -> None:
        results = await asyncio.gather(*(client.complete("count 1") for _ in range(6)))
        assert all(r.text == "0 " for r in results)

    run(["127.0.0.1:1", second.target], with_dead)
    assert sum(second.log.attempts.values()) == 6


def test_errors_are_tokenwire_errors(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        with pytest.raises(TokenwireError):
            await client.complete("error 5")

    run(scripted.target, body)


def test_address_list_and_dns_targets_spread_requests_over_every_address(scripted, scripted_server_factory) -> None:
    others = [scripted_server_factory(), scripted_server_factory()]
    servers = [scripted, *others]

    async def body(client: AsyncClient) -> None:
        await asyncio.gather(*(client.complete("count 2 0.01") for _ in range(9)))

    run("ipv4:" + ",".join(s.target for s in servers), body)
    assert [sum(s.log.attempts.values()) for s in servers] == [3, 3, 3]
    assert [s.log.streams for s in servers] == [1, 1, 1]

    scripted.reset()
    run(f"dns:///localhost:{scripted.port}", body)
    assert sum(scripted.log.attempts.values()) == 9


def test_unresolvable_dns_name_is_unavailable() -> None:
    async def body(client: AsyncClient) -> None:
        with pytest.raises(UnavailableError, match="resolve"):
            await client.complete("count 1")
        with pytest.raises(UnavailableError, match="resolve"):
            await client.tokenize("x")

    run("dns:///no-such-host.invalid:50051", body)


def test_unix_socket_target(scripted_server_factory, tmp_path) -> None:
    server = scripted_server_factory(f"unix:{tmp_path}/tokenwire.sock")

    async def body(client: AsyncClient) -> None:
        assert (await client.complete("count 2")).text == "0 1 "

    run(server.target, body)


def test_streams_per_server_opens_streams_as_concurrency_needs_them(scripted) -> None:
    async def body(client: AsyncClient) -> None:
        await client.complete("count 1")
        await asyncio.gather(*(client.complete("count 3 0.01") for _ in range(5)))

    run(scripted.target, body, streams_per_server=3)
    assert scripted.log.streams == 3


def test_closing_the_client_fails_a_request_waiting_to_be_retried(scripted) -> None:
    async def main() -> None:
        slow = RetryPolicy(max_attempts=5, initial_backoff_s=30.0, max_backoff_s=30.0)
        client = AsyncClient(scripted.target, retry=slow)
        generation = client.generate("busy 10", request_id="waiting")
        await scripted.async_wait(lambda log: log.attempts["waiting"] == 1)
        await asyncio.sleep(0.05)  # the refusal reaches the client, which waits to retry
        await client.close()
        with pytest.raises(ClientClosedError):
            await asyncio.wait_for(generation.__anext__(), 5)

    asyncio.run(main())


def test_streams_on_a_connection_past_its_max_age_drain_while_new_requests_move_on(scripted_server_factory) -> None:
    # GOAWAY after 0.4 s; calls still open on the old connection are cut 1.2 s later.
    server = scripted_server_factory(
        options=(("grpc.max_connection_age_ms", 400), ("grpc.max_connection_age_grace_ms", 1200))
    )

    async def body(client: AsyncClient) -> None:
        first = asyncio.ensure_future(client.complete("count 8 0.1"))  # done before the cut
        await asyncio.sleep(0.7)  # past the connection's age
        second = await client.complete("count 15 0.1")  # would outlive the old connection
        assert len((await first).token_ids) == 8 and len(second.token_ids) == 15

    run(server.target, body)
    assert server.log.streams == 2
