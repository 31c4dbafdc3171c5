"""Engine throughput against Hugging Face transformers' static-batch generate, measured side by side in one run."""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tokenwire.engine import LLM, SamplingParams
from tokenwire.engine.loader import default_model_path

# Text whose tokens make the prompts (random slices), so prompts look like language, not noise.
_CORPUS = (
    "Retrieval-augmented generation pairs a language model with a search step: the question is used "
    "to find passages, and the passages are put in the prompt so the model can answer from them. "
    "The same long system prompt and the same popular passages arrive again and again, which is why "
    "a server that caches the keys and values of shared prefixes answers them faster. Streaming "
    "matters too: a reader sees the first words after a fraction of a second instead of waiting for "
    "the whole answer. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\nLa tour Eiffel se trouve à Paris, capitale de la France. "
) * 8


# Questions for --chat: answers that explain rather than quote.
_QUESTIONS = (
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Write a short poem about autumn leaves.",
    "What are three good habits for writing maintainable code?",
    "Describe how a bicycle works.",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "What is the difference between weather and climate?",
    "Explain what a hash table is and when to use one.",
    "Tell me a story about a lighthouse keeper and a storm.",
)


@dataclass
class Result:
    """One measured configuration."""

    system: str
    dtype: str
    num_requests: int
    generated_tokens: int
    seconds: float
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    trial: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds


