"""A LLaMA decoder stack (float32 or bfloat16) as one native call, for models whose every layer part has its native form."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tokenwire.engine import native
from tokenwire.engine.attention import AttentionMetadata
from tokenwire.engine.models.gguf_linear import GGUFLinear
from tokenwire.engine.models.packed_linear import NativeBf16Linear

if TYPE_CHECKING:
    from tokenwire.engine.models.llama import LlamaConfig

# The four projections of a layer, in the plan's order (csrc/decoder_stack.cpp).
_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# Parts a projection may have: a fused weight is one part per run of shards of one GGUF type.
_MAX_PARTS = 3
# The type of a bfloat16 projection's one part, packed by native.bf16_pack (kBf16Part in the C code).
_BF16_PART = -1
# A layer's row in the plan: two norms, per projection _MAX_PARTS (weight, type, columns) triples,
# then the two pools, in its last two columns.
_KEY_CACHE, _VALUE_CACHE = -2, -1


class NativeStack:
    """The decoder layers of a LLaMA model run by ``native.decoder_stack``: the same kernels the
    layers' modules call, so the same bits, without the Python and torch dispatch between them
    (about 10 us an op, a dozen ops a layer).

    Build it with ``for_layers``, which says None where some part of a layer has no native form.
    """

    def __init__(self, layers: nn.ModuleList, config: LlamaConfig) -> None:
        rows = []
        for layer in layers:
            row = [layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr()]
            for name in _PROJECTIONS:
                parts = _parts(layer.get_submodule(name))
                for part in parts:
                    row += list(part)
                row += [0, 0, 0] * (_MAX_PARTS - len(parts))
            rows.append(row + [0, 0])
        fields = native.decoder_stack_plan_fields()
        if len(rows[0]) != fields:
            raise RuntimeError(f"a plan row of {len(rows[0])} fields, the native stack takes {fields}")
        # NOTE: the plan holds raw addresses; the stack keeps the layers, and so their weights, alive.
        self.layers = layers
        self.plan = torch.tensor(rows, dtype=torch.int64)
        self.config = config
        self.dtype = layers[0].input_layernorm.weight.dtype
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def for_layers(cls, layers: nn.ModuleList, config: LlamaConfig) -> NativeStack | None:
        """The stack for these layers, or None unless every norm, attention and MLP has native ops
        switched on and every projection serves all rows from packed weights: in float32, GGUF
        blocks or float values (at most three parts); in bfloat16, the native bfloat16 kernel's."""
        dtype = layers[0].input_layernorm.weight.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            return None
        for layer in layers:
            parts = (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn, layer.mlp)
            if not all(getattr(p, "native_ops", False) for p in parts):
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(w.dtype != dtype or not w.is_cpu or not w.is_contiguous() for w in norms):
                return None
            for name in _PROJECTIONS:
                linear = layer.get_submodule(name)
                if dtype == torch.bfloat16:
                    if not isinstance(linear, NativeBf16Linear):
                        return None
                elif not isinstance(linear, GGUFLinear) or linear.dense is not None or len(linear.parts) > _MAX_PARTS:
                    return None
        return cls(layers, config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Run every layer over x [T, hidden] (updated in place) and return it, or with
        ``output_rows`` the hidden states of those rows alone (``native.decoder_stack``); None,
        with nothing run, where the step needs a path the native stack does not take (a padded
        prompt batch, attention without the native kernels, a bfloat16 model's cache of another
        dtype)."""
        if (
            (self.dtype == torch.bfloat16 and kv_caches[0][0].dtype != torch.bfloat16)
            or meta.kv_writer is None
            or meta.prefill_batch is not None
            or (meta.num_decode_tokens and meta.decode_kernel is None)
            or (meta.prefills and (meta.prefill_kernel is None or meta.prefill_tables is None))
        ):
            return None
        cfg = self.config
        # NOTE: the plan's weights are laid out for the model's shapes; the C code trusts them.
        if x.dim() != 2 or x.shape[1] != cfg.hidden_size or x.dtype != self.dtype:
            raise ValueError(f"x {tuple(x.shape)} {x.dtype}: need [T, {cfg.hidden_size}] {self.dtype}")
        if kv_caches is not self._caches or self.plan[0, _KEY_CACHE] != kv_caches[0][0].data_ptr():
            self._set_caches(kv_caches)
        cos, sin = rope
        chunks = meta.prefill_tables
        if chunks is None:
            none = torch.zeros((0,), dtype=torch.int64)
            chunk_tables, query_lens, context_lens = none.view(0, 1), none, none
        else:
            chunk_tables, query_lens, context_lens = chunks.block_tables, chunks.query_lens, chunks.context_lens
        return native.decoder_stack(
            self.plan, x, cos.squeeze(-2), sin.squeeze(-2), meta.slot_mapping, kv_caches[0][0],
            meta.decode_block_tables[: meta.num_decode_tokens], meta.decode_context_lens,
            chunk_tables, query_lens, context_lens,
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
            eps=cfg.rms_norm_eps, scale=cfg.head_dim**-0.5, output_rows=output_rows,
        )  # fmt: skip

    def _set_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write the pools' addresses into the plan, once per list of pools (the runner's, made once)."""
        first, cfg = kv_caches[0][0], self.config
        if len(kv_caches) != self.plan.shape[0] or first.shape[2:] != (cfg.num_kv_heads, cfg.head_dim) or any(
            c.dtype != first.dtype or c.shape != first.shape or not c.is_contiguous() or not c.is_cpu
            for pair in kv_caches
            for c in pair
        ):
            raise ValueError(
                f"need one pair of contiguous CPU pools [blocks, block_size, {cfg.num_kv_heads}, {cfg.head_dim}] "
                "of one shape and dtype per layer"
            )
        self.plan[:, _KEY_CACHE] = torch.tensor([k.data_ptr() for k, _ in kv_caches])
        self.plan[:, _VALUE_CACHE] = torch.tensor([v.data_ptr() for _, v in kv_caches])
        self._caches = kv_caches


def _parts(linear: nn.Module) -> list[tuple[int, int, int]]:
    """A projection's (packed weight address, type, output columns) parts, as the plan holds them."""
    if isinstance(linear, NativeBf16Linear):
        return [(linear.weight.data.data_ptr(), _BF16_PART, linear.out_features)]
    return [(part.data.data_ptr(), part.ggml_type, part.out_features) for part in linear.parts]
