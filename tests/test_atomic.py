"""Atomic write helpers: content, permissions, and nothing half-written on failure."""

from __future__ import annotations

import json
import os
import stat

import pytest

from wattkd.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_bytes_text_json(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1.5, None]})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"b": 1, "a": [1.5, None]}
    # Same object, same bytes (key order kept, trailing newline).
    first = (tmp_path / "j.json").read_bytes()
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1.5, None]})
    assert (tmp_path / "j.json").read_bytes() == first and first.endswith(b"\n")
    assert _leftovers(tmp_path) == []


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_create_replace_and_error(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        assert d.parent == tmp_path and d.name.startswith(".out.")
        (d / "one").write_text("1")
        assert not final.exists()  # nothing visible until the block succeeds
    assert (final / "one").read_text() == "1"

    with atomic_dir(final) as d:
        (d / "two").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["two"]  # replaced, not merged

    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "three").write_text("3")
        raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["two"]
    assert _leftovers(tmp_path) == []
