"""Runtime state of running machines: per-machine lock, state file, liveness without stale pids.

The supervisor holds the machine's lock (an flock) for as long as the machine runs, so the kernel
releases it the moment the supervisor dies, however it dies. A state file whose lock is free is
therefore stale, and whoever takes the lock next cleans up after it. Pids found in a state file
are only trusted through a pidfd whose process start time matches the recorded one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from machined import jsonc, linux, paths
from machined.log import die


class Lock:
    """An exclusive per-name lock file, removed by its holder on release."""

    def __init__(self, name: str, fd: int, path: str) -> None:
        self.name, self.fd, self.path = name, fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1

    def forget(self) -> None:
        """Close our descriptor only: a forked supervisor holds the same lock on."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def try_lock(name: str) -> Lock | None:
    """Take the machine's lock, or None when another process holds it."""
    path = paths.lock_path(name)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The previous holder may have unlinked the file between our open and flock.
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            os.close(fd)
            continue
        fst = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
            return Lock(name, fd, path)
        os.close(fd)


def is_locked(name: str) -> bool:
    path = paths.lock_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def state_path(name: str) -> str:
    return os.path.join(paths.machine_runtime_dir(name), "state.json")


def write(name: str, data: dict[str, object]) -> None:
    jsonc.save(state_path(name), data)


def read(name: str) -> dict[str, object] | None:
    try:
        data = jsonc.load(state_path(name))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"name": name, "corrupt": True}
    return data if isinstance(data, dict) else {"name": name, "corrupt": True}


def proc_ref(pid: int) -> dict[str, int]:
    return {"pid": pid, "start": linux.process_start_time(pid)}


def open_process(ref: object) -> int | None:
    """A pidfd for the recorded process, or None if it is gone or the pid now names another process."""
    if not isinstance(ref, dict):
        return None
    pid, start = ref.get("pid"), ref.get("start")
    if not isinstance(pid, int) or not isinstance(start, int) or pid <= 0:
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        # With the pidfd open the pid cannot be recycled: this check is race-free.
        pstate, pstart = linux.process_stat(pid)
        if pstart == start and pstate not in ("Z", "X"):
            return fd
    except (OSError, ValueError, IndexError):
        pass
    os.close(fd)
    return None


def is_alive(ref: object) -> bool:
    fd = open_process(ref)
    if fd is None:
        return False
    os.close(fd)
    return True


# Teardown steps for what a machine leaves on the host, by the state key that records it. Each
# step must be idempotent and best-effort: it runs again after a crash of the supervisor. Modules
# are imported only when their key is present, keeping heavy imports off paths that need none.
TEARDOWN: list[tuple[str, str, str]] = [
    ("leader", "machined.supervisor", "kill_leftovers"),
    ("network", "machined.network", "teardown"),
    ("cgroup", "machined.cgroups", "teardown"),
    ("systemd", "machined.systemd", "teardown"),
    ("ephemeral", "machined.images", "remove_ephemeral"),
]


def teardown(data: dict[str, object]) -> None:
    for key, module, func in TEARDOWN:
        if key not in data:
            continue
        try:
            getattr(__import__(module, fromlist=[func]), func)(data)
        except Exception as e:  # noqa: BLE001 - one failing step must not stop the rest
            from machined.log import warn

            warn(f"cleanup of {data.get('name')}: {e}")


def running(name: str) -> dict[str, object] | None:
    """The state of machine name if it runs; cleans up what a dead supervisor left behind."""
    data = read(name)
    if data is None:
        return None
    if is_alive(data.get("supervisor")):
        return data
    lock = try_lock(name)
    if lock is None:
        # Someone else holds it: a supervisor between fork and writing its state, or a cleaner.
        return data if not data.get("corrupt") else None
    try:
        if read(name) is not None:
            cleanup_stale(name)
    finally:
        lock.release()
    return None


def cleanup_stale(name: str) -> None:
    """Remove what a machine whose supervisor died left: processes, cgroup, state. Caller holds the lock."""
    data = read(name)
    if data:
        teardown(data)
    remove_runtime_dir(name)


def remove_runtime_dir(name: str) -> None:
    """The per-machine runtime directory holds only files and sockets (no shutil on this path)."""
    remove_dir(paths.machine_runtime_dir(name))


def remove_dir(d: str) -> None:
    """d and the files in it, if they are there."""
    try:
        entries = os.listdir(d)
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            os.unlink(os.path.join(d, entry))
        except IsADirectoryError:
            import shutil

            shutil.rmtree(os.path.join(d, entry), ignore_errors=True)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(d)
    except FileNotFoundError:
        pass


def all_names() -> list[str]:
    d = os.path.join(paths.runtime_dir(), "machines")
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    return [n for n in names if paths.name_error(n) is None]


def require_running(name: str) -> dict[str, object]:
    paths.check_name(name)
    data = running(name)
    if data is None:
        die(f"Machine {name} is not running")
    return data


def leader_pidfd(data: dict[str, object]) -> int:
    fd = open_process(data.get("leader"))
    if fd is None:
        die(f"Machine {data.get('name')} has no running init", hint="it may be rebooting; try again")
    return fd


def signal_leader(data: dict[str, object], sig: int, settle: float = 0.0) -> None:
    """Signal the machine's init; with settle, first give a just-started init that long to start
    taking the signal (inits.listens), so that the request is not dropped."""
    fd = leader_pidfd(data)
    try:
        if settle:
            from machined import inits

            pid = data["leader"]["pid"]  # type: ignore[index]  # open_process checked it
            deadline = time.monotonic() + settle
            while not inits.listens(pid, sig) and time.monotonic() < deadline:
                time.sleep(0.01)
        linux.pidfd_send_signal(fd, sig)
    except OSError as e:
        if e.errno != errno.ESRCH:
            die(f"Failed to signal {data.get('name')}: {e.strerror}")
    finally:
        os.close(fd)
