"""Linear layers that multiply a few rows straight from the checkpoint's GGUF blocks (native kernel)."""

from __future__ import annotations

import torch
from torch import nn

from tokenwire.engine import native

# NOTE: up to this many rows the block kernel is at least as fast as the dense float32 matmul
# (oneDNN, prepacked). Measured on a 2-core AVX2 EPYC over the default model's 30 layers, the two
# alternating (`benchmarks/gguf_linear.py --layers-only`): 3.0x at 1 row, 2.4-2.5x at 2-4, 1.5-1.9x
# at 6-8, 1.2-1.3x at 16-32, 1.1x at 64-192, even from 256 (1.01-1.05x at 256-512). A CPU with
# AVX-512 runs oneDNN's matmuls twice as wide as this AVX2 kernel, so there the break-even is lower.
MAX_BLOCK_ROWS = 256


class GGUFLinear(nn.Module):
    """``y = x @ W.T`` with W both dense and as GGUF blocks: few rows read the blocks, many the dense copy.

    Decoding multiplies a handful of rows by every weight, so it is bound by reading and unpacking
    the weights: a packed Q4_1 weight is 6 bits against float32's 32. The kernel dequantizes each
    weight to the exact float32 value the dense copy holds, so both paths agree up to summation
    order, and a row gives the same bits alone and in any batch of up to ``MAX_BLOCK_ROWS`` rows.
    """

    def __init__(self, dense: nn.Module, packed: native.PackedWeight) -> None:
        super().__init__()
        self.dense = dense
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        # NOTE: a plain attribute, not a buffer: state_dict() and .to() must not see raw bytes.
        self.packed = packed
        self._max_elements = MAX_BLOCK_ROWS * packed.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float32 -> [..., out_features]."""
        if x.numel() <= self._max_elements:
            return native.quant_linear(x, self.packed)
        return self.dense(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={self.packed.ggml_type}"


def use_gguf_blocks(model: nn.Module, blocks: dict[str, tuple[int, torch.Tensor]]) -> int:
    """Wrap each linear layer named in ``blocks`` (module path -> (GGUF type, blocks)) in a ``GGUFLinear``.

    Only for a float32 CPU model with the native kernels loaded (``native.available``); a layer
    with a bias, or whose blocks do not match its shape or a type the kernel takes, stays as it is.
    Returns how many layers were wrapped.
    """
    wrapped = 0
    for path, (ggml_type, raw) in blocks.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, name, None)
        in_features = getattr(layer, "in_features", None)
        out_features = getattr(layer, "out_features", None)
        if layer is None or in_features is None or getattr(layer, "bias", None) is not None:
            continue
        row_bytes = native.quant_row_bytes(ggml_type, in_features)
        if not row_bytes or tuple(raw.shape) != (out_features, row_bytes):
            continue
        setattr(parent, name, GGUFLinear(layer, native.quant_pack(ggml_type, raw, in_features)))
        wrapped += 1
    return wrapped
