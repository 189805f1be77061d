"""Delegation to systemd and registration with systemd-machined, inside a real systemd host.

The host (tests/host.py) is booted once for this module; every test cleans up the machines it made
inside it. The real machinectl, systemctl and systemd-cgls are the oracle.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import pytest

from tests.conftest import TOKEN, Env, require_root
from tests.host import DEBIAN, MCTL, Host, boot
from tests.test_teardown import _wait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    require_root()
    env = Env(tmp_path_factory.mktemp("systemd-host"))
    try:
        yield boot(env)
    finally:
        env.cleanup()


class Inner:
    """The machines one test makes inside the host; all of them are gone after the test."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.names: list[str] = []

    def name(self, prefix: str = "m") -> str:
        n = f"{prefix}{TOKEN}{os.urandom(3).hex()}"
        self.names.append(n)
        return n

    def busybox(self, prefix: str = "bb", settings: str = "") -> str:
        name = self.name(prefix)
        self.host.ok("create", name, "--template", "busybox", "--set", "console_login=no")
        if settings:
            self.host.sh(f"printf '%s\\n' '{settings}' >> /etc/machined/{name}.toml")
        return name

    def debian(self) -> str:
        name = self.name("deb")
        self.host.sh(f"cp -a {DEBIAN} /var/lib/machines/{name}")
        return name

    def cleanup(self) -> None:
        for name in self.names:
            self.host.mctl("disable", name)
            self.host.mctl("terminate", name)
            self.host.mctl("remove", name)


@pytest.fixture
def inner(host: Host) -> Iterator[Inner]:
    made = Inner(host)
    try:
        yield made
    finally:
        made.cleanup()
        assert not set(made.names) & set(host.running())


def machinectl_list(host: Host) -> dict[str, list[str]]:
    out = host.run("machinectl", "list", "--no-legend", "--no-pager", check=True).stdout
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}


