"""Bind mounts of host paths into a machine (`[machine] bind = ["/host:/guest:ro"]`, like nspawn --bind).

The host side is the administrator's (it must exist); the guest side is resolved inside the rootfs
without following any symlink, and created (directory or empty file, like the source) when
missing. Mounts are recursive; ':ro' makes the whole subtree read-only (mount_setattr).
"""

from __future__ import annotations

import errno
import os
import stat

from machined import linux, mounts
from machined.log import fail


class Bind:
    __slots__ = ("read_only", "source", "target")

    def __init__(self, source: str, target: str, read_only: bool) -> None:
        self.source, self.target, self.read_only = source, target, read_only

    def __str__(self) -> str:
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"


def parse(text: str) -> Bind:
    """'SRC', 'SRC:DST' or 'SRC:DST:ro|rw'; ValueError with the reason when it is not one of those."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"bind {text!r} contains control characters")
    parts = text.split(":")
    if len(parts) > 3:
        raise ValueError(f"bind {text!r} is not SOURCE[:TARGET[:ro|rw]]")
    source = parts[0]
    target = parts[1] if len(parts) > 1 else source
    opts = parts[2] if len(parts) > 2 else "rw"
    if opts not in ("ro", "rw"):
        raise ValueError(f"bind {text!r}: option {opts!r} is neither ro nor rw")
    for what, path in (("source", source), ("target", target)):
        if not path.startswith("/"):
            raise ValueError(f"bind {text!r}: {what} {path!r} is not an absolute path")
        if ".." in path.split("/"):
            raise ValueError(f"bind {text!r}: {what} {path!r} contains '..'")
    target = os.path.normpath(target)
    if target == "/" or target.split("/")[1] in ("proc", "sys"):
        raise ValueError(f"bind {text!r}: target {target!r} would cover the machine's root or API file systems")
    return Bind(os.path.normpath(source), target, opts == "ro")


def check(name: str, binds: list[Bind]) -> None:
    """Before anything is set up: every source exists."""
    for b in binds:
        if not os.path.exists(b.source):
            fail(f"start {name}", f"bind source {b.source} does not exist")


def mount_all(root_fd: int, binds: list[Bind]) -> None:
    """In the machine's mount namespace, before pivot_root (a Spec.in_child hook)."""
    for b in binds:
        try:
            _mount_one(root_fd, b)
        except OSError as e:
            fail(f"bind {b.source} to {b.target}", e.strerror or str(e))


def _mount_one(root_fd: int, b: Bind) -> None:
    is_dir = stat.S_ISDIR(os.stat(b.source).st_mode)
    parent, base = os.path.split(b.target)
    if is_dir:
        fd = mounts.resolve_dir(root_fd, b.target.lstrip("/"), create=True)
    else:
        pfd = mounts.resolve_dir(root_fd, parent.lstrip("/"), create=True)
        try:
            try:
                os.close(os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                                 dir_fd=pfd))
            except FileExistsError:
                pass
            fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        finally:
            os.close(pfd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, f"{b.target} in the root file system is a symbolic link")
        linux.mount(b.source, mounts.fdpath(fd), None, linux.MS_BIND | linux.MS_REC)
    finally:
        os.close(fd)
    if b.read_only:
        # The new mount is looked up by name again: the old fd names the directory beneath it.
        fd = mounts.resolve(root_fd, b.target, follow=False)
        try:
            linux.mount_setattr(fd, linux.MOUNT_ATTR_RDONLY, recursive=True)
        finally:
            os.close(fd)
