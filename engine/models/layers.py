"""Building blocks shared by the models: RMSNorm, rotary position embeddings, the native-ops switch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenwire.engine import native


def enable_native_ops(model: nn.Module) -> int:
    """Route every module that has a native path (a ``native_ops`` attribute) through it.

    Only for inference on CPU in float32 or bfloat16 (``native.available``): the native ops keep
    no autograd graph. Returns how many modules were switched.
    """
    switched = 0
    for module in model.modules():
        if hasattr(module, "native_ops") and not module.native_ops:
            module.native_ops = True
            switched += 1
    return switched


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as LLaMA does)."""

    native_ops = False

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_ops:
            return native.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # NOTE: one fused kernel instead of six small ones; the same formula in float32.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in Hugging Face's convention (rotates the two halves of each head).

    cos/sin tables are computed once in float32 for max_positions and indexed by explicit positions,
    so packed batches of unrelated sequences need no special handling.
    """

    cos: torch.Tensor  # [P, D], a buffer
    sin: torch.Tensor  # [P, D], a buffer

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor) -> RopeTables:
        """cos and sin for positions: [..., T], each [..., T, 1, D] (broadcast over heads).

        A model looks them up once per forward and hands them to every layer.
        """
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q: [..., T, H, D] and k: [..., T, H_kv, D] by positions: [..., T]."""
        cos, sin = self.tables(positions)
        return rotate(q, cos, sin), rotate(k, cos, sin)


# cos and sin, each [..., T, 1, D], from ``RotaryEmbedding.tables``.
RopeTables = tuple[torch.Tensor, torch.Tensor]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x: [..., T, H, D] with tables [..., T, 1, D]."""
    # NOTE: computed in float32 for accuracy, then cast back to the activations' dtype.
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
