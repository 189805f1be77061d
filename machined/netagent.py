"""A machine's network helper: a process that does the machine's netlink work for its supervisor.

mctl decides first thing, when it starts or runs one machine whose network has links (prefork:
from the command line and the machine's settings file, before mctl imports its parser):

- A machine whose links were made before by requests that an earlier start saved (netops:
  replays), the common case, needs no helper: a thread of mctl's (Early) makes the network
  namespace and the veth pair at once, while mctl imports the rest; the supervisor adopts them and
  does the few steps left itself (Inline).
- Otherwise a helper process is forked, which imports pyroute2's message classes
  (machined.netlink, about 30 ms) meanwhile, on the other CPU, instead of mctl or the supervisor.
  The supervisor asks it for each netlink step (OPS: functions of machined.netops), handing over
  the machine's network namespace as an fd: one JSON message per request and per reply on a socket
  pair (SOCK_SEQPACKET, SCM_RIGHTS). Requests may follow each other before their answers are read;
  the helper answers them in order. (Where mctl decided nothing first, as for a start of several
  machines, a machine with replays gets a helper that is a new interpreter and loads little.)

The helper holds nothing of mctl's (no lock, no standard streams, no other descriptor), runs in a
session of its own and ignores terminal and stop signals: it ends when its socket does, when the
supervisor closes it or dies. A supervisor records its helper in the machine's state, so that the
teardown after a killed supervisor waits until the helper has finished the step it was doing
(wait_gone).
"""

from __future__ import annotations

import os
import sys

from machined.log import MachinedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from typing import Any, NoReturn

TIMEOUT = 60.0  # for one step; a helper that takes longer is stuck
LINK_MODES = ("veth", "bridge", "interface", "macvlan")
REPLAYED_MODES = ("veth", "bridge")  # (netops: replays make their links)
REPLAYED = ("attach_veth", "address_veth")  # the ops netops replays
OPS = ("attach_veth", "address_veth", "renew_bridge", "move_in", "add_macvlan", "move_out", "teardown_links")
COMM = "machined-net"


class HelperGone(MachinedError):
    """The helper ended (or stopped answering) before it answered."""


class HelperError(Exception):
    """An unexpected exception in the helper, reported as the original would have been (its repr);
    its traceback is the message."""

    def __init__(self, text: str, tb: str = "") -> None:
        super().__init__(tb or text)
        self.text = text

    def __repr__(self) -> str:
        return self.text


