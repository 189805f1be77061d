"""Resource limits, usage and freezing of a machine's cgroup, on cgroup v1 (hybrid, legacy) and v2.

Limits sit on the machine's scope, outside its cgroup namespace, so the guest cannot lift them. The
settings mean what systemd's do: cpu_weight and io_weight 1..10000 (default 100), cpu_quota a share
of one CPU ("50%"; "200%" is two CPUs), cpuset_cpus a CPU list ("0-1,3"), sizes like "64M". Where
v1 has no twin it gets the nearest: memory_high is the soft limit, memory_swap_max is added to
memory_max for memory.memsw, the weights are scaled to cpu.shares and BFQ's 1..1000.
"""

from __future__ import annotations

import os
import time

from machined import cgroups, linux, paths, state
from machined.log import MachinedError, die, fail

TYPE_CHECKING = False
if TYPE_CHECKING:
    from machined.cgroups import MachineCgroup
    from machined.config import Resources

KEYS = ("memory_max", "memory_high", "memory_swap_max", "cpu_weight", "cpu_quota", "cpuset_cpus", "tasks_max",
        "io_weight")
SIZE_KEYS = ("memory_max", "memory_high", "memory_swap_max")
# systemd's property names, accepted by set-limit too.
SYSTEMD_NAMES = {"MemoryMax": "memory_max", "MemoryHigh": "memory_high", "MemorySwapMax": "memory_swap_max",
                 "CPUWeight": "cpu_weight", "CPUQuota": "cpu_quota", "AllowedCPUs": "cpuset_cpus",
                 "TasksMax": "tasks_max", "IOWeight": "io_weight"}
PERIOD_US = 100_000


# --- settings ------------------------------------------------------------------------------------

def parse_quota(text: str) -> float:
    """'50%' -> 50.0 (percent of one CPU)."""
    number = text.strip().removesuffix("%")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cpu_quota {text!r} is not a percentage such as 50%") from None
    if not text.strip().endswith("%") or not 0 < value <= 100_000:
        raise ValueError(f"cpu_quota {text!r} is not a percentage such as 50% (over 0)")
    return value


def parse_cpus(text: str) -> list[int]:
    cpus: list[int] = []
    try:
        for part in text.split(","):
            first, sep, last = part.strip().partition("-")
            lo, hi = int(first), int(last) if sep else int(first)
            if lo < 0 or hi < lo:
                raise ValueError
            cpus += range(lo, hi + 1)
    except ValueError:
        raise ValueError(f"cpuset_cpus {text!r} is not a CPU list such as 0-1,3") from None
    return cpus


def validate(res: Resources) -> None:
    for key in ("cpu_weight", "io_weight"):
        value = getattr(res, key)
        if value is not None and not 1 <= value <= 10000:
            raise ValueError(f"{key} must be between 1 and 10000 (default 100)")
    if res.tasks_max is not None and res.tasks_max < 1:
        raise ValueError("tasks_max must be at least 1")
    for key in SIZE_KEYS[:2]:
        value = getattr(res, key)
        if value is not None and value < 1 << 20:
            raise ValueError(f"{key} must be at least 1M")
    if res.cpu_quota is not None:
        parse_quota(res.cpu_quota)
    if res.cpuset_cpus is not None:
        parse_cpus(res.cpuset_cpus)


def parse_assignment(text: str) -> tuple[str, object]:
    """'memory_max=64M' (or systemd's MemoryMax=64M) -> ('memory_max', 67108864); max/infinity -> None."""
    from machined import config

    key, sep, value = text.partition("=")
    key = SYSTEMD_NAMES.get(key, key.replace("-", "_"))
    if not sep or key not in KEYS:
        die(f"Invalid limit {text!r}", hint=f"KEY=VALUE with KEY one of {', '.join(KEYS)}")
    if value.strip().lower() in ("", "max", "infinity"):
        return key, None
    try:
        if key in SIZE_KEYS:
            return key, config.parse_size(value)
        if key in ("cpu_quota", "cpuset_cpus"):
            return key, value.strip()
        return key, int(value)
    except ValueError as e:
        die(f"Invalid limit {text!r}: {e if key in SIZE_KEYS else 'not an integer'}")


# --- applying ------------------------------------------------------------------------------------

def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _bfq_weight(weight: int) -> int:
    """systemd's 1..10000 (default 100) onto BFQ's 1..1000 (default 100), piecewise linearly."""
    return weight if weight <= 100 else 100 + (weight - 100) * 900 // 9900


