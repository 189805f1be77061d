"""Root file systems from templates: a bootstrap method, then Jinja-rendered files.

A template is a folder with template.toml (description, bootstrap method and its package set, typed
parameters, file modes, symlinks, conditions) and a files/ tree mirroring the root file system;
every file in it is rendered with a sandboxed Jinja environment in which an undefined value is an
error. A template may name a `base` template whose files, parameters and settings it extends.
Template folders under the configuration directory (MACHINED_CONFIG_DIR/templates) override and
extend the built-in ones.

Targets (file paths, symlink names) may themselves contain Jinja; once rendered, each must be a
plain relative path, and it is written through descriptors without following any symlink of the
rootfs, so nothing a template or a parameter says can write outside the machine's tree.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from typing import Any

from machined import mounts, paths
from machined.log import MachinedError, die, fail

PARAM_TYPES = ("str", "int", "bool", "list", "lines")
_META_KEYS = {"description", "bootstrap", "base", "distro", "releases", "default_release", "packages",
              "components", "keyring", "mirror", "parameters", "modes", "symlinks", "files", "when"}
_PARAM_KEYS = {"type", "default", "help", "choices", "pattern"}


def parse_bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "yes", "true", "on"):
        return True
    if low in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{raw!r} is not a boolean (yes/no)")


class Parameter:
    def __init__(self, name: str, type_: str, default: Any, help_: str, choices: list[Any] | None = None,
                 pattern: str | None = None) -> None:
        self.name, self.type, self.default, self.help, self.choices = name, type_, default, help_, choices
        self.pattern = re.compile(pattern) if pattern else None

    def parse(self, raw: str, previous: Any = None) -> Any:
        """Convert a --set value to the parameter's type; ValueError with the reason if it cannot.

        A list or lines parameter given several times collects the items of every --set.
        """
        if self.type == "int":
            try:
                value: Any = int(raw, 0)
            except ValueError:
                raise ValueError(f"{raw!r} is not an integer") from None
        elif self.type == "bool":
            value = parse_bool(raw)
        elif self.type in ("list", "lines"):
            sep = "," if self.type == "list" else "\n"
            value = list(previous or []) + [item.strip() for item in raw.split(sep) if item.strip()]
        else:
            value = raw
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if self.type in ("list", "lines"):
            if not isinstance(value, list):
                raise ValueError("must be a list")
            for item in value:
                self._check_str(item)
        elif self.type == "str":
            self._check_str(value)
        elif self.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("must be an integer")
        elif self.type == "bool" and not isinstance(value, bool):
            raise ValueError("must be a boolean")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(str(c) for c in self.choices)}")

    def _check_str(self, value: Any) -> None:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        # Values end up in line-oriented files (passwd, shadow, hosts): no line breaks or controls.
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise ValueError("must not contain control characters or line breaks")
        if self.pattern is not None and value and not self.pattern.fullmatch(value):
            raise ValueError(f"{value!r} does not match {self.pattern.pattern}")


class Template:
    def __init__(self, name: str, path: str, meta: dict[str, Any], base: Template | None = None) -> None:
        where = os.path.join(path, "template.toml")
        unknown = set(meta) - _META_KEYS
        if unknown:
            fail(f"load template {name}", f"unknown key {sorted(unknown)[0]!r} in {where}")
        inherited: dict[str, Any] = base.meta if base else {}
        tables = ("modes", "symlinks", "files", "when")
        self.meta: dict[str, Any] = {**inherited, **{k: v for k, v in meta.items() if k not in tables}}
        self.name = name
        self.path = path
        self.base = base
        self.description = str(self.meta.get("description", ""))
        self.bootstrap = str(self.meta.get("bootstrap", "none"))
        self.distro = str(self.meta.get("distro", name))
        self.releases = [str(r) for r in self.meta.get("releases", [])]
        self.default_release = str(self.meta.get("default_release", self.releases[0] if self.releases else ""))
        self.packages = [str(p) for p in self.meta.get("packages", [])]
        self.components = [str(c) for c in self.meta.get("components", ["main"])]
        self.keyring = str(self.meta.get("keyring", ""))
        # Tables merge with the base's: the derived template's entries win.
        self.modes: dict[str, int] = dict(base.modes) if base else {}
        self.symlinks: dict[str, str] = dict(base.symlinks) if base else {}
        self.when: dict[str, str] = dict(base.when) if base else {}
        self.files: dict[str, str] = dict(base.files) if base else {}  # target (may hold Jinja) -> source
        try:
            self.modes.update({k: int(str(v), 8) for k, v in meta.get("modes", {}).items()})
        except ValueError as e:
            fail(f"load template {name}", f"bad mode in {where}: {e}")
        self.symlinks.update({k: str(v) for k, v in meta.get("symlinks", {}).items()})
        self.when.update({k: str(v) for k, v in meta.get("when", {}).items()})
        files_dir = os.path.join(path, "files")
        for src in _tree_files(files_dir, name):
            rel = os.path.relpath(src, files_dir)
            self.files[rel[:-3] if rel.endswith(".j2") else rel] = src
        for target, source in meta.get("files", {}).items():
            src = os.path.normpath(os.path.join(path, str(source)))
            if not src.startswith(path + "/") or not os.path.isfile(src) or os.path.islink(src):
                fail(f"load template {name}", f"file source {source!r} is not a file inside the template")
            self.files[target] = src
        self.parameters: dict[str, Parameter] = dict(base.parameters) if base else {}
        for pname, spec in meta.get("parameters", {}).items():
            if not isinstance(spec, dict) or set(spec) - _PARAM_KEYS:
                fail(f"load template {name}", f"parameter {pname} in {where}: keys are {', '.join(sorted(_PARAM_KEYS))}"
                     )
            ptype = spec.get("type", "str")
            if ptype not in PARAM_TYPES:
                fail(f"load template {name}", f"parameter {pname} has unknown type {ptype!r}")
            try:
                param = Parameter(pname, ptype, spec.get("default"), str(spec.get("help", "")), spec.get("choices"),
                                  spec.get("pattern"))
                if param.default is not None:
                    param.check(param.default)
            except (ValueError, re.error) as e:
                fail(f"load template {name}", f"parameter {pname}: {e}")
            self.parameters[pname] = param


def _tree_files(top: str, name: str) -> list[str]:
    """The template's files/ tree; a symlink there could read a host file into the machine: refused."""
    result = []
    for dirpath, dirs, files in os.walk(top):
        for entry in dirs + files:
            if os.path.islink(os.path.join(dirpath, entry)):
                fail(f"load template {name}", f"{os.path.join(dirpath, entry)} is a symbolic link")
        result += [os.path.join(dirpath, f) for f in sorted(files)]
    return result


