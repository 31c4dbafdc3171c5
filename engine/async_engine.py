"""The asyncio bridge: the engine core runs in its own thread; outputs cross to the event loop once per step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Literal, TypeVar

from tokenwire.engine.config import EngineArgs
from tokenwire.engine.core import EngineCore
from tokenwire.engine.errors import DuplicateRequestError, EngineDeadError, EngineError
from tokenwire.engine.info import EngineStats, ModelInfo
from tokenwire.engine.loader import LoadedModel, load_model
from tokenwire.engine.outputs import FinishReason, RequestOutput
from tokenwire.engine.request import GenerationRequest
from tokenwire.engine.sequence import Sequence

_Command = tuple[Literal["add"], Sequence] | tuple[Literal["abort"], str]
_T = TypeVar("_T")


class RequestCollector:
    """Hands one request's outputs to its reader; merges them while the reader lags (bounded memory)."""

    def __init__(self) -> None:
        self._pending: RequestOutput | None = None
        self._ready = asyncio.Event()
        # NOTE: set when the reader leaves before the last output: what still arrives is dropped.
        self.abandoned = False

    def put(self, out: RequestOutput) -> None:
        """Called on the event loop with the request's newest delta."""
        if self._pending is None:
            self._pending = out
        else:
            self._pending.merge(out)
        self._ready.set()

    async def get(self) -> RequestOutput:
        """Everything new since the last get (several steps' tokens when the reader lagged)."""
        await self._ready.wait()
        self._ready.clear()
        out, self._pending = self._pending, None
        assert out is not None  # NOTE: _ready is only set together with _pending.
        return out


