"""Images on disk: creation (atomic), removal, listing. One lock per name guards every change."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from machined import config, paths, state
from machined.log import MachinedError, die

TMP_PREFIX = "."  # images being built are hidden: '.NAME.tmp-XXXX' never shows up as a machine


def image_lock(name: str, verb: str) -> state.Lock:
    """The name's lock for an image operation; refuses a running machine."""
    lock = state.try_lock(name)
    if lock is None:
        if state.running(name) is not None:
            die(f"Failed to {verb} {name}: machine is running", hint=f"'mctl poweroff {name}' first")
        die(f"Failed to {verb} {name}: machine is busy")
    if state.read(name) is not None:
        state.cleanup_stale(name)
    return lock


def create(name: str, template: str, release: str | None, settings: list[str],
           network: config.Network | None = None) -> None:
    paths.check_name(name)
    from machined import templates

    tmpl = templates.load(template)
    params = templates.resolve_params(tmpl, settings)
    release = release or tmpl.default_release
    if tmpl.releases and release not in tmpl.releases:
        die(f"Invalid release {release!r} for template {template}: choose one of {', '.join(tmpl.releases)}")
    target = paths.image_path(name)
    cfg_path = paths.config_path(name)
    lock = image_lock(name, "create")
    tmp = ""
    try:
        if os.path.lexists(target):
            die(f"Failed to create {name}: {target} already exists")
        if os.path.exists(cfg_path):
            die(f"Failed to create {name}: {cfg_path} already exists")
        os.makedirs(paths.image_dir(), mode=0o700, exist_ok=True)
        tmp = os.path.join(paths.image_dir(), f"{TMP_PREFIX}{name}.tmp-{os.urandom(4).hex()}")
        os.mkdir(tmp, 0o755)
        machine_id = config.new_machine_id()
        context = dict(params, name=name, machine_id=machine_id, release=release, template=template)
        templates.bootstrap(tmpl, tmp, release, params)
        templates.render_into(tmpl, tmp, context)
        cfg = config.MachineConfig(name=name, id=machine_id, template=template, release=release,
                                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   network=network or config.Network())
        config.save(cfg)
        try:
            os.rename(tmp, target)  # the commit point: before it there is no machine
        except OSError:
            os.unlink(cfg_path)
            raise
        tmp = ""
    except OSError as e:
        die(f"Failed to create {name}: {e.strerror or e}")
    finally:
        if tmp:
            remove_tree(tmp)
        lock.release()


def remove_tree(path: str) -> None:
    """rm -rf without following symlinks, clearing immutable-free read-only dirs on the way."""
    def onerror(func: Any, p: str, exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o755)
            func(p)
        except OSError:
            pass

    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    shutil.rmtree(path, onerror=onerror)


def remove(name: str) -> None:
    paths.check_name(name)
    target = paths.image_path(name)
    cfg_path = paths.config_path(name)
    if not os.path.lexists(target) and not os.path.exists(cfg_path):
        die(f"Failed to remove {name}: no such machine")
    lock = image_lock(name, "remove")
    try:
        if os.path.lexists(target):
            # Rename first so a half-removed tree never looks like a machine.
            doomed = os.path.join(paths.image_dir(), f"{TMP_PREFIX}{name}.removing-{os.urandom(4).hex()}")
            os.rename(target, doomed)
            remove_tree(doomed)
        for p in (cfg_path, paths.log_path(name), paths.log_path(name) + ".1"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    except OSError as e:
        raise MachinedError(f"Failed to remove {name}: {e.strerror or e}") from None
    finally:
        lock.release()


def _du(path: str) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirs, files in os.walk(path):
        for f in files + dirs:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def images(with_usage: bool = True) -> list[dict[str, Any]]:
    result = []
    try:
        entries = sorted(os.listdir(paths.image_dir()))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if paths.name_error(entry):
            continue
        path = os.path.join(paths.image_dir(), entry)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        st = os.stat(path)
        ro = False
        template = ""
        if config.exists(entry):
            try:
                cfg = config.load(entry)
                ro, template = cfg.read_only, cfg.template
            except MachinedError:
                pass
        result.append({
            "name": entry, "type": "directory", "read_only": ro, "template": template,
            "usage": _du(path) if with_usage else None, "created": st.st_ctime, "modified": st.st_mtime,
            "path": path,
        })
    return result
