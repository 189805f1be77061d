"""Relaying a terminal: raw mode, window size, and a copy loop between two sides.

Used by `console` (to the supervisor's console socket), `shell`/`login` and `run` on a tty (to a
pty allocated for the machine), so a host terminal is never handed to a machine's processes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import termios
import tty

from machined import signals

ESCAPE = b"\x1d"  # Ctrl-], three times within a second detaches, as with systemd-nspawn


def winsize(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None


def set_winsize(fd: int, size: bytes | None) -> None:
    if size:
        try:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, size)
        except OSError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        data = data[n:]


def relay(peer_in: int, peer_out: int, *, escape: bool = True, resize_fd: int | None = None,
          stop_fd: int | None = None) -> None:
    """Copy stdin -> peer_in and peer_out -> stdout until peer_out closes (or stop_fd becomes readable).

    With stdin a terminal it is put in raw mode for the duration and window size changes are
    forwarded to resize_fd.
    """
    stdin_tty = os.isatty(0)
    saved = termios.tcgetattr(0) if stdin_tty else None
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signals.set_wakeup_fd(wake_w)
    old_winch = signals.signal(signals.SIGWINCH, lambda *_: None)
    if resize_fd is not None and stdin_tty:
        set_winsize(resize_fd, winsize(0))
    presses: list[float] = []
    stdin_open = True
    try:
        if saved is not None:
            tty.setraw(0)
        while True:
            fds = [peer_out, wake_r] + ([0] if stdin_open else []) + ([stop_fd] if stop_fd is not None else [])
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if wake_r in ready:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
                if resize_fd is not None and stdin_tty:
                    set_winsize(resize_fd, winsize(0))
            if stop_fd is not None and stop_fd in ready:
                _drain(peer_out)
                return
            if peer_out in ready:
                try:
                    data = os.read(peer_out, 65536)
                except OSError as e:
                    if e.errno == errno.EIO:  # pty master: the last slave closed
                        return
                    raise
                if not data:
                    return
                _write_all(1, data)
            if stdin_open and 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    stdin_open = False
                    continue
                if escape and stdin_tty and ESCAPE in data:
                    import time

                    now = time.monotonic()
                    presses = [t for t in presses if now - t < 1.0] + [now] * data.count(ESCAPE)
                    if len(presses) >= 3:
                        return
                _write_all(peer_in, data)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signals.signal(signals.SIGWINCH, old_winch)
        signals.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)


def _drain(fd: int) -> None:
    """Copy what is still buffered in fd to stdout without waiting for more."""
    while select.select([fd], [], [], 0)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        _write_all(1, data)


def pack_winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)
