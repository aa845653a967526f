"""Energy measurement: sources behind one interface (`source.EnergySource`; NVML, RAPL, CPU
time in `sources/`), a sampler, a phase ledger, metrics.

Formats are documented in docs/energy-formats.md and in the module docstrings of
`monitor` (telemetry JSONL) and `ledger` (phases.jsonl).
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from wattkd import __version__


def versions(driver: str | None = None) -> dict[str, Any]:
    """Versions that matter for an energy figure (recorded in telemetry and benchmark output)."""
    out: dict[str, Any] = {"python": platform.python_version(), "nvidia_driver": driver}
    for dist in ("wattkd", "nvidia-ml-py", "psutil", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if out["wattkd"] is None:  # a source checkout on PYTHONPATH, not installed
        out["wattkd"] = __version__
    return out
