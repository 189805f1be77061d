"""The network helper (machined.netagent): started as mctl starts or runs a machine whose network has
links, it alone loads pyroute2 and does the machine's netlink work; it holds nothing of
mctl's, and no path (stop, run, a killed supervisor, a start that fails anywhere) leaves it behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import MCTL, Env, _comm, free_subnet, host_config, processes
from tests.test_bad_input import assert_clean_error
from tests.test_network import host_network, links, sh, state
from tests.test_teardown import _wait as wait

COMM = "machined-net"


def helpers(name: str) -> list[str]:
    return processes(COMM, name)


def _fds(pid: object) -> dict[str, str]:
    """What a process's descriptors point to, by number."""
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def maps_asyncio(pid: object) -> bool:
    """Whether the process has asyncio loaded (its C part is a shared object: visible in the maps)."""
    return "_asyncio" in Path(f"/proc/{pid}/maps").read_text()


def test_supervisor_side_loads_no_netlink_library() -> None:
    """What mctl and the supervisor import for a network leaves pyroute2 to the helper."""
    code = "import sys; from machined import network; print(sorted({m.split('.')[0] for m in sys.modules}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = r.stdout.strip()
    assert "'pyroute2'" not in loaded and "'asyncio'" not in loaded, loaded


def test_requests_follow_each_other_and_are_answered_in_order() -> None:
    """The supervisor asks for a boot's links, then for their addresses, before it reads an answer:
    the answers come in order, the first error is the one raised (once all are read), and what is
    asked next gets its own answer."""
    from machined import netagent

    agent = netagent.Agent()
    try:
        agent.send("no_such_step")
        agent.send("teardown_links", link=None, bridge=None)
        with pytest.raises(netagent.HelperError, match="unknown operation 'no_such_step'"):
            agent.receive()
        assert agent.request("teardown_links", link=None, bridge=None) is None
        agent.send("no_such_step")
        agent.drain()  # (a start that failed meanwhile): read, whatever it says
        assert agent.unread == 0 and agent.request("teardown_links", link=None, bridge=None) is None
    finally:
        agent.close()
    assert _comm(str(agent.pid)) == ""


def test_early_without_a_thread_leaves_the_start_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no thread can be started, Early makes nothing: no result (the start takes the helper's
    way), its socket closed, the switch interval as it was."""
    import _thread

    from machined import netagent, netops

    closed: list[bool] = []

    class Socket:
        def close(self) -> None:
            closed.append(True)

    def no_thread(*_: object) -> int:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(netops, "early_plan", lambda machine, mode: ({"outer": "vb-x"}, [], None))
    monkeypatch.setattr(netops, "rtnl_socket", Socket)
    monkeypatch.setattr(_thread, "start_new_thread", no_thread)
    interval = sys.getswitchinterval()
    early = netagent.Early("x", "bridge")
    assert sys.getswitchinterval() == interval
    assert early.result() is None and closed == [True]


def one_queue_each_way(outer: str, leader: int) -> bool:
    """Whether both ends of a machine's veth pair were made with one queue each way (a pair cut down
    to one later waits for two expedited RCU grace periods as it is made)."""
    ends = [sh("ip", "-d", "link", "show", outer),
            sh("nsenter", "-t", str(leader), "-n", "ip", "-d", "link", "show", "host0")]
    return all("numtxqueues 1 numrxqueues 1 " in end for end in ends) and \
        sorted(os.listdir(f"/sys/class/net/{outer}/queues")) == ["rx-0", "tx-0"]


@pytest.mark.root
def test_one_helper_for_a_bridged_machine_holding_nothing_of_mctl(env: Env) -> None:
    """A bridged machine's helper is forked (it loads pyroute2 at once: the test bridges are not
    kept, so its replays do not apply) and holds nothing of mctl's."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    for _ in range(2):  # (the second start with the machine's replays saved)
        env.ok("start", name)
        data = state(env, name)
        [pid] = helpers(name)
        assert data["network"]["agent"]["pid"] == int(pid)  # type: ignore[index]
        assert one_queue_each_way(data["network"]["host_link"], data["leader"]["pid"])  # type: ignore[index]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-I" not in argv and b"netagent.main()" not in b" ".join(argv), argv
        assert [_fds(pid)[fd] for fd in ("0", "1", "2")] == ["/dev/null"] * 3, _fds(pid)
        # Its socket to the supervisor: no lock, no file, no pipe of mctl's caller. (Once it is idle:
        # as the machine runs, it renews the bridge's table, under the network lock, for a moment.)
        assert wait(lambda p=pid: all(t.startswith("socket:") for fd, t in _fds(p).items() if fd not in "012")), \
            _fds(pid)
        assert os.getsid(int(pid)) == int(pid)  # its own session: a terminal's signals are not for it
        # No event loop on either side: the netlink and D-Bus work is blocking requests in sequence.
        assert not maps_asyncio(pid) and not maps_asyncio(data["supervisor"]["pid"])  # type: ignore[index]
        env.ok("poweroff", name)
        assert helpers(name) == [] and _comm(pid) == ""


