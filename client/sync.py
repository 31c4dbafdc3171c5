"""`Client`: the synchronous tokenwire client, an `AsyncClient` driven on a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from tokenwire.client.aio import AsyncClient
from tokenwire.client.config import DEFAULT, ClientConfig, ClientOptions, TimeoutArg
from tokenwire.client.convert import MessageLike, PromptInput
from tokenwire.client.errors import ClientClosedError, TokenwireError
from tokenwire.client.generation import AsyncGeneration
from tokenwire.client.types import Completion, GenerationChunk, HealthStatus, ModelInfo, SamplingKwargs

if TYPE_CHECKING:
    from typing import Unpack

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever on a daemon thread; callers block on its results."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tokenwire-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop and wait for it; an interrupt (Ctrl-C) cancels it.

        Raises:
            ClientClosedError: the loop was stopped by `Client.close`.
        """
        if self.loop.is_closed():
            coro.close()
            raise ClientClosedError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # NOTE: a KeyboardInterrupt lands here while the coroutine still runs; cancelling it
            # lets a generation send its cancel to the server. A no-op when it already ended.
            future.cancel()
            raise

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop's thread (where asyncio objects must be made) and wait."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def stop(self) -> None:
        """Cancel the loop's remaining tasks, stop it and wait for its thread; the loop is closed afterwards."""
        if self.loop.is_closed():
            return
        self.run(_cancel_other_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_other_tasks() -> None:
    """Cancel and await every other task of the running loop.

    NOTE: grpc.aio leaves small bookkeeping tasks behind on closed channels; closing the loop
    under them prints "Task was destroyed but it is pending!".
    """
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Generation:
    """A generation in flight, for synchronous code: iterate it for `GenerationChunk`s.

    Breaking out of the loop, `close()`, leaving a `with` block or dropping the object cancels
    the request on the server. Failures raise their typed `TokenwireError` from the iteration.
    """

    def __init__(self, runner: _LoopThread, inner: AsyncGeneration) -> None:
        """Wrap an `AsyncGeneration` running on the client's loop (made by `Client.generate`)."""
        self._runner = runner
        self._inner = inner

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self._inner.request_id

    @property
    def done(self) -> bool:
        """True once the last chunk or an error was returned, or the generation was closed."""
        return self._inner.done

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> GenerationChunk:
        try:
            return self._runner.run(self._inner.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def collect(self) -> Completion:
        """Read the rest and join it into one `Completion` (see `AsyncGeneration.collect`)."""
        return self._runner.run(self._inner.collect())

    def close(self) -> None:
        """Cancel the request on the server if it is still open. Idempotent."""
        if not self._inner.done and not self._runner.loop.is_closed():
            self._runner.call(self._inner.cancel)

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Client:
    """The synchronous client: same calls as `AsyncClient`, blocking, usable from any thread.

    It runs an `AsyncClient` on a private event-loop thread, so every generation of the client,
    from any thread, shares the same multiplexed streams. Use it as `with Client(...) as c:`.

    Example:
        >>> with Client("127.0.0.1:50051") as client:
        ...     for chunk in client.generate("Once upon a time", max_tokens=32):
        ...         print(chunk.text, end="", flush=True)
    """

    def __init__(self, target: str | Sequence[str] | ClientConfig, **options: Unpack[ClientOptions]) -> None:
        """Configure a client (see `AsyncClient`); nothing connects until the first call.

        Raises:
            ValueError: a malformed target or option. TypeError: an unknown option.
        """
        self._async = AsyncClient(target, **options)
        self._runner = _LoopThread()

    @property
    def config(self) -> ClientConfig:
        """The client's validated configuration."""
        return self._async.config

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancel open generations, close the channels and stop the loop thread. Idempotent."""
        if self._runner.loop.is_closed():
            return
        self._runner.run(self._async.close())
        self._runner.stop()

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[MessageLike] | None = None,
        request_id: str | None = None,
        timeout: TimeoutArg = DEFAULT,
        **sampling: Unpack[SamplingKwargs],
    ) -> Generation:
        """Start a generation and return it as an iterator of chunks (see `AsyncClient.generate`)."""
        inner = self._runner.call(
            lambda: self._async.generate(
                prompt, token_ids=token_ids, messages=messages, request_id=request_id, timeout=timeout, **sampling
            )
        )
        return Generation(self._runner, inner)

    def complete(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[MessageLike] | None = None,
        request_id: str | None = None,
        timeout: TimeoutArg = DEFAULT,
        **sampling: Unpack[SamplingKwargs],
    ) -> Completion:
        """Generate and return the whole result (see `AsyncClient.complete`)."""
        return self._runner.run(
            self._async.complete(
                prompt, token_ids=token_ids, messages=messages, request_id=request_id, timeout=timeout, **sampling
            )
        )

    @overload
    def complete_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        concurrency: int = ...,
        return_exceptions: Literal[False] = ...,
        timeout: TimeoutArg = ...,
        **sampling: Unpack[SamplingKwargs],
    ) -> list[Completion]: ...

    @overload
    def complete_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        concurrency: int = ...,
        return_exceptions: Literal[True],
        timeout: TimeoutArg = ...,
        **sampling: Unpack[SamplingKwargs],
    ) -> list[Completion | TokenwireError]: ...

    def complete_many(
        self,
        prompts: Iterable[PromptInput],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: TimeoutArg = DEFAULT,
        **sampling: Any,
    ) -> list[Completion] | list[Completion | TokenwireError]:
        """Complete many prompts concurrently (see `AsyncClient.complete_many`)."""
        return self._runner.run(
            self._async.complete_many(
                list(prompts),
                concurrency=concurrency,
                return_exceptions=return_exceptions,  # type: ignore[arg-type]
                timeout=timeout,
                **sampling,
            )
        )

    def tokenize(
        self, prompt: str | None = None, *, messages: Sequence[MessageLike] | None = None, timeout: TimeoutArg = DEFAULT
    ) -> list[int]:
        """The token ids of a text or of chat messages (see `AsyncClient.tokenize`)."""
        return self._runner.run(self._async.tokenize(prompt, messages=messages, timeout=timeout))

    def model_info(self, *, timeout: TimeoutArg = DEFAULT) -> ModelInfo:
        """Describe the served model and its engine."""
        return self._runner.run(self._async.model_info(timeout=timeout))

    def health(self, service: str = "", *, timeout: TimeoutArg = DEFAULT) -> HealthStatus:
        """The standard gRPC health check across replicas (see `AsyncClient.health`)."""
        return self._runner.run(self._async.health(service, timeout=timeout))
