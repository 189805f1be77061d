"""mctl's quick parse (cli._quick_parse, without argparse) against argparse's: it may decline (None),
but never parse differently, nor take what argparse refuses."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, cast

import pytest

from machined import cli, netagent
from machined.log import MachinedError


def _specs() -> tuple[cli._Spec, dict[str, cli._Spec]]:
    """The top level's and every verb's declarations (aliases too), as _build makes them."""
    top, verbs = cli._Spec(), {}

    def add_verb(name: str, help_: str, aliases: Sequence[str]) -> argparse.ArgumentParser:
        verbs.update(dict.fromkeys([name, *aliases], cli._Spec()))
        return cast(argparse.ArgumentParser, verbs[name])

    cli._build(cast(argparse.ArgumentParser, top), add_verb, None)
    return top, verbs


TOP, VERBS = _specs()
FULL = cli.parser()
WORDS = ["a", "b", "none", "json", "text", "leader", "3", "1.5", "k=v", "", "-", "-1", "-x", "--", "rm", "start"]


@functools.cache
def _parser(only: str) -> argparse.ArgumentParser:
    return cli.parser(only)


def _argparse(argv: list[str], p: argparse.ArgumentParser = FULL) -> dict[str, Any] | None:
    """What argparse makes of argv; None where it refuses it or shows the help."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return vars(p.parse_args(argv))
    except (MachinedError, SystemExit):
        return None


def check(argv: list[str]) -> bool:
    """The rule for argv: declined, or parsed as argparse parses it (main()'s one-verb parser too).
    Returns whether it was taken."""
    quick = cli._quick_parse(argv)
    if quick is None:
        return False
    assert vars(quick) == _argparse(argv), argv
    assert vars(quick) == _argparse(argv, _parser(argv[argv.index(quick.verb)])), argv
    return True


def _options(spec: cli._Spec) -> list[tuple[list[str], dict[str, Any]]]:
    """Each option once: its option strings and keywords."""
    flags: dict[int, list[str]] = {}
    for flag, o in spec.options.items():
        flags.setdefault(id(o), []).append(flag)
    return [(f, spec.options[f[0]]) for f in flags.values()]


def _value(o: dict[str, Any]) -> str:
    """A value the option takes."""
    types: dict[object, str] = {int: "3", float: "1.5"}
    return str(o["choices"][-1]) if o.get("choices") else types.get(o.get("type"), "val")


def _valid(verb: str) -> list[list[str]]:
    """argv that argparse takes for verb: its options in every form, before and after the names."""
    spec = VERBS[verb]
    words = [f"w{n}" for n, p in enumerate(spec.positionals) if p.get("nargs") not in ("?", "*")]
    required = [x for flags, o in _options(spec) if o.get("required") for x in (flags[-1], _value(o))]
    more = [*words, "extra"] if len(words) < len(spec.positionals) or any(
        p.get("nargs") in ("*", "+") for p in spec.positionals) else words
    samples = [[verb, *words, *required], [verb, *required, *more], ["--debug", verb, *more, *required]]
    for flags, o in _options(spec):
        for flag in flags:
            given = [flag] if o.get("action") == "store_true" else [flag, _value(o)]
            samples += [[verb, *words, *given, *required], [verb, *given, *more, *required]]
            if flag.startswith("--") and len(given) == 2:
                samples.append([verb, *words, f"{flag}={given[1]}", *required])
            if o.get("action") == "append":
                samples.append([verb, *given, *words, *given, *required])
    return samples


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_taken_as_argparse_takes_it(verb: str) -> None:
    for argv in _valid(verb):
        assert check(argv), argv


