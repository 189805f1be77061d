"""Device-node allowlists: the rules, and their enforcement in the devices cgroup.

v1: devices.deny/devices.allow on the machine's scope. v2 without systemd: a
BPF_PROG_TYPE_CGROUP_DEVICE program attached to the scope, as systemd does for DevicePolicy=closed.
"""

from __future__ import annotations

import ctypes
import os
import struct

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


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def apply_v1(cgroup_dir: str, rules: Iterable[Rule]) -> None:
    _write(os.path.join(cgroup_dir, "devices.deny"), "a")
    fd = os.open(os.path.join(cgroup_dir, "devices.allow"), os.O_WRONLY | os.O_CLOEXEC)
    try:
        for rule in rules:
            os.write(fd, str(rule).encode())  # one rule per write(2)
    finally:
        os.close(fd)


def allow_v1(cgroup_dir: str, rule: Rule) -> None:
    _write(os.path.join(cgroup_dir, "devices.allow"), str(rule))


def deny_v1(cgroup_dir: str, rule: Rule) -> None:
    _write(os.path.join(cgroup_dir, "devices.deny"), str(rule))


# --- v2: a cgroup device BPF program -------------------------------------------------------------

_SYS_bpf = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_DETACH = 9
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
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
                     ctypes.addressof(log) if log_size else 0, 0, 0, b"machined_devs")
    try:
        return _bpf(_BPF_PROG_LOAD, attr), ""
    except OSError as e:
        return -1, f"{e.strerror}: {log.value.decode(errors='replace').strip()}" if log_size else str(e.strerror)


def apply_v2(cgroup_dir: str, rules: Iterable[Rule]) -> None:
    insns = program(rules)
    prog, _ = _load(insns, 0)
    if prog < 0:
        _, why = _load(insns, 1 << 20)
        fail(f"load device policy for {cgroup_dir}", why)
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            attach = ctypes.create_string_buffer(20)
            struct.pack_into("<IIIII", attach, 0, cg, prog, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI, 0)
            _bpf(_BPF_PROG_ATTACH, attach)
        finally:
            os.close(cg)
    except OSError as e:
        fail(f"attach device policy to {cgroup_dir}", e)
    finally:
        os.close(prog)  # the attachment keeps the program alive for the cgroup's lifetime