def _quota_us(quota: str | None) -> str | None:
    """CPU time per period of PERIOD_US; the kernel takes no less than 1 ms."""
    return None if quota is None else str(max(1000, int(parse_quota(quota) * PERIOD_US / 100)))


def _set(scope: str, key: str, filename: str, value: str, controller: str) -> None:
    path = os.path.join(scope, filename)
    try:
        linux.write_file(path, value)
    except FileNotFoundError:
        fail(f"set {key} on {os.path.basename(scope)}",
             f"the {controller} controller is not available there ({filename} is missing)")
    except OSError as e:
        fail(f"set {key} to {value} on {os.path.basename(scope)}", e)


def _set_cpus(scope: str, value: str | None, v1: bool) -> None:
    """cpuset.cpus on the scope. v1 children must stay subsets (and an empty v1 set is refused):
    widen the subtree to the parent's CPUs top-down, then narrow it bottom-up."""
    try:
        if not v1:
            linux.write_file(os.path.join(scope, "cpuset.cpus"), value or "")
            return
        wide = _read(os.path.join(os.path.dirname(scope), "cpuset.cpus"))
        dirs = [d for d, _, _ in os.walk(scope)]
        for d in dirs:
            linux.write_file(os.path.join(d, "cpuset.cpus"), wide)
        for d in reversed(dirs):
            linux.write_file(os.path.join(d, "cpuset.cpus"), value or wide)
    except FileNotFoundError:
        fail(f"set cpuset_cpus on {os.path.basename(scope)}", "the cpuset controller is not available there")
    except OSError as e:
        fail(f"set cpuset_cpus to {value} on {os.path.basename(scope)}", e)


def apply(cg: MachineCgroup, res: Resources, keys: tuple[str, ...] | None = None) -> None:
    """Write the limits in keys (default: those that are set) to the machine's scope."""
    if keys is None:
        keys = tuple(k for k in KEYS if getattr(res, k) is not None)
    if not keys:
        return
    if cg.layout == "unified":
        _apply_v2(cg.main_dir(), res, keys)
    else:
        _apply_v1(cg, res, keys)