@pytest.mark.root
def test_a_kept_bridges_machine_starts_on_links_that_mctl_made_first_thing(env: Env) -> None:
    """On a kept bridge, once a start saved the machine's replays: the next start's veth pair is made
    by a thread of mctl's as it starts (netagent.Early), the rest by the supervisor (Inline), a
    reboot's too; no helper process. What Early made goes with mctl if it dies, and is not used
    where the machine's settings changed since (a helper makes the links then)."""
    bridge, subnet = env.ifname("k"), free_subnet()
    conf = env.config / "machined.conf"
    base = conf.read_text()

    def kept(nat: bool) -> None:
        conf.write_text(host_config(bridge, subnet).replace("keep = false", "keep = true")
                        .replace("nat = false", f"nat = {str(nat).lower()}"))

    name = env.name()
    outer = f"vb-{name}"[:15]
    try:
        kept(nat=False)
        env.ok("create", name, "--template", "busybox")
        env.ok("start", name)  # (the first: a helper builds and saves the replays)
        assert len(helpers(name)) == 1
        env.ok("poweroff", name)
        env.ok("start", name)
        leader = None
        for _ in range(2):  # the start's links, and a reboot's, which the supervisor makes itself
            if leader is not None:
                env.ok("reboot", name, timeout=30)
                assert wait(lambda old=leader: state(env, name).get("leader") not in (None, old), timeout=30)
            data = state(env, name)
            leader = data["leader"]
            assert helpers(name) == [] and "agent" not in data["network"]  # type: ignore[operator]
            address = data["addresses"][0]  # type: ignore[index]
            assert f"inet {address}/" in env.ok("shell", name, "--", "ip", "addr", "show", "host0")
            assert "default via" in env.ok("shell", name, "--", "ip", "route")
            assert outer in sh("ip", "-o", "link", "show", "master", bridge)
            assert one_queue_each_way(outer, leader["pid"])  # type: ignore[index]
        # Its supervisor and init killed, and started again: the cleanup of what they left (by this
        # mctl) removes their links by name, so Early makes none while the machine has a state.
        for who in ("supervisor", "leader"):
            os.kill(data[who]["pid"], signal.SIGKILL)  # type: ignore[index]
        assert wait(lambda: outer not in links())
        env.ok("start", name)
        assert f"inet {address}/" in env.ok("shell", name, "--", "ip", "addr", "show", "host0")
        env.ok("poweroff", name)
        assert wait(lambda: outer not in links())
        # mctl killed once Early made the links: they go with it (with its network namespace).
        code = (f"import os; from machined import netagent; e = netagent.Early({name!r}, 'bridge:{bridge}'); "
                f"print(e.result() is not None, {outer!r} in os.listdir('/sys/class/net'), flush=True); "
                "os.kill(os.getpid(), 9)")
        r = subprocess.run([sys.executable, "-c", code], env=env.environ(), capture_output=True, text=True)
        assert r.stdout.split() == ["True", "True"], (r.stdout, r.stderr)
        assert wait(lambda: outer not in links())
        # Nor is its replay sent for another mode than the one given or set (another bridge, say).
        for mode in ("veth", "bridge:other0", "bridge"):
            code = f"from machined import netops; r = netops.early_plan({name!r}, {mode!r}); print(r is None)"
            r = subprocess.run([sys.executable, "-c", code], env=env.environ(), capture_output=True, text=True)
            assert r.stdout.split() == [str(mode != "bridge")], (mode, r.stdout, r.stderr)
        assert wait(lambda: outer not in links())
        # The bridge's settings changed since the replays were saved: Early's links are not taken.
        kept(nat=True)
        env.ok("start", name)
        assert len(helpers(name)) == 1 and address in env.ok("shell", name, "--", "ip", "addr", "show", "host0")
        assert outer in sh("ip", "-o", "link", "show", "master", bridge)
        env.ok("poweroff", name)
        assert wait(lambda: outer not in links())
    finally:
        env.mctl("terminate", name)
        conf.write_text(base)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        subprocess.run(["nft", "delete", "table", "inet", f"machined-{bridge}"], capture_output=True)


