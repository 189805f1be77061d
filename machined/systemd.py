"""systemd integration over the system bus (dbus-fast), as systemd-nspawn does it.

Where PID 1 is systemd (/run/systemd/system exists; MACHINED_SYSTEMD=no forces the cgroupfs path):
  - a machine's cgroup is machine-NAME.scope, a transient scope in machine.slice made with
    StartTransientUnit (Delegate=yes, DevicePolicy=closed + DeviceAllow=, the machine's limits),
    also when machined@NAME.service runs the supervisor (which stays that service's main process);
  - the supervisor sits in the scope's 'supervisor' sub-cgroup and the machine in 'payload', the
    root of its cgroup namespace (a delegated cgroup has no processes of its own where it has
    children);
  - the machine is registered with systemd-machined once its init runs (RegisterMachineWithNetwork),
    and again with the new init after a reboot, so machinectl, systemd-cgls and journalctl -M see it;
  - when it ends it is unregistered and the scope let go of (AbandonScope, UnrefUnit).
The D-Bus work is done by an agent process (see Agent) that lives in the scope with the supervisor.
If the supervisor is killed with SIGKILL the machine dies with it, the agent unregisters it and
goes, and the scope, empty, goes too; the next mctl call (TEARDOWN step "systemd") still kills
whatever is left in the scope, unregisters the machine if it is still ours and waits until the unit
is gone, so that the name is free for the next start.

dbus-fast is imported on this path only (its message modules, not its asyncio bus: see Bus).
"""

from __future__ import annotations

import os
import time

import machined
from machined import prewarm, signals
from machined.log import MachinedError, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from machined import cgroups
    from machined.config import Resources
    from machined.devices import Rule
    from machined.supervisor import Plan

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
MACHINED = ("org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager")
PROPERTIES = "org.freedesktop.DBus.Properties"
TIMEOUT = 25.0  # sd-bus's default for a method call
SUPERVISOR = "supervisor"
JOB_REMOVED = ("type='signal',sender='org.freedesktop.systemd1',path='/org/freedesktop/systemd1',"
               "interface='org.freedesktop.systemd1.Manager',member='JobRemoved'")


def available() -> bool:
    """Whether machines are delegated to systemd: PID 1 is systemd, unless MACHINED_SYSTEMD=no."""
    if os.environ.get("MACHINED_SYSTEMD", "").lower() in ("0", "no", "false", "off"):
        return False
    return os.path.isdir("/run/systemd/system")


def escape(name: str) -> str:
    """systemd's unit_name_escape(): a machine name as part of a unit name ('a-b' -> 'a\\x2db')."""
    out = []
    for i, c in enumerate(name):
        if c == "/":
            out.append("-")
        elif c in "-\\" or (c == "." and i == 0) or not (c.isascii() and (c.isalnum() or c in ":_.")):
            out.extend(f"\\x{b:02x}" for b in c.encode())
        else:
            out.append(c)
    return "".join(out)


def scope_unit(name: str) -> str:
    return f"machine-{escape(name)}.scope"


def service_unit(name: str) -> str:
    return f"machined@{escape(name)}.service"


UNSET = (1 << 64) - 1  # systemd's "infinity" / "not set" for the integer properties below


