"""Choosing the device and dtype a model is loaded on ("auto" and explicit names)."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a name: "auto" is CUDA when available, else the CPU.

    Raises:
        ValueError: an unknown name, or CUDA asked for where there is none.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {resolved}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {resolved} was asked for, but CUDA is not available")
    return resolved


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16, AVX512-BF16, or Arm's BF16 extensions)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:  # NOTE: torch < 2.7 lacks it; ask oneDNN instead.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    caps = get_capabilities()
    return any(bool(caps.get(flag)) for flag in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of weights and activations: "auto" is bfloat16 on CUDA, and on CPUs with bf16 units.

    NOTE: on a CPU with bf16 instructions (AMX, AVX512-BF16, Arm BF16) a bf16 matmul ran several
    times faster than float32, and decoding reads half the bytes. Without them torch emulates bf16:
    on an AVX2-only CPU a [40, 576] x [576, 1536] bf16 matmul took 6.5x as long as in float32 and
    a one-token one 1.35x as long, so "auto" is float32 there.

    Args:
        dtype: "auto", "float32", "bfloat16", "float16" or a torch dtype.
        device: the resolved device the model goes to.

    Raises:
        ValueError: an unknown dtype, or float16 on the CPU (slow and unsupported there).
    """
    if isinstance(dtype, str):
        if dtype == "auto":
            if device.type == "cuda":
                # NOTE: GPUs older than Ampere have no fast bfloat16.
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.bfloat16 if cpu_has_bf16_units() else torch.float32
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("dtype float16 is supported on CUDA only; use bfloat16 or float32 on the CPU")
    return dtype
