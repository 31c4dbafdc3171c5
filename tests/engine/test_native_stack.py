"""The decoder stack as one native call (float32, bfloat16): the layers' bits, where it is used, what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tokenwire.engine import LLM, SamplingParams, native
from tokenwire.engine.attention import AttentionMetadata, PrefillChunk, PrefillTables
from tokenwire.engine.loader import load_gguf, load_hf
from tokenwire.engine.models.gguf_linear import block_rows_limit, use_gguf_blocks
from tokenwire.engine.models.layers import enable_native_ops
from tokenwire.engine.models.native_stack import NativeStack
from tokenwire.engine.models.packed_linear import prepack_linears

from .test_bf16_linear import needs_kernel as needs_bf16_kernel
from .test_loader import IDS, write_llama_gguf

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler here")


def _llm(kv_cache_dtype: str = "auto", dtype: str = "float32") -> LLM:
    # NOTE: a small pool and token budget, so that prompts are split into chunks across steps and
    # chunks meet earlier context in the pool.
    return LLM(
        dtype=dtype, kv_cache_memory=1 << 25, max_num_batched_tokens=96, enable_prefix_caching=True,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llm() -> LLM:
    return _llm()


def _run(llm: LLM, stack: NativeStack | None) -> list[tuple[list[int], list[float]]]:
    """Mixed requests (decodes beside prompt chunks, a prefix-cache hit, seeded sampling), with
    the model's layers run as ``stack`` says: the native stack, or the modules one by one."""
    model = llm.core.runner.model
    model._native_stack = stack
    llm.core.reset_prefix_cache()
    preamble = "You are a helpful assistant. Answer in one short sentence, and name your source. " * 6
    prompts = [
        "The capital of France is",
        preamble + "What is the tallest mountain on Earth?",
        "def fibonacci(n):\n    a, b = 0, 1\n",
        preamble + "Why is the sky blue?",
        "Once upon a time",
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True, logprobs=2),
    ]
    # The preamble first, so that the batch's two preamble prompts find it in the prefix cache.
    outs = llm.generate([preamble], params[0])
    outs += llm.generate(prompts, [params[i % 2] for i in range(len(prompts))])
    return [(o.token_ids, [p.logprob for p in o.logprobs]) for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "kv_cache_dtype"),
    [
        ("float32", "auto"), ("float32", "float16"), ("float32", "bfloat16"),
        pytest.param("bfloat16", "auto", marks=needs_bf16_kernel),
    ],
)  # fmt: skip
def test_the_stack_gives_the_bits_of_the_layers_run_one_by_one(llm: LLM, dtype: str, kv_cache_dtype: str) -> None:
    # A 16-bit pool: the stack rounds the new keys and values into it as torch's .to() does. A
    # bfloat16 model: its stack rounds where the modules round, and its adds round their sums.
    llm = llm if (dtype, kv_cache_dtype) == ("float32", "auto") else _llm(kv_cache_dtype, dtype)
    stack = llm.core.runner.model._stack()
    assert stack is not None, f"the default {dtype} model on this CPU has every part in native form"
    calls = []
    original = NativeStack.forward

    def counted(self: NativeStack, *args: object) -> torch.Tensor | None:
        result = original(self, *args)  # type: ignore[arg-type]
        calls.append(result is not None)
        return result

    hits = llm.stats().prefix_cache_hit_tokens
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NativeStack, "forward", counted)
        with_stack = _run(llm, stack)
    assert calls and all(calls), "every step of the run went through the native stack"
    assert llm.stats().prefix_cache_hit_tokens > hits, "a prompt's chunk met its cached preamble"
    # Token ids and logprobs, compared exactly: the same logits, bit for bit.
    assert with_stack == _run(llm, None)
    llm.core.runner.model._native_stack = stack


