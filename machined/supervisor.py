"""One small supervisor per running machine: it owns the console, reaps init, tells a reboot from a
poweroff and tears everything down when the machine ends.

The supervisor holds the machine's lock for its whole life. Its child (the machine's PID 1) dies
with it (PR_SET_PDEATHSIG), so a supervisor killed with SIGKILL leaves only inert leftovers (an
empty cgroup, a state file) that the next mctl call recognises by the free lock and removes.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import sys
import time

from machined import cgroups, devices, inits, linux, log, mounts, paths, prewarm, resources, signals, spawn, state
from machined.log import MachinedError, die

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket
    from typing import Any

    from machined import systemd
    from machined.config import MachineConfig, Resources
    from machined.devices import Node
    from machined.hotplug import Watcher
    from machined.network import MachineNetwork

LOG_MAX = 1 << 20
DEADLOCK_GRACE = 0.1  # seconds init must stay deadlocked (inits.deadlocked) before it is killed
AFTER_BOOT_DELAY = 0.1  # seconds from a boot's report of ready to its network's after_boot()


class Poller:
    """Readable-fd dispatch over epoll: what the supervisor's loop waits on, each with a tag.

    (The selectors module would do, but costs a millisecond of start-up to import.)
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.tags: dict[int, str] = {}

    def register(self, fileobj: int | socket, tag: str) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self.epoll.register(fd, select.EPOLLIN)
        self.tags[fd] = tag

    def unregister(self, fileobj: int | socket) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if self.tags.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def select(self, timeout: float | None) -> list[str]:
        try:
            events = self.epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return []
        return [self.tags[fd] for fd, _ in events if fd in self.tags]


class Plan:
    """Everything needed to run a machine, from a config file or from `run --directory`."""

    def __init__(self, *, name: str, rootfs: str, machine_id: str, argv: list[str], boot: bool,
                 init_kind: str, read_only: bool = False, rules: tuple[devices.Rule, ...] = devices.DEFAULT,
                 kill_timeout: float = 30.0, config: MachineConfig | None = None, nodes: tuple[Node, ...] = (),
                 limits: Resources | None = None, hotplug: tuple[str, ...] = (),
                 overlay: mounts.Overlay | None = None, ephemeral: str = "",
                 network: MachineNetwork | None = None) -> None:
        self.name = name
        self.rootfs = rootfs
        self.machine_id = machine_id
        self.argv = argv
        self.boot = boot
        self.init_kind = init_kind
        self.read_only = read_only
        self.rules = rules
        self.kill_timeout = kill_timeout
        self.config = config
        self.nodes = nodes          # device nodes from the settings, made in /dev at every boot
        self.limits = limits
        self.hotplug = hotplug      # hotplug rules
        self.overlay = overlay          # the root is an overlay (overlay image or ephemeral run)
        self.ephemeral = ephemeral      # the throw-away layer of an ephemeral run, removed at teardown
        self.network = network

    def all_rules(self) -> tuple[devices.Rule, ...]:
        """The device allowlist: the rules, and the nodes from the settings."""
        return self.rules + tuple(node.rule() for node in self.nodes)


def plan_from_config(cfg: MachineConfig, argv: list[str] | None = None, ephemeral: bool = False) -> Plan:
    rootfs = paths.image_path(cfg.name)
    if not os.path.isdir(rootfs):
        die(f"Failed to start {cfg.name}: root file system {rootfs} is missing")
    boot = argv is None
    init_argv = [cfg.init] if boot else list(argv or [])

    def check() -> tuple[str, tuple[devices.Rule, ...], tuple[Node, ...]]:
        mounts.preflight(rootfs)
        if boot:
            mounts.check_init(rootfs, cfg.init)
        kind = inits.detect(rootfs, cfg.init) if boot else "command"
        if not cfg.devices.allow:
            return kind, devices.DEFAULT, ()
        from machined import passthrough

        return (kind, *passthrough.plan(cfg, rootfs))  # the guest's groups are read from the rootfs

    overlay, layer = None, ""
    if cfg.base or ephemeral:  # overlay image or throw-away run: checked on the merged tree
        from machined import images

        overlay, layer = images.runtime_overlay(cfg, ephemeral)
        init_kind, rules, nodes = images.in_merged_view(cfg, check)
    else:
        init_kind, rules, nodes = check()
    net = None
    if cfg.network.mode != "none" or cfg.network.pod:
        from machined import network  # only for machines with a network (its netlink work: netagent)

        net = network.MachineNetwork(cfg, rootfs)
        net.check()
    from machined import config

    limits = cfg.resources if cfg.resources != config.Resources() else None
    if cfg.bind:
        from machined import binds

        binds.check(cfg.name, [binds.parse(b) for b in cfg.bind])
    return Plan(name=cfg.name, rootfs=rootfs, machine_id=cfg.id, argv=init_argv, boot=boot,
                init_kind=init_kind, read_only=cfg.read_only, rules=rules, kill_timeout=cfg.kill_timeout,
                config=cfg, nodes=nodes, limits=limits, hotplug=cfg.devices.hotplug, overlay=overlay,
                ephemeral=layer, network=net)


