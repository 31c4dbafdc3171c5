"""Linear layers packed once for the CPU: for oneDNN, or for the native bfloat16 kernel (AVX512-BF16)."""

from __future__ import annotations

import torch
from torch import nn

from tokenwire.engine import native

# NOTE: oneDNN lays the packed weight out for a batch size hint. Measured on an AVX2 CPU for the
# default model's shapes, a hint of 64 ran every M from 1 to 256 within a few percent of the best
# hint for that M, while a hint of 1 ran M >= 4 up to 2x slower.
_BATCH_SIZE_HINT = 64


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN can pack weights of this dtype on this device (CPU float32; bfloat16 needs AVX512/AMX)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` through oneDNN with ``W`` packed once, for inference.

    Why: torch's default CPU BLAS (MKL) multiplies a few rows by a weight matrix far below memory
    speed on some CPUs; on an AMD EPYC (AVX2) the default model's [576 -> 49152] LM head took 9.0 ms
    for one row and 23 ms for four, against 5.4 ms and 5.7 ms packed. Decoding is exactly this
    shape: a few rows against every weight. Results equal ``F.linear`` up to float rounding
    (summation order).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # NOTE: the packed copy is an opaque oneDNN tensor: a plain attribute, not a buffer, so that
        # state_dict() and .to() never try to read or convert it.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _BATCH_SIZE_HINT)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NativeBf16Linear(nn.Module):
    """``y = x @ W.T`` for a bfloat16 model through the native AVX512-BF16 kernel
    (``csrc/bf16_linear.cpp``): float32 sums rounded once to bfloat16, as ``F.linear`` rounds, up
    to summation order.

    Every step takes the kernel, so a row gives the same bits whatever else is in its step (a
    sequence's greedy tokens do not depend on its batch companions). Over the default model's 120
    layer matmuls on a 2-core Zen 4, alternating with oneDNN's prepacked bfloat16 matmul: 1.73x at
    1 row, 1.66x at 8, 1.50x at 16, 1.35x at 32, 1.25x at 64, 1.10x at 256, 1.03x at 2048.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # NOTE: a plain attribute, not a buffer: state_dict() and .to() must not see raw bytes.
        self.weight = native.bf16_pack(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] bfloat16 -> [..., out_features] bfloat16."""
        return native.bf16_linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def native_bf16_applies(linear: nn.Linear) -> bool:
    """Whether ``NativeBf16Linear`` takes this layer: bfloat16 weights without a bias, an even
    number of inputs, on a CPU whose kernels run AVX512-BF16."""
    w = linear.weight
    return (
        w.dtype == torch.bfloat16 and w.is_cpu and linear.bias is None and linear.in_features % 2 == 0
        and native.bf16_linear_available()
    )  # fmt: skip


def prepack_linears(model: nn.Module, native_bf16: bool = False) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a ``PackedLinear`` in place; returns how many.

    With ``native_bf16``, a layer ``native_bf16_applies`` to becomes a ``NativeBf16Linear`` instead.
    For a model that only serves: the replaced layers keep no gradient and no dense weight (except
    where another module shares it, e.g. a tied embedding). Call it after the weights are loaded.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = NativeBf16Linear(child) if native_bf16 and native_bf16_applies(child) else PackedLinear(child)
                setattr(parent, name, packed)
                count += 1
    return count
