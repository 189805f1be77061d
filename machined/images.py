"""Image storage: cheap copies, overlay layers, clone, rename, read-only, snapshots, ephemeral runs.

An image is a directory /var/lib/machines/NAME. A "directory" image holds the whole tree (copied
with reflinks where the file system has them). An "overlay" image holds only its own changes, on
top of a shared, never-modified base layer (a pristine bootstrap) under the pool's private
directory; the machine's settings name the base. The merged tree only ever exists inside a
private mount namespace: the machine's own, or a throw-away one for a check or an export.

Everything machined keeps in the pool besides images lives under IMAGE_DIR/.machined (hidden from
machinectl and list-images, on the same file system so renames are atomic):

    tmp/NAME.tmp-XXXX          a create, clone, import or restore in progress (or killed: `mctl clean`)
    tmp/NAME.removing-XXXX     a removal in progress
    bases/KEY                  shared base layers of overlay images
    work/NAME                  overlayfs work directory of an overlay image
    ephemeral/NAME-XXXX        the throw-away layer of a `start --ephemeral` run
    snapshots/NAME/SNAP[.json] snapshots of image NAME
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import time
from typing import Any

from machined import config, linux, mounts, paths, signals, state
from machined.log import MachinedError, die

FICLONE = 0x40049409
STORAGES = ("auto", "directory", "overlay")


def private_dir(*parts: str) -> str:
    return os.path.join(paths.image_dir(), ".machined", *parts)


def new_tmp(name: str, what: str = "tmp") -> str:
    d = private_dir("tmp")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, f"{name}.{what}-{os.urandom(4).hex()}")


# --- copying and removing trees ------------------------------------------------------------------

def copy_tree(src: str, dst: str) -> None:
    """dst becomes a copy of src with owners, modes, times, xattrs, ACLs, hard links and device nodes.

    GNU cp does it best: copy_file_range, and reflinks (copy-on-write) where the file system has them.
    """
    proc = subprocess.run(["cp", "-a", "--reflink=auto", "--no-target-directory", "--", src, dst],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, preexec_fn=die_with_us)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"cp exited {proc.returncode}"
        if "No space left" in reason:
            reason = os.strerror(errno.ENOSPC)
        raise MachinedError(f"Failed to copy {src} to {dst}: {reason.removeprefix('cp: ')}")


def die_with_us() -> None:
    """preexec_fn of helpers (cp, tar): a killed mctl must not leave one writing into a tree."""
    linux.set_pdeathsig(signals.SIGKILL)


def remove_tree(path: str) -> None:
    """rm -rf without following symlinks, best effort; directories without rwx for their owner (a
    guest's 0555 directory, overlayfs's work/work with mode 000) are opened up first."""
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.chmod(path, 0o700)
    for dirpath, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(dirpath, d)
            st = os.stat(p, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
                os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def reflink_works(src_tree: str) -> bool:
    """Whether files of src_tree can be cloned (FICLONE) into the image pool: btrfs, XFS, ..."""
    probe = ""
    try:
        for entry in os.scandir(os.path.join(src_tree, "etc")):
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_size:
                probe = entry.path
                break
        if not probe:
            return False
        dst = new_tmp("reflink-probe", "probe")
        with open(probe, "rb") as s, open(dst, "wb") as d:
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
                return True
            except OSError:
                return False
            finally:
                os.unlink(dst)
    except OSError:
        return False


def overlay_available() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def choose_storage(requested: str, tree: str) -> str:
    """auto: a copy where copies are copy-on-write (reflinks), else an overlay on a shared base."""
    if requested != "auto":
        if requested == "overlay" and not overlay_available():
            die("Failed to create an overlay image: the kernel has no overlay file system",
                hint="--storage directory")
        return requested
    if reflink_works(tree) or not overlay_available():
        return "directory"
    return "overlay"


# --- base layers ---------------------------------------------------------------------------------

def base_path(key: str) -> str:
    return private_dir("bases", paths.check_name(key, "base layer"))


class BaseRef:
    """A shared hold on a base layer while an image that will name it is being made (clean waits)."""

    def __init__(self, key: str, fd: int) -> None:
        self.key, self.fd = key, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _base_lock(key: str) -> int:
    d = private_dir("bases")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.open(os.path.join(d, f".{key}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def hold_base(key: str, tree: str) -> BaseRef:
    """The base layer KEY in the pool, copied once from the cached tree; held until release()."""
    fd = _base_lock(key)
    try:
        target = base_path(key)
        if not os.path.isdir(target):
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not os.path.isdir(target):
                tmp = os.path.join(private_dir("bases"), f".{key}.tmp-{os.urandom(4).hex()}")
                try:
                    copy_tree(tree, tmp)
                    os.rename(tmp, target)
                finally:
                    if os.path.lexists(tmp):
                        remove_tree(tmp)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return BaseRef(key, fd)
    except BaseException:
        os.close(fd)
        raise


# --- merged views --------------------------------------------------------------------------------

class View:
    """The merged tree of an overlay mounted at target in a private mount namespace of this process,
    for the time of a with-block; leaving it returns to our own namespace, which unmounts it."""

    def __init__(self, target: str, overlay: mounts.Overlay | None, read_only: bool = True) -> None:
        self.target, self.overlay, self.read_only = target, overlay, read_only
        self.own = self.cwd = -1

    def __enter__(self) -> View:
        if self.overlay is None:
            return self
        self.own = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)
        try:
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
            mounts.mount_overlay(self.target, self.overlay, self.read_only)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.own >= 0:
            linux.setns(self.own, linux.CLONE_NEWNS)
            os.fchdir(self.cwd)  # setns() moved us to the namespace's root
            os.close(self.own)
            os.close(self.cwd)
            self.own = self.cwd = -1


def merged(name: str, base: str) -> View:
    """A read-only view of image name as its machine sees it."""
    path = paths.image_path(name)
    return View(path, mounts.Overlay([path, base_path(base)]) if base else None)


def runtime_overlay(cfg: config.MachineConfig, ephemeral: bool) -> tuple[mounts.Overlay | None, str]:
    """What the machine's own mount namespace mounts as its root, and its throw-away layer if ephemeral."""
    path = paths.image_path(cfg.name)
    lowers = [base_path(cfg.base)] if cfg.base else []
    if not ephemeral:
        if not cfg.base:
            return None, ""
        _check_base(cfg)
        os.makedirs(private_dir("work"), mode=0o700, exist_ok=True)
        return mounts.Overlay(lowers, upper=path, work=private_dir("work", cfg.name)), ""
    if cfg.base:
        _check_base(cfg)
    layer = private_dir("ephemeral", f"{cfg.name}-{os.urandom(4).hex()}")
    os.makedirs(private_dir("ephemeral"), mode=0o700, exist_ok=True)
    return mounts.Overlay([path, *lowers], upper=os.path.join(layer, "upper"), work=os.path.join(layer, "work")), layer


