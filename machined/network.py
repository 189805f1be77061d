"""A machine's network, through netlink (pyroute2's asyncio API): bridge, veth, addresses, routes.

Addresses are static: the host configures them from its side, through a netlink socket opened in
the machine's network namespace, before the guest's init runs. That works for any guest (busybox,
sysvinit, systemd) with nothing to install or render, costs no DHCP round trip at boot, and keeps
the address the one the lease store (ipam) handed out. Names resolve through hosts files the
manager keeps: one per machine, bind-mounted read-only over the guest's /etc/hosts (the guest's
own entries plus every running machine), and a managed block in the host's hosts file.

What a machine's network leaves on the host is recorded in its state under "network" and removed
by teardown(), which is idempotent and also runs after a supervisor was killed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import importlib.util
import ipaddress
import os
import socket
import sys

from machined import ipam, linux, mounts, nat, netconfig, paths, pods, state
from machined.log import MachinedError, die


def _register_pyroute2() -> None:
    """pyroute2/__init__.py imports every API the library has (IPDB, NDB, nl80211, WireGuard, ...),
    measured at 100-200 ms, most of what networking would add to a start. The package is registered
    without running it, so only the modules used here (RTNL and their dependencies) load."""
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.loader is not None:
            sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)


_register_pyroute2()
from pyroute2.iproute.linux import AsyncIPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable
    from typing import Any, TypeVar

    from machined.config import MachineConfig
    from machined.netconfig import Bridge, HostNetwork

    T = TypeVar("T")

IFA_F_NODAD = 0x02
HOSTS_BEGIN = "# BEGIN machined: running machines (managed; edits are lost)"
HOSTS_END = "# END machined"


def _run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def host_ifname(prefix: str, name: str) -> str:
    """prefix+name if it fits in 15 characters, else a shortened name with a hash of the full one."""
    full = prefix + name
    if len(full) < netconfig.IFNAMSIZ:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()
    return prefix + name[: netconfig.IFNAMSIZ - 1 - len(prefix) - 5] + digest[:5]


def stable_mac(*seed: str) -> str:
    """A locally administered unicast MAC address that stays the same for the same seed."""
    b = bytearray(hashlib.sha256("\0".join(seed).encode()).digest()[:6])
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _write_sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "r+") as f:
        if f.read().strip() != value:
            f.seek(0)
            f.write(value)


def _nl(what: str, e: NetlinkError) -> MachinedError:
    return MachinedError(f"Failed to {what}: {os.strerror(e.code) if e.code > 0 else e}")


async def _index(ipr: AsyncIPRoute, ifname: str) -> int | None:
    found = await ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _socket_in(nsfd: int) -> int:
    """A netlink socket in the network namespace nsfd (sockets stay in the namespace they were made in)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(nsfd, linux.CLONE_NEWNET)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
        finally:
            linux.setns(own, linux.CLONE_NEWNET)
    finally:
        os.close(own)
    return sock.detach()


# --- the bridge ---------------------------------------------------------------------------------

