"""shell and login: run a program inside a running machine, in all of its namespaces and its cgroup.

The joining child imports nothing after setns (see spawn.seal_imports): the guest's file system is
then '/', and only the guest's own binaries are executed. On a terminal the program gets a pty of
the machine's own devpts, relayed by the host side, so the host terminal is never handed in.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

from machined import cgroups, linux, mounts, security, signals, spawn, state, terminal
from machined.log import MachinedError, die

NAMESPACES = (linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWNET
              | linux.CLONE_NEWPID | linux.CLONE_NEWCGROUP)


class Account:
    def __init__(self, name: str, uid: int, gid: int, home: str, shell: str) -> None:
        self.name, self.uid, self.gid, self.home, self.shell = name, uid, gid, home, shell


def _guest_file(path: str) -> list[str]:
    """Lines of a file of the machine we joined (its root is ours); never a FIFO's wait or endless read."""
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return mounts.read_file(root, path).decode(errors="replace").splitlines()
    except OSError:
        return []
    finally:
        os.close(root)


def _lookup_account(user: str) -> Account:
    """Parse the guest's /etc/passwd ourselves: NSS would load the guest's libraries into this process."""
    for line in _guest_file("etc/passwd"):
        fields = line.split(":")
        if len(fields) >= 7 and (fields[0] == user or (user.isdigit() and fields[2] == user)):
            return Account(fields[0], int(fields[2]), int(fields[3]), fields[5] or "/", fields[6] or "/bin/sh")
    if user in ("root", "0"):
        return Account("root", 0, 0, "/root", "/bin/sh")
    raise MachinedError(f"Failed to find user {user} in the machine's /etc/passwd")


def _groups(account: Account) -> list[int]:
    result = {account.gid}
    for line in _guest_file("etc/group"):
        fields = line.split(":")
        if len(fields) >= 4 and account.name in fields[3].split(",") and fields[2].isdigit():
            result.add(int(fields[2]))
    return sorted(result)


def _join_cgroup(data: dict[str, object], leader_pid: int) -> None:
    cg_data = data.get("cgroup")
    if not isinstance(cg_data, dict):
        return
    cg = cgroups.MachineCgroup.from_state(cg_data)
    try:
        cg.join_payload(0)
    except OSError:
        # v2: the guest's init may have made the payload an inner node; join its init's cgroup.
        cg.join_like(leader_pid)


def enter(name: str, argv: list[str] | None, user: str = "root", login: bool = False,
          extra_env: dict[str, str] | None = None) -> int:
    data = state.require_running(name)
    pidfd = state.leader_pidfd(data)
    leader = data.get("leader")
    assert isinstance(leader, dict)
    leader_pid = int(leader["pid"])
    use_pty = os.isatty(0)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        code = 1
        try:
            code = _child(data, pidfd, leader_pid, argv, user, login, use_pty, child_sock, extra_env or {})
        except BaseException as e:  # noqa: BLE001 - report, then exit
            text = str(e) if isinstance(e, MachinedError) else f"Failed to enter {name}: {e}"
            try:
                child_sock.send(b"E" + text.encode())
            except OSError:
                pass
        os._exit(code)
    os.close(pidfd)
    child_sock.close()
    master = -1
    try:
        msg, fds, _, _ = socket.recv_fds(parent_sock, 4096, 1)
        if msg[:1] == b"E":
            die(msg[1:].decode(errors="replace"))
        if msg[:1] == b"P" and fds:
            master = fds[0]
        if master >= 0:
            terminal.relay(master, master, escape=False, resize_fd=master, stop_fd=parent_sock.fileno())
    finally:
        _, status = os.waitpid(pid, 0)
        if master >= 0:
            os.close(master)
        parent_sock.close()
    return _exit_code(status)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _child(data: dict[str, object], pidfd: int, leader_pid: int, argv: list[str] | None, user: str,
           login: bool, use_pty: bool, sock: socket.socket, extra_env: dict[str, str]) -> int:
    """In a forked child: join the machine, fork into its pid namespace, exec there."""
    _join_cgroup(data, leader_pid)
    spawn.seal_imports()
    linux.setns(pidfd, NAMESPACES)   # also makes the machine's root our root
    os.close(pidfd)
    os.chdir("/")
    account = _lookup_account(user)
    groups = _groups(account)
    master = slave = -1
    if use_pty:
        master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        _unlockpt(master)
        slave = os.open(_ptsname(master), os.O_RDWR | os.O_NOCTTY)
        if account.uid != 0:
            os.fchown(slave, account.uid, 5)
    pid = os.fork()
    if pid == 0:
        try:
            security.drop_capabilities(("NET_ADMIN",))
            os.setsid()
            if slave >= 0:
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                os.close(slave)
                os.close(master)
            if account.uid != 0 or account.gid != 0:
                os.setgroups(groups)
                os.setgid(account.gid)
                os.setuid(account.uid)
            try:
                os.chdir(account.home)
            except OSError:
                os.chdir("/")
            env = {
                "PATH": spawn.DEFAULT_PATH, "HOME": account.home, "USER": account.name, "LOGNAME": account.name,
                "SHELL": account.shell, "TERM": os.environ.get("TERM", "vt220") if use_pty else "dumb",
                "container": "machined",
            }
            env.update(extra_env)
            if login:
                cmd = ["/bin/login"] if os.path.exists("/bin/login") else ["/usr/bin/login"]
                os.execve(cmd[0], cmd, env)
            if argv:
                os.execvpe(argv[0], argv, env)
            os.execve(account.shell, ["-" + os.path.basename(account.shell)], env)
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"mctl: Failed to execute {argv[0] if argv else account.shell}: {e}\n".encode())
        os._exit(127)
    if slave >= 0:
        os.close(slave)
        socket.send_fds(sock, [b"P"], [master])
        os.close(master)
    else:
        sock.send(b"R")
    signals.signal(signals.SIGINT, signals.SIG_IGN)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


TIOCSPTLCK = 0x40045431  # not exported by Python's termios
TIOCGPTN = 0x80045430


def _unlockpt(fd: int) -> None:
    fcntl.ioctl(fd, TIOCSPTLCK, b"\0\0\0\0")


def _ptsname(fd: int) -> str:
    buf = fcntl.ioctl(fd, TIOCGPTN, b"\0\0\0\0")
    return f"/dev/pts/{struct.unpack('I', buf)[0]}"
