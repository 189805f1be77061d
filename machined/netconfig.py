"""Network settings: the host's (bridges, subnets, hosts file) and a machine's (mode, address, ports, pod).

The host's settings live in MACHINED_CONFIG_DIR/machined.conf (TOML; not NAME.toml, which would be
a machine's), so tests and users choose their own bridge names and subnets:

    [network]
    default_bridge = "mbr0"
    hosts_file = "/etc/hosts"        # "" leaves the host's name resolution alone

    [network.bridges.mbr0]
    subnet = "10.151.0.0/24"         # machines' addresses; the gateway is the host's
    gateway = ""                     # default: the subnet's first address
    ipv6_subnet = ""                 # e.g. "fd51:1::/64"
    nat = true                       # masquerade traffic leaving the bridge (else: not forwarded)
    keep = true                      # keep the bridge when its last machine stops

No heavy imports: this runs on the start path in mctl itself, before anything is created.
"""

from __future__ import annotations

import os

from machined import paths
from machined.log import die
from machined.records import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from machined.inet import Address, Network  # (imported where used: a start with network none needs none)

IFNAMSIZ = 16
DEFAULT_BRIDGE = "mbr0"
DEFAULT_SUBNET = "10.151.0.0/24"
MODES = ("none", "veth", "bridge", "interface", "macvlan")


def ifname_error(name: str) -> str | None:
    """Why name cannot be a network interface name (the kernel's dev_valid_name, ASCII only)."""
    if not name:
        return "name is empty"
    if len(name) >= IFNAMSIZ:
        return f"name is longer than {IFNAMSIZ - 1} characters"
    if name in (".", ".."):
        return "name is '.' or '..'"
    bad = sorted({c for c in name if not (c.isascii() and c.isprintable()) or c in "/: "})
    if bad:
        return f"name contains {', '.join(repr(c) for c in bad[:3])}"
    return None


def check_ifname(name: str, what: str = "interface") -> str:
    reason = ifname_error(name)
    if reason:
        die(f"Invalid {what} name {name!r}: {reason}")
    return name


# --- a machine's setting ------------------------------------------------------------------------

class Mode:
    """A parsed network mode: kind ('none', 'veth', 'bridge', 'interface', 'macvlan') and its link."""

    def __init__(self, kind: str, link: str = "") -> None:
        self.kind, self.link = kind, link

    def __str__(self) -> str:
        return f"{self.kind}:{self.link}" if self.link else self.kind


def parse_mode(text: str) -> Mode:
    kind, sep, link = text.partition(":")
    if kind not in MODES:
        raise ValueError(f"network mode {text!r} is not one of none, veth, bridge[:NAME], interface:IF, macvlan:IF")
    if kind in ("interface", "macvlan") and not link:
        raise ValueError(f"network mode {kind} needs an interface: {kind}:IF")
    if kind in ("none", "veth") and sep:
        raise ValueError(f"network mode {kind} takes no interface")
    if link:
        reason = ifname_error(link)
        if reason:
            raise ValueError(f"invalid {'bridge' if kind == 'bridge' else 'interface'} name {link!r}: {reason}")
    return Mode(kind, link)


class Port:
    """A port forward: protocol, host port, machine port."""

    def __init__(self, proto: str, host: int, machine: int) -> None:
        self.proto, self.host, self.machine = proto, host, machine

    @property
    def key(self) -> str:
        return f"{self.proto}:{self.host}"

    def __str__(self) -> str:
        return f"{self.proto}:{self.host}:{self.machine}"


def parse_port(text: str) -> Port:
    """'[tcp|udp:]HOSTPORT[:MACHINEPORT]', as systemd-nspawn's --port."""
    parts = text.split(":")
    proto = "tcp"
    if parts[0] in ("tcp", "udp"):
        proto = parts.pop(0)
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"port {text!r} is not [tcp|udp:]HOSTPORT[:MACHINEPORT]")
    numbers = []
    for p in parts:
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise ValueError(f"port {text!r}: {p!r} is not a port number (1-65535)")
        numbers.append(int(p))
    return Port(proto, numbers[0], numbers[-1])


def check_machine_network(mode: str, address: str, ports: tuple[str, ...], pod: str) -> None:
    """Validate a machine's [network] settings (ValueError with the reason)."""
    m = parse_mode(mode)
    if address:
        if m.kind not in ("bridge", "veth"):
            raise ValueError(f"an address needs network mode bridge or veth, not {mode}")
        from machined.inet import Address

        try:
            Address.parse(address)
        except ValueError:
            raise ValueError(f"address {address!r} is not an IPv4 address") from None
    seen: set[str] = set()
    for text in ports:
        port = parse_port(text)
        if port.key in seen:
            raise ValueError(f"host port {port.key} is forwarded twice")
        seen.add(port.key)
    if ports and m.kind not in ("bridge", "veth") and not pod:
        raise ValueError(f"port forwards need network mode bridge or veth, not {mode}")
    if pod and paths.name_error(pod):
        raise ValueError(f"invalid pod name {pod!r}: {paths.name_error(pod)}")


