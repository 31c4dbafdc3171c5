"""The LLaMA family (RoPE, RMSNorm, SwiGLU, grouped-query attention, tied or untied embeddings)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenwire.engine import native
from tokenwire.engine.attention import AttentionMetadata, paged_attention
from tokenwire.engine.models.base import KVCacheSpec
from tokenwire.engine.models.layers import RMSNorm, RopeTables, RotaryEmbedding, rotate
from tokenwire.engine.models.native_stack import NativeStack


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and constants of a LLaMA-family checkpoint.

    Attributes:
        vocab_size: rows of the embedding and of the LM head.
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); divides num_heads.
        head_dim: width of one head (usually hidden_size // num_heads, but not always).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base frequency.
        max_position_embeddings: most positions the model supports.
        tie_word_embeddings: the LM head reuses the embedding matrix.
        bos_token_id: beginning-of-sequence token, if the checkpoint names one.
        eos_token_ids: end-of-sequence tokens the checkpoint names (may be empty).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id {self.bos_token_id} is outside the vocabulary (size {self.vocab_size})")
        for eos in self.eos_token_ids:
            if not 0 <= eos < self.vocab_size:
                raise ValueError(f"eos_token_ids holds {eos}, outside the vocabulary (size {self.vocab_size})")


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; q, k and v come from one fused projection."""

    native_ops = False

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        # NOTE: one matmul instead of three: a decode step is bound by reading weights and by
        # per-op overhead, and a fused projection halves the latter.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def _qkv(self, x: torch.Tensor, rope: RopeTables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and rotate. x: [..., T, hidden] -> q: [..., T, H, D], k, v: [..., T, H_kv, D]."""
        lead = x.shape[:-1]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # NOTE: q and k sit side by side in the fused projection, so one rotation covers both.
        qk = qk.view(*lead, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.native_ops and qk.dim() == 3:
            # In place on the projection's output, which nothing else holds; tables [T, 1, D].
            native.rotary_(qk, rope[0].squeeze(-2), rope[1].squeeze(-2))
        else:
            qk = rotate(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=-2)
        return q, k, v.view(*lead, self.num_kv_heads, self.head_dim)

    def forward_flat(
        self,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        rope: RopeTables,
    ) -> torch.Tensor:
        """Attention for a flat batch through the paged cache. x: [T, hidden] -> [T, hidden]."""
        q, k, v = self._qkv(x, rope)  # q: [T, H, D]; k, v: [T, H_kv, D]
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, scale=self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(x.shape[0], self.q_size))

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """Dense causal attention. x: [B, T, hidden], rope: tables for positions 0..T-1 -> [B, T, hidden]."""
        q, k, v = self._qkv(x, rope)
        # q: [B, H, T, D]; k, v: [B, H_kv, T, D]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(o.transpose(1, 2).reshape(*x.shape[:-1], self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one projection."""

    native_ops = False

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] -> [..., hidden]."""
        if self.native_ops:
            return self.down_proj(native.silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # each [..., I]
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward_flat(
        self,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        rope: RopeTables,
    ) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        x = x + self.self_attn.forward_flat(self.input_layernorm(x), kv_cache, meta, rope)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


# Checkpoint names (Hugging Face convention, without the "model." prefix) that land in a slice of a
# fused parameter: name suffix -> (fused suffix, shard index).
_FUSED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}


class LlamaForCausalLM(nn.Module):
    """A LLaMA-family decoder with its LM head; implements the engine's ``EngineModel`` protocol.

    Parameters are created uninitialized (no random init: checkpoints overwrite every one);
    fill them with ``load_weights`` before use.

    Args:
        config: the checkpoint's shape.
        dtype: dtype of weights and activations (float32, bfloat16; float16 on CUDA).
        device: where the weights live.
    """

    # NOTE: switched on by enable_native_ops with the layers' modules: the layers may then run as
    # one native call (NativeStack), where every part of them has its native form.
    native_ops = False

    def __init__(
        self, config: LlamaConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.config = config
        self._native_stack: NativeStack | None = None
        self._native_stack_checked = False
        # NOTE: built on the meta device and then allocated uninitialized: a random init of every
        # weight would cost seconds on CPU and be overwritten by the checkpoint at once.
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
            self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.to(dtype)
        self.to_empty(device=device)
        self.rotary = self._make_rotary(torch.device(device))
        # Parameter name -> shard index -> (GGUF type, blocks), from ``keep_gguf_blocks``.
        self._gguf_parts: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}

    def _make_rotary(self, device: torch.device) -> RotaryEmbedding:
        cfg = self.config
        return RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(device)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        # NOTE: moving from the meta device (to_empty) gives each module a new Parameter, which
        # would untie a shared matrix; tie again after every conversion.
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # NOTE: the native stack holds the weights by address: looked for again at the next forward.
        self._native_stack, self._native_stack_checked = None, False
        # NOTE: .to(dtype)/.half()/to_empty() would also cast or wipe the RoPE tables, which are
        # derived constants that must stay exact float32; rebuild them wherever the weights went.
        if "rotary" in self._modules:
            self.rotary = self._make_rotary(self.embed_tokens.weight.device)
        return self

    # ---- EngineModel protocol ---------------------------------------------------------------

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """Per-layer KV shape."""
        return KVCacheSpec(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim)

    @property
    def max_context_length(self) -> int:
        """Most positions the model supports."""
        return self.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        """Rows of the output logits."""
        return self.config.vocab_size

    def forward_flat(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run a flat batch through the paged KV cache.

        Args:
            input_ids: [T] token ids (decode tokens first, then prefill chunks, as ``meta`` says).
            positions: [T] position of each token in its sequence.
            kv_caches: one (k_cache, v_cache) pair per layer, each [num_blocks, block_size, H_kv, D].
            meta: the batch's attention metadata.
            output_rows: int64 [N] ascending rows whose hidden states the caller reads (by default
                all). The native stack then runs the last layer's attention and MLP on those rows
                alone: a prompt chunk's other rows only need their keys and values.

        Returns:
            [T, hidden] hidden states before the final norm, or [N, hidden] for ``output_rows``
            (``compute_logits`` applies the norm, so that only the rows that are sampled pay for it).
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model has {len(self.layers)}")
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary.tables(positions)  # NOTE: looked up once, not once per layer.
        stack = self._stack() if self.native_ops else None
        if stack is not None:
            hidden = stack.forward(x, rope, kv_caches, meta, output_rows)
            if hidden is not None:
                return hidden
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer.forward_flat(x, kv_cache, meta, rope)
        return x if output_rows is None else x[output_rows]

    def _stack(self) -> NativeStack | None:
        """The layers as one native call, or None where a part of them has no native form.

        Looked for once, at the first forward after native ops are switched on: the engine
        switches them on after it has put the GGUF blocks and packed weights in place.
        """
        if not self._native_stack_checked:
            self._native_stack = NativeStack.for_layers(self.layers, self.config)
            self._native_stack_checked = True
        return self._native_stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [N, hidden] -> [N, vocab] float32."""
        return self.lm_head(self.norm(hidden)).float()

    # ---- library use ------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Dense causal forward over whole sequences (positions 0..T-1), no KV cache.

        Args:
            input_ids: [B, T] token ids.

        Returns:
            [B, T, vocab] float32 logits.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        x = self.embed_tokens(input_ids)  # [B, T, hidden]
        rope = self.rotary.tables(positions)
        for layer in self.layers:
            x = layer(x, rope)
        return self.compute_logits(x)

    def _shard_rows(self) -> dict[str, tuple[int, ...]]:
        """Fused parameter suffix -> rows of each shard along dim 0, so a shard knows its offset."""
        attn, mlp = self.layers[0].self_attn, self.layers[0].mlp
        return {
            "self_attn.qkv_proj.weight": (attn.q_size, attn.kv_size, attn.kv_size),
            "mlp.gate_up_proj.weight": (mlp.intermediate_size, mlp.intermediate_size),
        }

    def _num_shards(self, param_name: str) -> int:
        """How many checkpoint tensors fill a parameter: one per shard of a fused one, else one."""
        return next((len(rows) for suffix, rows in self._shard_rows().items() if param_name.endswith(suffix)), 1)

    def _destination(self, raw_name: str, params: dict[str, nn.Parameter]) -> tuple[str, int | None, slice] | None:
        """Where a checkpoint tensor goes: (parameter, shard index or None, rows), or None to skip it.

        Raises:
            ValueError: a name this model has no parameter for.
        """
        name = raw_name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            return None  # NOTE: a derived buffer some older checkpoints saved; ours is rebuilt.
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # NOTE: some tied checkpoints store the shared matrix twice.
        for suffix, (fused_suffix, index) in _FUSED.items():
            if name.endswith(suffix):
                target = name[: -len(suffix)] + fused_suffix
                if target in params:
                    rows = self._shard_rows()[fused_suffix]
                    start = sum(rows[:index])
                    return target, index, slice(start, start + rows[index])
                break
        if name in params:
            return name, None, slice(None)
        raise ValueError(f"unexpected weight {raw_name!r} (no such parameter in a LLaMA model)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in, fusing q/k/v and gate/up.

        Names follow Hugging Face's LLaMA (``model.layers.0.self_attn.q_proj.weight``, ...; the
        ``model.`` prefix is optional); this model's own fused names (``qkv_proj``, ``gate_up_proj``)
        are taken too. Tensors are cast to the model's dtype and device.

        Args:
            weights: (name, tensor) pairs; may be a generator, so that one tensor at a time is held.

        Raises:
            ValueError: an unknown name, a shape that does not match, or weights left unloaded.
        """
        params = dict(self.named_parameters())
        # Parameter name -> shards not loaded yet (one shard, 0, for a plain parameter).
        pending = {name: set(range(self._num_shards(name))) for name in params}
        for raw_name, tensor in weights:
            where = self._destination(raw_name, params)
            if where is None:
                continue
            target, shard, rows = where
            dest = params[target].data[rows]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(
                    f"weight {raw_name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            left = pending.get(target, set())
            if shard is None:
                left.clear()
            else:
                left.discard(shard)
        missing = sorted(name for name, left in pending.items() if left)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")

    def keep_gguf_blocks(self, raw_name: str, ggml_type: int, blocks: torch.Tensor) -> None:
        """Keep a checkpoint weight's GGUF blocks beside its dense copy, for ``gguf_linear_blocks``.

        Args:
            raw_name: the weight's name, as ``load_weights`` takes it.
            ggml_type: its GGUF quantization type id.
            blocks: [rows, bytes per row] uint8, rows in the order of the dense weight's.
        """
        where = self._destination(raw_name, dict(self.named_parameters()))
        if where is not None:
            target, shard, _ = where
            self._gguf_parts.setdefault(target, {})[shard or 0] = (ggml_type, blocks)

    def gguf_linear_blocks(self) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """Linear module path -> its weight's rows as GGUF blocks, where every shard came as blocks.

        Each part is (GGUF type, [rows, bytes] blocks), in row order: one part, or for a fused
        weight whose shards have different types (a Q4_K_M file's q/k/v with a Q6_K value) one
        per run of shards of one type. Hands the blocks over: a second call returns nothing.
        """
        found: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for target, shards in self._gguf_parts.items():
            if len(shards) != self._num_shards(target):
                continue
            runs: list[tuple[int, list[torch.Tensor]]] = []
            for ggml_type, blocks in (shards[i] for i in sorted(shards)):
                if runs and runs[-1][0] == ggml_type:
                    runs[-1][1].append(blocks)
                else:
                    runs.append((ggml_type, [blocks]))
            parts = [(t, torch.cat(b) if len(b) > 1 else b[0].contiguous()) for t, b in runs]
            found[target.removesuffix(".weight")] = parts
            if target == "embed_tokens.weight" and self.config.tie_word_embeddings:
                found["lm_head"] = parts
        found.pop("embed_tokens", None)  # NOTE: a lookup, not a matmul: the dense table serves it.
        self._gguf_parts = {}
        return found
