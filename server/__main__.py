"""`python -m tokenwire.server`: the same as `tokenwire serve`."""

from __future__ import annotations

import sys

from tokenwire.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
