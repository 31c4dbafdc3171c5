"""Prometheus metrics on their own registry and HTTP port: request histograms and engine gauges."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenwire.engine.info import EngineStats
from tokenwire.engine.outputs import RequestOutput

# Bucket bounds in seconds, spanning a fast GPU to a busy CPU.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass
class RequestTimings:
    """Clock readings of one request as the servicer sees its outputs (monotonic seconds)."""

    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token, or None if none came."""
        return None if self.first_token is None else self.first_token - self.started

    def duration(self, now: float | None = None) -> float:
        """Seconds since arrival."""
        return (time.monotonic() if now is None else now) - self.started


class ServerMetrics:
    """The server's metrics, registered on a private registry (so tests and embedders never clash).

    Histograms and request counters are observed by the servicer; engine gauges and counters are
    read from ``stats_source()`` at scrape time, so they cost nothing between scrapes.

    Args:
        stats_source: returns the engine's current stats, or None while no engine is loaded.
        registry: where to register; a fresh one by default.
    """

    def __init__(self, stats_source: Callable[[], EngineStats | None], registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests_total = Counter(
            "tokenwire_requests",
            "Finished requests by finish reason.",
            ["finish_reason"],
            registry=self.registry,
        )
        self.request_errors_total = Counter(
            "tokenwire_request_errors",
            "Requests that finished with an error, by gRPC status code name.",
            ["code"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "tokenwire_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "tokenwire_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of a request.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "tokenwire_e2e_request_latency_seconds",
            "Seconds from a request's arrival to its final message.",
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.streams_open = Gauge(
            "tokenwire_streams_open",
            "Generate streams currently open.",
            registry=self.registry,
        )
        self.registry.register(EngineStatsCollector(stats_source))

    def observe_output(self, timings: RequestTimings, out: RequestOutput, now: float | None = None) -> None:
        """Record the arrival of one output's tokens (time to first token, inter-token latency)."""
        count = len(out.token_ids)
        if count == 0:
            return
        now = time.monotonic() if now is None else now
        if timings.last_token is None:
            timings.first_token = now
            self.time_to_first_token.observe(now - timings.started)
            count -= 1
        elif count:
            # NOTE: tokens that arrive together (a lagging reader's merged output) share the gap
            # evenly, so the histogram still counts one sample per token.
            gap = (now - timings.last_token) / count
            for _ in range(count):
                self.inter_token_latency.observe(gap)
        timings.last_token = now

    def observe_finished(self, timings: RequestTimings, finish_reason: str, error_code: str | None) -> None:
        """Record a request's end."""
        self.requests_total.labels(finish_reason=finish_reason).inc()
        if error_code is not None:
            self.request_errors_total.labels(code=error_code).inc()
        self.e2e_request_latency.observe(timings.duration())


class EngineStatsCollector(Collector):
    """Exposes ``EngineStats`` as gauges and counters, read when Prometheus scrapes."""

    def __init__(self, stats_source: Callable[[], EngineStats | None]) -> None:
        self._stats_source = stats_source

    def collect(self) -> Iterator[Metric]:
        """Yield the engine's metrics (nothing while no engine is loaded)."""
        stats = self._stats_source()
        if stats is None:
            return
        gauges = (
            ("tokenwire_requests_running", "Requests in the running batch.", stats.num_running),
            ("tokenwire_requests_waiting", "Requests waiting for admission.", stats.num_waiting),
            ("tokenwire_kv_cache_usage_ratio", "Fraction of KV blocks held by live requests.", stats.kv_cache_usage),
            ("tokenwire_kv_cache_blocks_used", "KV blocks held by live requests.", stats.kv_blocks_used),
            ("tokenwire_kv_cache_blocks_total", "KV blocks in the pool.", stats.kv_blocks_total),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("tokenwire_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
             stats.prefix_cache_queried_tokens),
            ("tokenwire_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
             stats.prefix_cache_hit_tokens),
            ("tokenwire_preemptions", "Sequences preempted to free KV blocks.", stats.num_preemptions),
            ("tokenwire_prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens_total),
            ("tokenwire_generation_tokens", "Tokens generated.", stats.generation_tokens_total),
            ("tokenwire_spec_draft_tokens", "Draft tokens proposed by speculative decoding.", stats.draft_tokens_total),
            ("tokenwire_spec_accepted_tokens", "Draft tokens the model confirmed.", stats.accepted_draft_tokens_total),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class MetricsHTTPServer:
    """The Prometheus text endpoint on its own port, served from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return int(self._httpd.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
