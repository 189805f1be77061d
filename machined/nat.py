"""nftables rules for bridges and port forwards, through libnftables' JSON API (libnftables-json(5)).

pyroute2's nftables module is a self-declared prototype: it has expression builders only for
masquerade, IPv4 addresses and verdicts, decodes fib flags and results with the wrong types, and
does not return rule handles; DNAT to address and port, `fib daddr type local` and IPv6 would all
be hand-assembled bytecode. libnftables is the library nft(8) itself is built on; it takes the
documented JSON schema in-process (no nft binary is executed) and applies each batch atomically.

Every machine with port forwards gets a table of its own and every bridge one for its NAT, so
removing them is one idempotent 'delete table' each.
"""

from __future__ import annotations

import ctypes

from machined import jsonc
from machined.inet import Network
from machined.log import MachinedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from machined.netconfig import Port

NFT_CTX_OUTPUT_JSON = 1 << 4
FAMILY = "inet"  # one table serves IPv4 and IPv6
LOOPBACK = Network.parse("127.0.0.0/8")
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        except OSError as e:
            raise MachinedError(f"Failed to load libnftables: {e}", hint="apt install libnftables1") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = (ctypes.c_uint32,)
        lib.nft_ctx_free.argtypes = (ctypes.c_void_p,)
        lib.nft_ctx_output_set_flags.argtypes = (ctypes.c_void_p, ctypes.c_uint)
        lib.nft_ctx_buffer_output.argtypes = (ctypes.c_void_p,)
        lib.nft_ctx_buffer_error.argtypes = (ctypes.c_void_p,)
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = (ctypes.c_void_p,)
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = (ctypes.c_void_p,)
        lib.nft_run_cmd_from_buffer.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
        _lib = lib
    return _lib


def run(commands: list[dict[str, object]]) -> dict[str, object]:
    """Apply a batch of JSON commands atomically; raises OSError-like MachinedError with nft's reason."""
    lib = library()
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise MachinedError("Failed to use nftables: cannot create a context")
    try:
        lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, jsonc.dumps({"nftables": commands}).encode())
        if rc != 0:
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
            raise NftError(err.splitlines()[0] if err else f"error {rc}")
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
        return jsonc.loads(out) if out.strip() else {}
    finally:
        lib.nft_ctx_free(ctx)


class NftError(MachinedError):
    pass


def bridge_table(name: str) -> str:
    return f"machined-{name}"


def machine_table(name: str) -> str:
    return f"machined-fwd-{name}"


def _fresh_table(name: str) -> list[dict[str, object]]:
    """Commands that leave an empty table name, whether or not it existed (add, delete, add: one batch)."""
    table = {"table": {"family": FAMILY, "name": name}}
    return [{"add": table}, {"delete": table}, {"add": table}]


def _chain(table: str, name: str, ctype: str, hook: str, prio: int) -> dict[str, object]:
    return {"add": {"chain": {"family": FAMILY, "table": table, "name": name, "type": ctype, "hook": hook,
                              "prio": prio, "policy": "accept"}}}


def _rule(table: str, chain: str, *expr: dict[str, object]) -> dict[str, object]:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": list(expr)}}}


def _match(left: dict[str, object], right: object, op: str = "==") -> dict[str, object]:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(proto: str, fld: str) -> dict[str, object]:
    return {"payload": {"protocol": proto, "field": fld}}


def _prefix(net: Network) -> dict[str, object]:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def add_bridge(br: dict[str, Any]) -> None:
    """The bridge's table, made anew: masquerade (or no forwarding at all) and localhost forwards'
    plumbing."""
    run(_bridge_commands(br))


def renew_bridge(br: dict[str, Any]) -> None:
    """On every start with the bridge up: the bridge's table made anew where it is not as add_bridge
    left it (a firewall reload may have flushed it). Listing takes well under a millisecond, while a
    commit that deletes a table waits for an RCU grace period (~10 ms)."""
    cmds = _bridge_commands(br)
    try:
        listed = run([{"list": {"table": {"family": FAMILY, "name": bridge_table(br["name"])}}}])
    except NftError:
        listed = {}  # no such table
    items = listed.get("nftables", [])
    if _shape(c["add"] for c in cmds if "add" in c) != _shape(items if isinstance(items, list) else []):
        run(cmds)


