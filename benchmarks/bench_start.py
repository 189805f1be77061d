"""Start-up against systemd-nspawn on the same Debian rootfs, alternating, in one run (as root).

  one-shot: mctl run --directory R -- /bin/true   vs  systemd-nspawn -q -D R --register=no --keep-unit /bin/true
  boot:     mctl start NAME, until systemctl is-system-running says running
            vs systemd-nspawn -b -D R --register=no --keep-unit, until the same

Prints medians and the ratios mctl/nspawn. mctl is a regular (non-editable) install of this
checkout in a private venv, as a user would have it, unless --mctl names another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MACHINED_TEST_CACHE", "/var/cache/machined-tests"))
MIRROR = os.environ.get("MACHINED_TEST_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "systemd,systemd-sysv,dbus,iproute2,procps,libpam-systemd"


# What each peer needs of Debian's packages, and a file that shows it is installed.
PEERS = {"systemd-nspawn": ("/usr/bin/systemd-nspawn", ["systemd-container"]),
         "lxc": ("/usr/bin/lxc-start", ["lxc"]),
         "lxc-create -t debian": ("/usr/share/lxc/templates/lxc-debian",
                                  ["lxc", "lxc-templates", "debootstrap", "rsync"])}


def install_peers(*peers: str) -> None:
    """The peers a benchmark compares with, from Debian's packages where missing (a new machine has
    none of them), as run-tests installs what the tests need."""
    missing = sorted({pkg for peer in peers if not os.path.exists(PEERS[peer][0]) for pkg in PEERS[peer][1]})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {', '.join(missing)}: the peers to compare with", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def debian_rootfs() -> Path:
    """The same cached Debian bookworm the test suite boots (built with mmdebstrap if missing)."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import DEBIAN_MIRROR, DEBIAN_PACKAGES, build_debian, cached_tree

    return cached_tree(("debian-bookworm", "v2", DEBIAN_MIRROR, *DEBIAN_PACKAGES), build_debian)


def private_install(deps: bool = False) -> Path:
    """A non-editable install of this checkout (keyed by its sources and templates), without
    setuptools; with its dependencies if deps (networking needs pyroute2). Older installs of the same
    kind are removed (the two newest stay), so that the cache does not grow with every change."""
    digest = hashlib.sha256()
    for p in [*sorted((REPO / "machined").rglob("*.py")), *sorted((REPO / "templates").rglob("*")),
              REPO / "pyproject.toml"]:
        if p.is_file():
            digest.update(p.read_bytes())
    kind = f"bench-venv{'-deps' if deps else ''}-"
    venv = CACHE / f"{kind}{digest.hexdigest()[:12]}"
    if not (venv / "bin/mctl").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", *([] if deps else ["--no-deps"]), str(REPO)],
                       check=True)
        subprocess.run([str(venv / "bin/pip"), "uninstall", "-q", "-y", "setuptools"], check=False)
    others = [d for d in CACHE.glob(f"{kind}*") if d != venv and d.name[len(kind):].isalnum()]
    for old in sorted(others, key=lambda d: d.stat().st_mtime)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    venv.touch()
    return venv / "bin/mctl"


