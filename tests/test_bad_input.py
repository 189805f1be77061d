"""Bad input: a one-line error, a non-zero exit, and nothing changed on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import MCTL, Env

pytestmark = pytest.mark.root

BAD_NAMES = ["", "../x", "a/b", ".hidden", "-x", "x" * 70, "a\x07b", "tab\tname"]


def assert_clean_error(r: object, *words: str) -> None:
    import subprocess

    assert isinstance(r, subprocess.CompletedProcess)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mctl: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def assert_settings_refused(env: Env, settings: str, *words: str, verbs: tuple[str, ...] = ("start",)) -> None:
    """A busybox machine with settings appended: each verb fails with a one-line error naming words,
    and nothing changes on disk or runs."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.settings(name, settings)
    before = env.tree()
    for verb in verbs:
        assert_clean_error(env.mctl(verb, name), *words)
    assert env.tree() == before and env.running() == []


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("verb", ["create", "start", "remove", "shell", "poweroff", "show"])
def test_invalid_names(env: Env, name: str, verb: str) -> None:
    before = env.tree()
    args = [verb, name] + (["--template", "busybox"] if verb == "create" else [])
    assert_clean_error(env.mctl(*args))
    assert env.tree() == before
    assert not Path("/x").exists() or verb != "create"


def test_unknown_template(env: Env) -> None:
    before = env.tree()
    assert_clean_error(env.mctl("create", env.name(), "--template", "no-such-template"), "Unknown template")
    assert env.tree() == before


def test_missing_rootfs(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    shutil.rmtree(env.images / name)
    before = env.tree()
    assert_clean_error(env.mctl("start", name), "missing")
    assert env.tree() == before
    assert_clean_error(env.mctl("start", env.name()), "No machine")


def test_second_start_refused(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    assert_clean_error(env.mctl("start", name), "already running")
    assert len(env.running()) == 1
    env.ok("poweroff", name)


def test_concurrent_starts_give_one_machine(env: Env) -> None:
    import subprocess

    name = env.name()
    env.ok("create", name, "--template", "busybox")
    procs = [subprocess.Popen([*MCTL, "start", name], env=env.environ(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(30), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(code for code, _ in results) == [0, 1, 1, 1], results
    for code, err in results:
        if code:
            assert err.startswith("mctl: Failed to start") and err.count("\n") == 1, err
    assert env.running() == [name]
    env.ok("poweroff", name)


@pytest.mark.parametrize("what", ["proc", "dev", "sys", "init"])
def test_rootfs_symlinks_pointing_out(env: Env, what: str, tmp_path: Path) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    rootfs = env.images / name
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "init":
        (rootfs / "sbin/init").unlink()
        (rootfs / "sbin/init").symlink_to("../../../../../../../../bin/busybox")
    else:
        shutil.rmtree(rootfs / what)
        (rootfs / what).symlink_to(f"../../../../../../../../{what}")
    before = env.tree()
    host_mounts = Path("/proc/self/mountinfo").read_text()
    r = env.mctl("start", name)
    assert_clean_error(r, f"/{what}" if what != "init" else "init")
    assert env.tree() == before
    assert Path("/proc/self/mountinfo").read_text() == host_mounts
    assert env.running() == []
    assert list(outside.iterdir()) == []
    # Absolute symlinks are the rootfs's own: /proc -> /proc would loop, and is refused too.
    if what != "init":
        (rootfs / what).unlink()
        (rootfs / what).symlink_to(f"/{what}")
        assert_clean_error(env.mctl("start", name))
        assert env.running() == []


def test_run_directory_errors(env: Env, tmp_path: Path) -> None:
    before = env.tree()
    assert_clean_error(env.mctl("run", "--directory", str(tmp_path / "none"), "--", "/bin/true"), "not a directory")
    assert_clean_error(env.mctl("run", "--directory", "/", "--", "/bin/true"), "host's root")
    assert_clean_error(env.mctl("run", "--directory", str(tmp_path)), "no command")
    assert env.tree() == before


def test_bad_config_file(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    cfg = env.config / f"{name}.toml"
    cfg.write_text(cfg.read_text() + "bogus_key = 1\n")
    before = env.tree()
    assert_clean_error(env.mctl("start", name), "bogus_key")
    assert env.tree() == before
    assert env.running() == []


def test_bad_template_values(env: Env) -> None:
    before = env.tree()
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", "--set", "console_login=maybe"),
                       "console_login")
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", "--set", "nope=1"), "nope")
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", "--set", "noequals"))
    assert env.tree() == before
    assert not any(os.listdir(env.images)) if env.images.exists() else True


def test_hostile_files_in_an_image_never_hang_mctl(env: Env) -> None:
    """FIFOs and endless devices where mctl reads a guest's files: a clear result, never a hang."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    rootfs = env.images / name
    for f in ("etc/os-release", "etc/hosts", "etc/group"):
        (rootfs / f).unlink()
        os.mkfifo(rootfs / f)
    (rootfs / "etc/passwd").unlink()
    (rootfs / "etc/passwd").symlink_to("/dev/zero")  # inside the machine: its own endless /dev/zero
    env.ok("start", name, timeout=30)
    assert env.ok("shell", name, "--", "echo", "alive", timeout=30).strip() == "alive"
    status = env.mctl("status", name, timeout=30)
    assert status.returncode == 0 and "State: running" in status.stdout
    assert env.mctl("list", timeout=30).returncode == 0
    env.ok("poweroff", name, timeout=30)
    # A FIFO where the machine's id is kept is refused in one line, before the machine starts.
    (rootfs / "etc/machine-id").unlink()
    os.mkfifo(rootfs / "etc/machine-id")
    r = env.mctl("start", name, timeout=30)
    assert_clean_error(r, "machine-id")
    assert env.running() == []
