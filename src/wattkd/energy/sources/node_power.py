"""A node power meter: cumulative energy read from a file or a command ("node-power").

The stand-in for what clusters expose per node: a BMC over IPMI (`ipmitool dcmi power`), a
Redfish endpoint, Slurm's acct_gather_energy plugins, a PDU. Whatever the meter covers
(typically the whole node: GPUs, CPUs, DRAM, fans, power-supply losses) is one component,
`node`, declared here as containing the GPU, CPU and DRAM components: where both are
measured, totals (energy budgets, EPT's sums) count the node figure only, never node + GPU.

Configured in the experiment YAML, and opened only then:

    telemetry:
      sources:
        node-power:
          file: /run/node-energy/energy_j     # or
          command: [/usr/local/bin/node-energy, --joules]   # an argv list, run without a shell
          scale_j: 1.0            # J per unit read (1e-6 for µJ, 3.6e6 for kWh)
          wrap: null              # raw value at which the counter wraps to 0, if it does
          max_power_w: 20000      # plausibility bound for counter increases (glitch rule)
          timeout_s: 2.0          # a command slower than this is a failed read

The file or the command's stdout holds one number: the meter's cumulative energy. A read
that fails or is not a number is missing (null), never invented; the ledger's counter rules
(energy/counters.py) handle resets and glitches.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wattkd.energy.components import Component
from wattkd.energy.counters import CounterTracker
from wattkd.energy.source import Device, Discovery, EnergySource
from wattkd.energy.sources.registry import register_source
from wattkd.errors import ConfigError

log = logging.getLogger(__name__)

NODE = Component("node", "Node", contains=("gpu", "cpu", "dram"), rank=1)
NODE_MAX_POWER_W = 20_000.0   # default plausibility bound: above an 8-GPU node's ~10 kW
SHELL_OPERATORS = ("|", "&", ";", "<", ">", "$(", "`")


class NodePowerOptions(BaseModel):
    """`telemetry.sources.node-power`: exactly one of `file` or `command`."""

    model_config = ConfigDict(extra="forbid")
    file: str | None = None
    command: list[str] | str | None = None
    scale_j: float = Field(default=1.0, gt=0)
    wrap: float | None = Field(default=None, gt=0)
    max_power_w: float = Field(default=NODE_MAX_POWER_W, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _one_way(self) -> NodePowerOptions:
        if (self.file is None) == (self.command is None):
            raise ValueError("set exactly one of `file` (a path holding the cumulative energy) "
                             "or `command` (an argv list printing it)")
        return self


def command_argv(command: list[str] | str) -> list[str]:
    """The argv a command runs as (no shell ever): its program must exist and be executable;
    a command written as one string may not use shell operators (pipes, redirections, `$(`),
    which would be passed literally, not interpreted."""
    try:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
    except ValueError as exc:
        raise ConfigError(f"telemetry.sources.node-power.command: {exc}") from None
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise ConfigError("telemetry.sources.node-power.command: expected a non-empty list of "
                          "non-empty strings (the program and its arguments)")
    # a list is an argv as it stands; a string written for a shell would silently mean
    # something else without one
    bad = [a for a in argv if isinstance(command, str) and any(op in a for op in SHELL_OPERATORS)]
    if bad:
        raise ConfigError(f"telemetry.sources.node-power.command: {bad[0]!r} contains shell "
                          "syntax; the command runs without a shell, so pipes, redirections "
                          "and variables are not interpreted: put them in a script and give "
                          "its path")
    prog = argv[0]
    found = prog if os.sep in prog else shutil.which(prog)
    if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise ConfigError(f"telemetry.sources.node-power.command: program {prog!r} not found "
                          "or not executable (give an absolute path or a program on PATH)")
    return [found, *argv[1:]]


@register_source
class NodePowerSource(EnergySource):
    """The node's cumulative energy from a file or a command (one device: this node)."""

    LABEL = "node-power"
    NAME = "node meter"
    COMPONENTS = ("node",)
    DECLARES = (NODE,)
    CONFIGURED_ONLY = True
    BLIND_TO = ("node meter (file or command): whatever the meter covers, typically the whole "
                "node (GPUs, CPUs, DRAM, fans, power-supply losses); its update period and "
                "accuracy are the meter's and not characterised here, so no uncertainty")
    TELEMETRY_KEY = "node"
    HOST_LOCAL_KEYS = True

    def __init__(self, opts: NodePowerOptions) -> None:
        super().__init__()
        self.opts = opts
        self.argv = command_argv(opts.command) if opts.command is not None else None
        self.what = f"command {shlex.join(self.argv)}" if self.argv else f"file {opts.file}"

    @classmethod
    def create(cls, ctx: Discovery) -> NodePowerSource:
        try:
            opts = NodePowerOptions.model_validate(ctx.own(cls))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"telemetry.sources.{cls.LABEL}{'.' + where if where else ''}: "
                              f"{first['msg']}") from None
        return cls(opts)

    def open(self) -> NodePowerSource:
        dev = Device("node", "node", scale_j=self.opts.scale_j,
                     wrap=None if self.opts.wrap is None else int(self.opts.wrap),
                     max_power_w=self.opts.max_power_w, info={"name": self.what})
        first = self.read_counter(dev)
        if first is None:
            self.reason = f"node meter {self.what}: " + self.unavailable.pop(
                "node/node", "no reading")
            return self
        self.devices = [dev]
        return self

    def read_counter(self, dev: Device) -> float | None:
        try:
            text = self._read_text()
            value = float(text.strip())
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{text.strip()[:40]!r} is not a cumulative energy (>= 0)")
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            key = "node/node"
            if key not in self.unavailable:
                self.unavailable[key] = f"read failed: {exc}"
                log.warning("node meter %s: read failed: %s", self.what, exc)
            return None
        return value

    def _read_text(self) -> str:
        if self.argv is None:
            return Path(str(self.opts.file)).read_text(encoding="utf-8")
        out = subprocess.run(self.argv, shell=False, capture_output=True, text=True,
                             timeout=self.opts.timeout_s, check=False, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise ValueError(f"exit status {out.returncode}: {out.stderr.strip()[:200]}")
        return out.stdout

    def header(self) -> dict[str, Any]:
        return {"node": [{"key": d.key, "meter": self.what, "scale_j": d.scale_j,
                          "wrap": d.wrap} for d in self.devices]}

    @classmethod
    def telemetry_counters(cls, section: Any, component: str) -> dict[str, Any]:
        if component != "node":
            return {}
        return {k: v for k, v in (section or {}).items() if v is not None}

    @classmethod
    def telemetry_tracker(cls, headers: Sequence[dict[str, Any]], session: str,
                          key: str) -> CounterTracker:
        scale, wrap = 1.0, None
        for h in headers:
            if h.get("session") == session:
                for d in h.get("node", []):
                    if d.get("key") == key:
                        scale, wrap = float(d.get("scale_j") or 1.0), d.get("wrap")
        return CounterTracker(scale, wrap=wrap)
