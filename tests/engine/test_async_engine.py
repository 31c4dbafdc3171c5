"""The asyncio bridge on a tiny random model: streams end once, and a request id can be reused at once."""

from __future__ import annotations

import asyncio
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