async def _check_subnet_free(ipr: AsyncIPRoute, br: Bridge) -> None:
    """Refuse a subnet that overlaps a network the host already routes (other than through br)."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [br.subnet]
    if br.ipv6_subnet is not None:
        nets.append(br.ipv6_subnet)
    for net in nets:
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        async for route in await ipr.route("dump", family=family):
            dst, plen = route.get("RTA_DST"), route["dst_len"]
            if not dst or plen == 0 or route.get("RTA_TABLE") != 254:
                continue
            other = ipaddress.ip_network(f"{dst}/{plen}", strict=False)
            if other.overlaps(net):
                oif = route.get("RTA_OIF")
                links = await ipr.link("get", index=oif) if oif else []
                dev = links[0].get("IFLA_IFNAME") if links else "?"
                die(f"Failed to create bridge {br.name}: its subnet {net} overlaps {other} on {dev}",
                    hint=f"choose another subnet for bridge {br.name} in {netconfig.host_config_path()}")


async def ensure_bridge(ipr: AsyncIPRoute, br: Bridge) -> int:
    """The bridge's index; created with its gateway addresses and NAT table if it does not exist."""
    idx = await _index(ipr, br.name)
    if idx is not None:
        links = await ipr.link("get", index=idx)
        kind = links[0].get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
        if kind != "bridge":
            die(f"Failed to use bridge {br.name}: a link of that name exists and is a {kind or 'device'}")
        nat.add_bridge(br)
        return idx
    await _check_subnet_free(ipr, br)
    try:
        await ipr.link("add", ifname=br.name, kind="bridge", address=stable_mac("bridge", br.name))
    except NetlinkError as e:
        raise _nl(f"create bridge {br.name}", e) from None
    idx = await _index(ipr, br.name)
    assert idx is not None
    try:
        await ipr.addr("add", index=idx, address=str(br.gateway), prefixlen=br.subnet.prefixlen)
        if br.ipv6_subnet is not None:
            await ipr.addr("add", index=idx, address=str(br.gateway6), prefixlen=br.ipv6_subnet.prefixlen,
                           flags=IFA_F_NODAD)
        _write_sysctl(f"net/ipv4/conf/{br.name}/route_localnet", "1")
        nat.add_bridge(br)
        if br.nat:
            _write_sysctl("net/ipv4/ip_forward", "1")
            if br.ipv6_subnet is not None:
                _write_sysctl("net/ipv6/conf/all/forwarding", "1")
        await ipr.link("set", index=idx, state="up")
    except BaseException:
        await _delete_link(ipr, br.name)
        nat.delete_table(nat.bridge_table(br.name))
        raise
    return idx


async def _delete_link(ipr: AsyncIPRoute, ifname: str) -> None:
    idx = await _index(ipr, ifname)
    if idx is None:
        return
    try:
        await ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise


async def _remove_bridge_if_unused(ipr: AsyncIPRoute, name: str) -> None:
    idx = await _index(ipr, name)
    if idx is None:
        return
    async for link in await ipr.link("dump"):
        if link.get("IFLA_MASTER") == idx:
            return  # a port is left: another machine (or the host's own use) needs it
    await _delete_link(ipr, name)
    nat.delete_table(nat.bridge_table(name))


# --- one machine ----------------------------------------------------------------------------------

