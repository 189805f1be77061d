"""Shared fixtures: per-test directories, an mctl runner, cached Debian rootfs, host leak check.

Every test runs mctl as a subprocess (as a user would) against its own image/config/runtime/cache
directories, with machine names of its own, and the session checks that the host's mounts,
cgroups, links and nft rules are the same after the suite as before it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = os.geteuid() == 0
# Everything this test session creates on the host (machine names, links, netns, nft tables) carries
# this token, so concurrent sessions on one machine neither collide nor see each other's objects.
TOKEN = os.environ.get("MACHINED_TEST_TOKEN") or os.urandom(2).hex()
IN_CI = os.environ.get("CI") == "true"
REPO = Path(__file__).resolve().parent.parent
# mctl runs as an installed mctl would, by its script and without site: site's editable-install hook
# (and -m's runpy) would load modules (warnings, re, ...) that an installed mctl does not have, and so
# hide an import missing from a child that can import nothing (spawn.seal_imports). The checkout and
# the venv's packages are on the path.
MCTL = [sys.executable, "-S", str(REPO / "bin" / "mctl")]
PYTHONPATH = os.pathsep.join([str(REPO), *site.getsitepackages()])
TEST_CACHE = Path(os.environ.get("MACHINED_TEST_CACHE", "/var/cache/machined-tests"))
DEBIAN_MIRROR = os.environ.get("MACHINED_TEST_MIRROR", "http://deb.debian.org/debian")


def free_subnet(exclude: tuple[str, ...] = ()) -> str:
    """A random 10.x.y.0/24 that no route of the host's covers (nor exclude): for bridges and links of tests."""
    import ipaddress
    import json

    try:
        routes = json.loads(subprocess.run(["ip", "-j", "route", "show", "table", "all"], capture_output=True,
                                           text=True).stdout or "[]")
    except (OSError, ValueError):
        routes = []
    used = [ipaddress.ip_network(e) for e in exclude]
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default" and ":" not in dst:
            used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    while True:
        net = ipaddress.ip_network(f"10.{100 + os.urandom(1)[0] % 150}.{os.urandom(1)[0]}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)


# Every machine a test boots is on this session's own bridge (machines are bridged by default): its
# name carries TOKEN, its subnet is random, it is host-only (no NAT: nothing leaves this machine)
# and it goes away with its last machine.
SESSION_BRIDGE = f"mb{TOKEN}"
SESSION_SUBNET = free_subnet()


def host_config(bridge: str = SESSION_BRIDGE, subnet: str = SESSION_SUBNET, hosts_file: str = "",
                extra: str = "") -> str:
    return (f'[network]\ndefault_bridge = "{bridge}"\nhosts_file = "{hosts_file}"\n\n'
            f'[network.bridges.{bridge}]\nsubnet = "{subnet}"\nnat = false\nkeep = false\n{extra}')


def require_root() -> None:
    """Root tests fail rather than skip under CI=true: a skipped root test there proves nothing."""
    if ROOT:
        return
    if IN_CI:
        pytest.fail("this test needs root and CI=true: it must run")
    pytest.skip("needs root (runs in CI)")  # not under CI: a developer's unprivileged run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and (item.get_closest_marker("root") or item.get_closest_marker("slow")):
            item.fixturenames.insert(0, "_needs_root")


@pytest.fixture
def _needs_root() -> None:
    require_root()


@dataclass
class Env:
    """One test's world: its own directories and names; mctl runs against them."""

    base: Path
    names: list[str] = field(default_factory=list)

    @property
    def images(self) -> Path:
        return self.base / "images"

    @property
    def config(self) -> Path:
        return self.base / "config"

    @property
    def runtime(self) -> Path:
        return self.base / "run"

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    @property
    def hosts_file(self) -> Path:
        """The host's hosts file as the manager sees it (a test's own, never /etc/hosts)."""
        return self.base / "hosts"

    def environ(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "MACHINED_IMAGE_DIR": str(self.images), "MACHINED_CONFIG_DIR": str(self.config),
            "MACHINED_RUNTIME_DIR": str(self.runtime), "MACHINED_CACHE_DIR": str(self.cache),
            "PYTHONPATH": PYTHONPATH,
        })
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra)
        return env

    def name(self, prefix: str = "t") -> str:
        """A machine name no other test (or concurrent run) uses; it contains TOKEN."""
        n = f"{prefix}{TOKEN}{os.urandom(3).hex()}"
        self.names.append(n)
        return n

    def ifname(self, prefix: str = "b") -> str:
        """A network interface (or bridge, netns) name of at most 15 characters containing TOKEN."""
        return f"{prefix}{TOKEN}{os.urandom(2).hex()}"[:15]

    def mctl(self, *args: str, check: bool = False, timeout: float = 120, input: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*MCTL, *args], env=env or self.environ(), text=True,
            capture_output=True, timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"mctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    def ok(self, *args: str, timeout: float = 120) -> str:
        return self.mctl(*args, check=True, timeout=timeout).stdout

    def settings(self, name: str, text: str) -> None:
        """Append text to machine name's settings file."""
        with open(self.config / f"{name}.toml", "a") as f:
            f.write(text)

    def tree(self, *running: str) -> dict[str, tuple[int, int, int]]:
        """Everything under the test's directories: path -> (mode, size, mtime_ns); to show nothing changed.
        What running machines write themselves (their root file systems, console logs) is left out."""
        result: dict[str, tuple[int, int, int]] = {}
        skip = {str(self.images / n) for n in running} | {str(self.runtime / "logs" / f"{n}.log") for n in running}
        for top in (self.images, self.config, self.runtime, self.cache):
            if not top.exists():
                continue
            for dirpath, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skip]
                files = [f for f in files if os.path.join(dirpath, f) not in skip]
                for f in dirs + files:
                    p = os.path.join(dirpath, f)
                    st = os.lstat(p)
                    # A directory's own mtime only says an entry came and went (a lock); entries count.
                    mtime = 0 if f in dirs else st.st_mtime_ns
                    result[p] = (st.st_mode, st.st_size if f in files else 0, mtime)
        return result

    def running(self) -> list[str]:
        d = self.runtime / "machines"
        return sorted(os.listdir(d)) if d.exists() else []

    def cleanup(self) -> None:
        for name in self.running():
            self.mctl("terminate", name, timeout=30)
        for name in self.running():
            # Last resort: a supervisor that does not answer.
            statefile = self.runtime / "machines" / name / "state.json"
            try:
                import json

                data = json.loads(statefile.read_text())
                os.kill(int(data["supervisor"]["pid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.05)
        self.mctl("list")  # cleans what a killed supervisor left


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    e.config.mkdir(parents=True)
    (e.config / "machined.conf").write_text(host_config(hosts_file=str(e.hosts_file)))
    try:
        yield e
    finally:
        if ROOT:
            e.cleanup()
        leftovers = [n for n in e.names if any(_cgroup_dirs_named(n))]
        assert not leftovers, f"cgroups left behind for {leftovers}"


def _cgroup_dirs_named(name: str) -> Iterator[str]:
    for top in Path("/sys/fs/cgroup").iterdir():
        slice_dir = top / "machine.slice"
        if (slice_dir / f"machine-{name}.scope").exists():
            yield str(slice_dir / f"machine-{name}.scope")


# --- the host must look the same after the suite ------------------------------------------------

def _host_snapshot() -> dict[str, object]:
    """What this session may leave on the host: everything carrying its TOKEN."""
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f if TOKEN in line)
    cgroups = []
    for top in Path("/sys/fs/cgroup").iterdir():
        for dirpath, _dirs, _files in os.walk(top):
            if TOKEN in dirpath:
                cgroups.append(dirpath)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    link_names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if TOKEN in line)
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    nft_lines = [line.strip() for line in nft.stdout.splitlines() if TOKEN in line] if nft.returncode == 0 else []
    netns = sorted(n for n in os.listdir("/run/netns") if TOKEN in n) if os.path.isdir("/run/netns") else []
    supervisors = processes("machined-sup", TOKEN)
    helpers = processes("machined-net", TOKEN)  # machines' network helpers (netagent)
    # Loop devices are global: the tests name their backing files with TOKEN.
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    loop_devices = sorted(line.split(":")[0] for line in loops.splitlines() if TOKEN in line)
    return {"mounts": mounts, "cgroups": sorted(cgroups), "links": link_names, "nft": nft_lines,
            "netns": netns, "supervisors": supervisors, "helpers": helpers, "loops": loop_devices}


def processes(comm: str, text: str) -> list[str]:
    """Live processes (not zombies) named comm whose command line contains text."""
    return sorted(p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == comm and text in _cmdline(p))


def _comm(pid: str) -> str:
    """The command name of a live process ('' for a zombie: it has finished, only its reaping is left)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    if stat[stat.rindex(")") + 2] == "Z":
        return ""
    return stat[stat.index("(") + 1:stat.rindex(")")]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="session", autouse=True)
def host_unchanged() -> Iterator[None]:
    if not ROOT:
        yield
        return
    before = _host_snapshot()
    yield
    after = _host_snapshot()
    diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not diff, f"the test suite left the host changed: {diff}"


# --- a cached Debian rootfs ----------------------------------------------------------------------

DEBIAN_PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "procps", "libpam-systemd")


def cached_tree(key_parts: tuple[str, ...], build: object) -> Path:
    """A directory built once by build(path) and kept under TEST_CACHE, keyed by what went into it."""
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:16]
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    target = TEST_CACHE / f"{key_parts[0]}-{key}"
    with open(TEST_CACHE / f".{key_parts[0]}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions build it once
        if not target.exists():
            tmp = TEST_CACHE / f".{target.name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(tmp)  # type: ignore[operator]
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_debian(path: Path, suite: str = "bookworm", extra: tuple[str, ...] = ()) -> None:
    packages = ",".join(DEBIAN_PACKAGES + extra)
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={packages}", suite, str(path), DEBIAN_MIRROR],
        check=True, timeout=1800,
    )
    # An empty machine-id: the manager provides the machine's own id at boot. No hostname of the
    # build host's: the machine's name (set by the manager) is its hostname.
    (path / "etc/machine-id").write_text("")
    (path / "etc/hostname").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """A pristine Debian bookworm with systemd (cached across runs); copy it before booting."""
    require_root()
    return cached_tree(("debian-bookworm", "v2", DEBIAN_MIRROR, *DEBIAN_PACKAGES), build_debian)


def copy_tree(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)
