"""`python -m tokenwire.server` as a process: health while loading, SIGTERM drain, exit 0, request logs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

GREEDY = pb.SamplingParams(temperature=0.0)
SERVICE = "tokenwire.v1.GenerationService"


@pytest.fixture()
def server_process(tmp_path: Path, pick_port: Callable[[], int]) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = pick_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenwire.server", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "0", "--kv-cache-memory", "64MiB", "--grace-period", "120"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield proc, f"127.0.0.1:{port}", log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def health_status(health: health_pb2_grpc.HealthStub, service: str = "") -> int | None:
    """The reported status, or None while the server does not answer yet."""
    try:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None
        raise


def test_sigterm_drains_open_requests_then_exits_0(
    server_process: tuple[subprocess.Popen[bytes], str, Path],
    conversation: Callable[..., Any],
    wait_for: Callable[..., None],
) -> None:
    proc, address, log_path = server_process
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.GenerationServiceStub(channel)
        statuses: list[int | None] = []
        loading_code: list[grpc.StatusCode] = []

        def serving() -> bool:
            status = health_status(health)
            statuses.append(status)
            if status == health_pb2.HealthCheckResponse.NOT_SERVING and not loading_code:
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
                loading_code.append(err.value.code())
            assert proc.poll() is None, log_path.read_text()
            return status == health_pb2.HealthCheckResponse.SERVING

        wait_for(serving, timeout=300, what="the model to load")
        # Listening came first, with NOT_SERVING and UNAVAILABLE calls while the model loaded.
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        assert loading_code == [grpc.StatusCode.UNAVAILABLE]
        assert health_status(health, "liveness") == health_pb2.HealthCheckResponse.SERVING

        c = conversation(on=stub)
        c.send("a", text="Tell me about the sea.", max_tokens=48, ignore_eos=True, sampling=GREEDY)
        c.read_until(lambda r: r.request_id == "a")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health_status(health) == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
        assert health_status(health, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(health, "liveness") == health_pb2.HealthCheckResponse.SERVING
        # New streams, calls and requests are refused while the open request finishes.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(iter([pb.GenerateRequest(request_id="x", text="Hi")]), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        c.send("b", text="Hi", max_tokens=2)
        with pytest.raises(grpc.RpcError) as err:
            c.read_all()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the stream ends once "a" is done
        grouped = c.by_request()
        final_a = c.final_of(grouped["a"])
        assert final_a.finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(m.token_ids) for m in grouped["a"]) == 48
        [refused] = grouped["b"]
        assert refused.finish_reason == pb.FINISH_REASON_ERROR
        assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]

    assert proc.wait(timeout=120) == 0

    # Logs are JSON off a terminal: one line per finished request, without prompt or output.
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    [line_a] = [e for e in events if e.get("event") == "request finished" and e.get("request_id") == "a"]
    assert line_a["finish_reason"] == "length" and line_a["completion_tokens"] == 48
    assert line_a["prompt_tokens"] > 0 and line_a["ttft_s"] > 0 and line_a["duration_s"] >= line_a["ttft_s"]
    assert line_a["peer"].startswith("ipv4:127.0.0.1:")
    assert "prompt" not in line_a and "output" not in line_a
    [line_b] = [e for e in events if e.get("event") == "request finished" and e.get("request_id") == "b"]
    assert line_b["error_code"] == "UNAVAILABLE"
    assert any(e.get("event") == "stopped" for e in events)
