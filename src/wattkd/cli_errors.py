"""The CLI's one error path: every exception that leaves a command is reported here.

A wattkd domain error (`WattkdError`) or a common OS error prints one `error:` line (the file or
key and what to do) and exits with its documented code (wattkd.errors); anything else is a bug
and keeps its traceback. In every case a training run of this process still marked "running"
is marked "failed" with the reason. `--debug` or WATTKD_DEBUG=1 adds the traceback to every
error. Catching here, inside the command group, also keeps click from reading an EOFError
raised by a library (torch on an empty file) as the user's Ctrl-D ("Aborted!").
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from wattkd.errors import OS_EXIT_CODE, WattkdError, describe_os_error, mark_failed

__all__ = ["ErrorReportingGroup", "report_error", "set_debug"]

_DEBUG = {"on": False}
INTERRUPTED_EXIT_CODE = 130


def set_debug(on: bool) -> None:
    _DEBUG["on"] = on


def debug_enabled() -> bool:
    return _DEBUG["on"] or os.environ.get("WATTKD_DEBUG", "") not in ("", "0")


def report_error(exc: BaseException) -> int:
    """Print the error the way the user needs it, mark running runs failed; the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        message = ("interrupted (Ctrl-C); rerun the same command to continue from the last "
                   "checkpoint")
        code = INTERRUPTED_EXIT_CODE
    elif isinstance(exc, WattkdError):
        message, code = str(exc), exc.exit_code
    elif isinstance(exc, OSError):
        message, code = describe_os_error(exc), OS_EXIT_CODE
    else:
        message = (f"unexpected {type(exc).__name__}: {exc} (this is a bug in wattkd or a "
                   "library: the traceback is above; rerun with --debug for the same)")
        code = 1
    mark_failed(message, code, type(exc).__name__)
    if code == 1 or debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return code


class ErrorReportingGroup(TyperGroup):
    """The top-level command group: sub-commands run inside its `invoke`."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # typer's own (usage errors, exits)
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one error path
            raise typer.Exit(report_error(exc)) from None
