"""A machine's network: bridge, veth, addresses, routes, NAT, port forwards, names.

Addresses are static: the host configures them from its side, through a netlink socket opened in
the machine's network namespace, before the guest's init runs. That works for any guest (busybox,
sysvinit, systemd) with nothing to install or render, costs no DHCP round trip at boot, and keeps
the address the one the lease store (ipam) handed out. Names resolve through hosts files the
manager keeps: one per machine, bind-mounted read-only over the guest's /etc/hosts (the guest's
own entries plus every running machine), and a managed block in the host's hosts file.

The netlink work (machined.netops: replays of requests that machined.netlink built with pyroute2's
message classes, or netlink itself) is done by the machine's network helper (machined.netagent):
where its replays fit, a thread of mctl's that makes the veth pair first thing and then the
supervisor itself (Inline), else a helper process, so that neither mctl nor the supervisor imports
pyroute2. What a machine's network leaves on the host is recorded in its state under "network" and
removed by teardown(), which is idempotent and also runs (in-process) after a supervisor was killed.
"""

from __future__ import annotations

import errno
import os

import machined
from machined import inet, ipam, linux, mounts, netagent, netconfig, paths, state
from machined.log import MachinedError, die

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from machined.config import MachineConfig
    from machined.netconfig import Bridge, HostNetwork

HOSTS_BEGIN = "# BEGIN machined: running machines (managed; edits are lost)"
HOSTS_END = "# END machined"


def host_ifname(prefix: str, name: str) -> str:
    """prefix+name if it fits in 15 characters, else a shortened name with a hash of the full one."""
    full = prefix + name
    if len(full) < netconfig.IFNAMSIZ:
        return full
    digest = machined.sha256(name.encode()).hex()
    return prefix + name[: netconfig.IFNAMSIZ - 1 - len(prefix) - 5] + digest[:5]


# --- one machine ----------------------------------------------------------------------------------

