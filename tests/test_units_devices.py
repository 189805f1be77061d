"""Unit tests of the device and resource settings: no root; devices are the host's own, read from sysfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from machined import config, devices, hotplug, resources
from machined.log import MachinedError


@pytest.mark.parametrize("text, expected", [
    ("/dev/fuse", ("node", "/dev/fuse", "rwm")),
    ("/dev/dri/renderD128 wr", ("node", "/dev/dri/renderD128", "rw")),
    ("char-usb_device rw", ("class", "char-usb_device", "rw")),
    ("block-loop r", ("class", "block-loop", "r")),
    ("c 10:232 rwm", ("rule", "c 10:232", "rwm")),
    ("b 7:* m", ("rule", "b 7:*", "m")),
])
def test_parse_entry(text: str, expected: tuple[str, str, str]) -> None:
    assert devices.parse_entry(text) == expected


@pytest.mark.parametrize("text", ["/etc/passwd", "/dev/../etc/shadow", "/dev/x/./y", "dev/null", "/dev/null rx",
                                  "char-", "/dev/pts/0", "/dev/null rw extra", "/dev/\x01"])
def test_parse_entry_refuses(text: str) -> None:
    with pytest.raises((ValueError, MachinedError)):
        devices.parse_entry(text)


def test_resolve_node_and_class() -> None:
    node = devices.resolve_node("/dev/null", "rw")
    assert (node.kind, node.major, node.minor, node.mode, node.access) == ("c", 1, 3, 0o666, "rw")
    assert node.syspath.endswith("/mem/null") and str(node.rule()) == "c 1:3 rw"
    assert devices.Node.from_state(node.to_state()).to_state() == node.to_state()
    assert [str(r) for r in devices.resolve_class("char-mem", "r")] == ["c 1:* r"]
    with pytest.raises(MachinedError, match="not a device node"):
        devices.resolve_node("/dev/pts", "rw")
    with pytest.raises(MachinedError, match="no char driver"):
        devices.resolve_class("char-no_such_driver", "r")


def test_device_allow_for_systemd() -> None:
    rules = [devices.Rule.parse(t) for t in ("c 1:3 rwm", "c 136:* rw", "b *:* m", "a *:* r")]
    assert devices.device_allow(rules) == [("/dev/char/1:3", "rwm"), ("char-pts", "rw"), ("block-*", "m"),
                                           ("char-*", "r"), ("block-*", "r")]


def test_bpf_program_shape() -> None:
    code = devices.program(devices.DEFAULT)
    assert len(code) % 8 == 0 and code[-8:] == bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # ends in exit
    assert devices.program([]) != code


def test_hotplug_rules_match_real_devices() -> None:
    import pyudev

    null = pyudev.Devices.from_device_file(pyudev.Context(), "/dev/null")
    assert hotplug.HotplugRule("subsystem=mem kernel=nul?").matches(null)
    assert hotplug.HotplugRule("DEVNAME=/dev/null").matches(null)
    assert hotplug.HotplugRule("MAJOR=1 MINOR=3 access=r").access == "r"
    assert not hotplug.HotplugRule("subsystem=block").matches(null)
    assert not hotplug.HotplugRule("vendor=046d").matches(null)  # no USB or PCI ids anywhere up
    usb = [d for d in pyudev.Context().list_devices(subsystem="usb", DEVTYPE="usb_device")]
    for d in usb[:1]:
        vendor = d.attributes.asstring("idVendor")
        assert hotplug.HotplugRule(f"subsystem=usb vendor={vendor.upper()}").matches(d)


@pytest.mark.parametrize("text, words", [
    ("", "matches nothing"), ("subsystem", "KEY=VALUE"), ("colour=red", "unknown key"),
    ("kernel=x access=z", "access"), ("lower_case=1", "unknown key"),
])
def test_hotplug_rule_refused(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        hotplug.HotplugRule(text)


def test_limit_parsing() -> None:
    assert resources.parse_assignment("memory_max=64M") == ("memory_max", 64 << 20)
    assert resources.parse_assignment("MemoryMax=1G") == ("memory_max", 1 << 30)
    assert resources.parse_assignment("tasks-max=max") == ("tasks_max", None)
    assert resources.parse_assignment("cpu_quota=150%") == ("cpu_quota", "150%")
    assert resources.parse_cpus("0-2,5") == [0, 1, 2, 5]
    assert resources.parse_quota("50%") == 50.0
    assert resources._quota_us("0.1%") == "1000" and resources._quota_us("250%") == "250000"
    assert [resources._bfq_weight(w) for w in (1, 100, 10000)] == [1, 100, 1000]
    for bad in ("memory_max", "nope=1", "tasks_max=x", "memory_max=lots"):
        with pytest.raises(MachinedError):
            resources.parse_assignment(bad)


def test_config_round_trip_with_devices_and_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACHINED_CONFIG_DIR", str(tmp_path))
    cfg = config.MachineConfig(
        name="m1", id="0123456789abcdef0123456789abcdef",
        resources=config.Resources(memory_max=64 << 20, memory_high=48 << 20, cpu_weight=50, cpu_quota="50%",
                                   cpuset_cpus="0", tasks_max=100, io_weight=200),
        devices=config.Devices(allow=("/dev/fuse rw", "block-loop r"), hotplug=("subsystem=usb vendor=046d",)))
    config.save(cfg)
    assert config.load("m1") == cfg
