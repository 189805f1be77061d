"""Replays (machined.netops): a bridged start sends the rtnetlink requests pyroute2 encoded on an earlier
start, its fields filled in, without importing pyroute2; and what it makes is what netlink made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from machined import netagent, netlink, netops
from tests.conftest import SESSION_SUBNET, Env, processes
from tests.test_network import address, dummy, links, sh, state

BRIDGE = {"name": "mbtest0", "subnet": "10.77.5.0/24", "gateway": "10.77.5.1", "ipv6_subnet": "fd00:77:5::/64",
          "gateway6": "fd00:77:5::1", "nat": True, "keep": True}
ATTACH = {"machine": "m1", "bridge": BRIDGE, "kind": "bridge", "outer": "vb-m1", "altname": "vb-m1-long-name",
          "seed": "seed"}
ADDRESS = {"machine": "m1", "bridge": BRIDGE, "kind": "bridge", "outer": "vb-m1", "address": "10.77.5.9",
           "address6": "fd00:77:5::9"}
VALUES = {"netns": 7, "master": 12, "outer": 345, "host0": 2}


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MACHINED_RUNTIME_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(("op", "args"), [("attach_veth", ATTACH), ("address_veth", ADDRESS),
                                          ("attach_veth", {**ATTACH, "kind": "veth", "altname": ""}),
                                          ("address_veth", {**ADDRESS, "kind": "veth", "address6": ""})])
def test_a_replay_sends_what_pyroute2_encodes(runtime: Path, op: str, args: dict[str, Any]) -> None:
    """Filled in, each request of a replay is byte for byte pyroute2's encoding of the request made
    with those values; and the saved replay, loaded, is the same."""
    steps = netlink.replay(op, args)
    direct = [netlink.encode(r) for r in netlink.REQUESTS[op](VALUES, **args)]
    assert [netops.fill(step, 0, VALUES) for step in steps] == direct
    assert len(steps) == len(direct) >= 1
    assert netops.load("m1", op, args) == steps
    fields = {field for step in steps for _, field in step[3]}
    assert fields == ({"netns", "master", "outer"} if op == "attach_veth" and args["kind"] == "bridge" else
                      {"netns"} if op == "attach_veth" else
                      {"host0"} if args["kind"] == "bridge" else {"host0", "outer"})
    # The sequence number goes into the header, the length stays.
    filled = netops.fill(steps[0], 9, VALUES)
    assert netops.HEADER.unpack_from(filled)[0] == len(filled) and netops.HEADER.unpack_from(filled)[3] == 9


def test_a_value_that_equals_a_marker_is_no_field(runtime: Path) -> None:
    """An address whose bytes are a marker (for host0, in the first set): the other set decides."""
    marker = netops.MARKER_SETS[0]["host0"].to_bytes(4, sys.byteorder)
    odd = ".".join(str(b) for b in marker)
    args = {**ADDRESS, "address": odd, "address6": ""}
    steps = netlink.replay("address_veth", args)
    assert [netops.fill(step, 0, VALUES) for step in steps] == \
        [netlink.encode(r) for r in netlink.REQUESTS["address_veth"](VALUES, **args)]
    plain = netlink.replay("address_veth", {**ADDRESS, "machine": "m2", "address6": ""})
    assert [step[3] for step in steps] == [step[3] for step in plain]  # the index alone, as for any address


def test_replays_are_kept_per_machine_and_settings(runtime: Path) -> None:
    steps = netlink.replay("attach_veth", ATTACH)
    assert netagent.replayable("m1") is False  # (attach alone: the addresses' replay is missing)
    netlink.replay("address_veth", ADDRESS)
    assert netagent.replayable("m1") and not netagent.replayable("m2")
    assert netops.load("m1", "attach_veth", {**ATTACH, "seed": "other"}) is None  # other settings
    assert netops.load("m2", "attach_veth", {**ATTACH, "machine": "m2"}) is None
    path = Path(netagent.replay_paths("m1")[0])
    assert path.parent == runtime / "network" / "replays" and path.name == "m1.attach_veth.json"
    saved = json.loads(path.read_text())
    for damage in ("", "{", '{"key": 1}', "[]"):
        path.write_text(damage)
        assert netops.load("m1", "attach_veth", ATTACH) is None
    # Fields that would not fit their request (their key right): refused too.
    for field in ([1 << 20, "netns"], [2, "netns"], [20, "pid"]):
        damaged = {**saved, "steps": [[*saved["steps"][0][:3], [field]], *saved["steps"][1:]]}
        path.write_text(json.dumps(damaged))
        assert netops.load("m1", "attach_veth", ATTACH) is None, field
    path.write_text(json.dumps({**saved, "steps": [["other", *saved["steps"][0][1:]]]}))
    assert netops.load("m1", "attach_veth", ATTACH) is None
    assert netlink.replay("attach_veth", ATTACH) == steps  # made again
    builder = Path(netlink.__file__)
    stamp = builder.stat()
    try:  # another machined (its netlink.py) builds its own
        os.utime(builder, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))
        assert netops.load("m1", "attach_veth", ATTACH) is None
    finally:
        os.utime(builder, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert netops.load("m1", "attach_veth", ATTACH) == steps
    with pytest.raises(Exception, match="Invalid machine name"):
        netops.load("../x", "attach_veth", ATTACH)


def test_a_preloaded_replay_is_taken_once(runtime: Path) -> None:
    """The helper reads its machine's replays while it waits for its first request (preload): the
    first load of each takes what was read then, whatever its arguments; a later one reads the file."""
    steps = netlink.replay("attach_veth", ATTACH)
    netlink.replay("address_veth", ADDRESS)
    netops.preload("m1")
    for path in netagent.replay_paths("m1"):
        os.unlink(path)
    assert netops.load("m1", "attach_veth", ATTACH) == steps  # as read before
    assert netops.load("m1", "attach_veth", ATTACH) is None  # as saved now: none
    assert netops.load("m1", "address_veth", {**ADDRESS, "address": "10.77.5.10"}) is None  # other settings
    assert netops.load("m1", "address_veth", ADDRESS) is None


# --- as root: the replays at work ------------------------------------------------------------------

def _replays(env: Env, name: str) -> list[Path]:
    return [env.runtime / "network" / "replays" / f"{name}.{op}.json" for op in netagent.REPLAYED]


def _inside(env: Env, name: str) -> str:
    """What the machine's network looks like from inside, without what differs from boot to boot."""
    out = env.ok("shell", name, "--", "sh", "-c", "ip -o addr show dev host0; ip route; ip -o link show dev host0")
    return "\n".join(line.split("@")[0] + " ".join(w for w in line.split() if ":" in w and len(w) == 17)
                     if " link/" in line or "mtu" in line else line for line in out.splitlines())