class MachineNetwork:
    """Made when mctl plans a start: check() refuses bad settings before anything exists. Then, in
    the supervisor: begin(), ask_first_boot() and prepare() before the first boot; once per boot,
    boot_namespaces() and meanwhile() before the spawn, answer() and in_child() (spawn's),
    after_boot() once its init runs, end_boot() once it is gone.

    A machine in a pod joins the pod's namespaces; the pod's network is made, from the settings of
    the machine that starts the pod, by that machine's prepare(), and owned by the pod."""

    def __init__(self, cfg: MachineConfig, rootfs: str) -> None:
        self.agent: netagent.Agent | netagent.Inline | None = None
        self.cfg = cfg
        self.name = cfg.name
        self.rootfs = rootfs
        self.pod = cfg.network.pod
        self.data: dict[str, object] = {}
        self.mode = netconfig.parse_mode(cfg.network.mode)
        self.ports = [netconfig.parse_port(p) for p in cfg.network.ports]
        self.host: HostNetwork = netconfig.load_host()
        self.bridge: Bridge | None = None
        self.address: inet.Address | None = None
        self.netns = -1
        self.asked = False  # links asked for the next boot, the answer not taken yet
        self.renewing = False  # the bridge's NAT table to be renewed once the machine runs
        self.claimed = False  # the lease and ports taken (claim)
        self.pod_fds: list[tuple[int, int]] = []
        self.record: dict[str, Any] = {"mode": str(self.mode)}
        # Who owns the links and the lease: the machine, or its pod.
        self.owner = f"pod:{self.pod}" if self.pod else self.name
        self.mac_seed = self.owner if self.pod else cfg.id

    def check(self) -> None:
        """Refuse what cannot work, touching nothing (the locked allocation in prepare() checks again)."""
        fail = f"Failed to start {self.name}"
        fixed = self.cfg.network.address
        store = ipam.peek() if fixed or self.ports else {}  # (the store, read only where it matters)
        if self.pod:
            from machined import pods  # (only for pods: mctl's imports are on the start's way)

            joining = bool(pods.members(self.pod))
        else:
            joining = False
        if joining:
            pass  # joins a running pod, whose network is in place: its own mode does not matter
        elif self.mode.kind in ("bridge", "veth"):
            self.bridge = self._bridge()
            if fixed:
                reason = ipam.fixed_error(self.bridge, inet.Address.parse(fixed), self.owner, store.get("leases", {}))
                if reason:
                    die(f"{fail}: {reason}")
        elif self.mode.kind in ("interface", "macvlan"):
            if not os.path.exists(f"/sys/class/net/{self.mode.link}"):
                die(f"{fail}: there is no network interface {self.mode.link} on the host")
        taken = store.get("ports", {})
        for port in self.ports:
            owner = taken.get(port.key, {}).get("owner", self.name)
            if owner != self.name:
                die(f"{fail}: host port {port.key} is already forwarded to {owner}")
            _check_host_port_free(port)
        if self.mode.kind == "none" or joining:
            netagent.discard()  # no links to make
        else:
            self._helper()  # what mctl chose as it started (Early's links, or a helper): this machine's

    def _helper(self) -> netagent.Agent | netagent.Inline:
        """The network helper, recorded (a process: a killed supervisor's teardown waits for it)."""
        if self.agent is None:
            agent = netagent.take(self.name, self.mode.kind)
            if isinstance(agent, netagent.Inline) and not agent.adopt(
                    self._attach_args() if not self.pod and self.bridge is not None else None):
                agent = netagent.Agent(self.name, self.mode.kind, replays=False)  # (netlink, at once)
            self.agent = agent
            if agent.pid is not None:
                self.record["agent"] = state.proc_ref(agent.pid)
            if self.data:  # made by the supervisor (a pod that ended since check()): recorded at once
                state.write(self.name, self.data)
        return self.agent

    def forget(self) -> None:
        """In mctl once it forked the supervisor, which has the helper now."""
        if self.agent is not None:
            self.agent.forget()

    def _bridge(self) -> Bridge:
        br = self.host.bridge(self.mode.link or None if self.mode.kind == "bridge" else None)
        if br is None:
            die(f"Failed to start {self.name}: bridge {self.mode.link} is not configured",
                hint=f"add [network.bridges.{self.mode.link}] to {netconfig.host_config_path()}")
        return br

    def begin(self, data: dict[str, object]) -> None:
        """In the supervisor, before its first state write: what the start makes, recorded in data
        (the machine's state: from that write on, a crash leaves a record to clean up)."""
        self.data = data
        data["network"] = self.record
        self.record["hosts_file"] = self.host.hosts_file
        if self.bridge is not None and not self.pod:
            self._record_link()

    def ask_first_boot(self) -> None:
        """Right after that write: the helper makes the first boot's links while we go on."""
        if not self.pod:
            self._ask_for_boot()

    def prepare(self) -> None:
        """Before the first boot's spawn: the machine's resolv.conf and hosts file, which its child
        binds (claim() fills the hosts file in place before the exec). A machine in a pod claims
        here: the pod's namespaces, made or joined by claim(), are what its spawn joins."""
        write_resolv_conf(resolv_path(self.name))
        if self.pod:
            self.claim()
        else:
            os.close(os.open(hosts_path(self.name), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))

    def meanwhile(self) -> list[Callable[[], None]]:
        """spawn's steps meanwhile: the first boot's claim(), while its child builds its root."""
        return [self.claim] if not self.claimed else []

    def claim(self) -> None:
        """Lease the address, claim the ports, add the forwards (and make or join the pod), all of it
        recorded in the machine's state (written once the machine runs: the store is what a crash
        leaves to reclaim); the machine's name and addresses in the store and the hosts files. The
        veth's addresses are asked for as soon as they are leased: the helper's answer is what the
        first boot's exec waits for."""
        # (ipam is imported with this module, in mctl, not here: the first boot's exec waits for this)
        self.claimed = True
        data = self.data
        with ipam.Store() as store:
            ref = data["supervisor"]
            if self.pod:
                self._join_pod(store, ref)
            elif self.bridge is not None:
                self._lease(store, ref)
                if self.asked:
                    self._ask_addresses()
            store.claim_ports(self.ports, self.name, ref)
            if self.ports:
                from machined import nat  # (libnftables: only for machines with forwards)

                addrs = data.get("addresses")
                if not isinstance(addrs, list) or not addrs:
                    die(f"Failed to forward ports to {self.name}: it has no address")
                self.record["ports"] = [str(p) for p in self.ports]
                self.record["nft_table"] = nat.machine_table(self.name)
                state.write(self.name, data)
                nat.add_forwards(self.name, self.ports, addrs[0], addrs[1] if len(addrs) > 1 else None)
            store.add_name(self.name, ref, _str_list(data.get("addresses")))
            update_hosts(store, self.host.hosts_file, fresh=(self.name, self.rootfs))

    def _lease(self, store: ipam.Store, ref: object) -> None:
        br = self.bridge
        assert br is not None
        self.address = store.lease(br, self.owner, ref, self.mac_seed, self.cfg.network.address)
        self.record["lease"] = str(self.address)
        a6 = br.address6(self.address) if self.mode.kind == "bridge" else None
        self.data["addresses"] = [str(self.address)] + ([str(a6)] if a6 else [])

    def _record_link(self) -> None:
        """The host's end of the veth pair: recorded (in the state written next) before any boot makes it."""
        br = self.bridge
        assert br is not None
        self.record.update(bridge=br.name, keep=br.keep, host_link=self._host_link())
        self.data["interfaces"] = [self.record["host_link"]]

    def _link_prefix(self) -> str:
        return "vp-" if self.pod else "vb-" if self.mode.kind == "bridge" else "ve-"

    def _host_link(self) -> str:
        """The name of the host's end of the veth pair (its state's host_link, once begin() ran)."""
        return host_ifname(self._link_prefix(), self.pod or self.name)

    def _join_pod(self, store: ipam.Store, ref: object) -> None:
        from machined import pods

        pod = self.pod
        self.record["pod"] = pod
        if pods.exists(pod) and pods.members(pod, exclude=self.name):
            store.add_ref(self.owner, ref)
            info = pods.read_info(pod)
        else:
            pods.destroy(pod)  # whatever a pod whose last machine was killed left
            pods.create(pod)
            info = {"mode": str(self.mode)}
            self.record["pod_info"] = info
            try:
                self.netns = os.open(os.path.join(pods.pod_dir(pod), "net"), os.O_RDONLY | os.O_CLOEXEC)
                if self.mode.kind in ("bridge", "veth"):
                    self.bridge = self.bridge or self._bridge()  # the pod ended since check()
                    self._lease(store, [ref])
                    self._record_link()
                    info.update(bridge=self.bridge.name, keep=self.bridge.keep)
                pods.write_info(pod, info)
                state.write(self.name, self.data)
                self._attach_links()
                info.update(addresses=self.data.get("addresses", []), interfaces=self.data.get("interfaces", []),
                            host_link=self.record.get("host_link"))
                pods.write_info(pod, info)
            finally:
                self.end_boot()
        for key in ("addresses", "interfaces"):
            if info.get(key):
                self.data[key] = info[key]

    def boot_namespaces(self) -> list[tuple[int, int]]:
        """Before each boot's spawn: the namespaces the machine joins instead of making its own.
        A pod's; or, for a machine with links, a new network namespace whose links the helper
        makes while spawn gets the machine ready (answer() takes its reply). The first boot's
        was asked for by ask_first_boot()."""
        if self.pod:
            from machined import pods

            self.pod_fds = pods.open_namespaces(self.pod)
            return self.pod_fds
        if not self.asked:
            self._ask_for_boot()
        return [(self.netns, linux.CLONE_NEWNET)]

    def _ask_for_boot(self) -> None:
        self.end_boot()
        self.netns = self._helper().netns()
        try:
            # The helper takes the network lock where a bridge is to be made or may go meanwhile.
            self._ask_links(held=False)
            if self.address is not None:  # a reboot: leased already
                self._ask_addresses()
        except BaseException:
            os.close(self.netns)
            self.netns = -1
            raise
        self.asked = True

    def answer(self, pid: int) -> None:
        """A spawn answer (spawn takes it after the cgroup step, also when a boot failed): the
        helper's reply to boot_namespaces(); the pod's namespaces, joined by now, closed here."""
        for fd, _ in self.pod_fds:
            os.close(fd)
        self.pod_fds = []
        if self.asked:
            self.asked = False
            self._links_made()

    def after_boot(self) -> str:
        """Once the boot's init runs (and mctl has returned): the bridge's NAT table renewed, or why not."""
        if not self.renewing:
            return ""
        self.renewing = False
        assert self.bridge is not None
        try:
            self._helper().request("renew_bridge", bridge=self.bridge.to_json(), held=False)
        except MachinedError as e:
            return str(e)
        return ""

    def _attach_links(self) -> None:
        self._ask_links(held=True)  # (we hold the network lock)
        self._ask_addresses()
        self._links_made()

    def _attach_args(self) -> dict[str, Any]:
        """attach_veth's arguments (but held) for a veth pair."""
        assert self.bridge is not None
        prefix, base = self._link_prefix(), self.pod or self.name
        outer = self._host_link()
        return {"machine": self.name, "bridge": self.bridge.to_json(), "kind": self.mode.kind, "outer": outer,
                "altname": prefix + base if outer != prefix + base else "", "seed": self.mac_seed}

    def _ask_links(self, held: bool) -> None:
        """The request for a boot's links (for a veth pair, the host's side: addresses follow).
        held: we hold the network lock, which the helper takes otherwise where it needs it."""
        agent = self._helper()
        if self.mode.kind in ("bridge", "veth"):
            agent.send("attach_veth", self.netns, **self._attach_args(), held=held)
        elif self.mode.kind == "interface":
            agent.send("move_in", self.netns, machine=self.name, link=self.mode.link)
        elif self.mode.kind == "macvlan":
            agent.send("add_macvlan", self.netns, machine=self.name, link=self.mode.link,
                       inner=host_ifname("mv-", self.mode.link), seed=self.mac_seed)

    def _ask_addresses(self) -> None:
        """For a veth pair, once leased: its addresses and routes (the answer _links_made() takes)."""
        if self.mode.kind in ("bridge", "veth"):
            assert self.bridge is not None
            addresses = self.data["addresses"]  # as _lease() made them: IPv4, and IPv6 where the bridge has it
            assert isinstance(addresses, list)
            self._helper().send("address_veth", self.netns, machine=self.name, bridge=self.bridge.to_json(),
                                kind=self.mode.kind, outer=self.record["host_link"], address=addresses[0],
                                address6=addresses[1] if len(addresses) > 1 else "")

    def _links_made(self) -> None:
        agent = self._helper()
        answer = agent.receive()  # (and those to the requests before: the first error raised)
        if self.mode.kind in ("bridge", "veth"):
            self.data["ifindices"] = [answer]
        elif self.mode.kind == "interface":
            self.data["interfaces"] = [self.mode.link]
        elif self.mode.kind == "macvlan":
            self.data["interfaces"] = [host_ifname("mv-", self.mode.link)]
        # (recorded by the state written next: nothing to clean up goes by these)
        if self.mode.kind == "bridge" and self.bridge is not None:
            # The bridge's NAT table made anew where a firewall reload flushed it: once the machine
            # runs (after_boot), so that it is not on the way of the start. A flushed table was
            # missing since the flush anyway, and so it is for a few milliseconds longer.
            self.renewing = True

    def in_child(self, root_fd: int) -> None:
        """in_child hook (imports nothing): the machine's hosts file over its /etc/hosts and the host's
        resolvers over its /etc/resolv.conf, read-only."""
        _bind_file(root_fd, hosts_path(self.name), "etc/hosts", follow=True)
        if _without_nameservers(root_fd):
            _bind_file(root_fd, resolv_path(self.name), "etc/resolv.conf", follow=False)

    def end_boot(self) -> None:
        """After a boot's init ended: give back a moved link, drop the namespace we held."""
        if self.netns < 0:
            return
        try:
            if self.mode.kind == "interface" and not self.pod:
                self._helper().request("move_out", self.netns, link=self.mode.link)
        except Exception as e:  # noqa: BLE001 - best effort: the link dies with the namespace
            from machined.log import warn

            warn(f"Failed to move {self.mode.link} out of {self.name}: {e}")
        finally:
            os.close(self.netns)
            self.netns = -1

    def close(self, data: dict[str, object]) -> None:
        """The supervisor's teardown of the network (its helper's last steps), and the helper's end."""
        self.asked = self.renewing = False
        if self.agent is not None:
            self.agent.drain()  # a start that failed before its first boot: the answers first
        try:
            self.end_boot()
            teardown(data, self.agent)
        except Exception as e:  # noqa: BLE001 - best effort, as state.teardown's steps
            from machined.log import warn

            warn(f"cleanup of {self.name}: {e}")
        finally:
            data.pop("network", None)
            if self.agent is not None:
                self.agent.close()


