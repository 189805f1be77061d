"""Fork a machine's PID 1 into new namespaces, set up its root, exec its init or payload.

The parent unshares only its pid namespace for children, forks, and goes straight back to its own
(so it can keep forking helpers on the host). The child is PID 1 of the new pid namespace; it
unshares mount, UTS, IPC and network namespaces (or joins those it is given: a pod's, or a network
namespace whose links a helper is making meanwhile) and builds its root while the parent makes the
machine's cgroup if it is not there yet and moves the child into it. Then the child unshares its
cgroup namespace, mounts /sys and changes root, and execs once the parent has done its steps
meanwhile (a first boot's address lease) and taken the answers it waits for (the helper's). A pipe
reports either an error message or, by closing on exec, success: the parent returns once the
guest's init really runs.

The cgroup comes after the fork because the first cgroup move of a start waits for an RCU grace
period (see prewarm), and every cgroup operation with it: the child's mounts are done meanwhile.
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios

from machined import cgroups, linux, mounts, security, signals
from machined.log import MachinedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from machined.cgroups import MachineCgroup

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Spec:
    """What to run and how; plain attributes so the one-shot path needs no dataclasses import."""

    def __init__(self, *, name: str, rootfs: str, machine_id: str, argv: list[str], boot: bool,
                 cgroup: MachineCgroup | None, inaccessible: str, machine_id_file: str,
                 read_only: bool = False, console: str | None = None, stdio: tuple[int, int, int] = (0, 1, 2),
                 ctty: bool = False, env: dict[str, str] | None = None, workdir: str = "/",
                 bind_machine_id: bool = True, overlay: mounts.Overlay | None = None,
                 nesting: bool = False) -> None:
        self.name = name
        self.rootfs = rootfs
        self.machine_id = machine_id
        self.argv = argv
        self.boot = boot
        self.cgroup = cgroup
        self.inaccessible = inaccessible
        self.machine_id_file = machine_id_file
        self.read_only = read_only
        self.console = console          # host pty slave to become /dev/console and init's stdio
        self.stdio = stdio              # used when there is no console
        self.ctty = ctty                # make stdio[0] the controlling terminal
        self.env = env or {}
        self.workdir = workdir
        # systemd sets up an empty /etc/machine-id itself from container_uuid (and commits it);
        # for other inits we cover an empty one with the machine's id for the boot.
        self.bind_machine_id = bind_machine_id
        self.overlay = overlay          # an overlayfs root (overlay image, ephemeral run) instead of a bind mount
        self.nesting = nesting          # cgroup controllers writable: the guest may manage containers itself
        # Steps of the parent's while the child goes on to its root (after the cgroup step, before
        # the answers): the first boot's address lease and hosts files. The child execs only after them.
        self.meanwhile: list[Callable[[], None]] = []
        # The answers to requests made before the fork (a helper making the links of a network
        # namespace in join): taken in the parent after the cgroup step (also when that or a step
        # meanwhile failed, so that none is left unread), given the child's host pid; the child
        # execs only after them.
        self.answers: list[Callable[[int], object]] = []
        # Extra steps in the child, before pivot_root, given the rootfs O_PATH fd.
        self.in_child: list[Callable[[int], None]] = []
        # Namespaces to join instead of making new ones (a pod's, or a network namespace made for
        # the machine beforehand): (fd, CLONE_NEW* type).
        self.join: list[tuple[int, int]] = []
        # Makes the machine's cgroup in the parent while the child builds its root (then cgroup).
        self.make_cgroup: Callable[[], MachineCgroup] | None = None

    def waits(self) -> bool:
        """Whether the child waits for the parent's word before its cgroup namespace (see _go)."""
        return self.holds_exec() or self.cgroup is not None or self.make_cgroup is not None

    def holds_exec(self) -> bool:
        """Whether the child waits for the parent's word before its exec (see _go)."""
        return bool(self.answers or self.meanwhile)


def machine_env(spec: Spec) -> dict[str, str]:
    mid = spec.machine_id
    env = {
        "PATH": DEFAULT_PATH,
        "container": "machined",
        "container_uuid": f"{mid[:8]}-{mid[8:12]}-{mid[12:16]}-{mid[16:20]}-{mid[20:]}",
        "HOME": "/root" if spec.boot else "/",
        "TERM": "vt220" if spec.boot else os.environ.get("TERM", "vt220"),
    }
    if not spec.boot:
        env["LANG"] = os.environ.get("LANG", "C.UTF-8")
    env.update(spec.env)
    return env


