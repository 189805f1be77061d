"""The systemd side without a bus: unit names, DeviceAllow=, unit properties, the unit file, settings;
and mctl enable/disable against directories of the test's own (on this host systemd is not PID 1)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined import binds, config, devices, systemd
from machined.log import MachinedError
from machined.supervisor import Plan
from tests.conftest import REPO, TOKEN, Env
from tests.test_bad_input import assert_clean_error


@pytest.mark.parametrize(("name", "escaped"), [
    ("web", "web"), ("web-01", "web\\x2d01"), ("deb_12.box", "deb_12.box"), ("a\\b", "a\\x5cb"),
    (".x", "\\x2ex"), ("a/b", "a-b"), ("é", "\\xc3\\xa9"),
])
def test_unit_name_escape_like_systemd(name: str, escaped: str) -> None:
    assert systemd.escape(name) == escaped


def test_unit_names() -> None:
    assert systemd.scope_unit("a-b") == "machine-a\\x2db.scope"
    assert systemd.service_unit("a-b") == "machined@a\\x2db.service"


def test_unit_properties_carry_devices_and_limits() -> None:
    cfg = config.from_dict("m", {"machine": {"id": "0" * 32}, "resources": {
        "memory_max": "64M", "memory_high": "48M", "tasks_max": 10, "cpu_weight": 20, "cpu_quota": "50%",
        "cpuset_cpus": "0,9", "io_weight": 300}}, "test")
    plan = Plan(name="m", rootfs="/x", machine_id=cfg.id, argv=["/sbin/init"], boot=True, init_kind="busybox",
                config=cfg, limits=cfg.resources, rules=(*devices.DEFAULT, devices.Rule.parse("c 10:232 rw")))
    props = {k: (sig, v) for k, sig, v in systemd.unit_properties(plan)}
    assert props["MemoryMax"] == ("t", 64 << 20) and props["MemoryHigh"] == ("t", 48 << 20)
    assert props["TasksMax"] == ("t", 10) and props["CPUWeight"] == ("t", 20) and props["IOWeight"] == ("t", 300)
    assert props["CPUQuotaPerSecUSec"] == ("t", 500000)
    assert props["AllowedCPUs"] == ("ay", [0b1, 0b10])  # CPUs 0 and 9
    assert props["DevicePolicy"] == ("s", "closed")
    allow = props["DeviceAllow"][1]
    assert ("/dev/char/10:232", "rw") in allow and ("char-pts", "rwm") in allow and ("char-*", "m") in allow
    # Lifting limits at runtime: every key named, the unset ones as systemd's infinity.
    lifted = {k: v for k, _, v in systemd.limit_properties(config.Resources(), ("memory_max", "cpu_quota"))}
    assert lifted == {"MemoryMax": systemd.UNSET, "CPUQuotaPerSecUSec": systemd.UNSET}


def test_forced_cgroupfs_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACHINED_SYSTEMD", "no")
    assert not systemd.available()


def test_unit_file() -> None:
    text = (REPO / "units/machined@.service").read_text()
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines() if "=" in line
             and not line.startswith("#")}
    assert lines["Type"] == "notify" and lines["KillMode"] == "mixed" and lines["WantedBy"] == "machines.target"
    assert lines["ExecStart"] == "@MCTL@ start --foreground %I"  # install.sh puts in mctl's path


@pytest.mark.parametrize(("section", "values", "why"), [
    ("machine", {"bind": ["x"]}, "absolute"),
    ("machine", {"bind": "/a:/b"}, "list of strings"),
    ("machine", {"nesting": "yes"}, "true or false"),
])
def test_bad_settings(section: str, values: dict[str, object], why: str) -> None:
    data: dict[str, object] = {"machine": {"id": "0" * 32}}
    data.setdefault(section, {}).update(values)  # type: ignore[attr-defined]
    with pytest.raises(MachinedError, match=why):
        config.from_dict("m", data, "test")


def test_bind_syntax() -> None:
    b = binds.parse("/srv/data")
    assert (b.source, b.target, b.read_only) == ("/srv/data", "/srv/data", False)
    b = binds.parse("/srv/data/:/mnt//x:ro")
    assert (b.source, b.target, b.read_only) == ("/srv/data", "/mnt/x", True)


# --- mctl enable / disable (root: mctl refuses to run otherwise) -----------------------------------

def _unit_env(env: Env, tmp_path: Path, installed: bool = True) -> dict[str, str]:
    unitdir, confdir = tmp_path / "units", tmp_path / "etc"
    unitdir.mkdir()
    confdir.mkdir()
    if installed:
        (unitdir / "machined@.service").write_text((REPO / "units/machined@.service").read_text())
    return env.environ(MACHINED_UNITDIR=str(unitdir), MACHINED_ENABLE_DIR=str(confdir))


@pytest.mark.root
def test_enable_disable_links(env: Env, tmp_path: Path) -> None:
    name = env.name("en-")
    env.ok("create", name, "--template", "busybox")
    e = _unit_env(env, tmp_path)
    link = tmp_path / "etc/machines.target.wants" / systemd.service_unit(name)
    r = env.mctl("enable", name, env=e)
    assert r.returncode == 0 and str(link) in r.stdout
    assert link.is_symlink() and Path(link.readlink()) == tmp_path / "units/machined@.service"
    assert env.mctl("enable", name, env=e).stdout == ""  # already: nothing to say, nothing changed
    r = env.mctl("disable", name, env=e)
    assert r.returncode == 0 and not link.exists() and "Removed" in r.stdout
    assert env.mctl("disable", name, env=e).returncode == 0


@pytest.mark.root
def test_enable_bad_input(env: Env, tmp_path: Path) -> None:
    e = _unit_env(env, tmp_path, installed=False)
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    before = env.tree(), sorted(tmp_path.rglob("*"))
    assert_clean_error(env.mctl("enable", name, env=e), "machined@.service is not installed")
    assert_clean_error(env.mctl("enable", env.name(), env=e), "No machine named")
    assert_clean_error(env.mctl("enable", "../x", env=e), "Invalid machine name")
    assert (env.tree(), sorted(tmp_path.rglob("*"))) == before


@pytest.fixture
def bus_daemon(tmp_path: Path) -> Iterator[str]:
    """A real dbus-daemon of the test's own, listening on a path and on an abstract socket."""
    conf = tmp_path / "bus.conf"
    conf.write_text(
        "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n"
        " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
        f"<busconfig><type>session</type><listen>unix:path={tmp_path}/bus</listen>"
        f"<listen>unix:abstract=/machined-test/{TOKEN}</listen><auth>EXTERNAL</auth>"
        "<policy context=\"default\"><allow send_destination=\"*\"/><allow receive_sender=\"*\"/><allow own=\"*\"/>"
        "</policy></busconfig>\n")
    proc = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}", "--print-address"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("unix:")
        yield str(tmp_path / "bus")
    finally:
        proc.terminate()
        proc.wait(10)


