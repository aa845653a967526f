"""Progress display helpers shared by the long stages (training, teacher cache)."""

from __future__ import annotations

from typing import Any


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
