"""A counter-only energy source whose power steps from 10 W to 1000 W when told (`switch()`):
the energy it has counted at any instant is known exactly (`joules`), so a recovered window
can be checked against the truth. Shared by a SIGKILLed child process and the test reading
what it left."""

from __future__ import annotations

import time
from typing import Any

from wattkd.energy.source import Device, Discovery, EnergySource

T0 = time.monotonic()
SWITCH: list[float] = []


def switch() -> None:
    SWITCH.append(time.monotonic())


def joules(t: float) -> float:
    """Energy counted since import: 10 W, then 1000 W from the switch on."""
    if not SWITCH or t < SWITCH[0]:
        return 10.0 * (t - T0)
    return 10.0 * (SWITCH[0] - T0) + 1000.0 * (t - SWITCH[0])


class StepPower(EnergySource):
    LABEL = "step-power"
    NAME = "step"
    COMPONENTS = ("gpu",)
    BLIND_TO = "a test counter"
    CHARACTERISED = True
    TELEMETRY_KEY = "step"

    @classmethod
    def create(cls, ctx: Discovery) -> StepPower:
        return cls()

    def open(self) -> StepPower:
        self.devices = [Device("d0", "gpu")]
        return self

    def read_counter(self, dev: Device) -> float:
        return joules(time.monotonic())

    def uncertainty_j(self, energy_j: float, *rest: Any) -> float:
        return 0.001 * energy_j

    @classmethod
    def telemetry_counters(cls, section: Any, component: str) -> dict[str, Any]:
        if component != "gpu":
            return {}
        return {k: v for k, v in (section or {}).items() if v is not None}
