"""`AsyncClient`: the asyncio tokenwire client (generation, tokenize, model info, health)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import grpc
import grpc.aio

from tokenwire.client.channel import call_metadata
from tokenwire.client.config import DEFAULT, ClientConfig, ClientOptions, TimeoutArg
from tokenwire.client.convert import (
    MessageLike,
    PromptInput,
    check_message_size,
    generate_request,
    health_status,
    model_info_from_pb,
    set_prompt,
    split_prompt,
)
from tokenwire.client.endpoints import Replica, ReplicaSet
from tokenwire.client.errors import ClientClosedError, TokenwireError, UnavailableError, error_from_rpc
from tokenwire.client.generation import AsyncGeneration
from tokenwire.client.multiplex import Multiplexer, PendingRequest
from tokenwire.client.types import Completion, HealthStatus, ModelInfo, SamplingKwargs
from tokenwire.client.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from typing import Unpack

T = TypeVar("T")


class AsyncClient:
    """The asyncio client. Use it on one event loop, ideally as `async with AsyncClient(...)`.

    All concurrent generations share one `Generate` stream per server, multiplexed by request
    id; with several servers each request goes to the least loaded one. No connection is made
    until the first call.

    Example:
        >>> async with AsyncClient("127.0.0.1:50051") as client:
        ...     async for chunk in client.generate("Once upon a time", max_tokens=32):
        ...         print(chunk.text, end="", flush=True)
    """

    def __init__(self, target: str | Sequence[str] | ClientConfig, **options: Unpack[ClientOptions]) -> None:
        """Configure a client; nothing connects yet.

        Args:
            target: a server (`host:port`, `unix:path`, `dns:///name:port`, `ipv4:a:p,b:p`), a
                list of replicas, or a whole `ClientConfig`.
            **options: the other `ClientConfig` fields: token, tls, timeout, keepalive, retry,
                streams_per_server, max_reconnect_backoff_s, dns_refresh_s, channel_options.

        Raises:
            ValueError: a malformed target or option.
            TypeError: an unknown option, or options given alongside a `ClientConfig`.
        """
        if isinstance(target, ClientConfig):
            if options:
                raise TypeError(f"pass options inside the ClientConfig, not beside it: {sorted(options)}")
            self.config = target
        else:
            self.config = ClientConfig(targets=target, **options)  # type: ignore[arg-type]
        self._replicas = ReplicaSet(self.config)
        self._metadata = call_metadata(self.config)
        self._mux = Multiplexer(self._replicas, self._metadata)
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel open generations (they raise `ClientClosedError`) and close every channel."""
        if self._closed:
            return
        self._closed = True
        await self._mux.close()
        await self._replicas.close()

    # -- generation -----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[MessageLike] | None = None,
        request_id: str | None = None,
        timeout: TimeoutArg = DEFAULT,
        **sampling: Unpack[SamplingKwargs],
    ) -> AsyncGeneration:
        """Start a generation now and return it as an async iterator of chunks.

        Call it from a coroutine (the request is sent at once, on the running loop).

        Args:
            prompt: a raw text prompt (no chat template).
            token_ids: a prompt given as token ids.
            messages: chat messages (`ChatMessage` or {"role", "content"} mappings), rendered
                with the model's chat template. Give exactly one of the three.
            request_id: the request's id; a random one by default. Must be unique among this
                client's open requests.
            timeout: seconds until the request is cancelled and raises `DeadlineExceededError`;
                None for no limit; by default the client's timeout.
            **sampling: `SamplingKwargs` (max_tokens, temperature, top_p, seed, stop, ...).

        Returns:
            The running generation; iterate it, or `await gen.collect()`.

        Raises:
            ValueError: a bad prompt or timeout. TypeError: an unknown sampling argument.
            AlreadyExistsError: request_id is in use. ClientClosedError: the client is closed.
            InvalidArgumentError: the request is larger than ``max_message_size``.
        """
        if self._closed:
            raise ClientClosedError("the client is closed")
        request = generate_request(
            request_id if request_id is not None else uuid.uuid4().hex,
            prompt=prompt,
            token_ids=token_ids,
            messages=messages,
            sampling=sampling,
        )
        check_message_size(request, self.config.max_message_size, request.request_id)
        pending = PendingRequest(request, timeout=self.config.resolve_timeout(timeout))
        self._mux.submit(pending)
        return AsyncGeneration(self._mux, pending)

    async def complete(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[MessageLike] | None = None,
        request_id: str | None = None,
        timeout: TimeoutArg = DEFAULT,
        **sampling: Unpack[SamplingKwargs],
    ) -> Completion:
        """Generate and return the whole result; the arguments are those of `generate`.

        Raises:
            TokenwireError: the request failed (its typed subclass) or timed out.
        """
        generation = self.generate(
            prompt, token_ids=token_ids, messages=messages, request_id=request_id, timeout=timeout, **sampling
        )
        return await generation.collect()

    @overload
    async def complete_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        concurrency: int = ...,
        return_exceptions: Literal[False] = ...,
        timeout: TimeoutArg = ...,
        **sampling: Unpack[SamplingKwargs],
    ) -> list[Completion]: ...

    @overload
    async def complete_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        concurrency: int = ...,
        return_exceptions: Literal[True],
        timeout: TimeoutArg = ...,
        **sampling: Unpack[SamplingKwargs],
    ) -> list[Completion | TokenwireError]: ...

    async def complete_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: TimeoutArg = DEFAULT,
        **sampling: Any,
    ) -> list[Completion] | list[Completion | TokenwireError]:
        """Complete many prompts concurrently, with the same sampling arguments for all.

        Args:
            prompts: each a text, a list of token ids, or a list of chat messages.
            concurrency: most generations open at once (the server batches them).
            return_exceptions: put each failed prompt's `TokenwireError` in its place in the
                result instead of raising the first failure (which cancels the rest).
            timeout: per generation, counted from its start; see `generate`.
            **sampling: `SamplingKwargs`, as for `generate`.

        Returns:
            One result per prompt, in the prompts' order.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        # NOTE: split every prompt first, so a malformed one fails before anything is sent.
        inputs = [split_prompt(p) for p in prompts]
        gate = asyncio.Semaphore(concurrency)

        async def one(text: str | None, ids: Sequence[int] | None, msgs: Sequence[MessageLike] | None) -> Completion:
            async with gate:
                return await self.complete(text, token_ids=ids, messages=msgs, timeout=timeout, **sampling)

        tasks = [asyncio.ensure_future(one(*parts)) for parts in inputs]
        try:
            if not return_exceptions:
                return list(await asyncio.gather(*tasks))
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, TokenwireError):
                raise result
        return results  # type: ignore[return-value]

    # -- unary calls ----------------------------------------------------------------------

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] | None = None,
        timeout: TimeoutArg = DEFAULT,
    ) -> list[int]:
        """The token ids the model would see for a text, or for chat messages with its template.

        Raises:
            ValueError: neither or both of prompt and messages. TokenwireError: the call failed.
        """
        request = pb.TokenizeRequest()
        set_prompt(request, prompt, None, messages)
        check_message_size(request, self.config.max_message_size)
        response = await self._unary(
            lambda r, t: r.stub(self.config).Tokenize(request, timeout=t, metadata=self._metadata), timeout
        )
        return list(response.token_ids)

    async def model_info(self, *, timeout: TimeoutArg = DEFAULT) -> ModelInfo:
        """Describe the served model and its engine (one replica answers)."""
        request = pb.GetModelInfoRequest()
        response = await self._unary(
            lambda r, t: r.stub(self.config).GetModelInfo(request, timeout=t, metadata=self._metadata), timeout
        )
        return model_info_from_pb(response)

    async def health(self, service: str = "", *, timeout: TimeoutArg = DEFAULT) -> HealthStatus:
        """Ask every replica the standard gRPC health check; SERVING if any of them serves.

        Args:
            service: the service to ask about; "" is the server as a whole.
            timeout: seconds per check; by default the client's timeout.

        Returns:
            SERVING if a replica serves, else the first replica's answer.

        Raises:
            TokenwireError: no replica answered (e.g. `UnavailableError`).
        """
        try:
            from grpc_health.v1 import health_pb2, health_pb2_grpc
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("health checks need grpcio-health-checking: pip install grpcio-health-checking") from exc
        seconds = self.config.resolve_timeout(timeout)
        request = health_pb2.HealthCheckRequest(service=service)

        if not self._replicas.resolved:
            await self._replicas.resolve()

        async def check(replica: Replica) -> HealthStatus:
            stub = health_pb2_grpc.HealthStub(replica.channel(self.config))
            try:
                response = await stub.Check(request, timeout=seconds, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return HealthStatus.SERVICE_UNKNOWN
                raise error_from_rpc(exc) from None
            return health_status(response.status)

        answers = await asyncio.gather(*(check(r) for r in self._replicas.require_live()), return_exceptions=True)
        statuses = [a for a in answers if isinstance(a, HealthStatus)]
        if HealthStatus.SERVING in statuses:
            return HealthStatus.SERVING
        if statuses:
            return statuses[0]
        raise answers[0]  # type: ignore[misc]

    async def _unary(self, call: Callable[[Replica, float | None], Awaitable[T]], timeout: TimeoutArg) -> T:
        """Run a unary call on a replica, retrying UNAVAILABLE / RESOURCE_EXHAUSTED on the others."""
        if self._closed:
            raise ClientClosedError("the client is closed")
        loop = asyncio.get_running_loop()
        seconds = self.config.resolve_timeout(timeout)
        deadline = None if seconds is None else loop.time() + seconds
        policy = self.config.retry
        avoid: Replica | None = None
        attempt = 0
        if not self._replicas.resolved:
            await self._replicas.resolve()
        while True:
            attempt += 1
            replica: Replica | None = None
            remaining = None if deadline is None else deadline - loop.time()
            try:
                replica = self._replicas.pick(exclude=avoid)
                result = await call(replica, remaining)
            except (grpc.aio.AioRpcError, UnavailableError) as exc:
                error = error_from_rpc(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
                if error.code == grpc.StatusCode.UNAVAILABLE and replica is not None:
                    self._replicas.mark_failed(replica)
                delay = policy.backoff_s(attempt)
                out_of_time = deadline is not None and loop.time() + delay >= deadline
                if not error.retryable or attempt >= policy.max_attempts or out_of_time:
                    raise error from None
                await asyncio.sleep(delay)
                avoid = replica
                continue
            if replica.failures:
                self._replicas.mark_ok(replica)
            return result