def limit_properties(res: Resources, keys: Iterable[str] | None = None) -> list[tuple[str, str, Any]]:
    """[resources] as unit properties (name, D-Bus signature, value): those set, or all of keys
    (a key without a value lifts its limit)."""
    from machined import resources

    props: list[tuple[str, str, Any]] = []
    for key in keys if keys is not None else [k for k in resources.KEYS if getattr(res, k) is not None]:
        value = getattr(res, key)
        if key == "cpu_quota":
            props.append(("CPUQuotaPerSecUSec", "t", UNSET if value is None else
                          int(resources.parse_quota(value) * 10000)))
        elif key == "cpuset_cpus":
            mask = bytearray()
            for cpu in resources.parse_cpus(value) if value else []:
                mask.extend(b"\0" * (cpu // 8 + 1 - len(mask)))
                mask[cpu // 8] |= 1 << cpu % 8
            props.append(("AllowedCPUs", "ay", list(mask)))  # a list: it crosses to the agent as JSON
        else:
            props.append((PROPERTY_NAMES[key], "t", UNSET if value is None else value))
    return props


PROPERTY_NAMES = {"memory_max": "MemoryMax", "memory_high": "MemoryHigh", "memory_swap_max": "MemorySwapMax",
                  "cpu_weight": "CPUWeight", "tasks_max": "TasksMax", "io_weight": "IOWeight"}


def device_properties(rules: Iterable[Rule]) -> list[tuple[str, str, Any]]:
    """The allowlist as DeviceAllow= (the empty list first resets what an earlier change set)."""
    from machined import devices

    return [("DevicePolicy", "s", "closed"), ("DeviceAllow", "a(ss)", []),
            ("DeviceAllow", "a(ss)", devices.device_allow(rules))]


def unit_properties(plan: Plan) -> list[tuple[str, str, Any]]:
    """The machine's device policy and limits as unit properties."""
    props = device_properties(plan.all_rules())
    if plan.limits is not None:
        props += limit_properties(plan.limits)
    return props


class NoBus(MachinedError):
    """The system bus cannot be reached: said as is, whatever was being done."""


class CallError(Exception):
    """An error reply: its D-Bus error name and text."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name


class Bus:
    """One blocking connection to the system bus. dbus-fast marshals and parses the messages; its
    transports are asyncio's and GLib's, and importing asyncio with it costs tens of milliseconds on
    the start path, so the socket is driven here: connect, EXTERNAL auth, Hello, then each call
    sends and reads until its reply (JobRemoved signals read meanwhile are kept)."""

    def __init__(self) -> None:
        import socket
        import struct

        machined.bare_package("dbus_fast")  # its __init__ imports the asyncio bus and everything else
        import dbus_fast.errors  # noqa: F401 - first, as its __init__ has it: the modules import each other
        from dbus_fast._private.unmarshaller import Unmarshaller
        from dbus_fast.constants import MessageType
        from dbus_fast.message import Message
        from dbus_fast.signature import Variant

        self._message, self._variant, self._types = Message, Variant, MessageType
        self.jobs: dict[str, str] = {}   # job path -> result, from JobRemoved
        self.serial = 0
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or "unix:path=/run/dbus/system_bus_socket"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # A kernel timeout, not settimeout(): a read that times out is then EAGAIN, which dbus-fast's
        # parser reports as "no message yet" (its compiled code fails on a timeout's errno of None).
        timeval = struct.pack("ll", int(TIMEOUT), int(TIMEOUT % 1 * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            self.sock.connect(_socket_address(address))
            # EXTERNAL: the bus knows our uid from the socket; we claim it (hex of its decimal digits).
            self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
            answer = b""
            while not answer.endswith(b"\r\n"):
                chunk = self.sock.recv(256)
                if not chunk:
                    raise ConnectionResetError("the bus closed the connection")
                answer += chunk
            if not answer.startswith(b"OK "):
                raise ConnectionRefusedError(f"authentication refused ({answer.decode(errors='replace').strip()})")
            self.sock.sendall(b"BEGIN\r\n")
            self.reader = Unmarshaller(None, self.sock, False)  # (stream, sock, negotiate_unix_fd)
            self.call(DBUS, "Hello")
        except (OSError, ValueError, CallError) as e:
            self.sock.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            if isinstance(e, BlockingIOError):
                reason = f"no answer within {TIMEOUT:.0f} s"
            raise NoBus(f"Failed to connect to the system bus at {address}: {reason}",
                        hint="is dbus running?") from None

    def _next(self, deadline: float) -> Any:
        """The next message; a timeout once deadline has passed (other messages may come first)."""
        if time.monotonic() > deadline:
            msg = None
        else:
            try:
                msg = self.reader.unmarshall()
            except (OSError, EOFError) as e:
                raise CallError("org.freedesktop.DBus.Error.Disconnected", str(e) or "the bus went away") from None
        if msg is None:  # or EAGAIN: SO_RCVTIMEO ran out
            raise CallError("org.freedesktop.DBus.Error.Timeout", f"no answer within {TIMEOUT:.0f} s")
        if msg.message_type == self._types.SIGNAL and msg.member == "JobRemoved" \
                and msg.interface == SYSTEMD[2] and len(msg.body) == 4:
            self.jobs[msg.body[1]] = msg.body[3]
        return msg

    def call(self, target: tuple[str, str, str], member: str, signature: str = "", body: Iterable[Any] = (),
             path: str | None = None) -> list[Any]:
        """Call a method; its reply's body, or CallError with the error's name and text."""
        dest, default_path, interface = target
        self.serial += 1
        msg = self._message(destination=dest, path=path or default_path, interface=interface, member=member,
                            signature=signature, body=list(body), serial=self.serial)
        try:
            self.sock.sendall(msg._marshall(False))
        except OSError as e:
            raise CallError("org.freedesktop.DBus.Error.Disconnected", e.strerror or str(e)) from None
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._next(deadline)
            if reply.reply_serial != self.serial or reply.message_type not in (
                    self._types.METHOD_RETURN, self._types.ERROR):
                continue
            if reply.message_type == self._types.ERROR:
                raise CallError(reply.error_name or "", str(reply.body[0]) if reply.body else reply.error_name or "")
            return list(reply.body)

    def get(self, target: tuple[str, str, str], path: str, interface: str, prop: str) -> Any:
        return self.call((target[0], path, PROPERTIES), "Get", "ss", [interface, prop])[0].value

    def variants(self, props: Iterable[tuple[str, str, Any]]) -> list[list[Any]]:
        return [[key, self._variant(sig, bytes(value) if sig == "ay" else value)] for key, sig, value in props]

    def start_transient(self, unit: str, props: list[tuple[str, str, Any]]) -> None:
        """StartTransientUnit, waiting for its job (JobRemoved: the match is added before the call,
        since the signal may come before the reply)."""
        self.call(DBUS, "AddMatch", "s", [JOB_REMOVED])
        try:
            job = self.call(SYSTEMD, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                            [unit, "fail", self.variants(props), []])[0]
            deadline = time.monotonic() + TIMEOUT
            while job not in self.jobs:
                self._next(deadline)
            result = self.jobs.pop(job)
            if result != "done":
                raise CallError("org.freedesktop.systemd1.JobFailed", f"its start job ended '{result}'")
        finally:
            try:
                self.call(DBUS, "RemoveMatch", "s", [JOB_REMOVED])
            except CallError:
                pass

    def close(self) -> None:
        self.sock.close()


def _socket_address(address: str) -> str | bytes:
    """The first unix: address of a D-Bus server address list (path= or abstract=)."""
    for entry in address.split(";"):
        kind, _, params = entry.partition(":")
        if kind != "unix":
            continue
        for param in params.split(","):
            key, _, value = param.partition("=")
            if key == "path":
                return value
            if key == "abstract":
                return b"\0" + value.encode()
    raise ValueError(f"no unix: socket in {address!r}")


def _reason(e: CallError) -> str:
    hints = {
        "org.freedesktop.DBus.Error.ServiceUnknown": " (is systemd-container installed?)",
        "org.freedesktop.DBus.Error.AccessDenied": " (permission denied: run as root)",
        "org.freedesktop.machine1.MachineExists": " (a machine of that name is registered already; "
                                                  "'machinectl terminate' it or choose another name)",
        "org.freedesktop.systemd1.UnitExists": " (a unit of that name exists already)",
    }
    return f"{e}{hints.get(e.name, '')}"


def _own_unit() -> str:
    """The unit whose cgroup this process is in directly (systemd's hierarchy, else v2)."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, keys, path = line.rstrip("\n").split(":", 2)
            paths[keys] = path
    return os.path.basename(paths.get("name=systemd") or paths.get("", ""))


class Agent:
    """A helper process that holds the machine's system-bus connection and does its D-Bus work.

    Importing dbus-fast and connecting takes milliseconds: forked when mctl starts
    (prefork), the agent does that and connects on another CPU while mctl gets the machine ready,
    then creates the scope and registers the machine for the supervisor. It lives in the scope for
    the machine's life (its connection holds the scope's AddRef), and unregisters the machine and
    lets go of the scope when the supervisor closes it, or at once if the supervisor dies.
    Requests and replies are JSON lines on a pair of pipes.
    """

    def __init__(self) -> None:
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _serve(req_r, rep_w)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        self.pid, self.req, self.rep = pid, req_w, rep_r
        self.creator = os.getpid()

    def send(self, op: str, **args: Any) -> None:
        from machined import jsonc

        try:
            os.write(self.req, (jsonc.dumps({"op": op, **args}) + "\n").encode())
        except OSError as e:
            raise MachinedError(f"its D-Bus helper ended ({e.strerror})") from None

    def receive(self) -> dict[str, Any]:
        """The reply to the oldest request; a MachinedError with the agent's reason if it failed."""
        import select

        from machined import jsonc

        reply = b""
        try:
            while not reply.endswith(b"\n"):
                if not select.select([self.rep], [], [], TIMEOUT + 5)[0]:
                    raise MachinedError("no answer from its D-Bus helper")
                chunk = os.read(self.rep, 1)  # byte by byte: never past this reply
                if not chunk:
                    raise MachinedError("its D-Bus helper ended")
                reply += chunk
        except OSError as e:
            raise MachinedError(f"its D-Bus helper ended ({e.strerror})") from None
        answer: dict[str, Any] = jsonc.loads(reply)
        if answer.get("error"):
            raise (NoBus if answer.get("nobus") else MachinedError)(answer["error"])
        return answer

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self.receive()

    def forget(self) -> None:
        """Close our ends only: a forked supervisor talks to the agent on."""
        os.close(self.req)
        os.close(self.rep)

    def close(self) -> None:
        try:
            self.request("close")
        except MachinedError:
            pass  # it cleans up on end of file too
        self.forget()
        if self.creator == os.getpid():  # our child (run, start --foreground): reap it
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


_preforked: Agent | None = None


def prefork() -> None:
    """Called by mctl first thing for a verb that starts one machine: the agent gets ready meanwhile."""
    global _preforked
    if available():
        _preforked = Agent()


def _agent() -> Agent:
    global _preforked
    agent, _preforked = _preforked, None
    return agent or Agent()


def _serve(req_fd: int, rep_fd: int) -> None:
    """The agent's life: connect, then answer the supervisor until it closes us or goes away."""
    inherited = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            os.fstat(fd)  # not the one listdir used: closed by now, its number free for the bus
        except OSError:
            continue
        if fd not in (req_fd, rep_fd):
            inherited.append(fd)
    bus: Bus | None = None
    failure = ""
    try:
        bus = Bus()  # first: this is what the supervisor waits for
    except MachinedError as e:
        failure = str(e)
    from machined import cgroups, jsonc

    for fd in inherited:  # nothing of mctl's: no lock, no pipe of its caller
        try:
            os.close(fd)
        except OSError:
            pass
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    if null > 2:
        os.close(null)
    for sig in (signals.SIGTERM, signals.SIGINT, signals.SIGHUP, signals.SIGPIPE):
        signals.signal(sig, signals.SIG_IGN)  # stopping the scope signals us too: we go when the supervisor says
    import gc

    gc.freeze()  # (forked from mctl, whose start-up path runs without collections)
    gc.enable()
    with open("/proc/self/comm", "w") as f:
        f.write("machined-bus")
    unit = registered = ""
    pending = b""
    op = ""
    while op != "close":
        while b"\n" not in pending:
            chunk = os.read(req_fd, 65536)
            if not chunk:
                break
            pending += chunk
        if b"\n" not in pending:
            break  # the supervisor is gone
        line, pending = pending.split(b"\n", 1)
        msg = jsonc.loads(line)
        op = msg["op"]
        reply: dict[str, object] = {}
        try:
            if bus is None:
                raise NoBus(failure)
            if op == "scope":
                unit = msg["unit"]
                bus.start_transient(unit, [(k, sig, v) for k, sig, v in msg["props"]])
                # Where systemd put us is where the supervisor goes (per hierarchy; on v1, only
                # the controllers systemd manages: the machine shares the others with the host).
                which = cgroups.layout()
                reply.update(layout=which, dirs={h.mountpoint: [h.base, h.key, h.version]
                                                 for h in cgroups.hierarchies(which)
                                                 if os.path.basename(h.base) == unit})
            elif op == "register":
                if registered:
                    _call_quietly(bus, MACHINED, "UnregisterMachine", "s", [registered])
                    registered = ""
                bus.call(MACHINED, "RegisterMachineWithNetwork", "sayssusai",
                         [msg["name"], bytes.fromhex(msg["id"]), "machined", "container", msg["leader"],
                          msg["root"], msg["ifindices"]])
                registered = msg["name"]
        except CallError as e:
            reply["error"] = _reason(e)
        except MachinedError as e:
            reply.update(error=str(e), nobus=isinstance(e, NoBus))
        if op == "close":
            break
        os.write(rep_fd, (jsonc.dumps(reply) + "\n").encode())
    if bus is not None:
        if registered:
            _call_quietly(bus, MACHINED, "UnregisterMachine", "s", [registered])
        if unit:
            _call_quietly(bus, SYSTEMD, "AbandonScope", "s", [unit])
            _call_quietly(bus, SYSTEMD, "UnrefUnit", "s", [unit])
        bus.close()
    if op == "close":
        try:
            os.write(rep_fd, b"{}\n")
        except OSError:
            pass


def _call_quietly(bus: Bus, target: tuple[str, str, str], member: str, signature: str, body: list[Any]) -> None:
    try:
        bus.call(target, member, signature, body)
    except CallError:
        pass  # cleaning up: gone already is fine


class Delegation:
    """The machine's systemd unit and registration, held by its supervisor for the machine's life.

    Made by mctl before it forks the supervisor: the agent starts creating the scope (with itself in
    it) at once; the supervisor then joins the scope. Recorded in the state as "systemd":
    {unit, registered, id}.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.name = plan.name
        self.unit = scope_unit(self.name)
        self.info: dict[str, object] = {"unit": self.unit, "registered": False, "id": plan.machine_id}
        self.agent = _agent()
        props = [
            ("Description", "s", f"Machine {self.name}"), ("Slice", "s", "machine.slice"),
            ("Delegate", "b", True), ("CollectMode", "s", "inactive-or-failed"), ("AddRef", "b", True),
            ("PIDs", "au", [self.agent.pid]),
            # Stopping the scope (machinectl terminate, shutdown) signals the supervisor too, which then
            # powers the machine off: give that its time before systemd kills what is left.
            ("TimeoutStopUSec", "t", int((plan.kill_timeout + 10) * 1e6)),
        ]
        service = service_unit(self.name)
        if _own_unit() == service:
            # Run by machined@NAME.service: at shutdown the service (whose stop is a clean poweroff)
            # goes before the scope, which would otherwise signal every process of the machine.
            props.append(("Before", "as", [service]))
        self.agent.send("scope", unit=self.unit, props=props + unit_properties(plan))

    def create(self, data: dict[str, object], helpers: tuple[int, ...] = ()) -> cgroups.MachineCgroup:
        """In the supervisor: once the scope exists, join it (with our helpers: the network's); its
        cgroup, delegated, with payload ready."""
        data["systemd"] = self.info  # before we are in it: a crash from now on leaves it to clean
        try:
            where = self.agent.receive()
        except NoBus:
            raise
        except MachinedError as e:
            fail(f"create scope {self.unit}", str(e))
        return _adopt(self.name, self.unit, (self.agent.pid, *helpers), where)

    def register(self, leader: int, interfaces: object) -> None:
        """Register the machine with systemd-machined; after a reboot, again with the new init."""
        try:
            self.agent.request("register", name=self.name, id=self.plan.machine_id, leader=leader,
                               root=self.plan.rootfs, ifindices=_ifindices(interfaces))
        except NoBus:
            raise
        except MachinedError as e:
            fail(f"register {self.name} with systemd-machined", str(e))
        self.info["registered"] = True

    def forget(self) -> None:
        self.agent.forget()

    def close(self, data: dict[str, object]) -> None:
        """The supervisor's teardown: the agent unregisters and lets go of the scope (it goes once we exit)."""
        try:
            self.agent.close()
        finally:
            data.pop("systemd", None)


def set_properties(data: dict[str, object], props: list[tuple[str, str, Any]]) -> bool:
    """Change a running machine's scope at runtime (set-limit, bind-device); False if it has none."""
    info = data.get("systemd")
    if not isinstance(info, dict) or not info.get("unit"):
        return False
    unit = str(info["unit"])
    bus = Bus()
    try:
        bus.call(SYSTEMD, "SetUnitProperties", "sba(sv)", [unit, True, bus.variants(props)])
    except CallError as e:
        fail(f"set {', '.join(sorted({k for k, _, _ in props}))} of {unit}", _reason(e))
    finally:
        bus.close()
    return True


def _adopt(name: str, unit: str, pids: tuple[int, ...], where: dict[str, Any]) -> cgroups.MachineCgroup:
    """Join unit, where systemd has put the agent (which says where that is): its 'supervisor'
    sub-cgroup for us, the agent and our other helpers (pids), 'payload' for the machine."""
    from machined import cgroups

    dirs: dict[str, list[Any]] = where.get("dirs") or {}
    if not dirs:
        fail(f"set up the cgroup of {name}", f"systemd did not put the machine's D-Bus helper into {unit}")
    cg = cgroups.MachineCgroup(str(where["layout"]), {mp: d for mp, (d, _, _) in dirs.items()},
                               {mp: key for mp, (_, key, _) in dirs.items()}, delegated=True)
    prewarm.done(wait=True)  # its moves of this process would take us out of the scope again
    try:
        for d in cg.dirs.values():
            for sub in (SUPERVISOR, cgroups.PAYLOAD):
                os.makedirs(os.path.join(d, sub), exist_ok=True)
            for pid in (*pids, 0):
                with open(os.path.join(d, SUPERVISOR, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
        for d, _, version in dirs.values():
            if version == 2:  # the unit has no processes of its own now: hand its controllers down
                cgroups._enable_v2_controllers(d)
    except OSError as e:
        fail(f"set up the cgroup of {name} in {unit}", e)
    return cg


def _ifindices(interfaces: object) -> list[int]:
    """Host-side interface indices of the machine's links (state 'interfaces': names or indices)."""
    if not interfaces or not isinstance(interfaces, list):
        return []
    import socket

    result = []
    for item in interfaces:
        try:
            result.append(item if isinstance(item, int) else socket.if_nametoindex(str(item)))
        except OSError:
            continue
    return result


def teardown(data: dict[str, object]) -> None:
    """TEARDOWN step for a supervisor that died: kill what is left in its scope, unregister the
    machine if the registration is still ours, and wait until the scope is gone."""
    info = data.get("systemd")
    if not isinstance(info, dict):
        return
    name, unit = str(data.get("name")), str(info.get("unit") or "")
    bus = Bus()
    try:
        if info.get("registered"):
            _unregister_if_ours(bus, name, str(info.get("id")))
        if unit:
            for member, sig, body in (("AbandonScope", "s", [unit]),
                                      ("KillUnit", "ssi", [unit, "all", signals.SIGKILL]),
                                      ("UnrefUnit", "s", [unit])):
                try:
                    bus.call(SYSTEMD, member, sig, body)
                except CallError:
                    pass
            _wait_unit_gone(bus, unit)
    finally:
        bus.close()


def _unregister_if_ours(bus: Bus, name: str, machine_id: str) -> None:
    try:
        path = bus.call(MACHINED, "GetMachine", "s", [name])[0]
        if bytes(bus.get(MACHINED, path, "org.freedesktop.machine1.Machine", "Id")).hex() == machine_id:
            bus.call(MACHINED, "UnregisterMachine", "s", [name])
    except CallError:
        pass  # no such machine (any more)


def _wait_unit_gone(bus: Bus, unit: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            path = bus.call(SYSTEMD, "GetUnit", "s", [unit])[0]
            if bus.get(SYSTEMD, path, "org.freedesktop.systemd1.Unit", "ActiveState") == "failed":
                bus.call(SYSTEMD, "ResetFailedUnit", "s", [unit])
        except CallError as e:
            if e.name == "org.freedesktop.systemd1.NoSuchUnit":
                return
        time.sleep(0.01)
    fail(f"clean up {unit}", f"it is still there after {timeout:.0f} s")


# --- mctl enable / disable ----------------------------------------------------------------------

UNIT_PATH = ("/etc/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")


def enable_dir() -> str:
    """Where enabling links go, as with systemctl enable (MACHINED_ENABLE_DIR overrides it for tests)."""
    return os.environ.get("MACHINED_ENABLE_DIR") or "/etc/systemd/system"


def _template() -> str | None:
    """The installed machined@.service: install.sh's unit directory (MACHINED_UNITDIR), then systemd's."""
    dirs = [os.environ.get("MACHINED_UNITDIR") or "/usr/local/lib/systemd/system", *UNIT_PATH]
    return next((p for p in (os.path.join(d, "machined@.service") for d in dirs) if os.path.isfile(p)), None)


def enable(name: str, on: bool) -> None:
    """Start the machine at boot, or no longer: a machines.target.wants link to machined@NAME.service."""
    from machined import config, paths
    from machined.log import die

    verb = "enable" if on else "disable"
    paths.check_name(name)
    template = _template()
    if on:
        if not config.exists(name) and not os.path.isdir(paths.image_path(name)):
            die(f"No machine named {name!r}")
        if template is None:
            die(f"Failed to enable {name}: machined@.service is not installed", hint="run install.sh")
    link = os.path.join(enable_dir(), "machines.target.wants", service_unit(name))
    try:
        if on and not (os.path.islink(link) and os.readlink(link) == template):
            assert template is not None
            os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
            tmp = f"{link}.tmp{os.getpid()}"
            os.symlink(template, tmp)
            os.replace(tmp, link)
            print(f"Created symlink {link} \u2192 {template}.")
        elif not on and os.path.lexists(link):
            os.unlink(link)
            print(f"Removed {link}.")
    except OSError as e:
        fail(f"{verb} {name}", e)
    if available():
        bus = Bus()
        try:
            bus.call(SYSTEMD, "Reload")
        except CallError as e:
            fail(f"{verb} {name}: reload systemd", _reason(e))
        finally:
            bus.close()