def search_dirs() -> list[str]:
    return [os.path.join(paths.config_dir(), "templates"), paths.builtin_dir("templates")]


def load(name: str, _dirs: list[str] | None = None, _seen: tuple[str, ...] = ()) -> Template:
    if paths.name_error(name):
        die(f"Unknown template {name!r}", hint="'mctl templates' lists them")
    dirs = search_dirs() if _dirs is None else _dirs
    for i, d in enumerate(dirs):
        path = os.path.join(d, name)
        meta_path = os.path.join(path, "template.toml")
        if os.path.isfile(meta_path):
            if path in _seen:
                fail(f"load template {name}", f"base templates form a loop: {' -> '.join((*_seen, path))}")
            try:
                with open(meta_path, "rb") as f:
                    meta = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                fail(f"load template {name}", str(e))
            base = None
            if "base" in meta:
                base_name = str(meta["base"])
                # A template may extend the one of its own name further down the search path (a built-in).
                base = load(base_name, dirs[i + 1:] if base_name == name else search_dirs(), (*_seen, path))
            return Template(name, path, meta, base)
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
            values[key] = param.parse(raw, values.get(key))
        except ValueError as e:
            die(f"Invalid --set {key}: {e}")
    for key, param in tmpl.parameters.items():
        if key not in values:
            if param.default is None:
                die(f"Template {tmpl.name} needs --set {key}=VALUE", hint=param.help or None)
            values[key] = param.default
    return values


