"""Regenerate the committed Python stubs in client/v1 from protos/ (run by `make proto`)."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_DIR = ROOT / "client" / "v1"
PROTOS = ["tokenwire/v1/generation.proto"]
# protoc names imports after the proto path (tokenwire.v1); the stubs live in tokenwire.client.v1.
_IMPORT = re.compile(r"^from tokenwire\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write the *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files into out_dir; return their paths."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTO_ROOT / p) for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(tmp) / "tokenwire" / "v1").glob("*_pb2*.py*")):
            text = _IMPORT.sub("from tokenwire.client.v1 import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
        return written


def main() -> int:
    """Regenerate in place, or with --check report whether the committed stubs are stale."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs differ")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT_DIR):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [p.name for p in generate(Path(tmp)) if p.read_text() != (OUT_DIR / p.name).read_text()]
    if stale:
        print(f"stale stubs (run `make proto`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
