"""A Debian bookworm rootfs with systemd boots to 'running' and powers off cleanly."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Env, copy_tree

pytestmark = pytest.mark.slow


def wait_running(env: Env, name: str) -> subprocess.CompletedProcess[str]:
    """systemctl is-system-running --wait, once systemd listens: right after its exec, it does not yet."""
    deadline = time.monotonic() + 30
    while True:
        r = env.mctl("shell", name, "--", "systemctl", "is-system-running", "--wait", timeout=120)
        if r.stdout.strip() or "Failed to connect to bus" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_debian_boots_to_running_and_powers_off(env: Env, debian_rootfs: Path) -> None:
    name = env.name("deb")
    env.images.mkdir(parents=True, exist_ok=True)
    copy_tree(debian_rootfs, env.images / name)
    start = time.monotonic()
    env.ok("start", name)
    state = wait_running(env, name)
    booted = time.monotonic() - start
    assert state.stdout.strip() == "running", state.stdout + env.ok("shell", name, "--", "systemctl", "--failed")
    assert booted < 30
    info = json.loads(env.ok("show", name, "-o", "json"))
    assert info["Init"] == "systemd" and info["OS"] == "debian" and info["OSVersion"] == "12"
    assert env.ok("shell", name, "--", "cat", "/proc/1/comm").strip() == "systemd"
    assert env.ok("shell", name, "--", "hostname").strip() == name
    # systemd took the machine's id from container_uuid and committed it to the image.
    machine_id = env.ok("shell", name, "--", "cat", "/etc/machine-id").strip()
    assert machine_id == info["Id"]
    env.ok("reboot", name, timeout=60)
    assert wait_running(env, name).stdout.strip() == "running"
    env.ok("poweroff", name, timeout=60)
    assert env.running() == []
    log = (env.runtime / "logs" / f"{name}.log").read_text(errors="replace")
    assert "Powering off." in log and "[machined: init ended: killed by SIGINT]" in log
    assert (env.images / name / "etc/machine-id").read_text().strip() == machine_id
