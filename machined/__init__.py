"""machined: a system-container manager in the line of LXC and systemd-nspawn."""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def bare_package(name: str) -> None:
    """Register a package without running its __init__, so that importing one of its modules
    loads only what that module needs (dbus-fast's and pyroute2's import every API they have)."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            sys.modules[name] = importlib.util.module_from_spec(spec)


def sha256(data: bytes) -> bytes:
    """SHA-256 from CPython's built-in module: importing hashlib initialises OpenSSL (~3 ms), and
    a start hashes for an address lease and a link name. (The constructor is found once.)"""
    if not _sha256:
        import sys

        # (the module of this Python's version first: a failed import searches the whole path)
        for module in ("_sha256", "_sha2") if sys.version_info < (3, 12) else ("_sha2", "_sha256"):
            try:
                new = __import__(module).sha256
                break
            except ImportError:
                pass
        else:  # a Python built without its own hashes
            from hashlib import sha256 as new
        _sha256.append(new)
    digest: bytes = _sha256[0](data).digest()
    return digest


_sha256: list[Callable[[bytes], Any]] = []
