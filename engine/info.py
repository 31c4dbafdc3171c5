"""Read-only views of the engine for operators: the served model and live counters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What is served, where, and how big its KV pool is."""

    model_name: str
    architecture: str
    vocab_size: int
    max_context_length: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    kv_cache_dtype: str
    device: str
    kv_block_size: int
    kv_blocks_total: int
    max_num_seqs: int
    has_chat_template: bool


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's gauges and counters (counters only grow)."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    draft_tokens_total: int = 0
    accepted_draft_tokens_total: int = 0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of blocks held by live requests."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