class Agent:
    """The supervisor's end of a helper process (which is started here, for machine)."""

    def __init__(self, machine: str = "", kind: str = "", replays: bool = True) -> None:
        """kind: the mode of machine's network (its links are replayed for REPLAYED_MODES, where
        replays: not where they were found not to fit, and netlink is imported at once)."""
        # The socket module costs ~6 ms to import (its enums): its C part does here.
        import _socket

        ours, theirs = (s.detach() for s in _socket.socketpair(_socket.AF_UNIX,
                                                               _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC))
        # A machine whose replays are saved gets a new interpreter: a fork's pages would be shared
        # with mctl, which then copies each one it writes to as it goes on (3-4 ms of a start). One
        # that needs pyroute2 is forked: its import (~30 ms) starts at once, not after the ~10 ms an
        # interpreter takes to start, and that is what its start waits for.
        replayed = replays and kind in REPLAYED_MODES and replayable(machine)
        try:
            if replayed:
                os.set_inheritable(theirs, True)
                # Isolated and without site (~3 ms less to start), on our module path.
                root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # (where no path has it)
                argv = [sys.executable, "-I", "-S", "-c", _MAIN, str(theirs), machine, root, *sys.path]
                pid = os.posix_spawn(sys.executable, argv, os.environ, setsid=True)
            else:
                pid = os.fork()
                if pid == 0:
                    try:
                        os.close(ours)
                        _serve(theirs, machine, preload=True)
                    finally:
                        os._exit(0)
        except BaseException:
            os.close(ours)
            raise
        finally:
            os.close(theirs)
        self.fd = ours
        self._sock: _socket.socket | None = None
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)  # before anyone could reap it: it is our child
        self.creator = os.getpid()
        self.machine = machine
        self.op = ""
        self.used = False
        self.unread = 0  # answers due, not read yet (one for each request sent)
        if not _agents:
            import atexit

            atexit.register(_close_all)
        _agents.append(self)

    def _socket(self) -> _socket.socket:
        import _socket  # (not socket: its enums cost ~2 ms of a start)

        if self._sock is None:
            if self.fd < 0:
                raise HelperGone(f"Failed to set up the network of {self.machine}: its network helper is closed")
            self._sock = _socket.socket(fileno=self.fd)
            self._sock.settimeout(TIMEOUT)
        return self._sock

    def send(self, op: str, netns: int = -1, **args: Any) -> None:
        """Ask the helper to do op (a function of machined.netops), with the network namespace netns.
        Requests may follow each other before their answers are taken (receive)."""
        from machined import jsonc

        self.used = True
        self.op = op
        self.unread += 1
        try:
            self._socket().sendmsg([jsonc.dumps({"op": op, **args}).encode()], _rights(netns) if netns >= 0 else [])
        except OSError as e:
            self._gone(e)

    def netns(self) -> int:
        """A new network namespace (an fd), for a boot's links."""
        from machined import linux

        return linux.new_net_namespace()

    def receive(self) -> Any:
        """The answers to the requests sent: the result of the last; the first MachinedError among
        them is raised here as it was raised there (once all are read)."""
        error: BaseException | None = None
        result = None
        while self.unread:
            try:
                result = self._answer()
            except (MachinedError, HelperError) as e:
                if isinstance(e, HelperGone):
                    raise
                error = error or e
        if error is not None:
            raise error
        return result

    def drain(self) -> None:
        """Read the answers still due, whatever they say (a start that failed meanwhile)."""
        try:
            self.receive()
        except (MachinedError, HelperError):
            pass

    def _answer(self) -> Any:
        """The next answer's result, or its error raised."""
        from machined import jsonc

        self.unread -= 1
        try:
            data = self._socket().recv(65536)
        except OSError as e:
            self._gone(e)
        if not data:
            self._gone(None)
        reply: dict[str, Any] = jsonc.loads(data)
        if "error" in reply:
            raise MachinedError(reply["error"], reply.get("hint"))
        if "exception" in reply:
            raise HelperError(reply["exception"], reply.get("traceback", ""))
        return reply.get("result")

    def request(self, op: str, netns: int = -1, **args: Any) -> Any:
        self.send(op, netns, **args)
        return self.receive()

    def _gone(self, e: OSError | None) -> NoReturn:
        self.unread = 0  # none will come
        why = f" ({e.strerror or 'no answer'})" if e is not None else ""
        raise HelperGone(f"Failed to {self.op.replace('_', ' ')} for {self.machine}: its network helper ended{why}")

    def _close_socket(self) -> bool:
        if self.fd < 0:
            return False
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self.fd)
        self.fd, self._sock = -1, None
        return True

    def forget(self) -> None:
        """Close our ends only: a forked supervisor talks to the helper on."""
        if self._close_socket():
            os.close(self.pidfd)

    def close(self) -> None:
        """End the helper (it goes at the end of file on its socket) and wait until it is gone."""
        if not self._close_socket():
            return
        import select

        from machined import signals

        try:
            if not self.used:  # it holds nothing: no need to wait for its imports
                signals.pidfd_send_signal(self.pidfd, signals.SIGKILL)
            if not select.select([self.pidfd], [], [], TIMEOUT)[0]:
                signals.pidfd_send_signal(self.pidfd, signals.SIGKILL)
                select.select([self.pidfd], [], [], 5.0)
        except ProcessLookupError:
            pass  # gone already
        finally:
            os.close(self.pidfd)
        if self.creator == os.getpid():
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


