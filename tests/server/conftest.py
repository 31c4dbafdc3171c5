"""Fixtures for server tests: the real default model, real grpc.aio servers on loopback ports."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc as pb_grpc
from tokenwire.engine.config import EngineArgs
from tokenwire.server.app import TokenwireServer
from tokenwire.server.settings import Settings

_T = TypeVar("_T")
# A small KV pool keeps memory modest and makes "prompt longer than the context" cheap to provoke.
TEST_KV_CACHE_BYTES = 64 * 1024 * 1024


class LoopThread:
    """An asyncio loop in a daemon thread: the servers run there, tests call them synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 300.0) -> _T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    """A started TokenwireServer and how to reach it."""

    server: TokenwireServer
    address: str

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The metrics endpoint's samples, keyed by (name, sorted labels)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


class Conversation:
    """One Generate stream driven step by step from a test: send, cancel, half-close, read."""

    def __init__(self, stub: pb_grpc.GenerationServiceStub, **call_kwargs: Any) -> None:
        self._outbox: queue.Queue[pb.GenerateRequest | None] = queue.Queue()
        self.call = stub.Generate(self._requests(), **call_kwargs)
        self.responses: list[pb.GenerateResponse] = []

    def _requests(self) -> Iterator[pb.GenerateRequest]:
        while (message := self._outbox.get()) is not None:
            yield message

    def send(self, request_id: str, **fields: Any) -> None:
        self._outbox.put(pb.GenerateRequest(request_id=request_id, **fields))

    def cancel(self, request_id: str) -> None:
        self._outbox.put(pb.GenerateRequest(request_id=request_id, cancel=True))

    def half_close(self) -> None:
        self._outbox.put(None)

    def next(self) -> pb.GenerateResponse:
        response = next(self.call)
        self.responses.append(response)
        return response

    def read_until(self, predicate: Callable[[pb.GenerateResponse], bool]) -> pb.GenerateResponse:
        """Read until a response satisfies ``predicate``; return it."""
        while True:
            response = self.next()
            if predicate(response):
                return response

    def by_request(self) -> dict[str, list[pb.GenerateResponse]]:
        """The responses read so far, grouped by request id, in arrival order."""
        grouped: dict[str, list[pb.GenerateResponse]] = {}
        for r in self.responses:
            grouped.setdefault(r.request_id, []).append(r)
        return grouped

    @staticmethod
    def final_of(messages: list[pb.GenerateResponse]) -> pb.GenerateResponse:
        """Assert exactly one final message, and that it is the last; return it."""
        finals = [i for i, m in enumerate(messages) if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
        assert finals == [len(messages) - 1], f"finals at {finals} of {len(messages)} messages"
        return messages[-1]

    def read_all(self) -> list[pb.GenerateResponse]:
        """Read to the end of the stream (raises grpc.RpcError if it ends with an error)."""
        for response in self.call:
            self.responses.append(response)
        return self.responses


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds (not a timing assertion: the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def engine(loop_thread: LoopThread, default_model_bf16: Any) -> Iterator[Any]:
    """The real default model (the session's shared bfloat16 copy) in a started AsyncEngine."""
    from tokenwire.engine.async_engine import AsyncEngine

    args = EngineArgs(kv_cache_memory=TEST_KV_CACHE_BYTES, max_num_seqs=16, max_queued_requests=64)
    eng = AsyncEngine(args, loaded=default_model_bf16)
    loop_thread.run(eng.start())
    yield eng
    loop_thread.run(eng.shutdown())


@pytest.fixture(scope="session")
def start_server(loop_thread: LoopThread, engine: Any) -> Iterator[Callable[..., RunningServer]]:
    """Start a server with the given Settings fields on a free loopback port, sharing ``engine``."""
    started: list[TokenwireServer] = []

    def start(engine_override: Any = None, **fields: Any) -> RunningServer:
        fields.setdefault("host", "127.0.0.1")
        fields.setdefault("port", 0)
        fields.setdefault("metrics_port", 0)
        fields.setdefault("grace_period", 5.0)
        server = TokenwireServer(Settings(**fields), engine=engine_override or engine)
        loop_thread.run(server.start())
        loop_thread.run(server.load_engine())
        started.append(server)
        address = f"unix:{fields['unix_socket']}" if fields.get("unix_socket") else f"127.0.0.1:{server.port}"
        return RunningServer(server, address)

    yield start
    for server in started:
        loop_thread.run(server.close())


@pytest.fixture(scope="session")
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """The shared plain server (with metrics) most tests talk to."""
    return start_server(metrics_port=free_port())


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.GenerationServiceStub:
    return pb_grpc.GenerationServiceStub(channel)


@pytest.fixture()
def conversation(request: pytest.FixtureRequest) -> Iterator[Callable[..., Conversation]]:
    """Open Generate streams (on the shared server unless ``on`` names a stub); cancelled afterwards."""
    opened: list[Conversation] = []

    def open_stream(on: pb_grpc.GenerationServiceStub | None = None, **call_kwargs: Any) -> Conversation:
        call_kwargs.setdefault("timeout", 300)
        # NOTE: the shared server (and its model) is only started when a test needs it.
        c = Conversation(on or request.getfixturevalue("stub"), **call_kwargs)
        opened.append(c)
        return c

    yield open_stream
    for c in opened:
        c.half_close()
        c.call.cancel()


@pytest.fixture()
def blocks_freed(engine: Any) -> Callable[[], None]:
    """Wait until no KV block is held by a live request (freed within a step of the end)."""

    def check() -> None:
        wait_until(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0,
                 timeout=30, what="all KV blocks to be freed")

    return check


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    """Poll a condition until it holds (the timeout only bounds a hang)."""
    return wait_until


@pytest.fixture(scope="session")
def pick_port() -> Callable[[], int]:
    """A TCP port that was free a moment ago."""
    return free_port
