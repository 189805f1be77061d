"""Unit tests of network settings and the lease store: no root, no kernel networking."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from machined import inet, ipam, netconfig, state
from machined.log import MachinedError


@pytest.mark.parametrize("text, words", [
    ("wifi", "not one of"), ("interface", "needs an interface"), ("macvlan:", "needs an interface"),
    ("veth:x", "takes no interface"), ("none:x", "takes no interface"), ("bridge:" + "b" * 16, "longer than 15"),
    ("interface:a/b", "'/'"), ("bridge:..", "'.' or '..'"),
])
def test_bad_modes(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("(", r"\(")):
        netconfig.parse_mode(text)


def test_modes_and_ports() -> None:
    assert str(netconfig.parse_mode("bridge")) == "bridge"
    assert (netconfig.parse_mode("bridge:br0").kind, netconfig.parse_mode("bridge:br0").link) == ("bridge", "br0")
    assert str(netconfig.parse_port("8080")) == "tcp:8080:8080"
    assert str(netconfig.parse_port("udp:53:5353")) == "udp:53:5353"
    for bad in ("0", "65536", "sctp:80", "tcp:", "1:2:3", "http"):
        with pytest.raises(ValueError):
            netconfig.parse_port(bad)
    with pytest.raises(ValueError, match="twice"):
        netconfig.check_machine_network("bridge", "", ("80", "tcp:80:81"), "")
    with pytest.raises(ValueError, match="need network mode"):
        netconfig.check_machine_network("interface:eth9", "", ("80",), "")


@pytest.mark.parametrize("body, words", [
    ('[network.bridges.b0]\nsubnet = "10.0.0.0/33"\n', "Invalid bridge b0"),
    ('[network.bridges.b0]\nsubnet = "10.0.0.1/24"\n', "host bits"),
    ('[network.bridges.b0]\nsubnet = "10.0.0.0/30"\n', "too small"),
    ('[network.bridges.b0]\nsubnet = "10.0.0.0/24"\ngateway = "10.0.1.1"\n', "not a host address"),
    ('[network.bridges.b0]\nnat = "yes"\n', "true or false"),
    ('[network.bridges.b0]\ncolour = "red"\n', "unknown key"),
    ('[network.bridges.averyveryverylongname]\n', "longer than 15"),
    ('[network]\ndefault_bridge = "x/y"\n', "'/'"),
    ('[network]\nhosts_file = "relative"\n', "absolute"),
    ('[other]\n', "only a [network] section"),
])
def test_bad_host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, words: str) -> None:
    monkeypatch.setenv("MACHINED_CONFIG_DIR", str(tmp_path))
    (tmp_path / "machined.conf").write_text(body)
    with pytest.raises(MachinedError) as e:
        netconfig.load_host()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_host_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACHINED_CONFIG_DIR", str(tmp_path))
    host = netconfig.load_host()
    br = host.bridge(None)
    assert br is not None and br.name == "mbr0" and str(br.gateway) == "10.151.0.1" and br.nat and br.keep
    assert host.bridge("other") is None
    (tmp_path / "machined.conf").write_text(
        '[network]\ndefault_bridge = "lab"\n[network.bridges.lab]\nsubnet = "10.9.8.0/24"\n'
        'ipv6_subnet = "fd00:9:8::/64"\n')
    lab = netconfig.load_host().bridge(None)
    assert lab is not None and str(lab.gateway6) == "fd00:9:8::1"
    assert str(lab.address6(inet.Address.parse("10.9.8.77"))) == "fd00:9:8::4d"


def test_leases_stable_unique_and_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACHINED_RUNTIME_DIR", str(tmp_path))
    br = netconfig.HostNetwork().bridge(None)
    assert br is not None
    me = state.proc_ref(os.getpid())
    with ipam.Store() as s:
        first = s.lease(br, "m1", me, "seed-1")
    with ipam.Store() as s:
        s.release("m1")
    with ipam.Store() as s:
        assert s.lease(br, "m1", me, "seed-1") == first  # the same again after a restart
        # Two owners whose seed prefers the same address: the second gets another one.
        assert s.lease(br, "m2", me, "seed-1") != first
        with pytest.raises(MachinedError, match="already leased"):
            s.lease(br, "m3", me, "x", fixed=str(first))
        with pytest.raises(MachinedError, match="reserved"):
            s.lease(br, "m3", me, "x", fixed=str(br.gateway))
    # An owner whose process is gone is reclaimed by the next look.
    with ipam.Store() as s:
        s.lease(br, "ghost", {"pid": 1 << 22, "start": 1}, "seed-g")
    assert "ghost" not in str(ipam.peek())
    # A damaged entry (no address) of a live owner takes no address and stops no lease.
    with ipam.Store() as s:
        s.data["leases"]["odd"] = {"pool": br.name, "owner": "odd", "ref": me}
        s.dirty = True
    with ipam.Store() as s:
        assert s.lease(br, "m4", me, "seed-1") not in (first, br.gateway)


def test_concurrent_leases_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight processes lease at once, all preferring the same address: eight distinct addresses."""
    monkeypatch.setenv("MACHINED_RUNTIME_DIR", str(tmp_path))
    br = netconfig.HostNetwork().bridge(None)
    assert br is not None
    me = state.proc_ref(os.getpid())
    r, w = os.pipe()
    pids = []
    for i in range(8):
        pid = os.fork()
        if pid == 0:
            try:
                with ipam.Store() as s:
                    os.write(w, f"{s.lease(br, f'm{i}', me, 'same-seed')}\n".encode())
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    for pid in pids:
        os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        got = f.read().split()
    assert len(got) == 8 and len(set(got)) == 8
    assert sorted(e["addr"] for e in ipam.peek()["leases"].values()) == sorted(got)  # type: ignore[type-var]