class Child:
    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def spawn(spec: Spec) -> Child:
    """Start the machine's PID 1; returns after it exec'd, raises MachinedError with its reason if not."""
    opened: list[int] = []
    try:
        status_r, status_w = os.pipe()   # child -> parent: b"E<msg>" error, EOF exec'd
        opened += (status_r, status_w)
        go_r, go_w = os.pipe()           # parent -> child: b"C" in the cgroup, b"G" answers taken (see _go)
        opened += (go_r, go_w)
        layout = spec.cgroup.layout if spec.cgroup is not None else cgroups.layout()  # (made, or to be made)
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.unshare(linux.CLONE_NEWPID)
            try:
                pid = os.fork()
            except BaseException:
                linux.setns(own_pidns, linux.CLONE_NEWPID)
                raise
            if pid == 0:
                os.close(status_r)
                os.close(go_w)
                _child_main(spec, layout, status_w, go_r)
            # Back to our own pid namespace for any later child (helpers, the next boot).
            linux.setns(own_pidns, linux.CLONE_NEWPID)
        finally:
            os.close(own_pidns)
        for fd in (status_w, go_r):
            opened.remove(fd)
            os.close(fd)
        child = Child(pid, os.pidfd_open(pid))
    except BaseException:
        _take_answers(spec.answers, 0)
        for fd in opened:  # (a child forked already gives up at its wait)
            os.close(fd)
        raise
    try:
        _go(spec, pid, status_r, go_w)
        _raise_for(_read_msg(status_r))
    except BaseException:
        _kill_and_reap(child)
        raise
    finally:
        os.close(status_r)
    return child


def _go(spec: Spec, pid: int, status_r: int, go_w: int) -> None:
    """The parent's part before the child's exec (closes go_w): the cgroup is made and the child
    moved in, b"C" lets the child go on to its cgroup namespace and pivot_root, the steps meanwhile
    are done and the answers taken, b"G" lets it exec."""
    answers = list(spec.answers)  # still to take
    try:
        if spec.make_cgroup is not None:
            spec.cgroup = spec.make_cgroup()
        if spec.cgroup is not None:
            spec.cgroup.join_payload(pid)
        if spec.waits():
            _tell(go_w, b"C")
        for step in spec.meanwhile:
            step()
        while answers:
            answers.pop(0)(pid)
    except BaseException:
        _take_answers(answers, pid)  # (a helper's answer is taken before anything else is asked of it)
        os.close(go_w)  # the child gives up at its wait, if it got that far
        said = _read_msg(status_r)
        if said[:1] == b"E":  # it failed first, which may be why we did
            raise MachinedError(said[1:].decode(errors="replace")) from None
        raise
    try:
        if spec.holds_exec():
            _tell(go_w, b"G")
    finally:
        os.close(go_w)


def _take_answers(answers: list[Callable[[int], object]], pid: int) -> None:
    """After a failure: the answers still due, each taken, their errors dropped (the first is reported)."""
    for answer in answers:
        try:
            answer(pid)
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass


def _tell(go_w: int, what: bytes) -> None:
    try:
        os.write(go_w, what)
    except BrokenPipeError:
        pass  # the child failed meanwhile: its message follows


def _raise_for(msg: bytes) -> None:
    if msg:
        raise MachinedError(msg[1:].decode(errors="replace") if msg[:1] == b"E" else f"protocol error {msg!r}")


def _read_msg(fd: int) -> bytes:
    chunks = []
    while b := os.read(fd, 4096):
        chunks.append(b)
    return b"".join(chunks)


def _kill_and_reap(child: Child) -> None:
    try:
        linux.pidfd_send_signal(child.pidfd, signals.SIGKILL)
    except OSError:
        pass
    try:
        os.waitpid(child.pid, 0)
    except ChildProcessError:
        pass
    child.close()


