"""Lifecycle verbs: start, run, poweroff, reboot, terminate, kill, list, status, show, console."""

from __future__ import annotations

import os
import time

from machined import linux, paths, signals, state
from machined.log import die

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from machined.config import MachineConfig
    from machined.supervisor import Plan


def load_config(name: str) -> MachineConfig:
    """The machine's settings; an image dropped into the pool without any gets a default file."""
    from machined import config

    paths.check_name(name)
    if not config.exists(name) and os.path.isdir(paths.image_path(name)):
        machine_id = _image_machine_id(paths.image_path(name)) or config.new_machine_id()
        config.save(config.MachineConfig(name=name, id=machine_id))
    return config.load(name)


def _image_machine_id(rootfs: str) -> str | None:
    from machined import mounts

    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        value = mounts.read_file(root_fd, "etc/machine-id", follow=False, limit=64).decode(errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(root_fd)
    return value if len(value) == 32 and all(c in "0123456789abcdef" for c in value) else None


def start(name: str, foreground: bool = False, ephemeral: bool = False, network: dict[str, Any] | None = None) -> int:
    """network: start's --network/--port/--pod options, for this run only."""
    from machined import supervisor

    cfg = load_config(name)
    if network:
        from machined import config, records

        cfg = records.replace(cfg, network=config.with_network(cfg.network, **network))
    plan = supervisor.plan_from_config(cfg, ephemeral=ephemeral)
    lock = supervisor.acquire(name)
    if foreground:
        return supervisor.run_foreground(plan, lock)
    try:
        supervisor.start_detached(plan, lock)
    finally:
        lock.forget()
    return 0


def run(name: str | None, directory: str | None, argv: list[str], read_only: bool = False) -> int:
    from machined import supervisor

    if not argv:
        die("Failed to run: no command given", hint="mctl run NAME -- CMD...")
    if directory is not None:
        plan, lock = _directory_plan(name, directory, argv, read_only)
    else:
        assert name is not None
        cfg = load_config(name)
        plan = supervisor.plan_from_config(cfg, argv)
        lock = supervisor.acquire(name)
    return supervisor.run_foreground(plan, lock)


def _directory_plan(name: str | None, directory: str, argv: list[str], read_only: bool) -> tuple[Plan, state.Lock]:
    from machined import devices, supervisor

    rootfs = os.path.realpath(directory)
    if not os.path.isdir(rootfs):
        die(f"Failed to run in {directory}: not a directory")
    if rootfs == "/":
        die(f"Failed to run in {directory}: the host's root cannot be a machine's root")
    if name is None:
        base = "".join(c if c.isalnum() or c in "-_." else "-" for c in os.path.basename(rootfs)).lstrip(".-")
        base = (base or "machine")[:55]
        lock = state.try_lock(base)
        name = base
        if lock is None:  # the same directory runs already: a unique name of our own
            name = f"{base}-{os.urandom(3).hex()}"
            lock = state.try_lock(name)
    else:
        paths.check_name(name)
        lock = state.try_lock(name)
    if lock is None:
        die(f"Failed to run {name}: a machine of that name is running")
    if state.read(name) is not None:
        state.cleanup_stale(name)
    from machined import mounts

    try:
        mounts.preflight(rootfs)
    except BaseException:
        lock.release()
        raise
    machine_id = _image_machine_id(rootfs) or os.urandom(16).hex()
    plan = supervisor.Plan(name=name, rootfs=rootfs, machine_id=machine_id, argv=argv, boot=False,
                           init_kind="command", read_only=read_only, rules=devices.DEFAULT)
    return plan, lock


def _wait_gone(data: dict[str, object], timeout: float) -> bool:
    """Wait for the machine's supervisor to finish its teardown."""
    fd = state.open_process(data.get("supervisor"))
    if fd is None:
        state.running(str(data["name"]))  # cleans up if it died without doing so
        return True
    import select

    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def stop(name: str, how: str, timeout: float | None = None, wait: bool = True) -> None:
    """poweroff / halt / terminate, escalating to SIGKILL when the guest takes too long.

    A poweroff goes through the supervisor (SIGTERM), which knows the guest's init, watches the
    shutdown and kills the machine after its kill_timeout; we wait a little longer than that.
    """
    from machined import inits, resources

    data = state.require_running(name)
    resources.thaw_for_stop(data)  # a frozen (v1) process takes no signal, not even SIGKILL
    if how == "terminate":
        state.signal_leader(data, signals.SIGKILL)
        limit = 10.0
    elif how == "poweroff":
        _signal_supervisor(data, signals.SIGTERM)
        limit = (timeout if timeout is not None else _kill_timeout(name)) + 2.0
    else:
        state.signal_leader(data, inits.halt_signal(str(data.get("init", "command"))), settle=5.0)
        limit = timeout if timeout is not None else _kill_timeout(name)
    if not wait or _wait_gone(data, limit):
        return
    state.signal_leader(data, signals.SIGKILL)
    if not _wait_gone(data, 10.0):
        die(f"Failed to stop {name}: its supervisor does not exit")


def _signal_supervisor(data: dict[str, object], sig: int) -> None:
    fd = state.open_process(data.get("supervisor"))
    if fd is None:
        die(f"Machine {data.get('name')} is not running")
    try:
        linux.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def _kill_timeout(name: str) -> float:
    from machined import config

    try:
        return config.load(name).kill_timeout if config.exists(name) else 30.0
    except Exception:  # noqa: BLE001 - a broken config must not prevent stopping the machine
        return 30.0


def reboot(name: str, wait: bool = True, timeout: float = 60.0) -> None:
    from machined import inits, resources

    data = state.require_running(name)
    old_leader = data.get("leader")
    resources.thaw_for_stop(data)
    boots = data.get("boots")
    state.signal_leader(data, inits.reboot_signal(str(data.get("init", "command"))), settle=5.0)
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = state.running(name)
        if now is None:
            die(f"Failed to reboot {name}: it powered off instead")
        if now.get("boots") != boots and now.get("leader") != old_leader and now.get("state") == "running":
            return
        time.sleep(0.02)
    die(f"Failed to reboot {name}: no new init after {timeout:.0f} s")


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        return int(t)
    if not t.startswith("SIG"):
        t = "SIG" + t
    if t.startswith("SIGRTMIN+") and t[9:].isdigit():
        return int(signals.SIGRTMIN) + int(t[9:])
    number = signals.by_name().get(t)
    if number is not None:
        return number
    die(f"Invalid signal {text!r}")


def kill(name: str, sig: int, whom: str) -> None:
    data = state.require_running(name)
    if whom == "leader":
        state.signal_leader(data, sig)
        return
    from machined import cgroups

    cg = data.get("cgroup")
    assert isinstance(cg, dict)
    for pid in cgroups.MachineCgroup.from_state(cg).pids():
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            linux.pidfd_send_signal(fd, sig)
        except OSError:
            pass
        finally:
            os.close(fd)


def _os_release(rootfs: str) -> dict[str, str]:
    from machined import mounts

    result: dict[str, str] = {}
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return result
    try:
        for candidate in ("etc/os-release", "usr/lib/os-release"):
            try:
                text = mounts.read_file(root_fd, candidate, limit=65536).decode(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                key, sep, value = line.partition("=")
                if sep and key.strip() and not key.startswith("#"):
                    result[key.strip()] = value.strip().strip("\"'")
            break
    finally:
        os.close(root_fd)
    return result


def machine_info(data: dict[str, object]) -> dict[str, object]:
    """The properties of a running machine, as show prints them."""
    name = str(data["name"])
    # The machine's own root, as its init sees it (an overlay or ephemeral root is not the image directory).
    leader_ref = data.get("leader")
    leader_fd = state.open_process(leader_ref)
    root = str(data.get("rootfs", ""))
    if leader_fd is not None and isinstance(leader_ref, dict):
        root = f"/proc/{leader_ref['pid']}/root"  # the recorded init, checked alive through its pidfd
    osr = _os_release(root)
    if leader_fd is not None:
        os.close(leader_fd)
    leader = data.get("leader")
    supervisor = data.get("supervisor")
    cg = data.get("cgroup")
    cgroup_dir = ""
    if isinstance(cg, dict):
        from machined import cgroups

        cgroup_dir = cgroups.MachineCgroup.from_state(cg).main_dir()
    info: dict[str, object] = {
        "Name": name,
        "Id": data.get("id", ""),
        "Class": data.get("class", "container"),
        "Service": data.get("service", "machined"),
        "State": data.get("state", "running"),
        "Leader": leader.get("pid") if isinstance(leader, dict) else None,
        "Supervisor": supervisor.get("pid") if isinstance(supervisor, dict) else None,
        "RootDirectory": data.get("rootfs", ""),
        "Init": data.get("init", ""),
        "Boot": data.get("boot", True),
        "Timestamp": data.get("started"),
        "Boots": data.get("boots", 1),
        "ControlGroup": cgroup_dir,
        "Console": data.get("console", ""),
        "Log": data.get("log", ""),
        "OS": osr.get("ID", ""),
        "OSVersion": osr.get("VERSION_ID", ""),
        "OSPrettyName": osr.get("PRETTY_NAME", ""),
        "Addresses": data.get("addresses", []),
        "NetworkInterfaces": data.get("interfaces", []),
    }
    from machined import passthrough, resources

    info.update(resources.status(data))  # usage, limits, frozen
    info.update(passthrough.status(name))
    return info


def running_infos() -> list[dict[str, object]]:
    result = []
    for name in state.all_names():
        data = state.running(name)
        if data is not None and not data.get("corrupt") and data.get("supervisor"):
            result.append(machine_info(data))
    return result


def stopped_info(name: str) -> dict[str, object]:
    from machined import config

    cfg = load_config(name)
    if cfg.base:  # an overlay image: its merged tree
        from machined import images

        osr = images.in_merged_view(cfg, lambda: _os_release(paths.image_path(name)))
    else:
        osr = _os_release(paths.image_path(name))
    result: dict[str, object] = {
        "Name": name, "Id": cfg.id, "Class": "container", "Service": "machined", "State": "stopped",
        "RootDirectory": paths.image_path(name), "Template": cfg.template, "Release": cfg.release,
        "ReadOnly": cfg.read_only, "OS": osr.get("ID", ""), "OSVersion": osr.get("VERSION_ID", ""),
        "OSPrettyName": osr.get("PRETTY_NAME", ""), "Config": paths.config_path(name),
        "Settings": config.to_toml(cfg),
    }
    from machined import passthrough

    result.update(passthrough.settings_status(cfg, running=False))  # devices, hotplug rules, limits
    return result


def info(name: str) -> dict[str, object]:
    paths.check_name(name)
    data = state.running(name)
    if data is not None and data.get("supervisor"):
        result = machine_info(data)
        from machined import config

        if config.exists(name):
            cfg = config.load(name)
            result.update({"Template": cfg.template, "Release": cfg.release, "ReadOnly": cfg.read_only,
                           "Config": paths.config_path(name)})
            from machined import passthrough

            result.update(passthrough.settings_status(cfg, running=True))
        return result
    if os.path.isdir(paths.image_path(name)) or os.path.exists(paths.config_path(name)):
        return stopped_info(name)
    die(f"No machine named {name!r}")


def console(name: str) -> int:
    import socket

    from machined import terminal

    data = state.require_running(name)
    path = data.get("console")
    if not path:
        die(f"Failed to attach to {name}: it has no console")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError as e:
        die(f"Failed to attach to the console of {name}: {e.strerror}")
    if os.isatty(0):
        print(f"Connected to {name}. Press ^] three times within 1s to disconnect.\r", flush=True)
        size = terminal.winsize(0)
        if size:
            import struct

            rows, cols = struct.unpack("HHHH", size)[:2]
            sock.sendall(f"\x1b]machined-winsize;{rows};{cols}\x07".encode())
    try:
        terminal.relay(sock.fileno(), sock.fileno())
    finally:
        sock.close()
    if os.isatty(0):
        print(f"\r\nConnection to {name} terminated.", flush=True)
    return 0