@pytest.mark.parametrize("argv", [
    [], ["--debug"], ["-h"], ["--help"], ["nosuch"], ["nosuch", "a"], ["", "a"], ["start"], ["start", "-h"],
    ["start", "a", "--help"], ["-h", "start", "a"], ["start", "a", "--net", "none"], ["start", "a", "--netw=none"],
    ["start", "a", "--network"], ["start", "a", "--network", "-x"], ["start", "a", "--network=-x"],
    ["start", "a", "--network="], ["start", "a", "-xp", "80"], ["start", "a", "-p80"], ["start", "a", "-p=80"],
    ["run", "-Dfoo"], ["run", "-D", "-"], ["start", "a", "--network", "none", "b"], ["start", "a", "--debug"],
    ["start", "--debug", "a"], ["--debug=1", "start", "a"], ["--deb", "start", "a"], ["start", "a", "--bogus"],
    ["start", "a", "--foreground=yes"], ["list", "extra"], ["list", "-o", "xml"], ["list", "--output=yaml"],
    ["status", "a", "-n", "x"], ["status", "a", "-n", "-5"], ["status", "a", "--lines=2.5"],
    ["poweroff", "a", "--timeout", "soon"], ["kill", "a", "--kill-whom", "some"], ["create", "a"],
    ["create", "a", "--template"], ["create", "--template", "t"], ["create", "a", "b", "--template", "t"],
    ["rename", "a"], ["rename", "a", "b", "c"], ["import-tar", "f", "--read-only", "n"], ["export-tar", "n", "-"],
    ["shell", "a", "--uid", "u", "ls"], ["run", "a", "--read-only", "ls"], ["read-only", "a", "yes", "no"],
    ["clean", "x"], ["set-limit", "a"], ["remove-snapshot", "a"], ["--", "start", "a"], ["start", "--", "a"],
])
def test_declined_or_as_argparse(argv: list[str]) -> None:
    if _argparse(argv) is None:
        assert cli._quick_parse(argv) is None, argv
    check(argv)


@pytest.mark.parametrize("argv", [
    ["-h", "start", "a"], ["start", "a", "--help"], ["start", "a", "--net", "none"], ["start", "a", "-xp"],
    ["run", "-Dfoo"], ["status", "a", "-n", "-5"], ["import-tar", "f", "--read-only", "n"], ["export-tar", "n", "-"],
    ["start", "a", "--debug"],
])
def test_declines_what_argparse_does_otherwise(argv: list[str]) -> None:
    assert cli._quick_parse(argv) is None


@pytest.mark.parametrize("argv", [
    ["run", "--directory", "D"], ["run", "NAME"], ["start", "NAME"], ["start", "NAME", "--network", "none"],
    ["start", "A", "B"], ["status", "NAME"], ["list"], ["list", "-o", "json"], ["show", "NAME", "-p", "State",
    "--value"], ["poweroff", "NAME"], ["rm", "NAME"], ["shell", "NAME"], ["--debug", "start", "NAME"],
    ["start", "--network=none", "A"], ["run", "-D", "D", "--read-only", "ls", "x"], ["create", "", "-t", "t"],
])
def test_common_forms_taken(argv: list[str]) -> None:
    assert check(argv), argv


def _random_argv(rng: random.Random) -> list[str]:
    verb = rng.choice([*VERBS, *VERBS, "nosuch"])
    spec = VERBS.get(verb, TOP)
    flags = [*spec.options, *TOP.options, "-h", "--help"]
    odd = [*(f[:-1] for f in flags if len(f) > 3), *(f + "=" + rng.choice(WORDS) for f in flags if f[1] == "-"),
           *(f + rng.choice(["v", "x", "p"]) for f in flags if f[1] != "-"), *WORDS]
    argv = [rng.choice(["--debug", *odd]) for _ in range(rng.choice([0, 0, 0, 1, 2]))]
    argv += [verb] if rng.random() < 0.95 else []
    for _ in range(rng.randrange(7)):
        r = rng.random()
        if r < 0.45:
            argv.append(f"w{rng.randrange(3)}")
        elif r < 0.85 and spec.options:
            flag = rng.choice(list(spec.options))
            o = spec.options[flag]
            argv.append(flag)
            if o.get("action") != "store_true" and rng.random() < 0.9:
                argv.append(_value(o) if rng.random() < 0.7 else rng.choice(WORDS))
        else:
            argv.append(rng.choice(odd))
    return argv


def test_random_argv() -> None:
    rng = random.Random(20240611)
    taken = sum(check(_random_argv(rng)) for _ in range(10000))
    assert taken > 1000, taken  # the fuzzing reaches what is taken, not only what is declined