def _environment(root_fd: int) -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True,
                               trim_blocks=True, lstrip_blocks=True)

    def rootfs_read(path: str) -> str:
        """A file of the machine's tree as it is before rendering ('' if absent), e.g. to edit /etc/shadow."""
        try:
            return mounts.read_file(root_fd, str(path)).decode(errors="surrogateescape")
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise MachinedError(f"Failed to read /{path} in the root file system: {e.strerror or e}") from None

    env.globals["rootfs_read"] = rootfs_read
    return env


def check_target(rel: str) -> str:
    """A rendered file's path, relative to the rootfs; refuses anything that could leave it."""
    parts = rel.split("/")
    if rel.startswith("/") or not rel or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
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


def write_symlink(root_fd: int, rel: str, target: str) -> None:
    check_target(rel)
    if "\0" in target or not target:
        raise MachinedError(f"Template symlink {rel!r} has an invalid target")
    parent, _, base = rel.rpartition("/")
    dfd = mounts.resolve_dir(root_fd, parent, create=True) if parent else os.dup(root_fd)
    try:
        try:
            os.unlink(base, dir_fd=dfd)
        except FileNotFoundError:
            pass
        os.symlink(target, base, dir_fd=dfd)
    finally:
        os.close(dfd)


def render_into(tmpl: Template, rootfs: str, context: dict[str, Any]) -> list[str]:
    """Render every file of the template into rootfs; returns the written paths."""
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        env = _environment(root_fd)

        def render(text: str, what: str) -> str:
            try:
                return str(env.from_string(text).render(**context))
            except MachinedError:
                raise
            except Exception as e:  # noqa: BLE001 - jinja raises many types; all are template errors
                raise MachinedError(f"Failed to render {what} of template {tmpl.name}: {e}") from None

        def wanted(target: str) -> bool:
            cond = tmpl.when.get(target)
            if cond is None:
                return True
            try:
                return bool(env.compile_expression(cond, undefined_to_none=False)(**context))
            except Exception as e:  # noqa: BLE001 - as in render()
                raise MachinedError(f"Failed to evaluate the condition of {target} in template {tmpl.name}: {e}"
                                    ) from None

        # Every text first, then the writes: a template error leaves the tree untouched.
        writes: list[tuple[str, bytes | None, str]] = []
        for target_src, src in sorted(tmpl.files.items()):
            target = check_target(render(target_src, f"target {target_src!r}"))
            if not wanted(target_src):
                continue
            with open(src, errors="surrogateescape") as f:
                source = f.read()
            writes.append((target, render(source, os.path.relpath(src, tmpl.path)).encode(errors="surrogateescape"),
                           target_src))
        for link_src, link_target in sorted(tmpl.symlinks.items()):
            link = check_target(render(link_src, f"symlink {link_src!r}"))
            if wanted(link_src):
                writes.append((link, None, render(link_target, f"symlink target of {link_src}")))
        written: list[str] = []
        for target, data, extra in writes:
            if data is None:
                write_symlink(root_fd, target, extra)
            else:
                write_file(root_fd, target, data, tmpl.modes.get(extra, tmpl.modes.get(target, 0o644)))
            written.append("/" + target)
        # Modes of directories (e.g. root/.ssh) that rendered files created or that were there.
        for target, mode in tmpl.modes.items():
            if target in tmpl.files or not wanted(target):
                continue
            try:
                dfd = mounts.resolve_dir(root_fd, check_target(target))
            except FileNotFoundError:
                continue
            try:
                os.chmod(mounts.fdpath(dfd), mode)
            finally:
                os.close(dfd)
    except OSError as e:
        raise MachinedError(f"Failed to render template {tmpl.name}: {e.strerror or e}") from None
    finally:
        os.close(root_fd)
    return written
