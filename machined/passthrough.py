"""Devices passed into machines: from the settings at start, by bind-device at runtime, by hotplug.

A running machine's device list lives in devices.json in its runtime directory: the rules it started
with and every node passed in, with where it came from. Whoever changes it (mctl, the supervisor's
hotplug watcher) holds devices.lock while it updates the cgroup, the node in the machine's /dev and
the file. The nodes of a running machine are made from a forked child that joins only the machine's
mount namespace and imports nothing after (see spawn.seal_imports).
"""

from __future__ import annotations

import fcntl
import os

from machined import cgroups, devices, jsonc, linux, mounts, paths, spawn, state
from machined.devices import Node, Rule
from machined.log import MachinedError, die, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from machined.config import MachineConfig

def _file(name: str, what: str) -> str:
    return os.path.join(paths.machine_runtime_dir(name), what)


class DeviceList:
    """The rules a machine started with, and the nodes passed in (path -> node, origin)."""

    def __init__(self, rules: list[Rule], nodes: dict[str, tuple[Node, str]]) -> None:
        self.rules = rules
        self.nodes = nodes

    def effective(self) -> list[Rule]:
        return self.rules + [node.rule() for node, _ in self.nodes.values()]

    @classmethod
    def load(cls, name: str) -> DeviceList:
        try:
            data = jsonc.load(_file(name, "devices.json"))
            return cls([Rule.parse(r) for r in data["rules"]],
                       {n["path"]: (Node.from_state(n), str(n["origin"])) for n in data["nodes"]})
        except FileNotFoundError:
            return cls(list(devices.DEFAULT), {})
        except (OSError, ValueError, KeyError, TypeError, MachinedError) as e:
            fail(f"read the device list of {name}", str(e))

    def save(self, name: str) -> None:
        jsonc.save(_file(name, "devices.json"),
                   {"rules": [str(r) for r in self.rules],
                    "nodes": [{**node.to_state(), "origin": origin} for node, origin in self.nodes.values()]})


