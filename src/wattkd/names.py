"""Names that become file and job names (experiments, methods, suites, tasks): one rule.

A leaf module (no wattkd imports) so the config schema and the eval suites share the rule
without importing each other.
"""

from __future__ import annotations

import re

__all__ = ["SAFE_NAME", "safe_name"]

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def safe_name(value: str, what: str) -> str:
    """`value` unchanged, or ValueError naming `what` and the allowed characters."""
    if not SAFE_NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must match {SAFE_NAME.pattern} "
            "(letters, digits, '.', '_', '-'; it is used in file names and job names)"
        )
    return value