def _check_host_port_free(port: netconfig.Port) -> None:
    """A host port a host service listens on cannot be forwarded: the forward would hide it."""
    import socket

    kind = socket.SOCK_STREAM if port.proto == "tcp" else socket.SOCK_DGRAM
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, kind)
        except OSError:
            continue
        try:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port.host))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                die(f"Failed to forward host port {port.key}: it is in use on the host")
        finally:
            s.close()


# --- names ----------------------------------------------------------------------------------------

def hosts_path(name: str) -> str:
    return os.path.join(paths.machine_runtime_dir(name), "hosts")


def resolv_path(name: str) -> str:
    return os.path.join(paths.machine_runtime_dir(name), "resolv.conf")


def _bind_file(root_fd: int, src: str, target: str, follow: bool) -> None:
    """Bind src read-only over the guest's target file, if both exist (a guest without one gets none)."""
    if not os.path.exists(src):
        return
    for remount in (False, True):
        try:
            # Looked up again for the remount: the first fd names the file under the bind mount.
            fd = mounts.resolve(root_fd, target, follow=follow, flags=os.O_PATH)
        except OSError:
            return
        try:
            if remount:
                linux.mount(None, mounts.fdpath(fd), None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
                            | mounts.NOSUID_NODEV_NOEXEC)
            else:
                linux.mount(src, mounts.fdpath(fd), None, linux.MS_BIND)
        finally:
            os.close(fd)