class AsyncEngine:
    """Runs an EngineCore in a dedicated thread and exposes async generation to the event loop.

    NOTE: a thread, not a process: torch releases the GIL inside its kernels, so the event loop
    keeps serving gRPC while a step runs, and requests and outputs cross without serialization.
    Commands (add, abort) are queued and applied between steps; each step's outputs cross to the
    loop in one ``call_soon_threadsafe`` call, however many requests they touch.
    """

    def __init__(self, args: EngineArgs, loaded: LoadedModel | None = None) -> None:
        if loaded is None:
            loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        self.core = EngineCore(loaded, args)
        self._model_info = self.core.model_info()
        self._stats = self.core.stats()
        self._commands: list[_Command] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # NOTE: per request id, its collectors oldest first: all but the newest were abandoned by
        # readers that left early and wait for their request's last output (the engine ends every
        # request it was given with exactly one), so that a reused id never receives a
        # predecessor's tokens or its cancellation.
        self._collectors: dict[str, list[RequestCollector]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._swept = False  # whether the readers were told of _dead

    @property
    def model_info(self) -> ModelInfo:
        """What is served."""
        return self._model_info

    @property
    def is_running(self) -> bool:
        """True between start() and shutdown() while the loop is healthy."""
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (safe from any thread)."""
        return self._stats

    def tokenize(self, text: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a text or a chat (rendered with the chat template); raises InvalidRequestError."""
        return self.core.tokenize(GenerationRequest(request_id="tokenize", prompt=text, messages=messages))

    async def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenwire-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine thread (open requests are not finished; drain them first)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def abort(self, request_id: str) -> None:
        """Cancel a request; applied before the next step. Harmless for unknown ids."""
        self._submit(("abort", request_id))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last one has ``finish_reason`` set.

        Problems with the request come back in-band as a single output with FinishReason.ERROR and
        the typed error. Leaving the loop early (or cancelling the task) aborts the request.
        """
        rid = request.request_id
        refusal: EngineError | None = None
        if self._dead is not None:
            refusal = self._dead
        elif self._thread is None:
            refusal = EngineDeadError("the engine is not started")
        elif any(not c.abandoned for c in self._collectors.get(rid, ())):
            refusal = DuplicateRequestError(f"request_id {rid!r} is already in use by an open request")
        if refusal is not None:
            yield RequestOutput(rid, finish_reason=FinishReason.ERROR, error=refusal)
            return
        # NOTE: the id is claimed before the prompt is tokenized, since that waits on a thread: a
        # second request with the same id meanwhile is refused, not routed this one's outputs.
        collector = RequestCollector()
        self._collectors.setdefault(rid, []).append(collector)
        submitted = finished = False
        try:
            try:
                # NOTE: off the event loop: a prompt of megabytes (or a long chat template) takes
                # long enough to tokenize to hold up every other stream's tokens and the health checks.
                seq = await asyncio.to_thread(self.core.make_sequence, request)
            except EngineError as e:
                self._drop_collector(rid, collector)
                finished = True
                yield RequestOutput(rid, finish_reason=FinishReason.ERROR, error=e)
                return
            self._submit(("add", seq))
            submitted = True
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        finally:
            # NOTE: still queued means its last output has not arrived: the request is open. Once
            # it has arrived (unread), there is nothing to cancel, and an abort by id could hit a
            # newer request under the same id.
            if not finished and collector in self._collectors.get(rid, ()):
                if submitted:
                    collector.abandoned = True
                    self.abort(rid)
                else:  # the reader left while the prompt was being tokenized: nothing reached the engine
                    self._drop_collector(rid, collector)

    def _drop_collector(self, rid: str, collector: RequestCollector) -> None:
        # Forgets a collector whose request never reached the engine (no output will come for it).
        queue = self._collectors.get(rid)
        if queue is not None and collector in queue:
            queue.remove(collector)
            if not queue:
                del self._collectors[rid]

    # ---- engine thread ---------------------------------------------------------------------

    def _submit(self, command: _Command) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def _run(self) -> None:
        core = self.core
        while not self._stopping:
            with self._lock:
                commands, self._commands = self._commands, []
                self._wake.clear()
            outputs = self._apply(commands)
            if core.has_unfinished() and self._dead is None:
                try:
                    outputs.extend(core.step())
                except Exception as e:  # noqa: BLE001 - any failure of a step ends every open request
                    self._dead = EngineDeadError(f"engine step failed: {type(e).__name__}: {e}")
                    outputs.extend(self._fail_all(self._dead))
            self._stats = core.stats()
            if outputs:
                self._deliver(outputs)
            if self._dead is not None and not self._swept:
                # NOTE: a step that failed part way may have finished requests whose last outputs
                # it never returned; their readers end with the error rather than wait forever.
                self._swept = True
                self._on_loop(self._fail_readers, self._dead)
            # NOTE: _stopping is checked again here: a shutdown() that set the event before this
            # iteration cleared it would otherwise be lost, and the thread would never wake.
            if (not core.has_unfinished() or self._dead is not None) and not self._stopping:
                self._wake.wait()

    def _apply(self, commands: list[_Command]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for _kind, arg in commands:
            if isinstance(arg, str):  # an abort names its request id
                out = self.core.abort(arg)
                if out is not None:
                    outputs.append(out)
                continue
            try:
                if self._dead is not None:
                    raise self._dead
                self.core.add_sequence(arg)
            except EngineError as e:
                outputs.append(RequestOutput(arg.request_id, finish_reason=FinishReason.ERROR, error=e))
        return outputs

    def _fail_all(self, error: EngineError) -> list[RequestOutput]:
        outputs = []
        for rid in list(self.core.requests):
            self.core.abort(rid)
            outputs.append(RequestOutput(rid, finish_reason=FinishReason.ERROR, error=error))
        return outputs

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        self._on_loop(self._dispatch, outputs)

    def _on_loop(self, callback: Callable[[_T], None], arg: _T) -> None:
        # Runs callback(arg) on the event loop, after what was handed to it before.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:
            pass  # NOTE: the loop closed between the check and the call; nobody is listening.

    def _fail_readers(self, error: EngineDeadError) -> None:
        # Every reader still waiting gets the error as its last output.
        for rid, queue in list(self._collectors.items()):
            for collector in queue:
                if not collector.abandoned:
                    collector.put(RequestOutput(rid, finish_reason=FinishReason.ERROR, error=error))
        self._collectors.clear()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._collectors.get(out.request_id)
            if not queue:
                continue
            # NOTE: the engine applies commands in order, so the oldest collector's request is
            # the one this output belongs to until its last output has come.
            collector = queue[0]
            if not collector.abandoned:
                collector.put(out)
            if out.finished:
                queue.pop(0)
                if not queue:
                    del self._collectors[out.request_id]
