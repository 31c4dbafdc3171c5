"""ProductionTransformer: the seed's pre-norm decoder (v1.0 API, v1.1 upgrades) that also runs in the paged engine."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenwire.engine.attention import AttentionMetadata, paged_attention
from tokenwire.engine.models.base import KVCacheSpec
from tokenwire.engine.models.layers import RMSNorm, RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [B, H, S, D]
PastKeyValues = list[KVCache]

_ACTIVATIONS = ("gelu", "relu")
_POSITION_ENCODINGS = ("sinusoidal", "rope")
_NORMS = ("layernorm", "rmsnorm")
# NOTE: SDPA exists in every torch this project supports; the check keeps the seed's "when available" contract.
_HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


@dataclass(frozen=True)
class ProductionTransformerConfig:
    """Hyperparameters and feature flags of a ProductionTransformer.

    Attributes:
        vocab_size: rows of the embedding and of the output logits.
        d_model: width of the residual stream.
        num_heads: attention heads; must divide d_model.
        num_layers: transformer blocks.
        dim_feedforward: hidden width of the feed-forward network.
        dropout: dropout probability, applied in training only.
        max_len: most positions the model supports (size of the position tables).
        tie_weights: share the embedding matrix with the LM head.
        use_sdpa: use ``torch.nn.functional.scaled_dot_product_attention`` when available, else manual attention.
        activation: feed-forward activation, ``"gelu"`` or ``"relu"``.
        final_layer_norm: apply a norm after the last block.
        position_encoding: ``"sinusoidal"`` (added to the embeddings) or ``"rope"`` (rotates q and k).
        norm: ``"layernorm"`` or ``"rmsnorm"`` for the pre-norms and the final norm.
        rope_theta: RoPE base frequency (used with ``position_encoding="rope"``).
        norm_eps: epsilon of the norms.
    """

    vocab_size: int = 10000
    d_model: int = 256
    num_heads: int = 8
    num_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    max_len: int = 2048
    tie_weights: bool = True
    use_sdpa: bool = True
    activation: str = "gelu"
    final_layer_norm: bool = True
    position_encoding: str = "sinusoidal"
    norm: str = "layernorm"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "dim_feedforward", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.position_encoding not in _POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {_POSITION_ENCODINGS}, got {self.position_encoding!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if self.position_encoding == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"d_model must be even for sinusoidal position_encoding, got {self.d_model}")
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"d_model / num_heads (head dim {self.head_dim}) must be even for rope position_encoding")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads


class PositionalEncoding(nn.Module):
    """Sinusoidal positional encoding (non-trainable), looked up by explicit position."""

    pe: torch.Tensor  # [max_len, d_model], a buffer

    def __init__(self, d_model: int, max_len: int = 2048) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]  # [P, 1]
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)  # [P, D]
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Add the encoding of each token's position.

        Args:
            x: [..., T, D] embeddings.
            positions: [..., T] int64 positions (broadcastable to x's leading dims); 0..T-1 when None.

        Returns:
            x plus the encodings, same shape and dtype as x.
        """
        if positions is None:
            positions = torch.arange(x.shape[-2], device=x.device)
        return x + self.pe[positions].to(x.dtype)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention: SDPA or manual for dense batches with a KV cache, paged attention for flat ones."""

    def __init__(self, config: ProductionTransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.d_k = config.head_dim
        self.dropout = config.dropout
        self.use_sdpa = config.use_sdpa and _HAS_SDPA
        # NOTE: module names follow the seed's checkpoints so their state dicts load unchanged.
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def _qkv(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x: [..., T, d_model] to q, k, v: [..., T, H, D], rotating q and k when RoPE is on."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.d_k))
        k = self.k_proj(x).unflatten(-1, (self.num_heads, self.d_k))
        v = self.v_proj(x).unflatten(-1, (self.num_heads, self.d_k))
        if rotary is not None:
            q, k = rotary(q, k, positions)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding | None = None,
        allow_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        past_kv: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Attend over a dense batch.

        Args:
            x: [B, T, d_model] normalized hidden states.
            positions: [B or 1, T] positions of the new tokens (used by RoPE).
            rotary: the model's rotary embedding, or None for sinusoidal models.
            allow_mask: bool [B or 1, 1, T, S], True = attend; None = no mask beyond ``is_causal``.
            is_causal: plain causal mask over T == S keys (used only with ``allow_mask=None``).
            past_kv: cached (k, v), each [B, H, S_past, D].
            use_cache: return the (k, v) including this step's keys.

        Returns:
            ([B, T, d_model] output, (k, v) each [B, H, S, D] when use_cache else None).
        """
        q, k, v = self._qkv(x, positions, rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # [B, H, S, D]
            v = torch.cat([past_kv[1], v], dim=2)
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allow_mask, dropout_p=dropout_p, is_causal=is_causal)
        else:
            o = self._manual_attention(q, k, v, allow_mask, is_causal, dropout_p)
        out = self.out_proj(o.transpose(1, 2).flatten(-2))  # [B, T, d_model]
        return out, ((k, v) if use_cache else None)

    def _manual_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        allow_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> torch.Tensor:
        """Explicit softmax attention with the same mask semantics as SDPA. q: [B, H, T, D]; k, v: [B, H, S, D]."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # [B, H, T, S]
        if is_causal:
            allow_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if allow_mask is not None:
            scores = scores.masked_fill(~allow_mask, float("-inf"))
        attn = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
        return attn @ v  # [B, H, T, D]

    def forward_flat(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Attend over a flat batch through the paged KV cache.

        Args:
            x: [T, d_model] normalized hidden states.
            positions: [T] positions of the tokens.
            rotary: the model's rotary embedding, or None.
            k_cache, v_cache: this layer's pools, [num_blocks, block_size, H, D].
            meta: the step's attention metadata.

        Returns:
            [T, d_model] output.
        """
        q, k, v = self._qkv(x, positions, rotary)  # [T, H, D]
        o = paged_attention(q, k, v, k_cache, v_cache, meta)  # [T, H, D]
        return self.out_proj(o.flatten(-2))


