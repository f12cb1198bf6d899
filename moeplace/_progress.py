"""Progress bars on stderr (tqdm), silent when stderr is not a terminal.

A thin wrapper so every phase (reading, statistics, search, bounds, scoring) shows progress the
same way and callers can force it on or off (``enabled``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _on(enabled: bool | None) -> bool:
    return sys.stderr.isatty() if enabled is None else enabled


class Progress:
    """Counts work units of one phase; ``update(n)``, then ``close()`` (or use ``with``)."""

    def __init__(self, total: float | None, desc: str, unit: str = "it",
                 enabled: bool | None = None) -> None:
        self.done = 0.0
        self.total = total or 0.0
        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=not _on(enabled),
                         file=sys.stderr, unit_scale=True, dynamic_ncols=True, leave=False,
                         mininterval=0.2)

    def update(self, n: float = 1) -> None:
        self.done += n
        self._bar.update(n)

    def set(self, done: float) -> None:
        """Move the bar to ``done`` (for phases that know how far along they are, e.g. time)."""
        self.update(done - self.done)

    def note(self, text: str) -> None:
        """Show a short status after the bar (e.g. the incumbent objective)."""
        self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "it",
             enabled: bool | None = None) -> Iterator[T]:
    """Wrap an iterable, advancing the bar by one per item."""
    bar = Progress(total, desc, unit, enabled)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
