"""Device-node allowlists: the rules, the device settings they come from, and their enforcement.

v1: devices.deny/devices.allow on the machine's scope. v2 without systemd: a
BPF_PROG_TYPE_CGROUP_DEVICE program attached to the scope, as systemd does for DevicePolicy=closed,
replaced atomically (BPF_F_REPLACE) when the list changes at runtime. With systemd, device_allow()
gives the same list as DeviceAllow= entries.

Settings name devices the way DeviceAllow= does: a node ("/dev/fuse rw"), a driver class from
/proc/devices ("char-usb_device rw", "block-loop r"), or a raw rule ("c 10:232 rwm").
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

from machined import linux
from machined.log import fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable


class Rule:
    """One allowlist entry: type c/b/a, major and minor (None = any), access a subset of 'rwm'."""

    __slots__ = ("access", "kind", "major", "minor")

    def __init__(self, kind: str, major: int | None, minor: int | None, access: str) -> None:
        if kind not in ("c", "b", "a") or not access or set(access) - set("rwm"):
            fail("parse device rule", f"{kind} {major}:{minor} {access}")
        self.kind, self.major, self.minor = kind, major, minor
        self.access = "".join(c for c in "rwm" if c in access)

    @classmethod
    def parse(cls, text: str) -> Rule:
        """'c 1:3 rwm', 'c 136:* rw', 'b *:* m'."""
        try:
            kind, numbers, access = text.split()
            major_s, minor_s = numbers.split(":")
            major = None if major_s == "*" else int(major_s)
            minor = None if minor_s == "*" else int(minor_s)
        except ValueError:
            fail("parse device rule", f"{text!r} is not of the form 'c|b MAJOR:MINOR ACCESS'")
        return cls(kind, major, minor, access)

    def __str__(self) -> str:
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {major}:{minor} {self.access}"

    def __repr__(self) -> str:
        return f"Rule({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rule) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


# systemd-nspawn's default: the API nodes, ptys, fuse and tun; creating any node is allowed,
# opening the others is not.
DEFAULT: tuple[Rule, ...] = tuple(Rule.parse(t) for t in (
    "c 1:3 rwm",     # null
    "c 1:5 rwm",     # zero
    "c 1:7 rwm",     # full
    "c 1:8 rwm",     # random
    "c 1:9 rwm",     # urandom
    "c 5:0 rwm",     # tty
    "c 5:1 rwm",     # console
    "c 5:2 rwm",     # ptmx
    "c 136:* rwm",   # pts (the console is a host pty slave, also 136:*)
    "c 10:229 rwm",  # fuse
    "c 10:200 rwm",  # net/tun
    "c *:* m",
    "b *:* m",
))

# The nodes created in every machine's /dev: name, type, major, minor, mode.
API_NODES: tuple[tuple[str, str, int, int, int], ...] = (
    ("null", "c", 1, 3, 0o666),
    ("zero", "c", 1, 5, 0o666),
    ("full", "c", 1, 7, 0o666),
    ("random", "c", 1, 8, 0o666),
    ("urandom", "c", 1, 9, 0o666),
    ("tty", "c", 5, 0, 0o666),
    ("fuse", "c", 10, 229, 0o666),
    ("net/tun", "c", 10, 200, 0o666),
)


# --- device settings ------------------------------------------------------------------------------

def parse_access(access: str) -> str:
    if not access or set(access) - set("rwm"):
        raise ValueError(f"access {access!r} is not a combination of r, w and m")
    return "".join(c for c in "rwm" if c in access)


def parse_entry(text: str) -> tuple[str, str, str]:
    """Syntax only (no lookups): ('rule', 'c 1:3', access), ('node', '/dev/fuse', access) or
    ('class', 'char-usb_device', access). Access defaults to rwm, as with DeviceAllow=."""
    words = text.split()
    if len(words) == 3 and words[0] in ("a", "b", "c"):
        rule = Rule.parse(text)
        return "rule", f"{rule.kind} {str(rule).split()[1]}", rule.access
    if len(words) not in (1, 2):
        raise ValueError(f"{text!r} is not 'PATH [ACCESS]', 'char-CLASS [ACCESS]' or 'c|b MAJOR:MINOR ACCESS'")
    spec, access = words[0], parse_access(words[1] if len(words) == 2 else "rwm")
    if spec.startswith(("char-", "block-")):
        if not spec.partition("-")[2]:
            raise ValueError(f"{spec!r} names no device class")
        return "class", spec, access
    check_node_path(spec)
    return "node", spec, access


def check_node_path(path: str) -> str:
    """A node's path is the same on the host and in the machine: a plain path below /dev."""
    if not path.startswith("/dev/") or os.path.normpath(path) != path or any(
            c < " " or c == "\x7f" for c in path):
        raise ValueError(f"{path!r} is not a device node path below /dev")
    if path.startswith(("/dev/pts/", "/dev/shm/", "/dev/mqueue/")) or path == "/dev/console":
        raise ValueError(f"{path} is managed by the machine itself")
    return path


