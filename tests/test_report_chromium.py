"""report.html renders in headless Chromium without console errors (skipped without chromium).

Console messages (script errors, Content-Security-Policy violations from any network asset)
are read from Chromium's own log; a screenshot proves the page paints.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from report_synth import cpu_experiment
from wattkd.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=3000", "--hide-scrollbars"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                                "(apt-get install chromium)")


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120, env=env, check=False)


def _console(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if re.search(r":CONSOLE[:(]", ln)]


def test_chromium_detects_console_errors(tmp_path: Path):
    """The check itself can fail: a page with a script error and a network image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" "
                   "content=\"default-src 'none'; script-src 'unsafe-inline'\"></head><body>"
                   "<img src=\"http://example.invalid/x.png\"><script>nope();</script></body>"
                   "</html>")
    res = _chromium(tmp_path, "--dump-dom", bad.as_uri())
    lines = _console(res.stderr)
    assert any("nope is not defined" in ln for ln in lines), res.stderr[-2000:]
    assert any("Content Security Policy" in ln for ln in lines)


def test_report_renders_without_console_errors(tmp_path: Path):
    root = cpu_experiment(tmp_path / "runs")
    report = build_report([root], teacher=root / "teacher", out=tmp_path / "report")
    res = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console(res.stderr) == []
    assert 'id="table-methods"' in res.stdout          # the DOM Chromium built
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
