"""Per-machine settings: frozen records (machined.records: what frozen dataclasses give, without the
import), read from and written to NAME.toml, validated strictly.

An unknown key, a value of the wrong type or an impossible value is an error naming the file and
the key; nothing is guessed.
"""

from __future__ import annotations

import os

from machined import paths, plaintoml, records
from machined.log import MachinedError, die
from machined.records import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str | int) -> int:
    """'64M' -> 67108864. Plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("must be a size such as 64M")
    s = value.strip().upper().removesuffix("B").removesuffix("I")
    suffix = s[-1:] if s[-1:] in _SIZE_SUFFIXES else ""
    number = s[: len(s) - len(suffix)]
    try:
        n = float(number)
    except ValueError:
        raise ValueError(f"{value!r} is not a size such as 64M") from None
    if n < 0:
        raise ValueError("must not be negative")
    return int(n * _SIZE_SUFFIXES[suffix])


@record
class Network:
    mode: str = "bridge"            # none, veth, bridge[:NAME], interface:IF, macvlan:IF (see netconfig)
    address: str = ""               # fixed IPv4 address in the bridge's subnet; default: a stable lease
    ports: tuple[str, ...] = ()     # forwards, '[tcp|udp:]HOSTPORT[:MACHINEPORT]'
    pod: str = ""                   # share network, IPC and UTS namespaces with the pod's other machines

    def validate(self) -> None:
        if self.mode == "none" and not (self.ports or self.pod or self.address):
            return  # nothing to parse: keeps the loopback-only path free of the network modules
        from machined import netconfig

        netconfig.check_machine_network(self.mode, self.address, self.ports, self.pod)


def with_network(base: Network, mode: str | None = None, ports: list[str] | None = None, pod: str | None = None,
                 address: str | None = None) -> Network:
    """base with the network options of create/start applied (--network, --port, --pod, --address)."""
    changes: dict[str, Any] = {k: v for k, v in (("mode", mode), ("pod", pod), ("address", address)) if v is not None}
    if ports:
        changes["ports"] = tuple(ports)
    net = records.replace(base, **changes)
    try:
        net.validate()
    except ValueError as e:
        die(f"Invalid network setting: {e}")
    return net


@record
class Resources:
    """Limits on the machine's cgroup, with systemd's meanings (see machined.resources)."""

    memory_max: int | None = None
    memory_high: int | None = None
    memory_swap_max: int | None = None
    cpu_weight: int | None = None     # 1..10000, default 100
    cpu_quota: str | None = None      # "50%" of one CPU
    cpuset_cpus: str | None = None    # "0-1,3"
    tasks_max: int | None = None
    io_weight: int | None = None      # 1..10000, default 100

    def validate(self) -> None:
        if self != Resources():
            from machined import resources

            resources.validate(self)


@record
class Devices:
    allow: tuple[str, ...] = ()    # '/dev/fuse rw', 'char-usb_device rw', 'block-loop r', 'c 10:232 rwm'
    hotplug: tuple[str, ...] = ()  # 'subsystem=usb vendor=046d product=c52b access=rw' (see machined.hotplug)

    def validate(self) -> None:
        if self.allow:
            from machined import devices

            for entry in self.allow:
                devices.parse_entry(entry)
        if self.hotplug:
            from machined import hotplug

            hotplug.parse(self.hotplug)


@record
class MachineConfig:
    name: str
    id: str
    template: str = ""
    release: str = ""
    created: str = ""
    base: str = ""  # an overlay image's shared base layer (IMAGE_DIR/.machined/bases/BASE); "" for a full tree
    init: str = "/sbin/init"
    read_only: bool = False
    kill_timeout: float = 30.0  # seconds a poweroff may take before the machine is killed
    bind: tuple[str, ...] = ()  # host paths bound into the machine: "/host/path[:/guest/path[:ro|rw]]"
    nesting: bool = False       # the machine may run container managers (systemd, mctl) of its own
    network: Network = field(default_factory=Network)
    resources: Resources = field(default_factory=Resources)
    devices: Devices = field(default_factory=Devices)

    def validate(self) -> None:
        paths.check_name(self.name)
        if len(self.id) != 32 or any(c not in "0123456789abcdef" for c in self.id):
            raise ValueError(f"id {self.id!r} is not 32 lowercase hex digits")
        if self.base and paths.name_error(self.base):
            raise ValueError(f"base {self.base!r} is not a valid base layer name")
        if not self.init.startswith("/"):
            raise ValueError(f"init {self.init!r} is not an absolute path")
        if self.kill_timeout <= 0:
            raise ValueError("kill_timeout must be positive")
        self.network.validate()
        self.resources.validate()
        self.devices.validate()
        if self.bind:
            from machined import binds

            for entry in self.bind:
                binds.parse(entry)


_SECTIONS: dict[str, type] = {"network": Network, "resources": Resources, "devices": Devices}
_SIZE_KEYS = {"memory_max", "memory_high", "memory_swap_max"}


def _coerce(cls: type, section: str, data: dict[str, Any], where: str, **fixed: Any) -> Any:
    known = {f.name: f for f in records.fields(cls)}
    kwargs: dict[str, Any] = dict(fixed)
    for key, value in data.items():
        label = f"{section}.{key}" if section else key
        if key in _SECTIONS and not section:
            if not isinstance(value, dict):
                die(f"Invalid setting {label} in {where}: must be a table")
            kwargs[key] = _coerce(_SECTIONS[key], key, value, where)
            continue
        if key not in known or key == "name":
            die(f"Invalid setting {label} in {where}: unknown key")
        ftype = str(known[key].type)
        try:
            if key in _SIZE_KEYS:
                value = parse_size(value)
            elif ftype.startswith("bool"):
                if not isinstance(value, bool):
                    raise ValueError("must be true or false")
            elif ftype.startswith("int"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError("must be a non-negative integer")
            elif ftype.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError("must be a number")
                value = float(value)
            elif ftype.startswith("tuple"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("must be a list of strings")
                value = tuple(value)
            elif ftype.startswith("str"):
                if not isinstance(value, str):
                    raise ValueError("must be a string")
        except ValueError as e:
            die(f"Invalid setting {label} in {where}: {e}")
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(name: str, data: dict[str, Any], where: str) -> MachineConfig:
    machine = dict(data.get("machine", {}))
    for key, value in data.items():
        if key == "machine":
            continue
        if key not in _SECTIONS:
            die(f"Invalid setting {key} in {where}: unknown section")
        machine[key] = value
    if "id" not in machine:
        die(f"Invalid configuration {where}: machine.id is missing")
    cfg: MachineConfig = _coerce(MachineConfig, "", machine, where, name=name)
    try:
        cfg.validate()
    except (ValueError, MachinedError) as e:
        die(f"Invalid configuration {where}: {e}")
    return cfg


def load(name: str) -> MachineConfig:
    path = paths.config_path(name)
    try:
        data = plaintoml.load(path)
    except FileNotFoundError:
        die(f"No machine named {name!r}", hint=f"'mctl create {name} --template busybox' makes one")
    return from_dict(name, data, path)


def exists(name: str) -> bool:
    return os.path.exists(paths.config_path(name))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        out = value.replace("\\", "\\\\").replace('"', '\\"')
        for ch in "\n\t\r\b\f":
            out = out.replace(ch, {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}[ch])
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in out):
            out = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in out)
        return f'"{out}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(cfg: MachineConfig) -> str:
    """Only non-default values are written, so files stay short and defaults can evolve."""
    lines = ["[machine]"]
    sections: list[str] = []
    for f in records.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "name":
            continue
        if f.name in _SECTIONS:
            body = [f"{g.name} = {_toml_value(getattr(value, g.name))}" for g in records.fields(value)
                    if getattr(value, g.name) != getattr(_SECTIONS[f.name](), g.name)]
            if body:
                sections += ["", f"[{f.name}]", *body]
            continue
        default = f.default if f.default is not records.MISSING else None
        if f.name == "id" or value != default:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines + sections) + "\n"


def save(cfg: MachineConfig) -> None:
    """Write atomically: a crash never leaves a half-written file."""
    path = paths.config_path(cfg.name)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(to_toml(cfg))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_machine_id() -> str:
    return os.urandom(16).hex()
