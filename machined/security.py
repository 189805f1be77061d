"""Capabilities kept by a machine's processes (systemd-nspawn's retained default)."""

from __future__ import annotations

from machined import linux

CAPS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

RETAINED = (
    "AUDIT_CONTROL AUDIT_WRITE CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID IPC_OWNER KILL LEASE "
    "LINUX_IMMUTABLE MKNOD NET_BIND_SERVICE NET_BROADCAST NET_RAW SETFCAP SETGID SETPCAP SETUID "
    "SYS_ADMIN SYS_BOOT SYS_CHROOT SYS_NICE SYS_PTRACE SYS_RESOURCE SYS_TTY_CONFIG"
).split()


def cap_numbers(names: list[str] | tuple[str, ...]) -> frozenset[int]:
    return frozenset(CAPS[n] for n in names)


def bounding_set(extra: tuple[str, ...] = ()) -> frozenset[int]:
    """The bounding set for a machine; extra adds capabilities (e.g. NET_ADMIN with a private network)."""
    return cap_numbers(RETAINED) | cap_numbers(extra)


def drop_capabilities(extra: tuple[str, ...] = ()) -> None:
    linux.drop_bounding_caps(bounding_set(extra))
