"""Creating Debian bookworm machines, cold and warm, against LXC's debian template, in one run (as root).

  cold:  mctl create --template debian with an empty bootstrap cache (mmdebstrap from the mirror)
         vs lxc-create -t debian with an empty LXC cache (debootstrap from the same mirror)
  warm:  the same again with the caches filled, alternating, N times each:
           mctl create (overlay on the cached base; what `auto` picks on ext4)
           mctl create --storage directory (a full copy of the cached tree)
           lxc-create -t debian (rsync of its cached tree, then its configuration steps)
           cp -a --reflink=auto of the cached tree (what `machinectl clone` does off btrfs; machinectl itself
           needs systemd-machined, which this host does not run)

Prints medians and the ratios mctl / lxc-create. LXC works in private directories (-P, LXC_CACHE_PATH)
so nothing of the host's own LXC is touched.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.bench_start import install_peers  # noqa: E402

MIRROR = os.environ.get("MACHINED_TEST_MIRROR", "http://deb.debian.org/debian")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}{r.stdout[-2000:]}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="warm creates of each")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold creates (minutes)")
    ap.add_argument("--mctl", default=None, help="mctl command (default: this checkout's)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_create: run as root", file=sys.stderr)
        return 1
    install_peers("lxc-create -t debian")
    mctl = [a.mctl] if a.mctl else [sys.executable, "-m", "machined"]
    work = Path(tempfile.mkdtemp(prefix="machined-bench-create-"))
    env = dict(os.environ, MACHINED_IMAGE_DIR=str(work / "images"), MACHINED_CONFIG_DIR=str(work / "config"),
               MACHINED_RUNTIME_DIR=str(work / "run"), MACHINED_CACHE_DIR=str(work / "cache"),
               PYTHONPATH=str(REPO), LXC_CACHE_PATH=str(work / "lxc-cache"))
    lxcpath = work / "lxc"
    lxcpath.mkdir()

    def ours(name: str, *extra: str) -> float:
        return timed([*mctl, "create", name, "--template", "debian", "--set", f"mirror={MIRROR}", *extra], env)

    def lxc(name: str) -> float:
        return timed(["lxc-create", "-P", str(lxcpath), "-n", name, "-t", "debian", "--",
                      "-r", "bookworm", f"--mirror={MIRROR}"], env)

    try:
        if not a.no_cold:
            cold_ours, cold_lxc = ours("cold"), lxc("cold")
            print(f"cold create:  mctl {cold_ours:.1f} s (mmdebstrap), lxc-create -t debian {cold_lxc:.1f} s "
                  f"(debootstrap), ratio {cold_ours / cold_lxc:.2f}")
        else:
            ours("cold")
            lxc("cold")
        tree = next(p for p in (work / "cache/bootstrap").iterdir() if p.is_dir() and not p.name.startswith("."))
        results: dict[str, list[float]] = {"overlay": [], "directory": [], "lxc": [], "cp": []}
        for i in range(a.runs):
            results["overlay"].append(ours(f"ov{i}"))
            results["directory"].append(ours(f"dir{i}", "--storage", "directory"))
            results["lxc"].append(lxc(f"warm{i}"))
            results["cp"].append(timed(["cp", "-a", "--reflink=auto", str(tree), str(work / f"cp{i}")], env))
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"warm create (median of {a.runs}, alternating):")
        print(f"  mctl create (overlay)             {med['overlay'] * 1000:7.0f} ms   "
              f"ratio to lxc-create {med['overlay'] / med['lxc']:.3f}")
        print(f"  mctl create --storage directory   {med['directory'] * 1000:7.0f} ms   "
              f"ratio to lxc-create {med['directory'] / med['lxc']:.3f}")
        print(f"  lxc-create -t debian (cached)     {med['lxc'] * 1000:7.0f} ms")
        print(f"  cp -a (machinectl clone's copy)   {med['cp'] * 1000:7.0f} ms")
    finally:
        for d in sorted(lxcpath.iterdir()) if lxcpath.exists() else []:
            subprocess.run(["lxc-destroy", "-P", str(lxcpath), "-n", d.name], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