class Node:
    """A device node to create in a machine's /dev, with the host node's mode and owner."""

    __slots__ = ("access", "gid", "kind", "major", "minor", "mode", "path", "syspath", "uid")

    def __init__(self, path: str, kind: str, major: int, minor: int, mode: int, uid: int, gid: int,
                 access: str, syspath: str = "") -> None:
        self.path, self.kind, self.major, self.minor = path, kind, major, minor
        self.mode, self.uid, self.gid, self.access, self.syspath = mode, uid, gid, access, syspath

    def rule(self) -> Rule:
        return Rule(self.kind, self.major, self.minor, self.access)

    def to_state(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_state(cls, d: dict[str, object]) -> Node:
        n = {k: int(v) for k, v in d.items() if k in ("major", "minor", "mode", "uid", "gid") and isinstance(v, int)}
        return cls(str(d["path"]), str(d["kind"]), n["major"], n["minor"], n["mode"], n["uid"], n["gid"],
                   str(d["access"]), str(d.get("syspath", "")))

    def __str__(self) -> str:
        return f"{self.path} ({self.kind} {self.major}:{self.minor} {self.access})"


def resolve_node(path: str, access: str) -> Node:
    """Look a node up with udev (sysfs here: no udevd needed): it must be a device the kernel knows."""
    check_node_path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        fail(f"find device {path}", e)
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        fail(f"find device {path}", "not a device node")
    kind = "b" if stat.S_ISBLK(st.st_mode) else "c"
    import pyudev

    try:
        device = pyudev.Devices.from_device_number(pyudev.Context(), "block" if kind == "b" else "char", st.st_rdev)
    except pyudev.DeviceNotFoundError:
        fail(f"find device {path}", f"no device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} is known to the kernel")
    # A symlink (/dev/disk/by-id/...) gets the device's own node name inside.
    where = path if not os.path.islink(path) else str(device.device_node or path)
    return Node(where, kind, os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode), st.st_uid,
                st.st_gid, access, str(device.sys_path))


def node_from_device(device: object, access: str) -> Node | None:
    """The node of a pyudev Device (from a uevent or an enumeration), or None if it has none."""
    devname = getattr(device, "device_node", None)
    number = getattr(device, "device_number", 0)
    if not devname or not number:
        return None
    kind = "b" if getattr(device, "subsystem", "") == "block" else "c"
    mode, uid, gid = 0o600, 0, 0
    try:
        st = os.stat(devname)  # devtmpfs made it before the kernel sent the uevent
        if (stat.S_ISBLK(st.st_mode) if kind == "b" else stat.S_ISCHR(st.st_mode)) and st.st_rdev == number:
            mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    except OSError:
        pass
    return Node(str(devname), kind, os.major(number), os.minor(number), mode, uid, gid, access,
                str(getattr(device, "sys_path", "")))


def resolve_class(spec: str, access: str) -> list[Rule]:
    """'char-usb_device' -> one rule per major of that driver in /proc/devices (globs allowed)."""
    import fnmatch

    kind_word, _, pattern = spec.partition("-")
    kind = "c" if kind_word == "char" else "b"
    section = "Character devices:" if kind == "c" else "Block devices:"
    majors: list[int] = []
    current = ""
    with open("/proc/devices") as f:
        for line in f:
            line = line.strip()
            if line.endswith(":"):
                current = line
            elif line and current == section:
                major, _, name = line.partition(" ")
                if fnmatch.fnmatchcase(name, pattern):
                    majors.append(int(major))
    if not majors:
        fail(f"find device class {spec}", f"no {kind_word} driver named {pattern!r} in /proc/devices")
    return [Rule(kind, major, None, access) for major in sorted(set(majors))]


