"""A paired A/B of `mctl start` between two revisions of this checkout (as root).

Both revisions are exported side by side (git archive; "." is the working tree) and run by this
venv's Python (`python -S REV/bin/mctl`, the dependencies from the venv), each with a runtime
directory on a tmpfs of its own, on one machine made from the busybox template. Each round starts
and terminates the machine once with each revision, in an order of its own (seeded); with
--after-nspawn, each start follows an nspawn run, whose namespace the kernel is still tearing down
(as in bench_network); with --others N, N more machines run meanwhile, whose hosts files a
bridged start updates (each revision's own, on a bridge of its own: the revisions' stores do not
know each other's leases). Prints each revision's median and the median of the per-round differences,
B - A, with a 95% bootstrap interval. Single starts vary by several milliseconds on a small VM:
800 rounds (a few minutes) narrow the interval to about +-0.3 ms, where 200 leave it at +-1 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_network import _interval, bench_bridge, remove_bench_bridge
from benchmarks.bench_start import REPO, clean_nspawn_leftovers, install_peers, runtime_tmpfs, umount_runtime


def export(rev: str, into: Path) -> None:
    """The revision's tree (what mctl runs from: machined, bin, templates) in into."""
    into.mkdir(parents=True)
    if rev == ".":
        for part in ("machined", "bin", "templates"):
            shutil.copytree(REPO / part, into / part, ignore=shutil.ignore_patterns("__pycache__"))
        return
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "machined", "bin", "templates"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="a git revision, or . for the working tree")
    ap.add_argument("b", help="the same, compared with a")
    ap.add_argument("--rounds", type=int, default=800)
    ap.add_argument("--network", default="bridge", help="the start's --network (default bridge: a bench bridge)")
    ap.add_argument("--after-nspawn", action="store_true", help="an nspawn run before each start")
    ap.add_argument("--seed", type=int, default=1, help="of the order within each round")
    ap.add_argument("--others", type=int, default=0, help="machines running meanwhile (default none)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("ab_start: run as root", file=sys.stderr)
        return 1
    if a.after_nspawn:
        install_peers("systemd-nspawn")
    work = Path(tempfile.mkdtemp(prefix="machined-ab-"))
    bridge = f"mbab{os.getpid() % 10000}"
    network = f"bridge:{bridge}" if a.network == "bridge" else a.network
    trees = {"A": work / "A", "B": work / "B"}
    env = dict(os.environ, MACHINED_IMAGE_DIR=str(work / "images"), MACHINED_CONFIG_DIR=str(work / "config"),
               MACHINED_CACHE_DIR=str(work / "cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # (each tree's bytecode is written once and read after)
    envs = {k: dict(env, PYTHONPATH=f"{tree}:{sysconfig.get_paths()['purelib']}",
                    MACHINED_RUNTIME_DIR=str(work / f"run-{k}")) for k, tree in trees.items()}
    bench_bridge(work / "config", bridge)
    name = f"abstart{os.getpid() % 10000}"  # (its cgroups are named after it, host-wide)

    def mctl(k: str, *args: str, check: bool = True) -> None:
        subprocess.run([sys.executable, "-S", str(trees[k] / "bin" / "mctl"), *args], env=envs[k], check=check,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=None if check else subprocess.DEVNULL)

    mounted: list[Path] = []
    others: list[tuple[str, str]] = []  # (revision, machine)
    try:
        for k, rev in (("A", a.a), ("B", a.b)):
            export(rev, trees[k])
            runtime_tmpfs(work / f"run-{k}")
            mounted.append(work / f"run-{k}")
        mctl("A", "create", name, "--template", "busybox")
        if a.after_nspawn:  # (a copy: nspawn may leave files in the root it ran)
            subprocess.run(["cp", "-a", str(work / "images" / name), str(work / "nsroot")], check=True)
        nspawn = ["systemd-nspawn", "-q", "-D", str(work / "nsroot"), "--register=no", "--keep-unit"]
        for k in trees:  # the bridge, each tree's replays and bytecode
            mctl(k, "start", name, "--network", network)
            mctl(k, "terminate", name)
        if a.others:
            with (work / "config" / "machined.conf").open("a") as conf:
                for k, octet in (("A", 251), ("B", 252)):
                    conf.write(f'\n[network.bridges.{bridge}{k.lower()}]\n'
                               f'subnet = "10.{octet}.{os.getpid() % 250}.0/24"\nnat = false\nkeep = true\n')
        for i in range(a.others):  # (cgroups are named after machines: each revision's have names of their own)
            for k in trees:
                others.append((k, f"{name}{k.lower()}{i}"))
                mctl("A", "clone", name, others[-1][1])
                mctl(k, "start", others[-1][1], "--network", f"bridge:{bridge}{k.lower()}")
        times: dict[str, list[float]] = {k: [] for k in trees}
        order = random.Random(a.seed)
        for i in range(a.rounds + 3):
            keys = list(trees)
            order.shuffle(keys)
            for k in keys:
                if a.after_nspawn:
                    net = order.choice(["--private-network", f"--network-bridge={bridge}"])
                    subprocess.run([*nspawn, net, "/bin/true"], check=True, capture_output=True)
                    clean_nspawn_leftovers()
                else:
                    time.sleep(0.02)  # (most of the kernel's teardown of the last start is over by then)
                start = time.perf_counter()
                mctl(k, "start", name, "--network", network)
                took = (time.perf_counter() - start) * 1000
                mctl(k, "terminate", name)
                if i >= 3:  # warm-up
                    times[k].append(took)
        for k, rev in (("A", a.a), ("B", a.b)):
            print(f"{k} ({rev}): mctl start --network {a.network}: {statistics.median(times[k]):.2f} ms "
                  f"(median of {a.rounds})")
        diffs = [tb - ta for ta, tb in zip(times["A"], times["B"], strict=True)]
        low, high = _interval(diffs)
        print(f"B - A, per round: {statistics.median(diffs):+.2f} ms (95% interval {low:+.2f} to {high:+.2f})")
    finally:
        for k, n in [*((k, name) for k in trees), *others]:
            if (trees[k] / "bin").exists():
                mctl(k, "terminate", n, check=False)
        for br in (bridge, f"{bridge}a", f"{bridge}b"):
            remove_bench_bridge(br)
        for path in mounted:
            umount_runtime(path)
        shutil.rmtree(work, ignore_errors=True)
        clean_nspawn_leftovers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
