"""Many generations over few Generate streams: routing by request id, cancels, deadlines, retries, reconnects."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Union

import grpc
import grpc.aio

from tokenwire.client.convert import cancel_request
from tokenwire.client.endpoints import Replica, ReplicaSet
from tokenwire.client.errors import (
    AlreadyExistsError,
    ClientClosedError,
    DeadlineExceededError,
    TokenwireError,
    UnavailableError,
    error_from_code,
    error_from_rpc,
)
from tokenwire.client.v1 import generation_pb2 as pb

QueueItem = Union[pb.GenerateResponse, TokenwireError]
"""What a request's queue holds: the server's messages, then possibly one terminal error."""


@dataclass(eq=False)
class PendingRequest:
    """The client-side state of one generation, from submission until it settles.

    Attributes:
        request: the message that starts it (re-sent as is on a retry).
        queue: its messages and, if it fails, one terminal error, in order.
        timeout: seconds from submission until it is cancelled with DeadlineExceededError.
        started: a message with tokens has reached the caller, so it is never retried.
        abandoned: the caller is gone (cancel, deadline, early exit); later messages are dropped.
        settled: it is off every stream and out of the id registry.
        attempts: tries so far.
        stream: the stream it is open on, if any.
        deadline_timer: fires at the timeout.
        retry_timer: fires when the next try is due.
    """

    request: pb.GenerateRequest
    timeout: float | None = None
    queue: asyncio.Queue[QueueItem] = field(default_factory=asyncio.Queue)
    started: bool = False
    abandoned: bool = False
    settled: bool = False
    attempts: int = 0
    stream: MuxStream | None = None
    deadline_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    retry_timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def request_id(self) -> str:
        """The request's id on the wire."""
        return self.request.request_id


class MuxStream:
    """One open bidirectional Generate call carrying many requests.

    A writer task sends requests and cancels from a queue (grpc.aio allows one write at a time);
    a reader task routes each response to its request by id. When the call ends, every request
    still open on it is handed back to the multiplexer, which retries or fails it.
    """

    def __init__(self, mux: Multiplexer, replica: Replica) -> None:
        """Start the call and its two tasks (no await: the call connects in the background)."""
        self.replica = replica
        self.alive = True
        self.draining = False
        self._mux = mux
        self._open: dict[str, PendingRequest] = {}
        self._outbox: asyncio.Queue[pb.GenerateRequest | None] = asyncio.Queue()
        self._write_error: TokenwireError | None = None
        self._call: grpc.aio.StreamStreamCall = replica.stub(mux.replicas.config).Generate(
            metadata=mux.metadata
        )
        self._writer = asyncio.ensure_future(self._write_loop())
        self._reader = asyncio.ensure_future(self._read_loop())

    @property
    def load(self) -> int:
        """Requests open on this stream."""
        return len(self._open)

    def send(self, pending: PendingRequest) -> None:
        """Open a request on this stream."""
        self._open[pending.request_id] = pending
        self.replica.load += 1
        pending.stream = self
        self._outbox.put_nowait(pending.request)

    def send_cancel(self, request_id: str) -> None:
        """Ask the server to cancel one open request; its final message still arrives."""
        if self.alive and request_id in self._open:
            self._outbox.put_nowait(cancel_request(request_id))

    def drain(self) -> None:
        """Take no new requests; half-close the call once the open ones have finished."""
        self.draining = True
        if not self._open and self.alive:
            self._outbox.put_nowait(None)

    def _remove(self, request_id: str) -> PendingRequest | None:
        pending = self._open.pop(request_id, None)
        if pending is not None:
            self.replica.load -= 1
            pending.stream = None
            if self.draining and not self._open and self.alive:
                self._outbox.put_nowait(None)
        return pending

    async def _write_loop(self) -> None:
        try:
            while True:
                message = await self._outbox.get()
                if message is None:
                    await self._call.done_writing()
                    return
                await self._call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any write failure ends the stream
            # NOTE: a write usually fails because the call has ended, and the reader reports
            # the call's status. Otherwise cancelling the call ends the reader, which then
            # reports this error instead of its own CANCELLED.
            self._write_error = UnavailableError(f"writing to the Generate stream failed: {exc!r}")
            self._call.cancel()

    async def _read_loop(self) -> None:
        error: TokenwireError = UnavailableError(
            f"the server at {self.replica.endpoint.target} closed the Generate stream"
        )
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                final = response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                pending = self._remove(response.request_id) if final else self._open.get(response.request_id)
                if pending is not None:
                    self._mux.on_response(pending, response, final, self.replica)
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            if exc.code() == grpc.StatusCode.CANCELLED and self._write_error is not None:
                error = self._write_error
        except asyncio.CancelledError:
            error = ClientClosedError("the client was closed")
            raise
        finally:
            self._lost(error)

    def _lost(self, error: TokenwireError) -> None:
        """End the stream: hand its open requests back to the multiplexer (idempotent)."""
        if not self.alive:
            return
        self.alive = False
        self._outbox.put_nowait(None)
        orphans = [p for rid in list(self._open) if (p := self._remove(rid)) is not None]
        self._mux.on_stream_lost(self, error, orphans)

    async def close(self) -> None:
        """Cancel the call (the server aborts its open requests) and stop both tasks."""
        self._call.cancel()
        self._writer.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


