"""The asyncio bridge on a tiny random model: streams end once, an id can be reused at once, a failed step ends every stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tokenwire.engine import FinishReason, SamplingParams
from tokenwire.engine.async_engine import AsyncEngine
from tokenwire.engine.config import EngineArgs
from tokenwire.engine.errors import DuplicateRequestError
from tokenwire.engine.outputs import RequestOutput
from tokenwire.engine.request import GenerationRequest

PROMPT = [100 + i for i in range(12)]
T = TypeVar("T")
Runner = Callable[[Callable[[AsyncEngine], Awaitable[Any]]], Any]


def request(rid: str, max_tokens: int) -> GenerationRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return GenerationRequest(request_id=rid, prompt_token_ids=PROMPT, params=params)


async def collect(engine: AsyncEngine, req: GenerationRequest) -> list[RequestOutput]:
    return [out async for out in engine.generate(req)]


@pytest.fixture()
def run_engine(seed_model_folder: Path) -> Runner:
    """Runs ``scenario(engine)`` on a started AsyncEngine in a fresh event loop."""

    def run(scenario: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        async def main() -> T:
            engine = AsyncEngine(EngineArgs(model=str(seed_model_folder), dtype="float32", max_num_seqs=8))
            await engine.start()
            try:
                return await scenario(engine)
            finally:
                await engine.shutdown()

        return asyncio.run(main())

    return run


def test_an_id_reused_right_after_its_reader_left_gets_only_its_own_outputs(run_engine: Runner) -> None:
    async def scenario(engine: AsyncEngine) -> tuple[list[RequestOutput], list[RequestOutput]]:
        alone = await collect(engine, request("solo", 5))
        stream = engine.generate(request("a", 400))
        await stream.__anext__()
        await stream.aclose()  # the reader leaves: "a" is cancelled, and its last outputs are in flight
        again = await collect(engine, request("a", 5))
        # Once more, leaving before the first token, and reusing the id at once again.
        stream = engine.generate(request("a", 400))
        await stream.aclose()
        third = await collect(engine, request("a", 5))
        assert engine.core.block_manager.num_used_blocks == 0
        return [alone[-1], again[-1], third[-1]], again + third

    finals, outs = run_engine(scenario)
    # Without the ordering by request, the new "a" received the old one's cancellation (and tokens).
    assert [f.finish_reason for f in finals] == [FinishReason.LENGTH] * 3
    assert [f.usage.completion_tokens for f in finals if f.usage] == [5, 5, 5]
    assert sum(len(o.token_ids) for o in outs) == 10


def test_an_id_in_use_is_refused_while_its_request_is_open(run_engine: Runner) -> None:
    async def scenario(engine: AsyncEngine) -> tuple[RequestOutput, list[RequestOutput]]:
        stream = engine.generate(request("a", 400))
        await stream.__anext__()
        duplicate = await collect(engine, request("a", 5))
        engine.abort("a")
        rest = [out async for out in stream]
        return duplicate[-1], rest

    duplicate, rest = run_engine(scenario)
    assert duplicate.finish_reason == FinishReason.ERROR and isinstance(duplicate.error, DuplicateRequestError)
    assert rest[-1].finish_reason == FinishReason.CANCELLED


def test_a_failed_step_ends_every_stream_with_the_error(run_engine: Runner) -> None:
    """A step that fails part way, after it finished one request and before it returned that
    request's last output: every reader still ends, with the engine's error, and nothing hangs."""

    async def scenario(engine: AsyncEngine) -> list[list[RequestOutput]]:
        core = engine.core
        step, accept = core.step, core._accept
        gate = threading.Event()
        gate.set()

        def gated_step() -> list[RequestOutput]:
            gate.wait()
            return step()

        def failing_accept(item: Any, *args: Any) -> RequestOutput:
            if item.seq.request_id == "b":
                raise RuntimeError("injected fault")
            return accept(item, *args)

        core.step = gated_step  # type: ignore[method-assign]
        core._accept = failing_accept  # type: ignore[method-assign]
        x = engine.generate(request("x", 400))
        first = await x.__anext__()
        # Hold the engine in a step of "x" while "a" (one token) and "b" arrive, so that both
        # join the next step: "a" finishes there, then "b" fails it.
        gate.clear()
        await asyncio.sleep(0.2)
        a = asyncio.ensure_future(collect(engine, request("a", 1)))
        b = asyncio.ensure_future(collect(engine, request("b", 5)))
        await asyncio.sleep(0.2)
        gate.set()
        rest = asyncio.ensure_future(asyncio.wait_for(asyncio.gather(a, b), timeout=60))
        x_outs = [first] + [out async for out in x]
        a_outs, b_outs = await rest
        after = await collect(engine, request("c", 5))
        return [x_outs, a_outs, b_outs, after]

    for outs in run_engine(scenario):
        assert outs[-1].finish_reason is FinishReason.ERROR
        assert "engine step failed: RuntimeError: injected fault" in str(outs[-1].error)


def test_prompts_are_tokenized_off_the_event_loop(run_engine: Runner) -> None:
    """A long prompt's tokenization must not hold up the loop (every stream's tokens, health
    checks); a request refused there leaves its id free."""

    async def scenario(engine: AsyncEngine) -> tuple[threading.Thread, list[threading.Thread], list[list[RequestOutput]]]:
        tokenizer = engine.core.tokenizer
        encode, threads = tokenizer.encode, []

        def recording_encode(*args: Any, **kwargs: Any) -> list[int]:
            threads.append(threading.current_thread())
            return encode(*args, **kwargs)

        tokenizer.encode = recording_encode  # type: ignore[method-assign]
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        answered = await collect(engine, GenerationRequest("t", prompt="Hello there " * 100, params=params))
        refused = await collect(engine, GenerationRequest("t", prompt="", params=params))
        again = await collect(engine, GenerationRequest("t", prompt="Hello", params=params))
        return threading.current_thread(), threads, [answered, refused, again]

    loop_thread, threads, (answered, refused, again) = run_engine(scenario)
    assert len(threads) == 3 and loop_thread not in threads
    assert answered[-1].finish_reason is FinishReason.LENGTH and again[-1].finish_reason is FinishReason.LENGTH
    assert refused[-1].finish_reason is FinishReason.ERROR and "prompt is empty" in str(refused[-1].error)
