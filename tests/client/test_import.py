"""The client package stands alone: grpcio and protobuf, never torch or the engine/server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tokenwire.client


def test_import_in_fresh_interpreter_loads_no_torch_engine_or_server() -> None:
    code = (
        "import sys, tokenwire.client, tokenwire.client.cli\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'numpy',"
        " 'tokenwire.engine', 'tokenwire.server')))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""


def test_package_is_typed_and_public_names_are_documented() -> None:
    assert (Path(tokenwire.client.__file__).parent / "py.typed").is_file()
    undocumented = [
        name for name in tokenwire.client.__all__
        if isinstance(getattr(tokenwire.client, name), type) and not getattr(tokenwire.client, name).__doc__
    ]
    assert undocumented == []
