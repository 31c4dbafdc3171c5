"""The synchronous engine core: admit, schedule, run, sample, detokenize, finish. Knows no asyncio."""

from __future__ import annotations

import operator

import torch

from tokenwire.engine import native
from tokenwire.engine.block_manager import BlockManager
from tokenwire.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_CUDA_KV_CACHE_FRACTION, EngineArgs
from tokenwire.engine.detokenizer import IncrementalDetokenizer
from tokenwire.engine.errors import DuplicateRequestError, InvalidRequestError, PromptTooLongError, QueueFullError
from tokenwire.engine.info import EngineStats, ModelInfo
from tokenwire.engine.loader import LoadedModel
from tokenwire.engine.models.gguf_linear import block_rows_limit, float_weight_parts, use_gguf_blocks
from tokenwire.engine.models.layers import enable_native_ops
from tokenwire.engine.models.packed_linear import can_prepack, prepack_linears
from tokenwire.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from tokenwire.engine.request import GenerationRequest
from tokenwire.engine.runner import ModelRunner, num_blocks_for_budget
from tokenwire.engine.sampler import Sampler, SamplingState
from tokenwire.engine.scheduler import ScheduledSequence, Scheduler
from tokenwire.engine.speculative import propose_ngram
from tokenwire.engine.sequence import Sequence


