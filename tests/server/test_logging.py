"""Structured logs: JSON off a terminal, console on one; request content only when asked for."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import structlog

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc as pb_grpc
from tokenwire.engine.outputs import Usage
from tokenwire.server.logging import RequestLog, configure_logging


class TerminalBuffer(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture()
def log_buffer() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    configure_logging("auto", "info", stream=buffer)  # not a terminal: JSON
    yield buffer
    structlog.reset_defaults()


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def finish(log: RequestLog) -> None:
    log.finished(
        request_id="r1", stream_id="s-1", peer="ipv4:127.0.0.1:1", finish_reason="stop", usage=Usage(5, 3, 2),
        ttft=0.01234567, duration=0.5, prompt="secret prompt", output="secret output",
    )


def test_request_line_is_json_without_content_by_default(log_buffer: io.StringIO) -> None:
    finish(RequestLog(log_content=False))
    [line] = json_lines(log_buffer)
    assert line["event"] == "request finished" and line["level"] == "info"
    assert (line["request_id"], line["peer"], line["finish_reason"]) == ("r1", "ipv4:127.0.0.1:1", "stop")
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_prompt_tokens"]) == (5, 3, 2)
    assert line["ttft_s"] == 0.0123 and line["duration_s"] == 0.5
    assert "secret" not in log_buffer.getvalue()


def test_content_is_logged_when_asked(log_buffer: io.StringIO) -> None:
    finish(RequestLog(log_content=True))
    [line] = json_lines(log_buffer)
    assert (line["prompt"], line["output"]) == ("secret prompt", "secret output")


def test_console_on_a_terminal_and_levels_filter() -> None:
    terminal = TerminalBuffer()
    configure_logging("auto", "warning", stream=terminal)
    try:
        finish(RequestLog())  # info: below the level
        structlog.get_logger("t").warning("disk low", free_mb=3)
    finally:
        structlog.reset_defaults()
    text = terminal.getvalue()
    assert "disk low" in text and "free_mb" in text and "request finished" not in text
    assert not text.lstrip().startswith("{")
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "verbose")


@pytest.mark.slow
def test_server_logs_prompt_and_output_with_the_flag(
    start_server: Callable[..., Any], log_buffer: io.StringIO
) -> None:
    running = start_server(log_requests_content=True)
    request = pb.GenerateRequest(
        request_id="c1", text="Knock knock.", max_tokens=2, ignore_eos=True, sampling=pb.SamplingParams(temperature=0)
    )
    with grpc.insecure_channel(running.address) as channel:
        responses = list(pb_grpc.GenerationServiceStub(channel).Generate(iter([request]), timeout=60))
    [line] = [e for e in json_lines(log_buffer) if e.get("request_id") == "c1"]
    assert line["prompt"] == "Knock knock."
    assert line["output"] == "".join(r.text for r in responses)


def test_request_cut_off_without_usage_logs_the_tokens_sent(log_buffer: io.StringIO) -> None:
    RequestLog().finished(
        request_id="r2", stream_id="s-1", peer="p", finish_reason="cancelled", usage=None,
        ttft=None, duration=0.1, completion_tokens=7,
    )
    [line] = json_lines(log_buffer)
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_prompt_tokens"]) == (None, 7, None)


@pytest.mark.slow
def test_disconnect_logs_cancelled_with_the_tokens_the_client_got(
    start_server: Callable[..., Any], log_buffer: io.StringIO
) -> None:
    running = start_server()
    request = pb.GenerateRequest(
        request_id="gone", text="Count to a thousand:", max_tokens=400, ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0),
    )
    received = 0
    with grpc.insecure_channel(running.address) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(iter([request]), timeout=60)
        for response in call:
            received += len(response.token_ids)
            if received >= 3:
                call.cancel()  # the client walks away mid-generation
                break
    for _ in range(100):
        lines = [e for e in json_lines(log_buffer) if e.get("request_id") == "gone"]
        if lines:
            break
        time.sleep(0.05)
    [line] = lines
    assert line["finish_reason"] == "cancelled"
    assert received <= line["completion_tokens"] < 400
