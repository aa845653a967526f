"""Progress display shared by the long stages (shards, teacher cache, training)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class NoBar:
    """Stands in for a rich Progress when progress display is off (tests, non-main ranks)."""

    def __enter__(self) -> NoBar:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass


class TokenRate(ProgressColumn):
    """Tokens per second from rich's own speed estimate ("-" until it has one)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="cyan")


def progress_bar(enabled: bool, *columns: ProgressColumn | str) -> Progress | NoBar:
    """One bar layout for every stage: description, bar, the stage's own columns, time left.

    Off (tests, non-main ranks) gives a `NoBar` with the same interface, so callers never branch.
    """
    if not enabled:
        return NoBar()
    cols = [TextColumn(c) if isinstance(c, str) else c for c in columns]
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *cols,
                    TimeRemainingColumn(), transient=False)
