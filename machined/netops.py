"""The network helper's operations (netagent.OPS), with the common case of a start kept free of
pyroute2's import.

A bridged start sends the same few rtnetlink requests each time: create the veth pair, then host0's
addresses, link and routes. The bytes differ only in a handful of 32-bit fields: the sequence
number, the fd of the machine's network namespace, the index of the bridge and of the links. So
machined.netlink builds each request with pyroute2 once, with a marker in each such field, and
saves the encoded request with the offsets of its markers (a replay). Every later start of that
machine with the same settings sends the saved bytes with the fields filled in; only the kernel's
acknowledgements are read, which is a status code. Importing pyroute2's message classes costs
30-45 ms of the helper's time on a loaded machine, and the helper's answer is what a bridged start
waits for.

A replay is used where its requests are all there is to do: a kept bridge that is up, no veth left
from the last boot. Anything else (a bridge to make, a link in the way, a replay that is missing or
saved for other settings) goes through machined.netlink, which also builds and saves the replay.
Replays live in the runtime directory, one file per machine and operation, keyed by every argument
of the requests. (A tmpfs, emptied at reboot: so are the bridges, and a start that makes its
bridge takes the full path anyway.)
"""

from __future__ import annotations

import os
import struct

import machined
from machined import jsonc, netagent, paths
from machined.log import MachinedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable
    from typing import Any

VETH_SETTLE = 0.05  # how long a machine's veth may take to go with its namespace before we delete it
TIMEOUT = 30.0  # for one request: the kernel answers at once, or something is badly wrong
NLMSG_ERROR, NLMSG_DONE = 2, 3
HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port
_U32 = struct.Struct("=I")
# What a replay fills in, by its marker. Three sets: a request is built with each until two agree,
# so that a value that happens to equal a marker is not taken for a field (netlink.replay). Positive
# as signed 32-bit values, so that pyroute2 encodes them in any field.
FIELDS = ("netns", "master", "outer", "host0")
MARKER_SETS = tuple({name: base + i for i, name in enumerate(FIELDS, 1)}
                    for base in (0x6D6E7000, 0x3A5C1900, 0x51C3A200))


class NetlinkError(OSError):
    """The kernel's error reply to a request."""


# --- the operations ---------------------------------------------------------------------------------

def attach_veth(netns: int, machine: str, bridge: dict[str, Any], kind: str, outer: str, altname: str,
                seed: str, held: bool) -> None:
    """netlink.attach_veth, by its replay where the bridge is a kept one that is up and the last
    boot's veth is gone."""
    args = {"machine": machine, "bridge": bridge, "kind": kind, "outer": outer, "altname": altname, "seed": seed}
    steps = load(machine, "attach_veth", args)
    fits, master = _attachable(bridge, kind, outer)
    if steps is None or not fits:
        from machined import netlink

        netlink.attach_veth(netns, args, held)
        return
    run(steps, netns, outer, master)


def address_veth(netns: int, machine: str, bridge: dict[str, Any], kind: str, outer: str, address: str,
                 address6: str = "") -> int:
    """netlink.address_veth, by its replay where there is one. Returns outer's index."""
    args = {"machine": machine, "bridge": bridge, "kind": kind, "outer": outer, "address": address,
            "address6": address6}
    steps = load(machine, "address_veth", args)
    if steps is None:
        from machined import netlink

        return netlink.address_veth(netns, args)
    run(steps, netns, outer)
    return ifindex(outer)


def _attachable(bridge: dict[str, Any], kind: str, outer: str) -> tuple[bool, int | None]:
    """Whether attach_veth's replay can be sent as it is (for a bridge: a kept one that is up; no
    link of outer's name in the way), and the bridge's index."""
    master = bridge_index(str(bridge.get("name"))) if kind == "bridge" else None
    return not ((kind == "bridge" and (master is None or not bridge.get("keep"))) or link_exists(outer)), master


