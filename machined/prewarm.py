"""Keep the kernel ready for cgroup migrations while a machine starts.

The first migration after a quiet spell (a write to cgroup.procs) waits for an RCU grace period,
~8 ms here and up to 20: cgroup_threadgroup_rwsem switches to its writer mode, and the kernel
returns to the quiet mode a grace period after the last migration. Meanwhile the writer holds
cgroup_mutex, so every other cgroup operation (the machine's mkdirs too) waits as well.

start() begins that wait in a thread as mctl starts, so that it overlaps with the imports, and
repeats a no-op move of this process into its own cgroup until the machine's real migration is
done (done()) or the time is up. Best effort: any error ends the thread. Imports nothing but
built-in modules, so that it can run before everything else.
"""

from __future__ import annotations

import _thread
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _thread import LockType

_UNTIL = {"time": 0.0}
_running: list[tuple[int, LockType]] = []  # (our pid, a lock the thread holds while it runs)


def start(seconds: float = 2.0) -> None:
    """Once per process; mctl's script calls it before anything else for run and start."""
    if any(pid == os.getpid() for pid, _ in _running):
        return
    _UNTIL["time"] = time.monotonic() + seconds
    running = _thread.allocate_lock()
    running.acquire()
    _running.append((os.getpid(), running))
    started = _thread.allocate_lock()
    started.acquire()

    def move_self() -> None:
        # As little Python as possible: this thread competes with the imports for the GIL.
        try:
            try:
                with open("/proc/self/cgroup") as f:
                    v2 = next(line[3:].strip() for line in f if line.startswith("0::"))
                target = next(f"{top}{v2}/cgroup.procs" for top in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
                              if os.path.exists(f"{top}{v2}/cgroup.procs"))
                pid = str(os.getpid()).encode()
            finally:
                started.release()  # the first move is next (or, after an error, none)
            while time.monotonic() < _UNTIL["time"]:
                fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
                time.sleep(0.005)
        except (OSError, StopIteration):
            pass
        finally:
            running.release()

    _thread.start_new_thread(move_self, ())
    # Our GIL, until the thread is at its first move: it would otherwise wait for the switch
    # interval (5 ms), and the grace period would begin that much later.
    started.acquire()


def done(wait: bool = False) -> None:
    """No more keeping warm. wait: until the thread has stopped, before this process moves to
    another cgroup (a supervisor joining its machine's scope), which the thread would undo."""
    _UNTIL["time"] = 0.0
    for pid, running in _running if wait else ():
        if pid == os.getpid():  # (a forked supervisor has no such thread)
            running.acquire()
            running.release()
