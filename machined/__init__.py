"""machined: a system-container manager in the line of LXC and systemd-nspawn."""

__version__ = "0.1.0"


def bare_package(name: str) -> None:
    """Register a package without running its __init__, so that importing one of its modules
    loads only what that module needs (dbus-fast's and pyroute2's import every API they have)."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            sys.modules[name] = importlib.util.module_from_spec(spec)
