"""Address leases, forwarded host ports and the names of running networked machines (with their
addresses, for the hosts files), in one store under one lock in the runtime directory.

Each machine's address is derived from its machine id (a hash picks a preferred host number in the
subnet, taken addresses are skipped), so it stays the same across restarts without the store
keeping anything for stopped machines: the store holds exactly the leases, ports and names of
running machines. Every change happens under an exclusive flock, so concurrent starts never hand
out one address (or one host port) twice. An entry whose owner's supervisor is gone (killed with
SIGKILL) is stale and reclaimed by whoever looks next. The names are the hosts files' source: one
read of the store, whose entries are checked for life as it is opened anyway, rather than every
running machine's state.
"""

from __future__ import annotations

import fcntl
import os

import machined
from machined import jsonc, paths, state
from machined.inet import Address
from machined.log import die

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

    from machined.netconfig import Bridge, Port


def store_dir() -> str:
    return os.path.join(paths.runtime_dir(), "network")


def lock_path() -> str:
    return os.path.join(store_dir(), "lock")


def store_path() -> str:
    return os.path.join(store_dir(), "leases.json")


def _load() -> dict[str, dict[str, dict[str, object]]]:
    try:
        data = jsonc.load(store_path())
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


class Lock:
    """`with Lock():` holds the network lock alone (the network helper's, as it works on a bridge)."""

    def __init__(self) -> None:
        self.fd = -1

    def __enter__(self) -> Lock:
        os.makedirs(store_dir(), mode=0o755, exist_ok=True)
        self.fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)  # (a child forked meanwhile may still have it open)
        os.close(self.fd)


class Store(Lock):
    """`with Store() as s:` holds the network lock; changes are written back when it is left (also
    on an error: what was leased is in the owner's state, and its teardown gives it back)."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, dict[str, dict[str, object]]] = {}
        self.dirty = False

    def __enter__(self) -> Store:
        super().__enter__()
        self.data = _load()
        for key in ("leases", "ports", "names"):
            self.data.setdefault(key, {})
        self._reclaim()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.dirty:
                self._save()
        finally:
            super().__exit__(typ, exc, tb)

    def _save(self) -> None:
        live = {k: v for k, v in self.data.items() if v}
        if not live:
            try:
                os.unlink(store_path())  # nothing running: no store at all
            except FileNotFoundError:
                pass
            return
        jsonc.save(store_path(), live, sort_keys=True)

    def _reclaim(self) -> None:
        seen: dict[str, bool] = {}  # (a machine's lease and name share its supervisor: looked at once)
        for table in self.data.values():
            for key in [k for k, v in table.items() if not _owner_alive(v, seen)]:
                del table[key]
                self.dirty = True

    # --- addresses ------------------------------------------------------------------------------

    def lease(self, br: Bridge, owner: str, ref: object, seed: str, fixed: str = "") -> Address:
        """The owner's address on bridge br: fixed if given (must be free), else the stable choice."""
        leases = self.data["leases"]
        for key, entry in list(leases.items()):
            if entry.get("owner") == owner and entry.get("pool") == br.name:
                del leases[key]  # our own earlier lease (a reboot, a crash): choose again, the same way
        taken = {e.get("addr") for e in leases.values() if e.get("pool") == br.name}  # (as str(Address) wrote them)
        reserved = {br.subnet.network_address, br.subnet.broadcast_address, br.gateway}
        if fixed:
            addr = Address.parse(fixed)
            reason = fixed_error(br, addr, owner, leases)
            if reason:
                die(f"Failed to lease {addr} to {owner}: {reason}")
        else:
            size = br.subnet.num_addresses
            start = int.from_bytes(machined.sha256(seed.encode())[:8], "big") % size
            for i in range(size):
                addr = br.subnet.network_address + (start + i) % size
                if addr not in reserved and str(addr) not in taken:
                    break
            else:
                die(f"No free address left in the subnet {br.subnet} of bridge {br.name}")
        leases[f"{br.name}/{addr}"] = {"pool": br.name, "addr": str(addr), "owner": owner, "ref": ref}
        self.dirty = True
        return addr

    def claim_ports(self, ports: list[Port], owner: str, ref: object) -> None:
        table = self.data["ports"]
        for port in ports:
            entry = table.get(port.key)
            if entry is not None and entry.get("owner") != owner:
                die(f"Host port {port.key} is already forwarded to {entry.get('owner')}")
        for port in ports:
            table[port.key] = {"owner": owner, "ref": ref, "to": port.machine}
        self.dirty = bool(ports) or self.dirty

    def add_name(self, name: str, ref: object, addresses: list[str]) -> None:
        """A running machine with a network, by its name and addresses (none: it only reads others')."""
        self.data["names"][name] = {"owner": name, "ref": ref, "addresses": addresses}
        self.dirty = True

    def names(self) -> dict[str, list[str]]:
        """The running machines with a network (valid names only: each is a path), and their addresses."""
        names = {}
        for name, entry in sorted(self.data["names"].items()):
            if paths.name_error(name) is None:
                addresses = entry.get("addresses")
                names[name] = [a for a in addresses if isinstance(a, str)] if isinstance(addresses, list) else []
        return names

    def release(self, owner: str) -> None:
        for table in self.data.values():
            for key in [k for k, v in table.items() if v.get("owner") == owner]:
                del table[key]
                self.dirty = True

    def add_ref(self, owner: str, ref: object) -> None:
        """One more process keeps owner's entries alive (a machine joining a pod)."""
        for entry in self.data["leases"].values():
            refs = entry.get("ref")
            if entry.get("owner") == owner and isinstance(refs, list) and ref not in refs:
                refs.append(ref)
                self.dirty = True

    def drop_ref(self, owner: str, ref: object) -> None:
        for entry in self.data["leases"].values():
            refs = entry.get("ref")
            if entry.get("owner") == owner and isinstance(refs, list) and ref in refs:
                refs.remove(ref)
                self.dirty = True


def fixed_error(br: Bridge, addr: Address, owner: str, leases: dict[str, dict[str, object]]) -> str:
    """Why addr cannot be owner's fixed address on br ('' if it can): it must be a free host address
    of the bridge's subnet, other than the gateway."""
    if addr not in br.subnet:
        return f"address {addr} is outside the subnet {br.subnet} of bridge {br.name}"
    if addr in (br.subnet.network_address, br.subnet.broadcast_address, br.gateway):
        return f"address {addr} is reserved in the subnet {br.subnet} of bridge {br.name}"
    for entry in leases.values():
        if entry.get("pool") == br.name and entry.get("addr") == str(addr) and entry.get("owner") != owner:
            return f"address {addr} is already leased to {entry.get('owner')}"
    return ""


def peek() -> dict[str, dict[str, dict[str, object]]]:
    """The store's live entries, read without the lock (for early checks; decisions take the lock)."""
    seen: dict[str, bool] = {}
    return {k: {kk: vv for kk, vv in v.items() if _owner_alive(vv, seen)} for k, v in _load().items()}


def _owner_alive(entry: object, seen: dict[str, bool]) -> bool:
    """Whether the entry's process (or, for a pod, any of its processes) runs; seen: the answers so
    far, by process."""
    if not isinstance(entry, dict):
        return False  # not ours to understand: a damaged store loses it
    ref = entry.get("ref")
    return any(_alive(r, seen) for r in ref) if isinstance(ref, list) else _alive(ref, seen)  # (a pod: a list)


def _alive(ref: object, seen: dict[str, bool]) -> bool:
    key = repr(ref)
    if key not in seen:
        seen[key] = state.is_alive(ref)
    return seen[key]