def _without_nameservers(root_fd: int) -> bool:
    """Whether the guest's /etc/resolv.conf is a file naming no server: that is where the host's
    go. A file with servers of its own, or a symlink (systemd-resolved, resolvconf), is the guest's."""
    try:
        text = mounts.read_file(root_fd, "etc/resolv.conf", follow=False, limit=65536)
    except OSError:
        return False
    return not any(line.strip().startswith(b"nameserver") for line in text.splitlines())


def host_resolvers() -> str:
    """The host's resolver configuration as a machine can use it: a loopback resolver (such as
    systemd-resolved's stub at 127.0.0.53) is the host's own, unreachable from a machine, so then
    resolved's list of upstream servers is taken instead (systemd-nspawn --resolv-conf=auto does the same)."""
    for candidate in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        try:
            with open(candidate) as f:
                text = f.read()
        except OSError:
            continue
        servers = [line.split()[1] for line in text.splitlines()
                   if line.startswith("nameserver") and len(line.split()) > 1]
        if servers and not all(inet.is_loopback(s) is not False for s in servers):
            return text
    return ""


def write_resolv_conf(path: str) -> None:
    text = host_resolvers()
    if text:
        with open(path, "w") as f:
            f.write("# The host's resolvers, given to this machine by machined.\n" + text)


