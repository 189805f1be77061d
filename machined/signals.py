"""The signal module's functions and constants without its enums.

`import signal` builds enums of every signal and handler, which imports enum, functools and
collections: about 5 ms of each mctl call that sends or catches a signal. `_signal`, its C half,
has the same names with plain ints.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from signal import *  # noqa: F403 - the stubs of what _signal has at run time
else:
    from _signal import *  # noqa: F403


def name(signum: int) -> str:
    """SIGTERM for 15; the number itself for one without a name."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def by_name() -> dict[str, int]:
    """Every signal by its name (SIGTERM, SIGRTMIN, ...)."""
    import signal

    return {s.name: int(s) for s in signal.Signals}