def test_main_uses_the_quick_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[argparse.Namespace] = []

    def verb_run(a: argparse.Namespace) -> int:
        got.append(a)
        return 7

    def no_parser(only: str | None = None) -> argparse.ArgumentParser:
        raise AssertionError("argparse used")

    monkeypatch.setattr(cli, "verb_run", verb_run)
    monkeypatch.setattr(cli, "parser", no_parser)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli, "_get_ready", lambda a: None)  # no helpers forked, no prewarm thread here
    assert cli.main(["run", "m", "--read-only", "--", "ls", "-l"]) == 7
    assert (got[0].name, got[0].command, got[0].read_only, got[0].verb) == ("m", ["ls", "-l"], True, "run")


def test_main_falls_back_to_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["start", "m", "--bogus"]) == 1
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["start", "--help"])
    assert "usage: mctl start" in capsys.readouterr().out


def test_quick_parse_does_not_import_argparse() -> None:
    code = ("import sys; from machined import cli; "
            "print(cli._quick_parse(['start', 'x', '--network', 'none']) is not None, 'argparse' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.split() == ["True", "False"], r.stdout + r.stderr


def _helper_decision(args: dict[str, Any]) -> tuple[str, str | None] | tuple[()]:
    """What cli._get_ready gives netagent.prefork for parsed args (() where it forks no helper)."""
    start = args["verb"] == "start"
    names = args["names"] if start else [args["name"]] if args["name"] and not args["directory"] else []
    if not names or (start and len(names) > 1):
        return ()
    return names[0], args.get("network")


def check_scan(argv: list[str]) -> bool:
    """netagent.scan, which forks a start's network helper before mctl has imported its parser:
    uncertain (None), or what the parser's decision would be; a helper never for what the parser
    refuses. Returns whether it was certain."""
    decided = netagent.scan(argv)
    if decided is None:
        return False
    args = _argparse(argv[: argv.index("--")] if "--" in argv else argv)
    assert decided == (() if args is None else _helper_decision(args)), argv
    return True


@pytest.mark.parametrize("verb", ["start", "run"])
def test_the_early_helper_decision_is_the_parsers(verb: str) -> None:
    for argv in _valid(verb):
        check_scan(argv)
    rng = random.Random(20261128)
    certain = 0
    for _ in range(10000):
        argv = _random_argv(rng)
        argv[0:0] = [verb] if argv[:1] != [verb] else []
        certain += check_scan(argv)
    assert certain > 1000, certain


@pytest.mark.parametrize("argv", [
    ["start", "NAME"], ["start", "NAME", "--network", "none"], ["start", "--network=bridge:b", "NAME"],
    ["start", "A", "B"], ["start", "NAME", "-x", "-p", "8080:80", "--port", "53", "--pod", "P"],
    ["start", "NAME", "--foreground"], ["run", "NAME"], ["run", "NAME", "--", "ls", "-l"], ["run", "NAME", "ls"],
    ["run", "-D", "D", "--read-only", "--", "ls"], ["run", "--directory=D"],
])
def test_the_early_helper_decision_is_certain_for_common_forms(argv: list[str]) -> None:
    assert check_scan(argv), argv


def test_mctl_forks_the_network_helper_before_it_imports_its_parser() -> None:
    """__main__ calls netagent.prefork_early first thing for a start: cli (the parser) is a stand-in
    here, which __main__ finds as it imports cli only after that."""
    code = ("import os, sys, types; sys.argv = ['mctl', 'start', 'm', '--network', 'bridge:b']; "
            "os.geteuid = lambda: 0; from machined import netagent; seen = []; "
            "netagent.prefork = lambda *a: seen.append(a); "
            "sys.modules['machined.cli'] = types.SimpleNamespace(run=lambda: print(seen)); "
            "import machined.__main__")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert out.strip() == "[('m', 'bridge:b')]"


@pytest.mark.root
def test_a_bad_name_is_refused_in_one_line_also_where_the_helper_is_forked_early() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv in (["start", "a/b", "--network", "bridge"], ["start", "..", "--network=veth"], ["run", "a/b"]):
        r = subprocess.run([sys.executable, os.path.join(root, "bin", "mctl"), *argv], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=root))
        assert r.returncode == 1 and r.stderr.startswith("mctl: ") and r.stderr.count("\n") == 1, (argv, r.stderr)
