"""Unit tests: no root, no kernel features; run in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from machined import config, devices, inits, mounts, paths
from machined.log import MachinedError

BAD_NAMES = ["", "../x", "a/b", ".hidden", "-x", "x" * 70, "a\x01b", "a\nb", "..", "a..b", "a b", "a.", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_refused(name: str) -> None:
    assert paths.name_error(name) is not None
    with pytest.raises(MachinedError):
        paths.image_path(name)


@pytest.mark.parametrize("name", ["t1", "web-01", "a", "x" * 64, "deb_12.box"])
def test_valid_names(name: str) -> None:
    assert paths.name_error(name) is None


def test_parse_size() -> None:
    assert config.parse_size("64M") == 64 << 20
    assert config.parse_size("1G") == 1 << 30
    assert config.parse_size("512K") == 512 << 10
    assert config.parse_size(4096) == 4096
    with pytest.raises(ValueError):
        config.parse_size("lots")


def test_config_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACHINED_CONFIG_DIR", str(tmp_path))
    cfg = config.MachineConfig(name="m1", id="0123456789abcdef0123456789abcdef", template="busybox",
                               read_only=True, resources=config.Resources(memory_max=64 << 20),
                               devices=config.Devices(allow=("c 10:232 rwm",)))
    config.save(cfg)
    assert config.load("m1") == cfg
    text = (tmp_path / "m1.toml").read_text()
    assert "read_only = true" in text and "[resources]" in text


@pytest.mark.parametrize("body, words", [
    ('[machine]\nid = "0123456789abcdef0123456789abcdef"\nbogus = 1\n', "unknown key"),
    ('[machine]\nid = "xyz"\n', "32 lowercase hex"),
    ('[machine]\nid = "0123456789abcdef0123456789abcdef"\nread_only = "yes"\n', "true or false"),
    ('[machine]\nid = "0123456789abcdef0123456789abcdef"\n[resources]\nmemory_max = "lots"\n', "size"),
    ('[machine]\nid = "0123456789abcdef0123456789abcdef"\n[nonsense]\nx = 1\n', "unknown section"),
    ('[machine\n', "Invalid configuration"),
    ('[machine]\nid = "0123456789abcdef0123456789abcdef"\ninit = "sbin/init"\n', "absolute"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, words: str) -> None:
    monkeypatch.setenv("MACHINED_CONFIG_DIR", str(tmp_path))
    (tmp_path / "m1.toml").write_text(body)
    with pytest.raises(MachinedError) as e:
        config.load("m1")
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_resolve_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd").write_text("")
    (root / "sbin").symlink_to("usr/sbin")
    (root / "usr/sbin").mkdir()
    (root / "usr/sbin/init").symlink_to("/usr/lib/systemd/systemd")  # absolute: means inside the root
    (root / "escape").symlink_to("../../../../../etc")
    (root / "loop").symlink_to("/loop")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert mounts.resolve_path(fd, "/sbin/init") == "/usr/lib/systemd/systemd"
        with pytest.raises(mounts.EscapeError):
            mounts.resolve(fd, "escape/passwd")
        with pytest.raises(OSError):
            mounts.resolve(fd, "loop")
        with pytest.raises(OSError, match="symbolic link"):
            mounts.resolve_dir(fd, "sbin")
    finally:
        os.close(fd)


def test_init_kind(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_text("")
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin/init").symlink_to("../bin/busybox")
    assert inits.detect(str(tmp_path), "/sbin/init") == "busybox"
    assert inits.poweroff_signal("busybox") == __import__("signal").SIGUSR2


SYS_FUTEX = {"x86_64": 202, "aarch64": 98}[os.uname().machine]
# A real process asleep on a private futex that nothing wakes (one thread, or two), or in a sleep.
FUTEX_WAIT = (
    "import ctypes, sys, threading\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "word = ctypes.c_uint32(0)\n"
    "if sys.argv[1] == 'two': threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
    "print('ready', flush=True)\n"
    f"while True: libc.syscall({SYS_FUTEX}, ctypes.byref(word), 128, 0, None)  # FUTEX_WAIT_PRIVATE\n"
)


@pytest.mark.parametrize(("threads", "stuck"), [("one", True), ("two", False), ("sleep", False)])
def test_a_solitary_init_asleep_on_a_futex_is_deadlocked(threads: str, stuck: bool) -> None:
    argv = ["sleep", "60"] if threads == "sleep" else [sys.executable, "-c", FUTEX_WAIT, threads]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        if threads != "sleep":
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        wchan = Path(f"/proc/{proc.pid}/wchan")  # (its main thread's)

        def asleep() -> bool:  # where it will stay
            where = wchan.read_text()
            return where.startswith("futex") if threads != "sleep" else where not in ("", "0")
        deadline = time.monotonic() + 10
        while not asleep() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert asleep()
        assert inits.deadlocked(proc.pid) is stuck
    finally:
        proc.kill()
        proc.wait()
    assert inits.deadlocked(proc.pid) is False  # gone


def test_device_rules_and_program() -> None:
    rule = devices.Rule.parse("c 136:* rw")
    assert str(rule) == "c 136:* rw"
    with pytest.raises(MachinedError):
        devices.Rule.parse("x 1:2 rwm")
    with pytest.raises(MachinedError):
        devices.Rule.parse("c 1:2 rwq")
    prog = devices.program(devices.DEFAULT)
    assert len(prog) % 8 == 0 and len(prog) > 8 * len(devices.DEFAULT)