def _apply_v1(cg: MachineCgroup, res: Resources, keys: tuple[str, ...]) -> None:
    def scope(controller: str, key: str) -> str:
        d = cg.dir_for(controller)
        if d is None:
            fail(f"set {key}", f"no cgroup v1 hierarchy has the {controller} controller")
        return d

    if {"memory_max", "memory_swap_max"} & set(keys):
        d = scope("memory", "memory_max")
        memsw = os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes"))
        if res.memory_swap_max is not None and not memsw:
            fail("set memory_swap_max", "swap accounting is off (boot with swapaccount=1)")
        if res.memory_swap_max is not None and res.memory_max is None:
            fail("set memory_swap_max", "cgroup v1 limits memory and swap together: set memory_max too")
        if memsw:  # memory+swap may never be below memory: lift it first
            _set(d, "memory_swap_max", "memory.memsw.limit_in_bytes", "-1", "memory")
        _set(d, "memory_max", "memory.limit_in_bytes", str(res.memory_max or -1), "memory")
        if memsw and res.memory_swap_max is not None and res.memory_max is not None:
            _set(d, "memory_swap_max", "memory.memsw.limit_in_bytes", str(res.memory_max + res.memory_swap_max),
                 "memory")
    if "memory_high" in keys:
        _set(scope("memory", "memory_high"), "memory_high", "memory.soft_limit_in_bytes",
             str(res.memory_high or -1), "memory")
    if "cpu_weight" in keys:
        shares = max(2, (res.cpu_weight or 100) * 1024 // 100)
        _set(scope("cpu", "cpu_weight"), "cpu_weight", "cpu.shares", str(shares), "cpu")
    if "cpu_quota" in keys:
        d = scope("cpu", "cpu_quota")
        _set(d, "cpu_quota", "cpu.cfs_period_us", str(PERIOD_US), "cpu")
        _set(d, "cpu_quota", "cpu.cfs_quota_us", _quota_us(res.cpu_quota) or "-1", "cpu")
    if "cpuset_cpus" in keys:
        _set_cpus(scope("cpuset", "cpuset_cpus"), res.cpuset_cpus, v1=True)
    if "tasks_max" in keys:
        _set(scope("pids", "tasks_max"), "tasks_max", "pids.max", str(res.tasks_max or "max"), "pids")
    if "io_weight" in keys:
        d = scope("blkio", "io_weight")
        weight = res.io_weight or 100
        if os.path.exists(os.path.join(d, "blkio.bfq.weight")):
            _set(d, "io_weight", "blkio.bfq.weight", str(_bfq_weight(weight)), "blkio")
        else:  # CFQ's 10..1000
            _set(d, "io_weight", "blkio.weight", str(min(1000, max(10, weight // 10))), "blkio")


def _apply_v2(d: str, res: Resources, keys: tuple[str, ...]) -> None:
    def size(v: int | None) -> str:
        return "max" if v is None else str(v)

    for key in keys:
        if key == "memory_max":
            _set(d, key, "memory.max", size(res.memory_max), "memory")
        elif key == "memory_high":
            _set(d, key, "memory.high", size(res.memory_high), "memory")
        elif key == "memory_swap_max":
            _set(d, key, "memory.swap.max", size(res.memory_swap_max), "memory")
        elif key == "cpu_weight":
            _set(d, key, "cpu.weight", str(res.cpu_weight or 100), "cpu")
        elif key == "cpu_quota":
            _set(d, key, "cpu.max", f"{_quota_us(res.cpu_quota) or 'max'} {PERIOD_US}", "cpu")
        elif key == "cpuset_cpus":
            _set_cpus(d, res.cpuset_cpus, v1=False)
        elif key == "tasks_max":
            _set(d, key, "pids.max", size(res.tasks_max), "pids")
        elif key == "io_weight":
            _set(d, key, "io.weight", f"default {res.io_weight or 100}", "io")


# --- reading back --------------------------------------------------------------------------------

def _try(path: str) -> str | None:
    try:
        return _read(path)
    except (OSError, ValueError):
        return None


def record(name: str, res: Resources) -> None:
    """Keep the limits in force in the machine's runtime directory (the cgroup files are rounded:
    cpu.shares, BFQ weights), for status."""
    from machined import jsonc

    jsonc.save(os.path.join(paths.machine_runtime_dir(name), "limits.json"),
               {k: getattr(res, k) for k in KEYS if getattr(res, k) is not None})


def _recorded(name: str) -> dict[str, object]:
    from machined import jsonc

    try:
        data = jsonc.load(os.path.join(paths.machine_runtime_dir(name), "limits.json"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in KEYS} if isinstance(data, dict) else {}


def in_force(name: str) -> dict[str, str]:
    return {k: _size(v) if k in SIZE_KEYS and isinstance(v, int) else str(v) for k, v in _recorded(name).items()}


def usage(cg: MachineCgroup) -> dict[str, int | None]:
    """memory (bytes), cpu (ns), tasks: what the machine uses now (None where it is not accounted)."""
    memory = cpu = tasks = None
    if cg.layout == "unified":
        d = cg.main_dir()
        value = _try(os.path.join(d, "memory.current"))
        memory = int(value) if value else None
        stat = _try(os.path.join(d, "cpu.stat")) or ""  # present without the cpu controller
        for line in stat.splitlines():
            if line.startswith("usage_usec "):
                cpu = int(line.split()[1]) * 1000
        value = _try(os.path.join(d, "pids.current"))
        tasks = int(value) if value else _count_threads(d)
    else:
        for controller, name in (("memory", "memory.usage_in_bytes"), ("cpuacct", "cpuacct.usage"),
                                 ("pids", "pids.current")):
            where = cg.dir_for(controller)
            value = _try(os.path.join(where, name)) if where else None
            if value and value.isdigit():
                if controller == "memory":
                    memory = int(value)
                elif controller == "cpuacct":
                    cpu = int(value)
                else:
                    tasks = int(value)
    return {"memory": memory, "cpu": cpu, "tasks": tasks}


def _count_threads(top: str) -> int:
    n = 0
    for d, _, _ in os.walk(top):
        n += len((_try(os.path.join(d, "cgroup.threads")) or "").split())
    return n


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{int(value)}{unit}" if value == int(value) else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


# --- freezing ------------------------------------------------------------------------------------

def _freezer(cg: MachineCgroup) -> tuple[int, str]:
    """(cgroup version, scope directory) of the machine's freezer: v1's if there is one, else v2's."""
    d = cg.dir_for("freezer") if cg.layout != "unified" else None
    if d:
        return 1, d
    v2 = next((s for mp, s in cg.dirs.items() if cg.keys.get(mp) == ""), "")
    if not v2:
        fail("freeze", "no freezer: neither a v1 freezer hierarchy nor cgroup v2")
    return 2, v2


def is_frozen(cg: MachineCgroup) -> bool:
    try:
        version, d = _freezer(cg)
        if version == 1:
            return _read(os.path.join(d, "freezer.state")) == "FROZEN"  # FREEZING until every task is
        return "frozen 1" in _read(os.path.join(d, "cgroup.events")).splitlines()
    except (OSError, MachinedError):
        return False


def _set_frozen(cg: MachineCgroup, freeze: bool, timeout: float = 5.0) -> None:
    version, d = _freezer(cg)
    path = os.path.join(d, "freezer.state" if version == 1 else "cgroup.freeze")
    frozen, thawed = ("FROZEN", "THAWED") if version == 1 else ("1", "0")
    linux.write_file(path, frozen if freeze else thawed)
    deadline = time.monotonic() + timeout
    while is_frozen(cg) != freeze:
        if time.monotonic() > deadline:
            if freeze:
                linux.write_file(path, thawed)  # never leave it half frozen
            raise OSError(f"still {'thawing' if not freeze else 'freezing'} after {timeout:.0f} s")
        time.sleep(0.005)


def _machine_cgroup(data: dict[str, object]) -> MachineCgroup:
    cg = data.get("cgroup")
    if not isinstance(cg, dict):
        die(f"Machine {data.get('name')} has no cgroup")
    return cgroups.MachineCgroup.from_state(cg)


def freeze(name: str, frozen: bool = True) -> None:
    """Freeze (or, not frozen, thaw) every process of the running machine name."""
    cg = _machine_cgroup(state.require_running(name))
    try:
        _set_frozen(cg, frozen)
    except OSError as e:
        fail(f"{'freeze' if frozen else 'thaw'} {name}", e)


def thaw_for_stop(data: dict[str, object]) -> None:
    """Before stopping: a frozen process (v1) takes no signal, not even SIGKILL. Best effort."""
    cg = data.get("cgroup")
    if not isinstance(cg, dict):
        return
    machine_cg = cgroups.MachineCgroup.from_state(cg)
    if is_frozen(machine_cg):
        try:
            _set_frozen(machine_cg, False)
        except (OSError, MachinedError):
            pass


# --- set-limit and status ------------------------------------------------------------------------

def set_limits(name: str, assignments: list[str], runtime_only: bool) -> None:
    """Apply to the running machine (if it runs), then keep in its settings (unless runtime_only)."""
    from machined import config, machines, records

    paths.check_name(name)
    changes = dict(parse_assignment(a) for a in assignments)
    cfg = machines.load_config(name)
    data = state.running(name)
    try:
        saved = records.replace(cfg.resources, **changes)
        validate(saved)
        if data is not None:  # on top of what is in force, earlier --runtime changes included
            live = records.replace(config.Resources(**_recorded(name)), **changes)  # type: ignore[arg-type]
            validate(live)
    except ValueError as e:
        die(f"Invalid limit: {e}")
    if data is not None:
        from machined import systemd

        if not systemd.set_properties(data, systemd.limit_properties(live, tuple(changes))):
            apply(_machine_cgroup(data), live, tuple(changes))
        record(name, live)
    elif runtime_only:
        die(f"Machine {name} is not running", hint="without --runtime the limits are kept for its next start")
    if not runtime_only:
        config.save(records.replace(cfg, resources=saved))


def status(data: dict[str, object]) -> dict[str, object]:
    """What status and show add for a running machine: usage, limits in force, frozen or not."""
    cg_state = data.get("cgroup")
    if not isinstance(cg_state, dict):
        return {}
    cg = cgroups.MachineCgroup.from_state(cg_state)
    use = usage(cg)
    limits = in_force(str(data.get("name")))
    info: dict[str, object] = {"MemoryCurrent": use["memory"], "CPUUsageNSec": use["cpu"], "TasksCurrent": use["tasks"],
                               **{f"Limit.{k}": v for k, v in limits.items()}}
    if use["memory"] is not None:
        info["Status.Memory"] = _size(use["memory"]) + (f" (max {limits['memory_max']})" if "memory_max" in limits
                                                        else "")
    if use["cpu"] is not None:
        info["Status.CPU time"] = f"{use['cpu'] / 1e9:.3f}s"
    if use["tasks"] is not None:
        info["Status.Tasks"] = str(use["tasks"]) + (f" (limit {limits['tasks_max']})" if "tasks_max" in limits else "")
    if limits:
        info["Status.Limits"] = ", ".join(f"{k}={v}" for k, v in limits.items())
    if is_frozen(cg):
        info["State"] = "frozen"
    return info
