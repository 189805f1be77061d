"""The container's file system: safe path resolution in the rootfs, API file systems, pivot_root.

Everything here runs inside the container's new mount namespace (nothing touches the host's
mount table). Paths inside the rootfs are resolved component by component with O_NOFOLLOW, so a
symlink planted in the rootfs can never make us mount over, or open, a host path; mounts then
target the resolved O_PATH descriptor through /proc/self/fd.
"""

from __future__ import annotations

import errno
import os
import stat

from machined import cgroups, devices, linux
from machined.log import fail

_MAXSYMLINKS = 40
NOSUID_NODEV_NOEXEC = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC

# Masked with an empty read-only file, as systemd-nspawn does: reading shows nothing, writing fails.
MASKED_PROC = ("kcore", "kallsyms", "keys", "timer_list", "sysrq-trigger")


class EscapeError(OSError):
    pass


def fdpath(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _walk(root_fd: int, path: str, follow: bool, flags: int) -> tuple[int, str]:
    parts = [p for p in path.split("/") if p and p != "."]
    stack: list[int] = [os.dup(root_fd)]
    names: list[str] = []
    links = 0
    try:
        while parts:
            part = parts.pop(0)
            if part == "..":
                if len(stack) == 1:
                    raise EscapeError(errno.EXDEV, f"{path!r} points out of the root file system")
                os.close(stack.pop())
                names.pop()
                continue
            last = not parts
            fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                if not follow:
                    raise OSError(errno.ELOOP, f"{path!r} is a symbolic link")
                links += 1
                if links > _MAXSYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    names.clear()
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            if last and flags != os.O_PATH:
                os.close(fd)
                fd = os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            stack.append(fd)
            names.append(part)
        if len(stack) == 1 and flags != os.O_PATH:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=root_fd), "/"
        return os.dup(stack[-1]), "/" + "/".join(names)
    finally:
        for fd in stack:
            os.close(fd)


def resolve(root_fd: int, path: str, *, follow: bool = True, flags: int = os.O_PATH) -> int:
    """Open path inside the tree of root_fd, as if root_fd were '/'.

    Absolute symlinks restart at the root (what the kernel will do after pivot_root); a '..' that
    would climb above the root is an escape and an error, as is a symlink when follow is False.
    Returns a new O_CLOEXEC descriptor opened with flags.
    """
    return _walk(root_fd, path, follow, flags)[0]


def read_file(root_fd: int, path: str, *, follow: bool = True, limit: int = 1 << 20) -> bytes:
    """At most limit bytes of a regular file inside the root (resolved as resolve() does).

    A guest's file may be anything: a FIFO (opened without waiting for a writer) or a device such as
    /dev/zero is refused with EINVAL, so reading a machine's files can neither hang nor never end.
    """
    fd = resolve(root_fd, path, follow=follow, flags=os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"/{path.lstrip('/')} is not a regular file")
        chunks = []
        while limit > 0:
            chunk = os.read(fd, min(limit, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            limit -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def resolve_path(root_fd: int, path: str) -> str:
    """Where path leads inside the root, symlinks followed under the rules of resolve()."""
    fd, resolved = _walk(root_fd, path, True, os.O_PATH)
    os.close(fd)
    return resolved


def resolve_dir(root_fd: int, path: str, *, create: bool = False, mode: int = 0o755) -> int:
    """An O_PATH descriptor of directory path in the rootfs; no symlink anywhere on the way."""
    parts = [p for p in path.split("/") if p]
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, f"/{path} in the root file system is a symbolic link")
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, f"/{path} in the root file system is not a directory")
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_init(rootfs: str, init: str) -> None:
    """Fail unless init resolves inside rootfs to an executable regular file."""
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = resolve(root_fd, init)
    except OSError as e:
        fail(f"find init {init} in {rootfs}", e.strerror if e.strerror else str(e))
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            fail(f"find init {init} in {rootfs}", "not an executable file")
    finally:
        os.close(fd)


