"""Images as tarballs: export with GNU tar, import with our own safe extractor.

Export hands the heavy lifting to GNU tar (numeric owners, xattrs including file capabilities and
POSIX ACLs, sparse files, hard links, device nodes) with gzip, xz or zstd on top.

Import never trusts the archive. Each entry is checked (no absolute name, no '..', no NUL) and
written relative to a descriptor of its parent directory, reached from the new tree's root
without following any symlink; a file is created with O_EXCL|O_NOFOLLOW (an entry already there
is removed first, never written through); a relative symlink may not climb above the root; a hard
link must name an entry already inside the tree. The first bad entry fails the whole import, and
the caller discards the half-made tree, so nothing is written outside the new image.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import tarfile
from typing import IO

from machined import mounts
from machined.log import die

FORMATS = {"uncompressed": [], "gzip": ["--gzip"], "xz": ["--xz"], "zstd": ["--zstd"]}
_SUFFIXES = ((".tar.gz", "gzip"), (".tgz", "gzip"), (".tar.xz", "xz"), (".txz", "xz"), (".tar.zst", "zstd"),
             (".tzst", "zstd"), (".tar", "uncompressed"))
_MAGIC = ((b"\x1f\x8b", "gz"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bz2"), (b"\x28\xb5\x2f\xfd", "zstd"))


def format_for(path: str, requested: str | None) -> str:
    if requested:
        if requested not in FORMATS:
            die(f"Invalid format {requested!r}: choose one of {', '.join(FORMATS)}")
        return requested
    for suffix, fmt in _SUFFIXES:
        if path.endswith(suffix):
            return fmt
    die(f"Failed to export to {path}: cannot tell the compression from the name",
        hint="name it .tar, .tar.gz, .tar.xz or .tar.zst, or use --format")


# --- export ----------------------------------------------------------------------------------------

def export(name: str, path: str, fmt: str | None = None) -> None:
    from machined import images, machines, store

    root = images._require_image(name, "export")
    compression = format_for(path, fmt) if path != "-" else format_for(".tar", fmt)
    lock = store.image_lock(name, "export")
    tmp = ""
    try:
        cfg = machines.load_config(name)
        if path == "-":
            out = os.dup(sys.stdout.fileno())
        else:
            tmp = f"{path}.tmp-{os.urandom(4).hex()}"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with images.merged(name, cfg.base):
                proc = subprocess.run(
                    ["tar", "--create", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse",
                     "--one-file-system", *FORMATS[compression], "--directory", root, "."],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, text=True,
                    preexec_fn=images.die_with_us)
        finally:
            os.close(out)
        # tar exits 1 for "file changed as we read it", which cannot happen to a stopped machine's tree.
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            die(f"Failed to export {name}: {lines[-1] if lines else f'tar exited {proc.returncode}'}")
        if tmp:
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)
            tmp = ""
    except OSError as e:
        die(f"Failed to export {name} to {path}: {e.strerror or e}")
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        lock.release()


# --- import ----------------------------------------------------------------------------------------

def import_tar(path: str, name: str, read_only: bool = False) -> None:
    from machined import config, machines, store

    with store.Creation(name, "import") as c:
        os.mkdir(c.tmp, 0o755)
        extract(path, c.tmp)
        machine_id = machines._image_machine_id(c.tmp) or config.new_machine_id()
        import time

        c.commit(config.MachineConfig(name=name, id=machine_id, read_only=read_only,
                                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))


class _Refused(Exception):
    pass


def extract(path: str, rootfs: str) -> None:
    """Extract tarball path (plain, gzip, xz, bzip2 or zstd) into the empty directory rootfs."""
    try:
        f = open(path, "rb")
    except OSError as e:
        die(f"Failed to import {path}: {e.strerror or e}")
    proc = None
    try:
        head = os.pread(f.fileno(), 6, 0)  # leaves the offset at 0 for the decompressor
        kind = next((k for magic, k in _MAGIC if head.startswith(magic)), "")
        stream: IO[bytes] = f
        if kind == "zstd":
            from machined import images

            proc = subprocess.Popen(["zstd", "-dc"], stdin=f, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    preexec_fn=images.die_with_us)
            assert proc.stdout is not None
            stream, kind = proc.stdout, ""
        try:
            with tarfile.open(fileobj=stream, mode=f"r|{kind}") as tf:  # type: ignore[call-overload]
                _Extractor(rootfs).run(tf)
        except _Refused as e:
            die(f"Failed to import {path}: {e}")
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            die(f"Failed to import {path}: {reason or type(e).__name__}")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        f.close()


def clean_name(raw: str) -> str:
    """The entry's path relative to the root ('' for the root itself); refuses anything that could leave it."""
    if "\0" in raw:
        raise _Refused(f"entry {raw!r} has a NUL in its name")
    if raw.startswith("/"):
        raise _Refused(f"entry {raw!r} has an absolute name")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"entry {raw!r} contains '..'")
    return "/".join(parts)


