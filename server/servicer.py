"""The GenerationService servicer: thin, typed grpc.aio handlers over the engine."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc
from grpc import aio

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc as pb_grpc
from tokenwire.engine.errors import EngineError
from tokenwire.engine.info import EngineStats
from tokenwire.server.convert import (
    ServerUnavailableError,
    model_info_to_pb,
    status_code_for,
    tokenize_input_from_pb,
)
from tokenwire.server.logging import RequestLog
from tokenwire.server.metrics import ServerMetrics
from tokenwire.server.refuse import refuse_request_stream
from tokenwire.server.stream import GenerateStream

if TYPE_CHECKING:
    from tokenwire.engine.async_engine import AsyncEngine

_DRAIN_POLL_S = 0.05


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves tokenwire.v1.GenerationService.

    Refuses calls with UNAVAILABLE until an engine is attached and once draining has begun.

    Args:
        request_log: writes one line per finished request.
        metrics: request histograms and counters (None: not kept).
        engine: the engine, if already loaded; otherwise `attach_engine` later.
        max_calls: most of this service's calls at once (Generate streams, Tokenize, GetModelInfo);
            more get RESOURCE_EXHAUSTED. None: no limit.
    """

    def __init__(
        self,
        request_log: RequestLog,
        metrics: ServerMetrics | None = None,
        engine: AsyncEngine | None = None,
        max_calls: int | None = None,
    ) -> None:
        self._engine = engine
        # NOTE: counted here rather than by grpc's maximum_concurrent_rpcs, which counts health
        # checks and reflection too: with every slot held by a client's long-lived Generate
        # stream, the kubelet's probes were refused and a working pod restarted.
        self._max_calls = max_calls
        self._calls = 0
        self._request_log = request_log
        self._metrics = metrics
        self._draining = False
        self._streams: set[GenerateStream] = set()
        # NOTE: stream request ids are only unique within a stream; engine ids must be unique across
        # the engine, which several servers (and restarts of this one) may share.
        self._stream_prefix = uuid.uuid4().hex[:8]
        self._stream_numbers = itertools.count(1)

    @property
    def engine(self) -> AsyncEngine | None:
        """The attached engine, or None while the model loads."""
        return self._engine

    @property
    def draining(self) -> bool:
        """True once `begin_drain` has been called."""
        return self._draining

    @property
    def num_open_requests(self) -> int:
        """Generations started on open streams that have not had their final message yet."""
        return sum(s.num_open for s in self._streams)

    def attach_engine(self, engine: AsyncEngine) -> None:
        """Start serving with ``engine`` (started by the caller)."""
        self._engine = engine

    def engine_stats(self) -> EngineStats | None:
        """The engine's stats, or None while no engine is attached (the metrics source)."""
        return None if self._engine is None else self._engine.stats()

    def begin_drain(self) -> None:
        """Refuse new streams and requests; end each open stream once its requests finish."""
        self._draining = True
        for stream in list(self._streams):
            stream.drain()

    def abort_all(self) -> None:
        """Finish every open request now with UNAVAILABLE (the grace period is over)."""
        error = ServerUnavailableError("the server shut down before the request finished")
        for stream in list(self._streams):
            stream.abort_all(error)

    async def wait_streams_closed(self, timeout: float | None, interrupt: asyncio.Event | None = None) -> bool:
        """Wait until every open stream has ended; True if they all did within ``timeout`` seconds.

        Args:
            timeout: seconds to wait at most (None: no limit).
            interrupt: stop waiting early when this event is set (a second signal).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # NOTE: polled, not awaited per stream: streams end in any order, the set shrinks as they
        # do, and a drain tolerates a twentieth of a second.
        while any(not s.closed.is_set() for s in self._streams):
            if interrupt is not None and interrupt.is_set():
                return False
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.sleep(_DRAIN_POLL_S if remaining is None else min(_DRAIN_POLL_S, remaining))
        return True

    # ---- RPCs ------------------------------------------------------------------------------

    async def Generate(  # noqa: N802 - the proto's method name
        self,
        request_iterator: AsyncIterator[pb.GenerateRequest],
        context: aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse],
    ) -> None:
        """Serve one multiplexed stream of generation requests and cancels (see GenerateStream)."""
        unready = self._unready_error()
        if unready is not None:
            await refuse_request_stream(request_iterator, context, status_code_for(unready), str(unready))
        engine = await self._ready_engine(context)
        async with self._call_slot(context, request_iterator):
            stream_id = f"{self._stream_prefix}-{next(self._stream_numbers)}"
            stream = GenerateStream(engine, stream_id, context.peer(), self._metrics, self._request_log)
            self._streams.add(stream)
            if self._metrics is not None:
                self._metrics.streams_open.inc()
            try:
                await stream.run(request_iterator, context)
            finally:
                self._streams.discard(stream)
                if self._metrics is not None:
                    self._metrics.streams_open.dec()

    async def Tokenize(  # noqa: N802 - the proto's method name
        self,
        request: pb.TokenizeRequest,
        context: aio.ServicerContext[pb.TokenizeRequest, pb.TokenizeResponse],
    ) -> pb.TokenizeResponse:
        """Token ids of a text or a chat."""
        engine = await self._ready_engine(context)
        async with self._call_slot(context):
            try:
                text, messages = tokenize_input_from_pb(request)
                # NOTE: a long text takes a while to tokenize; keep the event loop serving meanwhile.
                ids = await asyncio.to_thread(engine.tokenize, text=text, messages=messages)
            except EngineError as exc:
                await _abort(context, exc)
            return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(  # noqa: N802 - the proto's method name
        self,
        request: pb.GetModelInfoRequest,
        context: aio.ServicerContext[pb.GetModelInfoRequest, pb.GetModelInfoResponse],
    ) -> pb.GetModelInfoResponse:
        """Describe the served model and the KV cache."""
        engine = await self._ready_engine(context)
        async with self._call_slot(context):
            return model_info_to_pb(engine.model_info)

    @contextlib.asynccontextmanager
    async def _call_slot(
        self, context: aio.ServicerContext, requests: AsyncIterator[pb.GenerateRequest] | None = None
    ) -> AsyncIterator[None]:
        """Hold one of the max_calls slots for the call's life; at the limit, end the call with
        RESOURCE_EXHAUSTED (a request stream's after its first message, see refuse_request_stream)."""
        if self._max_calls is not None and self._calls >= self._max_calls:
            details = (
                f"the server is at its limit of {self._max_calls} concurrent calls "
                "(max_concurrent_rpcs); retry later or on another replica"
            )
            if requests is not None:
                await refuse_request_stream(requests, context, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1

    def _unready_error(self) -> ServerUnavailableError | None:
        """Why no call can be served now (draining, or the model still loading), or None."""
        if self._draining:
            return ServerUnavailableError("the server is shutting down; retry on another replica")
        if self._engine is None:
            return ServerUnavailableError("the model is still loading; retry shortly")
        return None

    async def _ready_engine(self, context: aio.ServicerContext) -> AsyncEngine:
        unready = self._unready_error()
        if unready is not None:
            await _abort(context, unready)
        assert self._engine is not None  # NOTE: for the type checker: _unready_error saw it set.
        return self._engine


async def _abort(context: aio.ServicerContext, error: EngineError) -> NoReturn:
    """End the call with the status that reports ``error`` (the one mapping lives in convert)."""
    await context.abort(status_code_for(error), str(error))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