class Early:
    """A thread of mctl's that makes a start's network namespace and veth pair first thing
    (netops.attach_here), while mctl imports and plans the rest: the kernel takes 2-5 ms to make
    them, which a helper process would start on only after its own ~15 ms start. Whether the saved
    replay fits is found out here, before the thread: each system call of a thread ends with a wait
    for the GIL, and each such turn costs mctl's imports a handover to another CPU (in a
    micro-benchmark, a thread that also read and checked the replay cost them 1.7 ms; this one,
    nothing measurable). So the thread's only calls are the namespace's and the request's, whose
    kernel work is what runs meanwhile."""

    def __init__(self, machine: str, mode: str) -> None:
        """mode: the machine's network mode, as given or set (a replay for another is not sent)."""
        import _thread

        # (everything the thread uses imported first: a module that a thread is importing as mctl
        # forks, the D-Bus agent say, would stay locked in the child)
        from machined import linux, netops  # noqa: F401

        self.done = _thread.allocate_lock()
        self.value: tuple[int, dict[str, Any]] | None = None
        self.host: Any = None  # the thread's netlink socket in the host's namespace
        try:
            plan = netops.early_plan(machine, mode)
            if plan is None:
                return
            self.host = netops.rtnl_socket()
        except Exception:  # noqa: BLE001 - best effort: the start makes the links as it would have
            return
        self.done.acquire()
        # The thread asks for the GIL after each of its system calls: at the default interval it
        # may wait 5 ms for mctl's imports each time.
        self.interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0001)
        try:
            _thread.start_new_thread(self._run, (plan,))
        except RuntimeError:  # (no thread to be had: the start makes the links as it would have)
            sys.setswitchinterval(self.interval)
            self.done.release()

    def _run(self, plan: tuple[dict[str, Any], list[Any], int | None]) -> None:
        try:
            from machined import netops

            self.value = netops.attach_here(plan, self.host), plan[0]
        except Exception:  # noqa: BLE001 - as above
            pass
        finally:
            sys.setswitchinterval(self.interval)
            self.done.release()

    def result(self) -> tuple[int, dict[str, Any]] | None:
        """Once the thread is done (mctl takes it before it forks the supervisor)."""
        with self.done:
            if self.host is not None:
                self.host.close()
                self.host = None
            return self.value


class Inline:
    """The network helper of a start whose links were made by Early: its steps are done
    by the supervisor itself, each when its answer is taken (receive), which spawn does while the
    machine's child builds its root. The first boot's veth pair is Early's, where its arguments are
    the machine's (adopt); what is left of that boot is host0's addresses and routes, a few
    requests. There is no process: nothing to record, start, wait for or end."""

    pid = None

    def __init__(self, machine: str, early: Early | None) -> None:
        self.machine = machine
        self.early = early
        self.op = ""
        self.used = False
        self.adopted: tuple[int, dict[str, Any]] | None = None  # Early's namespace, for the first boot
        self.attached = -1  # a namespace whose veth pair is made already: its attach_veth is done
        self.due: list[tuple[str, int, dict[str, Any]]] = []

    def adopt(self, attach: dict[str, Any] | None) -> bool:
        """mctl, as it plans the start: Early's namespace is the first boot's where Early made it
        with these arguments of attach_veth (None: the start needs it not, as a pod's); else it is
        closed, and False returned: the replays do not fit the start, which takes a helper."""
        from machined import netops

        early, self.early = self.early, None
        made = early.result() if early is not None else None
        if made is not None and attach is not None and made[1] == attach \
                and netops.link_exists(attach["outer"]):  # (still there: it goes only with us)
            self.adopted = made
            return True
        if made is not None:
            os.close(made[0])
        return False

    def netns(self) -> int:
        """A new network namespace: Early's, the first time, where it was adopted; else one made here."""
        if self.adopted is not None:
            fd, self.adopted = self.adopted[0], None
            self.attached = fd
            return fd
        from machined import linux

        return linux.new_net_namespace()

    def send(self, op: str, netns: int = -1, **args: Any) -> None:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        self.used = True
        if op == "attach_veth" and netns >= 0 and netns == self.attached:
            self.attached = -1
            self.due.append(("", -1, {}))  # (done: its answer is None)
            return
        self.due.append((op, os.dup(netns) if netns >= 0 else -1, args))

    def receive(self) -> Any:
        """The steps sent, done now, in order: the result of the last; the first error is raised
        once all are done (as a helper's answers)."""
        from machined import netops

        error: Exception | None = None
        result = None
        due, self.due = self.due, []
        for op, netns, args in due:
            self.op = op
            try:
                result = getattr(netops, op)(*((netns,) if netns >= 0 else ()), **args) if op else None
            except Exception as e:  # noqa: BLE001 - raised once all are done
                error = error or e
            finally:
                if netns >= 0:
                    os.close(netns)
        if error is not None:
            raise error
        return result

    def request(self, op: str, netns: int = -1, **args: Any) -> Any:
        self.send(op, netns, **args)
        return self.receive()

    def drain(self) -> None:
        """The steps sent and not done: not done."""
        for _, netns, _ in self.due:
            if netns >= 0:
                os.close(netns)
        self.due = []

    def forget(self) -> None:
        """(mctl, once it forked the supervisor: nothing here is mctl's to end)"""

    def close(self) -> None:
        self.drain()
        self.adopt(None)  # (Early's namespace, where nothing took it: its thread is done first)
        if self.adopted is not None:
            os.close(self.adopted[0])
            self.adopted = None


