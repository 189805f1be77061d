"""Devices and resources against LXC on the same busybox rootfs, alternating, in one run (as root).

  start:   mctl start (a loop device node, memory_max, tasks_max in the settings)
           vs lxc-start -d with lxc.cgroup.devices.allow, a lxc.mount.entry for the node and the limits
  bind:    mctl bind-device + unbind-device      vs lxc-device add + del
  freeze:  mctl freeze + thaw                    vs lxc-freeze + lxc-unfreeze
  limit:   mctl set-limit --runtime memory_max   vs lxc-cgroup memory.limit_in_bytes
  status:  mctl status                           vs lxc-info
  list:    mctl list                             vs lxc-ls (the fixed cost of one command, for scale)

Prints medians and the ratios mctl/LXC. mctl is a regular (non-editable) install of this checkout in
a private venv (keyed by its sources), as a user would have it. Both tools run as separate
processes, so mctl's figures include starting the Python interpreter (about 40 ms here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_start import install_peers, private_install


def run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def timed(cmds: list[list[str]], env: dict[str, str]) -> float:
    start = time.perf_counter()
    for cmd in cmds:
        run(cmd, env)
    return time.perf_counter() - start


def remove_lxc_leftovers(name: str) -> None:
    """LXC leaves its (empty) lxc.pivot cgroup in every hierarchy; ours went with the container."""
    for top in Path("/sys/fs/cgroup").iterdir():
        for d in (top / "lxc.pivot", top / f"lxc.payload.{name}", top / f"lxc.monitor.{name}"):
            try:
                d.rmdir()
            except OSError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mctl", type=Path, default=None)
    args = ap.parse_args()
    install_peers("lxc")
    mctl = str(args.mctl or private_install(deps=True))
    tmp = Path(tempfile.mkdtemp(prefix="bench-devices-"))
    name = f"bdev{os.getpid()}"
    env = dict(os.environ, MACHINED_IMAGE_DIR=str(tmp / "images"), MACHINED_CONFIG_DIR=str(tmp / "config"),
               MACHINED_RUNTIME_DIR=str(tmp / "run"), MACHINED_CACHE_DIR=str(tmp / "cache"))
    env.pop("MACHINED_CGROUP_LAYOUT", None)
    lxcpath = tmp / "lxc"
    loops: list[str] = []

    def make_loop(backing: Path) -> str:
        backing.write_bytes(b"\0" * (1 << 20))
        loops.append(subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                                    text=True).stdout.strip())
        return loops[-1]

    try:
        # Loopback only, as LXC's "empty" network below (and no bridge left on the host).
        run([mctl, "create", name, "--template", "busybox", "--network", "none"], env)
        rootfs = tmp / "images" / name
        loop = make_loop(tmp / "loop.img")
        minor = os.minor(os.stat(loop).st_rdev)
        with open(tmp / "config" / f"{name}.toml", "a") as f:
            f.write(f'\n[devices]\nallow = ["{loop} rw"]\n\n[resources]\nmemory_max = "64M"\ntasks_max = 100\n')
        (lxcpath / name).mkdir(parents=True)
        (lxcpath / name / "config").write_text(f"""lxc.uts.name = {name}
lxc.rootfs.path = dir:{rootfs}
lxc.init.cmd = /sbin/init
lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
lxc.mount.auto = proc:mixed sys:ro cgroup:mixed
lxc.autodev = 1
lxc.pty.max = 16
lxc.tty.max = 0
lxc.cgroup.devices.allow = b 7:{minor} rw
lxc.mount.entry = {loop} dev/{os.path.basename(loop)} none bind,create=file 0 0
lxc.cgroup.memory.limit_in_bytes = 64M
lxc.cgroup.pids.max = 100
""")
        lxc = ["-P", str(lxcpath), "-n", name]
        other_loop = make_loop(tmp / "other.img")
        ops: dict[str, tuple[list[list[str]], list[list[str]]]] = {
            "bind": ([[mctl, "bind-device", name, other_loop], [mctl, "unbind-device", name, other_loop]],
                     [["lxc-device", *lxc, "add", other_loop], ["lxc-device", *lxc, "del", other_loop]]),
            "freeze": ([[mctl, "freeze", name], [mctl, "thaw", name]],
                       [["lxc-freeze", *lxc], ["lxc-unfreeze", *lxc]]),
            "limit": ([[mctl, "set-limit", name, "--runtime", "memory_max=96M"]],
                      [["lxc-cgroup", *lxc, "memory.limit_in_bytes", "96M"]]),
            "status": ([[mctl, "status", name]], [["lxc-info", *lxc]]),
            # The fixed cost of one command (interpreter and imports for mctl), for scale.
            "list": ([[mctl, "list"]], [["lxc-ls", "-P", str(lxcpath)]]),
        }
        results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ["start", *ops]}

        def mctl_round() -> None:
            results["start"][0].append(timed([[mctl, "start", name]], env))
            for key, (ours, _) in ops.items():
                results[key][0].append(timed(ours, env))
            run([mctl, "terminate", name], env)

        def lxc_round() -> None:
            results["start"][1].append(timed([["lxc-start", *lxc, "-d"]], env))
            run(["lxc-wait", *lxc, "-s", "RUNNING", "-t", "10"], env)
            for key, (_, theirs) in ops.items():
                # lxc-device prints a harmless netns warning on this host (it cannot open /proc/1/ns/net).
                results[key][1].append(timed(theirs, env))
            run(["lxc-stop", *lxc, "-k"], env)
            remove_lxc_leftovers(name)

        rounds: list[Callable[[], None]] = [mctl_round, lxc_round]
        mctl_round()  # warm-up: page cache, the venv's bytecode
        lxc_round()
        for key in results:
            results[key] = ([], [])
        for i in range(args.rounds):
            for fn in rounds if i % 2 == 0 else reversed(rounds):
                fn()
        print(f"{'operation':10} {'mctl ms':>9} {'LXC ms':>9} {'ratio':>7}   (medians of {args.rounds})")
        for key, (ours, theirs) in results.items():
            m, x = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
            print(f"{key:10} {m:9.1f} {x:9.1f} {m / x:7.2f}")
    finally:
        subprocess.run([mctl, "terminate", name], env=env, capture_output=True)
        subprocess.run(["lxc-stop", "-P", str(lxcpath), "-n", name, "-k"], capture_output=True)
        remove_lxc_leftovers(name)
        for device in loops:
            subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
