"""What a guest's init understands: how to ask it to power off, reboot or halt."""

from __future__ import annotations

import os

from machined import mounts, signals

# name: (poweroff, reboot, halt). systemd: SIGRTMIN+4 / SIGINT / SIGRTMIN+3; busybox: SIGUSR2 /
# SIGTERM / SIGUSR1; sysvinit as LXC drives it: SIGPWR / SIGINT; a plain command gets SIGTERM.
SIGNALS: dict[str, tuple[int, int, int]] = {
    "systemd": (signals.SIGRTMIN + 4, signals.SIGINT, signals.SIGRTMIN + 3),
    "busybox": (signals.SIGUSR2, signals.SIGTERM, signals.SIGUSR1),
    "sysvinit": (signals.SIGPWR, signals.SIGINT, signals.SIGPWR),
    "command": (signals.SIGTERM, signals.SIGTERM, signals.SIGTERM),
}


# What an init prints once its shutdown is complete and only the final reboot(2) remains. BusyBox
# init then sleeps a second "for serial consoles"; our console is a pty drained continuously, so a
# supervisor stopping the machine need not wait for that. (A reboot counts while stopping: busybox
# init reboots on the SIGTERM that stopping a systemd scope sends to every process in it.)
FINAL_WORDS: dict[str, tuple[bytes, ...]] = {
    "busybox": (b"Requesting system poweroff", b"Requesting system halt", b"Requesting system reboot"),
}


# Inits with one thread and no memory shared with another process: asleep on a futex, such an
# init waits for good, as nothing else could ever wake it. BusyBox init can end up there: the child
# it vfork()s to run a command logs through syslog() first, whose lock lives in the memory the two
# share until the exec. Killed in there, the child leaves the lock taken and init's next message
# hangs. Stopping a systemd scope does that now and then: it signals every process it finds, again
# and again until none is new, while init, told to shut down, starts its shutdown script.
SOLITARY = frozenset({"busybox"})


def detect(rootfs: str, init: str) -> str:
    """Classify init by the file its symlinks lead to, inside rootfs."""
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        path = mounts.resolve_path(root_fd, init)
    except OSError:
        return "sysvinit"
    finally:
        os.close(root_fd)
    base = os.path.basename(path)
    if base == "systemd":
        return "systemd"
    if base == "busybox":
        return "busybox"
    return "sysvinit"


def poweroff_signal(kind: str) -> int:
    return SIGNALS.get(kind, SIGNALS["command"])[0]


def reboot_signal(kind: str) -> int:
    return SIGNALS.get(kind, SIGNALS["command"])[1]


def halt_signal(kind: str) -> int:
    return SIGNALS.get(kind, SIGNALS["command"])[2]


def listens(pid: int, sig: int) -> bool:
    """Whether pid, a namespace's init, would take sig now: the kernel drops a signal such an init
    neither catches nor blocks, so a poweroff or reboot asked before init has set itself up would
    be lost. systemd blocks its signals and reads them from a signalfd; busybox init blocks them
    and waits in sigtimedwait(), which unblocks them in the mask that /proc shows while it waits."""
    try:
        fields = _status(pid)
        if (int(fields[b"SigBlk"], 16) | int(fields[b"SigCgt"], 16)) >> (sig - 1) & 1:
            return True
        return b"sigtimedwait" in _wchan(pid)
    except (OSError, KeyError, ValueError):
        return True  # gone, or unreadable: sending is what reports it


def deadlocked(pid: int) -> bool:
    """Whether pid, one of the SOLITARY inits, is asleep on a futex, and so for good."""
    try:
        return _status(pid)[b"Threads"].strip() == b"1" and _wchan(pid).startswith(b"futex")
    except (OSError, KeyError):
        return False


def _status(pid: int) -> dict[bytes, bytes]:
    """/proc/PID/status by field (the values unstripped)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        return dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)


def _wchan(pid: int) -> bytes:
    """Where pid sleeps in the kernel (b"0" where it runs)."""
    with open(f"/proc/{pid}/wchan", "rb") as f:
        return f.read()
