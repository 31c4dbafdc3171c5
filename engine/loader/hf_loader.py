"""Loading a model from a Hugging Face folder: config.json and safetensors (single file or sharded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenwire.engine.errors import ModelLoadError
from tokenwire.engine.loader.architecture import BuiltModel
from tokenwire.engine.loader.progress import progress_enabled, track
from tokenwire.engine.loader.registry import architecture_for_hf, known_architectures

SAFETENSORS_INDEX = "model.safetensors.index.json"


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a config.json."""
    return path.is_dir() and (path / "config.json").is_file()


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def safetensors_files(path: Path) -> list[Path]:
    """The folder's weight files: the shards named by the index, else every *.safetensors file.

    Raises:
        ModelLoadError: no safetensors files, or an index naming files that are missing.
    """
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a readable safetensors index ({exc})") from exc
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (.bin checkpoints are not supported; convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"{path}: no *.safetensors weight files{hint}")
    return files


def _read_tensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the files, one at a time (memory-mapped, read on demand)."""
    from safetensors import SafetensorError, safe_open

    handles = []
    for file in files:
        try:
            handles.append(safe_open(str(file), framework="pt"))
        except SafetensorError as exc:
            raise ModelLoadError(f"{file}: not a readable safetensors file, truncated or corrupt ({exc})") from exc
    entries = [(file, handle, name) for file, handle in zip(files, handles) for name in handle.keys()]
    for file, handle, name in track(entries, total=len(entries), desc=f"Loading {files[0].parent.name}", enabled=progress):
        try:
            tensor = handle.get_tensor(name)
        except SafetensorError as exc:
            raise ModelLoadError(f"{file}: tensor {name} is unreadable, the file is truncated or corrupt ({exc})") from exc
        yield name, tensor


def load_hf(path: Path, dtype: torch.dtype, device: torch.device, progress: bool | None = None) -> BuiltModel:
    """Read a Hugging Face model folder into a model of its architecture.

    Args:
        path: the folder (config.json, *.safetensors).
        dtype: dtype of the model's weights.
        device: where the model goes.
        progress: draw a progress bar (None: only when stderr is a terminal).

    Raises:
        ModelLoadError: no config.json, an unknown architecture, missing or unreadable weights, or
            tensors that do not fit the architecture.
    """
    path = Path(path)
    if not is_hf_folder(path):
        raise ModelLoadError(f"{path}: not a model folder (no config.json)")
    config_json = _read_config(path)
    arch = architecture_for_hf(config_json)
    if arch is None:
        found = config_json.get("architectures") or config_json.get("model_type")
        raise ModelLoadError(f"{path}: unsupported architecture {found!r} (supported: {', '.join(known_architectures())})")
    files = safetensors_files(path)
    try:
        config = arch.config_from_hf(config_json)
        model = arch.build(config, dtype, device)
        model.load_weights(_read_tensors(files, progress_enabled(progress)))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    name = str(config_json.get("_name_or_path") or path.name)
    return BuiltModel(model=model, architecture=arch, config=config, name=name)