def device_allow(rules: Iterable[Rule]) -> list[tuple[str, str]]:
    """The rules as systemd's DeviceAllow= entries (specifier, access), for a scope made through
    systemd: '/dev/char/1:3', 'char-pts' for a whole major, 'char-*' for every node of a type."""
    names: dict[tuple[str, int], str] = {}
    try:
        with open("/proc/devices") as f:
            kind = ""
            for line in f:
                if line.startswith("Character"):
                    kind = "c"
                elif line.startswith("Block"):
                    kind = "b"
                elif line.strip():
                    major, _, name = line.strip().partition(" ")
                    names.setdefault((kind, int(major)), name)
    except OSError:
        pass
    result: list[tuple[str, str]] = []
    for rule in rules:
        word = "char" if rule.kind == "c" else "block"
        if rule.kind == "a":
            result += [("char-*", rule.access), ("block-*", rule.access)]
        elif rule.major is None:
            result.append((f"{word}-*", rule.access))
        elif rule.minor is not None:
            result.append((f"/dev/{word}/{rule.major}:{rule.minor}", rule.access))
        elif (rule.kind, rule.major) in names:
            result.append((f"{word}-{names[rule.kind, rule.major]}", rule.access))
    return result


# --- nodes in a machine's /dev ------------------------------------------------------------------

def make_node(root_fd: int, node: Node) -> None:
    """Create node under root_fd (a machine's root, or its /dev's parent); no symlink is followed."""
    from machined import mounts

    parent, name = os.path.split(node.path.lstrip("/"))
    dir_fd = mounts.resolve_dir(root_fd, parent, create=True)
    try:
        ftype = stat.S_IFBLK if node.kind == "b" else stat.S_IFCHR
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_IFMT(st.st_mode) == ftype and st.st_rdev == os.makedev(node.major, node.minor):
                return
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise OSError(errno.EEXIST, f"{node.path} exists and is not a device node")
            os.unlink(name, dir_fd=dir_fd)  # a stale node of another device
        old = os.umask(0)
        try:
            os.mknod(name, ftype | node.mode, os.makedev(node.major, node.minor), dir_fd=dir_fd)
        finally:
            os.umask(old)
        os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)


def remove_node(root_fd: int, node: Node) -> None:
    """Remove node if it is still that device (the guest may have put something else there)."""
    from machined import mounts

    parent, name = os.path.split(node.path.lstrip("/"))
    try:
        dir_fd = mounts.resolve_dir(root_fd, parent)
    except OSError:
        return
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        ftype = stat.S_IFBLK if node.kind == "b" else stat.S_IFCHR
        if stat.S_IFMT(st.st_mode) == ftype and st.st_rdev == os.makedev(node.major, node.minor):
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)


# --- v1 ------------------------------------------------------------------------------------------