API_DIRS = ("proc", "sys", "dev")


def preflight(rootfs: str) -> None:
    """Refuse a rootfs whose API mount points are symlinks or files before anything is set up.

    The container's own set-up checks again, race-free; this only makes the common error early
    and free of side effects.
    """
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for d in API_DIRS:
            try:
                os.close(resolve_dir(root_fd, d))
            except FileNotFoundError:
                continue  # created at start
            except OSError as e:
                fail(f"mount /{d}", e.strerror or str(e))
    finally:
        os.close(root_fd)


def _mount_at(fd: int, source: str | None, fstype: str | None, flags: int, data: str | None = None) -> None:
    linux.mount(source, fdpath(fd), fstype, flags, data)


def _remount_ro(path: str, extra: int = 0) -> None:
    linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | extra)


def _mount_api(root_fd: int, path: str, what: str, source: str, fstype: str, flags: int,
               data: str | None = None) -> int:
    """Mount an API file system on path in the rootfs; returns an O_PATH fd of the new mount's root.

    The fd that named the mount point still refers to the directory underneath, so the new mount
    is looked up again by name (without following symlinks) to reach its root.
    """
    try:
        fd = resolve_dir(root_fd, path, create=True)
    except OSError as e:
        fail(f"mount {what}", e.strerror or str(e))
    try:
        _mount_at(fd, source, fstype, flags, data)
    finally:
        os.close(fd)
    return resolve_dir(root_fd, path)


def setup_proc(root_fd: int, inaccessible: str, private_network: bool) -> None:
    pfd = _mount_api(root_fd, "proc", "/proc", "proc", "proc", NOSUID_NODEV_NOEXEC)
    try:
        p = fdpath(pfd)
        linux.mount(f"{p}/sys", f"{p}/sys", None, linux.MS_BIND | linux.MS_REC)
        _remount_ro(f"{p}/sys", NOSUID_NODEV_NOEXEC)
        if private_network:
            # The network namespace is the machine's own: let its init tune it.
            linux.mount(f"{p}/sys/net", f"{p}/sys/net", None, linux.MS_BIND)
            linux.mount(None, f"{p}/sys/net", None, linux.MS_BIND | linux.MS_REMOUNT | NOSUID_NODEV_NOEXEC)
        for name in MASKED_PROC:
            target = f"{p}/{name}"
            if os.path.exists(target):
                linux.mount(inaccessible, target, None, linux.MS_BIND)
                _remount_ro(target, NOSUID_NODEV_NOEXEC)
    finally:
        os.close(pfd)


def setup_sys(root_fd: int, cgroup_layout: str, nesting: bool = False) -> None:
    fd = _mount_api(root_fd, "sys", "/sys", "sysfs", "sysfs", linux.MS_RDONLY | NOSUID_NODEV_NOEXEC)
    try:
        cgroups.mount_in_container(fdpath(fd) + "/fs/cgroup", cgroup_layout, nesting)
    finally:
        os.close(fd)


