"""The interface every model offers the engine: a flat-batch forward over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from tokenwire.engine.attention import AttentionMetadata


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one token's keys and values per layer, from which the runner sizes the pool."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one token of context takes in the cache (keys and values, all layers)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@runtime_checkable
class EngineModel(Protocol):
    """What the runner calls. Models are torch modules that also offer this."""

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """Per-layer KV shape."""
        ...

    @property
    def max_context_length(self) -> int:
        """Most positions the model supports."""
        ...

    @property
    def vocab_size(self) -> int:
        """Rows of the output logits."""
        ...

    def forward_flat(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run a flat batch. input_ids, positions: [T]; returns hidden states [T, d_model], or with
        ``output_rows`` (int64 [N], ascending) those rows' alone, [N, d_model]: a model may then
        skip the last layer's work past its KV write for the other rows."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (if not applied yet) and LM head: [N, d_model] -> [N, vocab] float32."""
        ...
