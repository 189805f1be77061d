"""spawn's hand-over with the parent: the answers it waits for (a helper making a machine's links)
are taken while the child builds its root and after the cgroup step, the child execs only once
they are in, and a failure on either side is reported once, with the child's own reason where the
child failed first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from machined import cgroups, spawn
from machined.log import MachinedError
from tests.conftest import Env
from tests.test_teardown import _wait as wait

pytestmark = pytest.mark.root


def _spec(env: Env, rootfs: Path, tmp_path: Path, argv: list[str]) -> spawn.Spec:
    inaccessible = tmp_path / "inaccessible"
    inaccessible.touch(mode=0o000)
    return spawn.Spec(name="spawntest", rootfs=str(rootfs), machine_id="0" * 32, argv=argv, boot=False,
                      cgroup=None, inaccessible=str(inaccessible), machine_id_file=str(tmp_path / "machine-id"),
                      bind_machine_id=False)


def _exited(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _rootfs(env: Env) -> Path:
    name = env.name()
    env.ok("create", name, "--template", "busybox", "--network", "none")
    return env.images / name


def test_answers_overlap_with_the_root_and_come_before_exec(env: Env, tmp_path: Path) -> None:
    rootfs = _rootfs(env)
    marker = tmp_path / "root-built"
    seen: list[bool] = []
    spec = _spec(env, rootfs, tmp_path, ["/bin/true"])
    spec.in_child.append(lambda root_fd: marker.touch())  # in the child, before pivot_root

    def answer(pid: int) -> None:
        # The child goes on to build its root meanwhile, and waits for us to exec.
        seen.append(wait(marker.exists))
        seen.append(not _exited(pid) and Path(f"/proc/{pid}/comm").read_text().strip() != "true")  # not exec'd

    spec.answers.append(answer)
    child = spawn.spawn(spec)
    try:
        _, status = os.waitpid(child.pid, 0)
    finally:
        child.close()
    assert seen == [True, True]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_child_that_failed_first_is_the_error(env: Env, tmp_path: Path) -> None:
    rootfs = _rootfs(env)
    outside = tmp_path / "outside"
    outside.mkdir()
    (rootfs / "proc").rmdir()
    (rootfs / "proc").symlink_to(f"../../../../../../../..{outside}")  # refused by the child
    spec = _spec(env, rootfs, tmp_path, ["/bin/true"])

    def answer(pid: int) -> None:
        assert wait(lambda: _exited(pid))
        raise OSError(2, "the machine's namespace is gone")  # what a helper may say of a dead child

    spec.answers.append(answer)
    with pytest.raises(MachinedError) as e:
        spawn.spawn(spec)
    assert "/proc" in str(e.value) and "namespace is gone" not in str(e.value)
    # A child that failed while the answers were good (their "go" finds no reader) is reported too.
    def wait_for_the_child(pid: int) -> None:
        assert wait(lambda: _exited(pid))

    spec.answers[:] = [wait_for_the_child]
    with pytest.raises(MachinedError, match="/proc"):
        spawn.spawn(spec)
    assert list(outside.iterdir()) == []


def test_a_failing_answer_is_the_error_and_nothing_runs(env: Env, tmp_path: Path) -> None:
    rootfs = _rootfs(env)
    spec = _spec(env, rootfs, tmp_path, ["/bin/sh", "-c", "echo ran > /ran"])
    pids: list[int] = []

    def answer(pid: int) -> None:
        pids.append(pid)
        raise MachinedError("Failed to create veth: it broke")

    spec.answers.append(answer)
    with pytest.raises(MachinedError, match="it broke"):
        spawn.spawn(spec)
    assert not (rootfs / "ran").exists()  # the payload never ran
    assert not Path(f"/proc/{pids[0]}").exists()  # the child is gone and reaped


def test_the_cgroup_is_made_while_the_child_builds_its_root(env: Env, tmp_path: Path) -> None:
    """The parent makes the machine's cgroup (which may wait for the kernel) while the child mounts;
    the child goes on only once it is in there, and its cgroup namespace is rooted there."""
    rootfs = _rootfs(env)
    marker = tmp_path / "root-built"
    name = env.name()
    r, w = os.pipe()
    spec = _spec(env, rootfs, tmp_path, ["/bin/sh", "-c", "cat /proc/self/cgroup; exec sleep 10"])
    spec.stdio = (0, w, 2)
    spec.in_child.append(lambda root_fd: marker.touch())
    made: list[cgroups.MachineCgroup] = []

    def make() -> cgroups.MachineCgroup:
        assert wait(marker.exists)  # the child built its root meanwhile
        made.append(cgroups.create(name))
        return made[0]

    spec.make_cgroup = make
    try:
        child = spawn.spawn(spec)
        os.close(w)
        try:
            host_view = Path(f"/proc/{child.pid}/cgroup").read_text().split()
            seen = os.read(r, 65536).decode().split()  # (one write of cat's)
            os.kill(child.pid, 9)
            os.waitpid(child.pid, 0)
        finally:
            child.close()
    finally:
        os.close(r)
        for cg in made:
            cg.remove()
    assert made and spec.cgroup is made[0]
    scope = f"/machine.slice/machine-{name}.scope/payload"
    assert host_view and all(line.endswith(scope) for line in host_view), host_view  # every hierarchy
    assert len(seen) == len(host_view) and all(line.endswith(":/") for line in seen), seen  # its namespace's root


def test_a_failed_cgroup_is_the_error_and_nothing_runs(env: Env, tmp_path: Path) -> None:
    rootfs = _rootfs(env)
    spec = _spec(env, rootfs, tmp_path, ["/bin/sh", "-c", "echo ran > /ran"])
    forked: list[int] = []
    spec.answers.append(forked.append)  # taken all the same

    def make() -> cgroups.MachineCgroup:
        raise MachinedError("Failed to create cgroup for spawntest: no room")

    spec.make_cgroup = make
    with pytest.raises(MachinedError, match="no room"):
        spawn.spawn(spec)
    assert not (rootfs / "ran").exists()
    assert forked and not Path(f"/proc/{forked[0]}").exists()  # the child is gone and reaped


@pytest.mark.parametrize("fails", [False, True])
def test_answers_come_after_the_cgroup_even_when_that_fails(env: Env, tmp_path: Path, fails: bool) -> None:
    """The cgroup is made while a helper works on its request, then its answer is taken: also when
    making the cgroup failed, so that no answer is left unread."""
    rootfs = _rootfs(env)
    name = env.name()
    order: list[str] = []
    spec = _spec(env, rootfs, tmp_path, ["/bin/true"])

    def make() -> cgroups.MachineCgroup:
        order.append("cgroup")
        if fails:
            raise MachinedError("Failed to create cgroup for spawntest: no room")
        return cgroups.create(name)

    spec.answers.append(lambda pid: order.append("answer"))
    spec.make_cgroup = make
    try:
        if fails:
            with pytest.raises(MachinedError, match="no room"):
                spawn.spawn(spec)
        else:
            child = spawn.spawn(spec)
            os.waitpid(child.pid, 0)
            child.close()
    finally:
        if spec.cgroup is not None:
            spec.cgroup.remove()
    assert order == ["cgroup", "answer"]


def test_answers_are_taken_when_the_fork_fails(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request made before spawn gets its answer taken even when there is no child: nothing is left
    open, and the pid namespace for our next children is our own again."""
    spec = _spec(env, _rootfs(env), tmp_path, ["/bin/true"])
    taken: list[int] = []
    spec.answers.append(taken.append)
    fds = sorted(os.listdir("/proc/self/fd"))

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(BlockingIOError):
        spawn.spawn(spec)
    assert taken == [0]
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
