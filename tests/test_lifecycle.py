"""The core lifecycle, for real: busybox machines booted as root with namespaces, mounts and cgroups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import MCTL, Env, copy_tree
from tests.test_teardown import _wait as wait_for
from tests.test_units import SYS_FUTEX

pytestmark = pytest.mark.root


def test_busybox_machine_end_to_end(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    assert env.ok("shell", name, "--", "cat", "/proc/1/comm").strip() == "init"
    assert env.ok("shell", name, "--", "hostname").strip() == name
    ps = env.ok("shell", name, "--", "ps", "-o", "pid,comm")
    pids = [line.split()[0] for line in ps.splitlines()[1:]]
    assert "1" in pids and all(int(p) < 100 for p in pids), ps  # its own pid namespace: no host process
    assert "pytest" not in ps and "python" not in ps
    for path in ("/proc/sysrq-trigger", "/proc/sys/kernel/hostname"):
        r = env.mctl("shell", name, "--", "sh", "-c", f"echo x > {path}")
        assert r.returncode != 0, path
    # The host's mounts are unreachable: only the machine's own mounts are there.
    mountpoints = [line.split()[4] for line in env.ok("shell", name, "--", "cat", "/proc/self/mountinfo").splitlines()]
    assert mountpoints[0] == "/" and not any(m.startswith(("/work", "/tmp/pytest", "/root")) for m in mountpoints)
    assert env.ok("shell", name, "--", "ls", "/").split() == sorted(os.listdir(env.images / name))
    listing = json.loads(env.ok("list", "-o", "json"))
    assert [m["machine"] for m in listing] == [name]
    assert listing[0]["state"] == "running" and listing[0]["class"] == "container"
    start = time.monotonic()
    env.ok("poweroff", name)
    assert time.monotonic() - start < 2.0
    assert json.loads(env.ok("list", "-o", "json")) == []
    assert env.running() == []
    assert not (env.runtime / "locks" / name).exists()


def test_api_filesystems_and_capabilities(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    mounts = env.ok("shell", name, "--", "cat", "/proc/self/mounts")
    table = {line.split()[1]: line.split() for line in mounts.splitlines()}
    assert table["/proc/sys"][3].startswith("ro")
    assert table["/sys"][3].startswith("ro")
    assert table["/dev"][2] == "tmpfs" and table["/dev/pts"][2] == "devpts"
    for masked in ("/proc/kallsyms", "/proc/keys", "/proc/timer_list"):
        if os.path.exists(masked):
            assert masked in table and table[masked][3].startswith("ro"), masked
            assert env.ok("shell", name, "--", "cat", masked) == ""
    dev = env.ok("shell", name, "--", "ls", "/dev")
    for node in ("null", "zero", "full", "random", "urandom", "tty", "console", "ptmx", "pts", "shm",
                 "fd", "stdin", "stdout", "stderr"):
        assert node in dev.split(), node
    assert env.ok("shell", name, "--", "readlink", "/dev/ptmx").strip() == "pts/ptmx"
    status = env.ok("shell", name, "--", "cat", "/proc/1/status")
    bnd = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapBnd")), 16)
    # nspawn's retained set (plus NET_ADMIN for the machine's own network namespace), nothing else.
    expected = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 18, 19, 21, 22, 23, 24, 26, 27, 28, 29, 30, 31}
    host = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("CapBnd")), 16)
    assert {b for b in range(64) if bnd >> b & 1} == {b for b in expected if host >> b & 1}
    machine_id = env.ok("shell", name, "--", "cat", "/etc/machine-id").strip()
    assert len(machine_id) == 32 and machine_id in (env.config / f"{name}.toml").read_text()
    # The console is a pty whose output the supervisor keeps in a log.
    log = env.runtime / "logs" / f"{name}.log"
    deadline = time.monotonic() + 5
    while b"login:" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"login:" in log.read_bytes()
    env.ok("poweroff", name)


def test_device_allowlist_enforced(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    r = env.mctl("shell", name, "--", "sh", "-c", "echo hi > /dev/null && head -c4 /dev/urandom | wc -c")
    assert r.stdout.strip() == "4"
    # mknod is allowed, opening a device outside the list is not (here: /dev/mem, 1:1; a loop disk, 7:0),
    # made on the rootfs (/tmp is nodev).
    r = env.mctl("shell", name, "--", "sh", "-c", "mknod /root/mem c 1 1 && head -c1 /root/mem")
    assert r.returncode != 0 and "not permitted" in r.stderr.lower(), r.stderr
    r = env.mctl("shell", name, "--", "sh", "-c", "mknod /root/loop b 7 0 && head -c1 /root/loop")
    assert r.returncode != 0 and "not permitted" in r.stderr.lower(), r.stderr
    env.ok("poweroff", name)


def test_reboot_gives_a_fresh_init(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    before = json.loads(env.ok("show", name, "-o", "json"))
    env.ok("shell", name, "--", "touch", "/run/marker")  # /run is a tmpfs: gone after a reboot
    env.ok("reboot", name, timeout=30)
    after = json.loads(env.ok("show", name, "-o", "json"))
    assert after["Leader"] != before["Leader"] and after["Boots"] == before["Boots"] + 1
    assert after["Supervisor"] == before["Supervisor"]
    assert env.mctl("shell", name, "--", "test", "-e", "/run/marker").returncode == 1
    assert env.ok("shell", name, "--", "cat", "/proc/1/comm").strip() == "init"
    env.ok("terminate", name)
    assert env.running() == []


def test_run_passes_exit_code_through(env: Env, tmp_path_factory: pytest.TempPathFactory) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    rootfs = env.images / name
    r = env.mctl("run", "--directory", str(rootfs), "--", "/bin/sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr
    r = env.mctl("run", "--directory", str(rootfs), "--", "/bin/sh", "-c", "echo $$ $(hostname); cat /proc/1/comm")
    assert r.returncode == 0 and r.stdout.split()[0] == "1", r.stdout
    r = env.mctl("run", "--directory", str(rootfs), "--", "sh", "-c", "kill -TERM $$; sleep 5")
    assert r.returncode in (0, 143)
    r = env.mctl("run", name, "--", "/bin/sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = env.mctl("run", "--directory", str(rootfs), "--", "/nonexistent")
    assert r.returncode != 0 and "nonexistent" in r.stderr
    assert env.running() == []


def test_status_and_show(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    show = env.ok("show", name)
    assert "State=stopped" in show and "Template=busybox" in show
    env.ok("start", name)
    props = dict(line.split("=", 1) for line in env.ok("show", name).splitlines() if "=" in line)
    assert props["State"] == "running" and props["Class"] == "container" and props["Init"] == "busybox"
    leader = int(props["Leader"])
    assert open(f"/proc/{leader}/comm").read().strip() == "init"
    assert os.path.isdir(props["ControlGroup"])
    status = env.ok("status", name)
    for word in ("State: running", "Leader:", "Cgroup:", "busybox"):
        assert word in status
    images = json.loads(env.ok("list-images", "-o", "json"))
    assert [i["name"] for i in images] == [name] and images[0]["usage"] > 1_000_000
    env.ok("poweroff", name)


def test_kill_signals(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--set", "console_login=no")
    env.ok("start", name)
    env.ok("kill", name, "--signal", "SIGKILL", "--kill-whom", "all")
    # Killing everything kills init: the machine ends and everything is cleaned up.
    deadline = time.monotonic() + 5
    while env.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.running() == []
    env.ok("start", name)
    env.ok("kill", name, "--signal", "SIGUSR2", "--kill-whom", "leader")  # busybox: power off
    deadline = time.monotonic() + 5
    while env.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.running() == []
    assert env.mctl("kill", name).returncode != 0


def test_remove(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    r = env.mctl("remove", name)
    assert r.returncode != 0 and "running" in r.stderr
    env.ok("poweroff", name)
    env.ok("remove", name)
    assert not (env.images / name).exists() and not (env.config / f"{name}.toml").exists()
    assert json.loads(env.ok("list-images", "-o", "json")) == []


def test_console_attaches(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--set", "console_login=no")
    env.ok("start", name)
    proc = subprocess.Popen([*MCTL, "console", name], env=env.environ(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"echo hello-$((6*7))\n")
    proc.stdin.flush()
    out = b""
    deadline = time.monotonic() + 5
    os.set_blocking(proc.stdout.fileno(), False)
    while b"hello-42" not in out and time.monotonic() < deadline:
        time.sleep(0.05)
        out += proc.stdout.read() or b""
    proc.send_signal(signal.SIGTERM)
    proc.wait(5)
    assert b"hello-42" in out
    env.ok("poweroff", name)


def test_requests_wait_for_an_init_still_setting_up(env: Env) -> None:
    """A namespace's init drops a signal it does not handle yet: a poweroff or reboot asked right
    after start must wait for init to take it, not be lost (and end in the kill timeout)."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    slow = env.images / name / "sbin/slow"
    # (ash catches SIGINT from the start and dies of it: ignored until the real handler is there)
    slow.write_text("#!/bin/sh\ntrap '' INT\nsleep 1\ntrap 'poweroff -f' PWR\ntrap 'reboot -f' INT\n"
                    "while :; do sleep 0.05; done\n")
    slow.chmod(0o755)
    cfg = env.config / f"{name}.toml"
    cfg.write_text(cfg.read_text().replace("[machine]\n", "[machine]\ninit = \"/sbin/slow\"\nkill_timeout = 10\n"))
    env.ok("start", name)
    leader = json.loads(env.ok("show", name, "-o", "json"))["Leader"]
    start = time.monotonic()
    env.ok("reboot", name)
    assert json.loads(env.ok("show", name, "-o", "json"))["Leader"] != leader
    env.ok("poweroff", name)  # through the supervisor
    log = env.runtime / "logs" / f"{name}.log"
    assert "reboots" in log.read_text() and "timeout" not in log.read_text()
    env.ok("start", name)
    env.ok("halt", name)  # straight to init (SIGPWR for this kind of init, too)
    elapsed = time.monotonic() - start
    assert elapsed < 8, elapsed  # three inits' set-up seconds, not a kill timeout
    assert "timeout" not in log.read_text()