# --- the host's settings ------------------------------------------------------------------------

@record
class Bridge:
    name: str
    subnet: Network
    gateway: Address
    ipv6_subnet: Network | None = None
    nat: bool = True
    keep: bool = True

    @property
    def gateway6(self) -> Address | None:
        return None if self.ipv6_subnet is None else self.ipv6_subnet.network_address + 1

    def address6(self, address: Address) -> Address | None:
        """A machine's IPv6 address: its IPv4 host number in the IPv6 subnet (stable with it)."""
        if self.ipv6_subnet is None:
            return None
        return self.ipv6_subnet.network_address + (int(address) - int(self.subnet.network_address))

    def to_json(self) -> dict[str, object]:
        """What the network helper works from (plain values: it does not load this module)."""
        return {"name": self.name, "subnet": str(self.subnet), "gateway": str(self.gateway),
                "ipv6_subnet": str(self.ipv6_subnet or ""), "gateway6": str(self.gateway6 or ""), "nat": self.nat,
                "keep": self.keep}


@record
class HostNetwork:
    default_bridge: str = DEFAULT_BRIDGE
    hosts_file: str = "/etc/hosts"
    bridges: dict[str, Bridge] = field(default_factory=dict)

    def bridge(self, name: str | None) -> Bridge | None:
        """The configured bridge name (None: the default one); the default exists even unconfigured."""
        name = name or self.default_bridge
        if name in self.bridges:
            return self.bridges[name]
        if name == self.default_bridge:
            return _bridge(name, {}, "built-in default")
        return None


def host_config_path() -> str:
    return os.path.join(paths.config_dir(), "machined.conf")


def _bridge(name: str, data: dict[str, object], where: str) -> Bridge:
    unknown = set(data) - {"subnet", "gateway", "ipv6_subnet", "nat", "keep"}
    if unknown:
        die(f"Invalid setting network.bridges.{name}.{sorted(unknown)[0]} in {where}: unknown key")
    check_ifname(name, "bridge")
    from machined.inet import Address, Network

    try:
        subnet = Network.parse(str(data.get("subnet", DEFAULT_SUBNET)))
        if subnet.prefixlen > 29:
            raise ValueError(f"subnet {subnet} is too small (at most /29)")
        gw_text = str(data.get("gateway") or "")
        gateway = Address.parse(gw_text) if gw_text else subnet.network_address + 1
        if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
            raise ValueError(f"gateway {gateway} is not a host address of {subnet}")
        v6_text = str(data.get("ipv6_subnet") or "")
        v6 = Network.parse(v6_text, 6) if v6_text else None
        if v6 is not None and v6.prefixlen > 120:
            raise ValueError(f"ipv6_subnet {v6} is too small (at most /120)")
        nat, keep = data.get("nat", True), data.get("keep", True)
        if not isinstance(nat, bool) or not isinstance(keep, bool):
            raise ValueError("nat and keep must be true or false")
    except ValueError as e:
        die(f"Invalid bridge {name} in {where}: {e}")
    return Bridge(name, subnet, gateway, v6, nat, keep)


def load_host() -> HostNetwork:
    from machined import plaintoml

    path = host_config_path()
    try:
        data = plaintoml.load(path)
    except FileNotFoundError:
        return HostNetwork()
    unknown = set(data) - {"network"}
    net = data.get("network", {})
    if unknown or not isinstance(net, dict):
        die(f"Invalid configuration {path}: only a [network] section is known")
    unknown = set(net) - {"default_bridge", "hosts_file", "bridges"}
    if unknown:
        die(f"Invalid setting network.{sorted(unknown)[0]} in {path}: unknown key")
    default = str(net.get("default_bridge", DEFAULT_BRIDGE))
    check_ifname(default, "bridge")
    hosts_file = net.get("hosts_file", "/etc/hosts")
    if not isinstance(hosts_file, str) or (hosts_file and not hosts_file.startswith("/")):
        die(f"Invalid setting network.hosts_file in {path}: must be an absolute path or \"\"")
    tables = net.get("bridges", {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        die(f"Invalid setting network.bridges in {path}: must be tables [network.bridges.NAME]")
    bridges = {name: _bridge(name, body, path) for name, body in tables.items()}
    return HostNetwork(default, hosts_file, bridges)