class FeedForward(nn.Module):
    """Two-layer MLP with GELU or ReLU."""

    def __init__(self, config: ProductionTransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.dim_feedforward)
        self.fc2 = nn.Linear(config.dim_feedforward, config.d_model)
        self.act = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., d_model]."""
        return self.fc2(self.dropout(self.act(self.fc1(x))))


def make_norm(config: ProductionTransformerConfig) -> nn.Module:
    """The norm the config asks for, over d_model."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: ``x = x + dropout(attn(norm(x)))``, then ``x = x + dropout(ffn(norm(x)))``."""

    def __init__(self, config: ProductionTransformerConfig) -> None:
        super().__init__()
        self.ln1 = make_norm(config)
        self.attn = MultiHeadSelfAttention(config)
        self.drop1 = nn.Dropout(config.dropout)
        self.ln2 = make_norm(config)
        self.ff = FeedForward(config)
        self.drop2 = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding | None = None,
        allow_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        past_kv: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Dense batch: x [B, T, d_model]; see ``MultiHeadSelfAttention.forward`` for the other arguments."""
        a, present = self.attn(self.ln1(x), positions, rotary, allow_mask, is_causal, past_kv, use_cache)
        return self._ffn_residual(x + self.drop1(a)), present

    def forward_flat(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Flat batch: x [T, d_model]; see ``MultiHeadSelfAttention.forward_flat``."""
        a = self.attn.forward_flat(self.ln1(x), positions, rotary, k_cache, v_cache, meta)
        return self._ffn_residual(x + self.drop1(a))

    def _ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop2(self.ff(self.ln2(x)))


def _allow_mask(
    batch: int,
    q_len: int,
    past_len: int,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """Compose the causal, padding and user masks by logical AND.

    Returns:
        (bool allow mask [B or 1, 1, T, S] or None, is_causal). ``is_causal`` is True only when the
        plain causal mask over a cache-free batch is the whole story, so SDPA can take its fast path.
    """
    s = past_len + q_len
    if attn_mask is None and key_padding_mask is None and causal and past_len == 0 and q_len > 1:
        return None, True
    allow: torch.Tensor | None = None
    if causal and q_len > 1:
        # NOTE: query i sits at key index past_len + i and sees keys up to it, so chunks after a cache stay causal.
        allow = torch.ones(q_len, s, dtype=torch.bool, device=device).tril(diagonal=past_len)[None, None]
    if key_padding_mask is not None:
        pad_allow = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, S]
        allow = pad_allow if allow is None else allow & pad_allow
    if attn_mask is not None:
        user = attn_mask if attn_mask.dim() == 4 else attn_mask.reshape(-1, 1, q_len, s)  # [B or 1, 1, T, S]
        allow = user if allow is None else allow & user
    if allow is None:
        return None, False
    # NOTE: a row with no allowed key (a padding query) would turn into NaN, and NaN times a zero attention
    # weight is still NaN, poisoning the rows that read its cached values later. Such rows attend to every
    # key instead: their outputs are finite and meaningless, and nobody may read them.
    allow = allow | ~allow.any(dim=-1, keepdim=True)
    return allow.expand(batch, 1, q_len, s), False


