"""Prompt attention on CPU: the native prefill kernel against the torch path, per layer and in a long prompt's time to first token."""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tokenwire.engine import LLM, SamplingParams
from tokenwire.engine.attention import AttentionMetadata, PrefillChunk, paged_attention
from tokenwire.engine.native import paged_prefill_attention, prefill_kernel

BLOCK_SIZE = 16


def layer_case(chunks: list[tuple[int, int]], h_q: int, h_kv: int, d: int, seed: int = 0) -> tuple:
    """A pool with each chunk's blocks shuffled, the chunks' queries and new keys, and both paths' inputs.

    chunks: (query tokens, context length after them) per chunk.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = [(length + BLOCK_SIZE - 1) // BLOCK_SIZE for _, length in chunks]
    ids = list(range(sum(needed)))
    rng.shuffle(ids)
    tables = [[ids.pop() for _ in range(n)] for n in needed]
    k_cache = torch.randn(sum(needed), BLOCK_SIZE, h_kv, d, generator=gen)
    v_cache = torch.randn(sum(needed), BLOCK_SIZE, h_kv, d, generator=gen)
    tokens = sum(n for n, _ in chunks)
    q = torch.randn(tokens, h_q, d, generator=gen)
    k, v = torch.randn(tokens, h_kv, d, generator=gen), torch.randn(tokens, h_kv, d, generator=gen)
    slots, prefills, start = [], [], 0
    for (n, length), table in zip(chunks, tables):
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(length - n, length)]
        prefills.append(PrefillChunk(query_start=start, query_len=n, context_len=length, block_table=torch.tensor(table)))
        start += n
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros((0, 1), dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=prefills,
        block_size=BLOCK_SIZE,
    )
    width = max(needed)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens = (torch.tensor([n for n, _ in chunks]), torch.tensor([length for _, length in chunks]))
    return q, k, v, k_cache, v_cache, meta, padded, lens


def per_layer(repeats: int) -> None:
    """One layer's prompt attention for the default model's heads (9 query heads over 3 KV heads of 64)."""
    picks = random.Random(1)
    cases = {
        "a fresh 1,024-token chunk": [(1024, 1024)],
        "976 tokens after 1,024 of context": [(976, 2000)],
        "7 fresh prompts of 32-256 tokens": [(n, n) for n in picks.choices(range(32, 257), k=7)],
        "64 tokens after a 1,536-token preamble": [(64, 1600)],
        "16 tails of 32-128 tokens after 1,536": [(n, 1536 + n) for n in picks.choices(range(32, 129), k=16)],
    }
    print("| chunks | torch path (SDPA) ms | kernel ms | speed-up (median of rounds) |")
    print("|---|---:|---:|---:|")
    with torch.inference_mode():
        for name, chunks in cases.items():
            q, k, v, k_cache, v_cache, meta, padded, (q_lens, c_lens) = layer_case(chunks, 9, 3, 64)
            scale = 64**-0.5
            rounds = []
            for _ in range(repeats + 1):  # NOTE: the first round warms up and is not counted
                # NOTE: the two paths alternate, so that the machine's drift hits both alike.
                start = time.perf_counter()
                paged_attention(q, k, v, k_cache, v_cache, meta, scale=scale)
                mid = time.perf_counter()
                paged_prefill_attention(q, k_cache, v_cache, padded, q_lens, c_lens, scale)
                rounds.append((mid - start, time.perf_counter() - mid))
            rounds = rounds[1:]
            torch_ms = statistics.median(a for a, _ in rounds) * 1e3
            kernel_ms = statistics.median(b for _, b in rounds) * 1e3
            print(f"| {name} | {torch_ms:.2f} | {kernel_ms:.2f} | {statistics.median(a / b for a, b in rounds):.2f}x |")


def first_token(prompt_tokens: int, repeats: int) -> None:
    """A prompt of ``prompt_tokens`` tokens, its first token with the kernel and without, alternating."""
    llm = LLM(dtype="float32")
    runner = llm.core.runner
    kernel = runner.prefill_kernel
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (prompt_tokens // 5 + 1))[:prompt_tokens]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([ids[:64]], params)  # NOTE: warms up the kernels and the allocator
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for on in (True, False):
            runner.prefill_kernel = kernel if on else None
            llm.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate([ids], params)
            seconds[on].append(time.perf_counter() - start)
    runner.prefill_kernel = kernel
    with_kernel, without = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"\n{prompt_tokens}-token prompt, time to its first token (median of {repeats}):")
    print(f"kernel {with_kernel:.2f} s, torch path {without:.2f} s, {without / with_kernel:.2f}x sooner")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="rounds per layer case")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--prompt-repeats", type=int, default=3)
    args = parser.parse_args()
    if prefill_kernel(torch.device("cpu"), torch.float32) is None:
        raise SystemExit("the native kernels are not available (no C++ compiler?)")
    per_layer(args.repeats)
    first_token(args.prompt_tokens, args.prompt_repeats)


if __name__ == "__main__":
    main()