@needs_bf16_kernel
def test_a_bfloat16_stack_gives_the_bits_of_its_layers(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    """A tiny bfloat16 model: prompt chunks, decodes beside a chunk, and the last layer on some rows."""
    make_tiny_hf_llama(tmp_path, tied=False, seed=3)
    model = load_hf(tmp_path, torch.bfloat16, torch.device("cpu"), progress=False).model
    prepack_linears(model, native_bf16=True)
    enable_native_ops(model)
    stack = model._stack()
    assert stack is not None and stack.dtype == torch.bfloat16
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (31,), generator=torch.Generator().manual_seed(5))
    results = {}
    for name, use in (("stack", stack), ("layers", None)):
        model._native_stack = use
        caches = _caches(torch.bfloat16, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        hidden = []
        for (positions, meta), rows in zip(_mixed_steps(), [None, [0, 2, 4, 13]]):
            out_rows = None if rows is None else torch.tensor(rows)
            with torch.inference_mode():
                hidden.append(model.forward_flat(ids[: len(positions)], torch.tensor(positions), caches, meta, out_rows))
        results[name] = hidden, caches
    (h_stack, c_stack), (h_layers, c_layers) = results["stack"], results["layers"]
    assert all(torch.equal(a, b) for a, b in zip(h_stack, h_layers))
    assert all(torch.equal(a, b) for pair, other in zip(c_stack, c_layers) for a, b in zip(pair, other))


@pytest.mark.skipif(block_rows_limit() is not None, reason="the blocks serve only a few rows on this CPU")
def test_a_fused_weight_of_two_types_runs_in_the_stack_as_in_the_layers(tmp_path: Path, make_tiny_hf_llama: Any) -> None:
    assert native.available(torch.device("cpu"), torch.float32)  # NOTE: builds and loads the kernels
    hf_model = make_tiny_hf_llama(tmp_path / "hf", tied=False, seed=6)
    # As in a Q4_K_M file: the value projection of another type than q and k.
    v = hf_model.model.layers[0].self_attn.v_proj.weight.detach().float().numpy()
    override = {"blk.0.attn_v.weight": (gguf.quants.quantize(v, Q.Q4_0), Q.Q4_0)}
    write_llama_gguf(tmp_path / "tiny.gguf", hf_model, Q.Q8_0, override=override)
    model = load_gguf(tmp_path / "tiny.gguf", torch.float32, torch.device("cpu"), progress=False).model
    use_gguf_blocks(model, model.gguf_linear_blocks(), None)
    enable_native_ops(model)
    stack = model._stack()
    assert stack is not None and len(model.layers[0].self_attn.qkv_proj.parts) == 2
    cfg = model.config
    prompt = len(IDS)
    steps = [  # a prompt as one chunk, then two decodes, in block 0 of each layer's pool
        (IDS, list(range(prompt)), AttentionMetadata(
            slot_mapping=torch.arange(prompt), num_decode_tokens=0,
            decode_block_tables=torch.zeros((0, 1), dtype=torch.long), decode_context_lens=torch.zeros((0,), dtype=torch.long),
            prefills=[PrefillChunk(0, prompt, prompt, torch.tensor([0]))], prefill_kernel=native.paged_prefill_attention,
            prefill_tables=PrefillTables(torch.tensor([[0]]), torch.tensor([prompt]), torch.tensor([prompt])),
            decode_kernel=native.paged_decode_attention, kv_writer=native.write_kv,
        )),
        ([7], [prompt], _decode_meta([prompt], [prompt + 1], [0])),
        ([40], [prompt + 1], _decode_meta([prompt + 1], [prompt + 2], [0])),
    ]  # fmt: skip
    hidden = {}
    for name, use in (("stack", stack), ("layers", None)):
        model._native_stack = use
        pools = [(torch.zeros(2, 16, cfg.num_kv_heads, cfg.head_dim), torch.zeros(2, 16, cfg.num_kv_heads, cfg.head_dim))
                 for _ in range(cfg.num_layers)]  # fmt: skip
        with torch.inference_mode():
            hidden[name] = [
                model.forward_flat(torch.tensor(ids), torch.tensor(pos), pools, meta) for ids, pos, meta in steps
            ]
    assert all(torch.equal(a, b) for a, b in zip(hidden["stack"], hidden["layers"]))


def test_the_stack_is_built_only_where_every_part_is_native() -> None:
    # A bfloat16 model's projections are native only where the CPU has AVX512-BF16.
    bf16 = LLM(dtype="bfloat16", kv_cache_memory=1 << 24).core.runner.model
    assert (bf16._stack() is not None) == native.bf16_linear_available()
    plain = LLM(dtype="float32", kv_cache_memory=1 << 24, native_kernels=False).core.runner.model
    assert not plain.native_ops
    assert NativeStack.for_layers(plain.layers, plain.config) is None


def _decode_meta(slots: list[int], lens: list[int], table: list[int], **kwargs: object) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=len(lens),
        decode_block_tables=torch.tensor([table] * len(lens)),
        decode_context_lens=torch.tensor(lens),
        kv_writer=native.write_kv,
        decode_kernel=native.paged_decode_attention,
        **kwargs,  # type: ignore[arg-type]
    )


