"""Bootstrap methods (busybox, debian, tarball) and the cache of pristine distro bootstraps.

A Debian-family bootstrap (mmdebstrap, else debootstrap) is slow and always the same for the same
distro, release, architecture and package set, so it is built once under
MACHINED_CACHE_DIR/bootstrap/KEY and machines are copied (or layered) from there. Entries are built
under a hidden temporary name and renamed into place, under a per-key lock, so concurrent creates
build once and a killed build never looks like a cache entry. The bootstrap tool runs in its own
pid and mount namespaces, tied to us: if mctl dies, the tool and every mount it made go with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from machined import paths
from machined.log import die, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from machined.templates import Template

CACHE_VERSION = "1"  # bump when what goes into a cached tree changes
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "i686": "i386", "ppc64le": "ppc64el",
          "s390x": "s390x", "riscv64": "riscv64"}
# What a bootstrap copies from the build host, or what must differ between machines: removed from
# the pristine tree (templates render what a machine needs; sshd's keys are made at first boot).
HOST_SPECIFIC = ("etc/hostname", "etc/resolv.conf", "etc/mailname", "var/lib/dbus/machine-id",
                 "etc/ssh/ssh_host_rsa_key", "etc/ssh/ssh_host_rsa_key.pub", "etc/ssh/ssh_host_ecdsa_key",
                 "etc/ssh/ssh_host_ecdsa_key.pub", "etc/ssh/ssh_host_ed25519_key",
                 "etc/ssh/ssh_host_ed25519_key.pub")
NO_DOCS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
           "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/info/*",
           "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias")


def host_arch() -> str:
    return ARCHES.get(os.uname().machine, os.uname().machine)


def cache_dir() -> str:
    return os.path.join(paths.cache_dir(), "bootstrap")


# --- methods -------------------------------------------------------------------------------------

def bootstrap_busybox(tmpl: Template, rootfs: str, release: str, params: dict[str, Any]) -> None:
    """A complete BusyBox system from the host's static busybox: no network needed."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        die("Failed to bootstrap busybox: busybox is not installed", hint="apt install busybox-static")
    with open(busybox, "rb") as f:
        head = f.read(4096)
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        die(f"Failed to bootstrap busybox: {busybox} is dynamically linked", hint="apt install busybox-static")
    applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root",
              "var/log", "var/run", "home", "mnt"):
        os.makedirs(os.path.join(rootfs, d), mode=0o755, exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    os.chmod(os.path.join(rootfs, "root"), 0o700)
    shutil.copy2(busybox, os.path.join(rootfs, "bin", "busybox"))
    for applet in applets:
        applet = applet.strip("/")
        if applet == "bin/busybox" or ".." in applet.split("/"):
            continue
        depth = applet.count("/")
        link = os.path.join(rootfs, applet)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(link):
            os.symlink("../" * depth + "bin/busybox", link)


def bootstrap_tarball(tmpl: Template, rootfs: str, release: str, params: dict[str, Any]) -> None:
    """Any root file system: a tarball (extracted with the safe importer) or a directory (copied)."""
    source = str(params.get("source", ""))
    if not source:
        die(f"Template {tmpl.name} needs --set source=FILE.tar[.gz|.xz|.zst] or a directory")
    if os.path.isdir(source):
        from machined import images

        if os.path.realpath(source) == "/":
            die(f"Failed to create from {source}: the host's root cannot be a machine's root")
        os.rmdir(rootfs)
        images.copy_tree(source, rootfs)
    elif os.path.isfile(source):
        from machined import tarball

        tarball.extract(source, rootfs)
    else:
        die(f"Failed to create from {source}: no such file or directory")


def bootstrap_none(tmpl: Template, rootfs: str, release: str, params: dict[str, Any]) -> None:
    """Templates that only render files."""


BOOTSTRAPS = {"busybox": bootstrap_busybox, "tarball": bootstrap_tarball, "none": bootstrap_none}
# Methods whose trees come from the cache (store.create copies or layers them): Debian-family
# distributions through mmdebstrap or debootstrap.
CACHED = {"debian"}


def run(tmpl: Template, rootfs: str, release: str, params: dict[str, Any]) -> None:
    method = BOOTSTRAPS.get(tmpl.bootstrap)
    if method is None:
        fail(f"bootstrap {tmpl.name}", f"unknown bootstrap method {tmpl.bootstrap!r}")
    method(tmpl, rootfs, release, params)


# --- the cache -----------------------------------------------------------------------------------

def packages(tmpl: Template, params: dict[str, Any]) -> list[str]:
    extra = params.get("packages") or []
    return sorted(set(tmpl.packages) | {str(p) for p in extra})


def cache_key(tmpl: Template, release: str, params: dict[str, Any]) -> str:
    """Named by distro, release and architecture, hashed over everything that shapes the tree."""
    arch = host_arch()
    parts = [CACHE_VERSION, tmpl.distro, release, arch, "minbase", ",".join(tmpl.components),
             ",".join(packages(tmpl, params)), "docs" if params.get("docs") else "nodocs"]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    return f"{tmpl.distro}-{release}-{arch}-{digest}"


def cached_tree(tmpl: Template, release: str, params: dict[str, Any]) -> tuple[str, str]:
    """(key, path) of the pristine tree for this kind of machine, bootstrapping it if it is not cached."""
    key = cache_key(tmpl, release, params)
    top = cache_dir()
    tree = os.path.join(top, key)
    if os.path.isdir(tree):
        return key, tree
    os.makedirs(top, mode=0o755, exist_ok=True)
    with open(os.path.join(top, f".{key}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if sys.stderr.isatty():
                print(f"Waiting for another bootstrap of {key}...", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(tree):
            return key, tree
        for entry in os.listdir(top):  # builds of this key that were killed: we hold its lock
            if entry.startswith(f".{key}.tmp-"):
                from machined import images

                images.remove_tree(os.path.join(top, entry))
        tmp = os.path.join(top, f".{key}.tmp-{os.urandom(4).hex()}")
        try:
            started = time.monotonic()
            tool = _build(tmpl, release, params, tmp, key)
            _make_pristine(tmp)
            meta = {"key": key, "distro": tmpl.distro, "release": release, "architecture": host_arch(),
                    "packages": packages(tmpl, params), "components": tmpl.components, "tool": tool,
                    "mirror": params.get("mirror", ""), "docs": bool(params.get("docs")),
                    "created": time.time(), "seconds": round(time.monotonic() - started, 1)}
            with open(os.path.join(top, f"{key}.json"), "w") as f:
                json.dump(meta, f, indent=1)
            os.rename(tmp, tree)
            tmp = ""
        finally:
            if tmp:
                from machined import images

                images.remove_tree(tmp)
    return key, tree


def _make_pristine(tree: str) -> None:
    for rel in HOST_SPECIFIC:
        try:
            os.unlink(os.path.join(tree, rel))
        except FileNotFoundError:
            pass
    # An empty machine-id: systemd gives every machine its own at first boot (from container_uuid).
    with open(os.path.join(tree, "etc/machine-id"), "w"):
        pass


def command(tmpl: Template, release: str, params: dict[str, Any], target: str) -> tuple[str, list[str]]:
    """The bootstrap tool and its arguments: mmdebstrap where installed, else debootstrap."""
    pkgs = ",".join(packages(tmpl, params))
    mirror = str(params.get("mirror") or "")
    if not mirror:
        fail(f"bootstrap {tmpl.name}", "no mirror given (--set mirror=URL)")
    keyring = []
    if tmpl.keyring:
        if not os.path.exists(tmpl.keyring):
            die(f"Failed to bootstrap {tmpl.distro} {release}: keyring {tmpl.keyring} is missing",
                hint="install the distribution's archive keyring package")
        keyring = [f"--keyring={tmpl.keyring}"]
    if shutil.which("mmdebstrap") and os.environ.get("MACHINED_BOOTSTRAP_TOOL", "mmdebstrap") == "mmdebstrap":
        docs = [] if params.get("docs") else [f"--dpkgopt={opt}" for opt in NO_DOCS]
        return "mmdebstrap", ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
                              f"--architectures={host_arch()}", f"--components={','.join(tmpl.components)}",
                              f"--include={pkgs}", *keyring, *docs, '--aptopt=Acquire::Retries "3"',
                              release, target, mirror]
    if shutil.which("debootstrap"):
        return "debootstrap", ["debootstrap", "--variant=minbase", f"--arch={host_arch()}",
                               f"--components={','.join(tmpl.components)}", f"--include={pkgs}", *keyring,
                               release, target, mirror]
    die(f"Failed to bootstrap {tmpl.distro} {release}: neither mmdebstrap nor debootstrap is installed",
        hint="apt install mmdebstrap")


def _build(tmpl: Template, release: str, params: dict[str, Any], target: str, key: str) -> str:
    tool, argv = command(tmpl, release, params, target)
    logpath = os.path.join(cache_dir(), f"{key}.log")
    # util-linux unshare: a pid namespace whose init is killed with us takes apt and dpkg along,
    # and a mount namespace keeps the tool's /proc, /sys and /dev mounts off the host.
    wrapped = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "slave", "--mount-proc",
               *argv]

    progress = Progress(f"{tmpl.distro} {release} {host_arch()}", target) if sys.stderr.isatty() else None
    # The tool's own temporary files (mmdebstrap's gpg home) beside the target, not in the host's
    # /tmp: what a killed bootstrap leaves there is removed with the target by 'mctl clean'.
    tmpdir = target + ".tmpdir"
    os.makedirs(tmpdir, mode=0o700, exist_ok=True)
    try:
        return _watch(tool, wrapped, logpath, argv, progress, tmpl, release, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _watch(tool: str, wrapped: list[str], logpath: str, argv: list[str], progress: Progress | None,
           tmpl: Template, release: str, tmpdir: str) -> str:
    from machined import images

    with open(logpath, "w") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=images.die_with_us, close_fds=True,
                                env=dict(os.environ, TMPDIR=tmpdir))
        assert proc.stdout is not None
        last = ""
        try:
            os.set_blocking(proc.stdout.fileno(), False)
            buf = b""
            while True:
                import select

                select.select([proc.stdout], [], [], 0.5)
                chunk = proc.stdout.read()
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        line = raw.decode(errors="replace").rstrip()
                        log.write(line + "\n")
                        if line.startswith(("I: ", "E: ", "W: ")):
                            last = line
                            if progress:
                                progress.phase(line[3:])
                elif chunk == b"" and proc.poll() is not None:
                    break
                if progress:
                    progress.tick()
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if progress:
                progress.done()
    if code != 0:
        reason = last[3:] if last.startswith("E: ") else f"{tool} exited with status {code}"
        die(f"Failed to bootstrap {tmpl.distro} {release}: {reason}", hint=f"see {logpath}")
    return tool


class Progress:
    """One status line on the terminal: phase, elapsed time and the size of the tree so far."""

    def __init__(self, what: str, target: str) -> None:
        self.what, self.target = what, target
        self.started = time.monotonic()
        self.current = "starting"
        self.last_size = 0.0
        self.size = 0

    def phase(self, text: str) -> None:
        self.current = text.rstrip(".")
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self.last_size > 2.0:
            self.size = _tree_size(self.target)
            self.last_size = now
        line = f"[{now - self.started:5.0f}s] Bootstrapping {self.what}: {self.current} ({self.size >> 20} MiB)"
        sys.stderr.write("\r\x1b[K" + line[: _columns() - 1])
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 80


def _tree_size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def entries() -> list[dict[str, Any]]:
    """The cached bootstraps, with what went into each."""
    result = []
    try:
        names = sorted(os.listdir(cache_dir()))
    except FileNotFoundError:
        return []
    for name in names:
        if name.endswith(".json") and os.path.isdir(os.path.join(cache_dir(), name[:-5])):
            try:
                with open(os.path.join(cache_dir(), name)) as f:
                    result.append(json.load(f))
            except (OSError, ValueError):
                continue
    return result
