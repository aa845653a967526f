"""The divergence guard: a feature/relation-only run whose LM loss climbs is stopped."""

from __future__ import annotations

import math

from wattkd.errors import RunFailure


class DivergenceError(RunFailure, RuntimeError):
    """A feature/relation-only run whose LM loss climbed past the guard's threshold."""


class DivergenceGuard:
    """Compares the LM loss of the latest window with the first one."""

    def __init__(self, window: int, max_ratio: float) -> None:
        self.window, self.max_ratio = window, max_ratio
        self.values: list[float] = []

    def update(self, lm_loss: float, step: int) -> None:
        self.values.append(lm_loss)
        if not math.isfinite(lm_loss):
            raise DivergenceError(f"LM loss became {lm_loss} at step {step}")
        if len(self.values) < 2 * self.window:
            return
        first = sum(self.values[: self.window]) / self.window
        recent = sum(self.values[-self.window:]) / self.window
        if recent > self.max_ratio * first:
            raise DivergenceError(
                f"LM loss diverged at step {step}: mean of the last {self.window} checks is "
                f"{recent:.3f}, {recent / first:.1f}x the first window's {first:.3f} (guard "
                f"max_ratio {self.max_ratio}). Add a `ce` term to the method, lower the lr, or "
                "set guard.enabled: false to train on anyway.")