def _check_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, q_len: int, s: int
) -> None:
    """Raise ValueError naming the mask whose dtype or shape does not fit [B, T] queries over S keys."""
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be a bool allow mask (True = attend), got dtype {attn_mask.dtype}")
        shape = tuple(attn_mask.shape)
        if shape not in ((q_len, s), (batch, q_len, s), (batch, 1, q_len, s)):
            raise ValueError(
                f"attn_mask must be [T, S], [B, T, S] or [B, 1, T, S] = ({batch}, 1, {q_len}, {s}), got {shape}"
            )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = padding), got dtype {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, s):
            raise ValueError(
                f"key_padding_mask must be [B, S] = ({batch}, {s}) spanning past and new keys, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def _dense_positions(
    q_len: int, past_len: int, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Positions of the new tokens: [1, T] counting from past_len, or [B, T] counting only non-pad keys."""
    if key_padding_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]
    # NOTE: a token's position is the number of real keys before it, so left padding shifts nothing;
    # padding keys get position 0 (they are masked anyway).
    real_before = (~key_padding_mask).long().cumsum(dim=-1) - 1  # [B, S]
    return real_before[:, past_len:].clamp(min=0)


class ProductionTransformer(nn.Module):
    """Decoder-style pre-norm transformer returning logits; also an ``EngineModel`` for the paged engine.

    Example:
        >>> logits = model(input_ids)
        >>> logits, past = model(input_ids, use_cache=True)
        >>> logits, past = model(next_ids, causal=False, use_cache=True, past_key_values=past)
    """

    def __init__(self, config: ProductionTransformerConfig | None = None, **kwargs: object) -> None:
        """Build from a config, or from config fields as keyword arguments (not both)."""
        super().__init__()
        if config is None:
            config = ProductionTransformerConfig(**kwargs)  # type: ignore[arg-type]
        elif kwargs:
            raise ValueError(f"pass either config or keyword fields, not both (got {sorted(kwargs)})")
        self.config = config
        self.d_model = config.d_model
        self.num_heads = config.num_heads
        self.num_layers = config.num_layers

        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_encoding = (
            PositionalEncoding(config.d_model, config.max_len) if config.position_encoding == "sinusoidal" else None
        )
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.max_len, config.rope_theta)
            if config.position_encoding == "rope"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.num_layers)])
        self.final_ln = make_norm(config) if config.final_layer_norm else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # NOTE: the seed's initialisation (Xavier projections, N(0, 1) embeddings), so fresh models match its behaviour.
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embedding" not in name:
                nn.init.xavier_uniform_(p)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in by their ``state_dict`` names (the seed's module names).

        With tied weights, ``lm_head.weight`` may be present or not; it must equal the embedding.

        Raises:
            ValueError: an unknown name, a tensor of the wrong shape, or a missing parameter.
        """
        params = dict(self.named_parameters())
        seen: set[str] = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name == "lm_head.weight" and self.config.tie_weights:
                    name = "embedding.weight"
                param = params.get(name)
                if param is None:
                    raise ValueError(f"unexpected weight {name!r} for ProductionTransformer")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.copy_(tensor)
                seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise ValueError(f"missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    # ----- EngineModel -----

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """Per-layer KV shape: every head has its own keys and values (no grouped-query attention)."""
        return KVCacheSpec(self.config.num_layers, self.config.num_heads, self.config.head_dim)

    @property
    def max_context_length(self) -> int:
        """Most positions the model supports (``config.max_len``)."""
        return self.config.max_len

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
            input_ids: [T] token ids (decodes first, then prefill chunks, as ``meta`` describes).
            positions: [T] each token's position in its own sequence.
            kv_caches: per layer (k_pool, v_pool), each [num_blocks, block_size, num_heads, head_dim].
            meta: the step's attention metadata.
            output_rows: int64 [N] ascending rows whose hidden states the caller reads (by default all).

        Returns:
            [T, d_model] hidden states before the final norm (``compute_logits`` applies it), or
            [N, d_model] for ``output_rows``.
        """
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches must have one (k, v) pair per layer ({self.num_layers}), got {len(kv_caches)}")
        x = self._embed(input_ids, positions)  # [T, d_model]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer.forward_flat(x, positions, self.rotary, k_cache, v_cache, meta)
        return x if output_rows is None else x[output_rows]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (if configured) and LM head: [..., d_model] -> [..., vocab] float32."""
        if self.final_ln is not None:
            hidden = self.final_ln(hidden)
        return self.lm_head(hidden).float()

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings plus sinusoidal encodings (RoPE models add nothing here): [..., T, d_model]."""
        x = self.embedding(input_ids) * math.sqrt(self.d_model)
        if self.pos_encoding is not None:
            x = self.pos_encoding(x, positions)
        return self.drop(x)

    # ----- dense API (seed v1.0, with the v1.1 upgrades) -----

    def forward(
        self,
        input_ids: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = True,
        use_cache: bool = False,
        past_key_values: PastKeyValues | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, PastKeyValues]:
        """Logits for every position of a dense batch, optionally continuing from / returning a KV cache.

        Args:
            input_ids: [B, T] token ids.
            attn_mask: bool ALLOW mask (True = attend) over the S = past + T keys, shaped [T, S],
                [B, T, S] or [B, 1, T, S]; ANDed with the causal and padding masks.
            key_padding_mask: bool [B, S], True = padding key. With a cache it spans the past and new
                keys. Positions skip padding, so a left-padded row gets the positions it would get alone.
            causal: apply the causal mask (with a cache, query i sees keys up to past + i).
            use_cache: also return the per-layer (k, v) cache, each [B, H, S, D].
            past_key_values: the cache a previous call returned.

        Returns:
            logits [B, T, vocab] float32, or (logits, present_key_values) when use_cache.

        Raises:
            ValueError: a shape or dtype is wrong, or the sequence exceeds ``max_len``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T] token ids, got shape {tuple(input_ids.shape)}")
        batch, q_len = input_ids.shape
        past_len = self._past_length(past_key_values, batch)
        s = past_len + q_len
        if s > self.config.max_len:
            raise ValueError(
                f"sequence of {s} positions (past {past_len} + new {q_len}) exceeds max_len={self.config.max_len}"
            )
        _check_masks(attn_mask, key_padding_mask, batch, q_len, s)
        allow, is_causal = _allow_mask(batch, q_len, past_len, attn_mask, key_padding_mask, causal, input_ids.device)
        positions = _dense_positions(q_len, past_len, key_padding_mask, input_ids.device)  # [B or 1, T]

        x = self._embed(input_ids, positions)  # [B, T, d_model]
        present: PastKeyValues = []
        for i, layer in enumerate(self.layers):
            layer_past = past_key_values[i] if past_key_values is not None else None
            x, kv = layer(x, positions, self.rotary, allow, is_causal, layer_past, use_cache)
            if kv is not None:
                present.append(kv)
        logits = self.compute_logits(x)
        return (logits, present) if use_cache else logits

    def _past_length(self, past_key_values: PastKeyValues | None, batch: int) -> int:
        if past_key_values is None:
            return 0
        if len(past_key_values) != self.num_layers:
            raise ValueError(
                f"past_key_values must hold one (k, v) per layer ({self.num_layers}), got {len(past_key_values)}"
            )
        past_k = past_key_values[0][0]  # [B, H, S_past, D]
        if past_k.shape[0] != batch:
            raise ValueError(f"past_key_values batch {past_k.shape[0]} does not match input_ids batch {batch}")
        return past_k.shape[2]

    @torch.no_grad()
    def greedy_generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int = 64,
        eos_token_id: int | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache, in eval mode (the module's mode is restored afterwards).

        Args:
            prompt_ids: [B, T] prompts; batches of different lengths are LEFT-padded.
            max_new_tokens: most tokens to add.
            eos_token_id: a row stops at this token; finished rows are filled with it until all stop.
            key_padding_mask: bool [B, T], True = padding in prompt_ids.

        Returns:
            [B, T + n] prompt and generated ids, n <= max_new_tokens.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be [B, T] with T >= 1, got shape {tuple(prompt_ids.shape)}")
        was_training = self.training
        self.eval()
        try:
            return self._greedy_loop(prompt_ids, max_new_tokens, eos_token_id, key_padding_mask)
        finally:
            self.train(was_training)

    def _greedy_loop(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        out = prompt_ids
        if max_new_tokens == 0:
            return out
        batch = prompt_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
        logits, past = self(prompt_ids, key_padding_mask=key_padding_mask, use_cache=True)
        for step in range(max_new_tokens):
            next_id = logits[:, -1].argmax(dim=-1)  # [B]
            if eos_token_id is not None:
                next_id = next_id.masked_fill(finished, eos_token_id)
                finished |= next_id == eos_token_id
            out = torch.cat([out, next_id[:, None]], dim=1)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if key_padding_mask is not None:
                # NOTE: the new key is real; the mask keeps spanning every cached key.
                key_padding_mask = F.pad(key_padding_mask, (0, 1), value=False)
            logits, past = self(
                next_id[:, None], key_padding_mask=key_padding_mask, causal=False, use_cache=True, past_key_values=past
            )
        return out

