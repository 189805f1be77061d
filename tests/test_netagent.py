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

from tests.conftest import MCTL, Env, _comm, processes
from tests.test_bad_input import assert_clean_error
from tests.test_network import host_network, links, state
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


@pytest.mark.root
def test_a_replayed_machines_helper_makes_its_first_network_namespace(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """For a detached start of a machine with replays, the helper makes a network namespace first
    thing, off the supervisor's way, and keeps none: netns() takes it where it is there already,
    else makes one itself, and the helper's, once read, is the next boot's. None is made for a
    start in mctl's process (run), nor by a forked helper (no replays: it imports pyroute2 first)."""
    import fcntl
    import select

    from machined import netagent

    monkeypatch.setenv("MACHINED_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "network" / "replays").mkdir(parents=True)
    for path in netagent.replay_paths("m1"):
        Path(path).write_text("{}")
    own = os.readlink("/proc/self/ns/net")
    before = sorted(os.listdir("/proc/self/fd"))

    def namespaces(pid: object) -> list[str]:
        fds = Path(f"/proc/{pid}/fd")
        return [link for f in os.listdir(fds) if (link := os.readlink(fds / f)).startswith("net:")]

    def new_namespace(fd: int) -> str:
        """(closing fd: a new namespace, that no child of ours would inherit)"""
        link = os.readlink(f"/proc/self/fd/{fd}")
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.close(fd)
        assert link.startswith("net:[") and link != own
        return link

    agent = netagent.Agent("m1", "bridge", netns=True)
    try:
        assert (agent.netns_due, agent.unread) == (True, 1)
        assert wait(lambda: select.select([agent.fd], [], [], 0)[0])
        new_namespace(agent.netns())
        assert (agent.netns_due, agent.unread, agent.spare) == (False, 0, -1)
        assert wait(lambda: namespaces(agent.pid) == [])
    finally:
        agent.close()
    for early in (True, False):  # asked for before the helper's came, or not at all (a pod's)
        agent = netagent.Agent("m1", "bridge", netns=True)
        try:
            if early:
                new_namespace(agent.netns())
            assert agent.netns_due
            assert agent.request("teardown_links", link=None, bridge=None) is None  # (read first)
            assert (agent.netns_due, agent.unread) == (False, 0) and agent.spare >= 0
            if early:
                new_namespace(agent.netns())  # the reboot's
                assert agent.spare == -1
        finally:
            agent.close()
    assert sorted(os.listdir("/proc/self/fd")) == before  # (a spare one closed with the agent)
    for agent in (netagent.Agent("m1", "bridge"), netagent.Agent("m2", "bridge", netns=True)):
        try:
            assert (agent.netns_due, agent.unread) == (False, 0)
            new_namespace(agent.netns())
        finally:
            agent.close()


@pytest.mark.root
def test_one_helper_for_a_bridged_machine_holding_nothing_of_mctl(env: Env) -> None:
    """The first start's helper is forked (it loads pyroute2 at once); a later one, with the
    machine's replays saved, is a new interpreter (netops): either holds nothing of mctl's."""
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    for forked in (True, False):
        env.ok("start", name)
        data = state(env, name)
        [pid] = helpers(name)
        assert data["network"]["agent"]["pid"] == int(pid)  # type: ignore[index]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert (b"-I" not in argv) == forked and (b"netagent.main()" in b" ".join(argv)) != forked, argv
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
