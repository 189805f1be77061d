"""The debian template for real: bootstrap (cached across sessions), boot to systemd 'running' with
the rendered files, fast second creates, image verbs on overlay images, failed and killed bootstraps."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DEBIAN_MIRROR, MCTL, TEST_CACHE, Env
from tests.test_bad_input import assert_clean_error

pytestmark = pytest.mark.slow

# The bootstrap cache these tests share (and keep across sessions): a pristine Debian is built once.
SHARED_CACHE = TEST_CACHE / "machined-cache"


def mctl(env: Env, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return env.mctl(*args, timeout=timeout, env=env.environ(MACHINED_CACHE_DIR=str(SHARED_CACHE)))


def ok(env: Env, *args: str, timeout: float = 600) -> str:
    r = mctl(env, *args, timeout=timeout)
    assert r.returncode == 0, f"mctl {' '.join(args)}: {r.stderr}"
    return r.stdout


def create(env: Env, name: str, *args: str) -> float:
    started = time.monotonic()
    ok(env, "create", name, "--template", "debian", "--set", f"mirror={DEBIAN_MIRROR}", *args)
    return time.monotonic() - started


def boot(env: Env, name: str, *args: str) -> None:
    ok(env, "start", name, *args)
    deadline = time.monotonic() + 120
    state = ""
    while time.monotonic() < deadline:
        state = mctl(env, "shell", name, "--", "systemctl", "is-system-running", "--wait", timeout=130).stdout.strip()
        if state in ("running", "degraded"):
            break
        time.sleep(0.2)  # systemd's bus is not up yet
    failed = mctl(env, "shell", name, "--", "systemctl", "--failed", "--no-legend").stdout
    assert state == "running", failed


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("ssh")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@machined", "-f", str(d / "key")],
                   check=True)
    return d / "key", (d / "key.pub").read_text().strip()


def test_debian_bookworm_boots_with_rendered_files(env: Env, keypair: tuple[Path, str]) -> None:
    key, pub = keypair
    name = env.name("deb")
    create(env, name, "--release", "bookworm", "--set", "hostname=web1", "--set", f"ssh_authorized_keys={pub}",
           "--set", "network=static", "--set", "address=10.42.0.2/24", "--set", "gateway=10.42.0.1",
           "--set", "timezone=Europe/Paris")
    boot(env, name)

    def sh(*cmd: str) -> str:
        return ok(env, "shell", name, "--", *cmd)

    assert sh("hostname").strip() == "web1"
    assert sh("cat", "/etc/os-release").count('VERSION_CODENAME=bookworm') == 1
    network = sh("cat", "/etc/systemd/network/80-container-host0.network")
    assert "Name=host0" in network and "Address=10.42.0.2/24" in network and "Gateway=10.42.0.1" in network
    assert sh("systemctl", "is-active", "systemd-networkd", "ssh").split() == ["active", "active"]
    assert sh("cat", "/root/.ssh/authorized_keys").strip() == pub
    assert sh("stat", "-c", "%a %U", "/root/.ssh", "/root/.ssh/authorized_keys").split() == ["700", "root", "600",
                                                                                             "root"]
    assert sh("date", "+%Z").strip() in ("CET", "CEST")
    # The key really logs in: sshd (host keys made at first boot) over the machine's loopback.
    ok(env, "shell", name, "--", "sh", "-c", f"umask 077; echo '{key.read_text().strip()}' > /tmp/key")
    login = sh("ssh", "-i", "/tmp/key", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "root@127.0.0.1", "echo", "logged-in-as-$(id -un)")
    assert login.strip() == "logged-in-as-root"
    host_key = sh("cat", "/etc/ssh/ssh_host_ed25519_key.pub")
    assert json.loads(ok(env, "show", name, "-o", "json"))["OSVersion"] == "12"  # read in the machine's root
    ok(env, "poweroff", name)
    assert json.loads(ok(env, "show", name, "-o", "json"))["OS"] == "debian"  # read in the merged tree
    info = json.loads(ok(env, "list-images", "-o", "json"))
    assert [(i["name"], i["type"], i["template"]) for i in info] == [(name, "overlay", "debian")]
    # A second machine of the same kind: made from the cache in well under a second, its own ssh keys.
    other = env.name("deb")
    assert create(env, other) < 1.0
    boot(env, other)
    assert ok(env, "shell", other, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub") != host_key
    assert ok(env, "shell", other, "--", "hostname").strip() == other
    assert ok(env, "shell", other, "--", "test", "!", "-e", "/root/.ssh/authorized_keys").strip() == ""
    ok(env, "poweroff", other)


def test_overlay_image_verbs(env: Env, tmp_path: Path) -> None:
    name = env.name("deb")
    create(env, name, "--storage", "overlay")
    ok(env, "start", name)
    ok(env, "shell", name, "--", "sh", "-c", "echo one > /etc/motd; rm /etc/issue")
    ok(env, "poweroff", name)
    ok(env, "snapshot", name, "one")
    clone = env.name("clone")
    ok(env, "clone", name, clone)
    images = {i["name"]: i for i in json.loads(ok(env, "list-images", "-o", "json"))}
    assert images[clone]["type"] == "overlay" and images[clone]["usage"] < 20 << 20  # only its own layer
    ok(env, "start", "--ephemeral", clone)
    assert ok(env, "shell", clone, "--", "cat", "/etc/motd") == "one\n"
    assert mctl(env, "shell", clone, "--", "test", "-e", "/etc/issue").returncode == 1  # the deletion carried over
    ok(env, "shell", clone, "--", "sh", "-c", "echo ephemeral > /etc/motd")
    ok(env, "poweroff", clone)
    assert (env.images / clone / "etc/motd").read_text() == "one\n"
    ok(env, "start", name)
    ok(env, "shell", name, "--", "sh", "-c", "echo two > /etc/motd")
    ok(env, "poweroff", name)
    ok(env, "restore", name, "one")
    # export-tar gives the merged tree; imported, it is a self-contained directory image that boots.
    archive = tmp_path / "deb.tar.zst"
    ok(env, "export-tar", name, str(archive))
    imported = env.name("imp")
    ok(env, "import-tar", str(archive), imported)
    assert (env.images / imported / "usr/lib/systemd/systemd").exists()
    assert (env.images / imported / "etc/motd").read_text() == "one\n"
    boot(env, imported)
    assert ok(env, "shell", imported, "--", "cat", "/etc/motd") == "one\n"
    assert ok(env, "shell", imported, "--", "cat", "/etc/os-release").count("bookworm") >= 1
    ok(env, "poweroff", imported)
    # A base layer in use survives clean; an unused one goes.
    assert not any("bases" in line for line in ok(env, "clean").splitlines())
    for n in (name, clone):
        ok(env, "remove", n)
    assert any("bases" in line for line in ok(env, "clean").splitlines())
    assert [p.name for p in (env.images / ".machined/bases").iterdir() if not p.name.startswith(".")] == []


def test_directory_storage_boots(env: Env) -> None:
    name = env.name("deb")
    assert create(env, name, "--storage", "directory", "--set", "network=none") < 5.0
    assert (env.images / name / "usr/lib/systemd/systemd").exists()
    boot(env, name)
    assert mctl(env, "shell", name, "--", "systemctl", "is-active", "systemd-networkd").stdout.strip() == "inactive"
    ok(env, "poweroff", name)
    # Read-only, systemd still boots to 'running' and nothing can write the tree.
    ok(env, "read-only", name, "yes")
    boot(env, name)
    r = mctl(env, "shell", name, "--", "touch", "/etc/written")
    assert r.returncode != 0 and "Read-only file system" in r.stdout + r.stderr
    ok(env, "poweroff", name)
    assert not (env.images / name / "etc/written").exists()


def test_trixie_boots(env: Env) -> None:
    name = env.name("trx")
    create(env, name, "--release", "trixie")
    boot(env, name)
    assert "trixie" in ok(env, "shell", name, "--", "cat", "/etc/os-release")
    ok(env, "poweroff", name)


def test_failed_bootstrap_leaves_nothing(env: Env) -> None:
    name = env.name()
    before = env.tree()
    r = env.mctl("create", name, "--template", "debian", "--set", "mirror=http://127.0.0.1:9/debian", timeout=300)
    assert_clean_error(r, "Failed to bootstrap debian bookworm")
    assert not (env.images / name).exists() and not (env.config / f"{name}.toml").exists()
    top = env.cache / "bootstrap"
    assert [p.name for p in top.iterdir() if not p.name.endswith((".log", ".lock"))] == []
    assert {k for k in env.tree() if k not in before and not k.startswith(str(top))} <= {
        str(env.images / ".machined"), str(env.images / ".machined/tmp"), str(env.runtime / "locks")}


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{pid}: {cmdline}")
    return found


def test_sigkill_during_bootstrap(env: Env) -> None:
    """mctl killed while mmdebstrap runs: the tool, its apt and dpkg and its mounts go too; no machine."""
    name = env.name()
    top = env.cache / "bootstrap"
    proc = subprocess.Popen([*MCTL, "create", name, "--template", "debian",
                             "--set", f"mirror={DEBIAN_MIRROR}"], env=env.environ(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(top.glob(".*.tmp-*/var/cache/apt")):
        time.sleep(0.1)
    time.sleep(2)  # well into downloading or unpacking
    tmp = next(top.glob(".*.tmp-*"))
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _processes_mentioning(str(tmp)):
        time.sleep(0.1)
    assert _processes_mentioning(str(tmp)) == []
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp) in line] == []
    assert json.loads(env.ok("list-images", "-o", "json")) == []
    assert not (env.config / f"{name}.toml").exists()
    assert any(str(tmp) == line.removeprefix("Removed ") for line in env.ok("clean").splitlines())
    assert not tmp.exists()
