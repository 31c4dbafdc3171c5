"""Linear layers whose weights are prepacked for oneDNN: the engine's fast CPU matmul path."""

from __future__ import annotations

import torch
from torch import nn

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


def prepack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a ``PackedLinear`` in place; returns how many.

    For a model that only serves: the replaced layers keep no gradient and no dense weight (except
    where another module shares it, e.g. a tied embedding). Call it after the weights are loaded.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
