"""Linear layers that multiply a few rows straight from the checkpoint's GGUF blocks (native kernel)."""

from __future__ import annotations

import torch
from torch import nn

from tokenwire.engine import native

# NOTE: measured on a 2-core AVX2 EPYC over the default model's 30 layers, the two alternating
# (`benchmarks/gguf_linear.py --layers-only`), the block kernel against the dense float32 matmul
# (oneDNN, prepacked): 3.0x at 1 row, 2.4-2.5x at 2-4, 1.5-1.9x at 6-8, 1.2-1.3x at 16-32, 1.1x at
# 64-192, and even from 256 rows to 2048 (0.99-1.05x). So where the kernel has its AVX2 paths and
# oneDNN nothing wider, the blocks serve every step and the dense copy is dropped. A CPU with
# AVX-512 runs oneDNN twice as wide, and one without AVX2 gets the kernel's portable loops: there
# the dense copy stays for steps of more than this many rows.
MAX_BLOCK_ROWS = 256


def block_rows_limit() -> int | None:
    """Most rows of a step that read the blocks; None where the blocks serve steps of any size."""
    if native.has_avx2_paths() and "avx512f" not in native.cpu_flags():
        return None
    return MAX_BLOCK_ROWS


class GGUFLinear(nn.Module):
    """``y = x @ W.T`` with W as packed GGUF blocks, and where they do not serve every size, a dense copy.

    Decoding multiplies a handful of rows by every weight, so it is bound by reading and unpacking
    the weights: a packed Q4_1 weight is 6 bits against float32's 32. The kernel dequantizes each
    weight to the exact float32 value the dense copy holds, so both paths agree up to summation
    order, and a row gives the same bits alone and in any batch that reads the blocks.

    Args:
        dense: the dense layer, for steps of more than ``max_rows`` rows; None with ``max_rows`` None.
        packed: the weight as ``native.quant_pack`` packs it.
        max_rows: most rows that read the blocks; None for any number.
    """

    def __init__(self, dense: nn.Module | None, packed: native.PackedWeight, max_rows: int | None) -> None:
        super().__init__()
        if (dense is None) != (max_rows is None):
            raise ValueError("a dense layer is needed exactly when the blocks serve at most max_rows rows")
        self.dense = dense
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        # NOTE: a plain attribute, not a buffer: state_dict() and .to() must not see raw bytes.
        self.packed = packed
        self._max_elements = 0 if max_rows is None else max_rows * packed.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float32 -> [..., out_features]."""
        if self.dense is None or x.numel() <= self._max_elements:
            return native.quant_linear(x, self.packed)
        return self.dense(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={self.packed.ggml_type}"


def use_gguf_blocks(model: nn.Module, blocks: dict[str, tuple[int, torch.Tensor]], max_rows: int | None) -> int:
    """Wrap each linear layer named in ``blocks`` (module path -> (GGUF type, blocks)) in a ``GGUFLinear``.

    Only for a float32 CPU model with the native kernels loaded (``native.available``); a layer
    with a bias, or whose blocks do not match its shape or a type the kernel takes, stays as it is.
    With ``max_rows`` None (``block_rows_limit()`` where the blocks serve any size) a wrapped
    layer lets go of its dense weight, unless another module shares it (a tied embedding).
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
        packed = native.quant_pack(ggml_type, raw, in_features)
        setattr(parent, name, GGUFLinear(None if max_rows is None else layer, packed, max_rows))
        wrapped += 1
    return wrapped
