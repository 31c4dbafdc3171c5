"""Engine mechanics on a tiny random seed ProductionTransformer served from a folder: aborts, streaming text, batching."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tokenwire.engine import LLM, FinishReason, InvalidRequestError, SamplingParams
from tokenwire.engine.core import EngineCore
from tokenwire.engine.loader.production_arch import save_folder
from tokenwire.engine.models.production_transformer import ProductionTransformer, ProductionTransformerConfig
from tokenwire.engine.outputs import RequestOutput
from tokenwire.engine.request import GenerationRequest
from tokenwire.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm(seed_model_folder: Path) -> LLM:
    return LLM(str(seed_model_folder), dtype="float32", max_num_seqs=8, max_num_batched_tokens=48)


def test_seed_model_serves_and_matches_its_own_greedy_generate(llm: LLM) -> None:
    assert llm.model_info().architecture == "production_transformer"
    prompts = [[random.Random(i).randint(10, 4000) for _ in range(5 + 7 * i)] for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts, params)
    model = llm.loaded.model
    for prompt, got in zip(prompts, together):
        dense = model.greedy_generate(torch.tensor([prompt]), max_new_tokens=12)
        assert got.token_ids == dense[0, len(prompt) :].tolist()
        assert llm.generate([prompt], params)[0].token_ids == got.token_ids


def test_batched_prefill_path_gives_the_same_tokens(llm: LLM) -> None:
    """The CUDA-style loop-free prefill attention, forced on CPU, changes no token."""
    prompts = [[random.Random(50 + i).randint(10, 4000) for _ in range(9 + 11 * i)] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = llm.generate(prompts, params)
    llm.core.runner.batch_prefills = True
    try:
        got = llm.generate(prompts, params)
    finally:
        llm.core.runner.batch_prefills = False
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]


def test_reset_prefix_cache_makes_the_next_prompt_compute_in_full(llm: LLM) -> None:
    prompt = [random.Random(77).randint(10, 4000) for _ in range(40)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    assert llm.generate([prompt], params)[0].usage.cached_prompt_tokens >= 32  # two full blocks of 16
    assert llm.reset_prefix_cache()
    again = llm.generate([prompt], params)[0]
    assert again.usage.cached_prompt_tokens == 0
    assert again.token_ids == first.token_ids
    assert llm.stats().kv_blocks_used == 0


def test_logits_past_the_tokenizer_are_never_sampled(tmp_path: Path, default_model_path: Path) -> None:
    """A model whose vocabulary is padded past its tokenizer's (as some checkpoints are) samples real tokens only."""
    tokenizer = Tokenizer.from_gguf(default_model_path)
    torch.manual_seed(1)
    config = ProductionTransformerConfig(
        vocab_size=tokenizer.vocab_size + 1024, d_model=32, num_heads=2, num_layers=1, dim_feedforward=64,
        dropout=0.0, max_len=128, tie_weights=False,
    )
    model = ProductionTransformer(config)
    with torch.no_grad():
        # Real tokens' logits all 0, the padding's random: the padding would win every argmax.
        model.lm_head.weight[: tokenizer.vocab_size] = 0.0
    save_folder(model, tmp_path)
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    llm = LLM(str(tmp_path), dtype="float32")
    prompts = [[11 + i, 12, 13] for i in range(4)]
    for params in (
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, logprobs=True),
    ):
        outs = llm.generate(prompts, params)
        assert all(len(o.token_ids) == 8 for o in outs)
        assert max(t for o in outs for t in o.token_ids) < tokenizer.vocab_size
    with pytest.raises(InvalidRequestError, match="unknown token id"):
        llm.generate([[tokenizer.vocab_size + 5]], params)


def test_random_aborts_free_every_block(seed_model_folder: Path, llm: LLM) -> None:
    core = EngineCore(llm.loaded, llm.args)
    rng = random.Random(1)
    finals: dict[str, RequestOutput] = {}
    open_ids = []
    for i in range(16):
        rid = f"r{i}"
        core.add_request(
            GenerationRequest(rid, prompt_token_ids=[rng.randint(10, 4000) for _ in range(rng.randint(3, 60))],
                              params=SamplingParams(temperature=1.0, seed=i, max_tokens=rng.randint(1, 30)))
        )
        open_ids.append(rid)
    steps = 0
    while core.has_unfinished():
        outs = core.step()
        steps += 1
        if rng.random() < 0.3 and core.requests:
            out = core.abort(rng.choice(sorted(core.requests)))
            assert out is not None and out.finish_reason is FinishReason.CANCELLED
            outs.append(out)
        for out in outs:
            if out.finished:
                assert out.request_id not in finals, "exactly one final output per request"
                finals[out.request_id] = out
    assert sorted(finals) == sorted(open_ids)
    assert any(o.finish_reason is FinishReason.CANCELLED for o in finals.values())
    assert core.block_manager.num_used_blocks == 0
    assert core.abort("r0") is None  # finished ids are harmless