def runtime_tmpfs(path: Path) -> None:
    """mctl's runtime directory on a tmpfs of its own, as /run is on a host that runs systemd (here
    /run may be on a disk): a start writes and renames its state, leases and hosts files there, and
    a rename over a file on ext4 starts the writeback of the new one. umount_runtime() ends it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "machined-bench", str(path)], check=True)


def umount_runtime(path: Path) -> None:
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def clean_nspawn_leftovers() -> None:
    # systemd-nspawn on a host without systemd leaves its payload/supervisor cgroups behind.
    for top in ("unified", "systemd"):
        for name in ("payload", "supervisor"):
            d = Path("/sys/fs/cgroup") / top / name
            if d.exists():
                for dirpath, _dirs, _files in sorted(os.walk(d), key=lambda x: -len(x[0])):
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass


def timed(cmd: list[str], env: dict[str, str], quiet: bool = False) -> float:
    # nspawn complains about its propagation directory on a host without systemd: not our business.
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if quiet else None)
    return time.perf_counter() - start


def wait_running(leader: int, deadline: float) -> None:
    """Block until systemd in the container whose PID 1 is leader reports 'running'."""
    while time.perf_counter() < deadline:
        r = subprocess.run(["nsenter", "-t", str(leader), "-a", "systemctl", "is-system-running", "--wait"],
                           capture_output=True, text=True)
        if r.stdout.strip() == "running":
            return
        if r.stdout.strip() in ("degraded", "maintenance", "stopping"):
            raise RuntimeError(f"boot ended {r.stdout.strip()}")
        time.sleep(0.005)
    raise TimeoutError("no 'running' in time")


def leader_of_nspawn(pid: int, deadline: float) -> int:
    while time.perf_counter() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for c in children:
            try:
                if Path(f"/proc/{c}/comm").read_text().strip() == "systemd":
                    return int(c)
            except OSError:
                pass
        time.sleep(0.001)
    raise TimeoutError("nspawn's container init did not appear")


def boot_mctl(mctl: Path, env: dict[str, str], name: str) -> float:
    start = time.perf_counter()
    # Loopback only, as before machines were bridged by default: this measures the start itself.
    subprocess.run([str(mctl), "start", name, "--network", "none"], env=env, check=True)
    # The leader from the state file, not from 'mctl show': another Python process started while
    # the guest boots would take CPU from it that nspawn's side (reading /proc) does not.
    statefile = Path(env["MACHINED_RUNTIME_DIR"]) / "machines" / name / "state.json"
    leader = int(json.loads(statefile.read_text())["leader"]["pid"])
    wait_running(leader, start + 60)
    elapsed = time.perf_counter() - start
    subprocess.run([str(mctl), "poweroff", name], env=env, check=True)
    return elapsed


def boot_nspawn(rootfs: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(["systemd-nspawn", "-q", "-b", "-D", str(rootfs), "--register=no", "--keep-unit"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leader = leader_of_nspawn(proc.pid, start + 30)
    wait_running(leader, start + 60)
    elapsed = time.perf_counter() - start
    os.kill(leader, signal.SIGRTMIN + 4)
    proc.wait(60)
    clean_nspawn_leftovers()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="one-shot runs of each")
    ap.add_argument("--boots", type=int, default=8, help="boots of each")
    ap.add_argument("--mctl", type=Path, default=None)
    ap.add_argument("--rootfs", type=Path, default=None)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_start: run as root", file=sys.stderr)
        return 1
    install_peers("systemd-nspawn")
    rootfs = a.rootfs or debian_rootfs()
    mctl = a.mctl or private_install()
    work = Path(tempfile.mkdtemp(prefix="machined-bench-"))
    env = dict(os.environ, MACHINED_IMAGE_DIR=str(work / "images"), MACHINED_CONFIG_DIR=str(work / "config"),
               MACHINED_RUNTIME_DIR=str(work / "run"), MACHINED_CACHE_DIR=str(work / "cache"))
    env.pop("PYTHONPATH", None)
    try:
        runtime_tmpfs(work / "run")
        # One-shot, on a copy both tools share.
        shared = work / "oneshot"
        subprocess.run(["cp", "-a", str(rootfs), str(shared)], check=True)
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(a.runs + 3):
            o = timed([str(mctl), "run", "--directory", str(shared), "--", "/bin/true"], env)
            t = timed(["systemd-nspawn", "-q", "-D", str(shared), "--register=no", "--keep-unit", "/bin/true"], env,
                      quiet=True)
            clean_nspawn_leftovers()
            if i >= 3:  # warm-up
                ours.append(o)
                theirs.append(t)
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(f"one-shot /bin/true: mctl {mo * 1000:.1f} ms, systemd-nspawn {mt * 1000:.1f} ms, "
              f"ratio {mo / mt:.2f} (median of {a.runs}, alternating)")

        # Boot to running: each tool boots its own copy, alternating.
        (work / "images").mkdir()
        name = "benchboot"
        subprocess.run(["cp", "-a", str(rootfs), str(work / "images" / name)], check=True)
        nspawn_root = work / "nspawn-root"
        subprocess.run(["cp", "-a", str(rootfs), str(nspawn_root)], check=True)
        ours, theirs = [], []
        for i in range(a.boots + 1):
            o = boot_mctl(mctl, env, name)
            t = boot_nspawn(nspawn_root)
            if i >= 1:
                ours.append(o)
                theirs.append(t)
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(f"boot to running: mctl {mo * 1000:.0f} ms, systemd-nspawn -b {mt * 1000:.0f} ms, "
              f"ratio {mo / mt:.2f} (median of {a.boots}, alternating)")
    finally:
        subprocess.run([str(mctl), "terminate", "benchboot"], env=env, capture_output=True)
        umount_runtime(work / "run")
        shutil.rmtree(work, ignore_errors=True)
        clean_nspawn_leftovers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
