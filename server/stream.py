"""One Generate stream: a reader task, a task per generation, and one merged queue of responses."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc import aio

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.engine.errors import DuplicateRequestError, EngineError
from tokenwire.engine.outputs import FinishReason, RequestOutput
from tokenwire.engine.request import GenerationRequest
from tokenwire.server.convert import (
    ServerUnavailableError,
    chat_from_pb,
    check_request_id,
    error_output,
    finish_reason_label,
    generation_request_from_pb,
    output_to_pb,
    status_code_for,
)
from tokenwire.server.logging import RequestLog, get_logger
from tokenwire.server.metrics import RequestTimings, ServerMetrics

_log = get_logger("tokenwire.stream")
# Requests with an answer waiting to be sent, past which the stream stops reading new messages.
MAX_UNSENT_RESPONSES = 1024


class GenerationEngine(Protocol):
    """The part of AsyncEngine a stream uses."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; the last has finish_reason set."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request (harmless for unknown ids)."""
        ...


@dataclass
class _Request:
    """One generation of this stream, from arrival to its final message."""

    request_id: str  # the client's key, echoed on every message
    engine_id: str  # unique across the server
    timings: RequestTimings = field(default_factory=RequestTimings)
    pending: RequestOutput | None = None  # what the writer has not sent yet (merged)
    task: asyncio.Task[None] | None = None
    finished: bool = False
    prompt: object = None  # kept only when request content is logged
    output_text: list[str] | None = None
    # Tokens handed to the writer so far: the log's count when the client leaves before the
    # engine's final output (with its usage) arrives.
    completion_tokens: int = 0


class GenerateStream:
    """Multiplexes one bidirectional Generate call onto the engine.

    The reader consumes the client's messages and starts one task per generation; each task
    merges its outputs into its request's pending response and queues the request once; the
    writer sends one message per queued request with everything pending for it. So a slow reader
    costs memory per request, not per token, and responses keep their order within a request.

    Args:
        engine: where generations run.
        stream_id: unique across the server; prefixes engine request ids.
        peer: the client's address, for logs.
        metrics: where request histograms go (None: none kept).
        request_log: writes the line per finished request.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        stream_id: str,
        peer: str,
        metrics: ServerMetrics | None,
        request_log: RequestLog,
    ) -> None:
        self._engine = engine
        self.stream_id = stream_id
        self._peer = peer
        self._metrics = metrics
        self._request_log = request_log
        self._open: dict[str, _Request] = {}
        # NOTE: holds a request at most once at a time (when its pending output goes from empty to
        # not), so it is bounded by the number of open requests; None ends the writer.
        self._ready: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._half_closed = False
        self._draining = False
        self._ending = False
        self._reader_error: BaseException | None = None
        self._numbers = itertools.count(1)
        self._written = asyncio.Event()
        self.closed = asyncio.Event()

    @property
    def num_open(self) -> int:
        """Requests started on this stream that have not had their final message yet."""
        return len(self._open)

    async def run(self, request_iterator: AsyncIterator[pb.GenerateRequest], context: aio.ServicerContext) -> None:
        """Serve the stream until the client half-closes and every open request has finished.

        Cancellation (client cancel, disconnect, deadline) aborts every open request.
        """
        reader = asyncio.create_task(self._read(request_iterator), name=f"tokenwire-read-{self.stream_id}")
        try:
            while True:
                req = await self._ready.get()
                if req is None:
                    break
                out, req.pending = req.pending, None
                if out is not None:
                    await context.write(output_to_pb(req.request_id, out))
                self._written.set()
            if self._reader_error is not None:
                await context.abort(grpc.StatusCode.INTERNAL, "reading the request stream failed")
            if self._draining and not self._half_closed:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "the server is shutting down; open a new stream to another replica"
                )
        finally:
            reader.cancel()
            self._abandon_open_requests()
            self.closed.set()

    def drain(self) -> None:
        """Refuse new requests (in-band UNAVAILABLE) and end the stream once the open ones finish."""
        self._draining = True
        self._maybe_end()

    def abort_all(self, error: EngineError) -> None:
        """Finish every open request now with ``error`` (the server is going away)."""
        for req in list(self._open.values()):
            self._emit(req, error_output(req.request_id, error))
            if req.task is not None:
                req.task.cancel()  # NOTE: leaving engine.generate aborts the engine request.

    # ---- reading ---------------------------------------------------------------------------

    async def _read(self, request_iterator: AsyncIterator[pb.GenerateRequest]) -> None:
        try:
            async for message in request_iterator:
                self._handle(message)
                # NOTE: backpressure: a client that sends without reading would otherwise grow the
                # queue of unsent answers (refusals, first outputs) without bound.
                while self._ready.qsize() >= MAX_UNSENT_RESPONSES:
                    self._written.clear()
                    await self._written.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends the stream with INTERNAL
            if self._ending:
                return  # NOTE: the server ended the call (drain); reading fails as it goes down.
            _log.exception("request stream failed", stream_id=self.stream_id, peer=self._peer)
            self._reader_error = exc
            self._end()
            return
        self._half_closed = True
        self._maybe_end()

    def _handle(self, message: pb.GenerateRequest) -> None:
        rid = message.request_id
        if message.cancel:
            self._cancel(rid)
            return
        # NOTE: numbered, so that an id reused after its final message never meets the engine's
        # record of the earlier request while that one is still being torn down.
        req = _Request(request_id=rid, engine_id=f"{self.stream_id}/{next(self._numbers)}/{rid}")
        if self._request_log.log_content:
            req.prompt = _prompt_for_log(message)
            req.output_text = []
        try:
            check_request_id(rid)
            if self._draining:
                raise ServerUnavailableError("the server is shutting down; send the request to another replica")
            if rid in self._open:
                # NOTE: the open request goes on; this message's error is the rejected duplicate's
                # one final message (clients tell them apart by the ALREADY_EXISTS code).
                raise DuplicateRequestError(f"request_id {rid!r} is already open on this stream")
            generation = generation_request_from_pb(message, req.engine_id)
        except EngineError as exc:
            self._emit(req, error_output(rid, exc))
            return
        self._open[rid] = req
        req.task = asyncio.create_task(self._generate(req, generation), name=f"tokenwire-gen-{req.engine_id}")

    def _cancel(self, request_id: str) -> None:
        req = self._open.get(request_id)
        if req is None:
            return  # NOTE: unknown or already finished: cancelling is harmless by contract.
        # NOTE: the engine answers an abort with the request's CANCELLED final output (with usage).
        # call_soon queues the abort behind the generation task's first step, which submits the
        # request to the engine; a direct call could reach the engine before the request does.
        asyncio.get_running_loop().call_soon(self._engine.abort, req.engine_id)

    # ---- generating ------------------------------------------------------------------------

    async def _generate(self, req: _Request, generation: GenerationRequest) -> None:
        try:
            async for out in self._engine.generate(generation):
                self._emit(req, out)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - reported in-band; the stream goes on
            _log.exception("generation failed", request_id=req.request_id, stream_id=self.stream_id)
            self._emit(req, error_output(req.request_id, EngineError("internal error while generating")))
        if not req.finished:
            self._emit(req, error_output(req.request_id, EngineError("the engine ended the request without a result")))

    def _emit(self, req: _Request, out: RequestOutput) -> None:
        """Hand one output of ``req`` to the writer, merging it with what is still unsent."""
        if req.finished:
            return  # NOTE: after the final message nothing more may go out for this request.
        if self._metrics is not None:
            self._metrics.observe_output(req.timings, out)
        req.completion_tokens += len(out.token_ids)
        if req.output_text is not None:
            req.output_text.append(out.text)
        if req.pending is None:
            req.pending = out
            self._ready.put_nowait(req)
        else:
            req.pending.merge(out)
        if out.finished:
            req.finished = True
            if self._open.get(req.request_id) is req:
                del self._open[req.request_id]
            self._record_finished(req, out)
            self._maybe_end()

    def _maybe_end(self) -> None:
        if not self._open and (self._half_closed or self._draining):
            self._end()

    def _end(self) -> None:
        if not self._ending:
            self._ending = True
            self._ready.put_nowait(None)

    # ---- finishing -------------------------------------------------------------------------

    def _abandon_open_requests(self) -> None:
        """The stream is gone (cancel, disconnect, deadline, shutdown): abort what is still open."""
        for req in list(self._open.values()):
            if req.task is not None:
                req.task.cancel()  # NOTE: leaving engine.generate aborts the engine request.
            req.finished = True
            self._record_finished(req, RequestOutput(req.request_id, finish_reason=FinishReason.CANCELLED))
        self._open.clear()

    def _record_finished(self, req: _Request, final: RequestOutput) -> None:
        reason = finish_reason_label(final.finish_reason)
        code: str | None = None
        message: str | None = None
        if final.finish_reason is FinishReason.ERROR:
            error = final.error if final.error is not None else EngineError("the request failed")
            code = status_code_for(error).name
            message = str(error)
        if self._metrics is not None:
            self._metrics.observe_finished(req.timings, reason, code)
        self._request_log.finished(
            request_id=req.request_id,
            stream_id=self.stream_id,
            peer=self._peer,
            finish_reason=reason,
            usage=final.usage,
            completion_tokens=req.completion_tokens,
            ttft=req.timings.ttft,
            duration=req.timings.duration(),
            error_code=code,
            error_message=message,
            prompt=req.prompt,
            output=None if req.output_text is None else "".join(req.output_text),
        )


def _prompt_for_log(message: pb.GenerateRequest) -> Any:
    """The prompt as it is logged with --log-requests-content."""
    kind = message.WhichOneof("input")
    if kind == "text":
        return message.text
    if kind == "tokens":
        return list(message.tokens.ids)
    if kind == "chat":
        return chat_from_pb(message.chat)
    return None

