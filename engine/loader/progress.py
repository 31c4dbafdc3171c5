"""A progress bar for model loading, shown only where someone is watching (stderr is a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(progress: bool | None) -> bool:
    """Whether to draw a bar: as asked, or (None) only when stderr is a terminal."""
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def track(items: Iterable[T], *, total: int, desc: str, enabled: bool) -> Iterator[T]:
    """Yield ``items``, drawing a tqdm bar on stderr when ``enabled``.

    Args:
        items: what to iterate.
        total: how many items there are.
        desc: label of the bar.
        enabled: draw the bar at all.
    """
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm  # NOTE: imported lazily: servers log to files and never need it.

    with tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False) as bar:
        yield from bar