def renew_bridge(bridge: dict[str, Any], held: bool) -> None:
    """Once a machine's links are made: the NAT table of its bridge made anew where it is not as
    the bridge was made with it (a firewall reload may have flushed it). Under the network lock (a
    bridge that went meanwhile keeps no table); held: the caller holds it."""
    import contextlib

    from machined import ipam, nat

    with ipam.Lock() if not held else contextlib.nullcontext():
        if bridge_index(bridge["name"]) is not None:
            nat.renew_bridge(bridge)


def teardown_links(link: str | None, bridge: str | None) -> None:
    """Delete the host end of a machine's link, and the bridge if no port is left on it. A veth goes
    by itself with the machine's network namespace: where that is all, no request is needed."""
    settle = VETH_SETTLE
    if link and not bridge:
        import time

        deadline = time.monotonic() + VETH_SETTLE
        while link_exists(link) and time.monotonic() < deadline:
            time.sleep(0.001)
        if not link_exists(link):
            return
        settle = 0.0  # (waited for here)
    from machined import netlink

    netlink.teardown_links(link, bridge, settle)


def move_in(netns: int, machine: str, link: str) -> None:
    from machined import netlink

    netlink.move_in(netns, machine, link)


def add_macvlan(netns: int, machine: str, link: str, inner: str, seed: str) -> None:
    from machined import netlink

    netlink.add_macvlan(netns, machine, link, inner, seed)


def move_out(netns: int, link: str) -> None:
    from machined import netlink

    netlink.move_out(netns, link)


# --- host links, by sysfs (the helper is in the host's network namespace) -------------------------

def ifindex(ifname: str) -> int:
    fd = os.open(f"/sys/class/net/{ifname}/ifindex", os.O_RDONLY | os.O_CLOEXEC)  # (open() costs ~4 calls more)
    try:
        return int(os.read(fd, 32))
    finally:
        os.close(fd)


def bridge_index(name: str) -> int | None:
    """The index of the bridge name, None if there is no bridge of that name."""
    if not os.path.isdir(f"/sys/class/net/{name}/bridge"):
        return None
    try:
        return ifindex(name)
    except FileNotFoundError:
        return None


def link_exists(ifname: str) -> bool:
    """Whether the host has a link of that name."""
    return os.path.exists(f"/sys/class/net/{ifname}")


# --- replays ---------------------------------------------------------------------------------------

Step = tuple[str, str, bytes, list[tuple[int, str]]]  # namespace ("host", "machine"), what, request, fields