def test_a_deadlocked_busybox_init_is_killed_without_waiting_for_the_timeout(env: Env, debian_rootfs: Path) -> None:
    """BusyBox init can hang for good on a lock a killed child of its left taken (inits.SOLITARY),
    before or after it took the poweroff signal: the poweroff then kills it at once. The same init
    under another name waits for the kill timeout."""
    name = env.name()
    env.images.mkdir(parents=True, exist_ok=True)
    copy_tree(debian_rootfs, env.images / name)
    # One thread asleep on a private futex that nothing wakes (perl's syscall() passes a string as
    # a pointer to its bytes): at once, or once asked to power off.
    hang = f"my $word = pack('L', 0);\nsub hang {{ syscall({SYS_FUTEX}, $word, 128, 0, 0) while 1; }}\n"
    scripts = {
        "now": f"#!/usr/bin/perl\n$| = 1;\n{hang}print \"init up\\n\";\nhang();\n",
        "asked": f"#!/usr/bin/perl\n$| = 1;\n{hang}$SIG{{$_}} = \\&hang for qw(USR2 PWR);\n"
                 "print \"init up\\n\";\nsleep 1 while 1;\n",
    }
    cfg = env.config / f"{name}.toml"
    env.config.mkdir(parents=True, exist_ok=True)
    log = env.runtime / "logs" / f"{name}.log"
    for init, when, timeout in (("busybox", "now", 60.0), ("busybox", "asked", 60.0), ("stuck", "asked", 1.0)):
        path = env.images / name / "usr/local/sbin" / init
        path.write_text(scripts[when])
        path.chmod(0o755)
        cfg.write_text(f'[machine]\nid = "{os.urandom(16).hex()}"\ninit = "/usr/local/sbin/{init}"\n'
                       f'kill_timeout = {timeout}\n\n[network]\nmode = "none"\n')
        env.ok("start", name)
        info = json.loads(env.ok("show", name, "-o", "json"))
        assert info["Init"] == ("busybox" if init == "busybox" else "sysvinit")
        wchan = Path(f"/proc/{info['Leader']}/wchan")
        assert wait_for(lambda: "init up" in log.read_text(), 10)
        assert wait_for(lambda w=wchan, c=when: w.read_text().startswith("futex") == (c == "now"), 10)
        start = time.monotonic()
        env.ok("poweroff", name)
        elapsed = time.monotonic() - start
        assert env.running() == []
        text = log.read_text()
        assert "killed by SIGKILL" in text
        if init == "busybox":
            assert elapsed < 5, elapsed  # not the 60 s timeout
            assert "init is deadlocked" in text and "timeout" not in text
        else:
            assert 0.9 < elapsed < 5, elapsed
            assert "timeout, killing the machine" in text and "deadlocked" not in text


def test_poweroff_escalates_when_the_guest_ignores_it(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    stubborn = env.images / name / "sbin/stubborn"
    stubborn.write_text("#!/bin/sh\ntrap '' PWR TERM INT USR1 USR2 HUP\nwhile :; do sleep 1; done\n")
    stubborn.chmod(0o755)
    cfg = env.config / f"{name}.toml"
    cfg.write_text(cfg.read_text().replace("[machine]\n", "[machine]\ninit = \"/sbin/stubborn\"\nkill_timeout = 1.0\n"))
    env.ok("start", name)
    start = time.monotonic()
    env.ok("poweroff", name)
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 5, elapsed  # waited for the guest, then killed it
    assert env.running() == []
    log = (env.runtime / "logs" / f"{name}.log").read_text()
    assert "timeout, killing the machine" in log and "killed by SIGKILL" in log