@pytest.mark.root
@pytest.mark.parametrize("mode", ["bridge", "veth"])
def test_a_replayed_start_makes_what_the_first_made(env: Env, mode: str) -> None:
    """The first start saves the replays; the next ones send them (the files are not made again) and
    the machine's network is as before, on the host and inside; a reboot replays too."""
    name = env.name("rlong")  # (long: a hashed host link, with the full name as its altname)
    env.ok("create", name, "--template", "busybox", "--network", mode)
    env.ok("start", name)
    files = _replays(env, name)
    assert all(p.exists() for p in files)
    made = [p.stat().st_mtime_ns for p in files]
    link = str(state(env, name)["interfaces"][0])  # type: ignore[index]
    first = (address(env, name), _inside(env, name), sh("ip", "-o", "link", "show", link).split(": ", 1)[1].split()[0])
    assert f"altname vb-{name}" in sh("ip", "link", "show", link) or mode == "veth"
    env.ok("terminate", name)
    for _ in range(2):
        env.ok("start", name)
        again = (address(env, name), _inside(env, name),
                 sh("ip", "-o", "link", "show", link).split(": ", 1)[1].split()[0])
        assert again == first
        assert [p.stat().st_mtime_ns for p in files] == made  # sent as saved
        env.ok("terminate", name)
    env.ok("start", name)
    env.ok("reboot", name, timeout=30)
    assert _inside(env, name) == first[1] and [p.stat().st_mtime_ns for p in files] == made
    env.ok("terminate", name)
    assert link not in links()
    env.ok("remove", name)
    assert not any(p.exists() for p in files)  # a removed machine's replays go with it


@pytest.mark.root
def test_new_settings_make_a_new_replay(env: Env) -> None:
    """A replay is for the settings it was made with: another address is another replay."""
    name = env.name()
    base = SESSION_SUBNET.rsplit(".", 1)[0]
    env.ok("create", name, "--template", "busybox", "--address", f"{base}.201")
    env.ok("start", name)
    env.ok("terminate", name)
    path = _replays(env, name)[1]
    saved = path.read_text()
    cfg = env.config / f"{name}.toml"
    cfg.write_text(cfg.read_text().replace(f'"{base}.201"', f'"{base}.202"'))
    env.ok("start", name)
    assert address(env, name) == f"{base}.202" and path.read_text() != saved
    inside = env.ok("shell", name, "--", "ip", "-o", "addr", "show", "dev", "host0")
    assert f"inet {base}.202/" in inside and f"{base}.201" not in inside
    env.ok("terminate", name)


@pytest.mark.root
def test_a_link_in_the_way_is_left_to_netlink(env: Env) -> None:
    """A replay is only for a start with nothing in its way: a link of the host end's name (a last
    boot's that did not go) is deleted first, as without a replay."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    env.ok("terminate", name)
    outer = f"vb-{name}"
    sh("ip", "link", "add", outer, "type", "veth", "peer", "name", f"x{outer}"[:15])
    try:
        env.ok("start", name)
        assert "master" in sh("ip", "-o", "link", "show", outer)  # ours now: a port of the bridge
        env.ok("terminate", name)
        assert outer not in links()
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True)


@pytest.mark.root
def test_a_mode_without_replays_gets_a_helper_that_loads_pyroute2(env: Env) -> None:
    """A bridged machine's replays are nothing to a start in another mode: its helper is forked and
    loads pyroute2 at once, as for a machine that never had replays."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    env.ok("terminate", name)
    assert all(p.exists() for p in _replays(env, name))
    with dummy() as link:
        env.ok("start", name, "--network", f"interface:{link}")
        [pid] = processes("machined-net", name)
        assert b"-I" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")  # forked, not spawned
        assert link in env.ok("shell", name, "--", "ip", "-o", "link")
        env.ok("poweroff", name)
        assert link in links()
