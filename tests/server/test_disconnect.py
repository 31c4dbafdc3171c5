"""A client that cancels its call, or passes its deadline, gets every request aborted and its KV blocks freed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

pytestmark = pytest.mark.slow

LONG = {"text": "Write a very long story:", "max_tokens": 2000, "ignore_eos": True}
USAGE = ("tokenwire_kv_cache_usage_ratio", ())
BLOCKS = ("tokenwire_kv_cache_blocks_used", ())


def test_disconnect_aborts_all_requests_and_frees_blocks(
    conversation: Callable[..., Any], engine: Any, server: Any, blocks_freed: Callable[[], None]
) -> None:
    c = conversation()
    for i in range(3):
        c.send(f"d{i}", **LONG)
    seen: set[str] = set()
    c.read_until(lambda r: seen.add(r.request_id) is None and len(seen) == 3)
    # Every request is running and holds blocks now.
    assert engine.stats().kv_blocks_used > 0
    assert server.scrape()[USAGE] > 0
    c.call.cancel()
    blocks_freed()
    assert server.scrape()[USAGE] == 0 and server.scrape()[BLOCKS] == 0
    with pytest.raises(grpc.RpcError) as err:
        c.read_all()
    assert err.value.code() == grpc.StatusCode.CANCELLED


def test_deadline_aborts_all_requests_and_frees_blocks(
    conversation: Callable[..., Any], engine: Any, server: Any, blocks_freed: Callable[[], None]
) -> None:
    c = conversation(timeout=6.0)
    c.send("t0", **LONG)
    c.send("t1", **LONG)
    tokens = 0
    with pytest.raises(grpc.RpcError) as err:
        while True:
            tokens += len(c.next().token_ids)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert tokens > 0  # the requests ran (and held blocks) before the deadline
    assert not any(r.finish_reason for r in c.responses)
    blocks_freed()
    assert server.scrape()[USAGE] == 0