def _shape(items: Iterable[object]) -> list[tuple[str, ...]]:
    """The chains of a table and each one's number of rules, from nft's JSON objects."""
    shape: list[tuple[str, ...]] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("chain"), dict):
            shape.append(("chain", str(item["chain"].get("name"))))
        elif isinstance(item, dict) and isinstance(item.get("rule"), dict):
            shape.append(("rule", str(item["rule"].get("chain"))))
    return sorted(shape)


def _bridge_commands(br: dict[str, Any]) -> list[dict[str, object]]:
    """br: netconfig.Bridge.to_json() (what the network helper gets)."""
    name = br["name"]
    t = bridge_table(name)
    iif: dict[str, object] = {"meta": {"key": "iifname"}}
    oif: dict[str, object] = {"meta": {"key": "oifname"}}
    cmds: list[dict[str, object]] = [
        *_fresh_table(t),
        # Forwards from 127.0.0.1 need route_localnet on the bridge; without this rule a machine
        # could then reach the host's loopback-only services (CVE-2020-8558 in kube-proxy).
        _chain(t, "guard", "filter", "prerouting", -300),
        _rule(t, "guard", _match(iif, name), _match(_payload("ip", "daddr"), _prefix(LOOPBACK)),
              {"drop": None}),
        _chain(t, "postrouting", "nat", "postrouting", 100),
        # Forwarded connections from the host's loopback: answer to the bridge's address instead.
        _rule(t, "postrouting", _match(oif, name), _match(_payload("ip", "saddr"), _prefix(LOOPBACK)),
              {"masquerade": None}),
        _chain(t, "forward", "filter", "forward", 0),
    ]
    if br["nat"]:
        nets = [(proto, Network.parse(br[key], version)) for proto, key, version in
                (("ip", "subnet", 4), ("ip6", "ipv6_subnet", 6)) if br[key]]
        for proto, net in nets:
            cmds.append(_rule(t, "postrouting", _match(_payload(proto, "saddr"), _prefix(net)),
                              _match(_payload(proto, "daddr"), _prefix(net), "!="), {"masquerade": None}))
    else:
        # Host-only: machines reach the host and each other, nothing is routed beyond the bridge.
        cmds.append(_rule(t, "forward", _match(iif, name), _match(oif, name, "!="), {"drop": None}))
        cmds.append(_rule(t, "forward", _match(oif, name), _match(iif, name, "!="), {"drop": None}))
    return cmds


def add_forwards(machine: str, ports: list[Port], address: str, address6: str | None) -> None:
    """DNAT the host's ports to the machine, for traffic from outside (prerouting) and from the host
    itself (output), to any local address: 127.0.0.1 included on a bridge (it has route_localnet)."""
    t = machine_table(machine)
    cmds: list[dict[str, object]] = [*_fresh_table(t),
                                     _chain(t, "prerouting", "nat", "prerouting", -100),
                                     _chain(t, "output", "nat", "output", -100)]
    local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    targets = [("ip", address)] + ([("ip6", address6)] if address6 else [])
    for port in ports:
        for chain in ("prerouting", "output"):
            for family, addr in targets:
                cmds.append(_rule(t, chain, _match({"meta": {"key": "nfproto"}}, "ipv4" if family == "ip" else "ipv6"),
                                  local, _match(_payload(port.proto, "dport"), port.host),
                                  {"dnat": {"family": family, "addr": addr, "port": port.machine}}))
    run(cmds)


def delete_table(name: str) -> None:
    """Idempotent: a table that is not there is fine."""
    try:
        run([{"delete": {"table": {"family": FAMILY, "name": name}}}])
    except NftError as e:
        if "No such file or directory" not in str(e):
            raise
