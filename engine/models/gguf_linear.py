"""Linear layers that multiply straight from packed weights (native kernel): a GGUF checkpoint's
blocks, or a dense checkpoint's values in the narrowest float type that holds them exactly."""

from __future__ import annotations

import torch
from torch import nn

from tokenwire.engine import native

# NOTE: measured on a 2-core AVX2 EPYC over the default model's 30 layers, the two alternating
# (`benchmarks/gguf_linear.py --layers-only`), the block kernel against the dense float32 matmul
# (oneDNN, prepacked): 3.0x at 1 row, 2.4-2.5x at 2-4, 1.5-1.9x at 6-8, 1.2-1.3x at 16-32, 1.1x at
# 64-192, and even from 256 rows to 2048 (0.99-1.05x). On a 2-core Zen 4, the kernel's AVX-512
# variants against oneDNN's: 4.1x at 1 row, 2.2x at 8, 1.4x at 32, 1.2x at 64, 0.98-1.04x from 256
# to 2048. So where the kernel's vectors are as wide as oneDNN's (AVX2 on a CPU without AVX-512, or
# its AVX-512 variants), the blocks serve every step and the dense copy is dropped. Elsewhere (the
# portable loops, or a build without the AVX-512 variants on a CPU that has it) the dense copy
# stays for steps of more than this many rows.
MAX_BLOCK_ROWS = 256


def block_rows_limit() -> int | None:
    """Most rows of a step that read the blocks; None where the blocks serve steps of any size."""
    bits = native.quant_vector_bits()
    if bits == 512 or (bits == 256 and "avx512f" not in native.cpu_flags()):
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
        parts: the weight's rows in order, as ``native.quant_pack`` packs them: one part, or one
            per run of shards of one type in a fused weight whose shards have different types.
        max_rows: most rows that read the blocks; None for any number.
    """

    def __init__(self, dense: nn.Module | None, parts: list[native.PackedWeight], max_rows: int | None) -> None:
        super().__init__()
        if (dense is None) != (max_rows is None):
            raise ValueError("a dense layer is needed exactly when the blocks serve at most max_rows rows")
        if not parts or len({p.in_features for p in parts}) != 1:
            raise ValueError("need one or more packed parts with the same in_features")
        self.dense = dense
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        # NOTE: plain attributes, not buffers: state_dict() and .to() must not see raw bytes.
        self.parts = parts
        self._max_elements = 0 if max_rows is None else max_rows * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float32 -> [..., out_features]."""
        if self.dense is not None and x.numel() > self._max_elements:
            return self.dense(x)
        if len(self.parts) == 1:
            return native.quant_linear(x, self.parts[0])
        rows = x.reshape(-1, self.in_features)
        out = torch.empty((rows.shape[0], self.out_features), dtype=torch.float32)
        start = 0
        for part in self.parts:  # NOTE: each part writes its own columns of the result
            native.quant_linear(rows, part, out=out[:, start : start + part.out_features])
            start += part.out_features
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        types = "+".join(str(p.ggml_type) for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={types}"


def use_gguf_blocks(model: nn.Module, blocks: dict[str, list[tuple[int, torch.Tensor]]], max_rows: int | None) -> int:
    """Wrap each linear layer named in ``blocks`` in a ``GGUFLinear``.

    ``blocks``: module path -> the weight's rows in order as (GGUF type, [rows, bytes] blocks)
    parts, as ``gguf_linear_blocks`` gives them. Only for a float32 CPU model with the native
    kernels loaded (``native.available``); a layer with a bias, or whose parts do not add up to
    its shape or have a type the kernel does not take, stays as it is. With ``max_rows`` None
    (``block_rows_limit()`` where the blocks serve any size) a wrapped layer lets go of its dense
    weight, unless another module shares it (a tied embedding). Returns how many layers were wrapped.
    """
    wrapped = 0
    for path, parts in blocks.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, name, None)
        in_features = getattr(layer, "in_features", None)
        out_features = getattr(layer, "out_features", None)
        if layer is None or in_features is None or getattr(layer, "bias", None) is not None:
            continue
        fits = all(
            raw.dim() == 2 and raw.shape[1] == native.quant_row_bytes(ggml_type, in_features) != 0
            for ggml_type, raw in parts
        )
        if not fits or sum(raw.shape[0] for _, raw in parts) != out_features:
            continue
        packed = [native.quant_pack(ggml_type, raw, in_features) for ggml_type, raw in parts]
        setattr(parent, name, GGUFLinear(None if max_rows is None else layer, packed, max_rows))
        wrapped += 1
    return wrapped


# GGML's ids of the float types the kernel takes, narrowest first: a weight goes in the first that
# holds every one of its values exactly.
_FLOAT_TYPES = ((30, torch.bfloat16), (1, torch.float16), (0, torch.float32))


def float_weight_parts(model: nn.Module) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Linear module path -> its weight as one (GGML float type, [rows, bytes]) part, for ``use_gguf_blocks``.

    For each bias-free ``nn.Linear`` of float32 weights on the CPU whose in_features is a multiple of
    32 (the kernel's groups): the weight in bfloat16 where every value is a bfloat16 (a checkpoint
    saved in bfloat16), else in float16 where every value is one, else in float32. Widened back,
    each value is the float32 the layer holds, so only summation order separates the kernel's
    result from the layer's; and decoding, which reads every weight for a few rows, reads half the
    bytes of float32 from a 16-bit checkpoint.
    """
    found: dict[str, list[tuple[int, torch.Tensor]]] = {}
    # NOTE: a GGUFLinear's own dense copy (kept for large steps) is not packed a second time.
    wrapped = tuple(f"{path}." for path, m in model.named_modules() if isinstance(m, GGUFLinear))
    for path, layer in model.named_modules():
        if type(layer) is not nn.Linear or layer.bias is not None or path.startswith(wrapped):
            continue
        weight = layer.weight.detach()
        if weight.dtype != torch.float32 or not weight.is_cpu or layer.in_features % 32:
            continue
        for ggml_type, dtype in _FLOAT_TYPES:
            narrow = weight.to(dtype)
            if dtype == torch.float32 or torch.equal(narrow.float(), weight):
                found[path] = [(ggml_type, narrow.contiguous().view(torch.uint8))]
                break
    return found
