"""The synchronous Client against the scripted server: same behaviour as AsyncClient, blocking."""

from __future__ import annotations

import gc
import threading

import pytest

from tokenwire.client import (
    Client,
    ClientClosedError,
    DeadlineExceededError,
    FinishReason,
    HealthStatus,
    InvalidArgumentError,
    RetryPolicy,
)

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)


def test_generate_complete_and_unary_calls(scripted) -> None:
    with Client(scripted.target, retry=FAST_RETRY) as client:
        chunks = list(client.generate("count 3"))
        assert "".join(c.text for c in chunks) == "0 1 2 "
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert client.complete("count 2").token_ids == (0, 1)
        assert client.generate("count 2").collect().text == "0 1 "
        assert [c.text for c in client.complete_many(["count 1", "count 2"])] == ["0 ", "0 1 "]
        assert client.tokenize("a") == [97]
        assert client.model_info().max_num_seqs == 4
        assert client.health() is HealthStatus.SERVING
        with pytest.raises(InvalidArgumentError):
            client.complete("error 3")


def test_break_close_and_timeout_cancel_on_the_server(scripted) -> None:
    with Client(scripted.target) as client:
        for chunk in client.generate("forever", request_id="broken"):
            if chunk.token_ids == (1,):
                break
        gc.collect()
        scripted.wait(lambda log: log.finished.get("broken") == "cancelled")

        with client.generate("forever", request_id="closed") as generation:
            next(generation)
        assert generation.done
        scripted.wait(lambda log: log.finished.get("closed") == "cancelled")

        with pytest.raises(DeadlineExceededError):
            client.complete("forever", request_id="late", timeout=0.1)
        scripted.wait(lambda log: log.finished.get("late") == "cancelled")
    assert sorted(scripted.log.cancels) == ["broken", "closed", "late"]


def test_threads_share_one_client_and_one_stream(scripted) -> None:
    results: dict[int, str] = {}
    with Client(scripted.target) as client:

        def work(n: int) -> None:
            results[n] = client.complete(f"count {n} 0.001").text

        threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 7)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == {n: "".join(f"{i} " for i in range(n)) for n in range(1, 7)}
    assert scripted.log.streams == 1


def test_closed_client_refuses_calls(scripted) -> None:
    client = Client(scripted.target)
    generation = client.generate("forever")
    next(generation)
    client.close()
    client.close()
    with pytest.raises(ClientClosedError):
        next(generation)
    with pytest.raises(ClientClosedError):
        client.complete("count 1")
