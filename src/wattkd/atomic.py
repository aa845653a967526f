"""Write-to-temp-then-rename helpers, so no reader ever sees a half-written file or folder.

Temp names live in the same parent as the target (a rename across file systems is not atomic)
and start with "." so globs over a folder skip them. New files and folders get the usual
permissions (0666/0777 minus the umask), not the 0600 that `tempfile` would give.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _temp_name(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.{tag}-{secrets.token_hex(4)}")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort (some file systems refuse fsync on a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder, fsync, then rename."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(final.parent)
    return final


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Text version of `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """Write `obj` as JSON (UTF-8, trailing newline); same object => same bytes."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False,
                      allow_nan=False)
    return atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp folder beside `final_path`; on success it becomes `final_path`.

    On error the temp folder is removed and `final_path` is untouched. An existing
    `final_path` is replaced: it is first renamed aside, the new folder renamed in, then the
    old one deleted, so a reader sees the old or the new folder, never a mix (there is a
    moment where neither exists, as Python has no atomic exchange of two folders).
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final, "tmp")
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    try:
        if final.exists() or final.is_symlink():
            old = _temp_name(final, "old")
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
