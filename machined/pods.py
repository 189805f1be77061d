"""Pods: machines that share one network, IPC and UTS namespace while each keeps its own root, PID
namespace and cgroup (the seed's third kind of container).

A pod's namespaces belong to no machine: they are made by a short-lived helper and kept alive by
bind mounts of their nsfs files under the runtime directory (as `ip netns add` does), so the pod
outlives whichever member started first. Members join them with setns instead of unsharing. The
pod ends with its last member. All changes happen under the network lock (ipam.Store).
"""

from __future__ import annotations

import os

from machined import jsonc, linux, paths, signals, state
from machined.log import MachinedError

NAMESPACES = (("net", linux.CLONE_NEWNET), ("ipc", linux.CLONE_NEWIPC), ("uts", linux.CLONE_NEWUTS))


def pod_dir(pod: str) -> str:
    return os.path.join(paths.runtime_dir(), "pods", paths.check_name(pod, "pod"))


def info_path(pod: str) -> str:
    return os.path.join(pod_dir(pod), "pod.json")


def exists(pod: str) -> bool:
    return os.path.exists(os.path.join(pod_dir(pod), "net"))


def read_info(pod: str) -> dict[str, object]:
    try:
        data = jsonc.load(info_path(pod))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_info(pod: str, info: dict[str, object]) -> None:
    jsonc.save(info_path(pod), info, sort_keys=True)


def create(pod: str) -> None:
    """New network, IPC and UTS namespaces (hostname: the pod's name, loopback up), pinned by bind mounts."""
    d = pod_dir(pod)
    os.makedirs(d, mode=0o755, exist_ok=True)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            linux.set_pdeathsig(signals.SIGKILL)
            linux.unshare(linux.CLONE_NEWNET | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
            linux.sethostname(pod)
            linux.loopback_up()
            os.write(ready_w, b"R")
            os.read(done_r, 1)  # until the parent has pinned our namespaces
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"R":
            raise MachinedError(f"Failed to create the namespaces of pod {pod}")
        for ns, _ in NAMESPACES:
            target = os.path.join(d, ns)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))
            linux.mount(f"/proc/{pid}/ns/{ns}", target, None, linux.MS_BIND)
    except BaseException:
        destroy(pod)
        raise
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def open_namespaces(pod: str) -> list[tuple[int, int]]:
    """(fd, CLONE_NEW*) for each of the pod's namespaces, for spawn to join."""
    fds: list[tuple[int, int]] = []
    try:
        for ns, flag in NAMESPACES:
            fds.append((os.open(os.path.join(pod_dir(pod), ns), os.O_RDONLY | os.O_CLOEXEC), flag))
    except BaseException:
        for fd, _ in fds:
            os.close(fd)
        raise
    return fds


def members(pod: str, exclude: str = "") -> list[str]:
    """Running machines in the pod (by their state; a dead supervisor's machine is not one)."""
    result = []
    for name in state.all_names():
        if name == exclude:
            continue
        data = state.read(name) or {}
        rec = data.get("network")
        if isinstance(rec, dict) and rec.get("pod") == pod and state.is_alive(data.get("supervisor")):
            result.append(name)
    return result


def destroy(pod: str) -> None:
    """Unpin the namespaces (the network namespace and its links go with them). Idempotent."""
    d = pod_dir(pod)
    for ns, _ in NAMESPACES:
        try:
            linux.umount(os.path.join(d, ns), linux.MNT_DETACH)
        except OSError:
            pass
    state.remove_dir(d)
