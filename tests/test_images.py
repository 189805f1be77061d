"""Image verbs on real machines: clone, rename, read-only, remove, ephemeral, snapshots, clean,
atomic creation (SIGKILL, full disk) and bad templates through mctl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import MCTL, TOKEN, Env
from tests.test_bad_input import assert_clean_error
from tests.test_teardown import _wait as wait_for

pytestmark = pytest.mark.root


def busybox(env: Env, prefix: str = "t") -> str:
    name = env.name(prefix)
    env.ok("create", name, "--template", "busybox")
    return name


def machine_id(env: Env, name: str) -> str:
    return json.loads(env.ok("show", name, "-o", "json"))["Id"]  # type: ignore[no-any-return]


def test_clone_is_an_independent_machine(env: Env) -> None:
    src = busybox(env, "src")
    (env.images / src / "etc/marker").write_text("from src\n")
    dst = env.name("dst")
    env.ok("clone", src, dst)
    assert (env.images / dst / "etc/marker").read_text() == "from src\n"
    assert machine_id(env, dst) != machine_id(env, src)
    env.ok("start", dst)
    assert json.loads(env.ok("show", dst, "-o", "json"))["Name"] == dst
    env.ok("shell", dst, "--", "sh", "-c", "echo changed > /etc/marker")
    env.ok("poweroff", dst)
    assert (env.images / src / "etc/marker").read_text() == "from src\n"
    images = {i["name"]: i for i in json.loads(env.ok("list-images", "-o", "json"))}
    assert set(images) == {src, dst} and images[dst]["type"] == "directory" and images[dst]["ro"] is False
    assert images[dst]["usage"] > 1_000_000 and images[dst]["template"] == "busybox"
    ro = env.name("ro")
    env.ok("clone", src, ro, "--read-only")
    assert env.ok("read-only", ro).strip() == "yes"


def test_rename(env: Env) -> None:
    old = busybox(env, "old")
    env.ok("snapshot", old, "s1")
    mid = machine_id(env, old)
    new = env.name("new")
    env.ok("rename", old, new)
    assert not (env.images / old).exists() and not (env.config / f"{old}.toml").exists()
    assert machine_id(env, new) == mid
    assert [s["name"] for s in json.loads(env.ok("list-snapshots", new, "-o", "json"))] == ["s1"]
    env.ok("start", new)
    assert json.loads(env.ok("show", new, "-o", "json"))["Id"] == mid
    assert_clean_error(env.mctl("rename", new, env.name()), "running")
    env.ok("poweroff", new)
    other = busybox(env, "other")
    before = env.tree()
    assert_clean_error(env.mctl("rename", new, other), "already exists")
    assert_clean_error(env.mctl("rename", new, "../escape"), "Invalid machine name")
    assert_clean_error(env.mctl("rename", env.name(), env.name()), "no such image")
    assert env.tree() == before


def test_read_only_machine_boots_and_cannot_write(env: Env) -> None:
    name = busybox(env)
    assert env.ok("read-only", name).strip() == "no"
    env.ok("read-only", name, "yes")
    env.ok("start", name)
    r = env.mctl("shell", name, "--", "sh", "-c", "touch /etc/written")
    assert r.returncode != 0 and "Read-only file system" in r.stdout + r.stderr
    assert env.ok("shell", name, "--", "sh", "-c", "touch /tmp/ok && echo ok").strip() == "ok"  # a tmpfs
    info = json.loads(env.ok("show", name, "-o", "json"))
    assert info["ReadOnly"] is True and info["State"] == "running"
    env.ok("poweroff", name)
    assert not (env.images / name / "etc/written").exists()
    before = env.tree()
    assert_clean_error(env.mctl("remove", name), "read-only")
    assert_clean_error(env.mctl("rename", name, env.name()), "read-only")
    assert_clean_error(env.mctl("read-only", name, "maybe"), "not a boolean")
    assert env.tree() == before
    env.ok("read-only", name, "no")
    env.ok("remove", name)
    assert json.loads(env.ok("list-images", "-o", "json")) == []


def test_remove_refuses_running(env: Env) -> None:
    name = busybox(env)
    env.ok("snapshot", name)
    env.ok("start", name)
    assert_clean_error(env.mctl("remove", name), "running")
    assert (env.images / name).is_dir()
    env.ok("poweroff", name)
    env.ok("remove", name)
    assert not (env.images / name).exists() and not (env.images / ".machined/snapshots" / name).exists()


def test_ephemeral_leaves_nothing(env: Env) -> None:
    name = busybox(env)
    before = {k: v for k, v in env.tree().items() if "/images/" in k}
    env.ok("start", "--ephemeral", name)
    env.ok("shell", name, "--", "sh", "-c", "echo gone > /etc/ephemeral && rm /etc/hostname")
    assert env.ok("shell", name, "--", "cat", "/etc/ephemeral") == "gone\n"
    layers = list((env.images / ".machined/ephemeral").iterdir())
    assert len(layers) == 1 and layers[0].name.startswith(f"{name}-")
    env.ok("poweroff", name)
    assert not (env.images / name / "etc/ephemeral").exists() and (env.images / name / "etc/hostname").exists()
    assert list((env.images / ".machined/ephemeral").iterdir()) == []
    assert {k: v for k, v in env.tree().items() if "/images/" in k and "/.machined" not in k} == {
        k: v for k, v in before.items() if "/.machined" not in k}


def test_ephemeral_layer_removed_after_supervisor_sigkill(env: Env) -> None:
    name = busybox(env)
    env.ok("start", "-x", name)
    env.ok("shell", name, "--", "sh", "-c", "echo x > /root/file")
    state = json.loads((env.runtime / "machines" / name / "state.json").read_text())
    layer = Path(state["ephemeral"])
    assert (layer / "upper/root/file").exists()
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)
    assert wait_for(lambda: not Path(f"/proc/{state['leader']['pid']}").exists())
    assert json.loads(env.ok("list", "-o", "json")) == []  # the next call cleans up after it
    assert not layer.exists() and not (env.images / name / "root/file").exists()
    env.ok("start", name)  # and the machine starts normally again
    env.ok("poweroff", name)


def test_snapshot_and_restore(env: Env) -> None:
    name = busybox(env)
    (env.images / name / "etc/version").write_text("1\n")
    env.ok("snapshot", name, "v1")
    (env.images / name / "etc/version").write_text("2\n")
    (env.images / name / "etc/added").write_text("new\n")
    env.ok("snapshot", name)  # named by the time
    snaps = json.loads(env.ok("list-snapshots", name, "-o", "json"))
    assert snaps[0]["name"] == "v1" and len(snaps) == 2 and snaps[0]["usage"] > 1_000_000
    assert "v1" in env.ok("list-snapshots", name)
    env.ok("start", name)
    assert_clean_error(env.mctl("restore", name, "v1"), "running")
    assert_clean_error(env.mctl("snapshot", name, "v9"), "running")
    env.ok("poweroff", name)
    env.ok("restore", name, "v1")
    assert (env.images / name / "etc/version").read_text() == "1\n" and not (env.images / name / "etc/added").exists()
    env.ok("start", name)
    assert env.ok("shell", name, "--", "cat", "/etc/version") == "1\n"
    env.ok("poweroff", name)
    before = env.tree()
    assert_clean_error(env.mctl("restore", name, "nosuch"), "no snapshot")
    assert_clean_error(env.mctl("snapshot", name, "v1"), "already exists")
    assert_clean_error(env.mctl("snapshot", name, "../x"), "Invalid snapshot name")
    assert env.tree() == before
    env.ok("remove-snapshot", name, "v1")
    assert len(json.loads(env.ok("list-snapshots", name, "-o", "json"))) == 1


# --- atomic creation ------------------------------------------------------------------------------

def test_sigkill_during_create_never_shows_a_machine(env: Env, debian_rootfs: Path) -> None:
    """A create copying a large tree, killed at several moments: no machine, clean removes the rest."""
    name = env.name()
    for delay in (0.0, 0.15, "copying"):
        proc = subprocess.Popen([*MCTL, "create", name, "--template", "tarball",
                                 "--set", f"source={debian_rootfs}"], env=env.environ(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if delay == "copying":
            assert wait_for(lambda: any((env.images / ".machined/tmp").glob(f"{name}.tmp-*/usr")), 20)
        else:
            time.sleep(float(delay))
        proc.kill()
        proc.wait()
        assert json.loads(env.ok("list-images", "-o", "json")) == []
        assert not (env.images / name).exists() and not (env.config / f"{name}.toml").exists()
        assert_clean_error(env.mctl("start", name))
    env.ok("clean")
    assert list((env.images / ".machined/tmp").iterdir()) == []
    env.ok("create", name, "--template", "tarball", "--set", f"source={debian_rootfs}")
    assert (env.images / name / "usr/lib/systemd/systemd").exists()
    assert (env.images / name / "etc/hostname").read_text() == f"{name}\n"


def test_full_disk_never_shows_a_machine(env: Env, tmp_path: Path) -> None:
    small = tmp_path / f"small{TOKEN}"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", f"machined-test-{TOKEN}", str(small)], check=True)
    try:
        environ = env.environ(MACHINED_IMAGE_DIR=str(small))
        name = env.name()
        r = env.mctl("create", name, "--template", "busybox", env=environ)
        assert_clean_error(r, f"Failed to create {name}", "No space left on device")
        assert env.mctl("list-images", "-o", "json", env=environ).stdout.strip() == "[]"
        assert not (small / name).exists() and not (env.config / f"{name}.toml").exists()
        assert os.listdir(small / ".machined/tmp") == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# --- templates through mctl ------------------------------------------------------------------------

def test_bad_templates_leave_nothing(env: Env) -> None:
    tdir = env.config / "templates"
    (tdir / "evil/files").mkdir(parents=True)
    (tdir / "evil/template.toml").write_text('[files]\n"../../../escape" = "x.j2"\n')
    (tdir / "evil/x.j2").write_text("x\n")
    (tdir / "param/files/etc").mkdir(parents=True)
    (tdir / "param/template.toml").write_text('bootstrap = "busybox"\n[parameters.port]\ntype = "int"\ndefault = 22\n'
                                             '[files]\n"etc/{{ where }}" = "x.j2"\n[parameters.where]\ndefault = "x"\n')
    (tdir / "param/x.j2").write_text("{{ port }}\n")
    before = env.tree()
    assert_clean_error(env.mctl("create", env.name(), "--template", "evil"), "unsafe target path")
    assert_clean_error(env.mctl("create", env.name(), "--template", "param", "--set", "port=many"), "not an integer")
    assert_clean_error(env.mctl("create", env.name(), "--template", "param", "--set", "nope=1"), "no such parameter")
    assert_clean_error(env.mctl("create", env.name(), "--template", "param", "--set", "where=../../x"), "unsafe")
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", "--release", "x"), "release")
    assert_clean_error(env.mctl("create", env.name(), "--template", "busybox", "--storage", "overlay"), "overlay")
    after = env.tree()
    # The pool's private folders may now exist (empty); no image, setting or temporary tree does.
    skeleton = ("/.machined", "/tmp", "/locks")
    assert {k: v for k, v in after.items() if k not in before and not k.endswith(skeleton)} == {}
    assert not (env.base / "escape").exists() and not (env.base.parent / "escape").exists()
    assert json.loads(env.ok("list-images", "-o", "json")) == []
    name = env.name()
    env.ok("create", name, "--template", "param", "--set", "port=0x10", "--set", "where=sub.conf")
    assert (env.images / name / "etc/sub.conf").read_text() == "16\n"
    templates = {t["name"]: t for t in json.loads(env.ok("templates", "-o", "json"))}
    assert templates["param"]["parameters"]["port"] == {"type": "int", "default": 22, "help": "", "choices": None}
    assert {"busybox", "debian", "ubuntu", "tarball"} <= set(templates)