def symlink_escapes(link: str, target: str) -> bool:
    """Whether a relative symlink at link climbs above the root (absolute ones are the image's own)."""
    if target.startswith("/"):
        return False
    depth = link.count("/")  # directories above the link, inside the root
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class _Extractor:
    def __init__(self, rootfs: str) -> None:
        self.rootfs = rootfs
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []

    def run(self, tf: tarfile.TarFile) -> None:
        self.root_fd = os.open(self.rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for member in tf:
                self.entry(tf, member)
            # Directories last, deepest first: their modes could forbid writing entries into them.
            for rel, member in reversed(self.dirs):
                self.finish_dir(rel, member)
        finally:
            os.close(self.root_fd)

    def parent(self, rel: str, create: bool = True) -> tuple[int, str]:
        parent, _, base = rel.rpartition("/")
        try:
            return (mounts.resolve_dir(self.root_fd, parent, create=create, mode=0o700) if parent
                    else os.dup(self.root_fd)), base
        except FileNotFoundError:
            raise _Refused(f"entry {rel!r} names no earlier entry of the image") from None
        except OSError as e:
            # ELOOP: a symlink on the way (resolve_dir never follows one); ENOTDIR: a file on the way.
            raise _Refused(f"entry {rel!r} would be written through {e.strerror or e}") from None

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = clean_name(m.name)
        if not rel:
            if not m.isdir():
                raise _Refused(f"entry {m.name!r} names the root but is not a directory")
            self.dirs.append(("", m))
            return
        dfd, base = self.parent(rel)
        try:
            try:
                st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if m.isdir() and stat.S_ISDIR(st.st_mode):
                    self.dirs.append((rel, m))
                    return
                if stat.S_ISDIR(st.st_mode):
                    raise _Refused(f"entry {rel!r} would replace a directory")
                os.unlink(base, dir_fd=dfd)  # a later entry wins, as with tar; never written through
            if m.isdir():
                os.mkdir(base, 0o700, dir_fd=dfd)
                self.dirs.append((rel, m))
            elif m.isreg():
                self.file(tf, m, dfd, base)
            elif m.issym():
                if symlink_escapes(rel, m.linkname) or not m.linkname or "\0" in m.linkname:
                    raise _Refused(f"symbolic link {rel!r} -> {m.linkname!r} points out of the image")
                os.symlink(m.linkname, base, dir_fd=dfd)
                os.chown(base, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
                self.xattrs(m, f"{mounts.fdpath(dfd)}/{base}", follow=False)
                os.utime(base, (m.mtime, m.mtime), dir_fd=dfd, follow_symlinks=False)
            elif m.islnk():
                self.hardlink(m, rel, dfd, base)
            elif m.ischr() or m.isblk() or m.isfifo():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
                os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor) if not m.isfifo() else 0, dir_fd=dfd)
                fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    self.attributes(m, mounts.fdpath(fd))
                finally:
                    os.close(fd)
            else:
                raise _Refused(f"entry {rel!r} has an unsupported type {m.type!r}")
        finally:
            os.close(dfd)

    def file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, dfd: int, base: str) -> None:
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            src = tf.extractfile(m)
            if src is not None:
                # Blocks of zeros become holes: sparse files (disk images, databases) stay sparse.
                while chunk := src.read(1 << 16):
                    if chunk.count(0) == len(chunk):
                        os.lseek(fd, len(chunk), os.SEEK_CUR)
                    else:
                        os.write(fd, chunk)
                os.ftruncate(fd, m.size)
            self.attributes(m, mounts.fdpath(fd))
        finally:
            os.close(fd)

    def hardlink(self, m: tarfile.TarInfo, rel: str, dfd: int, base: str) -> None:
        target = clean_name(m.linkname)
        if not target:
            raise _Refused(f"hard link {rel!r} points at the root")
        tfd, tbase = self.parent(target, create=False)
        try:
            try:
                st = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise _Refused(f"hard link {rel!r} -> {m.linkname!r} names no earlier entry of the image") from None
            if stat.S_ISDIR(st.st_mode):
                raise _Refused(f"hard link {rel!r} -> {m.linkname!r} names a directory")
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def attributes(self, m: tarfile.TarInfo, path: str) -> None:
        """Owner, then mode (chown clears set-id bits), then xattrs (it clears capabilities), then times.
        path is a /proc/self/fd link to the entry itself, never a path through the tree."""
        os.chown(path, m.uid, m.gid)
        os.chmod(path, m.mode & 0o7777)
        self.xattrs(m, path, follow=True)
        os.utime(path, (m.mtime, m.mtime))

    def xattrs(self, m: tarfile.TarInfo, path: str, follow: bool) -> None:
        raw = {k[len("SCHILY.xattr."):]: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        for key, text_key in (("system.posix_acl_access", "SCHILY.acl.access"),
                              ("system.posix_acl_default", "SCHILY.acl.default")):
            if key not in raw and text_key in m.pax_headers:
                raw[key] = acl_from_text(m.pax_headers[text_key]).decode("utf-8", "surrogateescape")
        for key, value in raw.items():
            try:
                os.setxattr(path, key, value.encode("utf-8", "surrogateescape"), follow_symlinks=follow)
            except OSError as e:
                raise _Refused(f"entry {m.name!r}: cannot set extended attribute {key}: {e.strerror}") from None

    def finish_dir(self, rel: str, m: tarfile.TarInfo) -> None:
        fd = mounts.resolve_dir(self.root_fd, rel) if rel else os.dup(self.root_fd)
        try:
            self.attributes(m, mounts.fdpath(fd))
        finally:
            os.close(fd)


_ACL_TAGS = {"user": (0x01, 0x02), "group": (0x04, 0x08), "mask": (0x10, 0x10), "other": (0x20, 0x20)}


def acl_from_text(text: str) -> bytes:
    """POSIX ACL text (as GNU tar stores it, numeric ids) -> the system.posix_acl_* xattr value."""
    out = [struct.pack("<I", 2)]
    for entry in text.replace(",", "\n").split("\n"):
        entry = entry.split("#")[0].strip()
        if not entry:
            continue
        fields = entry.split(":")
        if len(fields) != 3 or fields[0] not in _ACL_TAGS:
            raise _Refused(f"malformed ACL entry {entry!r}")
        tag, qualifier, perms = fields
        if qualifier and not qualifier.isdigit():
            raise _Refused(f"ACL entry {entry!r} names a user or group instead of a number")
        perm = sum(bit for ch, bit in (("r", 4), ("w", 2), ("x", 1)) if ch in perms)
        code = _ACL_TAGS[tag][1 if qualifier else 0]
        out.append(struct.pack("<HHI", code, perm, int(qualifier) if qualifier else 0xFFFFFFFF))
    return b"".join(out)
