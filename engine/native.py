"""Native CPU kernels: compiled once from ``csrc/`` with the system C++ compiler and called through ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
_ABI_VERSION = 2
# Element-type codes of the C entry point.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_BUILD_TIMEOUT_S = 300

DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``(q, k_cache, v_cache, block_tables, context_lens, scale) -> out``, as ``paged_decode_attention``."""

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_tried = False


def kernel_dir() -> Path:
    """Where built kernels are kept: ``$TOKENWIRE_KERNEL_DIR``, else the user's cache folder."""
    if override := os.environ.get("TOKENWIRE_KERNEL_DIR"):
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenwire" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_flags() -> list[str]:
    """Optimisation flags for this machine's CPU family.

    A fixed instruction level rather than ``-march=native``, so that a library built on one
    machine (a container image's build host) loads on another of the same level.
    """
    flags = ["-O3", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64"):
        cpu = _cpu_flags()
        flags.append("-march=x86-64-v3" if {"avx2", "fma", "bmi2", "f16c"} <= cpu else "-march=x86-64-v2")
    return flags


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path(compiler: str, flags: list[str]) -> Path:
    # NOTE: the name changes with the source, the flags, the compiler and the Python ABI, so a
    # stale build is never loaded.
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(flags).encode(), compiler.encode(), sys.implementation.cache_tag.encode()):
        key.update(part)
    return kernel_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the kernels unless an up-to-date build exists; return the library's path.

    Raises:
        RuntimeError: no C++ compiler, or the compiler failed (its output is in the message).
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    flags = compile_flags()
    target = _library_path(compiler, flags)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: compile to a private file and rename it into place, so that processes building at the
    # same time never load a half-written library.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (logged once) when it cannot be had."""
    global _loaded, _tried
    with _lock:
        if _tried:
            return _loaded
        _tried = True
        try:
            lib = ctypes.CDLL(str(build()))
            if lib.tw_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"library ABI {lib.tw_abi_version()}, expected {_ABI_VERSION}")
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            logger.warning("native CPU kernels unavailable, using the torch implementation: %s", exc)
            return None
        fn = lib.tw_paged_decode_attention
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [ctypes.c_int, p, p, p, i64, p, i64, i64, p, p, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
        fn.restype = ctypes.c_int
        _loaded = lib
        return lib


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, attending in place through the block tables.

    Shapes: q: [S, H_q, D]; caches: [num_blocks, block_size, H_kv, D] (contiguous, q's dtype);
    block_tables: [S, W] int64; context_lens: [S] int64, each in [1, W * block_size]. Returns [S, H_q, D].

    Raises:
        RuntimeError: the library is not loaded (check ``decode_kernel()`` first).
        ValueError: a tensor that the kernel cannot read as it is.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("native CPU kernels are not available")
    if any(t.device.type != "cpu" for t in (q, k_cache, v_cache, block_tables, context_lens)):
        raise ValueError("every tensor must be on the CPU")
    if k_cache.shape != v_cache.shape or q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.dtype not in _DTYPE_CODES or not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}: need one of float32, bfloat16")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    if block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64:
        raise ValueError("block_tables and context_lens must be int64")
    num_seqs, h_q, d = q.shape
    _, block_size, h_kv, d_cache = k_cache.shape
    if d != d_cache or h_q % h_kv:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    q = q.contiguous()
    tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    lens = context_lens.contiguous()
    out = torch.empty_like(q)
    rc = lib.tw_paged_decode_attention(
        _DTYPE_CODES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0],
        tables.data_ptr(), tables.stride(0), tables.shape[1], lens.data_ptr(), out.data_ptr(),
        num_seqs, h_q, h_kv, d, block_size, scale, torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        raise ValueError("a context length exceeds its block table, or a block id is outside the pool")
    if rc != 0:
        raise ValueError(f"the kernel refused dtype {q.dtype}")
    return out


def decode_kernel(device: torch.device, dtype: torch.dtype) -> DecodeKernel | None:
    """The native decode-attention kernel for tensors on this device and dtype, or None.

    Only CPU tensors of float32 or bfloat16 have one; the first call builds it (about a second).
    """
    if device.type != "cpu" or dtype not in _DTYPE_CODES or _library() is None:
        return None
    return paged_decode_attention