class MachineNetwork:
    """Made when mctl plans a start: check() refuses bad settings before anything exists. Then, in
    the supervisor: prepare() before the first boot, attach() once per boot (a spawn on_namespaces
    hook), in_child() to bind the hosts file, end_boot() once a boot's init is gone.

    A machine in a pod joins the pod's namespaces; the pod's network is made, from the settings of
    the machine that starts the pod, by that machine's prepare(), and owned by the pod."""

    def __init__(self, cfg: MachineConfig, rootfs: str) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.rootfs = rootfs
        self.pod = cfg.network.pod
        self.data: dict[str, object] = {}
        self.mode = netconfig.parse_mode(cfg.network.mode)
        self.ports = [netconfig.parse_port(p) for p in cfg.network.ports]
        self.host: HostNetwork = netconfig.load_host()
        self.bridge: Bridge | None = None
        self.address: ipaddress.IPv4Address | None = None
        self.netns = -1
        self.pod_fds: list[tuple[int, int]] = []
        self.record: dict[str, Any] = {"mode": str(self.mode)}
        # Who owns the links and the lease: the machine, or its pod.
        self.owner = f"pod:{self.pod}" if self.pod else self.name
        self.mac_seed = self.owner if self.pod else cfg.id

    def check(self) -> None:
        """Refuse what cannot work, touching nothing (the locked allocation in prepare() checks again)."""
        fail = f"Failed to start {self.name}"
        store = ipam.peek()
        if self.pod and pods.members(self.pod):
            pass  # joins a running pod, whose network is in place: its own mode does not matter
        elif self.mode.kind in ("bridge", "veth"):
            self.bridge = self._bridge()
            fixed = self.cfg.network.address
            reason = fixed and ipam.fixed_error(self.bridge, ipaddress.IPv4Address(fixed), self.owner,
                                                store.get("leases", {}))
            if reason:
                die(f"{fail}: {reason}")
        elif self.mode.kind in ("interface", "macvlan"):
            if not os.path.exists(f"/sys/class/net/{self.mode.link}"):
                die(f"{fail}: there is no network interface {self.mode.link} on the host")
        taken = store.get("ports", {})
        for port in self.ports:
            owner = taken.get(port.key, {}).get("owner", self.name)
            if owner != self.name:
                die(f"{fail}: host port {port.key} is already forwarded to {owner}")
            _check_host_port_free(port)

    def _bridge(self) -> Bridge:
        br = self.host.bridge(self.mode.link or None if self.mode.kind == "bridge" else None)
        if br is None:
            die(f"Failed to start {self.name}: bridge {self.mode.link} is not configured",
                hint=f"add [network.bridges.{self.mode.link}] to {netconfig.host_config_path()}")
        return br

    def prepare(self, data: dict[str, object]) -> None:
        """Lease the address, claim the ports, add the forwards (and make or join the pod); all of it
        recorded in data, the machine's state."""
        self.data = data
        data["network"] = self.record  # from here on a crash leaves a record to clean up
        self.record["hosts_file"] = self.host.hosts_file
        with ipam.Store() as store:
            ref = data["supervisor"]
            if self.pod:
                self._join_pod(store, ref)
            elif self.bridge is not None:
                self._lease(store, ref)
            store.claim_ports(self.ports, self.name, ref)
            if self.ports:
                addrs = data.get("addresses")
                if not isinstance(addrs, list) or not addrs:
                    die(f"Failed to forward ports to {self.name}: it has no address")
                self.record["ports"] = [str(p) for p in self.ports]
                self.record["nft_table"] = nat.machine_table(self.name)
                state.write(self.name, data)
                nat.add_forwards(self.name, self.ports, addrs[0], addrs[1] if len(addrs) > 1 else None)
            state.write(self.name, data)
            update_hosts(self.host.hosts_file)
        write_resolv_conf(resolv_path(self.name))

    def _lease(self, store: ipam.Store, ref: object) -> None:
        br = self.bridge
        assert br is not None
        self.address = store.lease(br, self.owner, ref, self.mac_seed, self.cfg.network.address)
        self.record.update(bridge=br.name, keep=br.keep, lease=str(self.address))
        a6 = br.address6(self.address) if self.mode.kind == "bridge" else None
        self.data["addresses"] = [str(self.address)] + ([str(a6)] if a6 else [])

    def _join_pod(self, store: ipam.Store, ref: object) -> None:
        pod = self.pod
        self.record["pod"] = pod
        if pods.exists(pod) and pods.members(pod, exclude=self.name):
            store.add_ref(self.owner, ref)
            info = pods.read_info(pod)
        else:
            pods.destroy(pod)  # whatever a pod whose last machine was killed left
            pods.create(pod)
            info = {"mode": str(self.mode)}
            self.record["pod_info"] = info
            try:
                self.netns = os.open(os.path.join(pods.pod_dir(pod), "net"), os.O_RDONLY | os.O_CLOEXEC)
                if self.mode.kind in ("bridge", "veth"):
                    self.bridge = self.bridge or self._bridge()  # the pod ended since check()
                    self._lease(store, [ref])
                    info.update(bridge=self.bridge.name, keep=self.bridge.keep)
                pods.write_info(pod, info)
                state.write(self.name, self.data)
                self._attach_links()
                info.update(addresses=self.data.get("addresses", []), interfaces=self.data.get("interfaces", []),
                            host_link=self.record.get("host_link"))
                pods.write_info(pod, info)
            finally:
                self.end_boot()
        for key in ("addresses", "interfaces"):
            if info.get(key):
                self.data[key] = info[key]

    def join_namespaces(self) -> list[tuple[int, int]]:
        """For spawn: the pod's namespaces to join instead of new ones (closed by attach())."""
        if self.pod:
            self.pod_fds = pods.open_namespaces(self.pod)
        return self.pod_fds

    def attach(self, pid: int) -> None:
        """on_namespaces hook: the child's namespaces exist, its init has not started."""
        for fd, _ in self.pod_fds:
            os.close(fd)
        self.pod_fds = []
        if self.pod:
            return  # the pod's network is in place
        self.end_boot()
        self.netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if self.mode.kind in ("bridge", "veth"):
            with ipam.Store():  # the bridge cannot vanish between its check and our port
                self._attach_links()
        else:
            self._attach_links()

    def _attach_links(self) -> None:
        if self.mode.kind in ("bridge", "veth"):
            _run(self._attach_veth())
        elif self.mode.kind == "interface":
            _run(self._move_in())
        elif self.mode.kind == "macvlan":
            _run(self._add_macvlan())
        state.write(self.name, self.data)

    async def _attach_veth(self) -> None:
        br = self.bridge
        assert br is not None and self.address is not None
        prefix = "vp-" if self.pod else "vb-" if self.mode.kind == "bridge" else "ve-"
        base = self.pod or self.name
        outer = host_ifname(prefix, base)
        self.record["host_link"] = outer
        self.data["interfaces"] = [outer]
        state.write(self.name, self.data)
        async with AsyncIPRoute() as ipr:
            master = await ensure_bridge(ipr, br) if self.mode.kind == "bridge" else None
            await _delete_link(ipr, outer)  # the last boot's, if its namespace is not gone yet
            try:
                await ipr.link("add", ifname=outer, kind="veth", address=stable_mac(self.mac_seed, outer),
                               peer={"ifname": "host0", "net_ns_fd": self.netns,
                                     "address": stable_mac(self.mac_seed, "host0")})
            except NetlinkError as e:
                raise _nl(f"create veth {outer} for {self.name}", e) from None
            idx = await _index(ipr, outer)
            assert idx is not None
            if outer != prefix + base:
                await ipr.link("property_add", index=idx, altname=prefix + base)
            if master is not None:
                await ipr.link("set", index=idx, master=master, state="up")
            else:
                # Point to point: the host side holds the gateway address, with the machine as peer.
                # No route_localnet here: without the bridge's guard rule it would open the host's
                # loopback services to the machine, so forwards from 127.0.0.1 are a bridge's alone.
                await ipr.addr("add", index=idx, local=str(br.gateway), address=str(self.address), prefixlen=32)
                await ipr.link("set", index=idx, state="up")
            self.data["ifindices"] = [idx]
        await self._configure_inside(br)

    async def _configure_inside(self, br: Bridge) -> None:
        assert self.address is not None
        async with AsyncIPRoute(fileno=_socket_in(self.netns)) as ipr:
            lo, host0 = await _index(ipr, "lo"), await _index(ipr, "host0")
            assert lo is not None and host0 is not None
            await ipr.link("set", index=lo, state="up")
            if self.mode.kind == "bridge":
                await ipr.addr("add", index=host0, address=str(self.address), prefixlen=br.subnet.prefixlen)
                a6 = br.address6(self.address)
                if a6 is not None and br.ipv6_subnet is not None:
                    await ipr.addr("add", index=host0, address=str(a6), prefixlen=br.ipv6_subnet.prefixlen,
                                   flags=IFA_F_NODAD)
            else:
                await ipr.addr("add", index=host0, local=str(self.address), address=str(br.gateway), prefixlen=32)
            await ipr.link("set", index=host0, state="up")
            await ipr.route("add", dst="0.0.0.0/0", gateway=str(br.gateway))
            if self.mode.kind == "bridge" and br.gateway6 is not None:
                await ipr.route("add", dst="::/0", gateway=str(br.gateway6), family=socket.AF_INET6)

    async def _move_in(self) -> None:
        async with AsyncIPRoute() as ipr:
            idx = await _index(ipr, self.mode.link)
            if idx is None:
                die(f"Failed to move {self.mode.link} into {self.name}: there is no such interface on the host")
            try:
                await ipr.link("set", index=idx, net_ns_fd=self.netns)
            except NetlinkError as e:
                raise _nl(f"move {self.mode.link} into {self.name}", e) from None
        self.data["interfaces"] = [self.mode.link]

    async def _add_macvlan(self) -> None:
        inner = host_ifname("mv-", self.mode.link)
        async with AsyncIPRoute() as ipr:
            parent = await _index(ipr, self.mode.link)
            if parent is None:
                die(f"Failed to add a macvlan on {self.mode.link}: there is no such interface on the host")
            try:
                await ipr.link("add", ifname=inner, kind="macvlan", link=parent, macvlan_mode="bridge",
                               address=stable_mac(self.mac_seed, "macvlan", self.mode.link), net_ns_fd=self.netns)
            except NetlinkError as e:
                raise _nl(f"add macvlan {inner} on {self.mode.link} for {self.name}", e) from None
        async with AsyncIPRoute(fileno=_socket_in(self.netns)) as ipr:
            for ifname in ("lo", inner):
                idx = await _index(ipr, ifname)
                if idx is not None:
                    await ipr.link("set", index=idx, state="up")
        self.data["interfaces"] = [inner]

    def in_child(self, root_fd: int) -> None:
        """in_child hook (imports nothing): the machine's hosts file over its /etc/hosts and the host's
        resolvers over its /etc/resolv.conf, read-only."""
        _bind_file(root_fd, hosts_path(self.name), "etc/hosts", follow=True)
        if _without_nameservers(root_fd):
            _bind_file(root_fd, resolv_path(self.name), "etc/resolv.conf", follow=False)

    def end_boot(self) -> None:
        """After a boot's init ended: give back a moved link, drop the namespace we held."""
        if self.netns < 0:
            return
        try:
            if self.mode.kind == "interface" and not self.pod:
                _run(self._move_out())
        except Exception as e:  # noqa: BLE001 - best effort: the link dies with the namespace
            from machined.log import warn

            warn(f"Failed to move {self.mode.link} out of {self.name}: {e}")
        finally:
            os.close(self.netns)
            self.netns = -1

    async def _move_out(self) -> None:
        host = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            async with AsyncIPRoute(fileno=_socket_in(self.netns)) as ipr:
                idx = await _index(ipr, self.mode.link)
                if idx is not None:
                    await ipr.link("set", index=idx, state="down")
                    await ipr.link("set", index=idx, net_ns_fd=host)
        finally:
            os.close(host)


