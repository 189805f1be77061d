"""Root file systems from templates: a bootstrap method, then Jinja-rendered files.

A template is a folder with template.toml (description, bootstrap method, typed parameters) and a
files/ tree mirroring the root file system; every file in it is rendered with a sandboxed Jinja
environment in which an undefined value is an error. Template folders under the configuration
directory (MACHINED_CONFIG_DIR/templates) override and extend the built-in ones.
"""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from typing import Any

from machined import mounts, paths
from machined.log import MachinedError, die, fail

PARAM_TYPES = ("str", "int", "bool", "list")


class Parameter:
    def __init__(self, name: str, type_: str, default: Any, help_: str, choices: list[str] | None = None) -> None:
        self.name, self.type, self.default, self.help, self.choices = name, type_, default, help_, choices

    def parse(self, raw: str) -> Any:
        """Convert a --set value to the parameter's type; ValueError with the reason if it cannot."""
        if self.type == "int":
            try:
                value: Any = int(raw, 0)
            except ValueError:
                raise ValueError(f"{raw!r} is not an integer") from None
        elif self.type == "bool":
            low = raw.lower()
            if low in ("1", "yes", "true", "on"):
                value = True
            elif low in ("0", "no", "false", "off"):
                value = False
            else:
                raise ValueError(f"{raw!r} is not a boolean (yes/no)")
        elif self.type == "list":
            value = [item for item in raw.split(",") if item]
        else:
            value = raw
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if self.type == "str":
            if not isinstance(value, str):
                raise ValueError("must be a string")
            if any(ord(c) < 0x20 and c not in "\t" for c in value):
                raise ValueError("must not contain control characters")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")


class Template:
    def __init__(self, name: str, path: str, meta: dict[str, Any]) -> None:
        self.name = name
        self.path = path
        self.description = str(meta.get("description", ""))
        self.bootstrap = str(meta.get("bootstrap", "none"))
        self.releases = [str(r) for r in meta.get("releases", [])]
        self.default_release = str(meta.get("default_release", self.releases[0] if self.releases else ""))
        self.modes = {k.strip("/"): int(str(v), 8) for k, v in meta.get("modes", {}).items()}
        self.symlinks = {k.strip("/"): str(v) for k, v in meta.get("symlinks", {}).items()}
        self.parameters: dict[str, Parameter] = {}
        for pname, spec in meta.get("parameters", {}).items():
            ptype = spec.get("type", "str")
            if ptype not in PARAM_TYPES:
                fail(f"load template {name}", f"parameter {pname} has unknown type {ptype!r}")
            param = Parameter(pname, ptype, spec.get("default"), str(spec.get("help", "")), spec.get("choices"))
            self.parameters[pname] = param

    @property
    def files_dir(self) -> str:
        return os.path.join(self.path, "files")


def search_dirs() -> list[str]:
    return [os.path.join(paths.config_dir(), "templates"), paths.builtin_dir("templates")]


def load(name: str) -> Template:
    if paths.name_error(name):
        die(f"Unknown template {name!r}", hint="'mctl templates' lists them")
    for d in search_dirs():
        path = os.path.join(d, name)
        meta_path = os.path.join(path, "template.toml")
        if os.path.isfile(meta_path):
            try:
                with open(meta_path, "rb") as f:
                    meta = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                fail(f"load template {name}", str(e))
            return Template(name, path, meta)
    die(f"Unknown template {name!r}", hint="'mctl templates' lists them")


def available() -> list[Template]:
    seen: dict[str, Template] = {}
    for d in search_dirs():
        try:
            entries = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry not in seen and os.path.isfile(os.path.join(d, entry, "template.toml")):
                seen[entry] = load(entry)
    return [seen[k] for k in sorted(seen)]


