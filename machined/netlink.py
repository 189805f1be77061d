"""The netlink side of machines' networks: bridges, veth pairs, addresses and routes inside a
machine, links moved in and out.

pyroute2's message classes (ifinfmsg, ifaddrmsg, rtmsg) build and parse every message; the socket
is a plain blocking one (netops.rtnl_socket, its answers framed by netops.read_answer). pyroute2's
IPRoute and AsyncIPRoute would do the same work through asyncio, whose import with theirs costs
about 80 ms against 25 ms for the message classes, and a start asks for a few sequential requests,
which an event loop does not make faster.

This module is loaded by a machine's network helper (machined.netagent) where a replay does not do
(machined.netops: requests built here once, sent as saved by later starts), and in-process only by
the teardown that follows a killed supervisor where a link did not go by itself. Every operation
takes plain values (names, addresses, the machine's network namespace as an fd) so that it can be
asked for over a socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time

import machined
from machined import netops
from machined.log import MachinedError, die
from machined.netops import VETH_SETTLE, NetlinkError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

machined.bare_package("pyroute2")  # its __init__ imports every API it has (IPDB, NDB, nl80211, ...): 100-200 ms
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, nlmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_NEWROUTE, RTM_GETROUTE = 20, 24, 26
RTM_NEWLINKPROP = 108
IFF_UP = 0x1
RTEXT_FILTER_SKIP_STATS = 1 << 3  # smaller answers, quicker to decode
IFA_F_NODAD = 0x02
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1
MACVLAN_MODE_BRIDGE = 4

def stable_mac(*seed: str) -> str:
    """A locally administered unicast MAC address that stays the same for the same seed."""
    b = bytearray(machined.sha256("\0".join(seed).encode())[:6])
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _write_sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "r+") as f:
        if f.read().strip() != value:
            f.seek(0)
            f.write(value)


def _nl(what: str, e: OSError) -> MachinedError:
    return MachinedError(f"Failed to {what}: {e.strerror or e}")


class Rtnl:
    """A route netlink socket (in our network namespace, or in netns): one request at a time."""

    def __init__(self, netns: int = -1) -> None:
        self.sock = netops.rtnl_socket(netns)
        self.seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def call(self, kind: int, msg: nlmsg, flags: int = 0, reply: type[nlmsg] | None = None) -> list[Any]:
        """Send msg as a request of kind; the messages of the answer (decoded as reply), once the
        kernel acknowledged it or ended the dump. NetlinkError for an error reply."""
        self.seq += 1
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        msg["header"].update(type=kind, flags=NLM_F_REQUEST | flags | (0 if dump else NLM_F_ACK),
                             sequence_number=self.seq, pid=0)
        msg.encode()
        self.sock.send(msg.data)
        answer: list[Any] = []

        def decode(data: bytes) -> None:
            if reply is not None:
                parsed = reply(data)
                parsed.decode()
                answer.append(parsed)

        netops.read_answer(self.sock, self.seq, decode)
        return answer


def _network_lock(take: bool) -> contextlib.AbstractContextManager[object]:
    """The network lock (ipam's) if take: where a bridge is made, or may go meanwhile."""
    if not take:
        return contextlib.nullcontext()
    from machined import ipam  # (not on the way of a start on a kept bridge)

    return ipam.Lock()


# --- messages -------------------------------------------------------------------------------------

def _link(index: int = 0, ifname: str = "", up: bool = False, **attrs: Any) -> ifinfmsg:
    """A link message; attrs: IFLA_ names without the prefix (linkinfo, address, master, net_ns_fd)."""
    msg = ifinfmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    if up:
        msg["flags"] = msg["change"] = IFF_UP
    msg["attrs"] = ([("IFLA_IFNAME", ifname)] if ifname else []) + \
        [(f"IFLA_{k.upper()}", v) for k, v in attrs.items()]
    return msg


def _linkinfo(kind: str, *data: tuple[str, object]) -> dict[str, object]:
    return {"attrs": [("IFLA_INFO_KIND", kind)] + ([("IFLA_INFO_DATA", {"attrs": list(data)})] if data else [])}


def _get_link(nl: Rtnl, ifname: str = "", index: int = 0) -> Any:
    """The link of that name (or index), None if there is none."""
    try:
        found = nl.call(RTM_GETLINK, _link(index, ifname, ext_mask=RTEXT_FILTER_SKIP_STATS), reply=ifinfmsg)
    except NetlinkError as e:
        if e.errno == errno.ENODEV:
            return None
        raise
    return found[0] if found else None


def _index(nl: Rtnl, ifname: str) -> int | None:
    link = _get_link(nl, ifname)
    return int(link["index"]) if link is not None else None


def _addr(index: int, address: str, prefixlen: int, peer: str = "", flags: int = 0) -> ifaddrmsg:
    """address on the link index; with peer, a point-to-point address (address local, peer remote)."""
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET6 if ":" in address else socket.AF_INET
    msg["prefixlen"] = prefixlen
    msg["index"] = index
    msg["flags"] = flags
    msg["attrs"] = [("IFA_LOCAL", address), ("IFA_ADDRESS", peer or address)]
    return msg


def _default_route(gateway: str) -> rtmsg:
    msg = rtmsg()
    msg["family"] = socket.AF_INET6 if ":" in gateway else socket.AF_INET
    msg.update(dst_len=0, table=RT_TABLE_MAIN, proto=RTPROT_STATIC, scope=0, type=RTN_UNICAST)
    msg["attrs"] = [("RTA_GATEWAY", gateway)]
    return msg


def _set_up(nl: Rtnl, index: int, **attrs: Any) -> None:
    nl.call(RTM_NEWLINK, _link(index, up=True, **attrs))


def _delete_link(nl: Rtnl, ifname: str, settle: float = 0.0) -> None:
    """Delete ifname, unless it goes by itself within settle seconds. A veth goes with the network
    namespace of its peer, which the kernel cleans up in the background once its last user is gone
    (2-20 ms here, a machine's mounts going first); a deletion of ours would instead wait for the
    RCU grace periods of unregistering it (~20 ms)."""
    deadline = time.monotonic() + settle
    while (idx := _index(nl, ifname)) is not None and time.monotonic() < deadline:
        time.sleep(0.001)
    if idx is None:
        return
    try:
        nl.call(RTM_DELLINK, _link(idx))
    except NetlinkError as e:
        if e.errno != errno.ENODEV:
            raise


# --- the bridge ---------------------------------------------------------------------------------

def _check_subnet_free(nl: Rtnl, br: dict[str, Any]) -> None:
    """Refuse a subnet that overlaps a network the host already routes (other than through br)."""
    from machined.inet import Network  # (only as a bridge is made: not on every start)

    for net in (Network.parse(br[key], version) for key, version in (("subnet", 4), ("ipv6_subnet", 6)) if br[key]):
        query = rtmsg()
        query["family"] = socket.AF_INET if net.version == 4 else socket.AF_INET6
        for route in nl.call(RTM_GETROUTE, query, NLM_F_DUMP, reply=rtmsg):
            dst, plen = route.get_attr("RTA_DST"), route["dst_len"]
            if not dst or plen == 0 or route.get_attr("RTA_TABLE") != RT_TABLE_MAIN:
                continue
            other = Network.parse(f"{dst}/{plen}", net.version, strict=False)
            if other.overlaps(net):
                oif = route.get_attr("RTA_OIF")
                link = _get_link(nl, index=oif) if oif else None
                dev = link.get_attr("IFLA_IFNAME") if link is not None else "?"
                from machined import netconfig

                die(f"Failed to create bridge {br['name']}: its subnet {net} overlaps {other} on {dev}",
                    hint=f"choose another subnet for bridge {br['name']} in {netconfig.host_config_path()}")


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _bridge_index(nl: Rtnl, br: dict[str, Any]) -> int | None:
    """The bridge's index, None if there is none; a link of its name that is no bridge refused."""
    name = br["name"]
    index = netops.bridge_index(name)  # (sysfs: no netlink answer to decode on every start)
    if index is None and netops.link_exists(name):
        link = _get_link(nl, name)
        kind = _kind(link) if link is not None else None
        die(f"Failed to use bridge {name}: a link of that name exists and is a {kind or 'device'}")
    return index


def ensure_bridge(nl: Rtnl, br: dict[str, Any]) -> int:
    """The bridge (netconfig.Bridge.to_json) by its index; created with its gateway addresses and
    NAT table if it does not exist. The caller holds the network lock (ipam.Store): no other
    machine's teardown removes the bridge meanwhile."""
    index = _bridge_index(nl, br)
    if index is not None:
        return index
    name = br["name"]
    from machined import nat  # (libnftables: ~3 ms, loaded where a bridge is made or its table renewed)

    _check_subnet_free(nl, br)
    try:
        nl.call(RTM_NEWLINK, _link(ifname=name, address=stable_mac("bridge", name), linkinfo=_linkinfo("bridge")),
                NLM_F_CREATE | NLM_F_EXCL)
    except NetlinkError as e:
        raise _nl(f"create bridge {name}", e) from None
    idx = _index(nl, name)
    assert idx is not None
    try:
        nl.call(RTM_NEWADDR, _addr(idx, br["gateway"], _prefixlen(br["subnet"])), NLM_F_CREATE | NLM_F_EXCL)
        if br["ipv6_subnet"]:
            nl.call(RTM_NEWADDR, _addr(idx, br["gateway6"], _prefixlen(br["ipv6_subnet"]), flags=IFA_F_NODAD),
                    NLM_F_CREATE | NLM_F_EXCL)
        _write_sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")
        nat.add_bridge(br)
        if br["nat"]:
            _write_sysctl("net/ipv4/ip_forward", "1")
            if br["ipv6_subnet"]:
                _write_sysctl("net/ipv6/conf/all/forwarding", "1")
        _set_up(nl, idx)
    except BaseException:
        _delete_link(nl, name)
        nat.delete_table(nat.bridge_table(name))
        raise
    return idx


def _prefixlen(network: str) -> int:
    return int(network.rpartition("/")[2])


def _remove_bridge_if_unused(nl: Rtnl, name: str) -> None:
    link = _get_link(nl, name)
    if link is None or _kind(link) != "bridge":
        return  # not ours: a link of that name that is no bridge stopped a start
    idx = int(link["index"])
    # The kernel filters a link dump by master: what answers is a port of the bridge.
    if any(port.get_attr("IFLA_MASTER") == idx for port in
           nl.call(RTM_GETLINK, _link(master=idx), NLM_F_DUMP, reply=ifinfmsg)):
        return  # a port is left: another machine (or the host's own use) needs it
    _delete_link(nl, name)
    from machined import nat

    nat.delete_table(nat.bridge_table(name))


# --- one machine's links --------------------------------------------------------------------------

def attach_veth(netns: int, args: dict[str, Any], held: bool) -> None:
    """The host's side of a veth pair: outer on the host (up, a port of the bridge; for kind 'veth'
    a point-to-point link, down until address_veth), host0 in netns. args: those of
    netops.attach_veth (also the replay's key), bridge netconfig.Bridge.to_json(). held: the caller
    holds the network lock. The bridge's NAT table is renewed afterwards (renew_bridge)."""
    bridge, kind, outer = args["bridge"], args["kind"], args["outer"]
    with Rtnl() as nl:
        # A kept bridge that is there needs no lock: no teardown removes it. One to make, or one that
        # goes with its last port, stays locked until our port is on it.
        index = _bridge_index(nl, bridge) if kind == "bridge" and bridge["keep"] else None
        with _network_lock(kind == "bridge" and index is None and not held):
            if kind == "bridge" and index is None:
                index = ensure_bridge(nl, bridge)
            _delete_link(nl, outer, VETH_SETTLE)  # the last boot's, if its namespace is not gone yet
            netops.run(replay("attach_veth", args), netns, outer, index)


def address_veth(netns: int, args: dict[str, Any]) -> int:
    """After attach_veth: host0's addresses and default routes in netns, up; for kind 'veth' also
    outer's point-to-point address, up. args: those of netops.address_veth (also the replay's
    key). Returns outer's index."""
    netops.run(replay("address_veth", args), netns, args["outer"])
    return netops.ifindex(args["outer"])


Request = tuple[str, str, int, nlmsg, int]  # namespace ("host", "machine"), what, type, message, flags


def attach_requests(m: dict[str, int], machine: str, bridge: dict[str, Any], kind: str, outer: str,
                    altname: str, seed: str) -> list[Request]:
    """attach_veth's requests, m: the values (or markers) of the fields a replay fills in."""
    # Outer up and in the bridge as it is made (host0 cannot be: its peer is not registered yet).
    # One queue each way on both ends from the start: by default each end gets a queue per CPU, cut
    # down to its peer's one receive queue once both exist, and each cut waits for an expedited RCU
    # grace period under the RTNL lock (synchronize_net: two per pair, up to 3 ms on a busy machine,
    # with an interrupt to every CPU). Either way the pair ends up with one queue each way.
    queues = {"num_tx_queues": 1, "num_rx_queues": 1}
    peer = {"attrs": [("IFLA_IFNAME", "host0"), ("IFLA_NET_NS_FD", m["netns"]),
                      ("IFLA_ADDRESS", stable_mac(seed, "host0")),
                      *((f"IFLA_{k.upper()}", v) for k, v in queues.items())]}
    master = {"master": m["master"]} if kind == "bridge" else {}
    veth = _link(ifname=outer, up=kind == "bridge", address=stable_mac(seed, outer),
                 linkinfo=_linkinfo("veth", ("VETH_INFO_PEER", peer)), **master, **queues)
    made: list[Request] = [("host", f"create veth {outer} for {machine}", RTM_NEWLINK, veth, NLM_F_CREATE | NLM_F_EXCL)]
    if altname:
        prop = _link(m["outer"], prop_list={"attrs": [("IFLA_ALT_IFNAME", altname)]})
        made.append(("host", "", RTM_NEWLINKPROP, prop, NLM_F_CREATE | NLM_F_EXCL))
    return made


def address_requests(m: dict[str, int], machine: str, bridge: dict[str, Any], kind: str, outer: str,
                     address: str, address6: str) -> list[Request]:
    """address_veth's requests, m: the values (or markers) of the fields a replay fills in."""
    add = NLM_F_CREATE | NLM_F_EXCL
    made: list[Request] = []
    if kind != "bridge":
        # Point to point: the host side holds the gateway address, with the machine as peer.
        # No route_localnet here: without the bridge's guard rule it would open the host's
        # loopback services to the machine, so forwards from 127.0.0.1 are a bridge's alone.
        made += [("host", "", RTM_NEWADDR, _addr(m["outer"], bridge["gateway"], 32, peer=address), add),
                 ("host", "", RTM_NEWLINK, _link(m["outer"], up=True), 0)]
    # (loopback: the machine brings it up)
    if kind == "bridge":
        made.append(("machine", "", RTM_NEWADDR, _addr(m["host0"], address, _prefixlen(bridge["subnet"])), add))
        if address6:
            six = _addr(m["host0"], address6, _prefixlen(bridge["ipv6_subnet"]), flags=IFA_F_NODAD)
            made.append(("machine", "", RTM_NEWADDR, six, add))
    else:
        made.append(("machine", "", RTM_NEWADDR, _addr(m["host0"], address, 32, peer=bridge["gateway"]), add))
    made += [("machine", "", RTM_NEWLINK, _link(m["host0"], up=True), 0),
             ("machine", "", RTM_NEWROUTE, _default_route(bridge["gateway"]), add)]
    if kind == "bridge" and bridge["gateway6"]:
        made.append(("machine", "", RTM_NEWROUTE, _default_route(bridge["gateway6"]), add))
    return made


REQUESTS: dict[str, Callable[..., list[Request]]] = {"attach_veth": attach_requests,
                                                     "address_veth": address_requests}


def encode(request: Request) -> bytes:
    """A request as it is sent, its sequence number 0 (netops.fill sets it)."""
    _, _, kind, msg, flags = request
    msg["header"].update(type=kind, flags=NLM_F_REQUEST | NLM_F_ACK | flags, sequence_number=0, pid=0)
    msg.encode()
    return bytes(msg.data)


def replay(op: str, args: dict[str, Any]) -> list[netops.Step]:
    """op's replay for args (netops): the saved one, else built from its requests and saved. Built
    with one set of markers after another until two builds agree: a value of a request that happens
    to equal a marker is found with that set only."""
    machine = args["machine"]
    steps = netops.load(machine, op, args)
    if steps is not None:
        return steps
    built: list[list[netops.Step]] = []
    for markers in netops.MARKER_SETS:
        steps = []
        for request in REQUESTS[op](markers, **args):
            data = encode(request)
            steps.append((request[0], request[1], data, netops.locate(data, markers)))
        if any(netops.same(steps, other) for other in built):
            netops.save(machine, op, args, steps)
            return steps
        built.append(steps)
    raise MachinedError(f"Failed to {op.replace('_', ' ')} for {machine}: its requests cannot be replayed")


def move_in(netns: int, machine: str, link: str) -> None:
    with Rtnl() as nl:
        idx = _index(nl, link)
        if idx is None:
            die(f"Failed to move {link} into {machine}: there is no such interface on the host")
        try:
            nl.call(RTM_NEWLINK, _link(idx, net_ns_fd=netns))
        except NetlinkError as e:
            raise _nl(f"move {link} into {machine}", e) from None


def add_macvlan(netns: int, machine: str, link: str, inner: str, seed: str) -> None:
    with Rtnl() as nl:
        parent = _index(nl, link)
        if parent is None:
            die(f"Failed to add a macvlan on {link}: there is no such interface on the host")
        try:
            nl.call(RTM_NEWLINK, _link(ifname=inner, link=parent, address=stable_mac(seed, "macvlan", link),
                                       net_ns_fd=netns,
                                       linkinfo=_linkinfo("macvlan", ("IFLA_MACVLAN_MODE", MACVLAN_MODE_BRIDGE))),
                    NLM_F_CREATE | NLM_F_EXCL)
        except NetlinkError as e:
            raise _nl(f"add macvlan {inner} on {link} for {machine}", e) from None
    with Rtnl(netns) as nl:
        idx = _index(nl, inner)
        if idx is not None:
            _set_up(nl, idx)


def move_out(netns: int, link: str) -> None:
    """Give a moved link back to the host's namespace (ours), down."""
    host = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Rtnl(netns) as nl:
            idx = _index(nl, link)
            if idx is not None:
                msg = _link(idx)
                msg["change"] = IFF_UP  # flags 0: down
                nl.call(RTM_NEWLINK, msg)
                nl.call(RTM_NEWLINK, _link(idx, net_ns_fd=host))
    finally:
        os.close(host)


def teardown_links(link: str | None, bridge: str | None, settle: float = VETH_SETTLE) -> None:
    """Delete the host end of a machine's link (unless it goes by itself within settle seconds), and
    the bridge if no port is left on it."""
    with Rtnl() as nl:
        if link:
            _delete_link(nl, link, settle)
        if bridge:
            _remove_bridge_if_unused(nl, bridge)
