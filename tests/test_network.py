"""Networking for real: bridges, veths, leases, NAT, port forwards, names, pods, cleanup.

Every host object carries the session's TOKEN; the only addresses used are on links and in
network namespaces the tests make (the session bridge's subnet, a test bridge's, an "outside"
namespace's); nothing is sent beyond this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SESSION_BRIDGE, SESSION_SUBNET, TOKEN, Env, free_subnet, host_config
from tests.test_bad_input import assert_clean_error
from tests.test_teardown import _wait as wait

pytestmark = pytest.mark.root


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


def state(env: Env, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((env.runtime / "machines" / name / "state.json").read_text())
    return data


def address(env: Env, name: str) -> str:
    addrs = state(env, name)["addresses"]
    assert isinstance(addrs, list)
    return str(addrs[0])


def links() -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-o", "link", "show").splitlines()]


def nft_tables() -> list[str]:
    return sh("nft", "list", "tables").splitlines()


def serve(env: Env, name: str, port: int) -> None:
    """busybox httpd in the machine (it daemonizes), answering /name with the machine's hostname."""
    env.ok("shell", name, "--", "sh", "-c", f"mkdir -p /www && hostname > /www/name && httpd -p {port} -h /www")


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode().strip())


def free_port() -> int:
    while True:
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port


def add_bridge(env: Env, ipv6: bool = False, nat: bool = False) -> tuple[str, str]:
    """A bridge of the test's own in the host config (name, subnet), beside the session's default."""
    name = env.ifname("n")
    subnet = free_subnet(exclude=(SESSION_SUBNET,))
    extra = f'\n[network.bridges.{name}]\nsubnet = "{subnet}"\nnat = {"true" if nat else "false"}\nkeep = false\n'
    if ipv6:
        extra += f'ipv6_subnet = "fd{os.urandom(1).hex()}:{os.urandom(2).hex()}:{os.urandom(2).hex()}::/64"\n'
    (env.config / "machined.conf").write_text(host_config(hosts_file=str(env.hosts_file), extra=extra))
    return name, subnet