def _check_base(cfg: config.MachineConfig) -> None:
    if not os.path.isdir(base_path(cfg.base)):
        die(f"Failed to start {cfg.name}: its base layer {cfg.base} is missing from {private_dir('bases')}")


def in_merged_view(cfg: config.MachineConfig, fn: Any) -> Any:
    """fn() run with the image's merged tree at its path (the checks of a start, its os-release)."""
    with merged(cfg.name, cfg.base):
        return fn()


def remove_ephemeral(data: dict[str, object]) -> None:
    """Teardown step: the throw-away layer of an ephemeral run goes, however the run ended."""
    layer = str(data.get("ephemeral", ""))
    parent = os.path.dirname(layer)
    # Only ever a directory named after this machine in a pool's ephemeral folder.
    if (os.path.basename(parent) != "ephemeral" or os.path.basename(os.path.dirname(parent)) != ".machined"
            or not os.path.basename(layer).startswith(f"{data.get('name')}-")):
        return
    remove_tree(layer)


# --- image verbs ---------------------------------------------------------------------------------

def _require_image(name: str, verb: str) -> str:
    paths.check_name(name)
    path = paths.image_path(name)
    if not os.path.isdir(path) or os.path.islink(path):
        die(f"Failed to {verb} {name}: no such image")
    return path


def _require_writable(name: str, verb: str) -> config.MachineConfig:
    from machined import machines

    cfg = machines.load_config(name)
    if cfg.read_only:
        die(f"Failed to {verb} {name}: image is read-only", hint=f"'mctl read-only {name} no' first")
    return cfg


def _save(cfg: config.MachineConfig, **changes: Any) -> config.MachineConfig:
    from machined import records

    new = records.replace(cfg, **changes)
    config.save(new)
    return new