def test_sha256_without_hashlib_is_sha256() -> None:
    """Leases and link names hash with CPython's own SHA-256 (hashlib would load OpenSSL): the same digests."""
    import hashlib

    import machined

    for data in (b"", b"m", "ü".encode() * 1000):
        assert machined.sha256(data) == hashlib.sha256(data).digest()


def test_sha256_asks_only_for_its_own_pythons_module() -> None:
    """A failed import searches the whole path (~70 us of a start): the first call asks for
    _sha256 on 3.11 and _sha2 from 3.12 on, and for nothing else."""
    code = (
        "import sys\n"
        "asked = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        asked.append(name)\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import machined\n"
        "asked.clear()\n"
        "machined.sha256(b'x')\n"
        "print(' '.join(asked), 'hashlib' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own = "_sha256" if sys.version_info < (3, 12) else "_sha2"
    assert r.stdout.split() == [own, "False"], r.stdout


def test_a_bridged_start_works_out_its_addresses_without_ipaddress(tmp_path: Path) -> None:
    """ipaddress (with functools and collections) cost a bridged start 2.5-4 ms: what mctl and the
    supervisor do with addresses (the machine's settings, the bridge's, a fixed address checked, a
    lease, the host's resolvers, the bridge's NAT rules) loads none of them. A machine with network
    none, or with ports but no address, is checked without even inet (and _socket with it)."""
    import subprocess
    import sys

    (tmp_path / "machined.conf").write_text('[network.bridges.b0]\nsubnet = "10.9.8.0/24"\n'
                                            'ipv6_subnet = "fd00:9:8::/64"\n')
    code = ("import os, sys; from machined import config, netconfig; "
            "netconfig.check_machine_network('none', '', (), ''); "
            "netconfig.check_machine_network('bridge', '', ('8080:80', 'udp:53'), ''); "
            "print(sorted({'machined.inet', '_socket'} & set(sys.modules)), end=' '); "
            "from machined import inet, ipam, nat, network, state; "
            "netconfig.check_machine_network('bridge:b0', '10.9.8.5', ('8080:80', 'udp:53'), ''); "
            "br = netconfig.load_host().bridge('b0'); "
            "assert not ipam.fixed_error(br, inet.Address.parse('10.9.8.5'), 'm', {}); "
            "s = ipam.Store(); s.__enter__(); a = s.lease(br, 'm', state.proc_ref(os.getpid()), 'seed'); "
            "network.host_resolvers(); nat._bridge_commands(br.to_json()); "
            "print(a in br.subnet, br.address6(a), "
            "sorted({'ipaddress', 'functools', 'collections'} & set(sys.modules)))")
    # -S: no site-packages, whose editable-install hooks import more; machined from the checkout
    env = dict(os.environ, MACHINED_CONFIG_DIR=str(tmp_path), MACHINED_RUNTIME_DIR=str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.startswith("[] True fd00:9:8::") and out.strip().endswith(" []"), out
    with pytest.raises(ValueError, match="not an IPv4 address"):
        netconfig.check_machine_network("bridge", "10.0.0.256", (), "")


ADDRESSES = ["0.0.0.0", "10.9.8.77", "255.255.255.255", "127.0.0.1", "127.255.0.3", "128.0.0.1", "::", "::1",
             "fd00:9:8::4d", "FD00::1", "::ffff:1.2.3.4", "fe80::1", "2001:db8::", "ffff:" * 7 + "ffff",
             "01.2.3.4", "1.2.3", "1.2.3.256", " 1.2.3.4", "1.2.3.4 ", "0x1.2.3.4", "1::2::3", "fe80::1%eth0",
             "10.0.0.0/8", "", "::g", "1.2.3.4\0", "\u0661.2.3.4"]


@pytest.mark.parametrize("text", ADDRESSES)
def test_addresses_parse_and_print_as_ipaddress_does(text: str) -> None:
    """inet parses with inet_pton; the standard library's ipaddress is the reference (except that
    inet takes no IPv6 zone: an address in a bridge's settings or a lease has none)."""
    for version, reference in ((4, ipaddress.IPv4Address), (6, ipaddress.IPv6Address)):
        try:
            expected = reference(text)
        except ValueError:
            with pytest.raises(ValueError, match=f"is not an IPv{version} address"):
                inet.Address.parse(text, version)
            continue
        if "%" in text:
            with pytest.raises(ValueError):
                inet.Address.parse(text, version)
            continue
        addr = inet.Address.parse(text, version)
        # (inet_ntop prints an IPv4-mapped address in dotted form, ipaddress before 3.13 in hex)
        assert (reference(str(addr)), int(addr), addr.is_loopback) == (expected, int(expected), expected.is_loopback)
        assert str(addr) == str(expected) or text.startswith("::ffff:")
        assert inet.is_loopback(text) == expected.is_loopback
    if not any(text and _parses(ref, text) for ref in (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        assert inet.is_loopback(text) is None or "%" in text


def _parses(reference: type, text: str) -> bool:
    try:
        reference(text)
    except ValueError:
        return False
    return True


NETWORKS = ["10.151.0.0/24", "10.0.0.1/24", "10.0.0.0/33", "10.0.0.0/0", "0.0.0.0/0", "10.9.8.4/30",
            "10.9.8.7/32", "10.0.0.0/024", "10.0.0.0/", "10.0.0.0", "10.0.0.0/+8", "10.0.0.0/\u0668", "fd00:9:8::/64",
            "fd00:9:8::1/64", "fd00::/129", "::/0", "fd00::/120", "10.0.0.0/255.0.0.0", "fd00::/64/1"]


@pytest.mark.parametrize("text", NETWORKS)
def test_networks_parse_and_count_as_ipaddress_does(text: str) -> None:
    """Strict and not: as ipaddress's networks (except a netmask in place of the prefix length,
    which no setting uses); membership, size, first and last address, overlap."""
    for version, reference in ((4, ipaddress.IPv4Network), (6, ipaddress.IPv6Network)):
        for strict in (True, False):
            try:
                if "/" not in text or not text.split("/", 1)[1].isdigit():
                    raise ValueError("inet takes prefix lengths only")
                expected = reference(text, strict=strict)
            except ValueError:
                with pytest.raises(ValueError):
                    inet.Network.parse(text, version, strict)
                continue
            net = inet.Network.parse(text, version, strict)
            assert str(net) == str(expected) and net.num_addresses == expected.num_addresses
            assert str(net.network_address) == str(expected.network_address)
            assert str(net.broadcast_address) == str(expected.broadcast_address)
            first, last = int(expected.network_address), int(expected.broadcast_address)
            top = 2 ** expected.max_prefixlen - 1
            for probe in {max(first - 1, 0), first, (first + last) // 2, last, min(last + 1, top)}:
                assert (inet.Address(version, probe) in net) == (type(expected.network_address)(probe) in expected)
            for other in ("10.9.0.0/16", "10.9.8.128/25", "fd00::/8", "fd00:9:8:1::/64"):
                if _parses(reference, other):
                    assert net.overlaps(inet.Network.parse(other, version)) == expected.overlaps(reference(other))
    with pytest.raises(ValueError, match="has host bits set"):
        inet.Network.parse("10.0.0.1/24")