class Locked:
    """devices.lock of a machine, held while its device list, cgroup and /dev change."""

    def __init__(self, name: str) -> None:
        self.fd = os.open(_file(name, "devices.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __enter__(self) -> Locked:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# --- at start ------------------------------------------------------------------------------------

def plan(cfg: MachineConfig, rootfs: str) -> tuple[tuple[Rule, ...], tuple[Node, ...]]:
    """The rules and nodes of a machine's settings, looked up now: a missing device is an error here."""
    rules = list(devices.DEFAULT)
    nodes: list[Node] = []
    where = paths.config_path(cfg.name)
    try:
        for entry in cfg.devices.allow:
            kind, spec, access = devices.parse_entry(entry)
            if kind == "rule":
                rules.append(Rule.parse(entry))
            elif kind == "class":
                rules += devices.resolve_class(spec, access)
            else:
                node = devices.resolve_node(spec, access)
                node.gid = guest_gid(rootfs, node.gid)
                nodes.append(node)
    except (MachinedError, ValueError) as e:
        die(f"Invalid setting devices.allow in {where}: {e}")
    return tuple(rules), tuple(nodes)


def record(name: str, rules: tuple[Rule, ...], nodes: tuple[Node, ...]) -> None:
    """Write the device list of a machine being started (the supervisor, before its first boot)."""
    DeviceList(list(rules), {n.path: (n, "config") for n in nodes}).save(name)


def node_hook(name: str) -> Callable[[int], None] | None:
    """A Spec.in_child step making the nodes of the device list in the new /dev (at every boot)."""
    nodes = [node for node, _ in DeviceList.load(name).nodes.values()]
    if not nodes:
        return None

    def make_nodes(root_fd: int) -> None:
        for node in nodes:
            try:
                devices.make_node(root_fd, node)
            except OSError as e:
                fail(f"create device node {node.path}", e)

    return make_nodes


def guest_gid(rootfs: str, host_gid: int) -> int:
    """The machine's gid of the host group named like host_gid ('render' differs between systems)."""
    if host_gid == 0:
        return 0
    import grp

    try:
        group = grp.getgrgid(host_gid).gr_name
    except KeyError:
        return host_gid
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            text = mounts.read_file(root_fd, "etc/group").decode(errors="replace")
        finally:
            os.close(root_fd)
    except OSError:
        return host_gid
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == group and fields[2].isdigit():
            return int(fields[2])
    return host_gid


# --- changes at runtime --------------------------------------------------------------------------

def _apply(data: dict[str, object], dl: DeviceList, added: Rule | None, removed: Rule | None) -> None:
    """Bring the machine's cgroup in line with dl after one rule came or went."""
    cg_state = data.get("cgroup")
    if not isinstance(cg_state, dict):
        return
    cg = cgroups.MachineCgroup.from_state(cg_state)
    # A systemd scope: its DeviceAllow= (on v2, systemd's device program covers the subtree; on v1
    # the writes below still reach the cgroups under the scope, which systemd's do not).
    if cg.delegated:
        from machined import systemd

        systemd.set_properties(data, systemd.device_properties(dl.effective()))
    if cg.layout == "unified":
        if not cg.delegated:
            devices.apply_v2(cg.main_dir(), dl.effective())
        return
    d = cg.dir_for("devices")
    if d is None:
        return
    try:
        if removed is not None:
            devices.deny_v1(d, removed)
            for rule in dl.effective():  # the deny may have cut into a rule that still stands
                devices.allow_v1(d, rule)
        if added is not None:
            devices.allow_v1(d, added)
    except OSError as e:
        fail(f"update the device cgroup of {data.get('name')}", e)


def in_machine(pidfd: int, node: Node, present: bool) -> None:
    """Make (present) or remove node in the running machine's /dev, from a child in its mount namespace."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            spawn.seal_imports()
            linux.setns(pidfd, linux.CLONE_NEWNS)  # its root becomes ours
            root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            (devices.make_node if present else devices.remove_node)(root, node)
        except BaseException as e:  # noqa: BLE001 - report, then exit
            os.write(w, (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).encode())
            code = 1
        os._exit(code)
    os.close(w)
    try:
        msg = os.read(r, 4096).decode(errors="replace")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if msg:
        fail(f"{'create' if present else 'remove'} {node.path} in the machine's /dev", msg)


def pass_in(name: str, data: dict[str, object], node: Node, origin: str, pidfd: int | None) -> None:
    """Allow node in the cgroup and make it in the machine (pidfd: its init; None between boots)."""
    with Locked(name):
        dl = DeviceList.load(name)
        old = dl.nodes.get(node.path)
        dl.nodes[node.path] = (node, origin)
        replaced = old[0].rule() if old is not None and old[0].rule() != node.rule() else None
        _apply(data, dl, node.rule(), replaced)
        dl.save(name)  # before the node: a failure below leaves an allowed device the list shows
        if pidfd is not None:
            in_machine(pidfd, node, True)  # a stale node of another device at the path is replaced


def take_out(name: str, data: dict[str, object], path: str, pidfd: int | None) -> Node | None:
    """Remove node path from the machine: cgroup first, so it is unusable even if the rest fails."""
    with Locked(name):
        dl = DeviceList.load(name)
        entry = dl.nodes.pop(path, None)
        if entry is None:
            return None
        _apply(data, dl, None, entry[0].rule())
        dl.save(name)
        if pidfd is not None:
            in_machine(pidfd, entry[0], False)
        return entry[0]


def bind(name: str, path: str, access: str) -> None:
    data = state.require_running(name)
    try:
        access = devices.parse_access(access)
    except ValueError as e:
        die(f"Invalid --access: {e}")
    try:
        node = devices.resolve_node(path, access)
    except ValueError as e:
        die(f"Failed to bind {path} into {name}: {e}")
    node.gid = guest_gid(str(data.get("rootfs", "")), node.gid)
    pidfd = state.leader_pidfd(data)
    try:
        pass_in(name, data, node, "bind", pidfd)
    finally:
        os.close(pidfd)


def unbind(name: str, path: str) -> None:
    data = state.require_running(name)
    current = DeviceList.load(name).nodes
    if path not in current:
        # Also by the device's node name when a symlink to it was bound.
        real = os.path.realpath(path)
        if real not in current:
            passed = ", ".join(sorted(current)) or "none"
            die(f"Failed to unbind {path} from {name}: not passed in (passed in: {passed})")
        path = real
    pidfd = state.leader_pidfd(data)
    try:
        take_out(name, data, path, pidfd)
    finally:
        os.close(pidfd)


# --- what status shows ---------------------------------------------------------------------------

def status(name: str) -> dict[str, object]:
    """Status.Devices (human) and DeviceAllow (every rule in force) of a running machine."""
    try:
        dl = DeviceList.load(name)
    except MachinedError:
        return {}
    extra = [str(r) for r in dl.rules if r not in devices.DEFAULT]
    shown = [f"{node} {origin}" for node, origin in sorted(dl.nodes.values(), key=lambda e: e[0].path)]
    shown += [f"{r} config" for r in extra]
    return {"Status.Devices": ", ".join(shown) if shown else "default only",
            "DeviceAllow": [str(r) for r in dl.effective()]}


def settings_status(cfg: MachineConfig, running: bool) -> dict[str, object]:
    """What the settings ask for: hotplug rules; for a stopped machine also its devices and limits."""
    info: dict[str, object] = {}
    if not running:
        if cfg.devices.allow:
            info["Status.Devices"] = ", ".join(cfg.devices.allow) + " (settings)"
        limits = [f"{k}={v}" for k, v in vars(cfg.resources).items() if v is not None]
        if limits:
            info["Status.Limits"] = ", ".join(limits)
    if cfg.devices.hotplug:
        info["Status.Hotplug"] = "; ".join(cfg.devices.hotplug)
    return info
