"""mctl: the command line. argparse verbs only; the work happens in the modules each verb imports."""

from __future__ import annotations

import os
import sys

from machined import log
from machined.log import MachinedError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn, cast
else:
    def cast(typ: str, value: object) -> object:
        return value  # typing.cast without importing typing


def _fmt_time(ts: object) -> str:
    import time

    if not isinstance(ts, (int, float)):
        return "-"
    ago = max(0, int(time.time() - ts))
    span = f"{ago // 3600}h {ago % 3600 // 60}min ago" if ago >= 3600 else (
        f"{ago // 60}min {ago % 60}s ago" if ago >= 60 else f"{ago}s ago")
    return time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(ts)) + f"; {span}"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(" ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.1f}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1024
    return str(n)


def _json(obj: object) -> None:
    import json

    print(json.dumps(obj, indent=2, default=str))


# --- verbs -------------------------------------------------------------------------------------

def _network_options(a: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in (("mode", a.network), ("ports", a.port), ("pod", a.pod),
                              ("address", getattr(a, "address", None))) if v}


def verb_create(a: argparse.Namespace) -> int:
    import time

    from machined import store

    network = None
    if _network_options(a):
        from machined import config

        network = config.with_network(config.Network(), **_network_options(a))  # type: ignore[arg-type]
    started = time.monotonic()
    how = store.create(a.name, a.template, a.release, a.set, a.storage, network)
    if sys.stdout.isatty():
        print(f"Created {a.name} ({how}) in {time.monotonic() - started:.2f} s.")
    return 0


def verb_templates(a: argparse.Namespace) -> int:
    from machined import bootstrap, templates

    tmpls = templates.available()
    cached = bootstrap.entries()
    if a.output == "json":
        _json([{"name": t.name, "description": t.description, "bootstrap": t.bootstrap, "releases": t.releases,
                "base": t.base.name if t.base else None, "path": t.path,
                "parameters": {p.name: {"type": p.type, "default": p.default, "help": p.help,
                                        "choices": p.choices} for p in t.parameters.values()},
                "cached": [c for c in cached if c.get("distro") == t.distro and t.bootstrap in bootstrap.CACHED]}
               for t in tmpls])
        return 0
    for n, t in enumerate(tmpls):
        if n:
            print()
        print(f"{t.name}: {t.description}" + (f" (extends {t.base.name})" if t.base else ""))
        if t.releases:
            print(f"  releases: {', '.join(t.releases)} (default {t.default_release})")
        for p in t.parameters.values():
            choices = f", one of {'/'.join(str(c) for c in p.choices)}" if p.choices else ""
            print(f"  --set {p.name}=  {p.type}{choices}, default {p.default!r}: {p.help}")
        if t.bootstrap in bootstrap.CACHED:
            for c in cached:
                if c.get("distro") == t.distro:
                    print(f"  cached: {c['key']} ({_fmt_time(c.get('created'))})")
    return 0


def verb_start(a: argparse.Namespace) -> int:
    from machined import machines

    code = 0
    for name in a.names:
        code = machines.start(name, foreground=a.foreground, ephemeral=a.ephemeral,
                              network=_network_options(a)) or code
    return code


def verb_run(a: argparse.Namespace) -> int:
    from machined import machines

    return machines.run(a.name, a.directory, a.command, read_only=a.read_only)


def verb_list(a: argparse.Namespace) -> int:
    from machined import machines

    infos = machines.running_infos()
    if a.output == "json":
        _json([{"machine": i["Name"], "class": i["Class"], "service": i["Service"], "os": i["OS"] or None,
                "version": i["OSVersion"] or None, "addresses": i["Addresses"] or None, "state": i["State"],
                "leader": i["Leader"]} for i in infos])
        return 0
    rows = [[str(i["Name"]), str(i["Class"]), str(i["Service"]), str(i["OS"] or "-"), str(i["OSVersion"] or "-"),
             ", ".join(str(x) for x in i["Addresses"]) or "-"] for i in infos]  # type: ignore[attr-defined]
    if rows:
        _table(rows, ["MACHINE", "CLASS", "SERVICE", "OS", "VERSION", "ADDRESSES"])
    if not a.no_legend:
        print(f"\n{len(rows)} machines listed.")
    return 0


def verb_list_images(a: argparse.Namespace) -> int:
    from machined import store

    imgs = store.list_images()
    if a.output == "json":
        _json([{"name": i["name"], "type": i["type"], "ro": i["read_only"], "usage": i["usage"],
                "created": int(i["created"] * 1e6), "modified": int(i["modified"] * 1e6),
                "template": i["template"], "base": i["base"] or None} for i in imgs])
        return 0
    import time

    rows = [[i["name"], i["type"], "yes" if i["read_only"] else "no", _size(i["usage"]),
             time.strftime("%a %Y-%m-%d %H:%M:%S", time.localtime(i["created"]))] for i in imgs]
    if rows:
        _table(rows, ["NAME", "TYPE", "RO", "USAGE", "CREATED"])
    if not a.no_legend:
        print(f"\n{len(rows)} images listed.")
    return 0


def verb_status(a: argparse.Namespace) -> int:
    from machined import machines

    for n, name in enumerate(a.names):
        info = machines.info(name)
        if n:
            print()
        print(f"{info['Name']} ({info.get('Id', '')})")
        lines: list[tuple[str, object]] = [("State", info["State"])]
        if info["State"] != "stopped":
            leader = info.get("Leader")
            comm = ""
            if isinstance(leader, int):
                try:
                    with open(f"/proc/{leader}/comm") as f:
                        comm = f" ({f.read().strip()})"
                except OSError:
                    pass
            lines += [("Since", _fmt_time(info.get("Timestamp"))), ("Leader", f"{leader}{comm}"),
                      ("Supervisor", info.get("Supervisor")),
                      ("Service", f"{info['Service']}; class {info['Class']}"), ("Init", info.get("Init"))]
        lines += [("Root", info["RootDirectory"]), ("OS", info.get("OSPrettyName") or info.get("OS") or "-")]
        if info.get("Template"):
            lines.append(("Template", f"{info['Template']} {info.get('Release') or ''}".strip()))
        if info.get("ReadOnly"):
            lines.append(("Read-only", "yes"))
        for key, label in (("Addresses", "Addresses"), ("NetworkInterfaces", "Interfaces")):
            if info.get(key):
                lines.append((label, ", ".join(str(x) for x in info[key])))  # type: ignore[attr-defined]
        if info.get("ControlGroup"):
            lines.append(("Cgroup", info["ControlGroup"]))
        for key, value in info.items():
            if key.startswith("Status."):
                lines.append((key[7:], value))
        for key, value in lines:
            print(f"{key:>14}: {value}")
        logfile = info.get("Log")
        if logfile and isinstance(logfile, str):
            tail = _tail(logfile, a.lines)
            if tail:
                print("\nConsole (last lines):")
                for line in tail:
                    print(f"  {line}")
    return 0


def _tail(path: str, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [ln.rstrip("\r") for ln in data.replace("\r\n", "\n").split("\n")]
    lines = ["".join(c for c in ln if c.isprintable()) for ln in lines]
    return [ln for ln in lines if ln.strip()][-n:]


def verb_show(a: argparse.Namespace) -> int:
    from machined import machines

    for n, name in enumerate(a.names):
        info = machines.info(name)
        if a.property:
            info = {k: v for k, v in info.items() if k in a.property}
        if a.output == "json":
            _json(info)
            continue
        if n:
            print()
        for key, value in info.items():
            if isinstance(value, (list, tuple)):
                value = " ".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            elif value is None:
                value = ""
            value = str(value).replace("\n", "\\n")
            print(f"{key}={value}" if not a.value else value)
    return 0


def verb_shell(a: argparse.Namespace) -> int:
    from machined import enter

    env: dict[str, str] = {}
    for item in a.setenv:
        k, sep, v = item.partition("=")
        if not sep or not k:
            log.die(f"Invalid --setenv {item!r}: expected VAR=VALUE")
        env[k] = v
    name, user = a.name, a.uid
    if "@" in name:
        user, _, name = name.rpartition("@")
        user = user or "root"
    return enter.enter(name, a.command or None, user=user, extra_env=env)


def verb_login(a: argparse.Namespace) -> int:
    from machined import enter

    return enter.enter(a.name, None, login=True)


def verb_console(a: argparse.Namespace) -> int:
    from machined import machines

    return machines.console(a.name)


def verb_poweroff(a: argparse.Namespace) -> int:
    from machined import machines

    for name in a.names:
        machines.stop(name, "poweroff", timeout=a.timeout, wait=not a.no_wait)
    return 0


def verb_halt(a: argparse.Namespace) -> int:
    from machined import machines

    for name in a.names:
        machines.stop(name, "halt", timeout=a.timeout, wait=not a.no_wait)
    return 0


def verb_terminate(a: argparse.Namespace) -> int:
    from machined import machines

    for name in a.names:
        machines.stop(name, "terminate", wait=not a.no_wait)
    return 0


def verb_reboot(a: argparse.Namespace) -> int:
    from machined import machines

    for name in a.names:
        machines.reboot(name, wait=not a.no_wait)
    return 0


def verb_kill(a: argparse.Namespace) -> int:
    from machined import machines

    sig = machines.parse_signal(a.signal)
    for name in a.names:
        machines.kill(name, sig, a.kill_whom)
    return 0


def verb_enable(a: argparse.Namespace) -> int:
    from machined import systemd

    for name in a.names:
        systemd.enable(name, a.verb == "enable")
    return 0


def verb_remove(a: argparse.Namespace) -> int:
    from machined import store

    for name in a.names:
        store.remove(name)
    return 0


def verb_bind_device(a: argparse.Namespace) -> int:
    from machined import passthrough

    passthrough.bind(a.name, a.path, a.access)
    return 0


def verb_unbind_device(a: argparse.Namespace) -> int:
    from machined import passthrough

    passthrough.unbind(a.name, a.path)
    return 0


def verb_set_limit(a: argparse.Namespace) -> int:
    from machined import resources

    resources.set_limits(a.name, a.assignments, a.runtime)
    return 0


def verb_freeze(a: argparse.Namespace) -> int:
    from machined import resources

    for name in a.names:
        resources.freeze(name, frozen=a.verb == "freeze")
    return 0


# --- image verbs (clone, rename, read-only, tarballs, snapshots, clean) ----------------------------

def verb_clone(a: argparse.Namespace) -> int:
    from machined import images

    images.clone(a.source, a.destination, read_only=a.read_only)
    return 0


def verb_rename(a: argparse.Namespace) -> int:
    from machined import images

    images.rename(a.old, a.new)
    return 0


def verb_read_only(a: argparse.Namespace) -> int:
    from machined import images

    result = images.set_read_only(a.name, a.value)
    if a.value is None:
        print("yes" if result else "no")
    return 0


def verb_import_tar(a: argparse.Namespace) -> int:
    from machined import tarball

    tarball.import_tar(a.file, a.name, read_only=a.read_only)
    return 0


def verb_export_tar(a: argparse.Namespace) -> int:
    from machined import tarball

    tarball.export(a.name, a.file, a.format)
    return 0


def verb_snapshot(a: argparse.Namespace) -> int:
    from machined import images

    snap = images.snapshot(a.name, a.snapshot)
    if sys.stdout.isatty():
        print(f"Snapshot {snap} of {a.name} taken.")
    return 0


def verb_list_snapshots(a: argparse.Namespace) -> int:
    import time

    from machined import images

    snaps = images.snapshots(a.name)
    if a.output == "json":
        _json([{"name": s["name"], "created": int(float(s["created"]) * 1e6), "usage": s["usage"],
                "base": s["base"] or None} for s in snaps])
        return 0
    rows = [[str(s["name"]), time.strftime("%a %Y-%m-%d %H:%M:%S", time.localtime(float(s["created"]))),
             _size(s["usage"])] for s in snaps]
    if rows:
        _table(rows, ["SNAPSHOT", "CREATED", "USAGE"])
    if not a.no_legend:
        print(f"\n{len(rows)} snapshots listed.")
    return 0


def verb_restore(a: argparse.Namespace) -> int:
    from machined import images

    images.restore(a.name, a.snapshot)
    return 0


def verb_remove_snapshot(a: argparse.Namespace) -> int:
    from machined import images

    for snap in a.snapshots:
        images.remove_snapshot(a.name, snap)
    return 0


def verb_clean(a: argparse.Namespace) -> int:
    from machined import images

    for path in images.clean(cache=a.cache):
        print(f"Removed {path}")
    return 0


# --- parser ------------------------------------------------------------------------------------

class _Unused:
    """Stands in for the sub-parsers of verbs not on the command line: building all of them costs
    milliseconds of start-up (argparse translates every help string)."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        pass

    def add_mutually_exclusive_group(self, **kwargs: object) -> _Unused:
        return self


class _Spec:
    """Records what _build declares for one verb (or the top level) instead of giving it to argparse,
    for _quick_parse."""

    def __init__(self) -> None:
        self.options: dict[str, dict[str, Any]] = {}  # every option string -> its keywords, with dest
        self.positionals: list[dict[str, Any]] = []
        self.defaults: dict[str, object] = {}
        self.simple = True  # declared with nothing _quick_parse would get wrong

    def add_argument(self, *flags: str, **kw: Any) -> None:
        option = flags[0].startswith("-")
        self.simple &= (set(kw) <= {"action", "nargs", "default", "type", "choices", "required", "dest", "metavar",
                                    "help"} and kw.get("action", "store") in ("store", "store_true", "append")
                        and kw.get("nargs") in ((None,) if option else (None, "?", "*", "+")))
        if not option:
            self.positionals.append({"dest": flags[0], **kw})
            return
        kw.setdefault("dest", next((f for f in flags if f.startswith("--")), flags[0]).lstrip("-").replace("-", "_"))
        self.options.update(dict.fromkeys(flags, kw))

    def set_defaults(self, **kw: object) -> None:
        self.defaults.update(kw)

    def parse(self, args: list[str]) -> dict[str, Any] | None:
        """As argparse would parse args, or None where it might not; raises ValueError for a value
        it would refuse."""
        if not self.simple:
            return None
        values: dict[str, Any] = dict(self.defaults)  # over the options' defaults, as in argparse
        for o in self.options.values():
            values.setdefault(o["dest"], o.get("default", False if o.get("action") == "store_true" else None))
        words: list[str] = []
        given: set[str] = set()
        closed = False  # the positional words have been followed by an option
        rest = iter(args)
        for arg in rest:
            if not arg.startswith("-"):
                if closed:  # a second run: argparse takes it otherwise or refuses it
                    return None
                words.append(arg)
                continue
            closed = bool(words)
            flag, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            if flag not in self.options:  # -h, an abbreviation, '-xp', '-Dvalue', a negative number: argparse's
                return None
            o = self.options[flag]
            given.add(o["dest"])
            if o.get("action") == "store_true":
                if eq:
                    return None
                values[o["dest"]] = True
                continue
            value = value if eq else next(rest, "-")  # none left: as one that argparse might take for an option
            if value.startswith("-"):
                return None
            v = _convert(o, value)
            values[o["dest"]] = [*(values[o["dest"]] or ()), v] if o.get("action") == "append" else v
        if any(o.get("required") and o["dest"] not in given for o in self.options.values()):
            return None
        need = [p.get("nargs") not in ("?", "*") for p in self.positionals]
        if len(words) < sum(need) or (len(words) > len(need) and not any(
                p.get("nargs") in ("*", "+") for p in self.positionals)):
            return None
        for n, p in enumerate(self.positionals):
            one, default = p.get("nargs") in (None, "?"), p.get("default")
            # all it can, leaving the later ones their minimum: as argparse's (greedy) regular expression
            take = min(1 if one else len(words), len(words) - sum(need[n + 1:]))
            got, words = [_convert(p, w) for w in words[:take]], words[take:]
            values[p["dest"]] = (got[0] if one else got) if got else ([] if default is None and not one else default)
        return values


def _convert(o: dict[str, Any], value: str) -> object:
    v = (o.get("type") or str)(value)
    if o.get("choices") is not None and v not in o["choices"]:
        raise ValueError(value)
    return v


def _quick_parse(argv: list[str]) -> argparse.Namespace | None:
    """argv (without what follows '--') as argparse would parse it, but without argparse: importing
    it and building a parser cost milliseconds of each call. None where that is not certain: argparse
    then parses argv, and has the help and every error message. Certain are options by their full
    names, values not starting with '-', and one run of positional words."""
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None:
        return None
    top, specs = _Spec(), []

    def add_verb(name: str, help_: str, aliases: Sequence[str]) -> argparse.ArgumentParser:
        specs.append(_Spec())
        return cast("argparse.ArgumentParser", specs[-1])

    if not _build(cast("argparse.ArgumentParser", top), add_verb, word):
        return None
    at = argv.index(word)
    try:
        head, tail = top.parse(argv[:at]), specs[0].parse(argv[at + 1:])
    except (TypeError, ValueError):  # a value of the wrong type, or not one of the choices
        return None
    if head is None or tail is None:
        return None
    from types import SimpleNamespace

    return cast("argparse.Namespace", SimpleNamespace(**{**head, "verb": word, **tail}))


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (only=VERB) one with just that verb's sub-parser if VERB exists."""
    import argparse

    class _Formatter(argparse.HelpFormatter):
        def __init__(self, prog: str) -> None:
            # argparse would import shutil (and with it bz2, lzma) just to learn the terminal width.
            try:
                width = os.get_terminal_size().columns
            except OSError:
                width = 80
            super().__init__(prog, width=max(40, width - 2))

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise MachinedError(f"Invalid arguments: {message}", hint=f"'{self.prog} --help'")

    def build(only: str | None) -> tuple[argparse.ArgumentParser, int]:
        p = _Parser(prog="mctl", description="Manage full-OS system containers (machines).",
                    formatter_class=_Formatter)
        sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
        sub.required = True
        return p, _build(p, lambda name, help_, aliases: sub.add_parser(
            name, help=help_, description=help_, aliases=list(aliases), formatter_class=_Formatter), only)

    p, built = build(only)
    return p if built or only is None else build(None)[0]


def _build(top: argparse.ArgumentParser, add_verb: Callable[[str, str, Sequence[str]], argparse.ArgumentParser],
           only: str | None) -> int:
    """Declares mctl's options on top and its verbs' with add_verb(name, help, aliases): on argparse's
    parsers, or on _Spec records for _quick_parse. only=VERB: that verb alone. Returns how many verbs."""
    built = 0
    top.add_argument("--debug", action="store_true", help="show tracebacks and debug output")

    def verb(name: str, func: Callable[[argparse.Namespace], int], help_: str,
             aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        nonlocal built
        if only is not None and only != name and only not in aliases:
            return cast("argparse.ArgumentParser", _Unused())
        built += 1
        sp = add_verb(name, help_, aliases)
        sp.set_defaults(func=func)
        return sp

    def output(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-o", "--output", choices=("text", "json"), default="text")

    def network_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--network", metavar="MODE",
                        help="none, veth, bridge[:NAME] (default), interface:IF or macvlan:IF")
        sp.add_argument("-p", "--port", action="append", default=[], metavar="[tcp|udp:]HOSTPORT[:MACHINEPORT]",
                        help="forward a host port to the machine")
        sp.add_argument("--pod", metavar="NAME", help="share network, IPC and UTS namespaces with the pod")

    sp = verb("create", verb_create, "create a machine's root file system and configuration from a template")
    sp.add_argument("name")
    sp.add_argument("-t", "--template", required=True)
    sp.add_argument("--release", default=None)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="template parameter")
    sp.add_argument("--storage", choices=("auto", "directory", "overlay"), default="auto",
                    help="a full tree, or an overlay on a shared base (auto: copy-on-write copy where the "
                         "file system has reflinks, else overlay)")
    network_options(sp)
    sp.add_argument("--address", help="fixed IPv4 address in the bridge's subnet (default: a stable lease)")

    sp = verb("templates", verb_templates, "list templates and their parameters")
    output(sp)

    sp = verb("start", verb_start, "boot machines detached; returns once init runs")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("--foreground", action="store_true", help="supervise in this process (for service units)")
    sp.add_argument("-x", "--ephemeral", action="store_true", help="run on a throw-away layer: nothing persists")
    network_options(sp)

    sp = verb("run", verb_run, "run a command as a one-shot machine in the foreground")
    sp.add_argument("name", nargs="?", default=None)
    sp.add_argument("-D", "--directory", help="root file system directory instead of a machine")
    sp.add_argument("--read-only", action="store_true")
    sp.add_argument("command", nargs="*")

    sp = verb("list", verb_list, "list running machines")
    output(sp)
    sp.add_argument("--no-legend", action="store_true")

    sp = verb("list-images", verb_list_images, "list machine images on disk")
    output(sp)
    sp.add_argument("--no-legend", action="store_true")

    sp = verb("status", verb_status, "show a machine's state, leader, cgroup and console tail")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("-n", "--lines", type=int, default=10)

    sp = verb("show", verb_show, "show a machine's properties as KEY=VALUE")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("-p", "--property", action="append", default=[])
    sp.add_argument("--value", action="store_true", help="print values only")
    output(sp)

    sp = verb("shell", verb_shell, "run a command (default: a login shell) inside a running machine")
    sp.add_argument("name", metavar="[USER@]NAME")
    sp.add_argument("--uid", default="root", help="user to run as")
    sp.add_argument("-E", "--setenv", action="append", default=[], metavar="VAR=VALUE")
    sp.add_argument("command", nargs="*")

    sp = verb("login", verb_login, "log in to a running machine on a new terminal")
    sp.add_argument("name")

    sp = verb("console", verb_console, "attach to a running machine's console")
    sp.add_argument("name")

    for name, func, help_ in (("poweroff", verb_poweroff, "power machines off cleanly"),
                              ("halt", verb_halt, "halt machines")):
        sp = verb(name, func, help_)
        sp.add_argument("names", nargs="+", metavar="NAME")
        sp.add_argument("--timeout", type=float, default=None, help="seconds before the machine is killed")
        sp.add_argument("--no-wait", action="store_true", help="return without waiting for it to stop")

    sp = verb("reboot", verb_reboot, "reboot machines")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("--no-wait", action="store_true")

    sp = verb("terminate", verb_terminate, "stop machines at once, killing all their processes")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("--no-wait", action="store_true")

    sp = verb("kill", verb_kill, "send a signal to machines' processes")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("-s", "--signal", default="SIGTERM")
    sp.add_argument("--kill-whom", choices=("leader", "all"), default="all")

    for name, help_ in (("enable", "start machines at boot (machined@NAME.service in machines.target)"),
                        ("disable", "no longer start machines at boot")):
        sp = verb(name, verb_enable, help_)
        sp.add_argument("names", nargs="+", metavar="NAME")

    sp = verb("remove", verb_remove, "remove machines' images and configuration", aliases=["rm"])
    sp.add_argument("names", nargs="+", metavar="NAME")

    sp = verb("bind-device", verb_bind_device, "pass a host device node into a running machine")
    sp.add_argument("name")
    sp.add_argument("path", metavar="/dev/NODE")
    sp.add_argument("--access", default="rwm", help="r, w, m or a combination (default rwm)")

    sp = verb("unbind-device", verb_unbind_device, "take a passed-in device out of a running machine")
    sp.add_argument("name")
    sp.add_argument("path", metavar="/dev/NODE")

    sp = verb("set-limit", verb_set_limit, "change resource limits, at once if the machine runs, and in its settings")
    sp.add_argument("name")
    sp.add_argument("assignments", nargs="+", metavar="KEY=VALUE",
                    help="memory_max, memory_high, memory_swap_max, cpu_weight, cpu_quota, cpuset_cpus, "
                         "tasks_max, io_weight; 'max' removes a limit")
    sp.add_argument("--runtime", action="store_true", help="only until the machine stops")

    for name, help_ in (("freeze", "freeze every process of machines"), ("thaw", "resume frozen machines")):
        sp = verb(name, verb_freeze, help_)
        sp.add_argument("names", nargs="+", metavar="NAME")

    sp = verb("clone", verb_clone, "copy an image to a new machine (copy-on-write where possible)")
    sp.add_argument("source")
    sp.add_argument("destination")
    sp.add_argument("--read-only", action="store_true")

    sp = verb("rename", verb_rename, "rename a stopped machine")
    sp.add_argument("old")
    sp.add_argument("new")

    sp = verb("read-only", verb_read_only, "show or set whether a machine's root file system is read-only")
    sp.add_argument("name")
    sp.add_argument("value", nargs="?", default=None, metavar="BOOL")

    sp = verb("import-tar", verb_import_tar, "make a machine from a root file system tarball (checked entry by entry)")
    sp.add_argument("file")
    sp.add_argument("name")
    sp.add_argument("--read-only", action="store_true")

    sp = verb("export-tar", verb_export_tar, "write a stopped machine's tree to a tarball ('-': standard output)")
    sp.add_argument("name")
    sp.add_argument("file")
    sp.add_argument("--format", choices=("uncompressed", "gzip", "xz", "zstd"), default=None)

    sp = verb("snapshot", verb_snapshot, "keep a copy of a stopped machine's tree (default name: the time)")
    sp.add_argument("name")
    sp.add_argument("snapshot", nargs="?", default=None)

    sp = verb("list-snapshots", verb_list_snapshots, "list a machine's snapshots")
    sp.add_argument("name")
    output(sp)
    sp.add_argument("--no-legend", action="store_true")

    sp = verb("restore", verb_restore, "return a stopped machine's tree to a snapshot")
    sp.add_argument("name")
    sp.add_argument("snapshot")

    sp = verb("remove-snapshot", verb_remove_snapshot, "remove snapshots of a machine")
    sp.add_argument("name")
    sp.add_argument("snapshots", nargs="+", metavar="SNAPSHOT")

    sp = verb("clean", verb_clean, "remove what killed creates, imports and runs left behind")
    sp.add_argument("--cache", action="store_true", help="also remove the cached bootstraps")
    return built


def run() -> NoReturn:
    """The mctl command: main(), then an exit without the interpreter's teardown of every module
    (a few milliseconds of each call); exit handlers run and output is flushed as they would be."""
    code = main()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # a reader that went away: nothing more to say to it
    os._exit(code)


def _get_ready(args: argparse.Namespace) -> None:
    """For a start or run: begin the wait of the kernel's first cgroup migration now (prewarm).
    For one machine, also fork the helpers that load their libraries on another CPU meanwhile:
    where systemd runs the machine's D-Bus agent (systemd.prefork), and where its network has
    links its network helper (netagent.prefork, unless __main__'s netagent.prefork_early did already)."""
    if args.verb not in ("run", "start") or os.geteuid() != 0:
        return
    from machined import prewarm

    prewarm.start()  # (a fork waits for a migration itself, not for the grace period before it)
    names = args.names if args.verb == "start" else [args.name] if args.name and not args.directory else []
    one = args.verb == "run" or len(names) == 1
    if one and names:
        from machined import netagent

        netagent.prefork(names[0], getattr(args, "network", None))  # None: the settings'
    if one:
        from machined import systemd

        systemd.prefork()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in argv:  # everything after '--' is the command, never an option or a name
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    debug = "--debug" in argv or os.environ.get("MACHINED_DEBUG") == "1"
    log.DEBUG = debug
    try:
        args = _quick_parse(argv)
        if args is None:
            first = next((a for a in argv if not a.startswith("-")), None)
            helping = any(a in ("-h", "--help") for a in argv[: argv.index(first) if first else len(argv)])
            args = parser(None if helping else first).parse_args(argv)
        _get_ready(args)
        if command is not None:
            if not hasattr(args, "command"):
                log.die(f"Invalid arguments: {args.verb} takes no command after '--'")
            args.command = list(getattr(args, "command", []) or []) + command
        if os.geteuid() != 0 and args.verb not in ("templates",):
            log.die(f"Failed to {args.verb}: mctl must run as root", hint="sudo mctl ...")
        return int(args.func(args) or 0)
    except MachinedError as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"mctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into something like head that stopped reading: not an error worth a word.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if debug:
            raise
        print(f"mctl: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
