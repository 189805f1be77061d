"""User-facing errors and logging: one line per failure, tracebacks only with --debug."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing costs milliseconds of start-up; mypy still sees this branch
if TYPE_CHECKING:
    from typing import NoReturn


class MachinedError(Exception):
    """An error meant for the user: printed as one line, no traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


def die(message: str, hint: str | None = None) -> NoReturn:
    raise MachinedError(message, hint)


def os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def fail(verb_object: str, e: OSError | str) -> NoReturn:
    """Report a failure nspawn-style: 'Failed to <verb> <object>: <reason>'."""
    reason = os_reason(e) if isinstance(e, OSError) else e
    raise MachinedError(f"Failed to {verb_object}: {reason}")


DEBUG = False


def debug(message: str) -> None:
    if DEBUG:
        print(f"mctl: debug: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"mctl: warning: {message}", file=sys.stderr)
