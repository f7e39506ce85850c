"""Progress bars that are on for interactive runs and off when quiet or not on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_ENABLED: ContextVar[bool] = ContextVar("addons_progress", default=False)


def enabled() -> bool:
    """Whether progress bars should be shown now."""
    return _ENABLED.get()


@contextmanager
def progress_bars(on: bool) -> Iterator[None]:
    """Show progress bars inside the block if ``on`` and stderr is a terminal."""
    token = _ENABLED.set(bool(on) and sys.stderr.isatty())
    try:
        yield
    finally:
        _ENABLED.reset(token)


def bar(total: int | None = None, desc: str = "", unit: str = "it") -> Any:
    """A tqdm bar (disabled unless :func:`enabled`)."""
    from tqdm import tqdm  # bars only show on a terminal, so no notebook widget variant

    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled(), leave=False, file=sys.stderr
    )
