"""Every matmul of one forward step of the default model: from its GGUF blocks against the dense float32 weights, by rows."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenwire.engine import native
from tokenwire.engine.loader import load_model
from tokenwire.engine.models.gguf_linear import GGUFLinear
from tokenwire.engine.models.packed_linear import PackedLinear, can_prepack


def sweep_seconds(layers: list[tuple[torch.nn.Module, int]], rows: int, repeats: int) -> float:
    """Seconds for one pass over every layer with ``rows`` rows of input (best of ``repeats``)."""
    inputs = {k: torch.randn(rows, k) for k in {k for _, k in layers}}
    best = float("inf")
    for _ in range(repeats + 1):  # NOTE: the first pass warms up and is not counted
        start = time.perf_counter()
        for layer, k in layers:
            layer(inputs[k])
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--layers-only", action="store_true", help="leave out the LM head (decode steps run it on the sampled rows only)"
    )
    args = parser.parse_args()
    if not native.available(torch.device("cpu"), torch.float32):
        raise SystemExit("the native kernels are not available (no C++ compiler?)")
    model = load_model(None, dtype="float32", device="cpu", progress=False).model
    blocks = model.gguf_linear_blocks()  # type: ignore[attr-defined]
    if args.layers_only:
        blocks.pop("lm_head", None)
    dense: list[tuple[torch.nn.Module, int]] = []
    quant: list[tuple[torch.nn.Module, int]] = []
    for path, parts in blocks.items():
        linear = model.get_submodule(path)
        k = linear.in_features
        # NOTE: the dense side as the engine runs it: oneDNN-packed where torch has oneDNN.
        dense.append((PackedLinear(linear) if can_prepack(torch.float32, torch.device("cpu")) else linear, k))
        quant.append((GGUFLinear(None, [native.quant_pack(t, raw, k) for t, raw in parts], None), k))
    flops = sum(2 * layer.in_features * layer.out_features for layer in (model.get_submodule(p) for p in blocks))
    print(f"{len(blocks)} matmuls, {flops / 2e6:.0f} M weights; threads: {torch.get_num_threads()}")
    print("| rows | dense float32 ms | GGUF blocks ms | speed-up (median of rounds) | blocks GFLOP/s |")
    print("|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        # NOTE: the two sides alternate round by round, so that the machine's drift (10-20% here
        # between minutes) hits both; the ratio is taken within a round.
        rounds = [(sweep_seconds(dense, rows, 1), sweep_seconds(quant, rows, 1)) for _ in range(args.repeats)]
        t_dense, t_quant = min(d for d, _ in rounds), min(q for _, q in rounds)
        ratio = statistics.median(d / q for d, q in rounds)
        print(
            f"| {rows} | {t_dense * 1e3:.1f} | {t_quant * 1e3:.1f} | {ratio:.2f}x | {rows * flops / t_quant / 1e9:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