def test_streamed_text_concatenates_to_the_decoded_completion(llm: LLM) -> None:
    """Random sampling over a byte-level vocabulary splits multi-byte characters across tokens."""
    core = EngineCore(llm.loaded, llm.args)
    tok = llm.tokenizer
    prompt = tok.encode("Les élèves étudient le 日本語 et les émojis 🎉🎉")
    for i in range(6):
        core.add_request(GenerationRequest(f"s{i}", prompt_token_ids=prompt, params=SamplingParams(temperature=1.0, seed=100 + i, max_tokens=40, ignore_eos=True)))
    texts: dict[str, list[str]] = {}
    ids: dict[str, list[int]] = {}
    while core.has_unfinished():
        for out in core.step():
            texts.setdefault(out.request_id, []).append(out.text)
            ids.setdefault(out.request_id, []).extend(out.token_ids)
    for rid, deltas in texts.items():
        assert "".join(deltas) == tok.decode(ids[rid])
        # A replacement character may only come from bytes that never complete, never mid-stream.
        assert all("\ufffd" not in d for d in deltas[:-1]) or "\ufffd" in tok.decode(ids[rid])


def test_text_that_encodes_past_the_model_is_refused_and_others_go_on(tmp_path: Path, default_model_path: Path) -> None:
    """A tokenizer with more tokens than the model has rows: a text prompt that encodes to one of
    them is refused with a clear error, and the engine goes on serving other requests."""
    tokenizer = Tokenizer.from_gguf(default_model_path)
    rows = tokenizer.vocab_size - 1000
    torch.manual_seed(2)
    config = ProductionTransformerConfig(
        vocab_size=rows, d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, dropout=0.0, max_len=128,
        tie_weights=False,
    )
    save_folder(ProductionTransformer(config), tmp_path)
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    llm = LLM(str(tmp_path), dtype="float32")
    text = tokenizer.decode([tokenizer.vocab_size - 10])
    assert max(tokenizer.encode(text)) >= rows  # the text needs a token the model has no row for
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match=f"from the prompt's tokenization \\(vocab size {rows}\\)"):
        llm.generate([f"Hello {text}"], params)
    assert len(llm.generate(["Hello there"], params)[0].token_ids) == 3
    assert llm.stats().kv_blocks_used == 0


def _first_tokens(llm: LLM, prompt: list[int], n: int) -> tuple[list[int], str]:
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    return out.token_ids, out.text


def test_a_cancelled_request_streams_the_text_it_held_back(llm: LLM) -> None:
    """Text held back as a possible stop string's start belongs to tokens already streamed: the
    cancellation's final output carries it, so the deltas still add up to the tokens' decoding."""
    prompt = [random.Random(5).randint(10, 4000) for _ in range(12)]
    ids, text = _first_tokens(llm, prompt, 4)
    assert text and "\ufffd" not in text
    core = EngineCore(llm.loaded, llm.args)
    # Everything generated so far is a proper prefix of the stop string, so all of it is held back.
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[text + "\u0001never"])
    core.add_request(GenerationRequest("held", prompt_token_ids=prompt, params=params))
    deltas: list[str] = []
    got: list[int] = []
    while len(got) < 4:
        for out in core.step():
            deltas.append(out.text)
            got.extend(out.token_ids)
    assert got == ids and "".join(deltas) == ""
    final = core.abort("held")
    assert final is not None and final.finish_reason is FinishReason.CANCELLED
    assert "".join(deltas) + final.text == text
    assert core.block_manager.num_used_blocks == 0


def test_min_tokens_keeps_stop_strings_from_ending_the_request_too(llm: LLM) -> None:
    prompt = [random.Random(9).randint(10, 4000) for _ in range(10)]
    ids, text = _first_tokens(llm, prompt, 24)
    stop = llm.tokenizer.decode(ids[1:2])  # the second token's text: it appears within two tokens
    assert stop and "\ufffd" not in stop and text.index(stop) < len(llm.tokenizer.decode(ids[:2]))
    early = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert early.finish_reason is FinishReason.STOP and len(early.token_ids) <= 2
    params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=8, ignore_eos=True, stop=[stop])
    late = llm.generate([prompt], params)[0]
    assert len(late.token_ids) >= 8 and late.token_ids == ids[: len(late.token_ids)]
    # The stop string passed through below min_tokens; the text is the completion's, cut at most
    # before a later occurrence.
    assert stop in late.text and text.startswith(late.text)
    assert late.finish_reason is (FinishReason.STOP if len(late.token_ids) < 24 else FinishReason.LENGTH)
