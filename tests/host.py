"""A real systemd host for the suite, booted as a machine of its own (DESIGN.md, Tests).

This machine's PID 1 is not systemd, so the systemd tests boot a Debian bookworm with systemd,
dbus, systemd-container, python3 and busybox-static (cached under the test cache, keyed by what
went into it) as a machine with `nesting = true`, this checkout and its Python dependencies
(`pip install --target`, cached, keyed by the requirements) bound in read-only and the cached
Debian rootfs at /srv/debian for guests. Inside it, /usr/local/bin/mctl runs this checkout,
machined@.service is installed as install.sh installs it, and the real systemd, systemd-machined
and machinectl are the oracle. Also used by benchmarks/bench_systemd.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.conftest import DEBIAN_MIRROR, DEBIAN_PACKAGES, REPO, TOKEN, Env, build_debian, cached_tree, copy_tree

# libnftables1: the machines inside are bridged, as by default (NAT and forwards through libnftables).
HOST_EXTRA = ("systemd-container", "python3", "busybox-static", "libnftables1")
SRC = "/opt/machined"          # this checkout, read-only
DEPS = "/opt/machined-deps"    # its Python dependencies, read-only
DEBIAN = "/srv/debian"         # the pristine Debian rootfs guests are copied from, read-only
MCTL = "/usr/local/bin/mctl"


def host_image() -> Path:
    return cached_tree(("systemd-host", "v1", DEBIAN_MIRROR, *DEBIAN_PACKAGES, *HOST_EXTRA),
                       lambda path: build_debian(path, extra=HOST_EXTRA))


def python_deps() -> Path:
    """The package's runtime dependencies, installed for the host's python3 (the same 3.11 as ours)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        requirements = tuple(tomllib.load(f)["project"]["dependencies"])

    def install(path: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--target", str(path), *requirements], check=True, timeout=600)

    return cached_tree(("pydeps", sys.version, *requirements), install)


def debian_guest_image() -> Path:
    return cached_tree(("debian-bookworm", "v2", DEBIAN_MIRROR, *DEBIAN_PACKAGES), build_debian)


class Host:
    """The booted systemd host: run commands in it, as root, through `mctl shell`."""

    def __init__(self, env: Env, name: str) -> None:
        self.env = env
        self.name = name

    def run(self, *cmd: str, timeout: float = 120, check: bool = False,
            environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        prefix = ["env", *(f"{k}={v}" for k, v in environ.items())] if environ else []
        r = self.env.mctl("shell", self.name, "--", *prefix, *cmd, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in the host: {' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> str:
        return self.run("sh", "-c", script, timeout=timeout, check=check).stdout

    def mctl(self, *args: str, timeout: float = 120, environ: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        return self.run(MCTL, *args, timeout=timeout, environ=environ)

    def ok(self, *args: str, timeout: float = 120) -> str:
        r = self.mctl(*args, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"in the host: mctl {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r.stdout

    def running(self) -> list[str]:
        return sorted(m["machine"] for m in json.loads(self.ok("list", "-o", "json")))

    def wait_booted(self, timeout: float = 90) -> None:
        """Until systemd in the host says running (its bus may not answer at first)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.run("systemctl", "is-system-running", "--wait", timeout=timeout)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.1)
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend").stdout
            raise AssertionError(f"the systemd host did not boot to running ({state!r}); failed units: {failed}")

    def reboot(self) -> None:
        self.env.ok("reboot", self.name, timeout=120)
        self.wait_booted()


def prepare(env: Env) -> Host:
    """Copy the cached host image, install mctl and the units into it, and configure it."""
    name = f"sdh{TOKEN}{os.urandom(2).hex()}"
    env.names.append(name)
    image, deps, debian = host_image(), python_deps(), debian_guest_image()
    # The checkout is read-only inside: compile it here, or every mctl there would compile it anew.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "machined")], check=True,
                   stdout=subprocess.DEVNULL)
    env.images.mkdir(parents=True, exist_ok=True)
    root = env.images / name
    copy_tree(image, root)
    (root / MCTL.lstrip("/")).write_text(
        f'#!/bin/sh\nPYTHONPATH={SRC}:{DEPS} exec /usr/bin/python3 -m machined "$@"\n')
    (root / MCTL.lstrip("/")).chmod(0o755)
    unitdir = root / "usr/local/lib/systemd/system"
    unitdir.mkdir(parents=True, exist_ok=True)
    for unit in sorted((REPO / "units").iterdir()):  # what install.sh does
        (unitdir / unit.name).write_text(unit.read_text().replace("@MCTL@", MCTL))
    env.config.mkdir(parents=True, exist_ok=True)
    binds = [f"{REPO}:{SRC}:ro", f"{deps}:{DEPS}:ro", f"{debian}:{DEBIAN}:ro"]
    (env.config / f"{name}.toml").write_text(
        f'[machine]\nid = "{os.urandom(16).hex()}"\nnesting = true\nkill_timeout = 20\n'
        f"bind = {json.dumps(binds)}\n"
        # Loopback only: no bridge of a fixed name on this machine; the machines inside get theirs.
        '[network]\nmode = "none"\n'
        # One device beyond the default list, for guests inside to be allowed (a v1 child cgroup can
        # allow no more than its parent).
        '[devices]\nallow = ["c 10:232 rwm", "c 1:11 r"]\n')
    return Host(env, name)


def boot(env: Env) -> Host:
    host = prepare(env)
    env.ok("start", host.name)
    host.wait_booted()
    return host