def apply_v1(cgroup_dir: str, rules: Iterable[Rule]) -> None:
    linux.write_file(os.path.join(cgroup_dir, "devices.deny"), "a")
    fd = os.open(os.path.join(cgroup_dir, "devices.allow"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        for rule in rules:
            os.write(fd, str(rule).encode())  # one rule per write(2)
    finally:
        os.close(fd)


def allow_v1(cgroup_dir: str, rule: Rule) -> None:
    """Allow on the scope and every cgroup below it: v1 children copied the list when they were made."""
    for dirpath, _dirs, _files in os.walk(cgroup_dir):  # top-down: a child may not exceed its parent
        linux.write_file(os.path.join(dirpath, "devices.allow"), str(rule))


def deny_v1(cgroup_dir: str, rule: Rule) -> None:
    linux.write_file(os.path.join(cgroup_dir, "devices.deny"), str(rule))  # the kernel takes it from children too


# --- v2: a cgroup device BPF program -------------------------------------------------------------

_SYS_bpf = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_DETACH = 9
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_PROG_QUERY = 16
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
_BPF_F_REPLACE = 4
_PROG_NAME = b"machined_devs"
_ACC = {"m": 1, "r": 2, "w": 4}
_TYPE = {"b": 1, "c": 2}


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


_LDX_W, _AND32_K, _RSH32_K, _MOV32_X, _MOV64_K, _JNE_K, _EXIT = 0x61, 0x54, 0x74, 0xBC, 0xB7, 0x55, 0x95


def program(rules: Iterable[Rule]) -> bytes:
    """Assemble: r2 = type, r3 = access, r4 = major, r5 = minor; first matching rule allows."""
    code = [
        _insn(_LDX_W, 2, 1, 0), _insn(_AND32_K, 2, imm=0xFFFF),
        _insn(_LDX_W, 3, 1, 0), _insn(_RSH32_K, 3, imm=16),
        _insn(_LDX_W, 4, 1, 4), _insn(_LDX_W, 5, 1, 8),
    ]
    for rule in rules:
        # Each check jumps past the rest of this rule's block when it fails.
        checks: list[tuple[int, int, int]] = []  # (register, value, kind: 0 = compare, 1 = access)
        if rule.kind != "a":
            checks.append((2, _TYPE[rule.kind], 0))
        mask = sum(_ACC[c] for c in rule.access)
        if mask != 7:
            checks.append((3, (~mask) & 7, 1))
        if rule.major is not None:
            checks.append((4, rule.major, 0))
        if rule.minor is not None:
            checks.append((5, rule.minor, 0))
        block_len = sum(3 if k else 1 for _, _, k in checks) + 2
        pos = 0
        for reg, value, kind in checks:
            if kind:
                code += [_insn(_MOV32_X, 1, reg), _insn(_AND32_K, 1, imm=value)]
                pos += 2
                reg, value = 1, 0
            pos += 1
            code.append(_insn(_JNE_K, reg, off=block_len - pos, imm=value))
        code += [_insn(_MOV64_K, 0, imm=1), _insn(_EXIT)]
    code += [_insn(_MOV64_K, 0, imm=0), _insn(_EXIT)]
    return b"".join(code)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    r = _libc.syscall(_SYS_bpf, ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(r)


def _load(insns: bytes, log_size: int) -> tuple[int, str]:
    """Load the program; log_size > 0 asks the verifier to explain itself (only after a failure)."""
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(max(log_size, 1))
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQII16s", attr, 0, _BPF_PROG_TYPE_CGROUP_DEVICE, len(insns) // 8,
                     ctypes.addressof(insn_buf), ctypes.addressof(license), 1 if log_size else 0, log_size,
                     ctypes.addressof(log) if log_size else 0, 0, 0, _PROG_NAME)
    try:
        return _bpf(_BPF_PROG_LOAD, attr), ""
    except OSError as e:
        return -1, f"{e.strerror}: {log.value.decode(errors='replace').strip()}" if log_size else str(e.strerror)


def _attached(cg_fd: int) -> list[int]:
    """Descriptors of our device programs attached directly to the cgroup."""
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(40)
    struct.pack_into("<IIIIQI", attr, 0, cg_fd, _BPF_CGROUP_DEVICE, 0, 0, ctypes.addressof(ids), len(ids))
    _bpf(_BPF_PROG_QUERY, attr)
    count = struct.unpack_from("<I", attr, 24)[0]
    fds = []
    for prog_id in ids[:count]:
        get = ctypes.create_string_buffer(12)
        struct.pack_into("<III", get, 0, prog_id, 0, 0)
        try:
            fd = _bpf(_BPF_PROG_GET_FD_BY_ID, get)
        except OSError:
            continue  # detached in the meantime
        info = ctypes.create_string_buffer(256)
        query = ctypes.create_string_buffer(16)
        struct.pack_into("<IIQ", query, 0, fd, len(info), ctypes.addressof(info))
        try:
            _bpf(_BPF_OBJ_GET_INFO_BY_FD, query)
            name = info.raw[64:80].rstrip(b"\0")
        except OSError:
            name = b""
        if name == _PROG_NAME:
            fds.append(fd)
        else:
            os.close(fd)
    return fds


def apply_v2(cgroup_dir: str, rules: Iterable[Rule]) -> None:
    """Attach the policy to the cgroup; a policy of ours already there is replaced in one step."""
    insns = program(rules)
    prog, _ = _load(insns, 0)
    if prog < 0:
        _, why = _load(insns, 1 << 20)
        fail(f"load device policy for {cgroup_dir}", why)
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            old = _attached(cg)
            try:
                attach = ctypes.create_string_buffer(20)
                flags = _BPF_F_ALLOW_MULTI | (_BPF_F_REPLACE if old else 0)
                struct.pack_into("<IIIII", attach, 0, cg, prog, _BPF_CGROUP_DEVICE, flags, old[0] if old else 0)
                _bpf(_BPF_PROG_ATTACH, attach)
                for extra in old[1:]:  # never more than one, unless a replace raced with us
                    detach = ctypes.create_string_buffer(12)
                    struct.pack_into("<III", detach, 0, cg, extra, _BPF_CGROUP_DEVICE)
                    _bpf(_BPF_PROG_DETACH, detach)
            finally:
                for fd in old:
                    os.close(fd)
        finally:
            os.close(cg)
    except OSError as e:
        fail(f"attach device policy to {cgroup_dir}", e)
    finally:
        os.close(prog)  # the attachment keeps the program alive for the cgroup's lifetime