def _caches(
    dtype: torch.dtype = torch.float32, layers: int = 30, kv_heads: int = 3, head_dim: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pools of 4 blocks (64 slots), by default for the default model's 30 layers."""
    shape = (4, 16, kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(layers)]


def test_a_step_the_stack_does_not_take_is_left_to_the_layers(llm: LLM) -> None:
    stack = llm.core.runner.model._stack()
    assert stack is not None
    x = torch.randn(1, 576)
    rope = llm.core.runner.model.rotary.tables(torch.tensor([0]))
    before = x.clone()
    # A prompt chunk without the prefill kernel.
    chunk = PrefillChunk(query_start=0, query_len=1, context_len=1, block_table=torch.tensor([0]))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([0]), num_decode_tokens=0, decode_block_tables=torch.zeros((0, 1), dtype=torch.long),
        decode_context_lens=torch.zeros((0,), dtype=torch.long), prefills=[chunk], kv_writer=native.write_kv,
    )  # fmt: skip
    assert stack.forward(x, rope, _caches(), meta) is None
    assert torch.equal(x, before)


def test_the_stack_refuses_what_it_cannot_read(llm: LLM) -> None:
    stack = llm.core.runner.model._stack()
    assert stack is not None
    rope = llm.core.runner.model.rotary.tables(torch.tensor([0, 1]))
    caches = _caches()
    x = torch.randn(2, 576)
    before = x.clone()
    # A slot past the pool's 64: refused before anything is written, so x and the pools are as they were.
    with pytest.raises(ValueError, match="out of range"):
        stack.forward(x, rope, caches, _decode_meta([3, 64], [4, 2], [0]))
    assert torch.equal(x, before)
    assert not any(c.any() for pair in caches for c in pair)
    # A block id outside the pool, and query lengths that do not add up to the prompt rows.
    with pytest.raises(ValueError, match="out of range"):
        stack.forward(x, rope, caches, _decode_meta([3, 4], [4, 5], [9]))
    tables = PrefillTables(torch.tensor([[0]]), query_lens=torch.tensor([3]), context_lens=torch.tensor([3]))
    chunk = PrefillChunk(query_start=0, query_len=2, context_len=2, block_table=torch.tensor([0]))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([0, 1]), num_decode_tokens=0, decode_block_tables=torch.zeros((0, 1), dtype=torch.long),
        decode_context_lens=torch.zeros((0,), dtype=torch.long), prefills=[chunk], kv_writer=native.write_kv,
        prefill_kernel=native.paged_prefill_attention, prefill_tables=tables,
    )  # fmt: skip
    with pytest.raises(ValueError, match="do not add up"):
        stack.forward(x, rope, caches, meta)
    # Pools that do not match the model's layers, or that the kernels do not read.
    with pytest.raises(ValueError, match="one pair"):
        stack.forward(x, rope, caches[:3], _decode_meta([3, 4], [4, 5], [0]))
    with pytest.raises(ValueError, match="one pair"):
        narrow_heads = [(k[..., :32].contiguous(), v[..., :32].contiguous()) for k, v in caches]
        stack.forward(x, rope, narrow_heads, _decode_meta([3, 4], [4, 5], [0]))
    with pytest.raises(ValueError, match=r"need \[T, 576\]"):
        stack.forward(torch.randn(2, 64), rope, caches, _decode_meta([3, 4], [4, 5], [0]))
    with pytest.raises(ValueError, match="float16 pool"):
        stack.forward(x, rope, _caches(torch.float64), _decode_meta([3, 4], [4, 5], [0]))
    # bfloat16 rows: the wrapper wants a bfloat16 pool for them, and the C code a bfloat16 plan
    # (this float32 one would have its norms read at the wrong width), before anything runs.
    cfg = llm.core.runner.model.config
    args = (rope[0].squeeze(-2), rope[1].squeeze(-2), torch.tensor([3, 4]))
    meta = _decode_meta([3, 4], [4, 5], [0])
    tables = (meta.decode_block_tables, meta.decode_context_lens, torch.zeros((0, 1), dtype=torch.long))
    empty = torch.zeros((0,), dtype=torch.long)
    shapes = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                  eps=cfg.rms_norm_eps, scale=0.125)  # fmt: skip
    for pools in (_caches(), _caches(torch.float16), _caches(torch.bfloat16)):
        with pytest.raises(ValueError, match="bfloat16"):
            native.decoder_stack(stack.plan, x.bfloat16(), *args, pools[0][0], *tables, empty, empty, **shapes)
        assert not any(c.any() for pair in pools for c in pair)
    meta = _decode_meta([3, 4], [4, 5], [0])
    object.__setattr__(meta, "slot_mapping", meta.slot_mapping.int())
    with pytest.raises(ValueError, match="int64"):
        stack.forward(x, rope, caches, meta)


