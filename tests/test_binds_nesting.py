"""[machine] bind and nesting, on this (non-systemd) host: real bind mounts, real cgroup mounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Env
from tests.test_bad_input import assert_clean_error, assert_settings_refused

pytestmark = pytest.mark.root


def test_binds_read_only_read_write_and_file(env: Env, tmp_path: Path) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "data").write_text("hello\n")
    (tmp_path / "file").write_text("a file\n")
    env.settings(name, f'bind = ["{src}:/mnt/ro:ro", "{src}:/srv/rw", "{tmp_path}/file:/etc/bound"]\n')
    env.ok("start", name)
    assert env.ok("shell", name, "--", "cat", "/mnt/ro/data", "/srv/rw/data", "/etc/bound") == "hello\nhello\na file\n"
    r = env.mctl("shell", name, "--", "touch", "/mnt/ro/x")
    assert r.returncode != 0 and "Read-only" in r.stderr
    env.ok("shell", name, "--", "sh", "-c", "echo written > /srv/rw/sub/new")
    assert (src / "sub/new").read_text() == "written\n"
    mounts = env.ok("shell", name, "--", "cat", "/proc/self/mounts")
    assert {line.split()[1] for line in mounts.splitlines()} >= {"/mnt/ro", "/srv/rw", "/etc/bound"}
    # The mount points were made inside the rootfs; the host's mount table never saw the binds.
    assert (env.images / name / "mnt/ro").is_dir() and (env.images / name / "etc/bound").is_file()
    assert str(src) not in Path("/proc/self/mountinfo").read_text()
    env.ok("poweroff", name)


@pytest.mark.parametrize(("entry", "why"), [
    ("relative/path:/mnt", "not an absolute path"),
    ("/tmp:mnt", "not an absolute path"),
    ("/tmp:/mnt/../etc", "contains '..'"),
    ("/tmp:/mnt:rx", "neither ro nor rw"),
    ("/tmp:/", "would cover"),
    ("/tmp:/proc/x", "would cover"),
    ("/a:/b:ro:extra", "is not SOURCE"),
])
def test_bad_bind_settings(env: Env, entry: str, why: str) -> None:
    assert_settings_refused(env, f'bind = ["{entry}"]\n', "Invalid configuration", why)


def test_bind_source_missing_or_target_a_symlink(env: Env, tmp_path: Path) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    env.settings(name, f'bind = ["{tmp_path}/nonexistent:/mnt/x"]\n')
    before = env.tree()
    assert_clean_error(env.mctl("start", name), "bind source", "does not exist")
    assert env.tree() == before
    # The guest side is resolved inside the rootfs: a symlink planted there is refused, not followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    (env.images / name / "mnt/link").symlink_to(str(outside))
    (tmp_path / "src").mkdir()
    config = (env.config / f"{name}.toml").read_text().replace(f'"{tmp_path}/nonexistent:/mnt/x"',
                                                                 f'"{tmp_path}/src:/mnt/link/x"')
    (env.config / f"{name}.toml").write_text(config)
    host_mounts = Path("/proc/self/mountinfo").read_text()
    assert_clean_error(env.mctl("start", name), "/mnt/link")
    assert list(outside.iterdir()) == [] and env.running() == []
    assert Path("/proc/self/mountinfo").read_text() == host_mounts


def test_nesting_makes_the_machines_own_cgroups_writable(env: Env) -> None:
    plain, nested = env.name(), env.name()
    for name in (plain, nested):
        env.ok("create", name, "--template", "busybox")
    env.settings(nested, "nesting = true\n")
    env.ok("start", plain, nested)
    probe = "mkdir /sys/fs/cgroup/memory/probe && echo 8M > /sys/fs/cgroup/memory/probe/memory.limit_in_bytes"
    r = env.mctl("shell", plain, "--", "sh", "-c", probe)
    assert r.returncode != 0 and "Read-only" in r.stderr
    env.ok("shell", nested, "--", "sh", "-c", probe)
    # Its own subtree only: the root of what it sees is its payload cgroup, below the scope's limits.
    assert all(line.endswith(":/") for line in env.ok("shell", nested, "--", "cat", "/proc/1/cgroup").splitlines())
    scope = next(Path("/sys/fs/cgroup/memory").rglob(f"machine-{nested}.scope"))
    assert (scope / "payload/probe/memory.limit_in_bytes").read_text().strip() == str(8 << 20)
    env.ok("shell", nested, "--", "rmdir", "/sys/fs/cgroup/memory/probe")
    env.ok("poweroff", plain, nested)
