"""What bridged networking adds to a start, against systemd-nspawn --network-bridge= (as root).

On one busybox rootfs, alternating, in one run:
  mctl start NAME (returns once init runs), network none vs bridge:BR (the bridge already up)
  mctl run NAME -- /bin/true (one-shot),   network none vs bridge:BR
  systemd-nspawn -q -D R --register=no --keep-unit --private-network /bin/true
        vs the same with --network-bridge=BR (same bridge)
Prints medians, the time networking adds to each (the median of bridged minus private network
within each round) and the ratios of those additions, mctl/nspawn (for mctl start with a bootstrap
interval and how often it is at most 1.0 when the rounds are resampled). Each round runs the cases in
an order of its own (shuffled, seeded): a start finds the kernel still tearing down the network
namespace and veth of the run before it, and a fixed order would always give the same case the
same predecessor. With --others N, N more bridged machines run throughout (a host that keeps a few
dev machines up): each of the cases runs beside them, and a bridged start of mctl's adds its name
to their hosts files. mctl is a regular (non-editable) install of this checkout in a private venv
unless --mctl names another.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_start import clean_nspawn_leftovers, install_peers, private_install, runtime_tmpfs, umount_runtime


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _interval(values: list[float], rounds: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median: how far this run's figure may be from another's."""
    rnd = random.Random(0)
    medians = sorted(statistics.median(rnd.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(rounds * 0.025)], medians[int(rounds * 0.975) - 1]


def _ratio_interval(ours: list[float], theirs: list[float], rounds: int = 2000) -> tuple[float, float, float]:
    """For the ratio of two medians of per-round differences: a 95% bootstrap interval (the rounds
    resampled together, as they were run) and the share of resamples in which it is at most 1.0.
    A resample whose denominator is not positive counts as an unbounded ratio."""
    rnd = random.Random(0)
    n = len(ours)
    ratios = []
    for _ in range(rounds):
        picked = rnd.choices(range(n), k=n)
        den = statistics.median(theirs[i] for i in picked)
        ratios.append(statistics.median(ours[i] for i in picked) / den if den > 0 else float("inf"))
    ratios.sort()
    return ratios[int(rounds * 0.025)], ratios[int(rounds * 0.975) - 1], sum(r <= 1.0 for r in ratios) / rounds


def bench_bridge(config: Path, bridge: str) -> None:
    """mctl's host configuration in config: bridge (made by the first start, kept, no NAT) as the
    default bridge, on a subnet of this process's own; no hosts file of the host's to update."""
    config.mkdir(parents=True, exist_ok=True)
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}.0/24"
    (config / "machined.conf").write_text(
        f'[network]\ndefault_bridge = "{bridge}"\nhosts_file = ""\n\n'
        f'[network.bridges.{bridge}]\nsubnet = "{subnet}"\nnat = false\nkeep = true\n')


