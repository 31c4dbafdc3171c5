"""The `tokenwire serve` command: flags, settings, logging, then the server until a signal."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tokenwire.server.settings import Settings, add_arguments


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` flags to ``parser`` (each also read from a TOKENWIRE_* variable)."""
    add_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; the exit status (0 after a drain, 1 on a start failure, 2 on bad settings)."""
    try:
        settings = Settings.from_sources(args, os.environ)
    except ValueError as exc:
        print(f"tokenwire serve: error: {exc}", file=sys.stderr)
        return 2
    # NOTE: imported here so `tokenwire --help` and the client-only commands never load the server.
    from tokenwire.server.app import run
    from tokenwire.server.logging import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    return run(settings)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m tokenwire.server` (the same flags as `tokenwire serve`)."""
    parser = argparse.ArgumentParser(
        prog="python -m tokenwire.server",
        description="Serve a language model over gRPC (tokenwire.v1.GenerationService).",
    )
    add_serve_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and serve; the exit status."""
    return run_serve(build_parser().parse_args(argv))