def _str_list(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _strip_block(text: str) -> str:
    start = text.find(HOSTS_BEGIN)
    if start < 0:
        return text
    end = text.find(HOSTS_END, start)
    end = len(text) if end < 0 else end + len(HOSTS_END)
    return text[:start].rstrip("\n") + ("\n" if start else "") + text[end:].lstrip("\n")


def _with_block(text: str, entries: list[str]) -> str:
    text = _strip_block(text)
    if not entries:
        return text
    sep = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{sep}{HOSTS_BEGIN}\n" + "".join(f"{e}\n" for e in entries) + f"{HOSTS_END}\n"


def _rewrite_block(path: str, entries: list[str], base: str | None = None, follow: bool = False) -> None:
    """A hosts file with entries as its managed block, rewritten in place, never by rename (the file
    may be bind-mounted: into guests, or /etc/hosts itself), and not at all where it holds that
    already. base: what goes before the block (else what the file holds outside it). follow: the
    host's file may be a symlink the administrator made; ours never are."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), 0o644)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        old = b"".join(chunks)
        data = _with_block(old.decode(errors="replace") if base is None else base, entries).encode()
        if data != old:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _guest_hosts(rootfs: str) -> str:
    """The guest's own /etc/hosts, read without leaving its root."""
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return mounts.read_file(root_fd, "etc/hosts", limit=1 << 16).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(root_fd)


def update_hosts(store: ipam.Store, host_file: str, fresh: tuple[str, str] | None = None) -> None:
    """Rewrite the hosts file of every machine the store names and the host's managed block, with
    'ADDRESS NAME' for each address of each (store: open, its lock held). Each machine's file keeps
    what it holds outside the block: its guest's own /etc/hosts, read as its file was made; fresh:
    (name, rootfs) of the machine whose file is made now."""
    names = store.names()
    entries = [f"{a}\t{name}" for name, addresses in names.items() for a in addresses]
    for name in names:
        if fresh is not None and name == fresh[0]:
            _rewrite_block(hosts_path(name), entries, _guest_hosts(fresh[1]))
            continue
        try:
            _rewrite_block(hosts_path(name), entries)
        except FileNotFoundError:
            pass  # (its runtime directory is gone: nothing binds that file any more)
    if host_file:
        try:
            with open(host_file) as f:
                old = f.read()
        except FileNotFoundError:
            old = ""
        try:
            if _with_block(old, entries) != old:  # (only then opened for writing: it may be read-only)
                _rewrite_block(host_file, entries, follow=True)
        except OSError as e:
            # A host whose hosts file is read-only (itself a machine, an immutable image) still
            # runs machines; only the host's own lookups of their names go without.
            from machined.log import warn

            warn(f"Failed to update {host_file} with the machines' names: {e.strerror}")


# --- teardown -------------------------------------------------------------------------------------

def teardown(data: dict[str, object], agent: netagent.Agent | netagent.Inline | None = None) -> None:
    """TEARDOWN step for the "network" key: idempotent, best effort, also after a supervisor crash.
    agent: the supervisor's network helper; without one (the supervisor was killed) the recorded
    helper is let finish first, and the links are removed here."""
    rec = data.get("network")
    if not isinstance(rec, dict):
        return
    if agent is None:
        netagent.wait_gone(rec.get("agent"))
    name = str(data.get("name"))
    table = rec.get("nft_table")
    if isinstance(table, str):
        from machined import nat

        nat.delete_table(table)
    from machined import pods

    with ipam.Store() as store:
        store.release(name)
        pod = rec.get("pod")
        owned: dict[str, object] = rec  # what holds the links: the machine's record, or its pod's
        ending_pod = isinstance(pod, str) and not pods.members(pod, exclude=name)
        if isinstance(pod, str):
            if ending_pod:  # the pod's last machine: the pod ends with it
                owned = pods.read_info(pod) or rec.get("pod_info") or {}
                store.release(f"pod:{pod}")
            else:
                store.drop_ref(f"pod:{pod}", data.get("supervisor"))
                owned = {}
        link, bridge = owned.get("host_link"), owned.get("bridge")
        link = link if isinstance(link, str) else None
        bridge = bridge if isinstance(bridge, str) and owned.get("keep") is False else None
        if ending_pod:
            pods.destroy(str(pod))  # first: its veth goes with its network namespace
        if link or bridge:
            _remove_links(agent, link, bridge)
        hosts_file = rec.get("hosts_file")
        update_hosts(store, hosts_file if isinstance(hosts_file, str) else "")


def _remove_links(agent: netagent.Agent | netagent.Inline | None, link: str | None, bridge: str | None) -> None:
    if agent is not None:
        try:
            agent.request("teardown_links", link=link, bridge=bridge)
            return
        except netagent.HelperGone:
            pass  # it was killed: done here instead
    from machined import netops

    netops.teardown_links(link, bridge)