_agents: list[Agent] = []
_preforked: Agent | Inline | None = None


def _close_all() -> None:
    """At mctl's exit: a helper it made and handed to no supervisor (a start that failed early) goes."""
    for agent in _agents:
        if agent.creator == os.getpid():
            agent.close()


def prefork(name: str, mode: str | None) -> None:
    """Called by mctl first thing when it starts or runs machine name; mode: its --network option.
    Once only: where prefork_early() decided, not again."""
    global _preforked, _decided
    if _decided:
        return
    _decided = True
    mode = mode if mode is not None else _configured_mode(name)
    kind = mode.partition(":")[0]
    if kind in REPLAYED_MODES and replayable(name):
        _preforked = Inline(name, Early(name, mode))
    elif kind in LINK_MODES:
        _preforked = Agent(name, kind)


_decided = False

# For scan(): a verb's flags and options that take a value (as cli declares them), and whether its
# words after the first are a command.
_OPTIONS = {"start": ({"--foreground", "-x", "--ephemeral"}, {"--network", "-p", "--port", "--pod"}, False),
            "run": ({"--read-only"}, {"-D", "--directory"}, True)}


def scan(argv: list[str]) -> tuple[str, str | None] | tuple[()] | None:
    """What prefork() is to be given for mctl's argv (start or run): (name, --network), or
    () for no helper (several machines, or a directory); None where that is not certain without
    mctl's parser (abbreviated or unknown options, say), which then decides (cli._get_ready)."""
    if "--" in argv:
        argv = argv[: argv.index("--")]
    if not argv or argv[0] not in _OPTIONS:
        return None
    flags, valued, command = _OPTIONS[argv[0]]
    words: list[str] = []
    given: dict[str, str] = {}
    rest = iter(argv[1:])
    ended = False  # the words' run ended (argparse takes one run of positional words)
    for arg in rest:
        key, eq, value = arg.partition("=")
        if not arg.startswith("-") or arg == "-":
            if ended:
                return None
            words.append(arg)
            continue
        ended = bool(words)
        if arg in flags:
            given[arg] = ""
        elif key in valued and eq:
            given[key] = value
        elif arg in valued:
            value = next(rest, "-")
            if value.startswith("-"):
                return None  # (argparse's error, in a moment)
            given[arg] = value
        else:
            return None
    if not words or (not command and len(words) > 1) or (command and not words[0]) or "-D" in given \
            or "--directory" in given:
        return ()  # (as cli: a run's name is optional, so an empty one is none)
    return words[0], given.get("--network")


def prefork_early(argv: list[str]) -> None:
    """mctl's first step for a start or run (before it imports its parser, ~2 ms): prefork() now
    where scan() is certain of what it would be given."""
    global _decided
    from machined import paths

    decided = scan(argv) if os.geteuid() == 0 else None
    if decided and not paths.name_error(decided[0]):  # (a bad name: mctl's parser path says so, in one line)
        prefork(*decided)
    elif decided == ():
        _decided = True


def take(machine: str, kind: str) -> Agent | Inline:
    """The helper for machine: the one started first thing, else a new one."""
    global _preforked
    agent, _preforked = _preforked, None
    agent = agent or Agent(machine, kind)
    agent.machine = machine
    return agent


def discard() -> None:
    """The machine needs no links after all (it joins a running pod): no helper."""
    global _preforked
    if _preforked is not None:
        _preforked.close()
        _preforked = None


def replayable(machine: str) -> bool:
    """Whether machine's last start saved its replays (its helper need not import netlink now)."""
    return all(os.path.exists(path) for path in replay_paths(machine))


def replay_paths(machine: str) -> list[str]:
    from machined import paths

    return [paths.replay_path(machine, op) for op in REPLAYED]


