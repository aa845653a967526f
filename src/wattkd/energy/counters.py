"""Cumulative counters -> monotonic energy totals (J), shared by every energy source and reader.

`CounterTracker` turns raw counter reads into a monotonic total: a RAPL counter wraps at
`max_energy_range_uj`, an NVML counter only decreases when the driver reloads (a reset), and
neither ever yields negative energy. `LevelCounter` is the plain difference for a counter that
has no glitches to judge (this process tree's CPU seconds). `PowerIntegrator` integrates power
samples: the cross-check figure.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Used only where the power limit is unknown: the highest board power we treat as plausible
# when deciding whether a post-reset counter value can be trusted (H200 SXM: 700 W).
_PLAUSIBLE_MAX_W = 1500.0


class CounterTracker:
    """Monotonic energy total (J) from a raw cumulative counter, with a plausibility check.

    `wrap` (raw units) is the RAPL `max_energy_range_uj`: a decrease is a wrap-around. Without
    `wrap` (NVML) a decrease is a counter reset (driver reload): the post-reset value is counted
    only when it is physically possible within the elapsed interval (<= `max_power_w` x dt),
    otherwise that interval counts 0 and `resets` records the event.

    Glitches (one bad read) are excluded and counted in `glitches`, never as energy:
      * a negative raw value;
      * an increase above `max_power_w` x (dt + SLACK_S), more than the device can draw: never
        counted. If the next read continues from the old level, the high read was the glitch;
        if it continues from the high one, the old level was (a bad first read, say 0) and
        the count goes on from the new level;
      * a drop that the next read undoes (back at or above the level before the drop). A drop
        is counted as a reset at once (a window edge may need the figure now) and taken back
        when the next read shows it was a glitch. A real reset restarts near 0 and keeps
        rising, so it stays a reset.
    Never negative.
    """

    # counter update period (NVML ~0.1 s) plus scheduling jitter: an edge read just after an
    # update may carry a whole period of energy in a tiny dt; only gross glitches are caught
    SLACK_S = 1.0

    def __init__(self, scale_j: float, *, wrap: int | None = None,
                 max_power_w: float | None = None) -> None:
        self.scale_j = scale_j
        self.wrap = wrap
        self.max_power_w = max_power_w or _PLAUSIBLE_MAX_W
        self.total_j = 0.0
        self.resets = 0
        self.wraps = 0
        self.glitches = 0
        self.last_raw: int | None = None
        self.last_t: float | None = None
        # a drop counted as a reset: (raw level before it, its time, joules counted)
        self._drop: tuple[int, float, float] | None = None
        self._spike: tuple[int, float] | None = None     # an implausible high read, raw and t

    @property
    def suspect(self) -> bool:
        """The last read is a drop or a spike the next read will judge (read again to know)."""
        return self._drop is not None or self._spike is not None

    def _plausible(self, joules: float, dt: float) -> bool:
        return joules <= self.max_power_w * (max(dt, 0.0) + self.SLACK_S)

    def update(self, raw: int | None, t: float) -> float:
        """Feed one read taken at monotonic time `t`; return the energy (J) it added (negative
        only when it takes back what a glitch drop had counted as a reset)."""
        if raw is None:
            return 0.0
        if raw < 0:
            self._glitch(raw, "negative")
            return 0.0
        if self.last_raw is None:
            self.last_raw, self.last_t = raw, t
            return 0.0
        drop, self._drop = self._drop, None
        spike, self._spike = self._spike, None
        if drop is not None and not self.wrap and raw >= drop[0] \
                and self._plausible((raw - drop[0]) * self.scale_j, t - drop[1]):
            before, _, counted = drop   # the drop was one bad read: undo its reset
            self.resets -= 1
            self.glitches += 1
            log.warning("energy counter read %d was a glitch (back to %d): excluded",
                        self.last_raw, raw)
            added = (raw - before) * self.scale_j - counted
            self.total_j += added
            self.last_raw, self.last_t = raw, t
            return added
        dt = max(t - self.last_t, 0.0) if self.last_t is not None else 0.0
        diff = raw - self.last_raw
        if diff < 0:
            if self.wrap:
                diff += self.wrap
                self.wraps += 1
            else:
                self.resets += 1
                diff = raw if raw * self.scale_j <= self.max_power_w * dt else 0
                log.warning("energy counter decreased (%d -> %d): counter reset; %s", self.last_raw,
                            raw, "counting the post-reset value" if diff else
                            "the interval is not counted")
                self._drop = (self.last_raw, self.last_t if self.last_t is not None else t,
                              diff * self.scale_j)
        elif not self._plausible(diff * self.scale_j, dt):
            if spike is not None and raw >= spike[0] and \
                    self._plausible((raw - spike[0]) * self.scale_j, t - spike[1]):
                # continues from the high read: the old level was the bad read
                log.warning("energy counter level %d was the glitch (the reads continue "
                            "from %d): counting from there", self.last_raw, spike[0])
                added = (raw - spike[0]) * self.scale_j
                self.total_j += added
                self.last_raw, self.last_t = raw, t
                return added
            self._glitch(raw, f"increase above {self.max_power_w:g} W x {dt:.3g} s")
            self._spike = (raw, t)
            return 0.0
        self.last_raw, self.last_t = raw, t
        added = max(diff, 0) * self.scale_j
        self.total_j += added
        return added

    def _glitch(self, raw: int, why: str) -> None:
        self.glitches += 1
        log.warning("energy counter read %d excluded as a glitch (%s; last good %s)", raw, why,
                    self.last_raw)


class PowerIntegrator:
    """Trapezoid integral of power samples (W) over monotonic time: the cross-check figure."""

    def __init__(self) -> None:
        self.joules = 0.0
        self.samples = 0
        self._last: tuple[float, float] | None = None

    def add(self, t: float, watts: float | None) -> None:
        if watts is None:
            return
        if self._last is not None and t > self._last[0]:
            self.joules += 0.5 * (watts + self._last[1]) * (t - self._last[0])
        self._last = (t, watts)
        self.samples += 1




class LevelCounter:
    """Energy = (last read - first read) x `scale_j`: a counter whose every level is believed
    (CPU seconds, never judged for glitches; a window's figure is its two edges' difference)."""

    resets = 0
    wraps = 0
    glitches = 0
    suspect = False

    def __init__(self, scale_j: float) -> None:
        self.scale_j = scale_j
        self.first_raw: float | None = None
        self.last_raw: float | None = None
        self.total_j = 0.0

    def update(self, raw: float | None, t: float) -> float:
        if raw is None:
            return 0.0
        if self.first_raw is None:
            self.first_raw = raw
        before = self.total_j
        self.last_raw = raw
        self.total_j = (raw - self.first_raw) * self.scale_j
        return self.total_j - before