def _check_host_port_free(port: netconfig.Port) -> None:
    """A host port a host service listens on cannot be forwarded: the forward would hide it."""
    kind = socket.SOCK_STREAM if port.proto == "tcp" else socket.SOCK_DGRAM
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, kind)
        except OSError:
            continue
        try:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port.host))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                die(f"Failed to forward host port {port.key}: it is in use on the host")
        finally:
            s.close()


# --- names ----------------------------------------------------------------------------------------

def hosts_path(name: str) -> str:
    return os.path.join(paths.machine_runtime_dir(name), "hosts")


def resolv_path(name: str) -> str:
    return os.path.join(paths.machine_runtime_dir(name), "resolv.conf")


def _bind_file(root_fd: int, src: str, target: str, follow: bool) -> None:
    """Bind src read-only over the guest's target file, if both exist (a guest without one gets none)."""
    if not os.path.exists(src):
        return
    for remount in (False, True):
        try:
            # Looked up again for the remount: the first fd names the file under the bind mount.
            fd = mounts.resolve(root_fd, target, follow=follow, flags=os.O_PATH)
        except OSError:
            return
        try:
            if remount:
                linux.mount(None, mounts.fdpath(fd), None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
                            | mounts.NOSUID_NODEV_NOEXEC)
            else:
                linux.mount(src, mounts.fdpath(fd), None, linux.MS_BIND)
        finally:
            os.close(fd)