class Multiplexer:
    """Routes generations onto a few streams per replica and keeps them going across failures.

    Requests that have not received a token are retried with backoff after UNAVAILABLE or
    RESOURCE_EXHAUSTED (in-band or for the whole stream), on another replica when one is
    available; requests that have received tokens fail with the typed error instead.
    """

    def __init__(self, replicas: ReplicaSet, metadata: tuple[tuple[str, str], ...]) -> None:
        """Take the replicas to route to and the metadata every stream carries."""
        self.replicas = replicas
        self.metadata = metadata
        self._streams: dict[Replica, list[MuxStream]] = {}
        self._open: dict[str, PendingRequest] = {}
        self._resolving: set[asyncio.Future[None]] = set()
        self._watchers: dict[Replica, asyncio.Future[None]] = {}
        self._closed = False

    # -- submission and cancellation -------------------------------------------------------

    def submit(self, pending: PendingRequest) -> None:
        """Start a request now (call on the event loop).

        Raises:
            AlreadyExistsError: its id is in use by another open request of this client.
            ClientClosedError: the client is closed.
        """
        if self._closed:
            raise ClientClosedError("the client is closed", request_id=pending.request_id)
        if pending.request_id in self._open:
            raise AlreadyExistsError("request id in use by an open request", request_id=pending.request_id)
        self._open[pending.request_id] = pending
        if pending.timeout is not None:
            pending.deadline_timer = asyncio.get_running_loop().call_later(pending.timeout, self._expire, pending)
        self._dispatch(pending)

    def abandon(self, pending: PendingRequest) -> None:
        """The caller is done with a request: cancel it on the server if it is still open."""
        if pending.abandoned or pending.settled:
            pending.abandoned = True
            return
        pending.abandoned = True
        if pending.stream is not None and pending.stream.alive:
            # NOTE: keep the id registered until the final message confirms the cancel, so a
            # late message cannot be mistaken for a new request with the same id.
            pending.stream.send_cancel(pending.request_id)
        else:
            self._settle(pending)

    def _expire(self, pending: PendingRequest) -> None:
        if pending.settled or pending.abandoned:
            return
        self.abandon(pending)
        pending.queue.put_nowait(
            DeadlineExceededError(f"no result within {pending.timeout:g} s", request_id=pending.request_id)
        )

    def _settle(self, pending: PendingRequest) -> None:
        if pending.settled:
            return
        pending.settled = True
        self._open.pop(pending.request_id, None)
        for timer in (pending.deadline_timer, pending.retry_timer):
            if timer is not None:
                timer.cancel()
        pending.deadline_timer = pending.retry_timer = None

    # -- routing --------------------------------------------------------------------------

    def _dispatch(self, pending: PendingRequest, avoid: Replica | None = None) -> None:
        pending.retry_timer = None
        if pending.abandoned or pending.settled:
            return
        if self._closed:
            self._fail(pending, ClientClosedError("the client was closed"))
            return
        if not self.replicas.resolved:
            # NOTE: only the first request of a dns:/// target waits for the lookup; later ones
            # use the addresses known, while refreshes run in the background.
            task = asyncio.ensure_future(self._resolve_then_dispatch(pending, avoid))
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)
            return
        pending.attempts += 1
        try:
            replica = self.replicas.pick(exclude=avoid)
        except UnavailableError as error:
            self._retry_or_fail(pending, UnavailableError(error.details, request_id=pending.request_id), None)
            return
        self._stream_for(replica).send(pending)

    async def _resolve_then_dispatch(self, pending: PendingRequest, avoid: Replica | None) -> None:
        await self.replicas.resolve()
        self._dispatch(pending, avoid)

    def _stream_for(self, replica: Replica) -> MuxStream:
        streams = self._streams.setdefault(replica, [])
        if not streams:
            self._watch(replica)
        usable = [s for s in streams if not s.draining]
        best = min(usable, key=lambda s: s.load, default=None)
        # NOTE: open streams one at a time, as concurrency needs them, up to the replica's limit.
        if best is None or (best.load > 0 and len(usable) < replica.max_streams):
            best = MuxStream(self, replica)
            streams.append(best)
        return best

    def _watch(self, replica: Replica) -> None:
        """Drain a replica's streams whenever its connection stops being READY.

        NOTE: a server with a max connection age sends GOAWAY: the channel leaves READY, calls
        already open keep running until the server's grace ends, then fail. Streams opened
        before the change are on that connection: they finish what they carry while new
        requests go to a new stream, on a new connection.
        """
        if replica in self._watchers:
            return
        channel = replica.channel(self.replicas.config)

        async def watch() -> None:
            state = channel.get_state()
            while not self._closed:
                try:
                    await channel.wait_for_state_change(state)
                except Exception:  # noqa: BLE001 - the channel was closed (a retired replica)
                    return
                previous, state = state, channel.get_state()
                if previous == grpc.ChannelConnectivity.READY and state != previous:
                    for stream in self._streams.get(replica, []):
                        stream.drain()

        task = asyncio.ensure_future(watch())
        self._watchers[replica] = task
        task.add_done_callback(lambda _: self._watchers.pop(replica, None))

    def on_response(
        self, pending: PendingRequest, response: pb.GenerateResponse, final: bool, replica: Replica
    ) -> None:
        """Deliver one routed message, or retry a request refused before its first token."""
        if pending.abandoned:
            if final:
                self._settle(pending)
            return
        if final and response.finish_reason == pb.FINISH_REASON_ERROR and not pending.started:
            error = error_from_code(response.error.code, response.error.message, request_id=pending.request_id)
            if error.retryable:
                # NOTE: a draining or overloaded server answers in-band; prefer the others awhile.
                self.replicas.mark_failed(replica)
                self._retry_or_fail(pending, error, avoid=replica)
                return
        if replica.failures:
            self.replicas.mark_ok(replica)
        if response.token_ids or response.text:
            pending.started = True
        if final:
            self._settle(pending)
        pending.queue.put_nowait(response)

    def on_stream_lost(self, stream: MuxStream, error: TokenwireError, orphans: list[PendingRequest]) -> None:
        """A stream ended: forget it, cool its replica down, retry or fail its open requests."""
        streams = self._streams.get(stream.replica, [])
        if stream in streams:
            streams.remove(stream)
        if not streams:
            self._streams.pop(stream.replica, None)
        if self._closed:
            error = ClientClosedError("the client was closed")
        elif error.code == grpc.StatusCode.UNAVAILABLE and not stream.draining:
            self.replicas.mark_failed(stream.replica)
        for pending in orphans:
            if pending.abandoned:
                self._settle(pending)
            else:
                self._retry_or_fail(pending, type(error)(error.details, request_id=pending.request_id), stream.replica)

    def _retry_or_fail(self, pending: PendingRequest, error: TokenwireError, avoid: Replica | None) -> None:
        policy = self.replicas.config.retry
        if self._closed or pending.started or not error.retryable or pending.attempts >= policy.max_attempts:
            self._fail(pending, error)
            return
        delay = policy.backoff_s(pending.attempts)
        pending.retry_timer = asyncio.get_running_loop().call_later(delay, self._dispatch, pending, avoid)

    def _fail(self, pending: PendingRequest, error: TokenwireError) -> None:
        self._settle(pending)
        pending.queue.put_nowait(error)

    async def close(self) -> None:
        """Cancel every stream; requests still open fail with ClientClosedError."""
        self._closed = True
        for task in [*self._resolving, *self._watchers.values()]:
            task.cancel()
        streams = [s for group in self._streams.values() for s in group]
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        # NOTE: requests between tries or waiting for a DNS lookup are on no stream.
        for pending in list(self._open.values()):
            if pending.abandoned:
                self._settle(pending)
            else:
                self._fail(pending, ClientClosedError("the client was closed", request_id=pending.request_id))
