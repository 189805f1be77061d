"""cgroups without systemd: one cgroup per machine directly in cgroupfs, v1 hybrid/legacy and v2.

Layout, mirroring what systemd does for nspawn (so systemd-cgls reads naturally):
    <caller's cgroup>/machine.slice/machine-NAME.scope          limits and device policy
    <caller's cgroup>/machine.slice/machine-NAME.scope/payload  the container's cgroup namespace root
Limits sit on the scope, outside the guest's namespace, so the guest cannot lift them.
"""

from __future__ import annotations

import errno
import os
import time

from machined import devices, linux
from machined.log import fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from machined.config import Resources

SLICE = "machine.slice"
PAYLOAD = "payload"


class Hierarchy:
    """One mounted cgroup hierarchy and the caller's cgroup in it."""

    __slots__ = ("base", "controllers", "key", "mountpoint", "options", "version")

    def __init__(self, key: str, mountpoint: str, version: int, options: str, controllers: tuple[str, ...],
                 base: str) -> None:
        self.key = key                  # as in /proc/PID/cgroup: '' for v2, 'memory', 'name=systemd', ...
        self.mountpoint = mountpoint
        self.version = version
        self.options = options          # v1 mount options naming the hierarchy, e.g. "memory" or "none,name=systemd"
        self.controllers = controllers
        self.base = base                # absolute directory of the caller's cgroup in this hierarchy

    @property
    def dirname(self) -> str:
        return os.path.basename(self.mountpoint)


def _self_cgroups() -> dict[str, str]:
    """Map hierarchy key ('' for v2, 'memory', 'name=systemd', 'cpu,cpuacct', ...) to the caller's path."""
    result = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, keys, path = line.rstrip("\n").split(":", 2)
            result[keys] = path
    return result


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


_SCANNED: list[Hierarchy] | None = None


def _scan() -> list[Hierarchy]:
    """The mounted hierarchies and our place in them (read once per process: mounts do not move)."""
    global _SCANNED
    if _SCANNED is None:
        _SCANNED = _scan_mounts()
    return _SCANNED


def _scan_mounts() -> list[Hierarchy]:
    own = _self_cgroups()
    with open("/proc/cgroups") as f:
        known = {line.split()[0] for line in f if not line.startswith("#")}
    found: list[Hierarchy] = []
    seen: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _source, superopts = right.split()[:3]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
            controllers: tuple[str, ...] = ()
            if fstype == "cgroup2":
                key, version, options = "", 2, ""
            else:
                tokens = superopts.split(",")
                controllers = tuple(o for o in tokens if o in known)
                names = [o for o in tokens if o.startswith("name=")]
                key = ",".join([*controllers, *names])
                options = key if controllers else ",".join(["none", *names])
                version = 1
            if key in seen or key not in own:
                continue
            seen.add(key)
            # The caller's cgroup, relative to what this mount shows.
            rel = os.path.relpath(own[key], root) if own[key].startswith(root) else "."
            base = os.path.normpath(os.path.join(mountpoint, rel))
            found.append(Hierarchy(key, mountpoint, version, options, controllers, base))
    return found


def layout() -> str:
    """'unified', 'hybrid' or 'legacy'. MACHINED_CGROUP_LAYOUT=unified forces the v2-only path
    on a hybrid host (the v2 hierarchy is then used alone), which is how tests exercise it here."""
    forced = os.environ.get("MACHINED_CGROUP_LAYOUT")
    if forced:
        if forced not in ("unified", "hybrid", "legacy"):
            fail("select cgroup layout", f"MACHINED_CGROUP_LAYOUT={forced!r} is not unified, hybrid or legacy")
        return forced
    hs = _scan()
    has_v2 = any(h.version == 2 for h in hs)
    has_v1 = any(h.version == 1 for h in hs)
    if has_v2 and not has_v1:
        return "unified"
    return "hybrid" if has_v2 else "legacy"


def hierarchies(which: str | None = None) -> list[Hierarchy]:
    which = which or layout()
    hs = _scan()
    if which == "unified":
        return [h for h in hs if h.version == 2]
    if which == "legacy":
        return [h for h in hs if h.version == 1]
    return hs


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def scope_name(name: str) -> str:
    return f"machine-{name}.scope"