def _without_nameservers(root_fd: int) -> bool:
    """Whether the guest's /etc/resolv.conf is a file naming no server: that is where the host's
    go. A file with servers of its own, or a symlink (systemd-resolved, resolvconf), is the guest's."""
    try:
        fd = mounts.resolve(root_fd, "etc/resolv.conf", follow=False, flags=os.O_RDONLY)
    except OSError:
        return False
    try:
        text = os.read(fd, 65536)
    finally:
        os.close(fd)
    return not any(line.strip().startswith(b"nameserver") for line in text.splitlines())


def host_resolvers() -> str:
    """The host's resolver configuration as a machine can use it: a loopback resolver (such as
    systemd-resolved's stub at 127.0.0.53) is the host's own, unreachable from a machine, so then
    resolved's list of upstream servers is taken instead (systemd-nspawn --resolv-conf=auto does the same)."""
    for candidate in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        try:
            with open(candidate) as f:
                text = f.read()
        except OSError:
            continue
        servers = [line.split()[1] for line in text.splitlines()
                   if line.startswith("nameserver") and len(line.split()) > 1]
        if servers and not all(ipaddress.ip_address(s.split("%")[0]).is_loopback for s in servers
                               if _is_ip(s.split("%")[0])):
            return text
    return ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def write_resolv_conf(path: str) -> None:
    text = host_resolvers()
    if text:
        with open(path, "w") as f:
            f.write("# The host's resolvers, given to this machine by machined.\n" + text)


