"""export-tar / import-tar: identical trees through every format; malicious tarballs refused."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MCTL, Env
from tests.test_bad_input import assert_clean_error

pytestmark = pytest.mark.root

# security.capability for cap_net_raw+ep, as setcap writes it (VFS_CAP_REVISION_2).
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def decorate(root: Path) -> None:
    """Everything a root file system holds that a careless copy loses."""
    (root / "srv").mkdir(mode=0o750)
    os.chown(root / "srv", 1234, 5678)
    (root / "srv/data").write_bytes(b"data\n")
    os.chown(root / "srv/data", 1234, 5678)
    os.chmod(root / "srv/data", 0o640)
    os.link(root / "srv/data", root / "srv/data.hardlink")
    (root / "usr/bin/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "usr/bin/suid", 0o4755)
    (root / "usr/bin/ping-like").write_bytes(b"\x7fELF")
    os.setxattr(root / "usr/bin/ping-like", "security.capability", CAP_NET_RAW)
    os.setxattr(root / "srv/data", "user.origin", b"machined-test")
    os.setxattr(root / "srv", "trusted.note", b"\x00\x01binary")
    subprocess.run(["setfacl", "-m", "u:4321:rw", str(root / "srv/data.hardlink")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:99:rx", str(root / "srv")], check=True)
    os.mknod(root / "srv/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "srv/loop7", 0o660 | stat.S_IFBLK, os.makedev(7, 7))
    os.mkfifo(root / "srv/fifo", 0o600)
    (root / "srv/abs-link").symlink_to("/etc/passwd")
    (root / "srv/rel-link").symlink_to("../etc/hostname")
    with open(root / "srv/sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    os.utime(root / "srv/data", (1_000_000_000, 1_000_000_000))


def snapshot_tree(root: Path) -> dict[str, Any]:
    """Everything about every entry: type, mode, owner, size, times, device, link target, xattrs, links."""
    result: dict[str, Any] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for entry in ["", *dirs, *files] if dirpath == str(root) else [*dirs, *files]:
            p = os.path.join(dirpath, entry) if entry else dirpath
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            names = sorted(os.listxattr(p, follow_symlinks=False))
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in names}
            result[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                           st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                           int(st.st_mtime) if not stat.S_ISDIR(st.st_mode) else 0, st.st_rdev,
                           os.readlink(p) if stat.S_ISLNK(st.st_mode) else None, xattrs)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    result["<hardlinks>"] = sorted(sorted(v) for v in inodes.values())
    return result


@pytest.mark.parametrize("fmt", ["tar", "tar.gz", "tar.xz", "tar.zst"])
def test_export_import_round_trip(env: Env, tmp_path: Path, fmt: str) -> None:
    src, dst = env.name("src"), env.name("dst")
    env.ok("create", src, "--template", "busybox")
    decorate(env.images / src)
    before = snapshot_tree(env.images / src)
    archive = tmp_path / f"image.{fmt}"
    env.ok("export-tar", src, str(archive))
    kind = subprocess.run(["file", "-b", str(archive)], capture_output=True, text=True).stdout
    assert {"tar": "tar archive", "tar.gz": "gzip", "tar.xz": "XZ", "tar.zst": "Zstandard"}[fmt] in kind, kind
    env.ok("import-tar", str(archive), dst)
    after = snapshot_tree(env.images / dst)
    assert after == before
    assert after["srv/sparse"][4] == 64 << 20
    assert os.stat(env.images / dst / "srv/sparse").st_blocks * 512 < 1 << 20  # still sparse
    assert after["usr/bin/ping-like"][8]["security.capability"] == CAP_NET_RAW
    assert "system.posix_acl_access" in after["srv/data.hardlink"][8]
    # The imported machine is a machine: it boots.
    env.ok("start", dst)
    assert env.ok("shell", dst, "--", "cat", "/srv/data") == "data\n"
    env.ok("poweroff", dst)


def test_export_to_stdout_and_import_pipe_compressed(env: Env, tmp_path: Path) -> None:
    src, dst = env.name("src"), env.name("dst")
    env.ok("create", src, "--template", "busybox")
    archive = tmp_path / "image.zst"  # no telling suffix: the content decides
    with open(archive, "wb") as out:
        exported = subprocess.run([*MCTL, "export-tar", src, "-", "--format", "zstd"],
                                  env=env.environ(), stdout=out, stderr=subprocess.PIPE)
    assert exported.returncode == 0, exported.stderr
    env.ok("import-tar", str(archive), dst)
    assert snapshot_tree(env.images / dst) == snapshot_tree(env.images / src)


def test_export_refuses_running_and_bad_input(env: Env, tmp_path: Path) -> None:
    name = env.name()
    env.ok("create", name, "--template", "busybox")
    tmp_path = tmp_path / "files"
    tmp_path.mkdir()
    env.ok("start", name)
    assert_clean_error(env.mctl("export-tar", name, str(tmp_path / "x.tar")), "running")
    env.ok("poweroff", name)
    before = env.tree()
    assert_clean_error(env.mctl("export-tar", name, str(tmp_path / "x.zip")), "compression")
    assert_clean_error(env.mctl("export-tar", env.name(), str(tmp_path / "x.tar")), "no such image")
    assert_clean_error(env.mctl("import-tar", str(tmp_path / "none.tar"), env.name()), "No such file")
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    assert_clean_error(env.mctl("import-tar", str(tmp_path / "junk.tar"), env.name()), "Failed to import")
    assert_clean_error(env.mctl("import-tar", str(tmp_path / "junk.tar"), name), "already exists")
    assert_clean_error(env.mctl("import-tar", str(tmp_path / "junk.tar"), "../x"), "Invalid machine name")
    assert env.tree() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.tar"]


# --- malicious tarballs ----------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"pwned\n", link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def build(path: Path, members: list[Member]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)


def evil_tarballs(outside: Path) -> dict[str, tuple[list[Member], str]]:
    o = str(outside)
    return {
        "dotdot": ([_member("etc/"), _member("../../../../" + o.lstrip("/") + "/pwned")], "contains '..'"),
        "dotdot-inner": ([_member("etc/../../pwned")], "contains '..'"),
        "absolute": ([_member(o + "/pwned")], "absolute name"),
        "symlink-escapes": ([_member("etc/", tarfile.DIRTYPE), _member("etc/up", tarfile.SYMTYPE, link="../../x")],
                            "points out of the image"),
        "symlink-then-write": ([_member("d", tarfile.SYMTYPE, link=o), _member("d/pwned")], "symbolic link"),
        "symlink-then-dir-write": ([_member("d", tarfile.SYMTYPE, link="/"), _member("d/etc/", tarfile.DIRTYPE),
                                    _member("d/etc/pwned")], "symbolic link"),
        "hardlink-dotdot": ([_member("h", tarfile.LNKTYPE, link="../../../../etc/passwd")], "contains '..'"),
        "hardlink-absolute": ([_member("h", tarfile.LNKTYPE, link="/etc/passwd")], "absolute name"),
        "hardlink-through-symlink": ([_member("l", tarfile.SYMTYPE, link="/"),
                                      _member("h", tarfile.LNKTYPE, link="l/etc/passwd")], "symbolic link"),
        "hardlink-to-nothing": ([_member("h", tarfile.LNKTYPE, link="etc/passwd")], "no earlier entry"),
        "root-replaced": ([_member(".", tarfile.SYMTYPE, link=o)], "names the root"),
        "dir-replaced": ([_member("etc/", tarfile.DIRTYPE), _member("etc", tarfile.SYMTYPE, link=o)],
                         "replace a directory"),
    }


@pytest.mark.parametrize("case", list(evil_tarballs(Path("/x"))))
def test_malicious_tarballs_refused(env: Env, tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    members, words = evil_tarballs(outside)[case]
    archive = tmp_path / "evil.tar"
    build(archive, members)
    env.ok("create", env.name("ok"), "--template", "busybox")  # the pool's own directories exist
    before = env.tree()
    name = env.name("evil")
    assert_clean_error(env.mctl("import-tar", str(archive), name), "Failed to import", words)
    assert env.tree() == before
    assert sorted(os.listdir(outside)) == ["keep"] and (outside / "keep").read_text() == "keep\n"
    assert not (env.images / name).exists() and not (env.config / f"{name}.toml").exists()
    assert os.listdir(env.images / ".machined/tmp") == []
    assert not Path("/pwned").exists() and "pwned" not in Path("/etc/passwd").read_text()


def test_later_entry_replaces_symlink_without_writing_through(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "tricky.tar"
    build(archive, [_member("etc/", tarfile.DIRTYPE), _member("etc/motd", tarfile.SYMTYPE, link=str(outside / "motd")),
                    _member("etc/motd", data=b"hello\n")])
    name = env.name()
    env.ok("import-tar", str(archive), name)
    assert (env.images / name / "etc/motd").read_text() == "hello\n"
    assert not (env.images / name / "etc/motd").is_symlink() and list(outside.iterdir()) == []
