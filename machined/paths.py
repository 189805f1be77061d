"""Where things live, each directory overridable by an environment variable; name validation."""

from __future__ import annotations

import os

from machined.log import die

HOST_NAME_MAX = 64
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _dir(var: str, default: str) -> str:
    # Plain strings, not pathlib: this module is on every command's start-up path.
    return os.environ.get(var) or default


def image_dir() -> str:
    return _dir("MACHINED_IMAGE_DIR", "/var/lib/machines")


def config_dir() -> str:
    return _dir("MACHINED_CONFIG_DIR", "/etc/machined")


def runtime_dir() -> str:
    return _dir("MACHINED_RUNTIME_DIR", "/run/machined")


def cache_dir() -> str:
    return _dir("MACHINED_CACHE_DIR", "/var/cache/machined")


def name_error(name: str) -> str | None:
    """Why name cannot be a machine name, or None. Names become paths, hostnames and unit names."""
    if not name:
        return "name is empty"
    if len(name) > HOST_NAME_MAX:
        return f"name is longer than {HOST_NAME_MAX} characters"
    bad = sorted({c for c in name if c not in _NAME_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:3])
        return f"name contains characters other than letters, digits, '-', '_' and '.': {shown}"
    if name[0] in ".-":
        return f"name starts with {name[0]!r}"
    if ".." in name:
        return "name contains '..'"
    if name.endswith("."):
        return "name ends with '.'"
    return None


def check_name(name: str, what: str = "machine") -> str:
    reason = name_error(name)
    if reason:
        die(f"Invalid {what} name {name!r}: {reason}")
    return name


def image_path(name: str) -> str:
    return os.path.join(image_dir(), check_name(name))


def config_path(name: str) -> str:
    return os.path.join(config_dir(), f"{check_name(name)}.toml")


def machine_runtime_dir(name: str) -> str:
    return os.path.join(runtime_dir(), "machines", check_name(name))


def replay_path(machine: str, op: str) -> str:
    """Where machine's network helper keeps its replay of op (machined.netops)."""
    return os.path.join(runtime_dir(), "network", "replays", f"{check_name(machine)}.{op}.json")


def lock_path(name: str) -> str:
    return os.path.join(runtime_dir(), "locks", check_name(name))


def log_path(name: str) -> str:
    return os.path.join(runtime_dir(), "logs", f"{check_name(name)}.log")


def builtin_dir(what: str) -> str:
    """A data folder shipped with the package (templates, units): installed copy, else the checkout's."""
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "_data", what)
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(here), what)
