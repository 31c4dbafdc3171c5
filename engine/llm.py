"""`LLM`: the offline API. Give it prompts, get completions; the continuous-batching engine runs underneath."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union, cast

from tokenwire.engine.config import EngineArgs
from tokenwire.engine.core import EngineCore
from tokenwire.engine.info import EngineStats, ModelInfo
from tokenwire.engine.loader import load_model
from tokenwire.engine.outputs import Completion, RequestOutput
from tokenwire.engine.request import GenerationRequest
from tokenwire.engine.sampling_params import SamplingParams

ChatMessages = Sequence[Mapping[str, str]]
Prompt = Union[str, Sequence[int], ChatMessages]


class LLM:
    """A model with its engine, for batch generation in-process.

    Example:
        >>> llm = LLM()  # the embedded default model
        >>> [c.text for c in llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))]
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto", **engine_kwargs: object) -> None:
        self.args = EngineArgs(model=model, dtype=dtype, device=device, **engine_kwargs)  # type: ignore[arg-type]
        self.loaded = load_model(model, dtype=dtype, device=device)
        self.core = EngineCore(self.loaded, self.args)
        self._counter = 0

    @property
    def tokenizer(self) -> object:
        """The model's tokenizer."""
        return self.core.tokenizer

    def model_info(self) -> ModelInfo:
        """What is loaded."""
        return self.core.model_info()

    def stats(self) -> EngineStats:
        """The engine's counters."""
        return self.core.stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix, so that the next prompts are computed in full.

        For measurements that repeat a prompt set, and after the cached keys and values stop being
        wanted. Between ``generate`` calls no request is running, so this always empties the cache
        and returns True.
        """
        return self.core.reset_prefix_cache()

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run every prompt through the engine together and return their completions, in order.

        A prompt is a text, a list of token ids, or a chat (a list of {"role", "content"} dicts). All
        prompts are validated before any runs (an invalid one raises InvalidRequestError).
        """
        items = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            per = [params or SamplingParams()] * len(items)
        else:
            per = list(params)
            if len(per) != len(items):
                raise ValueError(f"got {len(items)} prompts but {len(per)} SamplingParams")
        seqs = [self.core.make_sequence(self._request(p, sp)) for p, sp in zip(items, per)]
        results: dict[str, RequestOutput] = {s.request_id: RequestOutput(s.request_id) for s in seqs}
        pending = list(reversed(seqs))
        try:
            while pending or self.core.has_unfinished():
                # Feed the queue as it drains, so any number of prompts fits a bounded waiting queue.
                while pending and len(self.core.scheduler.waiting) < self.args.max_queued_requests:
                    self.core.add_sequence(pending.pop())
                for out in self.core.step():
                    if out.request_id in results:
                        results[out.request_id].merge(out)
        except BaseException:
            # NOTE: a failed (or interrupted) call leaves nothing behind: its requests would
            # otherwise stay queued and run, or fail again, in the next call.
            for seq in seqs:
                self.core.abort(seq.request_id)
            raise
        completions = []
        for seq in seqs:
            out = results[seq.request_id]
            assert out.finish_reason is not None and out.usage is not None  # the loop ran every request to its end
            completions.append(
                Completion(
                    request_id=seq.request_id,
                    prompt_token_ids=list(seq.prompt_token_ids),
                    token_ids=out.token_ids,
                    text=out.text,
                    finish_reason=out.finish_reason,
                    usage=out.usage,
                    logprobs=out.logprobs,
                )
            )
        return completions

    def _request(self, prompt: Prompt, params: SamplingParams) -> GenerationRequest:
        self._counter += 1
        rid = f"llm-{self._counter}"
        if isinstance(prompt, str):
            return GenerationRequest(rid, prompt=prompt, params=params)
        if prompt and isinstance(prompt[0], Mapping):
            return GenerationRequest(rid, messages=list(prompt), params=params)  # type: ignore[arg-type]
        return GenerationRequest(rid, prompt_token_ids=list(prompt), params=params)  # type: ignore[arg-type]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, chat) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if not prompts:
        return []
    first = prompts[0]
    if isinstance(first, int) or isinstance(first, Mapping):
        return [cast(Prompt, prompts)]  # a single token-id list or a single chat
    return list(prompts)  # type: ignore[arg-type]