def clone(src: str, dst: str, read_only: bool = False) -> None:
    """A new machine from src's tree (its own id); for an overlay image only its own layer is copied."""
    from machined import machines, store

    src_path = _require_image(src, "clone")
    paths.check_name(dst)
    src_lock = store.image_lock(src, "clone")
    try:
        src_cfg = machines.load_config(src)
        with store.Creation(dst, "clone") as c:
            copy_tree(src_path, c.tmp)
            cfg = config.MachineConfig(name=dst, id=config.new_machine_id(), template=src_cfg.template,
                                       release=src_cfg.release, created=_now(), base=src_cfg.base,
                                       read_only=read_only, init=src_cfg.init, kill_timeout=src_cfg.kill_timeout,
                                       devices=src_cfg.devices, resources=src_cfg.resources)
            _reset_machine_id(c.tmp)
            c.commit(cfg)
    finally:
        src_lock.release()


def _reset_machine_id(tree: str) -> None:
    """A clone is another machine: an empty machine-id gets it its own at boot."""
    root_fd = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = mounts.resolve(root_fd, "etc/machine-id", follow=False, flags=os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
    except OSError:
        pass
    finally:
        os.close(root_fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def rename(old: str, new: str) -> None:
    from machined import store

    old_path = _require_image(old, "rename")
    paths.check_name(new)
    lock = store.image_lock(old, "rename")
    try:
        cfg = _require_writable(old, "rename")
        new_lock = store.image_lock(new, "rename to")
        try:
            new_path = paths.image_path(new)
            if os.path.lexists(new_path) or config.exists(new):
                die(f"Failed to rename {old} to {new}: {new} already exists")
            old_cfg_path = paths.config_path(old)
            _save(cfg, name=new)
            try:
                os.rename(old_path, new_path)
            except OSError:
                os.unlink(paths.config_path(new))
                raise
            os.unlink(old_cfg_path)
            for what in ("snapshots", "work"):
                if os.path.lexists(private_dir(what, old)):
                    os.rename(private_dir(what, old), private_dir(what, new))
        finally:
            new_lock.release()
    except OSError as e:
        die(f"Failed to rename {old} to {new}: {e.strerror or e}")
    finally:
        lock.release()


def set_read_only(name: str, text: str | None) -> bool:
    """Show (text None) or set (yes/no) whether the machine's root file system is read-only."""
    from machined import machines, store, templates

    _require_image(name, "change")
    if text is None:
        return machines.load_config(name).read_only
    try:
        value = templates.parse_bool(text)
    except ValueError as e:
        die(f"Invalid read-only value: {e}")
    lock = store.image_lock(name, "change")
    try:
        _save(machines.load_config(name), read_only=value)
    finally:
        lock.release()
    return value


def snapshot_dir(name: str) -> str:
    return private_dir("snapshots", paths.check_name(name))


def snapshot(name: str, snap: str | None) -> str:
    from machined import machines, store

    path = _require_image(name, "snapshot")
    snap = snap or time.strftime("%Y%m%d-%H%M%S")
    paths.check_name(snap, "snapshot")
    lock = store.image_lock(name, "snapshot")
    try:
        cfg = machines.load_config(name)
        target = os.path.join(snapshot_dir(name), snap)
        if os.path.lexists(target):
            die(f"Failed to snapshot {name}: snapshot {snap} already exists")
        os.makedirs(snapshot_dir(name), mode=0o700, exist_ok=True)
        tmp = new_tmp(name)
        try:
            copy_tree(path, tmp)
            with open(target + ".json", "w") as f:
                json.dump({"name": snap, "created": time.time(), "base": cfg.base}, f)
            os.rename(tmp, target)
            tmp = ""
        finally:
            if tmp:
                remove_tree(tmp)
                _unlink(target + ".json")
    except OSError as e:
        die(f"Failed to snapshot {name}: {e.strerror or e}")
    finally:
        lock.release()
    return snap


def snapshots(name: str) -> list[dict[str, Any]]:
    _require_image(name, "list snapshots of")
    result = []
    try:
        entries = sorted(os.listdir(snapshot_dir(name)))
    except FileNotFoundError:
        return []
    for entry in entries:
        path = os.path.join(snapshot_dir(name), entry)
        if entry.endswith(".json") or not os.path.isdir(path):
            continue
        meta: dict[str, Any] = {"name": entry, "created": os.stat(path).st_mtime, "base": ""}
        try:
            with open(path + ".json") as f:
                meta.update(json.load(f))
        except (OSError, ValueError):
            pass
        meta["usage"] = du(path)
        result.append(meta)
    return sorted(result, key=lambda m: float(m["created"]))


def restore(name: str, snap: str) -> None:
    """The image's tree becomes the snapshot's again (the snapshot stays)."""
    from machined import store

    path = _require_image(name, "restore")
    paths.check_name(snap, "snapshot")
    source = os.path.join(snapshot_dir(name), snap)
    if not os.path.isdir(source):
        die(f"Failed to restore {name}: no snapshot {snap}", hint=f"'mctl list-snapshots {name}'")
    lock = store.image_lock(name, "restore")
    try:
        cfg = _require_writable(name, "restore")
        with open(source + ".json") as f:
            base = str(json.load(f).get("base", ""))
        tmp = new_tmp(name)
        old = ""
        try:
            copy_tree(source, tmp)
            old = new_tmp(name, "removing")
            os.rename(path, old)       # from here until the next rename there is no image: both are quick
            os.rename(tmp, path)
            tmp = ""
            if base != cfg.base:
                _save(cfg, base=base)
            remove_tree(private_dir("work", name))
        finally:
            for leftover in (tmp, old):
                if leftover:
                    remove_tree(leftover)
    except OSError as e:
        die(f"Failed to restore {name}: {e.strerror or e}")
    finally:
        lock.release()


def remove_snapshot(name: str, snap: str) -> None:
    from machined import store

    paths.check_name(name)
    paths.check_name(snap, "snapshot")
    source = os.path.join(snapshot_dir(name), snap)
    if not os.path.isdir(source):
        die(f"Failed to remove snapshot {snap} of {name}: no such snapshot")
    lock = store.image_lock(name, "remove a snapshot of")
    try:
        doomed = new_tmp(name, "removing")
        os.rename(source, doomed)
        _unlink(source + ".json")
        remove_tree(doomed)
    finally:
        lock.release()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def du(path: str) -> int:
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


# --- clean ---------------------------------------------------------------------------------------

def clean(cache: bool = False) -> list[str]:
    """Remove what killed operations left (and with cache, the cached bootstraps); returns what went."""
    from machined import bootstrap

    removed: list[str] = []

    def gone(path: str) -> None:
        remove_tree(path)
        removed.append(path)

    for entry in _listdir(private_dir("tmp")):
        owner = entry.rsplit(".", 1)[0]
        if _free(owner):
            gone(private_dir("tmp", entry))
    for entry in _listdir(private_dir("ephemeral")):
        if _free(entry.rsplit("-", 1)[0]):
            gone(private_dir("ephemeral", entry))
    for entry in _listdir(private_dir("work")):
        if not os.path.isdir(paths.image_path(entry)) and _free(entry):
            gone(private_dir("work", entry))
    for entry in _listdir(private_dir("snapshots")):
        if not os.path.isdir(paths.image_path(entry)) and _free(entry):
            gone(private_dir("snapshots", entry))
    # Settings of a machine whose create was killed after writing them (the image is the commit).
    for entry in _listdir(paths.config_dir()):
        name = entry.removesuffix(".toml")
        if entry.endswith(".toml") and not os.path.lexists(paths.image_path(name)) and _free(name):
            _unlink(paths.config_path(name))
            removed.append(paths.config_path(name))
    used = _bases_in_use()
    for entry in _listdir(private_dir("bases")):
        path = private_dir("bases", entry)
        key = entry.split(".tmp-")[0].lstrip(".")
        if entry.endswith(".lock") or (key in used and ".tmp-" not in entry):
            continue
        fd = _base_lock(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being made, or held by a create
        else:
            gone(path)
        finally:
            os.close(fd)
    top = bootstrap.cache_dir()
    for entry in _listdir(top):
        if entry.startswith(".") and ".tmp-" in entry:
            lock = os.path.join(top, entry.split(".tmp-")[0] + ".lock")
            if _flock_free(lock):
                gone(os.path.join(top, entry))
        elif cache and os.path.isdir(os.path.join(top, entry)) and _flock_free(os.path.join(top, f".{entry}.lock")):
            gone(os.path.join(top, entry))
            _unlink(os.path.join(top, entry + ".json"))
    return removed


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _free(name: str) -> bool:
    """Nobody holds name's lock (no create, clone, run... of it in progress)."""
    if paths.name_error(name):
        return True
    lock = state.try_lock(name)
    if lock is None:
        return False
    lock.release()
    return True


def _flock_free(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _bases_in_use() -> set[str]:
    used = set()
    for entry in _listdir(paths.config_dir()):
        if entry.endswith(".toml") and not paths.name_error(entry[:-5]):
            try:
                base = config.load(entry[:-5]).base
            except MachinedError:
                continue
            if base:
                used.add(base)
    for name in _listdir(private_dir("snapshots")):
        for entry in _listdir(private_dir("snapshots", name)):
            if entry.endswith(".json"):
                try:
                    with open(private_dir("snapshots", name, entry)) as f:
                        used.add(str(json.load(f).get("base", "")))
                except (OSError, ValueError):
                    continue
    return used
