"""The netlink side of machines' networks, through pyroute2's asyncio API: bridges, veth pairs,
addresses and routes inside a machine, links moved in and out.

Importing asyncio and pyroute2 costs about 80 ms, so this module is loaded by a machine's network
helper (machined.netagent) while mctl gets the machine ready, and in-process only by the teardown
that follows a killed supervisor. Every operation takes plain values (names, addresses, the
machine's network namespace as an fd) so that it can be asked for over a socket.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import os
import socket

import machined
from machined import linux, nat, netconfig
from machined.log import MachinedError, die

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any, TypeVar

    from machined.netconfig import Bridge

    T = TypeVar("T")


machined.bare_package("pyroute2")  # its __init__ imports every API it has (IPDB, NDB, nl80211, ...): 100-200 ms
from pyroute2.iproute.linux import AsyncIPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

IFA_F_NODAD = 0x02
_loop: asyncio.AbstractEventLoop | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on this process's one event loop (asyncio.run would make and close a loop each time)."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


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


async def _kind(ipr: AsyncIPRoute, idx: int) -> str | None:
    links = await ipr.link("get", index=idx)
    return links[0].get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))  # type: ignore[no-any-return]


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
    """The bridge's index; created with its gateway addresses and NAT table if it does not exist
    (the NAT table of one that exists is the supervisor's to renew meanwhile: see network.py)."""
    idx = await _index(ipr, br.name)
    if idx is not None:
        kind = await _kind(ipr, idx)
        if kind != "bridge":
            die(f"Failed to use bridge {br.name}: a link of that name exists and is a {kind or 'device'}")
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
    if idx is None or await _kind(ipr, idx) != "bridge":
        return  # not ours: a link of that name that is no bridge stopped a start
    async for link in await ipr.link("dump"):
        if link.get("IFLA_MASTER") == idx:
            return  # a port is left: another machine (or the host's own use) needs it
    await _delete_link(ipr, name)
    nat.delete_table(nat.bridge_table(name))


# --- one machine's links --------------------------------------------------------------------------

def attach_veth(netns: int, machine: str, bridge: dict[str, Any], kind: str, outer: str, altname: str,
                seed: str, address: str) -> int:
    """A veth pair: outer on the host (a port of the bridge, or for kind 'veth' a point-to-point
    link holding the gateway address), host0 in netns with the machine's address and default route.
    Returns outer's index."""
    return run(_attach_veth(netns, machine, netconfig.Bridge.from_json(bridge), kind, outer, altname, seed,
                            ipaddress.IPv4Address(address)))


async def _attach_veth(netns: int, machine: str, br: Bridge, kind: str, outer: str, altname: str, seed: str,
                       address: ipaddress.IPv4Address) -> int:
    async with AsyncIPRoute() as ipr:
        master = await ensure_bridge(ipr, br) if kind == "bridge" else None
        await _delete_link(ipr, outer)  # the last boot's, if its namespace is not gone yet
        try:
            await ipr.link("add", ifname=outer, kind="veth", address=stable_mac(seed, outer),
                           peer={"ifname": "host0", "net_ns_fd": netns, "address": stable_mac(seed, "host0")})
        except NetlinkError as e:
            raise _nl(f"create veth {outer} for {machine}", e) from None
        idx = await _index(ipr, outer)
        assert idx is not None
        if altname:
            await ipr.link("property_add", index=idx, altname=altname)
        if master is not None:
            await ipr.link("set", index=idx, master=master, state="up")
        else:
            # Point to point: the host side holds the gateway address, with the machine as peer.
            # No route_localnet here: without the bridge's guard rule it would open the host's
            # loopback services to the machine, so forwards from 127.0.0.1 are a bridge's alone.
            await ipr.addr("add", index=idx, local=str(br.gateway), address=str(address), prefixlen=32)
            await ipr.link("set", index=idx, state="up")
    await _configure_inside(netns, br, kind, address)
    return idx


async def _configure_inside(netns: int, br: Bridge, kind: str, address: ipaddress.IPv4Address) -> None:
    async with AsyncIPRoute(fileno=_socket_in(netns)) as ipr:  # (loopback: the machine brings it up)
        host0 = await _index(ipr, "host0")
        assert host0 is not None
        if kind == "bridge":
            await ipr.addr("add", index=host0, address=str(address), prefixlen=br.subnet.prefixlen)
            a6 = br.address6(address)
            if a6 is not None and br.ipv6_subnet is not None:
                await ipr.addr("add", index=host0, address=str(a6), prefixlen=br.ipv6_subnet.prefixlen,
                               flags=IFA_F_NODAD)
        else:
            await ipr.addr("add", index=host0, local=str(address), address=str(br.gateway), prefixlen=32)
        await ipr.link("set", index=host0, state="up")
        await ipr.route("add", dst="0.0.0.0/0", gateway=str(br.gateway))
        if kind == "bridge" and br.gateway6 is not None:
            await ipr.route("add", dst="::/0", gateway=str(br.gateway6), family=socket.AF_INET6)


def move_in(netns: int, machine: str, link: str) -> None:
    run(_move_in(netns, machine, link))


async def _move_in(netns: int, machine: str, link: str) -> None:
    async with AsyncIPRoute() as ipr:
        idx = await _index(ipr, link)
        if idx is None:
            die(f"Failed to move {link} into {machine}: there is no such interface on the host")
        try:
            await ipr.link("set", index=idx, net_ns_fd=netns)
        except NetlinkError as e:
            raise _nl(f"move {link} into {machine}", e) from None


def add_macvlan(netns: int, machine: str, link: str, inner: str, seed: str) -> None:
    run(_add_macvlan(netns, machine, link, inner, seed))


async def _add_macvlan(netns: int, machine: str, link: str, inner: str, seed: str) -> None:
    async with AsyncIPRoute() as ipr:
        parent = await _index(ipr, link)
        if parent is None:
            die(f"Failed to add a macvlan on {link}: there is no such interface on the host")
        try:
            await ipr.link("add", ifname=inner, kind="macvlan", link=parent, macvlan_mode="bridge",
                           address=stable_mac(seed, "macvlan", link), net_ns_fd=netns)
        except NetlinkError as e:
            raise _nl(f"add macvlan {inner} on {link} for {machine}", e) from None
    async with AsyncIPRoute(fileno=_socket_in(netns)) as ipr:
        idx = await _index(ipr, inner)
        if idx is not None:
            await ipr.link("set", index=idx, state="up")


def move_out(netns: int, link: str) -> None:
    """Give a moved link back to the host's namespace (ours), down."""
    run(_move_out(netns, link))


async def _move_out(netns: int, link: str) -> None:
    host = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with AsyncIPRoute(fileno=_socket_in(netns)) as ipr:
            idx = await _index(ipr, link)
            if idx is not None:
                await ipr.link("set", index=idx, state="down")
                await ipr.link("set", index=idx, net_ns_fd=host)
    finally:
        os.close(host)


def teardown_links(link: str | None, bridge: str | None) -> None:
    """Delete the host end of a machine's link, and the bridge if no port is left on it."""
    run(_teardown_links(link, bridge))


async def _teardown_links(link: str | None, bridge: str | None) -> None:
    async with AsyncIPRoute() as ipr:
        if link:
            await _delete_link(ipr, link)
        if bridge:
            await _remove_bridge_if_unused(ipr, bridge)