def remove_bench_bridge(bridge: str) -> None:
    """The kept bridge, and its NAT table where it had one: nothing of the run stays on the host."""
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    subprocess.run(["nft", "delete", "table", "inet", f"machined-{bridge}"], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--mctl", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=1, help="of the order of the cases in each round")
    ap.add_argument("--others", type=int, default=0, help="bridged machines running throughout (default none)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_network: run as root", file=sys.stderr)
        return 1
    install_peers("systemd-nspawn")
    mctl = str(a.mctl or private_install(deps=True))
    work = Path(tempfile.mkdtemp(prefix="machined-bench-"))
    bridge = f"mbbench{os.getpid() % 10000}"
    env = dict(os.environ, MACHINED_IMAGE_DIR=str(work / "images"), MACHINED_CONFIG_DIR=str(work / "config"),
               MACHINED_RUNTIME_DIR=str(work / "run"), MACHINED_CACHE_DIR=str(work / "cache"))
    env.pop("PYTHONPATH", None)
    bench_bridge(work / "config", bridge)
    name = "benchnet"
    others = [f"{name}o{i}" for i in range(a.others)]
    try:
        runtime_tmpfs(work / "run")
        subprocess.run([mctl, "create", name, "--template", "busybox"], env=env, check=True)
        nsroot = work / "nsroot"
        subprocess.run(["cp", "-a", str(work / "images" / name), str(nsroot)], check=True)
        nspawn = ["systemd-nspawn", "-q", "-D", str(nsroot), "--register=no", "--keep-unit"]
        cases: dict[str, Callable[[], float]] = {
            "mctl start, none": lambda: timed([mctl, "start", name, "--network", "none"], env),
            "mctl start, bridge": lambda: timed([mctl, "start", name, "--network", f"bridge:{bridge}"], env),
            "mctl run, none": lambda: timed([mctl, "run", name, "--", "/bin/true"], env),
            "mctl run, bridge": lambda: timed([mctl, "run", name, "--", "/bin/true"], env),
            "nspawn, private network": lambda: timed([*nspawn, "--private-network", "/bin/true"]),
            "nspawn, bridge": lambda: timed([*nspawn, f"--network-bridge={bridge}", "/bin/true"]),
        }
        # The bridge first (nspawn's case needs it, whatever the order), and the machine's replays.
        subprocess.run([mctl, "start", name, "--network", f"bridge:{bridge}"], env=env, check=True)
        subprocess.run([mctl, "terminate", name], env=env, check=True)
        for other in others:
            subprocess.run([mctl, "clone", name, other], env=env, check=True)
            subprocess.run([mctl, "start", other, "--network", f"bridge:{bridge}"], env=env, check=True)
        results: dict[str, list[float]] = {k: [] for k in cases}
        order = random.Random(a.seed)
        for i in range(a.runs + 2):
            keys = list(cases)
            order.shuffle(keys)
            for key in keys:
                run = cases[key]
                if key.startswith("mctl run"):
                    mode = "none" if key.endswith("none") else f"bridge:{bridge}"
                    cfg = work / "config" / f"{name}.toml"
                    text = cfg.read_text().split("[network]")[0].rstrip("\n")
                    cfg.write_text(text + f'\n\n[network]\nmode = "{mode}"\n')
                t = run()
                if key.startswith("mctl start"):
                    subprocess.run([mctl, "terminate", name], env=env, check=True)
                clean_nspawn_leftovers()
                if i >= 2:  # warm-up
                    results[key].append(t)
        med = {k: statistics.median(v) * 1000 for k, v in results.items()}
        for k, v in med.items():
            print(f"{k:26} {v:7.1f} ms (median of {a.runs}{f', {a.others} other machines running' if others else ''})")
        # Each addition is the median of the differences within one round (the two runs are seconds
        # apart): robust against this machine's speed drifting between rounds, which a difference of
        # the two medians is not.
        pairs = {"mctl start": ("mctl start, bridge", "mctl start, none"),
                 "mctl run": ("mctl run, bridge", "mctl run, none"),
                 "nspawn": ("nspawn, bridge", "nspawn, private network")}
        diffs = {k: [(b - n) * 1000 for b, n in zip(results[kb], results[kn], strict=True)]
                 for k, (kb, kn) in pairs.items()}
        added = {k: statistics.median(d) for k, d in diffs.items()}
        for k, v in added.items():
            low, high = _interval(diffs[k])
            print(f"bridged networking adds to {k:11} {v:6.1f} ms (95% interval {low:.1f} to {high:.1f})")
        if added["nspawn"] >= 1.0:
            print(f"ratio of the additions, mctl start/nspawn: {added['mctl start'] / added['nspawn']:.1f}; "
                  f"mctl run/nspawn: {added['mctl run'] / added['nspawn']:.1f}")
            low, high, within = _ratio_interval(diffs["mctl start"], diffs["nspawn"])
            print(f"  mctl start/nspawn: 95% interval {low:.1f} to {high:.1f}; at most 1.0 in {within:.0%} "
                  "of the resampled runs")
        else:
            print("ratio of the additions: none meaningful, nspawn's addition is below 1 ms (within noise)")
        print(f"ratio of bridged totals, mctl run/nspawn: {med['mctl run, bridge'] / med['nspawn, bridge']:.2f}; "
              f"mctl start/nspawn: {med['mctl start, bridge'] / med['nspawn, bridge']:.2f}")
    finally:
        for machine in (name, *others):
            subprocess.run([mctl, "terminate", machine], env=env, capture_output=True)
        remove_bench_bridge(bridge)
        umount_runtime(work / "run")
        shutil.rmtree(work, ignore_errors=True)
        clean_nspawn_leftovers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