def test_bus_client_talks_to_a_real_bus(bus_daemon: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd.Bus drives the socket itself (dbus-fast marshals): path and abstract addresses, the
    first usable entry of a list, replies, properties, error replies and no bus at all."""
    for address in (f"unix:path={bus_daemon}", f"unix:abstract=/machined-test/{TOKEN}",
                    f"tcp:host=localhost,port=1;unix:path={bus_daemon}"):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        bus = systemd.Bus()
        try:
            assert re.fullmatch(r"[0-9a-f]{32}", bus.call(systemd.DBUS, "GetId")[0])
            assert "org.freedesktop.DBus" in bus.call(systemd.DBUS, "ListNames")[0]
            assert "org.freedesktop.DBus.Monitoring" in bus.get(systemd.DBUS, systemd.DBUS[1], systemd.DBUS[2],
                                                                "Interfaces")
            with pytest.raises(systemd.CallError) as e:
                bus.call(systemd.MACHINED, "ListMachines")
            assert e.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"
            assert bus.call(systemd.DBUS, "NameHasOwner", "s", ["org.freedesktop.DBus"]) == [True]  # still in step
        finally:
            bus.close()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={bus_daemon}.missing")
    with pytest.raises(systemd.NoBus, match=r"Failed to connect to the system bus at unix:path=.*No such file"):
        systemd.Bus()


def test_bus_that_does_not_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bus socket nobody answers on: a clear error once the timeout ran out, not a hang."""
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "mute"))
    server.listen()
    monkeypatch.setattr(systemd, "TIMEOUT", 1.0)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/mute")
    try:
        with pytest.raises(systemd.NoBus, match=r"system bus at unix:path=.*/mute: no answer within 1 s"):
            systemd.Bus()
    finally:
        server.close()