def wait_gone(ref: object, timeout: float = 10.0) -> None:
    """Wait until a killed supervisor's helper (a state.proc_ref) has finished its step and ended."""
    import select

    from machined import signals, state

    fd = state.open_process(ref)
    if fd is None:
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            signals.pidfd_send_signal(fd, signals.SIGKILL)
            select.select([fd], [], [], 5.0)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


# --- deciding before the settings are loaded -------------------------------------------------------

def _configured_mode(name: str) -> str:
    """The network mode in machine name's settings file ('bridge' where it has none, the default)."""
    from machined import paths

    if paths.name_error(name):
        return "none"  # mctl refuses it in a moment
    try:
        with open(paths.config_path(name), "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return "bridge"  # an image without settings gets the defaults
    except OSError:
        return "none"
    from machined import plaintoml

    try:
        network = plaintoml.loads(text.decode()).get("network", {})
    except ValueError:  # (not UTF-8, or not TOML)
        return "none"  # loading the settings fails in a moment
    mode = network.get("mode", "bridge") if isinstance(network, dict) else "none"
    return mode if isinstance(mode, str) else "none"


# --- the helper -------------------------------------------------------------------------------------

_MAIN = "import sys; sys.path[:] = sys.argv[3:]; from machined import netagent; netagent.main()"


def main() -> None:
    """The helper's interpreter (Agent): its socket's fd and machine are its arguments."""
    try:
        _serve(int(sys.argv[1]), sys.argv[2], preload=False)
    finally:
        os._exit(0)


def _serve(old: int, machine: str, preload: bool) -> None:
    """The helper's life: shed mctl's descriptors; import netlink if preload (the machine's start
    has no replays: netops), or else read machine's replays; answer until the socket ends."""
    import fcntl
    import gc

    from machined import signals

    # The imports make tens of thousands of objects and no garbage: no collection until they are
    # done, and none ever of them (nor, forked, of mctl's objects: scanning would copy their pages).
    gc.freeze()
    gc.disable()
    if os.getsid(0) != os.getpid():
        os.setsid()  # (forked: a session of our own, as a new interpreter has)

    fd = fcntl.fcntl(old, fcntl.F_DUPFD_CLOEXEC, 3)  # above the standard streams, which may be closed
    os.closerange(3, fd)  # nothing of mctl's: no lock, no pipe of its caller, no other helper's socket
    os.closerange(fd + 1, 1 << 20)
    null = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    os.close(null)
    for sig in (signals.SIGINT, signals.SIGTERM, signals.SIGHUP):
        signals.signal(sig, signals.SIG_IGN)  # the supervisor ends us when it has torn the network down
    with open("/proc/self/comm", "w") as comm:
        comm.write(COMM)
    import _socket  # (not socket: its enums take a few ms more to import)

    conn = _socket.socket(fileno=fd)
    from machined import jsonc, linux, netops  # noqa: F401 - linux: for the replays' setns, now

    try:
        if preload:
            from machined import netlink  # noqa: F401 - now, while mctl gets the machine ready
        else:
            netops.preload(machine)
    except Exception:  # noqa: BLE001 - the step that needs it says why
        pass
    gc.freeze()
    gc.enable()

    while True:
        try:
            data, ancillary, _, _ = conn.recvmsg(65536, _socket.CMSG_SPACE(4))
        except OSError:
            break
        fds = _passed(ancillary)
        if not data:
            for passed in fds:
                os.close(passed)
            break  # the supervisor closed us, or is gone
        reply: dict[str, Any]
        try:
            msg = jsonc.loads(data)
            op = msg.pop("op")
            if op not in OPS:
                raise ValueError(f"unknown operation {op!r}")
            reply = {"result": getattr(netops, op)(*fds, **msg)}
        except MachinedError as e:
            reply = {"error": e.message, "hint": e.hint}
        except Exception as e:  # noqa: BLE001 - the supervisor reports it
            import traceback

            reply = {"exception": repr(e), "traceback": traceback.format_exc()}
        finally:
            for passed in fds:
                os.close(passed)
        try:
            conn.send(jsonc.dumps(reply).encode())
        except OSError:
            break


def _rights(fd: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes fd along with a message (SCM_RIGHTS)."""
    import _socket

    return [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]


def _passed(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fd passed with a message (of one: what its receiver made room for), as _rights() sent it."""
    import _socket

    return [int.from_bytes(data[:4], sys.byteorder) for level, kind, data in ancillary
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS and len(data) >= 4]
