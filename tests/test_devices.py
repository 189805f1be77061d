"""Device allowlists, runtime passthrough and udev hotplug, for real: loop devices set up with losetup,
busybox machines, the kernel's devices cgroup (v1) and BPF device programs (v2, forced layout)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import TOKEN, Env
from tests.test_bad_input import assert_clean_error, assert_settings_refused

pytestmark = pytest.mark.root

LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81


def _attach(backing: Path, device: str = "-f") -> str:
    args = ["losetup", "--show", device, str(backing)] if device == "-f" else ["losetup", device, str(backing)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    return out or device


def _detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], capture_output=True)


def _loop_ctl(request: int, number: int) -> None:
    fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, number)
    finally:
        os.close(fd)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Callable[[], tuple[str, Path]]]:
    """Make loop devices on backing files named with TOKEN; every one is detached, however the test ends."""
    made: list[str] = []

    def make() -> tuple[str, Path]:
        backing = tmp_path / f"loop{TOKEN}-{len(made)}.img"
        backing.write_bytes(b"\0" * (1 << 20))
        device = _attach(backing)
        made.append(device)
        return device, backing

    try:
        yield make
    finally:
        for device in made:
            _detach(device)


@pytest.fixture
def loop_slot() -> Iterator[int]:
    """A loop device number no device has yet: the test makes the device appear (losetup) and go."""
    for _ in range(50):
        number = int.from_bytes(os.urandom(3), "little") % 900_000 + 100_000
        if not os.path.exists(f"/sys/devices/virtual/block/loop{number}"):
            break
    try:
        yield number
    finally:
        _detach(f"/dev/loop{number}")
        try:
            _loop_ctl(LOOP_CTL_REMOVE, number)
        except OSError as e:
            assert e.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT), e


def _minor(device: str) -> int:
    return os.minor(os.stat(device).st_rdev)


def _devices(env: Env, name: str) -> dict[str, str]:
    """path -> origin, from the machine's device list as show reports it."""
    status = env.ok("status", name)
    line = next((ln.split(":", 1)[1] for ln in status.splitlines() if ln.strip().startswith("Devices:")), "")
    result = {}
    for item in line.split(", "):
        words = item.split()
        if words and words[0].startswith("/dev/"):
            result[words[0]] = words[-1]
    return result


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _denied(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode != 0 and "Operation not permitted" in r.stderr


def check_allowlist_and_bind(env: Env, loops: Callable[[], tuple[str, Path]], layout: str | None) -> None:
    """The device tests proper, for one cgroup layout."""
    extra = {"MACHINED_CGROUP_LAYOUT": layout} if layout else {}
    (a, a_file), (b, b_file) = loops(), loops()
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.settings(name, f'\n[devices]\nallow = ["{a} rw"]\n')
    r = env.mctl("start", name, env=env.environ(**extra))
    assert r.returncode == 0, r.stderr
    # The allowed node is there, with the host's mode, and reads and writes reach the host's device.
    st = os.stat(a)
    ls = env.ok("shell", name, "--", "ls", "-ln", a).split()
    assert ls[0] == "brw-------" and ls[2:4] == [str(st.st_uid), str(st.st_gid)], ls
    env.ok("shell", name, "--", "sh", "-c", f"echo written-inside-{TOKEN} | dd of={a} conv=notrunc 2>/dev/null")
    subprocess.run(["sync"], check=True)
    assert a_file.read_bytes().startswith(f"written-inside-{TOKEN}".encode())
    assert env.ok("shell", name, "--", "head", "-c", "14", a) == "written-inside"
    assert _devices(env, name) == {a: "config"}
    # A node of a device not on the list, made inside (in /dev: the rootfs may be nodev), cannot be opened.
    mb = _minor(b)
    assert env.mctl("shell", name, "--", "mknod", "/dev/other", "b", "7", str(mb)).returncode == 0
    assert _denied(env.mctl("shell", name, "--", "head", "-c1", "/dev/other"))
    assert _denied(env.mctl("shell", name, "--", "sh", "-c", "echo x > /dev/other"))
    # Bound at runtime, read-only: usable without a restart, reads only; unbound: unusable again.
    leader = json.loads(env.ok("show", name, "-o", "json"))["Leader"]
    b_file.write_bytes(f"host-data-{TOKEN}".encode().ljust(1 << 20, b"\0"))
    subprocess.run(["blockdev", "--flushbufs", b], check=True)
    env.ok("bind-device", name, b, "--access", "r")
    assert env.ok("shell", name, "--", "head", "-c", "9", b) == "host-data"
    assert env.ok("shell", name, "--", "head", "-c", "9", "/dev/other") == "host-data"
    assert _denied(env.mctl("shell", name, "--", "sh", "-c", f"echo x > {b}"))
    assert _devices(env, name) == {a: "config", b: "bind"}
    env.ok("bind-device", name, b)  # again, now read-write
    env.ok("shell", name, "--", "sh", "-c", f"echo rw | dd of={b} conv=notrunc 2>/dev/null")
    env.ok("unbind-device", name, b)
    assert env.mctl("shell", name, "--", "test", "-e", b).returncode == 1
    assert _denied(env.mctl("shell", name, "--", "head", "-c1", "/dev/other"))
    assert env.ok("shell", name, "--", "head", "-c", "14", a) == "written-inside"  # the other one stays
    assert _devices(env, name) == {a: "config"}
    # Bound devices come back after a guest reboot (same cgroup, fresh /dev).
    env.ok("bind-device", name, b, "--access", "rw")
    env.ok("reboot", name, timeout=30)
    assert json.loads(env.ok("show", name, "-o", "json"))["Leader"] != leader
    assert env.ok("shell", name, "--", "head", "-c", "2", b) == "rw"
    assert env.ok("shell", name, "--", "head", "-c", "14", a) == "written-inside"
    env.ok("poweroff", name)


def test_allowlist_and_runtime_bind_v1(env: Env, loops: Callable[[], tuple[str, Path]]) -> None:
    check_allowlist_and_bind(env, loops, None)


def test_allowlist_and_runtime_bind_v2_bpf(env: Env, loops: Callable[[], tuple[str, Path]]) -> None:
    """The same on the v2 path (a BPF device program on the scope, replaced at each change)."""
    check_allowlist_and_bind(env, loops, "unified")


def test_device_class(env: Env, loops: Callable[[], tuple[str, Path]]) -> None:
    (a, a_file) = loops()
    a_file.write_bytes(b"class-ok".ljust(1 << 20, b"\0"))
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.settings(name, '\n[devices]\nallow = ["block-loop r"]\n')
    env.ok("start", name)
    env.ok("shell", name, "--", "mknod", "/dev/anyloop", "b", "7", str(_minor(a)))
    assert env.ok("shell", name, "--", "head", "-c", "8", "/dev/anyloop") == "class-ok"
    assert _denied(env.mctl("shell", name, "--", "sh", "-c", "echo x > /dev/anyloop"))
    assert "b 7:* r config" in env.ok("status", name)
    env.ok("poweroff", name)


@pytest.mark.parametrize("layout", [None, "unified"])
def test_hotplug_in_and_out(env: Env, loop_slot: int, tmp_path: Path, layout: str | None) -> None:
    extra = {"MACHINED_CGROUP_LAYOUT": layout} if layout else {}
    node = f"/dev/loop{loop_slot}"
    backing = tmp_path / f"hot{TOKEN}.img"
    backing.write_bytes(b"hotplugged".ljust(1 << 20, b"\0"))
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    # Matched on the kernel's uevent property DEVNAME (udev's spelling, with /dev): only this test's device.
    env.settings(name, f'\n[devices]\nhotplug = ["subsystem=block devtype=disk DEVNAME={node} access=rw"]\n')
    r = env.mctl("start", name, env=env.environ(**extra))
    assert r.returncode == 0, r.stderr
    assert env.mctl("shell", name, "--", "test", "-e", node).returncode == 1
    _attach(backing, node)  # losetup creates the device: the kernel sends "add"
    assert _wait(lambda: env.mctl("shell", name, "--", "test", "-b", node).returncode == 0), env.ok("status", name)
    assert _wait(lambda: env.mctl("shell", name, "--", "head", "-c", "10", node).stdout == "hotplugged")
    env.ok("shell", name, "--", "sh", "-c", f"echo HOT | dd of={node} conv=notrunc 2>/dev/null")
    assert _devices(env, name) == {node: "hotplug"}
    _detach(node)
    _loop_ctl(LOOP_CTL_REMOVE, loop_slot)  # the device goes: "remove"
    assert _wait(lambda: env.mctl("shell", name, "--", "test", "-e", node).returncode == 1)
    assert _devices(env, name) == {}
    assert backing.read_bytes().startswith(b"HOT")
    # The number is no longer allowed: a node of it made inside cannot be opened.
    env.ok("shell", name, "--", "mknod", "/dev/again", "b", "7", str(loop_slot))
    assert _denied(env.mctl("shell", name, "--", "head", "-c1", "/dev/again"))
    env.ok("poweroff", name)
    log = (env.runtime / "logs" / f"{name}.log")
    assert "passed in" in log.read_text() and "hotplug of" not in log.read_text()


def test_hotplug_device_present_at_start(env: Env, loop_slot: int, tmp_path: Path) -> None:
    node = f"/dev/loop{loop_slot}"
    backing = tmp_path / f"pre{TOKEN}.img"
    backing.write_bytes(b"present".ljust(1 << 20, b"\0"))
    _attach(backing, node)
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.settings(name, f'\n[devices]\nhotplug = ["kernel=loop{loop_slot} access=r"]\n')
    env.ok("start", name)
    assert env.ok("shell", name, "--", "head", "-c", "7", node) == "present"
    assert _denied(env.mctl("shell", name, "--", "sh", "-c", f"echo x > {node}"))
    env.ok("poweroff", name)


# --- bad input: a clear one-line error, nothing changed ----------------------------------------

@pytest.mark.parametrize("entry, words", [
    ('"/dev/nonexistent-device rw"', ("devices.allow", "/dev/nonexistent-device", "No such file")),
    ('"/dev/net"', ("devices.allow", "not a device node")),
    ('"char-no_such_driver"', ("devices.allow", "no_such_driver", "/proc/devices")),
])
def test_bad_device_settings_at_start(env: Env, entry: str, words: tuple[str, ...]) -> None:
    assert_settings_refused(env, f"\n[devices]\nallow = [{entry}]\n", *words)


@pytest.mark.parametrize("body, words", [
    ('allow = ["/etc/passwd"]', ("not a device node path below /dev",)),
    ('allow = ["/dev/null xyz"]', ("access 'xyz'",)),
    ('allow = ["/dev/../etc/shadow"]', ("not a device node path",)),
    ('allow = ["c 1:x rwm"]', ("device rule",)),
    ('hotplug = ["subsystem"]', ("KEY=VALUE",)),
    ('hotplug = ["colour=blue"]', ("unknown key 'colour'",)),
    ('hotplug = ["kernel=loop1 access=q"]', ("access 'q'",)),
])
def test_bad_device_settings_refused(env: Env, body: str, words: tuple[str, ...]) -> None:
    assert_settings_refused(env, f"\n[devices]\n{body}\n", "Invalid configuration", *words, verbs=("start", "show"))


def test_bad_bind_requests(env: Env, loops: Callable[[], tuple[str, Path]]) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    (a, _) = loops()
    before = env.tree()
    assert_clean_error(env.mctl("bind-device", name, a), "not running")
    assert env.tree() == before
    env.ok("start", name)

    before = env.tree(name)
    assert_clean_error(env.mctl("bind-device", name, "/dev/nonexistent-device"), "No such file")
    assert_clean_error(env.mctl("bind-device", name, "/etc/passwd"), "below /dev")
    assert_clean_error(env.mctl("bind-device", name, "/dev/net"), "not a device node")
    assert_clean_error(env.mctl("bind-device", name, a, "--access", "rx"), "access")
    assert_clean_error(env.mctl("unbind-device", name, a), "not passed in")
    assert_clean_error(env.mctl("bind-device", "../x", a), "Invalid machine name")
    assert env.tree(name) == before
    assert env.mctl("shell", name, "--", "test", "-e", a).returncode == 1
    env.ok("poweroff", name)