@contextlib.contextmanager
def outside(subnet: str) -> Iterator[tuple[str, str, str]]:
    """'The outside': a network namespace linked to the host by a veth (host .1, outside .2 of a /30).
    Yields (netns, host address, outside address); it has no route to any machine's subnet."""
    ns, link = f"o{TOKEN}{os.urandom(2).hex()}", f"x{TOKEN}{os.urandom(2).hex()}"
    base = subnet.rsplit(".", 1)[0]
    host_addr, out_addr = f"{base}.1", f"{base}.2"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{host_addr}/30", "dev", link)
        sh("ip", "link", "set", link, "up")
        sh("ip", "-n", ns, "addr", "add", f"{out_addr}/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, host_addr, out_addr
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def resolve_on_host(env: Env, name: str) -> str:
    """getent hosts NAME with the manager's hosts file as /etc/hosts (in a private mount namespace)."""
    return sh("unshare", "-m", "sh", "-c", f'mount --bind "{env.hosts_file}" /etc/hosts && getent hosts "{name}"')


# --- the must-shows --------------------------------------------------------------------------------

def test_two_machines_on_the_default_bridge(env: Env) -> None:
    a, b = env.name("a"), env.name("b")
    for n in (a, b):
        env.ok("create", n, "--template", "busybox")
        env.ok("start", n)
    addr_a, addr_b = address(env, a), address(env, b)
    assert addr_a != addr_b
    # Both on the session bridge, host0 inside with the leased address and a default route.
    assert sh("ip", "-o", "link", "show", "master", SESSION_BRIDGE).count("vb-") == 2
    inside = env.ok("shell", a, "--", "ip", "-o", "addr", "show", "dev", "host0")
    assert f"inet {addr_a}/24" in inside
    assert "default via" in env.ok("shell", a, "--", "ip", "route")
    # By address and by name, both ways.
    for src, dst in ((a, addr_b), (a, b), (b, addr_a), (b, a)):
        r = env.mctl("shell", src, "--", "ping", "-c", "1", "-W", "2", dst)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, (src, dst, r.stdout, r.stderr)
    # The host reaches both, by address and by name (through the hosts file it keeps for the host).
    for n in (a, b):
        serve(env, n, 8000)
        assert fetch(f"http://{address(env, n)}:8000/name") == n
        assert resolve_on_host(env, n).split() == [address(env, n), n]
    script = ("import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
    out = sh("unshare", "-m", "sh", "-c", f'mount --bind "{env.hosts_file}" /etc/hosts && '
             f'/usr/bin/python3 -c "{script}" http://{b}:8000/name')
    assert out.strip() == b
    listing = {m["machine"]: m for m in json.loads(env.ok("list", "-o", "json"))}
    assert listing[a]["addresses"] == [addr_a]
    assert addr_b in env.ok("status", b)
    for n in (a, b):
        env.ok("poweroff", n)
    assert SESSION_BRIDGE not in links()  # keep = false: the bridge went with its last machine
    assert f"{TOKEN}" not in env.hosts_file.read_text()


@pytest.fixture
def forwarding() -> Iterator[None]:
    """A NAT bridge turns IPv4 forwarding on for good (as LXC and nspawn do); the test gives it back."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text()
    try:
        yield
    finally:
        path.write_text(before)


def test_nat_to_the_outside(env: Env, forwarding: None) -> None:
    br, _ = add_bridge(env, nat=True)
    out_subnet = free_subnet(exclude=(SESSION_SUBNET,))
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--network", f"bridge:{br}")
    with outside(out_subnet) as (ns, host_addr, out_addr):
        # A server in the outside that tells each client the address it sees.
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "/usr/bin/python3", "-c",
             "import socket\ns = socket.create_server(('0.0.0.0', 7000))\n"
             "while True:\n c, a = s.accept(); c.sendall(a[0].encode() + b'\\n'); c.close()"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            env.ok("start", name)
            assert wait(lambda: "7000" in sh("ip", "netns", "exec", ns, "ss", "-ltn"))
            r = env.mctl("shell", name, "--", "ping", "-c", "1", "-W", "2", out_addr)
            assert r.returncode == 0, r.stdout + r.stderr
            seen = env.ok("shell", name, "--", "nc", out_addr, "7000").strip()
            # The outside sees the host's address, not the machine's: masqueraded.
            assert seen == host_addr != address(env, name)
            assert "masquerade" in sh("nft", "list", "table", "inet", f"machined-{br}")
            assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        finally:
            server.kill()
            server.wait()
            env.mctl("poweroff", name)
    assert f"machined-{br}" not in "\n".join(nft_tables())


def _table_handle(table: str) -> int:
    listed = json.loads(sh("nft", "-j", "list", "tables"))["nftables"]
    return next(int(t["table"]["handle"]) for t in listed if t.get("table", {}).get("name") == table)


def test_a_damaged_bridge_table_is_made_again_by_the_next_start(env: Env) -> None:
    """A firewall reload may flush the bridge's table or delete it: the next start on the bridge
    makes it again (while its init starts: done just after mctl returns), and a start that finds it
    as it was made leaves it alone (the same table)."""
    br, _ = add_bridge(env, nat=True)
    names = [env.name() for _ in range(4)]
    for name in names:
        env.ok("create", name, "--template", "busybox", "--network", f"bridge:{br}")
    table = f"machined-{br}"

    def listed() -> str:
        return sh("nft", "list", "table", "inet", table, check=False)

    try:
        env.ok("start", names[0])
        made = listed()
        assert "masquerade" in made and "guard" in made
        sh("nft", "flush", "table", "inet", table)  # its chains stay, its rules go
        env.ok("start", names[1])
        assert wait(lambda: listed() == made)
        sh("nft", "delete", "table", "inet", table)
        env.ok("start", names[2])
        assert wait(lambda: listed() == made)
        handle = _table_handle(table)
        env.ok("start", names[3])
        env.ok("poweroff", names[3])  # (by then its supervisor has had the helper's answer)
        assert _table_handle(table) == handle
    finally:
        for name in names:
            env.mctl("poweroff", name)
    assert table not in "\n".join(nft_tables())


def test_port_forward_from_host_address_and_localhost(env: Env) -> None:
    br, subnet = add_bridge(env, ipv6=True)
    gateway = subnet.rsplit(".", 1)[0] + ".1"
    name = env.name()
    port = free_port()
    env.ok("create", name, "--template", "busybox", "--network", f"bridge:{br}", "--port", f"{port}:80")
    env.ok("start", name)
    serve(env, name, 80)
    addrs = state(env, name)["addresses"]
    assert isinstance(addrs, list) and len(addrs) == 2 and ":" in addrs[1]
    gateway6 = sh("ip", "-6", "-o", "addr", "show", "dev", br, "scope", "global").split()[3].split("/")[0]
    for url in (f"http://127.0.0.1:{port}/name", f"http://{gateway}:{port}/name", f"http://[{gateway6}]:{port}/name"):
        assert fetch(url) == name, url
    assert f"machined-fwd-{name}" in "\n".join(nft_tables())
    env.ok("poweroff", name)
    assert f"machined-fwd-{name}" not in "\n".join(nft_tables())
    for url in (f"http://127.0.0.1:{port}/name", f"http://{gateway}:{port}/name"):
        with pytest.raises(OSError):
            fetch(url, timeout=1)


def test_pod_shares_localhost_and_hostname(env: Env) -> None:
    pod, a, b = env.name("p"), env.name("a"), env.name("b")
    for n in (a, b):
        env.ok("create", n, "--template", "busybox", "--pod", pod)
    env.ok("start", a)
    env.ok("start", b)
    env.ok("shell", b, "--", "sh", "-c",
           "echo from-b > /tmp/msg && (nc -l -p 7777 -e cat /tmp/msg </dev/null >/dev/null 2>&1 &) && sleep 0.1")
    assert env.ok("shell", a, "--", "nc", "127.0.0.1", "7777").strip() == "from-b"
    assert env.ok("shell", a, "--", "hostname") == env.ok("shell", b, "--", "hostname")
    # One network: the same address and links; separate PID namespaces, roots and cgroups.
    assert address(env, a) == address(env, b)
    assert env.ok("shell", a, "--", "ip", "-o", "link") == env.ok("shell", b, "--", "ip", "-o", "link")
    la, lb = (state(env, n)["leader"] for n in (a, b))
    assert isinstance(la, dict) and isinstance(lb, dict)
    ns = [{k: os.readlink(f"/proc/{ld['pid']}/ns/{k}") for k in ("net", "ipc", "uts", "pid", "mnt", "cgroup")}
          for ld in (la, lb)]
    assert [ns[0][k] == ns[1][k] for k in ("net", "ipc", "uts", "pid", "mnt", "cgroup")] == \
        [True, True, True, False, False, False]
    env.ok("shell", a, "--", "touch", "/root/only-in-a")
    assert env.mctl("shell", b, "--", "test", "-e", "/root/only-in-a").returncode == 1
    # The pod outlives its first machine and ends with its last.
    env.ok("poweroff", a)
    assert env.ok("shell", b, "--", "ping", "-c", "1", "-W", "2", SESSION_SUBNET.rsplit(".", 1)[0] + ".1")
    assert (env.runtime / "pods" / pod).exists()
    env.ok("poweroff", b)
    assert not (env.runtime / "pods" / pod).exists()
    assert str(env.runtime) not in Path("/proc/self/mountinfo").read_text()
    assert not [link for link in links() if link.startswith("vp-")  and TOKEN in link]


# --- cleanup ---------------------------------------------------------------------------------------

# Links that concurrent sessions' machines, bridges (and benchmarks) make: another token's are not ours to judge.
FOREIGN = re.compile(r"^(vb|ve|vp|mv)-|^mb|^[xnde][0-9a-f]{4}")


def host_network() -> dict[str, object]:
    """`ip -d link`, `ip addr`, `nft list ruleset` as they are, less what other sessions' tests own."""
    def blocks(text: str) -> list[str]:
        result: list[str] = []
        for line in text.splitlines():
            if re.match(r"^\d+: ", line):
                result.append(line)
            elif result:
                result[-1] += "\n" + line
        return [b for b in result if TOKEN in b or not FOREIGN.match(b.split(": ")[1].split("@")[0])]

    ruleset, tables, keep = sh("nft", "list", "ruleset").splitlines(), [], True
    for line in ruleset:
        if line.startswith("table "):
            keep = " machined-" not in line or TOKEN in line
        if keep:
            tables.append(line)
    # A bridge's running timers (hello_timer 0.00, gc_timer 12.34) tick by themselves: not a change.
    link = re.sub(r"(\w+_timer) +[\d.]+", r"\1", sh("ip", "-d", "link"))
    return {"link": blocks(link), "addr": blocks(sh("ip", "addr")), "nft": tables}


def difference(before: dict[str, object], after: dict[str, object]) -> str:
    """What changed, readably: the lines only before (-) or only after (+)."""
    lines = []
    for key in before:
        b, a = set(str(before[key]).split("\\n")), set(str(after[key]).split("\\n"))
        lines += [f"{key} - {x}" for x in sorted(b - a)] + [f"{key} + {x}" for x in sorted(a - b)]
    return "\n".join(lines)


def lease_store(env: Env) -> str | None:
    """The leases and forwarded ports of running machines (no file when there are none)."""
    p = env.runtime / "network" / "leases.json"
    return p.read_text() if p.exists() else None


def test_hundred_cycles_leave_the_host_as_before(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--port", f"{free_port()}:80")
    before, store_before = host_network(), lease_store(env)
    addresses = set()
    for i in range(100):
        env.ok("start", name)
        addresses.add(address(env, name))
        if i == 0:
            assert name in (lease_store(env) or "")  # while it runs, its lease and port are in the store
        env.ok("terminate", name)
    assert host_network() == before
    assert lease_store(env) == store_before
    assert len(addresses) == 1  # a stable address, restart after restart


def test_hosts_files_follow_the_running_machines(env: Env) -> None:
    """A machine's /etc/hosts is its guest's own file (as it was at its start) and every running
    machine: another's start adds that one's name, its end removes it, also where its supervisor was
    killed (at the next call), and the guest's own lines stay. The names are the lease store's."""
    a, b = env.name("a"), env.name("b")
    for n in (a, b):
        env.ok("create", n, "--template", "busybox")
    (env.images / a / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n10.9.9.9\tguestonly\n")
    env.ok("start", a)
    env.ok("start", b)
    inside = env.ok("shell", a, "--", "cat", "/etc/hosts")
    assert inside.startswith("127.0.0.1\tlocalhost\n10.9.9.9\tguestonly\n"), inside
    assert f"{address(env, a)}\t{a}\n" in inside and f"{address(env, b)}\t{b}\n" in inside, inside
    names = json.loads(lease_store(env) or "{}")["names"]
    assert {n: e["addresses"] for n, e in names.items()} == {a: [address(env, a)], b: [address(env, b)]}
    assert env.ok("shell", b, "--", "cat", "/etc/hosts").count("guestonly") == 0
    os.kill(state(env, b)["supervisor"]["pid"], signal.SIGKILL)  # type: ignore[index]
    time.sleep(0.2)
    assert [m["machine"] for m in json.loads(env.ok("list", "-o", "json"))] == [a]  # the next call cleans up
    inside = env.ok("shell", a, "--", "cat", "/etc/hosts")
    assert b not in inside and f"\t{a}\n" in inside and "guestonly" in inside, inside
    assert list(json.loads(lease_store(env) or "{}")["names"]) == [a]
    env.ok("terminate", a)
    assert lease_store(env) is None


def test_supervisor_killed_then_next_call_cleans_network(env: Env) -> None:
    name = env.name()
    port = free_port()
    env.ok("create", name, "--template", "busybox", "--port", f"{port}:80")
    before = host_network()
    env.ok("start", name)
    data = state(env, name)
    os.kill(data["supervisor"]["pid"], signal.SIGKILL)  # type: ignore[index]
    time.sleep(0.2)
    assert json.loads(env.ok("list", "-o", "json")) == []  # the next call cleans up
    assert wait(lambda: host_network() == before), difference(before, host_network())
    assert not (env.runtime / "network" / "leases.json").exists()
    assert TOKEN not in env.hosts_file.read_text()
    env.ok("start", name)  # the address and port are free again
    env.ok("terminate", name)


def test_init_crash_and_failed_start_clean_network(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--port", f"{free_port()}:80")
    before = host_network()
    env.ok("start", name)
    os.kill(state(env, name)["leader"]["pid"], signal.SIGKILL)  # type: ignore[index]
    assert wait(lambda: env.running() == [])
    assert host_network() == before
    # A start that fails after the network is set up (no /dev in the rootfs) leaves none of it.
    rootfs = env.images / name
    os.rmdir(rootfs / "dev")
    (rootfs / "dev").write_text("not a directory")
    assert_clean_error(env.mctl("start", name), "/dev")
    assert host_network() == before
    assert not (env.runtime / "network" / "leases.json").exists()


def test_reboot_keeps_the_address(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    addr = address(env, name)
    env.ok("reboot", name, timeout=30)
    assert address(env, name) == addr
    assert f"inet {addr}/" in env.ok("shell", name, "--", "ip", "-o", "addr", "show", "dev", "host0")
    env.ok("terminate", name)


# --- other modes -----------------------------------------------------------------------------------

def test_veth_point_to_point(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--network", "veth")
    env.ok("start", name)
    addr = address(env, name)
    outer = f"ve-{name}"
    assert outer in links() and "master" not in sh("ip", "-o", "link", "show", outer)
    gateway = SESSION_SUBNET.rsplit(".", 1)[0] + ".1"
    assert env.mctl("shell", name, "--", "ping", "-c", "1", "-W", "2", gateway).returncode == 0
    serve(env, name, 8000)
    assert fetch(f"http://{addr}:8000/name") == name
    env.ok("poweroff", name)
    assert outer not in links()


@contextlib.contextmanager
def dummy() -> Iterator[str]:
    """A host link of the test's own: one end of a veth pair (this kernel has no dummy driver)."""
    suffix = os.urandom(2).hex()
    link = f"d{TOKEN}{suffix}"
    sh("ip", "link", "add", link, "type", "veth", "peer", "name", f"e{TOKEN}{suffix}")
    try:
        yield link
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)


def test_interface_moved_in_and_back(env: Env) -> None:
    name = env.name()
    with dummy() as link:
        env.ok("create", name, "--template", "busybox", "--network", f"interface:{link}")
        env.ok("start", name)
        assert link not in links()
        assert link in env.ok("shell", name, "--", "ip", "-o", "link")
        env.ok("poweroff", name)
        assert link in links()  # given back to the host


def test_macvlan(env: Env) -> None:
    name = env.name()
    with dummy() as link:
        env.ok("create", name, "--template", "busybox", "--network", f"macvlan:{link}")
        env.ok("start", name)
        inside = env.ok("shell", name, "--", "ip", "-o", "link")
        assert f"mv-{link}"[:15] in inside and link in links()
        env.ok("poweroff", name)
        assert [n for n in links() if TOKEN in n and n.startswith("mv-")] == []


def test_long_machine_name_gets_hashed_link_with_altname(env: Env) -> None:
    name = env.name("lname")  # vb-NAME would be 18 characters
    env.ok("create", name, "--template", "busybox")
    env.ok("start", name)
    link = state(env, name)["interfaces"][0]  # type: ignore[index]
    assert len(link) == 15 and link.startswith("vb-lname")
    assert f"altname vb-{name}" in sh("ip", "link", "show", link)
    env.ok("terminate", name)


# --- bad input: a clear error, nothing configured --------------------------------------------------

def assert_nothing_configured(env: Env, before_tree: object, before_net: dict[str, object]) -> None:
    assert env.tree() == before_tree
    assert host_network() == before_net
    assert env.running() == []


def test_address_outside_the_subnet(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--address", "192.0.2.77")
    tree, net = env.tree(), host_network()
    assert_clean_error(env.mctl("start", name), "192.0.2.77", "outside the subnet")
    assert_nothing_configured(env, tree, net)
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", "--address", "10.1.2.300"),
                       "not an IPv4 address")
    # The gateway's address, and one another machine holds, are refused too.
    base = SESSION_SUBNET.rsplit(".", 1)[0]
    gw, other = env.name(), env.name()
    env.ok("create", gw, "--template", "busybox", "--address", f"{base}.1")
    assert_clean_error(env.mctl("start", gw), "reserved")
    cfg = env.config / f"{name}.toml"
    cfg.write_text(cfg.read_text().replace('"192.0.2.77"', f'"{base}.77"'))
    env.ok("start", name)
    assert address(env, name) == f"{base}.77"
    env.ok("create", other, "--template", "busybox", "--address", f"{base}.77")
    assert_clean_error(env.mctl("start", other), "already leased", name)
    assert env.running() == [name]
    env.ok("terminate", name)


def test_a_full_subnet_fails_the_start_once_forked_and_leaves_nothing(env: Env) -> None:
    """The lease is taken while the first boot's child builds its root (after the settings check): a
    start whose lease fails there has forked its machine and asked for its links, and still leaves
    nothing behind, nor changes what the running machines have."""
    bridge = env.ifname("f")
    subnet = free_subnet(exclude=(SESSION_SUBNET,)).replace(".0/24", ".0/29")  # 5 addresses for machines
    extra = f'\n[network.bridges.{bridge}]\nsubnet = "{subnet}"\nnat = false\nkeep = false\n'
    (env.config / "machined.conf").write_text(host_config(hosts_file=str(env.hosts_file), extra=extra))
    names = [env.name() for _ in range(6)]
    for n in names:
        env.ok("create", n, "--template", "busybox", "--network", f"bridge:{bridge}")
    for n in names[:5]:
        env.ok("start", n)
    # What the failed start may leave: its console log, which says why, and the replays of the
    # requests its helper built (a cache, which its next start would write as well).
    kept = (str(env.runtime / "logs" / f"{names[5]}.log"), str(env.runtime / "network" / "replays"))

    def files() -> dict[str, object]:
        return {k: v for k, v in env.tree(*names[:5]).items() if not k.startswith(kept)}

    def contents() -> list[str]:
        return [(env.runtime / "machines" / n / "hosts").read_text() for n in names[:5]] + \
            [(env.runtime / "network" / "leases.json").read_text(), env.hosts_file.read_text()]

    # (once the new links' IPv6 link-local addresses are no longer tentative: that changes by itself)
    assert wait(lambda: "tentative" not in str(host_network()))
    before = files(), contents(), host_network()
    assert_clean_error(env.mctl("start", names[5]), "No free address", subnet)
    assert (files(), contents()) == before[:2]
    assert host_network() == before[2], difference(before[2], host_network())
    assert sorted(env.running()) == sorted(names[:5])
    for n in names[:5]:
        env.ok("terminate", n)
    assert bridge not in links()


def test_taken_port(env: Env) -> None:
    a, b = env.name("a"), env.name("b")
    port = free_port()
    for n in (a, b):
        env.ok("create", n, "--template", "busybox", "--port", f"tcp:{port}:80")
    env.ok("start", a)

    before, net = env.tree(a), host_network()
    assert_clean_error(env.mctl("start", b), f"tcp:{port}", a)
    assert env.tree(a) == before and host_network() == net and env.running() == [a]
    env.ok("poweroff", a)
    # A port a host service listens on is taken too.
    with socket.create_server(("0.0.0.0", port)):
        tree, net = env.tree(), host_network()
        assert_clean_error(env.mctl("start", b), "in use on the host")
        assert_nothing_configured(env, tree, net)


def test_bridge_name_too_long(env: Env) -> None:
    tree = env.tree()
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", "--network",
                                "bridge:averyveryverylongbridgename"), "longer than 15")
    assert env.tree() == tree
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    (env.config / "machined.conf").write_text(host_config(bridge="x" * 16, hosts_file=str(env.hosts_file)))
    tree, net = env.tree(), host_network()
    assert_clean_error(env.mctl("start", name), "longer than 15")
    assert_nothing_configured(env, tree, net)


def test_unknown_interface(env: Env) -> None:
    for mode in ("interface", "macvlan"):
        name = env.name()
        env.ok("create", name, "--template", "busybox", "--network", f"{mode}:nosuch{TOKEN}")
        tree, net = env.tree(), host_network()
        assert_clean_error(env.mctl("start", name), f"nosuch{TOKEN}")
        assert_nothing_configured(env, tree, net)


@pytest.mark.parametrize("args, words", [
    (["--port", "99999"], "not a port number"),
    (["--port", "sctp:80"], "not a port number"),
    (["--port", "80", "--port", "tcp:80:81"], "twice"),
    (["--network", "wifi"], "not one of"),
    (["--network", "interface"], "needs an interface"),
    (["--network", "veth:x"], "takes no interface"),
    (["--pod", "../x"], "invalid pod name"),
])
def test_bad_network_options(env: Env, args: list[str], words: str) -> None:
    tree = env.tree()
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", *args), words)
    assert env.tree() == tree


def test_unconfigured_bridge_and_overlapping_subnet(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--network", f"bridge:nb{TOKEN}")
    tree, net = env.tree(), host_network()
    assert_clean_error(env.mctl("start", name), "not configured")
    assert_nothing_configured(env, tree, net)
    # A subnet the host routes already (here: the one of a link the test makes) is refused.
    with dummy() as link:
        sub = free_subnet(exclude=(SESSION_SUBNET,))
        sh("ip", "addr", "add", sub.replace(".0/24", ".9/24"), "dev", link)
        sh("ip", "link", "set", link, "up")
        (env.config / "machined.conf").write_text(host_config(subnet=sub, hosts_file=str(env.hosts_file)))
        other = env.name()
        env.ok("create", other, "--template", "busybox")
        r = env.mctl("start", other)
        assert_clean_error(r, "overlaps", link)
        assert SESSION_BRIDGE not in links() and env.running() == []


def test_no_network_modules_without_a_network(env: Env) -> None:
    """Mode none and run --directory stay loopback-only and never load pyroute2 (start-up time)."""
    import sys

    name = env.name()
    env.ok("create", name, "--template", "busybox", "--network", "none")
    code = ("import sys; from machined import cli; cli.main(sys.argv[1:]); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('pyroute2', 'asyncio') or m in ('machined.network', 'machined.netconfig')))")
    for args in (["run", name, "--", "ip", "-o", "link"],
                 ["run", "--directory", str(env.images / name), "--", "ip", "-o", "link"]):
        r = subprocess.run([sys.executable, "-c", code, *args], env=env.environ(), capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        lines = r.stdout.strip().splitlines()
        assert lines[-1] == "[]", r.stdout + r.stderr
        assert len(lines) == 2 and ": lo: " in lines[0], r.stdout  # only loopback inside


def test_resolvers_given_to_bridged_machines(env: Env) -> None:
    from machined import network

    expected = network.host_resolvers()
    assert expected, "this host has no usable resolver configuration to give"
    a, b, c = env.name("a"), env.name("b"), env.name("c")
    for n in (a, b, c):
        env.ok("create", n, "--template", "busybox")
    (env.images / a / "etc/resolv.conf").write_text("# none of its own\n")      # gets the host's
    (env.images / b / "etc/resolv.conf").write_text("nameserver 192.0.2.99\n")  # its own: kept
    (env.images / c / "etc/resolv.conf").unlink()  # the template's
    (env.images / c / "etc/resolv.conf").symlink_to("../run/own-resolver.conf")  # managed by the guest
    for n in (a, b, c):
        env.ok("start", n)
    inside = env.ok("shell", a, "--", "cat", "/etc/resolv.conf")
    assert inside.endswith(expected), inside
    assert env.mctl("shell", a, "--", "sh", "-c", "echo x >> /etc/resolv.conf").returncode != 0  # read-only
    assert env.ok("shell", b, "--", "cat", "/etc/resolv.conf") == "nameserver 192.0.2.99\n"
    assert env.ok("shell", c, "--", "readlink", "/etc/resolv.conf").strip() == "../run/own-resolver.conf"
    for n in (a, b, c):
        env.ok("poweroff", n)
    # The image itself is untouched: the host's resolvers are only bound over it while it runs.
    assert (env.images / a / "etc/resolv.conf").read_text() == "# none of its own\n"


def test_read_only_host_hosts_file_does_not_stop_a_start(env: Env) -> None:
    # The host is itself a machine, or its /etc is immutable: machines still start, only the host's
    # own lookups of their names go without.
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.hosts_file.write_text("127.0.0.1\tlocalhost\n")
    before = env.hosts_file.read_text()
    subprocess.run(["chattr", "+i", str(env.hosts_file)], check=True)
    try:
        env.ok("start", name)
        assert env.ok("shell", name, "--", "cat", "/etc/hosts").count(name) >= 1
        env.ok("poweroff", name)
    finally:
        subprocess.run(["chattr", "-i", str(env.hosts_file)], check=True)
    assert env.hosts_file.read_text() == before
