"""Teardown on every path: poweroff, init crash, SIGKILL of the supervisor, failure halfway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env

pytestmark = pytest.mark.root


def _cgroups(name: str) -> list[str]:
    found = []
    for top in Path("/sys/fs/cgroup").iterdir():
        d = top / "machine.slice" / f"machine-{name}.scope"
        if d.exists():
            found.append(str(d))
    return found


def _mounts_mentioning(text: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if text in line]


def _state(env: Env, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((env.runtime / "machines" / name / "state.json").read_text())
    return data


def _wait(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def assert_nothing_left(env: Env, name: str) -> None:
    assert _cgroups(name) == []
    assert _mounts_mentioning(str(env.base)) == []
    assert not (env.runtime / "machines" / name).exists()
    assert not (env.runtime / "locks" / name).exists()


def test_supervisor_killed_leaves_nothing_after_next_call(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    data = _state(env, name)
    sup = data["supervisor"]["pid"]
    leader = data["leader"]["pid"]
    os.kill(sup, signal.SIGKILL)
    # The machine dies with its supervisor (parent-death signal): no orphaned init keeps running.
    assert _wait(lambda: not os.path.exists(f"/proc/{leader}") or
                 open(f"/proc/{leader}/stat").read().split()[2] == "Z")
    # The next mctl call detects the dead supervisor and cleans up.
    assert json.loads(env.ok("list", "-o", "json")) == []
    assert_nothing_left(env, name)
    env.ok("start", name)  # the name is free again
    env.ok("poweroff", name)
    assert_nothing_left(env, name)


def test_supervisor_killed_while_it_makes_the_cgroup(env: Env) -> None:
    """The supervisor records the machine's cgroup before it makes it (its child builds the root
    meanwhile): killed in between, it leaves nothing that the next call does not clean up."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    code = ("import os, subprocess, sys; from machined import cgroups, paths, state; name = sys.argv[1]; "
            "gone = subprocess.Popen(['sleep', '60']); ref = state.proc_ref(gone.pid); gone.kill(); gone.wait(); "
            "os.makedirs(paths.machine_runtime_dir(name)); "
            "state.write(name, {'name': name, 'supervisor': ref, 'state': 'starting', "
            "'cgroup': cgroups.planned(name).to_state()}); "
            "cgroups.create(name)")
    subprocess.run([sys.executable, "-c", code, name], env=env.environ(), check=True, timeout=60)
    assert _cgroups(name) and (env.runtime / "machines" / name / "state.json").exists()
    assert json.loads(env.ok("list", "-o", "json")) == []
    assert_nothing_left(env, name)


def test_init_crash(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    leader = _state(env, name)["leader"]["pid"]
    os.kill(leader, signal.SIGKILL)  # init dies: the whole machine ends
    assert _wait(lambda: env.running() == [])
    assert_nothing_left(env, name)


def test_failure_halfway_through_start(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    # Make the mount of /dev fail after cgroups, pty and /proc are set up: a file where /dev should be.
    rootfs = env.images / name
    os.rmdir(rootfs / "dev")
    (rootfs / "dev").write_text("not a directory")
    r = env.mctl("start", name)
    assert r.returncode != 0 and "/dev" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert_nothing_left(env, name)
    assert env.running() == []


def test_stale_state_is_cleaned_by_start(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    data = _state(env, name)
    os.kill(data["supervisor"]["pid"], signal.SIGKILL)
    time.sleep(0.2)
    env.ok("start", name)  # start itself cleans up and starts anew
    assert env.running() == [name]
    assert _state(env, name)["supervisor"] != data["supervisor"]
    env.ok("poweroff", name)
    assert_nothing_left(env, name)


def test_many_cycles_leave_nothing(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    for _ in range(10):
        env.ok("start", name)
        env.ok("terminate", name)
    assert_nothing_left(env, name)
