"""Loading a model from a GGUF file through the ``gguf`` package, dequantizing to the target dtype."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenwire.engine.errors import ModelLoadError
from tokenwire.engine.loader.architecture import Architecture, BuiltModel
from tokenwire.engine.loader.progress import progress_enabled, track
from tokenwire.engine.loader.registry import architecture_for_gguf, known_architectures
from tokenwire.engine.native import GGUF_KERNEL_TYPES

GGUF_MAGIC = b"GGUF"


class GGUFMetadata(Mapping[str, Any]):
    """GGUF key/value metadata, each value converted to Python only when read."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = fields

    def __getitem__(self, key: str) -> Any:
        # NOTE: lazy because the tokenizer's arrays (tens of thousands of strings) are slow to
        # convert and the model needs none of them.
        return self._fields[key].contents()

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over the file (the tokenizer can share it: parsing takes seconds).

    Raises:
        ModelLoadError: not a GGUF file, or truncated or corrupt.
    """
    import gguf  # NOTE: lazy: only GGUF loads need it.

    if not is_gguf_file(path):
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        # NOTE: the reader fails with numpy reshape/view errors when the file ends early.
        size = path.stat().st_size
        raise ModelLoadError(f"{path}: the GGUF file is truncated or corrupt ({size} bytes; reader said: {exc})") from exc


def _check_tensors(path: Path, reader: Any) -> None:
    """Fail early, before any work, on truncated tensor data or a type that cannot be dequantized."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    size = path.stat().st_size
    checked: set[Any] = set()
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise ModelLoadError(f"{path}: the GGUF file is truncated: tensor {t.name} ends at byte {end}, the file has {size}")
        if t.tensor_type in checked:
            continue
        _, type_size = GGML_QUANT_SIZES[t.tensor_type]
        try:
            # NOTE: one block of zeros asks gguf whether it can dequantize this type at all.
            dequantize(np.zeros((1, type_size), dtype=np.uint8), t.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(
                f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which cannot be dequantized"
            ) from exc
        checked.add(t.tensor_type)


def _torch_shape(t: Any) -> tuple[int, ...]:
    # NOTE: GGUF lists dimensions fastest-first (ggml's ne0, ne1); torch lists them slowest-first.
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def tensor_to_torch(t: Any) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in its torch shape (float16/bfloat16 kept, quantized -> float32)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = _torch_shape(t)
    data = np.asarray(t.data)
    if t.tensor_type == Q.F32:
        return torch.from_numpy(data.view(np.float32).copy()).reshape(shape)
    if t.tensor_type == Q.F16:
        return torch.from_numpy(data.view(np.float16).copy()).reshape(shape)
    if t.tensor_type == Q.BF16:
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(dequantize(data, t.tensor_type)).reshape(shape)


def _weights(tensors: Iterable[Any], arch: Architecture, config: Any, keeper: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dense tensor) per GGUF tensor; a quantized one's blocks also go to ``keeper.keep_gguf_blocks``.

    The blocks go through the architecture's name and row mapping too (``gguf_weight`` only names
    and reorders rows), so that they stay row for row with the dense weight.
    """
    for t in tensors:
        name, tensor = arch.gguf_weight(t.name, tensor_to_torch(t), config)
        if keeper is not None and int(t.tensor_type) in GGUF_KERNEL_TYPES and tensor.dim() == 2:
            raw = torch.from_numpy(np.asarray(t.data).reshape(tensor.shape[0], -1).copy())
            keeper.keep_gguf_blocks(name, int(t.tensor_type), arch.gguf_weight(t.name, raw, config)[1])
        yield name, tensor


def load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device, progress: bool | None = None, reader: Any = None
) -> BuiltModel:
    """Read a GGUF file into a model of its architecture.

    Args:
        path: the .gguf file.
        dtype: dtype of the model's weights.
        device: where the model goes.
        progress: draw a progress bar (None: only when stderr is a terminal).
        reader: the file's ``open_gguf`` reader, if already open.

    Raises:
        ModelLoadError: not a GGUF file, truncated, an unknown architecture or quantization type,
            or tensors that do not fit the architecture.
    """
    path = Path(path)
    if reader is None:
        reader = open_gguf(path)
    meta = GGUFMetadata(reader.fields)
    arch_name = meta.get("general.architecture")
    if arch_name is None:
        raise ModelLoadError(f"{path}: GGUF metadata lacks general.architecture")
    arch = architecture_for_gguf(arch_name)
    if arch is None:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch_name!r} (supported: {', '.join(known_architectures())})"
        )
    _check_tensors(path, reader)
    shapes = {t.name: _torch_shape(t) for t in reader.tensors}
    try:
        config = arch.config_from_gguf(meta, arch_name, shapes)
        model = arch.build(config, dtype, device)
        tensors = track(reader.tensors, total=len(reader.tensors), desc=f"Loading {path.name}", enabled=progress_enabled(progress))
        keep_blocks = hasattr(model, "keep_gguf_blocks") and dtype == torch.float32 and device.type == "cpu"
        model.load_weights(_weights(tensors, arch, config, model if keep_blocks else None))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return BuiltModel(model=model, architecture=arch, config=config, name=str(meta.get("general.name") or path.stem))