def resolve_params(tmpl: Template, settings: list[str]) -> dict[str, Any]:
    """Defaults overridden by --set KEY=VALUE; unknown keys and ill-typed values are errors."""
    values: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep:
            die(f"Invalid --set {item!r}: expected KEY=VALUE")
        param = tmpl.parameters.get(key)
        if param is None:
            known = ", ".join(sorted(tmpl.parameters)) or "none"
            die(f"Invalid --set {key}: template {tmpl.name} has no such parameter (it has: {known})")
        try:
            values[key] = param.parse(raw)
        except ValueError as e:
            die(f"Invalid --set {key}: {e}")
    for key, param in tmpl.parameters.items():
        if key not in values:
            if param.default is None:
                die(f"Template {tmpl.name} needs --set {key}=VALUE", hint=param.help or None)
            values[key] = param.default
    return values


def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def check_target(rel: str) -> str:
    """A rendered file's path, relative to the rootfs; refuses anything that could leave it."""
    parts = rel.split("/")
    if rel.startswith("/") or not rel or any(p in ("", ".", "..") for p in parts):
        raise MachinedError(f"Template file {rel!r} has an unsafe target path")
    return rel


def write_file(root_fd: int, rel: str, data: bytes, mode: int = 0o644) -> None:
    """Write rel inside the rootfs without following any symlink on the way (or at the end)."""
    check_target(rel)
    parent, _, base = rel.rpartition("/")
    dfd = mounts.resolve_dir(root_fd, parent, create=True) if parent else os.dup(root_fd)
    try:
        try:
            st = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                os.unlink(base, dir_fd=dfd)  # replace what is there, never write through it
        except FileNotFoundError:
            pass
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def render_into(tmpl: Template, rootfs: str, context: dict[str, Any]) -> list[str]:
    """Render every file of the template into rootfs; returns the written paths."""
    env = _environment()
    written: list[str] = []
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for dirpath, _dirs, files in os.walk(tmpl.files_dir):
            for fname in sorted(files):
                src = os.path.join(dirpath, fname)
                rel = os.path.relpath(src, tmpl.files_dir)
                target = rel[:-3] if rel.endswith(".j2") else rel
                check_target(target)
                with open(src) as f:
                    source = f.read()
                try:
                    text = env.from_string(source).render(**context)
                except Exception as e:  # noqa: BLE001 - jinja raises many types; all are template errors
                    raise MachinedError(f"Failed to render {tmpl.name}/{rel}: {e}") from None
                write_file(root_fd, target, text.encode(), tmpl.modes.get(target, 0o644))
                written.append("/" + target)
        for link, target in tmpl.symlinks.items():
            check_target(link)
            parent, _, base = link.rpartition("/")
            dfd = mounts.resolve_dir(root_fd, parent, create=True) if parent else os.dup(root_fd)
            try:
                try:
                    os.unlink(base, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                os.symlink(target, base, dir_fd=dfd)
            finally:
                os.close(dfd)
    finally:
        os.close(root_fd)
    return written


# --- bootstrap methods -------------------------------------------------------------------------

def bootstrap_busybox(rootfs: str, release: str, params: dict[str, Any]) -> None:
    """A complete BusyBox system from the host's static busybox: no network needed."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        die("Failed to bootstrap busybox: busybox is not installed", hint="apt install busybox-static")
    with open(busybox, "rb") as f:
        head = f.read(4096)
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        die(f"Failed to bootstrap busybox: {busybox} is dynamically linked", hint="apt install busybox-static")
    import subprocess

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


def bootstrap_none(rootfs: str, release: str, params: dict[str, Any]) -> None:
    """Templates that only render files into an existing tree."""


BOOTSTRAPS = {"busybox": bootstrap_busybox, "none": bootstrap_none}


def bootstrap(tmpl: Template, rootfs: str, release: str, params: dict[str, Any]) -> None:
    method = BOOTSTRAPS.get(tmpl.bootstrap)
    if method is None:
        fail(f"bootstrap {tmpl.name}", f"unknown bootstrap method {tmpl.bootstrap!r}")
    method(rootfs, release, params)