def machinectl_show(host: Host, name: str) -> dict[str, str]:
    out = host.run("machinectl", "show", name, "--no-pager", check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_show(host: Host, unit: str, *props: str) -> dict[str, list[str]]:
    """systemctl show: every value of each property (DeviceAllow= repeats)."""
    args = [a for p in props for a in ("-p", p)]
    out = host.run("systemctl", "show", unit, *args, check=True).stdout
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        result.setdefault(key, []).append(value)
    return result


def gone(host: Host, name: str, machined: bool = True) -> bool:
    """Neither mctl nor systemd (nor machined, unless it is not there to ask) knows the machine any more."""
    return (name not in host.running() and not (machined and name in machinectl_list(host))
            and not host.sh(f"systemctl list-units --all --no-legend 'machine-{name}.scope'").strip())


def why_not_gone(host: Host, name: str) -> str:
    """What still knows the machine, for a failure message."""
    return host.sh(f"{MCTL} list; machinectl list --no-pager; systemctl status --no-pager 'machine-{name}.scope'; "
                   f"systemd-cgls --no-pager -u 'machine-{name}.scope'; ls -la /run/machined/machines/; "
                   f"tail -c 2000 /run/machined/logs/{name}.log", check=False)


def assert_nothing_left(host: Host, name: str, machined: bool = True) -> None:
    assert gone(host, name, machined)
    left = host.sh(f"ls /run/machined/machines/{name} /run/machined/locks/{name} 2>/dev/null; "
                   f"ls -d /sys/fs/cgroup/*/machine.slice/machine-{name}.scope 2>/dev/null; "
                   f"pgrep -a -x 'machined-(sup|bus|net)' | grep -w {name}", check=False)
    assert left.strip() == ""


def test_host_harness_is_real(host: Host) -> None:
    """The oracle is the real thing: systemd is PID 1 in the host, machined answers on the bus."""
    assert host.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert "RegisterMachineWithNetwork" in host.run("busctl", "introspect", "org.freedesktop.machine1",
                                                   "/org/freedesktop/machine1", check=True).stdout
    assert host.run("machinectl", "list", "--no-legend").returncode == 0


def test_busybox_registered_and_machinectl_acts(host: Host, inner: Inner) -> None:
    name = inner.busybox()
    host.ok("start", name)
    listed = machinectl_list(host)
    assert listed[name][1:3] == ["container", "machined"], listed
    props = machinectl_show(host, name)
    ours = json.loads(host.ok("show", name, "-o", "json"))
    assert props["State"] == "running" and props["Class"] == "container" and props["Service"] == "machined"
    assert props["Unit"] == f"machine-{name}.scope" and props["RootDirectory"] == f"/var/lib/machines/{name}"
    assert int(props["Leader"]) == ours["Leader"] and props["Id"] == ours["Id"]
    status = host.run("machinectl", "status", name, "--no-pager", check=True).stdout
    assert re.search(rf"Leader: {ours['Leader']} \(init\)", status), status
    assert f"Root: /var/lib/machines/{name}" in status and f"Unit: machine-{name}.scope" in status
    # The supervisor sits in the scope's 'supervisor' cgroup, the machine in 'payload'.
    cgls = host.run("systemd-cgls", "--no-pager", "-u", f"machine-{name}.scope", check=True).stdout
    assert "payload" in cgls and "supervisor" in cgls and "machined" in cgls.split("supervisor")[1], cgls

    # A reboot is a new init in the same scope: registered again, with the new leader.
    host.ok("reboot", name)
    leader = json.loads(host.ok("show", name, "-o", "json"))["Leader"]
    assert leader != ours["Leader"] and int(machinectl_show(host, name)["Leader"]) == leader

    host.run("machinectl", "terminate", name, check=True)
    assert _wait(lambda: gone(host, name), 30), host.running()
    assert_nothing_left(host, name)

    host.ok("start", name)
    host.run("machinectl", "kill", name, check=True)  # SIGTERM to every process: the machine stops
    assert _wait(lambda: gone(host, name), 30), why_not_gone(host, name)

    host.ok("start", name)
    host.run("machinectl", "kill", "--kill-whom=leader", "--signal=SIGKILL", name, check=True)
    assert _wait(lambda: gone(host, name), 30), host.running()
    assert_nothing_left(host, name)


def test_debian_guest_registered_shell_and_poweroff(host: Host, inner: Inner) -> None:
    name = inner.debian()
    host.ok("start", name)
    # Its init runs when start returns; its bus only a moment later.
    assert _wait(lambda: host.mctl("shell", name, "--", "systemctl", "is-system-running", "--wait")
                 .stdout.strip() == "running", 120)
    listed = machinectl_list(host)
    assert listed[name][1:5] == ["container", "machined", "debian", "12"], listed
    status = host.run("machinectl", "status", name, "--no-pager", check=True).stdout
    leader = json.loads(host.ok("show", name, "-o", "json"))["Leader"]
    assert re.search(rf"Leader: {leader} \(systemd\)", status), status
    assert "OS: Debian GNU/Linux 12 (bookworm)" in status and f"Unit: machine-{name}.scope" in status
    props = machinectl_show(host, name)
    assert props["State"] == "running" and int(props["Leader"]) == leader
    # machined enters the machine and asks its systemd for a shell: a real round trip into the guest.
    r = host.run("machinectl", "shell", name, "/bin/sh", "-c", "echo shell-$((6*7)) in $(hostname)", timeout=60)
    assert f"shell-42 in {name}" in r.stdout, r.stdout + r.stderr
    assert "Startup finished" in host.run("journalctl", "-M", name, "--no-pager", "-b", check=True).stdout
    host.run("machinectl", "reboot", name, check=True)  # SIGINT to the leader: a new init, registered again
    assert _wait(lambda: host.mctl("show", name, "-p", "Boots", "--value").stdout.strip() == "2", 60)
    leader2 = json.loads(host.ok("show", name, "-o", "json"))["Leader"]
    assert leader2 != leader and _wait(lambda: int(machinectl_show(host, name)["Leader"]) == leader2, 10)
    host.run("machinectl", "poweroff", name, check=True)  # SIGRTMIN+4 to the leader, straight from machined
    assert _wait(lambda: gone(host, name), 60), host.running()
    assert_nothing_left(host, name)
    assert "Powering off." in host.sh(f"cat /run/machined/logs/{name}.log")


def test_scope_properties_and_memory_limit(host: Host, inner: Inner) -> None:
    name = inner.busybox("mem", '[resources]\nmemory_max = "64M"\ntasks_max = 64\ncpu_weight = 50\n'
                                'cpu_quota = "150%"\n[devices]\nallow = ["c 1:11 r"]')
    host.ok("start", name)
    scope = f"machine-{name}.scope"
    shown = unit_show(host, scope, "Delegate", "DeviceAllow", "DevicePolicy", "MemoryMax", "TasksMax", "CPUWeight",
                      "CPUQuotaPerSecUSec", "Slice", "CollectMode")
    assert shown["Delegate"] == ["yes"] and shown["DevicePolicy"] == ["closed"] and shown["Slice"] == ["machine.slice"]
    assert shown["MemoryMax"] == [str(64 << 20)] and shown["TasksMax"] == ["64"] and shown["CPUWeight"] == ["50"]
    assert shown["CPUQuotaPerSecUSec"] == ["1.500000s"] and shown["CollectMode"] == ["inactive-or-failed"]
    allowed = set(shown["DeviceAllow"])
    for entry in ("/dev/char/1:3 rwm", "/dev/char/1:11 r", "char-pts rwm", "char-* m", "block-* m"):
        assert entry in allowed, (entry, allowed)
    # systemd wrote them into the scope's cgroups (v1 controllers, writable in the nested host).
    memdir = f"/sys/fs/cgroup/memory/machine.slice/{scope}"
    assert host.sh(f"cat {memdir}/memory.limit_in_bytes").strip() == str(64 << 20)
    assert "c 1:11 r" in host.sh(f"cat /sys/fs/cgroup/devices/machine.slice/{scope}/devices.list")
    # A memory hog inside is killed inside the machine; the machine and the host go on.
    r = host.mctl("shell", name, "--", "sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\000' a); echo ${#x}")
    assert r.returncode == 137 and "200000000" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert re.search(r"oom_kill [1-9]", host.sh(f"cat {memdir}/payload/memory.oom_control"))
    assert host.ok("shell", name, "--", "cat", "/proc/1/comm").strip() == "init"
    assert host.run("systemctl", "is-system-running").stdout.strip() == "running"
    # At runtime, limits and devices change through systemd too (SetUnitProperties).
    host.ok("set-limit", name, "--runtime", "memory_max=32M", "tasks_max=max")
    shown = unit_show(host, scope, "MemoryMax", "TasksMax")
    assert shown == {"MemoryMax": [str(32 << 20)], "TasksMax": ["infinity"]}
    assert host.sh(f"cat {memdir}/memory.limit_in_bytes").strip() == str(32 << 20)
    host.sh("test -e /dev/kvm || mknod /dev/kvm c 10 232")  # the host's device, in the host machine's /dev
    host.ok("bind-device", name, "/dev/kvm", "--access", "rw")
    assert "/dev/char/10:232 rw" in unit_show(host, scope, "DeviceAllow")["DeviceAllow"]
    host.ok("shell", name, "--", "head", "-c0", "/dev/kvm")  # opens: allowed below the scope too
    host.ok("unbind-device", name, "/dev/kvm")
    assert "/dev/char/10:232 rw" not in unit_show(host, scope, "DeviceAllow")["DeviceAllow"]
    r = host.mctl("shell", name, "--", "sh", "-c", "mknod /root/k c 10 232; head -c0 /root/k")
    assert r.returncode != 0 and "not permitted" in r.stderr, r.stderr
    host.ok("poweroff", name)
    assert_nothing_left(host, name)


def test_killed_supervisor_or_mctl_never_blocks_the_next_start(host: Host, inner: Inner) -> None:
    name = inner.busybox()
    host.ok("start", name)
    host.sh(f"kill -9 {json.loads(host.ok('show', name, '-o', 'json'))['Supervisor']}")
    # Its D-Bus helper sees it go and unregisters the machine; the scope empties and goes.
    assert _wait(lambda: name not in machinectl_list(host) and not host.sh(
        f"systemctl list-units --all --no-legend 'machine-{name}.scope'").strip(), 10)
    host.ok("list")  # and the next mctl call removes the state it left
    assert_nothing_left(host, name)
    for _ in range(2):
        host.ok("start", name)
        first = json.loads(host.ok("show", name, "-o", "json"))
        host.sh(f"kill -9 {first['Supervisor']}")
        host.ok("start", name)  # at once: the dead supervisor's scope and registration are out of the way
        now = json.loads(host.ok("show", name, "-o", "json"))
        assert now["Leader"] != first["Leader"] and int(machinectl_show(host, name)["Leader"]) == now["Leader"]
        units = host.sh(f"systemctl list-units --all --no-legend 'machine-{name}*'")
        assert len(units.strip().splitlines()) == 1, units
        host.ok("terminate", name)
    # mctl start killed at any point: either the machine runs or nothing of it is left.
    for delay in ("0.01", "0.05", "0.1", "0.2", "0.4"):
        host.sh(f"mctl start {name} & pid=$!; sleep {delay}; kill -9 $pid; wait $pid", check=False)
        # Its supervisor, if it got that far, runs the machine or tears it down (it lost its caller).
        assert _wait(lambda: host.mctl("terminate", name).returncode != 0 and gone(host, name), 30)
        host.ok("start", name)
        assert list(machinectl_list(host)).count(name) == 1
        host.ok("terminate", name)
        assert _wait(lambda: gone(host, name), 10)


def test_errors_are_one_line_and_leave_nothing(host: Host, inner: Inner) -> None:
    name = inner.busybox()
    # No system bus.
    r = host.mctl("start", name, environ={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mctl: Failed to connect to the system bus") and "Traceback" not in r.stderr
    assert_nothing_left(host, name)
    # The name is taken by another manager's registration.
    host.sh(f"systemd-run --quiet --unit=foreign-{name} sleep 600")
    pid = host.sh(f"systemctl show -p MainPID --value foreign-{name}").strip()
    host.sh(f"busctl call org.freedesktop.machine1 /org/freedesktop/machine1 org.freedesktop.machine1.Manager "
            f"RegisterMachine sayssus {name} 0 other container {pid} /")
    try:
        r = host.mctl("start", name)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "systemd-machined" in r.stderr and "already" in r.stderr, r.stderr
        assert machinectl_show(host, name)["Service"] == "other"  # theirs, untouched
        assert name not in host.running()
        assert not host.sh(f"systemctl list-units --all --no-legend 'machine-{name}.scope'").strip()
    finally:
        host.sh(f"systemctl stop foreign-{name}; machinectl terminate {name}", check=False)
    assert _wait(lambda: gone(host, name), 10)
    # systemd-machined cannot be reached.
    host.sh("systemctl mask --runtime --now systemd-machined.service")
    try:
        r = host.mctl("start", name)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"register {name} with systemd-machined" in r.stderr, r.stderr
        assert_nothing_left(host, name, machined=False)
    finally:
        host.sh("systemctl unmask --runtime systemd-machined.service")
    host.ok("start", name)  # machined is activated on demand again
    assert name in machinectl_list(host)


def test_run_is_registered_too(host: Host, inner: Inner) -> None:
    name = inner.busybox()
    # As PID 1 of its namespace the payload gets only signals it handles: this one ends on SIGTERM.
    host.sh(f"mctl run {name} -- /bin/sh -c 'trap \"exit 0\" TERM; sleep 30 & wait' >/dev/null 2>&1 &")
    assert _wait(lambda: name in machinectl_list(host), 10)
    assert machinectl_show(host, name)["Unit"] == f"machine-{name}.scope"
    host.run("machinectl", "terminate", name, check=True)
    assert _wait(lambda: gone(host, name), 5)
    assert host.mctl("run", name, "--", "/bin/sh", "-c", "exit 7").returncode == 7
    assert_nothing_left(host, name)


def test_cgroupfs_path_when_forced(host: Host, inner: Inner) -> None:
    name = inner.busybox()
    host.mctl("start", name, environ={"MACHINED_SYSTEMD": "no"})
    assert name in host.running() and name not in machinectl_list(host)
    state = json.loads(host.sh(f"cat /run/machined/machines/{name}/state.json"))
    assert "systemd" not in state and not state["cgroup"].get("delegated")
    host.ok("terminate", name)
    assert_nothing_left(host, name)


def test_enable_then_host_reboot_starts_the_machine(host: Host, inner: Inner) -> None:
    """Last in this module: it reboots the host."""
    name = inner.busybox("en-")  # a '-' is escaped in the unit name: machined@en\x2d....service
    unit = "machined@" + name.replace("-", "\\x2d") + ".service"
    out = host.ok("enable", name)
    assert f"/etc/systemd/system/machines.target.wants/{unit}" in out
    assert host.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
    host.reboot()
    assert _wait(lambda: name in host.running(), 60)
    assert host.run("systemctl", "is-active", unit).stdout.strip() == "active"
    main_pid = int(host.sh(f"systemctl show -p MainPID --value '{unit}'"))
    assert json.loads(host.ok("show", name, "-o", "json"))["Supervisor"] == main_pid
    assert machinectl_show(host, name)["Unit"] == "machine-" + name.replace("-", "\\x2d") + ".scope"
    # Stopping the service is a clean poweroff, and a success.
    host.run("systemctl", "stop", unit, check=True, timeout=60)
    assert gone(host, name)
    assert unit_show(host, unit, "Result", "ActiveState") == {"Result": ["success"], "ActiveState": ["inactive"]}
    host.ok("disable", name)
    assert host.run("systemctl", "is-enabled", unit).stdout.strip() == "disabled"
