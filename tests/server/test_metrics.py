"""The Prometheus endpoint: every documented metric is there and moves with the requests served."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tokenwire.client.v1 import generation_pb2 as pb

pytestmark = pytest.mark.slow

REQUIRED = (
    "tokenwire_requests_total",
    "tokenwire_time_to_first_token_seconds_count",
    "tokenwire_inter_token_latency_seconds_count",
    "tokenwire_e2e_request_latency_seconds_count",
    "tokenwire_requests_running",
    "tokenwire_requests_waiting",
    "tokenwire_kv_cache_usage_ratio",
    "tokenwire_prefix_cache_queried_tokens_total",
    "tokenwire_prefix_cache_hit_tokens_total",
    "tokenwire_preemptions_total",
    "tokenwire_prompt_tokens_total",
    "tokenwire_generation_tokens_total",
    "tokenwire_spec_draft_tokens_total",
    "tokenwire_spec_accepted_tokens_total",
    "tokenwire_streams_open",
)


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_request(server: Any, conversation: Callable[..., Any], blocks_freed: Callable[[], None]) -> None:
    before = server.scrape()
    c = conversation()
    c.send("m1", text="Metrics are", max_tokens=4, ignore_eos=True, sampling=pb.SamplingParams(temperature=0.0))
    c.send("m2", text="Hi", sampling=pb.SamplingParams(top_p=3.0))
    c.half_close()
    c.read_all()
    blocks_freed()
    after = server.scrape()
    names = {name for name, _ in after}
    assert set(REQUIRED) <= names, set(REQUIRED) - names
    assert value(after, "tokenwire_requests_total", finish_reason="length") == (
        value(before, "tokenwire_requests_total", finish_reason="length") + 1
    )
    assert value(after, "tokenwire_requests_total", finish_reason="error") == (
        value(before, "tokenwire_requests_total", finish_reason="error") + 1
    )
    assert value(after, "tokenwire_request_errors_total", code="INVALID_ARGUMENT") >= 1
    assert value(after, "tokenwire_generation_tokens_total") >= value(before, "tokenwire_generation_tokens_total") + 4
    assert value(after, "tokenwire_prompt_tokens_total") > value(before, "tokenwire_prompt_tokens_total")
    assert value(after, "tokenwire_time_to_first_token_seconds_count") == (
        value(before, "tokenwire_time_to_first_token_seconds_count") + 1
    )
    assert value(after, "tokenwire_inter_token_latency_seconds_count") == (
        value(before, "tokenwire_inter_token_latency_seconds_count") + 3
    )
    assert value(after, "tokenwire_e2e_request_latency_seconds_count") == (
        value(before, "tokenwire_e2e_request_latency_seconds_count") + 2
    )
    assert value(after, "tokenwire_kv_cache_usage_ratio") == 0
    assert value(after, "tokenwire_requests_running") == 0
