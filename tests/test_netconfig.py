"""Unit tests of network settings and the lease store: no root, no kernel networking."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from machined import ipam, netconfig, state
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
    assert str(lab.address6(ipaddress.IPv4Address("10.9.8.77"))) == "fd00:9:8::4d"


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


def test_a_machine_without_an_address_is_checked_without_ipaddress() -> None:
    """ipaddress (with functools and collections) costs a start 2.5-4 ms: a machine with network
    none, or ports but no fixed address, is checked without it; an address loads it to be checked."""
    import subprocess
    import sys

    code = ("import sys; from machined import config, netconfig; "
            "netconfig.check_machine_network('none', '', (), ''); "
            "netconfig.check_machine_network('bridge', '', ('8080:80', 'udp:53'), ''); "
            "print('ipaddress' in sys.modules, end=' '); "
            "netconfig.check_machine_network('bridge', '10.0.0.5', (), ''); print('ipaddress' in sys.modules)")
    # -S: no site-packages, whose editable-install hooks import more; machined from the checkout
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "False True"
    with pytest.raises(ValueError, match="not an IPv4 address"):
        netconfig.check_machine_network("bridge", "10.0.0.256", (), "")