def make_prompts(tokenizer: object, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n prompts of lo..hi tokens, each a random slice of the corpus' tokens."""
    ids = tokenizer.encode(_CORPUS)  # type: ignore[attr-defined]
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randint(0, len(ids) - length)
        prompts.append(ids[start : start + length])
    return prompts


def add_shared_prefix(tokenizer: object, prompts: list[list[int]], length: int) -> list[list[int]]:
    """Put the same `length`-token preamble (a RAG system prompt with passages) before every prompt."""
    ids = tokenizer.encode(_CORPUS)  # type: ignore[attr-defined]
    return [ids[:length] + p for p in prompts]


def chat_prompts(tokenizer: object, n: int) -> list[list[int]]:
    """n chat-templated questions that do not quote themselves (where n-gram drafts rarely match)."""
    return [
        tokenizer.encode_chat(  # type: ignore[attr-defined]
            [{"role": "user", "content": _QUESTIONS[i % len(_QUESTIONS)]}], add_generation_prompt=True
        )
        for i in range(n)
    ]


def run_ours(llm: LLM, prompts: list[list[int]], gen: int, dtype: str) -> Result:
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    # A repeated trial must not find its prompts in the prefix cache: every run computes them in full.
    llm.reset_prefix_cache()
    # Warm-up on tokens unrelated to the prompts, so that nothing the timed run uses is cached.
    llm.generate([[100 + i for i in range(40)]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    after = llm.stats()
    drafted = after.draft_tokens_total - before.draft_tokens_total
    accepted = after.accepted_draft_tokens_total - before.accepted_draft_tokens_total
    system = "tokenwire"
    if llm.args.speculative_tokens:
        system += f"+spec{llm.args.speculative_tokens}"
    if llm.args.kv_cache_dtype != "auto":
        system += f"+kv-{llm.args.kv_cache_dtype}"
    return Result(system, dtype, len(prompts), sum(len(o.token_ids) for o in outs), dt, drafted, accepted)


def run_hf(model: object, prompts: list[list[int]], gen: int, dtype: str, pad_id: int, lookup: int = 0) -> Result:
    """transformers generate over one static batch (left-padded), greedy, exactly `gen` new tokens.

    ``lookup`` > 0 turns on its prompt-lookup decoding (one sequence only), the counterpart of our
    n-gram speculation.
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs: dict[str, object] = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, pad_token_id=pad_id)
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = lookup
    with torch.inference_mode():
        model.generate(input_ids[:2, -8:], attention_mask=mask[:2, -8:], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=pad_id)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=mask, **kwargs)  # type: ignore[attr-defined]
        dt = time.perf_counter() - t0
    system = "transformers" if not lookup else f"transformers+lookup{lookup}"
    return Result(system, dtype, len(prompts), int((out.shape[1] - width) * len(prompts)), dt)


def median_trial_ratio(results: list[Result], system: str, n: int) -> str:
    """Ours / transformers within each trial (the two ran back to back): the median over trials and dtypes, and the range."""
    ratios = []
    for r in results:
        if r.system != system or r.num_requests != n:
            continue
        base = next(b for b in results if b.system == "transformers" and b.num_requests == n and b.dtype == r.dtype and b.trial == r.trial)
        ratios.append(r.tokens_per_second / base.tokens_per_second)
    if len(ratios) < 2:
        return "-"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} trials)"


def load_hf(dtype: torch.dtype) -> object:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--prompt-min", type=int, default=32)
    parser.add_argument("--prompt-max", type=int, default=256)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="tokens of one preamble shared by every prompt (the RAG case; exercises the prefix cache)")
    parser.add_argument("--chat", action="store_true",
                        help="chat-templated questions instead of corpus slices (text that does not quote itself)")
    parser.add_argument("--speculative-tokens", type=int, default=0,
                        help="also run ours with n-gram speculative decoding (and, alone, transformers with prompt lookup)")
    parser.add_argument("--kv-cache-dtype", choices=["float32", "bfloat16", "float16"],
                        help="also run ours with this KV cache dtype (a narrower cache than the model's)")
    parser.add_argument("--trials", type=int, default=1,
                        help="run each configuration this many times, the systems alternating; ratios are then also given as the median of each trial's ratio")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results: list[Result] = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        engine_kwargs = dict(dtype=dtype_name, max_num_seqs=max(args.requests), max_num_batched_tokens=2048)
        llms = [LLM(**engine_kwargs)]  # type: ignore[arg-type]
        if args.speculative_tokens:
            llms.append(LLM(speculative_tokens=args.speculative_tokens, **engine_kwargs))  # type: ignore[arg-type]
        if args.kv_cache_dtype:
            llms.append(LLM(kv_cache_dtype=args.kv_cache_dtype, **engine_kwargs))  # type: ignore[arg-type]
        tok = llms[0].tokenizer
        if args.chat:
            prompt_sets = {n: chat_prompts(tok, n) for n in args.requests}
            alone = chat_prompts(tok, 1)
        else:
            prompt_sets = {n: make_prompts(tok, n, args.prompt_min, args.prompt_max, seed=n) for n in args.requests}
            alone = make_prompts(tok, 1, args.prompt_min, args.prompt_max, seed=1)
        if args.shared_prefix:
            prompt_sets = {n: add_shared_prefix(tok, p, args.shared_prefix) for n, p in prompt_sets.items()}
            alone = add_shared_prefix(tok, alone, args.shared_prefix)
        pad_id = (llms[0].loaded.eos_token_ids or [0])[0]
        hf = load_hf(dtype)
        # Alternate the systems so that drift in the machine's speed hits both alike.
        for n, prompts in [(1, alone)] + list(prompt_sets.items()):
            for trial in range(args.trials):
                trial_results: list[Result] = []
                for llm in llms:
                    # NOTE: past speculative_max_batch the engine does not speculate: that run would
                    # repeat the plain one.
                    if n <= llm.args.speculative_max_batch or not llm.args.speculative_tokens:
                        trial_results.append(run_ours(llm, prompts, args.gen, dtype_name))
                trial_results.append(run_hf(hf, prompts, args.gen, dtype_name, pad_id))
                if n == 1 and args.speculative_tokens:
                    trial_results.append(run_hf(hf, prompts, args.gen, dtype_name, pad_id, lookup=args.speculative_tokens))
                for r in trial_results:
                    r.trial = trial
                results.extend(trial_results)
                runs = ", ".join(f"{r.system} {r.tokens_per_second:.1f}" for r in trial_results)
                print(f"  {dtype_name} n={n} trial {trial + 1}/{args.trials}: {runs} tok/s", file=sys.stderr)
        del llms, hf
        gc.collect()

    print("\n| requests | system | best tok/s | transformers best tok/s | ratio | median of trial ratios |")
    print("|---|---|---|---|---|---|")
    for n in [1] + list(args.requests):
        base = max((r for r in results if r.system == "transformers" and r.num_requests == n), key=lambda r: r.tokens_per_second)
        for system in dict.fromkeys(r.system for r in results if r.system != "transformers"):
            runs = [r for r in results if r.system == system and r.num_requests == n]
            if not runs:
                continue
            ours = max(runs, key=lambda r: r.tokens_per_second)
            print(f"| {n} | {system} | {ours.tokens_per_second:.1f} ({ours.dtype}) | {base.tokens_per_second:.1f} ({base.dtype}) "
                  f"| {ours.tokens_per_second / base.tokens_per_second:.2f}x | {median_trial_ratio(results, system, n)} |")
    print("\nall runs:")
    for r in results:
        drafts = f"  drafts accepted {r.accepted_draft_tokens}/{r.draft_tokens}" if r.draft_tokens else ""
        print(f"  {r.system:22s} {r.dtype:9s} n={r.num_requests:3d} trial {r.trial + 1} {r.generated_tokens:6d} tokens {r.seconds:7.2f} s "
              f"{r.tokens_per_second:8.1f} tok/s{drafts}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
