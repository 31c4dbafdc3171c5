"""Engine configuration: one frozen, validated dataclass (no I/O, no environment reads)."""

from __future__ import annotations

from dataclasses import dataclass

# NOTE: on CPU the pool comes out of ordinary RAM; 1 GiB holds ~46k tokens of the default model's
# context in bfloat16 (23 KB/token), enough for 64 sequences of 700 tokens.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# On CUDA a float budget is a fraction of the memory still free after the weights are loaded.
DEFAULT_CUDA_KV_CACHE_FRACTION = 0.85
# What dtype and kv_cache_dtype take.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineArgs:
    """Everything that shapes an engine: the model, its placement, the KV pool and the batch limits.

    Attributes:
        model: a .gguf file, a Hugging Face folder, or None for the embedded default model.
        dtype: "auto", "float32", "bfloat16" or "float16" (weights and activations; the KV cache
            too, unless ``kv_cache_dtype`` says otherwise).
        device: "auto", "cpu", "cuda" or "cuda:N".
        block_size: tokens per KV cache block.
        kv_cache_memory: the pool's size: bytes (int), or a fraction (0, 1] of free CUDA memory;
            None picks the device's default.
        kv_cache_dtype: the KV cache's element type: "auto" (the model's dtype), "float32",
            "bfloat16" or "float16". A 16-bit cache for a float32 model holds twice the tokens in
            the same memory, and decode attention, which reads every cached key and value each
            step, reads half the bytes; each key and value is rounded once, when it is written.
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most tokens (decodes plus prompt chunks) in one step.
        max_queued_requests: most requests waiting for admission; past it, requests are rejected.
        max_model_len: most tokens (prompt plus completion) per request; None is the model's limit.
        enable_prefix_caching: reuse cached KV blocks of identical prompt prefixes.
        seed: seed of the random draws of requests that set no seed of their own.
        speculative_tokens: draft tokens per step, looked up in the request's own prompt and output
            (n-gram speculative decoding; greedy outputs are unchanged, sampled ones keep their
            distribution; requests with a seed or penalties do not speculate); 0 is off.
        speculative_max_batch: speculate only while at most this many sequences run (with more, a
            step is bound by compute rather than by reading weights, and drafts would slow it).
        prepack_weights: on CPU, pack the linear layers' weights once for oneDNN (faster matmuls
            than torch's default BLAS; results equal up to float rounding), or, for a bfloat16
            model with the native kernels on a CPU with AVX512-BF16, for the native bfloat16
            kernel. False keeps ``F.linear``.
        native_kernels: on CPU, decode attention, RMSNorm, RoPE and SiLU-and-multiply run in C++
            kernels built on first use with the system compiler (``native.py``); without a
            compiler, or with False, they run in torch.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | float | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_queued_requests: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    speculative_tokens: int = 0
    speculative_max_batch: int = 4
    prepack_weights: bool = True
    native_kernels: bool = True

    def __post_init__(self) -> None:
        for name in ("dtype", "kv_cache_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ValueError(f"{name} must be auto, float32, bfloat16 or float16, got {getattr(self, name)!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        mem = self.kv_cache_memory
        if isinstance(mem, bool) or not (
            mem is None or (isinstance(mem, int) and mem > 0) or (isinstance(mem, float) and 0.0 < mem <= 1.0)
        ):
            raise ValueError(f"kv_cache_memory must be bytes > 0 or a fraction in (0, 1], got {mem!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.speculative_tokens <= 64:
            raise ValueError(f"speculative_tokens must be in [0, 64], got {self.speculative_tokens}")
        if self.speculative_max_batch < 1:
            raise ValueError(f"speculative_max_batch must be >= 1, got {self.speculative_max_batch}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 when set, got {self.max_model_len}")
