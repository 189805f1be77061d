"""cgroups without systemd: the v1 hybrid layout of this host and the v2 unified layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Env

pytestmark = pytest.mark.root


def _scopes(name: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/**/machine.slice/machine-{name}.scope")]


def test_hybrid_layout_every_hierarchy(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    info = json.loads(env.ok("show", name, "-o", "json"))
    leader = info["Leader"]
    own = Path(f"/proc/{leader}/cgroup").read_text()
    # In every hierarchy the machine's init sits in its scope's payload cgroup.
    for line in own.splitlines():
        _, _keys, path = line.split(":", 2)
        assert path.endswith(f"machine-{name}.scope/payload"), line
    # Inside, the cgroup namespace shows the payload as the root, controllers read-only.
    inner = env.ok("shell", name, "--", "cat", "/proc/1/cgroup")
    assert all(line.endswith(":/") for line in inner.splitlines()), inner
    mounts = env.ok("shell", name, "--", "cat", "/proc/self/mounts")
    cg = {line.split()[1]: line.split()[3] for line in mounts.splitlines() if "/sys/fs/cgroup" in line}
    assert cg["/sys/fs/cgroup/memory"].startswith("ro") and cg["/sys/fs/cgroup/systemd"].startswith("rw")
    assert cg["/sys/fs/cgroup/unified"].startswith("rw")
    devices = (Path("/sys/fs/cgroup/devices") / _devices_rel(name) / "devices.list").read_text()
    assert "c 1:3 rwm" in devices and "c *:* m" in devices and "a *:* rwm" not in devices
    env.ok("poweroff", name)
    assert _scopes(name) == []


def _devices_rel(name: str) -> str:
    for p in Path("/sys/fs/cgroup/devices").rglob(f"machine-{name}.scope"):
        return str(p.relative_to("/sys/fs/cgroup/devices"))
    raise AssertionError("no devices cgroup")


def test_unified_layout_with_bpf_device_policy(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    unified = env.environ(MACHINED_CGROUP_LAYOUT="unified")
    r = env.mctl("start", name, env=unified)
    assert r.returncode == 0, r.stderr
    scopes = _scopes(name)
    assert [p.parts[4] for p in scopes] == ["unified"], scopes
    mounts = env.mctl("shell", name, "--", "cat", "/proc/self/mounts", env=unified).stdout
    assert "cgroup2 /sys/fs/cgroup cgroup2 rw" in mounts
    inner = env.mctl("shell", name, "--", "cat", "/proc/1/cgroup", env=unified).stdout
    assert "0::/" in inner.splitlines(), inner  # the v2 payload is the machine's cgroup root
    # The BPF device program allows the API nodes and mknod, denies opening anything else.
    r = env.mctl("shell", name, "--", "sh", "-c", "head -c3 /dev/zero | wc -c", env=unified)
    assert r.stdout.strip() == "3", r.stderr
    r = env.mctl("shell", name, "--", "sh", "-c", "mknod /root/mem c 1 1 && head -c1 /root/mem", env=unified)
    assert r.returncode != 0 and "not permitted" in r.stderr.lower(), r.stderr
    r = env.mctl("shell", name, "--", "sh", "-c", "mknod /root/loop0 b 7 0 && head -c1 /root/loop0", env=unified)
    assert r.returncode != 0 and "not permitted" in r.stderr.lower(), r.stderr
    env.ok("poweroff", name)
    assert _scopes(name) == []