class Supervisor:
    def __init__(self, plan: Plan, lock: state.Lock, *, ready_fd: int | None = None, attach: bool = False,
                 unit: systemd.Delegation | None = None) -> None:
        self.plan = plan
        self.lock = lock
        self.ready_fd = ready_fd
        self.attach = attach            # foreground: console relayed to our own stdio (run on a tty)
        self.rundir = paths.machine_runtime_dir(plan.name)
        self.cgroup: cgroups.MachineCgroup | None = None
        self.unit = unit  # on a systemd host: the machine's scope and registration
        self.net: MachineNetwork | None = None
        self.child: spawn.Child | None = None
        self.master = -1
        self.slave = -1
        self.log_fd = -1
        self.listener: socket | None = None
        self.client: socket | None = None
        self.sel = Poller()
        self.wake_r = self.wake_w = -1
        self.pending_signals: list[int] = []
        self.stopping = False
        self.kill_deadline: float | None = None
        self.after_boot_at: float | None = None
        self.asking: int | None = None  # a signal for init that it does not take yet
        self.watch_deadlock = False  # a stopping init that may deadlock (inits.SOLITARY)
        self.deadlocked_since: float | None = None  # when it was first seen deadlocked
        self.boots = 0
        self.data: dict[str, object] = {"name": plan.name}
        self.saved_tty: list[Any] | None = None
        self.console_tail = b""
        self.final_words = False
        self.console_path = ""
        self.hotplug: Watcher | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        code = 1
        error = ""
        try:
            self._prepare()
            while True:
                self.child = spawn.spawn(self._spec())
                prewarm.done()  # the machine is in its cgroup: no more keeping warm
                self.boots += 1
                if self.unit is not None:
                    self.unit.register(self.child.pid, self.data.get("interfaces"))
                self._write_state()
                self._report_ready()
                # The network's steps once the machine runs: a moment later, when mctl has returned,
                # not on the way of its exit (they take a few ms of CPU, and the machine boots meanwhile).
                self.after_boot_at = time.monotonic() + AFTER_BOOT_DELAY if self.net is not None else None
                if not gc.isenabled():  # (mctl's start-up path runs without collections)
                    gc.freeze()  # what start-up made lives as long as we do: never to be scanned
                    gc.enable()
                status = self._loop()
                self.child.close()
                if self.net is not None:
                    self.net.end_boot()
                self._log(f"\r\n[machined: init ended: {_describe(status)}]\r\n".encode())
                if self._is_reboot(status) and not self.stopping:
                    self._log(f"\r\n[machined: {self.plan.name} reboots]\r\n".encode())
                    continue
                # A booted machine that powered off or halted (reboot(2): SIGINT; or killed once
                # its init said its final words) ended well: for a service unit, that is success.
                code = 0 if self.plan.boot and (self.final_words or _signalled(status, signals.SIGINT)) \
                    else _exit_code(status)
                break
        except MachinedError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - never die without tearing down and saying why
            import traceback

            self._log(traceback.format_exc().replace("\n", "\r\n").encode())
            error = f"Failed to run {self.plan.name}: {e!r}"
            if log.DEBUG:  # mctl --debug: the traceback travels with the error to the user
                error = traceback.format_exc() + error
        finally:
            if error:
                self._log(f"\r\n[machined: {error}]\r\n".encode())
            self._teardown()
        if error:
            self._report_error(error)  # once torn down: a start that failed has left nothing when mctl says so
        return code

    def _prepare(self) -> None:
        os.makedirs(self.rundir, mode=0o755, exist_ok=True)
        inaccessible = os.path.join(self.rundir, "inaccessible")
        os.close(os.open(inaccessible, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o000))
        self.data.update({
            "name": self.plan.name, "id": self.plan.machine_id, "class": "container", "service": "machined",
            "rootfs": self.plan.rootfs, "init": self.plan.init_kind, "argv": self.plan.argv, "boot": self.plan.boot,
            "supervisor": state.proc_ref(os.getpid()), "started": time.time(), "state": "starting",
        })
        if self.plan.ephemeral:
            self.data["ephemeral"] = self.plan.ephemeral  # recorded before the first boot makes it
        if self.unit is not None:  # its device policy and limits are the scope's properties
            helper = self.plan.network.agent if self.plan.network is not None else None
            self.cgroup = self.unit.create(self.data, (helper.pid,) if helper is not None and helper.pid else ())
            self.data["cgroup"] = self.cgroup.to_state()
        elif self.plan.hotplug:  # its watcher brings the cgroup in line before the first boot
            self._make_cgroup()
        else:  # spawn has _make_cgroup make it once the child runs (see spawn)
            self.data["cgroup"] = cgroups.planned(self.plan.name).to_state()
        if self.plan.network is not None:
            self.net = self.plan.network
            self.net.begin(self.data)
        state.write(self.plan.name, self.data)  # from here on a crash leaves a record to clean up
        if self.net is not None:
            self.net.ask_first_boot()
        if self.plan.limits is not None:
            resources.record(self.plan.name, self.plan.limits)
        if self.plan.rules != devices.DEFAULT or self.plan.nodes:
            from machined import passthrough

            passthrough.record(self.plan.name, self.plan.rules, self.plan.nodes)
        if self.net is not None:
            self.net.prepare()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signals.set_wakeup_fd(self.wake_w)
        for sig in (signals.SIGTERM, signals.SIGINT, signals.SIGHUP):
            signals.signal(sig, self._on_signal)
        signals.signal(signals.SIGPIPE, signals.SIG_IGN)
        self.sel.register(self.wake_r, "signal")
        if self.plan.boot or self.attach:
            self.master, self.slave = os.openpty()
            self.console_path = os.ttyname(self.slave)
            os.set_blocking(self.master, False)
            os.set_inheritable(self.master, False)
            os.set_inheritable(self.slave, False)
            self.sel.register(self.master, "console")
        if self.plan.boot:
            log = paths.log_path(self.plan.name)
            os.makedirs(os.path.dirname(log), mode=0o755, exist_ok=True)
            self.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640)
            self.data["log"] = log
        if self.attach:
            from machined import terminal

            terminal.set_winsize(self.master, terminal.winsize(0))
            import termios
            import tty

            self.saved_tty = termios.tcgetattr(0)
            tty.setraw(0)
            self.sel.register(0, "stdin")
        if self.plan.hotplug:
            self._watch_hotplug()

    def _make_cgroup(self) -> cgroups.MachineCgroup:
        self.cgroup = cgroups.create(self.plan.name, self.plan.all_rules(), limits=self.plan.limits)
        self.data["cgroup"] = self.cgroup.to_state()
        return self.cgroup

    def _watch_hotplug(self) -> None:
        from machined import hotplug

        try:
            self.hotplug = hotplug.Watcher(self.plan.name, hotplug.parse(self.plan.hotplug), self.data)
            done = self.hotplug.present()
        except (OSError, ValueError) as e:
            die(f"Failed to watch devices for {self.plan.name}: {e}")
        for msg in done:
            self._log(f"[machined: {msg}]\r\n".encode())
        self.sel.register(self.hotplug.fileno(), "uevent")

    def _on_uevent(self) -> None:
        assert self.hotplug is not None
        pidfd = self.child.pidfd if self.child is not None and self.child.pidfd >= 0 else None
        for msg in self.hotplug.handle(pidfd):
            self._log(f"\r\n[machined: {msg}]\r\n".encode())

    def _spec(self) -> spawn.Spec:
        if self.slave >= 0 and self.boots:
            # The guest's shutdown hung up the console (vhangup): hold a fresh end for the next boot.
            os.close(self.slave)
            self.slave = os.open(self.console_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        console = self.console_path if self.slave >= 0 else None
        cfg = self.plan.config
        spec = spawn.Spec(
            name=self.plan.name, rootfs=self.plan.rootfs, machine_id=self.plan.machine_id, argv=self.plan.argv,
            boot=self.plan.boot, cgroup=self.cgroup, inaccessible=os.path.join(self.rundir, "inaccessible"),
            machine_id_file=os.path.join(self.rundir, "machine-id"), read_only=self.plan.read_only,
            console=console, bind_machine_id=self.plan.init_kind != "systemd", overlay=self.plan.overlay,
            nesting=bool(cfg and cfg.nesting),
        )
        if cfg and cfg.bind:
            from machined import binds  # imported here, in the parent: the child may not import

            parsed = [binds.parse(b) for b in cfg.bind]
            spec.in_child.append(lambda root_fd: binds.mount_all(root_fd, parsed))
        if os.path.exists(os.path.join(self.rundir, "devices.json")):
            from machined import passthrough

            hook = passthrough.node_hook(self.plan.name)  # settings, bind-device and hotplug, at every boot
            if hook is not None:
                spec.in_child.append(hook)
        if self.cgroup is None:
            spec.make_cgroup = self._make_cgroup
        if self.net is not None:  # last: once it asked for links, spawn takes the answer whatever happens
            spec.in_child.append(self.net.in_child)
            spec.join = self.net.boot_namespaces()
            spec.meanwhile += self.net.meanwhile()
            spec.answers.append(self.net.answer)
        return spec

    def _write_state(self) -> None:
        assert self.child is not None
        self.data["leader"] = state.proc_ref(self.child.pid)
        self.data["state"] = "running"
        self.data["boots"] = self.boots
        if self.plan.boot and self.listener is None:
            self._listen()
        state.write(self.plan.name, self.data)

    def _report_ready(self) -> None:
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"OK")
            os.close(self.ready_fd)
            self.ready_fd = None
        notify = os.environ.get("NOTIFY_SOCKET")
        if notify and self.boots == 1:
            sd_notify(notify, f"READY=1\nMAINPID={os.getpid()}\nSTATUS=Machine {self.plan.name} running")

    def _report_error(self, message: str) -> None:
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"ER" + message.encode())
            except OSError:
                pass  # mctl is gone (killed while it waited)
            os.close(self.ready_fd)
            self.ready_fd = None
        else:
            print(f"mctl: {message}", file=sys.stderr)

    def _is_reboot(self, status: int) -> bool:
        # reboot(2) by a pid namespace's init ends it with SIGHUP (restart) or SIGINT (power off, halt).
        return self.plan.boot and _signalled(status, signals.SIGHUP)

    # --- event loop --------------------------------------------------------------------------

    def _loop(self) -> int:
        assert self.child is not None
        self.sel.register(self.child.pidfd, "child")
        try:
            while True:
                timeout = None
                if self.kill_deadline is not None:
                    timeout = max(0.0, self.kill_deadline - time.monotonic())
                if self.after_boot_at is not None:
                    due = max(0.0, self.after_boot_at - time.monotonic())
                    timeout = min(due, timeout) if timeout is not None else due
                if self.asking is not None or self.watch_deadlock:
                    timeout = min(timeout if timeout is not None else 0.01, 0.01)
                for what in self.sel.select(timeout):
                    if what == "child":
                        pid, status = os.waitpid(self.child.pid, os.WNOHANG)
                        if pid:
                            self._drain_console()
                            return status
                    elif what == "console":
                        self._on_console_output()
                    elif what == "signal":
                        self._on_wakeup()
                    elif what == "listener":
                        self._accept()
                    elif what == "client":
                        self._on_client_input()
                    elif what == "stdin":
                        self._on_stdin()
                    elif what == "uevent":
                        self._on_uevent()
                if self.asking is not None:
                    self._ask_init(self.asking)
                if self.watch_deadlock:
                    self._check_deadlock()
                if self.after_boot_at is not None and time.monotonic() >= self.after_boot_at:
                    self._after_boot()
                if self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
                    self._log(b"\r\n[machined: timeout, killing the machine]\r\n")
                    self._signal_leader(signals.SIGKILL)
                    self.kill_deadline = None
        finally:
            self.sel.unregister(self.child.pidfd)

    def _after_boot(self) -> None:
        self.after_boot_at = None
        if self.net is not None and not self.stopping and (why := self.net.after_boot()):
            self._log(f"\r\n[machined: {why}]\r\n".encode())

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending_signals.append(signum)

    def _on_wakeup(self) -> None:
        try:
            os.read(self.wake_r, 512)
        except BlockingIOError:
            pass
        sigs, self.pending_signals = self.pending_signals, []
        for sig in sigs:
            if self.stopping:
                self._signal_leader(signals.SIGKILL)  # asked twice: no more waiting
                continue
            self.stopping = True
            self.data["state"] = "stopping"
            state.write(self.plan.name, self.data)
            resources.thaw_for_stop(self.data)
            if self.plan.boot:
                self.watch_deadlock = self.plan.init_kind in inits.SOLITARY
                self._ask_init(inits.poweroff_signal(self.plan.init_kind))
            else:
                self._signal_leader(sig)
            self.kill_deadline = time.monotonic() + self.plan.kill_timeout

    def _ask_init(self, sig: int) -> None:
        """Send init its poweroff signal once it takes it: an init still setting up would drop it
        (inits.listens), and the machine would wait for the kill timeout instead."""
        self.asking = None
        if self.child is not None and not inits.listens(self.child.pid, sig):
            self.asking = sig  # tried again from _loop
            return
        self._signal_leader(sig)

    def _check_deadlock(self) -> None:
        """A stopping init stuck for good (inits.deadlocked) is killed now, not at the kill timeout."""
        assert self.child is not None
        if not inits.deadlocked(self.child.pid):
            self.deadlocked_since = None
            return
        now = time.monotonic()
        if self.deadlocked_since is None:
            self.deadlocked_since = now
        elif now - self.deadlocked_since >= DEADLOCK_GRACE:
            self._log(b"\r\n[machined: init is deadlocked, killing the machine]\r\n")
            self._signal_leader(signals.SIGKILL)
            self.watch_deadlock = False

    def _signal_leader(self, sig: int) -> None:
        if self.child is not None and self.child.pidfd >= 0:
            try:
                linux.pidfd_send_signal(self.child.pidfd, sig)
            except OSError:
                pass

    def _on_console_output(self) -> bool:
        try:
            data = os.read(self.master, 65536)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EAGAIN):
                return False
            raise
        if not data:
            return False
        self._log(data)
        if self.client is not None:
            try:
                self.client.sendall(data)
            except OSError:
                self._drop_client()
        if self.attach:
            _write_all(1, data)
        if self.stopping:
            self._watch_final_words(data)
        return True

    def _watch_final_words(self, data: bytes) -> None:
        words = inits.FINAL_WORDS.get(self.plan.init_kind)
        if not words:
            return
        self.console_tail = (self.console_tail + data)[-512:]
        if any(w in self.console_tail for w in words):
            self.final_words = True
            self._signal_leader(signals.SIGKILL)

    def _drain_console(self) -> None:
        """Whatever init wrote just before it ended is still in the pty: keep it."""
        if self.master >= 0:
            for _ in range(64):
                if not self._on_console_output():
                    return

    def _log(self, data: bytes) -> None:
        if self.log_fd < 0:
            return
        try:
            if os.fstat(self.log_fd).st_size > LOG_MAX:
                log = str(self.data.get("log"))
                os.replace(log, log + ".1")
                os.close(self.log_fd)
                self.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            os.write(self.log_fd, data)
        except OSError:
            pass

    def _on_stdin(self) -> None:
        data = os.read(0, 65536)
        if not data:
            self.sel.unregister(0)
            return
        _write_all(self.master, data)

    # --- console socket ----------------------------------------------------------------------

    def _listen(self) -> None:
        import _socket  # (the socket module imports enum and makes four enums: ~9 ms of a start)

        path = os.path.join(self.rundir, "console.sock")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.sel.register(self.listener, "listener")
        self.data["console"] = path

    def _accept(self) -> None:
        assert self.listener is not None
        import _socket

        try:
            fd, _ = self.listener._accept()  # type: ignore[attr-defined]  # (what socket.accept calls)
        except BlockingIOError:
            return
        conn = _socket.socket(fileno=fd)
        if self.client is not None:
            try:
                self.client.sendall(b"\r\n[machined: another console attached; detaching]\r\n")
            except OSError:
                pass
            self._drop_client()
        conn.setblocking(True)
        conn.settimeout(2.0)
        self.client = conn
        self.sel.register(conn, "client")

    def _on_client_input(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        # A window size update travels in-band: ESC ] machined-winsize;ROWS;COLS BEL, never from a guest.
        if data.startswith(b"\x1b]machined-winsize;"):
            end = data.find(b"\x07")
            if end > 0:
                try:
                    rows, cols = (int(x) for x in data[19:end].split(b";"))
                    from machined import terminal

                    terminal.set_winsize(self.master, terminal.pack_winsize(rows, cols))
                except ValueError:
                    pass
                data = data[end + 1:]
        if data:
            _write_all(self.master, data)

    def _drop_client(self) -> None:
        if self.client is not None:
            try:
                self.sel.unregister(self.client)
            except (KeyError, ValueError):
                pass
            self.client.close()
            self.client = None

    # --- teardown ----------------------------------------------------------------------------

    def _teardown(self) -> None:
        if self.child is not None and self.child.pidfd >= 0:
            resources.thaw_for_stop(self.data)
            self._signal_leader(signals.SIGKILL)
            try:
                os.waitpid(self.child.pid, 0)
            except ChildProcessError:
                pass
            self.child.close()
        if self.net is not None:
            self.net.end_boot()
        if self.saved_tty is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, self.saved_tty)
        self._drop_client()
        if self.listener is not None:
            self.listener.close()
        if self.plan.network is not None:
            self.plan.network.close(self.data)  # through its helper, which then ends
        if self.unit is not None:
            self.unit.close(self.data)
        state.teardown(self.data)
        state.remove_runtime_dir(self.plan.name)
        for fd in (self.master, self.slave, self.log_fd, self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        if self.wake_w >= 0:
            signals.set_wakeup_fd(-1)
        self.lock.release()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except OSError:
            return
        data = data[n:]


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signals.name(os.WTERMSIG(status))}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _signalled(status: int, sig: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def sd_notify(address: str, message: str) -> None:
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        s.sendall(message.encode())


# --- what mctl calls ---------------------------------------------------------------------------

def acquire(name: str) -> state.Lock:
    """The machine's lock for starting it; a clear error when it runs or is busy."""
    lock = state.try_lock(name)
    if lock is None:
        if state.running(name) is not None:
            die(f"Failed to start {name}: machine is already running")
        die(f"Failed to start {name}: machine is busy (being started, stopped or changed)")
    if state.read(name) is not None:
        state.cleanup_stale(name)  # left by a supervisor that was killed
    return lock


def start_detached(plan: Plan, lock: state.Lock) -> None:
    """Fork the supervisor into its own session; return once the machine's init runs."""
    unit = delegate(plan)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setsid()
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            linux.set_process_name("machined-sup")
            code = Supervisor(plan, lock, ready_fd=w, unit=unit).run()
        finally:
            os._exit(code)
    os.close(w)
    lock.forget()
    if unit is not None:
        unit.forget()
    if plan.network is not None:
        plan.network.forget()
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    msg = b"".join(chunks)
    if msg.startswith(b"OK"):
        return
    if msg.startswith(b"ER"):
        die(msg[2:].decode(errors="replace"))
    die(f"Failed to start {plan.name}: the supervisor exited without a word")


def run_foreground(plan: Plan, lock: state.Lock) -> int:
    """Run the machine in this process (run verb, or start --foreground under systemd)."""
    # On a terminal the payload gets a pty of its own, relayed; otherwise our stdio as it is.
    attach = not plan.boot and os.isatty(0)
    return Supervisor(plan, lock, attach=attach, unit=delegate(plan)).run()


def delegate(plan: Plan) -> systemd.Delegation | None:
    """On a systemd host, the machine's scope: asked for now, so it is made while we go on."""
    from machined import systemd

    return systemd.Delegation(plan) if systemd.available() else None


def kill_leftovers(data: dict[str, object]) -> None:
    """SIGKILL the machine's init and anything still in its cgroup (teardown step)."""
    resources.thaw_for_stop(data)
    fd = state.open_process(data.get("leader"))
    if fd is not None:
        try:
            linux.pidfd_send_signal(fd, signals.SIGKILL)
        except OSError:
            pass
        os.close(fd)
    cg = data.get("cgroup")
    if not isinstance(cg, dict):
        return
    cgroup = cgroups.MachineCgroup.from_state(cg)
    scope = os.path.basename(cgroup.main_dir())
    for _ in range(50):
        pids = cgroup.pids()
        if not pids:
            return
        for pid in pids:
            try:
                pfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    if f"/{scope}/" in f.read():  # still ours now that the pidfd pins it
                        linux.pidfd_send_signal(pfd, signals.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pfd)
        time.sleep(0.02)
