"""Registration's cost, measured inside the suite's real systemd host (as root).

The host (tests/host.py) is booted once; inside it, on the same cached rootfs, alternating:

  start:  `mctl start` of a busybox machine, until it returns (init runs, and, on the systemd path,
          the scope exists and the machine is registered), against the same with MACHINED_SYSTEMD=no
          (the cgroupfs path): the difference is what delegation and registration add.
  boot:   a Debian bookworm booted to `systemctl is-system-running` = running: `mctl start` (registered)
          against `systemd-nspawn -b` (which registers too), and mctl on the cgroupfs path.
Machines of both have a loopback-only network (mctl: network none, nspawn: --private-network).
  registered: from launch until systemd-machined announces the machine (MachineNew on the bus), mctl
          against systemd-nspawn -b, on the Debian rootfs.

Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import Env
from tests.host import DEBIAN, DEPS, boot

# Runs inside the host with its python3 (dbus-fast from the bound dependency directory).
INSIDE = r'''
import asyncio, json, os, statistics, subprocess, sys, time
sys.path.insert(0, "DEPS")
from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus

RUNS, BOOTS = int(sys.argv[1]), int(sys.argv[2])
env_cgroupfs = dict(os.environ, MACHINED_SYSTEMD="no")

def run(*cmd, env=None):
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)

def timed(*cmd, env=None):
    t = time.perf_counter()
    run(*cmd, env=env)
    return time.perf_counter() - t

def wait_running(leader):
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        r = subprocess.run(["nsenter", "-t", str(leader), "-a", "systemctl", "is-system-running", "--wait"],
                           capture_output=True, text=True)
        if r.stdout.strip() == "running":
            return
        time.sleep(0.005)
    raise TimeoutError("no running")

def leader(name):
    while True:
        r = subprocess.run(["machinectl", "show", name, "-p", "Leader", "--value"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return int(r.stdout)
        time.sleep(0.002)

class Announcements:
    """MachineNew signals from systemd-machined, time-stamped as they arrive (a thread of its own)."""
    def __init__(self):
        import threading
        self.seen = {}
        self.ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True).start()
        self.ready.wait(10)
    async def _listen(self):
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        def on(msg):
            if msg.member == "MachineNew":
                self.seen[msg.body[0]] = time.perf_counter()
        bus.add_message_handler(on)
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=["type='signal',interface='org.freedesktop.machine1.Manager',member='MachineNew'"]))
        self.ready.set()
        await asyncio.Event().wait()
    def wait(self, name, timeout=60):
        deadline = time.perf_counter() + timeout
        while name not in self.seen and time.perf_counter() < deadline:
            time.sleep(0.001)
        return self.seen.pop(name)

res = {"start_systemd": [], "start_cgroupfs": [], "boot_mctl": [], "boot_mctl_cgroupfs": [], "boot_nspawn": [],
       "reg_mctl": [], "reg_nspawn": []}
# Loopback-only networks on both sides (mctl: network none; nspawn: --private-network).
run("mctl", "create", "benchbb", "--template", "busybox", "--set", "console_login=no", "--network", "none")
for name in ("benchdeb", "benchnsp"):
    run("cp", "-a", "DEBIAN", f"/var/lib/machines/{name}")
with open("/etc/machined/benchdeb.toml", "w") as f:
    f.write('[machine]\nid = "%s"\n[network]\nmode = "none"\n' % os.urandom(16).hex())
ann = Announcements()
for i in range(RUNS + 2):
    s = timed("mctl", "start", "benchbb")
    run("mctl", "terminate", "benchbb")
    c = timed("mctl", "start", "benchbb", env=env_cgroupfs)
    run("mctl", "terminate", "benchbb")
    if i >= 2:
        res["start_systemd"].append(s)
        res["start_cgroupfs"].append(c)
for i in range(BOOTS + 1):
    t = time.perf_counter()
    run("mctl", "start", "benchdeb")
    reg = ann.wait("benchdeb") - t
    wait_running(leader("benchdeb"))
    m = time.perf_counter() - t
    run("mctl", "poweroff", "benchdeb")
    t = time.perf_counter()
    run("mctl", "start", "benchdeb", env=env_cgroupfs)
    wait_running(json.loads(subprocess.run(["mctl", "show", "benchdeb", "-o", "json"], capture_output=True,
                                           text=True, check=True).stdout)["Leader"])
    mc = time.perf_counter() - t
    run("mctl", "poweroff", "benchdeb", env=env_cgroupfs)
    t = time.perf_counter()
    p = subprocess.Popen(["systemd-nspawn", "-q", "-b", "--private-network", "-D", "/var/lib/machines/benchnsp",
                          "-M", "benchnsp"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nreg = ann.wait("benchnsp") - t
    wait_running(leader("benchnsp"))
    n = time.perf_counter() - t
    run("machinectl", "poweroff", "benchnsp")
    p.wait(60)
    if i >= 1:
        res["boot_mctl"].append(m)
        res["boot_mctl_cgroupfs"].append(mc)
        res["boot_nspawn"].append(n)
        res["reg_mctl"].append(reg)
        res["reg_nspawn"].append(nreg)
print(json.dumps({k: statistics.median(v) for k, v in res.items()}))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="busybox starts of each kind")
    ap.add_argument("--boots", type=int, default=8, help="Debian boots of each kind")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_systemd: run as root", file=sys.stderr)
        return 1
    import json

    env = Env(Path(tempfile.mkdtemp(prefix="machined-bench-sd-")))
    try:
        host = boot(env)
        script = INSIDE.replace('"DEPS"', repr(DEPS)).replace('"DEBIAN"', repr(DEBIAN))
        (env.images / host.name / "root/bench.py").write_text(script)
        r = host.run("python3", "/root/bench.py", str(a.runs), str(a.boots), timeout=3600)
        if r.returncode != 0:
            print(r.stdout, r.stderr, file=sys.stderr)
            return 1
        m = json.loads(r.stdout.strip().splitlines()[-1])
        ms = {k: v * 1000 for k, v in m.items()}
        print(f"start (busybox, until mctl start returns), median of {a.runs}, alternating:")
        print(f"  registered {ms['start_systemd']:.1f} ms, cgroupfs path {ms['start_cgroupfs']:.1f} ms: "
              f"registration adds {ms['start_systemd'] - ms['start_cgroupfs']:.1f} ms")
        print(f"boot to running (Debian bookworm), median of {a.boots}, alternating:")
        print(f"  mctl {ms['boot_mctl']:.0f} ms, mctl cgroupfs path {ms['boot_mctl_cgroupfs']:.0f} ms, "
              f"systemd-nspawn -b {ms['boot_nspawn']:.0f} ms: "
              f"ratio mctl/nspawn {m['boot_mctl'] / m['boot_nspawn']:.2f}")
        print(f"  until systemd-machined announces it: mctl {ms['reg_mctl']:.0f} ms, systemd-nspawn -b "
              f"{ms['reg_nspawn']:.0f} ms: ratio {m['reg_mctl'] / m['reg_nspawn']:.2f}")
    finally:
        env.cleanup()
        import shutil

        shutil.rmtree(env.base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
