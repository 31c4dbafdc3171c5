"""How long the asyncio event loop stalls while the engine thread runs steps (the case for a thread, not a process)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from tokenwire.engine import AsyncEngine, EngineArgs, GenerationRequest, SamplingParams


async def measure_lag(stop: asyncio.Event, tick: float) -> list[float]:
    """Sleep `tick` seconds over and over; record how late each wake-up is (ms)."""
    lags = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(tick)
        lags.append((time.perf_counter() - t0 - tick) * 1e3)
    return lags


async def consume(engine: AsyncEngine, rid: str, prompt: str, max_tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    n = 0
    async for out in engine.generate(GenerationRequest(rid, prompt=prompt, params=params)):
        n += len(out.token_ids)
    return n


def summary(name: str, lags: list[float]) -> str:
    q = statistics.quantiles(lags, n=100)
    return f"{name:28s} samples {len(lags):5d}  p50 {q[49]:6.2f} ms  p99 {q[98]:6.2f} ms  max {max(lags):6.2f} ms"


async def main_async(args: argparse.Namespace) -> None:
    engine = AsyncEngine(EngineArgs(dtype=args.dtype, max_num_seqs=args.requests))
    await engine.start()
    stop = asyncio.Event()
    idle = asyncio.create_task(measure_lag(stop, args.tick))
    await asyncio.sleep(2.0)
    stop.set()
    idle_lags = await idle
    stop.clear()
    busy = asyncio.create_task(measure_lag(stop, args.tick))
    t0 = time.perf_counter()
    counts = await asyncio.gather(
        *(consume(engine, f"r{i}", f"Request {i}: tell me about rivers and mountains.", args.gen) for i in range(args.requests))
    )
    dt = time.perf_counter() - t0
    stop.set()
    busy_lags = await busy
    await engine.shutdown()
    print(f"{args.requests} requests x {args.gen} tokens: {sum(counts)} tokens in {dt:.1f} s ({sum(counts) / dt:.1f} tok/s)")
    print(summary("loop idle, engine idle", idle_lags))
    print(summary("loop idle, engine stepping", busy_lags))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--tick", type=float, default=0.001, help="seconds the probe sleeps each time")
    parser.add_argument("--dtype", default="auto")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