def _child_main(spec: Spec, layout: str, status_w: int, go_r: int) -> None:
    """PID 1 of the new namespace until exec. Never returns."""
    step = "set up the machine"
    try:
        seal_imports()
        step = "set parent death signal"
        linux.set_pdeathsig(signals.SIGKILL)
        # init starts with every signal at its default and none blocked (Python ignores SIGXFSZ)
        for sig in (signals.SIGTERM, signals.SIGINT, signals.SIGHUP, signals.SIGCHLD, signals.SIGPIPE, signals.SIGXFSZ):
            signals.signal(sig, signals.SIG_DFL)
        signals.pthread_sigmask(signals.SIG_SETMASK, ())
        step = "create namespaces"
        flags = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWNET
        for fd, nstype in spec.join:
            step = "join the pod's namespaces"
            linux.setns(fd, nstype)
            flags &= ~nstype
        linux.unshare(flags)
        if flags & linux.CLONE_NEWUTS:  # a joined UTS namespace keeps its (the pod's) name
            step = "set hostname"
            linux.sethostname(spec.name)
        step = "bring up loopback"
        linux.loopback_up()
        step = f"mount root file system {spec.rootfs}"
        root_fd = mounts.prepare_root(spec.rootfs, spec.read_only, spec.overlay)
        step = "mount /proc"
        mounts.setup_proc(root_fd, spec.inaccessible, private_network=True)
        step = "set up /dev"
        mounts.setup_dev(root_fd, spec.console)
        step = "mount /run"
        mounts.setup_tmpfs(root_fd, "run", "755")
        step = "mount /tmp"
        mounts.setup_tmpfs(root_fd, "tmp", "1777")
        if spec.bind_machine_id:
            step = "set up /etc/machine-id"
            mounts.setup_machine_id(root_fd, spec.machine_id, spec.machine_id_file)
        for hook in spec.in_child:
            hook(root_fd)
        if spec.waits() and os.read(go_r, 1) != b"C":
            os._exit(1)  # the cgroup failed: the parent reports that
        step = "create cgroup namespace"  # rooted in the machine's cgroup, where the parent put us
        linux.unshare(linux.CLONE_NEWCGROUP)
        step = "mount /sys"
        mounts.setup_sys(root_fd, layout, spec.nesting)
        os.close(root_fd)
        step = "change root"
        mounts.enter_root(spec.rootfs)
        step = "drop capabilities"
        security.drop_capabilities(("NET_ADMIN",))
        if spec.holds_exec() and os.read(go_r, 1) != b"G":
            os._exit(1)  # what the parent waited for failed: it reports that
        os.close(go_r)
        step = "set up the terminal"
        os.setsid()
        if spec.console:
            fd = os.open("/dev/console", os.O_RDWR)
            stdio = (fd, fd, fd)
            ctty = True
        else:
            stdio, ctty = spec.stdio, spec.ctty
        for target, fd in enumerate(stdio):
            if fd != target:
                os.dup2(fd, target, inheritable=True)
            else:
                os.set_inheritable(fd, True)
        if ctty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # Nothing of ours may leak into the machine; status_w closes itself on exec.
        os.closerange(3, status_w)
        os.closerange(status_w + 1, 1 << 20)
        step = f"change directory to {spec.workdir}"
        os.chdir(spec.workdir)
        step = f"execute {spec.argv[0]}"
        os.execvpe(spec.argv[0], spec.argv, machine_env(spec))
    except BaseException as e:  # noqa: BLE001 - report anything to the parent, then die
        if isinstance(e, MachinedError):
            text = str(e)
        elif isinstance(e, OSError):
            text = f"Failed to {step}: {e.strerror or e}"
        else:
            text = f"Failed to {step}: {e!r}"
        try:
            os.write(status_w, b"E" + text.encode())
        finally:
            os._exit(127)
    os._exit(127)


def seal_imports() -> None:
    """After this, an import cannot load code from disk. Called in children that are about to see a
    machine's file system as '/': a module imported there would come from the guest and run with
    our privileges. Everything they need is imported at the top of the modules they use."""
    import warnings  # noqa: F401 - what os.execvpe imports to search PATH (os.get_exec_path)

    sys.path[:] = []
    sys.path_importer_cache.clear()
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") in ("BuiltinImporter", "FrozenImporter")]