class MachineCgroup:
    """The scope directories of one machine, one per hierarchy; serialisable into the state file."""

    def __init__(self, layout: str, dirs: dict[str, str], keys: dict[str, str], delegated: bool = False) -> None:
        self.layout = layout
        self.dirs = dirs  # mountpoint -> scope directory
        self.keys = keys  # mountpoint -> hierarchy key as in /proc/PID/cgroup
        # The scope is a systemd unit delegated to us: systemd removes it, we only what we made inside.
        self.delegated = delegated

    def to_state(self) -> dict[str, object]:
        return {"layout": self.layout, "dirs": self.dirs, "keys": self.keys, "delegated": self.delegated}

    @classmethod
    def from_state(cls, data: dict[str, object]) -> MachineCgroup:
        dirs, keys = data.get("dirs"), data.get("keys")
        assert isinstance(dirs, dict) and isinstance(keys, dict)
        return cls(str(data.get("layout")), {str(k): str(v) for k, v in dirs.items()},
                   {str(k): str(v) for k, v in keys.items()}, bool(data.get("delegated")))

    def payload_dirs(self) -> Iterator[str]:
        for d in self.dirs.values():
            yield os.path.join(d, PAYLOAD)

    def main_dir(self) -> str:
        """The directory shown to users: v2 if present, else name=systemd, else the first."""
        for mp, d in self.dirs.items():
            if os.path.basename(mp) in ("unified", "cgroup") or mp == "/sys/fs/cgroup":
                return d
        for mp, d in self.dirs.items():
            if os.path.basename(mp) == "systemd":
                return d
        return next(iter(self.dirs.values()), "")

    def dir_for(self, controller: str) -> str | None:
        for mp, d in self.dirs.items():
            if controller in os.path.basename(mp).split(","):
                return d
        return None

    def join_payload(self, pid: int = 0) -> None:
        """Move pid (0: the caller) into the payload cgroup of every hierarchy."""
        for d in self.payload_dirs():
            linux.write_file(os.path.join(d, "cgroup.procs"), str(pid))

    def join_like(self, pid: int) -> None:
        """Move the caller into the cgroups pid is in, within this machine's scope."""
        with open(f"/proc/{pid}/cgroup") as f:
            where = {keys: path for _, keys, path in (line.rstrip("\n").split(":", 2) for line in f)}
        for mp, scope in self.dirs.items():
            path = where.get(self.keys.get(mp, "\0"), "")
            marker = "/" + os.path.basename(scope) + "/"
            i = path.find(marker)
            inner = path[i + len(marker):] if i >= 0 else PAYLOAD
            target = os.path.normpath(os.path.join(scope, inner))
            if not target.startswith(scope + "/"):
                target = os.path.join(scope, PAYLOAD)
            linux.write_file(os.path.join(target, "cgroup.procs"), "0")

    def pids(self) -> list[int]:
        """Every process of the machine (walks the payload subtree of one hierarchy)."""
        top = os.path.join(self.main_dir(), PAYLOAD)
        result: list[int] = []
        for dirpath, _dirs, _files in os.walk(top):
            try:
                result.extend(int(x) for x in _read(os.path.join(dirpath, "cgroup.procs")).split())
            except FileNotFoundError:
                continue
        return result

    def remove(self, timeout: float = 5.0) -> None:
        """Remove every directory of the machine, deepest first; processes may need a moment to go."""
        deadline = time.monotonic() + timeout
        if self.delegated:
            for d in self.payload_dirs():
                _rmtree_cgroup(d, deadline)
            return
        for d in self.dirs.values():
            _rmtree_cgroup(d, deadline)
        for d in self.dirs.values():
            parent = os.path.dirname(d)
            if os.path.basename(parent) == SLICE:
                try:
                    os.rmdir(parent)  # the slice goes with its last machine
                except OSError:
                    pass


def _rmtree_cgroup(top: str, deadline: float) -> None:
    try:
        # The common case: a scope with just its payload, which the guest left empty.
        os.rmdir(os.path.join(top, PAYLOAD))
        os.rmdir(top)
        return
    except FileNotFoundError:
        if not os.path.isdir(top):
            return
    except OSError:
        pass
    for dirpath, dirnames, _ in os.walk(top, topdown=False):
        del dirnames
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    fail(f"remove cgroup {dirpath}", e)
                time.sleep(0.01)


def _mkdir(path: str) -> None:
    for _ in range(10):
        try:
            os.makedirs(path, exist_ok=True)
            return
        except FileNotFoundError:
            continue  # a concurrent teardown removed the slice under us; try again


def _copy_cpuset(parent: str, child: str) -> None:
    # v1 cpuset starts empty and refuses tasks until cpus and mems are set.
    for key in ("cpuset.cpus", "cpuset.mems"):
        linux.write_file(os.path.join(child, key), _read(os.path.join(parent, key)).strip() or "\n")


