"""Fixtures for client tests: a scripted in-process GenerationService on a loopback port."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc


@dataclass
class ServerLog:
    """What the scripted server saw, for tests to assert on."""

    attempts: collections.Counter[str] = field(default_factory=collections.Counter)
    cancels: list[str] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)
    streams: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: dict[str, pb.GenerateRequest] = field(default_factory=dict)


class ScriptedServicer(generation_pb2_grpc.GenerationServiceServicer):
    """A GenerationService whose behaviour is chosen by each request's text prompt.

    Scripts (the prompt text):
        ``count N [DELAY]``: N messages of one token (id i, text "i "), DELAY s apart, then LENGTH.
        ``forever``: a token every 10 ms until cancelled.
        ``error CODE``: an in-band error with that gRPC status number, no tokens.
        ``busy K``: in-band RESOURCE_EXHAUSTED for the request id's first K tries, then ``count 3``.
        ``drop-after N``: N tokens, then the whole stream fails with UNAVAILABLE.
        ``drop-first``: the whole stream fails with UNAVAILABLE on the id's first try; then ``count 3``.
        ``tail-error``: one message carrying a token and an in-band INTERNAL error.
    Token-id prompts produce ``count len(ids)``; chat prompts echo the last message's content.
    """

    def __init__(self, log: ServerLog) -> None:
        self.log = log

    async def Generate(
        self, request_iterator: AsyncIterator[pb.GenerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.log.streams += 1
        self.log.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        out: asyncio.Queue[pb.GenerateResponse | BaseException | None] = asyncio.Queue()
        tasks: dict[str, asyncio.Task[None]] = {}

        async def run(request: pb.GenerateRequest) -> None:
            rid = request.request_id
            try:
                await self._script(request, out)
            except asyncio.CancelledError:
                out.put_nowait(pb.GenerateResponse(request_id=rid, finish_reason=pb.FINISH_REASON_CANCELLED))
                self.log.finished[rid] = "cancelled"
            finally:
                tasks.pop(rid, None)

        async def read() -> None:
            async for request in request_iterator:
                if request.cancel:
                    self.log.cancels.append(request.request_id)
                    task = tasks.get(request.request_id)
                    if task is not None:
                        task.cancel()
                    continue
                self.log.attempts[request.request_id] += 1
                self.log.requests[request.request_id] = request
                tasks[request.request_id] = asyncio.ensure_future(run(request))

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                yield item
        finally:
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()

    async def _script(self, request: pb.GenerateRequest, out: asyncio.Queue) -> None:
        rid = request.request_id
        kind = request.WhichOneof("input")
        if kind == "tokens":
            words = ["count", str(len(request.tokens.ids))]
        elif kind == "chat":
            words = ["echo", request.chat.messages[-1].content]
        else:
            words = request.text.split()
        attempt = self.log.attempts[rid]

        def final(reason: int, **kw: object) -> pb.GenerateResponse:
            self.log.finished[rid] = pb.FinishReason.Name(reason)
            return pb.GenerateResponse(request_id=rid, finish_reason=reason, **kw)

        if words[0] == "echo":
            out.put_nowait(pb.GenerateResponse(request_id=rid, token_ids=[1], text=" ".join(words[1:])))
            out.put_nowait(final(pb.FINISH_REASON_STOP, usage=pb.Usage(prompt_tokens=1, completion_tokens=1)))
            return
        if words[0] == "error":
            out.put_nowait(final(pb.FINISH_REASON_ERROR, error=pb.RequestError(code=int(words[1]), message="scripted")))
            return
        if words[0] == "busy" and attempt <= int(words[1]):
            out.put_nowait(final(pb.FINISH_REASON_ERROR, error=pb.RequestError(code=8, message="queue full")))
            return
        if words[0] == "drop-first" and attempt == 1:
            out.put_nowait(ConnectionError("scripted drop"))
            return
        if words[0] == "tail-error":
            out.put_nowait(
                final(pb.FINISH_REASON_ERROR, token_ids=[7], text="x", error=pb.RequestError(code=13, message="boom"))
            )
            return
        if words[0] in ("busy", "drop-first"):
            words = ["count", "3"]
        if words[0] == "drop-after":
            for i in range(int(words[1])):
                out.put_nowait(pb.GenerateResponse(request_id=rid, token_ids=[i], text=f"{i} "))
            await asyncio.sleep(0.05)
            out.put_nowait(ConnectionError("scripted drop"))
            return
        count = 10**9 if words[0] == "forever" else int(words[1])
        delay = 0.01 if words[0] == "forever" else float(words[2]) if len(words) > 2 else 0.0
        for i in range(count):
            if delay:
                await asyncio.sleep(delay)
            lp = [pb.TokenLogprob(token_id=i, logprob=-0.5, top_logprobs=[pb.TopLogprob(token_id=i, logprob=-0.5)])]
            out.put_nowait(
                pb.GenerateResponse(
                    request_id=rid, token_ids=[i], text=f"{i} ", logprobs=lp if request.logprobs else []
                )
            )
        out.put_nowait(final(pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=2, completion_tokens=count)))

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        if request.WhichOneof("input") == "chat":
            return pb.TokenizeResponse(token_ids=[len(m.content) for m in request.chat.messages])
        if request.text == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "scripted invalid")
        return pb.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model_name="scripted", architecture="none", vocab_size=100, max_context_length=64,
            eos_token_ids=[0], dtype="float32", device="cpu", kv_block_size=16, kv_blocks_total=8,
            max_num_seqs=4, has_chat_template=True,
        )


class ScriptedServer:
    """The scripted service on 127.0.0.1, running on its own event-loop thread."""

    def __init__(self, address: str = "127.0.0.1:0", options: tuple[tuple[str, int], ...] = ()) -> None:
        """Listen on ``address`` (a free loopback port by default, or ``unix:PATH``) with gRPC ``options``."""
        self.log = ServerLog()
        self.options = options
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(address), self.loop).result(10)
        self.target = address if address.startswith("unix:") else f"127.0.0.1:{self.port}"

    async def _start(self, address: str) -> int:
        self.server = grpc.aio.server(options=self.options)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(ScriptedServicer(self.log), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        port = self.server.add_insecure_port(address)
        await self.server.start()
        return port

    def reset(self) -> ServerLog:
        """Start a fresh log (the servicer keeps writing into the same object)."""
        fresh = ServerLog()
        self.log.__dict__.update(fresh.__dict__)
        return self.log

    def wait(self, predicate: Callable[[ServerLog], bool], timeout: float = 10.0) -> None:
        """Block until the log satisfies ``predicate`` (fails the test after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.log):
            if time.monotonic() > deadline:
                pytest.fail(f"server log never satisfied the condition: {self.log}")
            time.sleep(0.01)

    async def async_wait(self, predicate: Callable[[ServerLog], bool], timeout: float = 10.0) -> None:
        """Like ``wait``, letting the caller's event loop run meanwhile."""
        deadline = time.monotonic() + timeout
        while not predicate(self.log):
            if time.monotonic() > deadline:
                pytest.fail(f"server log never satisfied the condition: {self.log}")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[ScriptedServer]:
    """One scripted server per test module."""
    server = ScriptedServer()
    yield server
    server.stop()


@pytest.fixture
def scripted(scripted_server: ScriptedServer) -> ScriptedServer:
    """The module's scripted server with a fresh log."""
    scripted_server.reset()
    return scripted_server


@pytest.fixture
def scripted_server_factory() -> Iterator[Callable[..., ScriptedServer]]:
    """Make extra scripted servers (replicas), stopped after the test."""
    servers: list[ScriptedServer] = []

    def make(address: str = "127.0.0.1:0", options: tuple[tuple[str, int], ...] = ()) -> ScriptedServer:
        servers.append(ScriptedServer(address, options))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