@pytest.mark.root
def test_no_helper_without_links(env: Env) -> None:
    """Loopback-only machines (mode none, run --directory) get no helper: nothing is forked for them."""
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--network", "none")
    code = ("import sys; from machined import cli, netagent; argv = sys.argv[1:]; "  # as main() decides
            "cli._get_ready(cli._quick_parse(argv[:argv.index('--')] if '--' in argv else argv)); "
            "print(len(netagent._agents))")
    cases = {("start", name): 0, ("start", name, "--network", "bridge"): 1, ("run", name, "--", "true"): 0,
             ("run", "--directory", str(env.images / name), "--", "true"): 0,
             ("start", name, "--network=veth", "--foreground"): 1, ("start", name, "other"): 0,
             ("start", name, "--pod", "p", "-p", "80"): 0,
             ("start", name + "x"): 1}  # (an image without settings would be bridged)
    for args, expected in cases.items():
        r = subprocess.run([sys.executable, "-c", code, *args], env=env.environ(), capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        assert r.stdout.strip() == str(expected), (args, r.stdout, r.stderr)
    assert helpers(name) == []  # the unused ones went with their mctl


@pytest.mark.root
def test_run_leaves_no_helper(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    assert "inet 10." in env.ok("run", name, "--", "ip", "-o", "-4", "addr", "show", "dev", "host0")
    assert helpers(name) == [] and f"vb-{name}" not in links()


@pytest.mark.root
def test_helper_ends_with_a_killed_supervisor(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    before = host_network()
    env.ok("start", name)
    data = state(env, name)
    [pid] = helpers(name)
    os.kill(data["supervisor"]["pid"], signal.SIGKILL)  # type: ignore[index]
    assert wait(lambda: helpers(name) == [])  # its socket ended: it goes by itself
    assert json.loads(env.ok("list", "-o", "json")) == []  # the next call cleans up
    assert host_network() == before and _comm(pid) == ""


@pytest.mark.root
def test_teardown_after_a_killed_supervisor_waits_for_its_helper(env: Env) -> None:
    """A helper may still be in a step when its supervisor is killed: the cleanup lets it finish first
    (else the link it is making would be left behind)."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    before = host_network()
    env.ok("start", name)
    data = state(env, name)
    [pid] = helpers(name)
    os.kill(int(pid), signal.SIGSTOP)  # as if busy
    os.kill(data["supervisor"]["pid"], signal.SIGKILL)  # type: ignore[index]
    cleaner = subprocess.Popen([*MCTL, "list"], env=env.environ(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert cleaner.poll() is None  # waiting for the helper
        assert (env.runtime / "machines" / name / "state.json").exists()
    finally:
        os.kill(int(pid), signal.SIGCONT)
    assert cleaner.wait(timeout=30) == 0, cleaner.stderr
    assert helpers(name) == [] and host_network() == before


@pytest.mark.root
def test_failed_starts_leave_no_helper(env: Env) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    before = host_network()
    # In mctl, before there is a supervisor: no such machine, a machine that runs already.
    missing = env.name("missing")
    assert_clean_error(env.mctl("start", missing), "No machine named")
    assert helpers(missing) == []
    env.ok("start", name)
    [first] = helpers(name)
    assert_clean_error(env.mctl("start", name), "already running")
    assert helpers(name) == [first]
    env.ok("terminate", name)
    # In the supervisor, after the network is attached (no /dev in the rootfs).
    rootfs = env.images / name
    os.rmdir(rootfs / "dev")
    (rootfs / "dev").write_text("not a directory")
    assert_clean_error(env.mctl("start", name), "/dev")
    assert helpers(name) == [] and host_network() == before and env.running() == []


@pytest.mark.root
def test_helper_failure_is_one_clean_error(env: Env) -> None:
    """What fails in the helper is said as it would be anywhere: one line, and nothing left."""
    name, bridge = env.name(), env.ifname("x")
    env.ok("create", name, "--template", "busybox", "--network", f"bridge:{bridge}")
    with open(env.config / "machined.conf", "a") as f:
        f.write(f'\n[network.bridges.{bridge}]\nsubnet = "10.254.{os.getpid() % 250}.0/24"\nkeep = false\n')
    subprocess.run(["ip", "link", "add", bridge, "type", "veth", "peer", "name", env.ifname("y")], check=True)
    try:
        before = host_network()
        assert_clean_error(env.mctl("start", name), f"bridge {bridge}", "is a veth")
        assert helpers(name) == [] and host_network() == before and env.running() == []
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


# --- the decision before anything is loaded --------------------------------------------------------

PLAIN = [
    ('[machine]\nid = "x"\n', "bridge"),
    ('[machine]\nid = "x"\n\n[network]\nmode = "none"\n', "none"),
    ('[network]\nmode = "bridge:br-lab"\nports = ["80"]\n[resources]\nmemory_max = 5\n', "bridge:br-lab"),
    ('# comment\n[network]\n# mode = "none"\nmode = "veth"\n', "veth"),
    ('[network]\npod = "p"\n', "bridge"),
    ('[network]\nmode = "none" # loopback only\n', "none"),
]
OTHER = [  # forms the fast path leaves to tomllib
    ("[network]\nmode = 'none'\n", "none"),
    ('network = { mode = "none" }\n', "none"),
    ('network.mode = "none"\n', "none"),
    ('[ network ]\nmode = "none"\n', "none"),
    ('[network]\n"mode" = "none"\n', "none"),
    ('[machine]\nnote = """\n[network]\nmode = "veth"\n"""\n', "bridge"),
    ('[network]\nmode = "br\\u0069dge"\n', "bridge"),
]


@pytest.mark.parametrize(("text", "mode"), PLAIN + OTHER)
def test_mode_read_before_the_settings_are_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                                  mode: str) -> None:
    from machined import netagent, plaintoml

    monkeypatch.setenv("MACHINED_CONFIG_DIR", str(tmp_path))
    (tmp_path / "m.toml").write_text(text)
    expected = tomllib.loads(text).get("network", {}).get("mode", "bridge")
    assert netagent._configured_mode("m") == expected == mode
    assert (plaintoml.plain(text) is None) == ((text, mode) in OTHER)