def setup_dev(root_fd: int, console: str | None) -> None:
    dev = _mount_api(root_fd, "dev", "/dev", "tmpfs", "tmpfs", linux.MS_NOSUID | linux.MS_STRICTATIME,
                     "mode=755,size=4m,nr_inodes=64k")
    try:
        d = fdpath(dev)
        old = os.umask(0)
        try:
            for name, kind, major, minor, mode in devices.API_NODES:
                if "/" in name:
                    os.makedirs(f"{d}/{os.path.dirname(name)}", 0o755, exist_ok=True)
                ftype = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
                os.mknod(f"{d}/{name}", ftype | mode, os.makedev(major, minor))
            os.mkdir(f"{d}/pts", 0o755)
            linux.mount("devpts", f"{d}/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                        "newinstance,ptmxmode=0666,mode=620,gid=5")
            os.symlink("pts/ptmx", f"{d}/ptmx")
            os.mkdir(f"{d}/shm", 0o1777)
            linux.mount("tmpfs", f"{d}/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_STRICTATIME,
                        "mode=1777,size=10%")
            os.mkdir(f"{d}/mqueue", 0o755)
            linux.mount("mqueue", f"{d}/mqueue", "mqueue", NOSUID_NODEV_NOEXEC)
            for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                 ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(target, f"{d}/{link}")
            if console:
                os.close(os.open(f"{d}/console", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
                linux.mount(console, f"{d}/console", None, linux.MS_BIND)
        finally:
            os.umask(old)
    finally:
        os.close(dev)


def setup_tmpfs(root_fd: int, path: str, mode: str) -> None:
    """/run and /tmp as tmpfs when the rootfs has them as real directories (as nspawn does)."""
    try:
        fd = resolve_dir(root_fd, path)
    except OSError:
        return
    try:
        _mount_at(fd, "tmpfs", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_STRICTATIME,
                  f"mode={mode},size=20%,nr_inodes=400k")
    finally:
        os.close(fd)


def setup_machine_id(root_fd: int, machine_id: str, runtime_file: str) -> None:
    """Give an image with an empty or missing /etc/machine-id the machine's id, read-only, for this boot."""
    try:
        current = read_file(root_fd, "etc/machine-id", follow=False, limit=64).strip()
    except FileNotFoundError:
        return  # no file to cover; systemd then uses container_uuid
    except OSError as e:
        fail("set up /etc/machine-id", e)
    if len(current) == 32:
        return
    with open(runtime_file, "w") as f:
        f.write(machine_id + "\n")
    fd = resolve(root_fd, "etc/machine-id", follow=False)
    try:
        _mount_at(fd, runtime_file, None, linux.MS_BIND)
    finally:
        os.close(fd)
    fd = resolve(root_fd, "etc/machine-id", follow=False)  # now names the bind mount, not the file below
    try:
        _remount_ro(fdpath(fd))
    finally:
        os.close(fd)


def enter_root(rootfs: str) -> None:
    """Make rootfs the root: pivot_root, then detach the old root so no host mount stays reachable."""
    os.chdir(rootfs)
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")


class Overlay:
    """An overlayfs root: lower layers (top first) and, unless read-only, an upper and a work dir."""

    def __init__(self, lowers: list[str], upper: str = "", work: str = "") -> None:
        self.lowers, self.upper, self.work = lowers, upper, work


def mount_overlay(target: str, overlay: Overlay, read_only: bool) -> None:
    """Mount the overlay on target. Layers are passed as descriptors, so no character of a path
    (',' or ':') can change the options, and each is a directory opened without following a symlink."""
    fds: list[int] = []
    try:
        for d in (overlay.upper, overlay.work):
            if d:
                os.makedirs(d, mode=0o755, exist_ok=True)

        def dirfd(path: str) -> str:
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
            return fdpath(fds[-1])

        options = "lowerdir=" + ":".join(dirfd(d) for d in overlay.lowers)
        if overlay.upper:
            options += f",upperdir={dirfd(overlay.upper)},workdir={dirfd(overlay.work)}"
        linux.mount("overlay", target, "overlay", linux.MS_RDONLY if read_only else 0, options)
    except OSError as e:
        fail(f"mount the overlay root of {target}", e)
    finally:
        for fd in fds:
            os.close(fd)


def prepare_root(rootfs: str, read_only: bool, overlay: Overlay | None = None) -> int:
    """Stop propagation to the host, make rootfs a mount point; returns an O_PATH fd of it."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
    if overlay is not None:
        mount_overlay(rootfs, overlay, read_only)
    else:
        linux.mount(rootfs, rootfs, None, linux.MS_BIND | linux.MS_REC)
    if read_only:
        linux.mount(None, rootfs, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
    return os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