def _mixed_steps() -> list[tuple[list[int], AttentionMetadata]]:
    """Two steps over the 4-block pools of ``_caches``: prompts A (20 tokens, blocks 0-1) and B (11,
    block 2) as chunks; then A's first decode beside B's next 4 tokens and a new prompt C (9, block 3)."""
    none = torch.zeros((0,), dtype=torch.long)

    def step(positions: list[int], slots: list[int], decodes: list[tuple[list[int], int]],
             chunks: list[tuple[list[int], int, int]]) -> tuple[list[int], AttentionMetadata]:
        width = max(len(t) for t, *_ in chunks)
        tables = torch.tensor([t + [0] * (width - len(t)) for t, *_ in chunks])
        starts = [len(decodes) + sum(q for _, q, _ in chunks[:i]) for i in range(len(chunks))]
        return positions, AttentionMetadata(
            slot_mapping=torch.tensor(slots), num_decode_tokens=len(decodes),
            decode_block_tables=torch.tensor([t for t, _ in decodes]) if decodes else none.view(0, 1),
            decode_context_lens=torch.tensor([n for _, n in decodes]) if decodes else none,
            prefills=[PrefillChunk(s, q, c, torch.tensor(t)) for s, (t, q, c) in zip(starts, chunks)],
            prefill_tables=PrefillTables(tables, torch.tensor([q for _, q, _ in chunks]), torch.tensor([c for *_, c in chunks])),
            decode_kernel=native.paged_decode_attention, prefill_kernel=native.paged_prefill_attention,
            kv_writer=native.write_kv,
        )  # fmt: skip

    first = step(list(range(20)) + list(range(11)), list(range(20)) + list(range(32, 43)), [],
                 [([0, 1], 20, 20), ([2], 11, 11)])  # fmt: skip
    second = step([20] + list(range(11, 15)) + list(range(9)), [20] + list(range(43, 47)) + list(range(48, 57)),
                  [([0, 1], 21)], [([2], 4, 15), ([3], 9, 9)])  # fmt: skip
    return [first, second]


def test_output_rows_get_the_bits_of_the_whole_batch_and_every_row_its_keys_and_values(llm: LLM) -> None:
    model = llm.core.runner.model
    stack = model._stack()
    assert stack is not None
    ids = torch.randint(0, 49152, (31,), generator=torch.Generator().manual_seed(4))
    steps = _mixed_steps()

    def run(wanted: list[list[int] | None]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        caches, hidden = _caches(), []
        for (positions, meta), rows in zip(steps, wanted):
            x = model.embed_tokens(ids[: len(positions)])
            rope = model.rotary.tables(torch.tensor(positions))
            out_rows = None if rows is None else torch.tensor(rows, dtype=torch.long)
            with torch.inference_mode():
                hidden.append(stack.forward(x, rope, caches, meta, out_rows).clone())
        return hidden, caches

    full, full_caches = run([None, None])
    # The chunks' last rows, then the decode, a middle row of B's chunk (its own position) and C's last.
    wanted = [[19, 30], [0, 2, 4, 13]]
    hidden, caches = run(wanted)
    for h, f, rows in zip(hidden, full, wanted):
        assert torch.equal(h, f[rows])
    assert all(torch.equal(a, b) for pair, full_pair in zip(caches, full_caches) for a, b in zip(pair, full_pair))
    # No output rows: the keys and values alone.
    hidden, caches = run([[], []])
    assert [h.shape[0] for h in hidden] == [0, 0]
    assert all(torch.equal(a, b) for pair, full_pair in zip(caches, full_caches) for a, b in zip(pair, full_pair))


def test_output_rows_must_be_ascending_rows_of_the_batch(llm: LLM) -> None:
    model = llm.core.runner.model
    stack = model._stack()
    assert stack is not None
    positions, meta = _mixed_steps()[0]
    rope = model.rotary.tables(torch.tensor(positions))
    for rows in ([30, 19], [19, 19], [31], [-1]):
        caches = _caches()
        with pytest.raises(ValueError, match="ascending rows"):
            stack.forward(torch.randn(31, 576), rope, caches, meta, torch.tensor(rows))
        assert not any(c.any() for pair in caches for c in pair), "refused before anything is written"


@needs_bf16_kernel
def test_a_bfloat16_model_with_a_float32_cache_runs_its_layers_one_by_one() -> None:
    llm = LLM(dtype="bfloat16", kv_cache_dtype="float32", kv_cache_memory=1 << 24)
    results = []
    original = NativeStack.forward

    def counted(self: NativeStack, *args: object) -> torch.Tensor | None:
        results.append(original(self, *args))  # type: ignore[arg-type]
        return results[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NativeStack, "forward", counted)
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert results and all(r is None for r in results), "the bfloat16 stack writes bfloat16 pools only"
    assert len(out[0].token_ids) == 4