def _running(exclude: str = "") -> list[dict[str, object]]:
    """The states of running machines (exclude: one being torn down)."""
    result = []
    for name in state.all_names():
        data = state.read(name) if name != exclude else None
        if data and state.is_alive(data.get("supervisor")):
            result.append(data)
    return result


def _str_list(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _strip_block(text: str) -> str:
    start = text.find(HOSTS_BEGIN)
    if start < 0:
        return text
    end = text.find(HOSTS_END, start)
    end = len(text) if end < 0 else end + len(HOSTS_END)
    return text[:start].rstrip("\n") + ("\n" if start else "") + text[end:].lstrip("\n")


def _with_block(text: str, entries: list[str]) -> str:
    text = _strip_block(text)
    if not entries:
        return text
    sep = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{sep}{HOSTS_BEGIN}\n" + "".join(f"{e}\n" for e in entries) + f"{HOSTS_END}\n"


def _rewrite_in_place(path: str, content: str, follow: bool = False) -> None:
    """In place, never by rename: the file may be bind-mounted (into guests, or /etc/hosts itself).
    follow: the host's file may be a symlink the administrator made; ours never are."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), 0o644)
    try:
        data = content.encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _guest_hosts(rootfs: str) -> str:
    """The guest's own /etc/hosts, read without leaving its root."""
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        fd = mounts.resolve(root_fd, "etc/hosts", flags=os.O_RDONLY)
        with os.fdopen(fd) as f:
            return f.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return ""
    finally:
        os.close(root_fd)


def update_hosts(host_file: str, exclude: str = "") -> None:
    """Rewrite every running machine's hosts file and the host's managed block (under the network lock):
    'ADDRESS NAME' for each address of each running machine."""
    running = _running(exclude)
    entries = [f"{a}\t{data['name']}" for data in running for a in _str_list(data.get("addresses"))]
    for data in running:
        if "network" in data:
            guest = _with_block(_guest_hosts(str(data.get("rootfs", ""))), entries)
            _rewrite_in_place(hosts_path(str(data["name"])), guest)
    if host_file:
        try:
            with open(host_file) as f:
                old = f.read()
        except FileNotFoundError:
            old = ""
        new = _with_block(old, entries)
        if new != old:
            try:
                _rewrite_in_place(host_file, new, follow=True)
            except OSError as e:
                # A host whose hosts file is read-only (itself a machine, an immutable image) still
                # runs machines; only the host's own lookups of their names go without.
                from machined.log import warn

                warn(f"Failed to update {host_file} with the machines' names: {e.strerror}")


# --- teardown -------------------------------------------------------------------------------------

def teardown(data: dict[str, object]) -> None:
    """TEARDOWN step for the "network" key: idempotent, best effort, also after a supervisor crash."""
    rec = data.get("network")
    if not isinstance(rec, dict):
        return
    name = str(data.get("name"))
    table = rec.get("nft_table")
    if isinstance(table, str):
        nat.delete_table(table)
    with ipam.Store() as store:
        store.release(name)
        pod = rec.get("pod")
        owned: dict[str, object] = rec  # what holds the links: the machine's record, or its pod's
        ending_pod = isinstance(pod, str) and not pods.members(pod, exclude=name)
        if isinstance(pod, str):
            if ending_pod:  # the pod's last machine: the pod ends with it
                owned = pods.read_info(pod) or rec.get("pod_info") or {}
                store.release(f"pod:{pod}")
            else:
                store.drop_ref(f"pod:{pod}", data.get("supervisor"))
                owned = {}
        link, bridge = owned.get("host_link"), owned.get("bridge")
        link = link if isinstance(link, str) else None
        bridge = bridge if isinstance(bridge, str) and owned.get("keep") is False else None
        if link or bridge:
            _run(_teardown_links(link, bridge))
        if ending_pod:
            pods.destroy(str(pod))
        hosts_file = rec.get("hosts_file")
        update_hosts(hosts_file if isinstance(hosts_file, str) else "", exclude=name)


async def _teardown_links(link: str | None, bridge: str | None) -> None:
    async with AsyncIPRoute() as ipr:
        if link:
            await _delete_link(ipr, link)
        if bridge:
            await _remove_bridge_if_unused(ipr, bridge)
