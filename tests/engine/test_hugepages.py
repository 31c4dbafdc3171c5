"""Huge-page buffers: zeros as torch gives them, and on Linux with transparent huge pages, backed by them."""

from __future__ import annotations

import gc
import re
import sys
from pathlib import Path

import pytest
import torch

from tokenwire.engine import LLM, SamplingParams, hugepages

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_available() -> bool:
    return sys.platform.startswith("linux") and _THP.exists() and "[never]" not in _THP.read_text()


def huge_kib(tensor: torch.Tensor) -> int:
    """KiB of the tensor's address range that /proc/self/smaps reports as anonymous huge pages."""
    lo = tensor.data_ptr()
    hi = lo + tensor.numel() * tensor.element_size()
    total, span = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            span = (int(m.group(1), 16), int(m.group(2), 16))
        elif line.startswith("AnonHugePages:") and span and span[0] < hi and span[1] > lo:
            total += int(line.split()[1])
    return total


def test_zeros_is_torch_zeros() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((3, 16, 3, 64), (3000, 16, 3, 64)):  # below a huge page, and above
            t = hugepages.zeros(shape, dtype, torch.device("cpu"))
            assert t.dtype == dtype and t.shape == shape and t.is_contiguous()
            assert not t.any()


def test_a_tensor_outlives_every_other_reference_to_its_memory() -> None:
    t = hugepages.zeros((4 * 1024 * 1024,), torch.float32, torch.device("cpu"))[1:]
    gc.collect()
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * t.numel()


@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off or absent here")
def test_large_zeros_are_backed_by_huge_pages() -> None:
    t = hugepages.zeros((16 * 1024 * 1024,), torch.float32, torch.device("cpu"))  # 64 MiB
    assert huge_kib(t) >= 32 * 1024, "fewer than half of 64 MiB came on huge pages"


@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off or absent here")
def test_engine_kv_pools_are_on_huge_pages(seed_model_folder: Path) -> None:
    llm = LLM(str(seed_model_folder), dtype="float32", kv_cache_memory=64 * 1024 * 1024)
    k_cache, v_cache = llm.core.runner.kv_caches[0]
    assert huge_kib(k_cache) > 0 and huge_kib(v_cache) > 0
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=4, ignore_eos=True))  # the pools still work as pools
    assert len(out[0].token_ids) == 4