class EngineCore:
    """One model, one KV pool, one scheduler; ``step()`` runs one forward pass over a flat batch.

    Not thread-safe: the asyncio bridge calls it from a single engine thread. Request preparation
    (``make_sequence``) reads only immutable state, so it may run on another thread.
    """

    def __init__(self, loaded: LoadedModel, args: EngineArgs) -> None:
        self.loaded = loaded
        self.args = args
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        # NOTE: taken even when unused, so that the model lets go of the blocks' memory.
        gguf_blocks = model.gguf_linear_blocks() if hasattr(model, "gguf_linear_blocks") else {}
        native_ops = args.native_kernels and native.available(loaded.device, loaded.dtype)
        if native_ops and loaded.dtype == torch.float32:
            # NOTE: before prepacking, so that a layer the blocks serve alone is never packed.
            use_gguf_blocks(model, gguf_blocks, block_rows_limit())
            # The layers that came dense (a Hugging Face folder, a float GGUF tensor): their values,
            # packed for the same kernel, so that the whole stack runs natively.
            use_gguf_blocks(model, float_weight_parts(model), block_rows_limit())
        if args.prepack_weights and can_prepack(loaded.dtype, loaded.device):
            # NOTE: in place: the engine owns the loaded model from here on.
            prepack_linears(model, native_bf16=native_ops)
        if native_ops:
            enable_native_ops(model)
        spec = model.kv_cache_spec
        self.kv_cache_dtype = loaded.dtype if args.kv_cache_dtype == "auto" else getattr(torch, args.kv_cache_dtype)
        num_blocks = num_blocks_for_budget(spec, self.kv_cache_dtype, args.block_size, self._kv_budget_bytes())
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory={args.kv_cache_memory!r} holds {num_blocks} blocks of {args.block_size} tokens; "
                f"at least 2 are needed ({spec.bytes_per_token(self.kv_cache_dtype) * args.block_size} bytes per block)"
            )
        # NOTE: a request may never need more blocks than the whole pool, so that one sequence
        # alone always fits and preemption always ends; longer contexts are cut here, not hung.
        limit = min(loaded.max_context_length, num_blocks * args.block_size)
        self.max_model_len = min(args.max_model_len or limit, limit)
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        drafter = self._draft if args.speculative_tokens else None
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens, drafter)
        self.runner = ModelRunner(
            model,
            num_blocks,
            args.block_size,
            loaded.dtype,
            loaded.device,
            native_kernels=args.native_kernels,
            cache_dtype=self.kv_cache_dtype,
        )
        self.sampler = Sampler(seed=args.seed, device=loaded.device, native_kernels=native_ops)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        # NOTE: a model may have more logits than its tokenizer has tokens (rows padded to a round
        # size): the extra ids decode to nothing, so they are never sampled and never accepted.
        self.vocab_size = min(model.vocab_size, self.tokenizer.vocab_size)
        self.requests: dict[str, Sequence] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.draft_tokens_total = 0
        self.accepted_draft_tokens_total = 0

    def _kv_budget_bytes(self) -> int:
        mem = self.args.kv_cache_memory
        device = self.loaded.device
        if isinstance(mem, int):
            return mem
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free * (mem if mem is not None else DEFAULT_CUDA_KV_CACHE_FRACTION))
        if mem is not None:
            raise ValueError("kv_cache_memory as a fraction is for CUDA devices; give bytes on CPU")
        return DEFAULT_CPU_KV_CACHE_BYTES

    # ---- admission -------------------------------------------------------------------------

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; raises InvalidRequestError for a missing, doubled or bad prompt."""
        given = [x is not None for x in (request.prompt, request.prompt_token_ids, request.messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt text, prompt token ids or chat messages")
        if request.prompt is not None:
            ids = self.tokenizer.encode(request.prompt)
        elif request.messages is not None:
            if not request.messages:
                raise InvalidRequestError("chat has no messages")
            ids = self.tokenizer.encode_chat(list(request.messages), add_generation_prompt=True)
        else:
            try:
                # NOTE: operator.index refuses floats (5.7 is not token 5).
                ids = [operator.index(t) for t in request.prompt_token_ids or ()]
            except TypeError:
                raise InvalidRequestError("prompt token ids must be integers") from None
        if not ids:
            raise InvalidRequestError("prompt is empty")
        # NOTE: text can encode to ids past the model's rows too: a tokenizer's added tokens
        # may outnumber the embedding's rows, and such an id would fail the whole step.
        vocab = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            given_as = "in prompt" if request.prompt_token_ids is not None else "from the prompt's tokenization"
            raise InvalidRequestError(f"unknown token id {bad} {given_as} (vocab size {vocab})")
        return ids

    def make_sequence(self, request: GenerationRequest) -> Sequence:
        """Validate and tokenize a request into a Sequence (reads only immutable state)."""
        if not request.request_id:
            raise InvalidRequestError("request_id must not be empty")
        params = request.params
        ids = self.tokenize(request)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; the context length is {self.max_model_len} "
                "and at least one token must be generated"
            )
        vocab = self.vocab_size
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"unknown token id {bad} in stop_token_ids (vocab size {vocab})")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seq = Sequence(
            request_id=request.request_id,
            prompt_token_ids=ids,
            params=params,
            max_tokens=max_tokens,
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
        )
        seq.sampling_state = SamplingState(params, ids, self.eos_token_ids, device=self.loaded.device)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a prepared sequence; raises for a duplicate id or a full queue."""
        if seq.request_id in self.requests:
            raise DuplicateRequestError(f"request_id {seq.request_id!r} is already in use by an open request")
        if len(self.scheduler.waiting) >= self.args.max_queued_requests:
            raise QueueFullError(f"the waiting queue is full ({self.args.max_queued_requests} requests); retry later")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens_total += seq.num_prompt_tokens

    def add_request(self, request: GenerationRequest) -> None:
        """Validate, tokenize and queue a request."""
        self.add_sequence(self.make_sequence(request))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel an open request and free its blocks now; None if it is unknown or finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        # The text held back (a possible stop string's start, a character's first bytes) belongs to
        # tokens already streamed: the deltas must still add up to their decoding.
        return RequestOutput(
            request_id, text=seq.detokenizer.finish(), finish_reason=FinishReason.CANCELLED, usage=seq.usage()
        )

    # ---- the step --------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one engine step and return each sampled request's new tokens (and final outputs)."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        result = self.runner.execute(sched)
        self.scheduler.update(sched.scheduled)
        if not result.sampled:
            return []
        if result.logits.shape[1] > self.vocab_size:
            with torch.inference_mode():  # the runner's logits are inference tensors
                result.logits[:, self.vocab_size :] = float("-inf")
        states = [item.seq.sampling_state for item in result.sampled for _ in range(item.num_sampled_rows)]
        # Row j of a drafted sequence verifies draft j; its last row has nothing to verify.
        drafts = [d for item in result.sampled for d in (*item.draft_token_ids, None)]
        sampled = self.sampler(result.logits, states, drafts if any(d is not None for d in drafts) else None)
        outputs = []
        row = 0
        for item in result.sampled:
            rows = slice(row, row + item.num_sampled_rows)
            row = rows.stop
            outputs.append(self._accept(item, sampled.token_ids[rows], sampled.logprobs[rows]))
        return outputs

    def _accept(self, item: ScheduledSequence, tokens: list[int], logprobs: list[TokenLogprob | None]) -> RequestOutput:
        """Append a sequence's sampled tokens: its drafts as far as the model agrees, then one of its own.

        Row j samples what follows draft j-1, so while drafts match their rows' tokens they are what
        decoding one token at a time would have produced; the first row that disagrees gives the
        correction, and a sequence whose drafts all match gains one token more.
        """
        seq, drafts = item.seq, item.draft_token_ids
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == tokens[accepted]:
            accepted += 1
        self.draft_tokens_total += len(drafts)
        self.accepted_draft_tokens_total += accepted
        out = RequestOutput(seq.request_id)
        for token, logprob in zip(tokens[: accepted + 1], logprobs[: accepted + 1]):
            self._append(seq, token, logprob, out)
            if out.finished:
                return out
        self.scheduler.accept_drafts(seq, accepted)
        return out

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None, out: RequestOutput) -> None:
        # Adds one token to the sequence and to ``out``; sets the finish reason when it ends the request.
        seq.append_token(token)
        seq.sampling_state.append(token)
        self.generation_tokens_total += 1
        params = seq.params
        out.token_ids.append(token)
        if logprob is not None:
            out.logprobs.append(logprob)
        stopped_by_string = False
        if token in params.stop_token_ids or token in seq.eos_token_ids:
            # The stop token is reported in token_ids but never enters the text.
            out.finish_reason = FinishReason.STOP
        else:
            # NOTE: below min_tokens a stop string does not end the request, as a stop token cannot.
            update = seq.detokenizer.add_tokens([token], watch_stops=seq.num_output_tokens >= params.min_tokens)
            out.text += update.text
            if update.stopped:
                out.finish_reason = FinishReason.STOP
                stopped_by_string = True
        if out.finish_reason is None and seq.num_output_tokens >= seq.max_tokens:
            out.finish_reason = FinishReason.LENGTH
        if out.finish_reason is not None:
            if not stopped_by_string:
                out.text += seq.detokenizer.finish()
            self.requests.pop(seq.request_id, None)
            self.scheduler.finish(seq)
            out.usage = seq.usage()

    def _draft(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Draft tokens for a decoding sequence, or [] where speculation would not pay or not be exact.

        Requests with penalties or an active min_tokens mask do not speculate: their rows' logits
        would depend on the drafts before them. Seeded sampled requests do not either: whether a
        step speculates depends on how many sequences run, and their tokens must depend on their
        seed alone.
        """
        state = seq.sampling_state
        if len(self.scheduler.running) > self.args.speculative_max_batch:
            return []
        if state.uses_penalties or state.masked_token_ids() or (not state.greedy and state.generator is not None):
            return []
        return propose_ngram(seq.token_ids, min(max_tokens, self.args.speculative_tokens))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block no running request holds (see ``BlockManager.reset_prefix_cache``).

        Returns True when the cache is empty, False when blocks of running requests keep theirs.
        """
        return self.block_manager.reset_prefix_cache()

    # ---- views -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Gauges and counters for metrics."""
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            prefix_cache_queried_tokens=bm.prefix_queried_tokens,
            prefix_cache_hit_tokens=bm.prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            draft_tokens_total=self.draft_tokens_total,
            accepted_draft_tokens_total=self.accepted_draft_tokens_total,
        )

    def model_info(self) -> ModelInfo:
        """What is served."""
        loaded = self.loaded
        return ModelInfo(
            model_name=loaded.name,
            architecture=loaded.architecture,
            vocab_size=self.runner.model.vocab_size,
            max_context_length=self.max_model_len,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            dtype=str(loaded.dtype).removeprefix("torch."),
            kv_cache_dtype=str(self.kv_cache_dtype).removeprefix("torch."),
            device=str(loaded.device),
            kv_block_size=self.args.block_size,
            kv_blocks_total=self.block_manager.num_blocks,
            max_num_seqs=self.args.max_num_seqs,
            has_chat_template=bool(getattr(self.tokenizer, "has_chat_template", False)),
        )
