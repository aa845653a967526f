"""This process tree's CPU time as an `estimated` CPU energy (no package power counter), and
the node's CPU utilisation and RAM for telemetry, via psutil."""

from __future__ import annotations

from typing import Any

import psutil

from wattkd.energy.counters import LevelCounter
from wattkd.energy.source import Device, Discovery, EnergySource
from wattkd.energy.sources.registry import register_source

HINT = "set telemetry.cpu_watts_per_core for an estimate"


class CpuSource:
    """CPU utilisation and RAM (node-wide) and this process tree's CPU time, via psutil.

    Every call is non-blocking: cpu_percent(interval=None) compares with the previous call.
    """

    def __init__(self) -> None:
        self._proc = psutil.Process()
        psutil.cpu_percent(interval=None)  # prime: the first call has no reference point

    def read_slow(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        return {"util_pct": psutil.cpu_percent(interval=None),
                "ram_used_b": int(vm.total - vm.available), "ram_total_b": int(vm.total)}

    def process_cpu_seconds(self) -> float:
        """User+system CPU seconds of this process and its children (live and reaped)."""
        return process_tree_cpu_seconds(self._proc)


def process_tree_cpu_seconds(proc: psutil.Process) -> float:
    """User+system CPU seconds of `proc` and its children (live and reaped)."""
    total = _cpu_s(proc)
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            total += _cpu_s(child)
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def _cpu_s(p: Any) -> float:
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


@register_source
class CpuTimeSource(EnergySource):
    """CPU energy estimated as CPU seconds x telemetry.cpu_watts_per_core.

    Used only when the user sets the wattage and no measured source covers the CPU (discovery
    skips estimates of a measured component). Read at the slow cadence and at window edges."""

    LABEL = "estimated-cpu-time"
    ORDER = 2
    NAME = "CPU time"
    COMPONENTS = ("cpu",)
    ESTIMATED = True
    BLIND_TO = ("CPU time estimate: no package power (idle, other processes, DRAM and "
                "frequency are not seen); a fixed wattage per busy core")

    def __init__(self, watts_per_core: float | None) -> None:
        super().__init__()
        self.watts_per_core = watts_per_core
        self._proc: psutil.Process | None = None

    @classmethod
    def create(cls, ctx: Discovery) -> CpuTimeSource:
        return cls(ctx.cfg.cpu_watts_per_core)

    def open(self) -> CpuTimeSource:
        if self.watts_per_core is None:
            self.reason = HINT
            return self
        self._proc = psutil.Process()
        self.devices = [Device("process", "cpu", scale_j=float(self.watts_per_core))]
        return self

    def read_counter(self, dev: Device) -> float | None:
        return process_tree_cpu_seconds(self._proc) if self._proc is not None else None

    def tracker(self, dev: Device) -> LevelCounter:
        return LevelCounter(dev.scale_j)