def planned(name: str, which: str | None = None) -> MachineCgroup:
    """The machine's scope directories before they exist: recorded first, a crash while they are
    made leaves them to the cleanup."""
    which = which or layout()
    hs = hierarchies(which)
    if not hs:
        fail(f"create cgroup for {name}", "no cgroup hierarchy is mounted")
    return MachineCgroup(which, {h.mountpoint: os.path.join(h.base, SLICE, scope_name(name)) for h in hs},
                         {h.mountpoint: h.key for h in hs})


def create(name: str, allow: Iterable[devices.Rule] = devices.DEFAULT, which: str | None = None,
           limits: Resources | None = None) -> MachineCgroup:
    """Create the machine's scope and payload in every hierarchy, with its device policy and limits;
    undone completely on failure."""
    cg = planned(name, which)
    try:
        for h in hierarchies(cg.layout):
            scope = cg.dirs[h.mountpoint]
            try:
                os.mkdir(scope)
            except FileExistsError:
                # A machine of this name that died with no supervisor left this behind.
                _rmtree_cgroup(scope, time.monotonic() + 2)
                os.mkdir(scope)
            except FileNotFoundError:
                _mkdir(os.path.dirname(scope))  # the first machine: make the slice
                os.mkdir(scope)
            if "cpuset" in h.controllers:
                if not _read(os.path.join(os.path.dirname(scope), "cpuset.cpus")).strip():
                    _copy_cpuset(h.base, os.path.dirname(scope))
                _copy_cpuset(os.path.dirname(scope), scope)
            if "devices" in h.controllers:
                devices.apply_v1(scope, allow)  # before payload exists: v1 refuses deny-all with children
            if h.version == 2:
                _enable_v2_controllers(os.path.dirname(os.path.dirname(scope)), os.path.dirname(scope), scope)
                if cg.layout == "unified":
                    devices.apply_v2(scope, allow)
            payload = os.path.join(scope, PAYLOAD)
            os.mkdir(payload)
            if "cpuset" in h.controllers:
                _copy_cpuset(scope, payload)
        if limits is not None:
            from machined import resources

            resources.apply(cg, limits)
    except OSError as e:
        cg.remove(timeout=1)
        fail(f"create cgroup for {name}", e)
    except BaseException:
        cg.remove(timeout=1)
        raise
    return cg


def _enable_v2_controllers(*chain: str) -> None:
    """Delegate the available controllers down base -> slice -> scope, where the kernel lets us."""
    for d in chain:
        try:
            available = _read(os.path.join(d, "cgroup.controllers")).split()
        except OSError:
            return
        wanted = [c for c in available if c in ("cpu", "cpuset", "io", "memory", "pids")]
        if not wanted:
            return
        try:
            linux.write_file(os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
        except OSError:
            return  # a non-root cgroup with processes of its own cannot delegate (no internal processes rule)


def mount_in_container(sys_fs_cgroup: str, which: str, nesting: bool = False) -> None:
    """Mount the container's view of cgroupfs; must run after joining payload and unsharing the cgroup ns.

    v2: one cgroup2 mount, writable (the guest owns its subtree). v1: a tmpfs with each hierarchy,
    controllers read-only, the name=systemd and unified trees writable for the guest's init, as
    systemd-nspawn does on a hybrid host. With nesting the controllers are writable too (like LXC's
    cgroup:rw): the guest's own subtree only, as its cgroup namespace shows nothing above it, and
    the limits on the machine's scope, outside that subtree, still bound whatever it sets.
    """
    nosuid = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    if which == "unified":
        linux.mount("cgroup2", sys_fs_cgroup, "cgroup2", nosuid, "nsdelegate")
        return
    linux.mount("tmpfs", sys_fs_cgroup, "tmpfs", nosuid, "mode=755,size=64k")
    for h in hierarchies(which):
        if h.version == 2:
            target = os.path.join(sys_fs_cgroup, "unified")
            os.mkdir(target)
            linux.mount("cgroup2", target, "cgroup2", nosuid, None)
            continue
        target = os.path.join(sys_fs_cgroup, h.dirname)
        os.mkdir(target)
        writable = nesting or not h.controllers
        linux.mount("cgroup", target, "cgroup", nosuid | (0 if writable else linux.MS_RDONLY), h.options)
        if len(h.controllers) > 1:
            for c in h.controllers:
                if c != h.dirname:
                    os.symlink(h.dirname, os.path.join(sys_fs_cgroup, c))
    linux.mount(None, sys_fs_cgroup, None, linux.MS_REMOUNT | linux.MS_RDONLY | nosuid, "mode=755,size=64k")


def teardown(data: dict[str, object]) -> None:
    """Teardown step: remove the machine's cgroup recorded in its state."""
    cg = data.get("cgroup")
    if isinstance(cg, dict):
        MachineCgroup.from_state(cg).remove()
