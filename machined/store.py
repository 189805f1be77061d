"""Images on disk: creation (atomic), removal, listing. One lock per name guards every change.

A new image is built under a hidden temporary name in the pool's private directory and renamed
into place as the last step: a create, clone or import killed at any moment, or failing on a full
disk, leaves no machine, only a temporary tree that the next `mctl clean` removes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from machined import config, images, mounts, netagent, paths, state
from machined.log import MachinedError, die


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


class Creation:
    """A new image name: locked, checked free, built in a temporary tree, committed by a rename."""

    def __init__(self, name: str, verb: str = "create") -> None:
        self.name, self.verb = name, verb
        self.tmp = ""
        self.lock: state.Lock | None = None

    def __enter__(self) -> Creation:
        paths.check_name(self.name)
        self.lock = image_lock(self.name, self.verb)
        try:
            target = paths.image_path(self.name)
            if os.path.lexists(target):
                die(f"Failed to {self.verb} {self.name}: {target} already exists")
            if config.exists(self.name):
                die(f"Failed to {self.verb} {self.name}: {paths.config_path(self.name)} already exists",
                    hint="'mctl clean' removes the settings of a machine whose image is gone")
            self.tmp = images.new_tmp(self.name)
        except BaseException:
            self.lock.release()
            raise
        return self

    def commit(self, cfg: config.MachineConfig) -> None:
        """Settings first, then the image: the rename is the moment the machine exists."""
        config.save(cfg)
        try:
            os.rename(self.tmp, paths.image_path(self.name))
        except OSError:
            os.unlink(paths.config_path(self.name))
            raise
        self.tmp = ""

    def __exit__(self, typ: object, exc: object, tb: object) -> None:
        try:
            if self.tmp:
                images.remove_tree(self.tmp)
        finally:
            assert self.lock is not None
            self.lock.release()
        if isinstance(exc, OSError):
            raise MachinedError(f"Failed to {self.verb} {self.name}: {exc.strerror or exc}") from None


def create(name: str, template: str, release: str | None, settings: list[str], storage: str = "auto",
           network: config.Network | None = None) -> str:
    """Make machine name from a template; returns how its tree was made (for the user)."""
    paths.check_name(name)
    from machined import bootstrap, templates

    tmpl = templates.load(template)
    params = templates.resolve_params(tmpl, settings)
    if release and not tmpl.releases:
        die(f"Invalid release {release!r}: template {template} has no releases")
    release = release or tmpl.default_release
    if tmpl.releases and release not in tmpl.releases:
        die(f"Invalid release {release!r} for template {template}: choose one of {', '.join(tmpl.releases)}")
    if storage not in images.STORAGES:
        die(f"Invalid storage {storage!r}: choose one of {', '.join(images.STORAGES)}")
    machine_id = config.new_machine_id()
    context = dict(params, name=name, machine_id=machine_id, release=release, template=template,
                   architecture=bootstrap.host_arch())
    with Creation(name) as c:
        base = ""
        how = tmpl.bootstrap
        held = None
        try:
            if tmpl.bootstrap in bootstrap.CACHED:
                key, tree = bootstrap.cached_tree(tmpl, release, params)
                how = images.choose_storage(storage, tree)
                if how == "overlay":
                    held = images.hold_base(key, tree)  # until the settings naming it are saved
                    base = key
                    os.mkdir(c.tmp, 0o755)
                else:
                    images.copy_tree(tree, c.tmp)
                how = f"{how} from {key}"
            else:
                if storage == "overlay":
                    die(f"Failed to create {name}: template {template} makes no shared base for an overlay",
                        hint="--storage directory")
                os.mkdir(c.tmp, 0o755)
                bootstrap.run(tmpl, c.tmp, release, params)
            overlay = None
            if base:
                overlay = mounts.Overlay([images.base_path(base)], upper=c.tmp, work=c.tmp + ".work")
            try:
                with images.View(c.tmp, overlay, read_only=False):
                    templates.render_into(tmpl, c.tmp, context)
            finally:
                if overlay:
                    images.remove_tree(overlay.work)
            c.commit(config.MachineConfig(name=name, id=machine_id, template=template, release=release,
                                          created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), base=base,
                                          network=network or config.Network()))
        finally:
            if held:
                held.release()
    return how


def remove(name: str) -> None:
    paths.check_name(name)
    target = paths.image_path(name)
    cfg_path = paths.config_path(name)
    if not os.path.lexists(target) and not os.path.exists(cfg_path):
        die(f"Failed to remove {name}: no such machine")
    lock = image_lock(name, "remove")
    try:
        if config.exists(name) and config.load(name).read_only:
            die(f"Failed to remove {name}: image is read-only", hint=f"'mctl read-only {name} no' first")
        if os.path.lexists(target):
            # Rename first so a half-removed tree never looks like a machine.
            doomed = images.new_tmp(name, "removing")
            os.rename(target, doomed)
            images.remove_tree(doomed)
        for extra in (images.private_dir("work", name), images.private_dir("snapshots", name)):
            if os.path.lexists(extra):
                images.remove_tree(extra)
        for p in (cfg_path, paths.log_path(name), paths.log_path(name) + ".1", *netagent.replay_paths(name)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    except OSError as e:
        raise MachinedError(f"Failed to remove {name}: {e.strerror or e}") from None
    finally:
        lock.release()


def list_images(with_usage: bool = True) -> list[dict[str, Any]]:
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
        template = base = ""
        created = st.st_ctime
        if config.exists(entry):
            try:
                cfg = config.load(entry)
                ro, template, base = cfg.read_only, cfg.template, cfg.base
                if cfg.created:
                    created = time.mktime(time.strptime(cfg.created, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
            except (MachinedError, ValueError):
                pass
        result.append({
            "name": entry, "type": "overlay" if base else "directory", "read_only": ro, "template": template,
            "base": base, "usage": images.du(path) if with_usage else None, "created": created,
            "modified": st.st_mtime, "path": path,
        })
    return result