def _key(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """What a replay is valid for, saved and compared as it is (a hash of it cost a start ~0.1 ms
    each time it was worked out, twice a start): op and its arguments, the code that builds the
    requests (netlink.py as installed: another machined builds others) and the kernel's release (a
    replay is only ever sent to the kernel that acknowledged it)."""
    st = os.stat(os.path.join(os.path.dirname(__file__), "netlink.py"))
    return {"op": op, "args": args, "format": 3, "version": machined.__version__, "kernel": os.uname().release,
            "builder": [st.st_size, st.st_mtime_ns]}


def load(machine: str, op: str, args: dict[str, Any]) -> list[Step] | None:
    """The saved replay of op with args for machine, None if there is none for these args."""
    preloaded = _preloaded.pop((machine, op), None)
    key, steps = preloaded if preloaded is not None else _read(machine, op)
    return steps if key is not None and key == _key(op, args) else None


def preload(machine: str, ops: tuple[str, ...] = netagent.REPLAYED) -> None:
    """In the helper, while it waits for its first request: machine's replays read now (each is
    taken once, by the first load of it: any later one reads what was saved since)."""
    for op in ops:
        _preloaded[(machine, op)] = _read(machine, op)


_preloaded: dict[tuple[str, str], tuple[dict[str, Any] | None, list[Step] | None]] = {}


def _read(machine: str, op: str) -> tuple[dict[str, Any] | None, list[Step] | None]:
    """A saved replay's key (its arguments under "args") and steps; (None, None) where there is none
    that could be sent."""
    try:
        saved = jsonc.load(paths.replay_path(machine, op))
        key = saved["key"]
        steps = [(str(ns), str(what), bytes.fromhex(data), [(int(o), str(f)) for o, f in fields])
                 for ns, what, data, fields in saved["steps"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None
    if not isinstance(key, dict) or not isinstance(key.get("args"), dict):
        return None, None
    # (nothing is sent that would not fit: each field where a 32-bit value goes, of a known name)
    if all(ns in ("host", "machine") and len(data) >= HEADER.size and
           all(o % 4 == 0 and HEADER.size <= o <= len(data) - 4 and f in FIELDS for o, f in fields)
           for ns, _, data, fields in steps):
        return key, steps
    return None, None


def early_plan(machine: str, mode: str) -> tuple[dict[str, Any], list[Step], int | None] | None:
    """mctl's first step for a start whose replays are saved (netagent.Early, before its thread):
    the saved replay of attach_veth, the arguments it was saved with (which mctl later compares with
    the machine's: netagent.Inline.adopt) and the bridge's index, for attach_here(). None where the
    replay cannot be sent as it is: none saved, built by other code or for another kernel or another
    network mode (as given or set: bridge[:NAME] or veth), not _attachable, or a state of the
    machine's (it runs, or the cleanup after its killed supervisor, which mctl does in a moment,
    removes its links by name)."""
    from machined import state

    if os.path.exists(state.state_path(machine)):
        return None
    key, steps = _read(machine, "attach_veth")
    if key is None or steps is None:
        return None
    args = key["args"]
    if key != _key("attach_veth", args) or args.get("machine") != machine:
        return None
    bridge, outer, kind = args.get("bridge"), args.get("outer"), args.get("kind")
    if not isinstance(bridge, dict) or not isinstance(outer, str) or outer.startswith("vp-"):
        return None  # (a pod's links are made in the pod's namespace: never adopted)
    want, _, link = mode.partition(":")
    if kind != want or (link and bridge.get("name") != link):
        return None
    fits, master = _attachable(bridge, str(kind), outer)
    if not fits:
        return None
    preload(machine, ("address_veth",))  # (what the supervisor sends next, read here meanwhile)
    return args, steps, master


def attach_here(plan: tuple[dict[str, Any], list[Step], int | None], host: _socket.socket) -> int:
    """Early's thread, which ends right after: early_plan()'s veth pair, in a new network namespace
    that the calling thread enters for good (one system call less than coming back); host: a route
    netlink socket made in the host's namespace. Returns the namespace's fd; nothing outlives it:
    the links go with the namespace. The main thread did everything else before, so that this
    thread, whose every system call ends with a wait for the GIL, makes as few as it can."""
    from machined import linux

    args, steps, master = plan
    linux.unshare(linux.CLONE_NEWNET)
    netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        run(steps, netns, args["outer"], master, {"host": host})
    except BaseException:
        os.close(netns)
        raise
    return netns


def save(machine: str, op: str, args: dict[str, Any], steps: list[Step]) -> None:
    """Best effort: a replay that cannot be saved is built again next time."""
    path = paths.replay_path(machine, op)
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        jsonc.save(path, {"key": _key(op, args),  # (its arguments too, for early_plan)
                          "steps": [[ns, what, data.hex(), fields] for ns, what, data, fields in steps]})
    except OSError:
        pass


def locate(data: bytes, markers: dict[str, int]) -> list[tuple[int, str]]:
    """Where an encoded request holds the markers (netlink aligns its fields to 32 bits)."""
    return sorted((off, name) for off in range(0, len(data) - 3, 4) for name, marker in markers.items()
                  if _U32.unpack_from(data, off)[0] == marker)


def same(a: list[Step], b: list[Step]) -> bool:
    """Whether two builds of a replay (with different markers) agree: the same fields in the same
    places, and the same bytes everywhere else."""
    def masked(step: Step) -> tuple[str, str, bytes, list[tuple[int, str]]]:
        ns, what, data, fields = step
        out = bytearray(data)
        for offset, _ in fields:
            out[offset:offset + 4] = bytes(4)
        return ns, what, bytes(out), fields

    return len(a) == len(b) and all(masked(x) == masked(y) for x, y in zip(a, b, strict=True))


def run(steps: list[Step], netns: int, outer: str, master: int | None = None,
        given: dict[str, _socket.socket] | None = None) -> None:
    """Send a replay's requests in order, each once the last was acknowledged; NetlinkError for an
    error reply (a MachinedError "Failed to <what>" where the step says what). given: sockets by
    namespace, the caller's to close."""
    lookups: dict[str, Callable[[], int]] = {
        "netns": lambda: netns, "master": lambda: master if master is not None else -1,
        "outer": lambda: ifindex(outer), "host0": lambda: _index_in(netns, "host0")}
    values: dict[str, int] = {}  # (each looked up once, when a request first needs it)
    socks: dict[str, _socket.socket] = {}
    try:
        for seq, step in enumerate(steps, 1):
            ns, what, _, fields = step
            sock = (given or {}).get(ns) or socks.get(ns)
            if sock is None:
                sock = socks[ns] = rtnl_socket(netns if ns == "machine" else -1)
            for _, field in fields:
                if field not in values:
                    values[field] = lookups[field]()
            sock.send(fill(step, seq, values))
            try:
                read_answer(sock, seq)
            except NetlinkError as e:
                if what:
                    raise MachinedError(f"Failed to {what}: {e.strerror}") from None
                raise
    finally:
        for sock in socks.values():
            sock.close()


def fill(step: Step, seq: int, values: dict[str, int]) -> bytes:
    """A step's request with its sequence number and fields filled in."""
    _, _, data, fields = step
    request = bytearray(data)
    HEADER.pack_into(request, 0, len(request), *HEADER.unpack_from(request)[1:3], seq, 0)
    for offset, field in fields:
        _U32.pack_into(request, offset, values[field] & 0xFFFFFFFF)
    return bytes(request)


def rtnl_socket(netns: int = -1) -> _socket.socket:
    """A route netlink socket, in the network namespace netns if it is one (sockets stay in the
    namespace they were made in)."""
    import _socket

    def make() -> _socket.socket:
        s = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, 0)  # NETLINK_ROUTE
        s.settimeout(TIMEOUT)
        return s

    return make() if netns < 0 else _in_netns(netns, make)


def _index_in(netns: int, ifname: str) -> int:
    import _socket

    return int(_in_netns(netns, lambda: _socket.if_nametoindex(ifname)))


def _in_netns(netns: int, do: Callable[[], Any]) -> Any:
    from machined import linux

    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(netns, linux.CLONE_NEWNET)
        try:
            return do()
        finally:
            linux.setns(own, linux.CLONE_NEWNET)
    finally:
        os.close(own)


def read_answer(sock: _socket.socket, seq: int, on_message: Callable[[bytes], None] | None = None) -> None:
    """Read the answer to request seq until the kernel acknowledged it or ended the dump, each of its
    other messages handed to on_message. NetlinkError for an error reply."""
    while True:
        data = sock.recv(1 << 17)
        offset = 0
        while offset + HEADER.size <= len(data):
            length, mtype, _, got, _ = HEADER.unpack_from(data, offset)
            if length < HEADER.size:
                break  # malformed: the rest of this datagram cannot be framed
            start, offset = offset, offset + length
            if got != seq:
                continue  # an answer to an earlier request that timed out
            if mtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, start + HEADER.size)[0]
                if code:
                    raise NetlinkError(code, os.strerror(code))
                return
            if mtype == NLMSG_DONE:
                return
            if on_message is not None:
                on_message(data[start:offset])
