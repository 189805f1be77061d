"""Thin typed wrappers for the syscalls Python's os module lacks.

Kept small and free of heavy imports: every verb that starts a machine imports it.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# sys/mount.h
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# sys/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# x86_64 and aarch64 share the generic numbers for the newer calls.
SYS_pivot_root = {"x86_64": 155, "aarch64": 41}[os.uname().machine]
SYS_capget = {"x86_64": 125, "aarch64": 90}[os.uname().machine]
SYS_capset = {"x86_64": 126, "aarch64": 91}[os.uname().machine]
SYS_setns = {"x86_64": 308, "aarch64": 268}[os.uname().machine]
SYS_pidfd_send_signal = 424
SYS_pidfd_open = 434
SYS_openat2 = 437
SYS_mount_setattr = 442

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def _check(result: int, what: str = "") -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what or None)
    return result


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def write_file(path: str, value: str) -> None:
    """One write(2) of value to path: what cgroup and sysfs control files want."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def setns(fd: int, nstype: int = 0) -> None:
    """Join namespaces; fd may be a namespace file or a pidfd (then several at once)."""
    _check(_libc.syscall(SYS_setns, ctypes.c_int(fd), ctypes.c_int(nstype)))


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), target)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_pivot_root, _b(new_root), _b(put_old)), new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5))


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(_libc.syscall(SYS_pidfd_send_signal, ctypes.c_int(pidfd), ctypes.c_int(sig), None, ctypes.c_uint(0)))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(_libc.syscall(SYS_openat2, ctypes.c_int(dirfd), _b(path), ctypes.byref(how),
                                ctypes.c_size_t(ctypes.sizeof(how))), path)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


MOUNT_ATTR_RDONLY = 0x1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000


def mount_setattr(fd: int, attr_set: int, recursive: bool = False) -> None:
    """Set mount attributes on the mount fd refers to (and, recursive, on every mount below it)."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(SYS_mount_setattr, ctypes.c_int(fd), b"", ctypes.c_uint(flags), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def clear_inheritable_caps() -> None:
    """Empty the inheritable and ambient sets so exec cannot regain dropped capabilities."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(SYS_capget, ctypes.byref(header), ctypes.byref(data)))
    for d in data:
        d.inheritable = 0
    _check(_libc.syscall(SYS_capset, ctypes.byref(header), ctypes.byref(data)))
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_bounding_caps(keep: frozenset[int]) -> None:
    for cap in range(last_cap() + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)
    clear_inheritable_caps()


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_process_name(name: str) -> None:
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(_libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0))


def process_stat(pid: int) -> tuple[str, int]:
    """(state letter, start time in clock ticks since boot) from /proc/PID/stat.

    The start time identifies a process beyond its pid; state 'Z' or 'X' means it has exited.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[19])


def process_start_time(pid: int) -> int:
    return process_stat(pid)[1]


def new_net_namespace() -> int:
    """A new network namespace, as an fd; the calling thread stays in its own."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare(CLONE_NEWNET)
        try:
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            setns(own, CLONE_NEWNET)
    finally:
        os.close(own)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """Bring lo up in the current network namespace (an ioctl: no netlink library needed here)."""
    import fcntl
    import struct

    fd = _check(_libc.socket(2, 2 | 0o2000000, 0))  # AF_INET, SOCK_DGRAM | SOCK_CLOEXEC
    try:
        req = bytearray(struct.pack("16sH22x", b"lo", 0))
        fcntl.ioctl(fd, SIOCGIFFLAGS, req)
        flags = struct.unpack_from("H", req, 16)[0]
        struct.pack_into("H", req, 16, flags | IFF_UP)
        fcntl.ioctl(fd, SIOCSIFFLAGS, req)
    finally:
        os.close(fd)
