"""Hotplug: the supervisor passes devices matching the machine's rules in as they appear, and takes
them out when they go.

It listens to the kernel's uevents itself (a pyudev monitor with source "kernel", its socket in the
supervisor's epoll loop) and looks devices up in sysfs, so it needs no udevd: properties that only
udev rules add (ID_VENDOR_ID, ...) are used when udevd is there, sysfs attributes otherwise.

A rule is a line of KEY=GLOB words, all of which must match:
    subsystem=usb devtype=usb_device vendor=046d product=c52b access=rw
subsystem, devtype, kernel (the device's name, e.g. loop7), vendor, product (USB or PCI ids, hex)
and any udev property in capitals (DEVNAME=/dev/loop7, ID_SERIAL=...); access is r, w, m or a
combination (default rwm).
"""

from __future__ import annotations

import fnmatch

from machined import devices, passthrough

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KEYS = ("subsystem", "devtype", "kernel", "vendor", "product", "access")


class HotplugRule:
    def __init__(self, text: str) -> None:
        self.text = text
        self.matches_: dict[str, str] = {}
        self.access = "rwm"
        for word in text.split():
            key, sep, value = word.partition("=")
            if not sep or not key or not value:
                raise ValueError(f"{word!r} in hotplug rule {text!r} is not KEY=VALUE")
            if key == "access":
                self.access = devices.parse_access(value)
            elif key in KEYS or (key.isupper() and key.replace("_", "").isalnum()):
                self.matches_[key] = value.lower() if key in ("vendor", "product") else value
            else:
                raise ValueError(f"unknown key {key!r} in hotplug rule {text!r} (known: {', '.join(KEYS)}, "
                                 "or a udev property in capitals)")
        if not self.matches_:
            raise ValueError(f"hotplug rule {text!r} matches nothing: give at least one KEY=VALUE")

    def matches(self, device: Any) -> bool:
        for key, pattern in self.matches_.items():
            if key == "subsystem":
                value = device.subsystem
            elif key == "devtype":
                value = device.device_type
            elif key == "kernel":
                value = device.sys_name
            elif key in ("vendor", "product"):
                value = _usb_pci_ids(device)[0 if key == "vendor" else 1]
            else:
                value = device.properties.get(key)
            if value is None or not fnmatch.fnmatchcase(str(value), pattern):
                return False
        return True


def _usb_pci_ids(device: Any) -> tuple[str, str]:
    """(vendor, product) in 4 lowercase hex digits, from the device or its nearest parent that has them."""
    d = device
    while d is not None:
        props = d.properties
        if props.get("ID_VENDOR_ID") and props.get("ID_MODEL_ID"):  # udev's, when udevd runs
            return props["ID_VENDOR_ID"].lower(), props["ID_MODEL_ID"].lower()
        attrs = d.attributes
        try:
            return attrs.asstring("idVendor").lower(), attrs.asstring("idProduct").lower()  # USB device
        except (KeyError, UnicodeDecodeError):
            pass
        for prop, sep in (("PRODUCT", "/"), ("PCI_ID", ":")):  # the kernel's own uevent variables
            value = props.get(prop)
            if value and sep in value:
                vendor, product = value.split(sep)[:2]
                return vendor.lower().zfill(4), product.lower().zfill(4)
        try:
            d = d.parent
        except (AttributeError, LookupError):
            return "", ""
    return "", ""


def parse(rules: tuple[str, ...]) -> list[HotplugRule]:
    return [HotplugRule(r) for r in rules]


class Watcher:
    """The supervisor's uevent watcher for one machine."""

    def __init__(self, name: str, rules: list[HotplugRule], data: dict[str, object]) -> None:
        import pyudev

        self.name = name
        self.rules = rules
        self.data = data  # the supervisor's state (cgroup, rootfs)
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source="kernel")
        self.monitor.start()  # before looking at what is there: nothing falls between the two

    def fileno(self) -> int:
        return int(self.monitor.fileno())

    def _rule_for(self, device: Any) -> HotplugRule | None:
        return next((r for r in self.rules if r.matches(device)), None)

    def _pass_in(self, device: Any, rule: HotplugRule, pidfd: int | None) -> str | None:
        node = devices.node_from_device(device, rule.access)
        if node is None:
            return None
        current = passthrough.DeviceList.load(self.name).nodes.get(node.path)
        if current is not None and current[0].rule() == node.rule():
            return None
        node.gid = passthrough.guest_gid(str(self.data.get("rootfs", "")), node.gid)
        passthrough.pass_in(self.name, self.data, node, "hotplug", pidfd)
        return f"passed in {node}"

    def present(self, pidfd: int | None = None) -> list[str]:
        """Pass in the matching devices there already (at start, before the first boot)."""
        done = []
        subsystems = {r.matches_.get("subsystem") for r in self.rules}
        if None in subsystems or any(s and any(c in s for c in "*?[") for s in subsystems):
            found = self.context.list_devices()
        else:
            found = (d for s in sorted(s for s in subsystems if s) for d in self.context.list_devices(subsystem=s))
        for device in found:
            rule = self._rule_for(device)
            if rule is not None:
                msg = self._pass_in(device, rule, pidfd)
                if msg:
                    done.append(msg)
        return done

    def handle(self, pidfd: int | None) -> list[str]:
        """Act on the uevents waiting; returns what was done, for the console log."""
        done: list[str] = []
        while True:
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as e:  # ENOBUFS: the kernel dropped uevents; look at what is there now
                return [*done, f"uevents lost ({e.strerror}), rescanning", *self.present(pidfd)]
            if device is None:
                return done
            try:
                if device.action == "remove":
                    msg = self._take_out(device, pidfd)
                elif device.action in ("add", "change"):
                    rule = self._rule_for(device)
                    msg = self._pass_in(device, rule, pidfd) if rule is not None else None
                else:
                    msg = None
            except Exception as e:  # noqa: BLE001 - one device must not bring the machine down
                msg = f"hotplug of {device.sys_path} failed: {e}"
            if msg:
                done.append(msg)

    def _take_out(self, device: Any, pidfd: int | None) -> str | None:
        for path, (node, origin) in passthrough.DeviceList.load(self.name).nodes.items():
            if origin == "hotplug" and node.syspath == device.sys_path:
                passthrough.take_out(self.name, self.data, path, pidfd)
                return f"took out {node}"
        return None
