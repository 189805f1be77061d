"""Terminals: shell and login on a pty of the machine's own, relayed by mctl from the user's terminal."""

from __future__ import annotations

import os
import pty
import select
import time

import pytest

from tests.conftest import MCTL, Env

pytestmark = pytest.mark.root


def _expect(fd: int, want: bytes, timeout: float = 10.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while want not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {want!r} in {buf!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    assert want in buf, buf
    return buf


def _spawn(env: Env, *args: str) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(MCTL[0], [*MCTL, *args], env.environ())
    return pid, fd


def test_login_on_a_machine_pty(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    pid, fd = _spawn(env, "login", name)
    try:
        _expect(fd, b"login:")
        os.write(fd, b"root\n")
        _expect(fd, b"#")
        os.write(fd, b"tty; echo ok-$((20+22)); exit\n")
        out = _expect(fd, b"ok-42")
        assert b"/dev/pts/" in out  # a pty of the machine's devpts, not the host's terminal
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    env.ok("poweroff", name)


def test_shell_on_a_tty_gets_its_own_pty(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    host_tty = os.ttyname(0) if os.isatty(0) else None
    pid, fd = _spawn(env, "shell", name)
    try:
        _expect(fd, b"#")
        os.write(fd, b"tty; echo $((6*7))-done; exit 3\n")
        out = _expect(fd, b"42-done")
        assert b"/dev/pts/0" in out, out  # the machine's own devpts instance starts at 0
        if host_tty:
            assert host_tty.encode() not in out
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 3
    env.ok("poweroff", name)
