"""machined.records against dataclasses(frozen=True): the same classes written both ways behave
the same (construction, defaults, factories, errors, immutability, equality, hashing, repr,
replace, fields), and the settings' modules load without dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest

from machined import records


def _classes(decorate: Any, field: Any) -> tuple[Any, Any]:
    """The same two classes, made by dataclass(frozen=True) and dataclasses.field, or by records."""

    @decorate
    class Inner:
        a: int = 1
        b: tuple[str, ...] = ()

    @decorate
    class Outer:
        name: str
        size: int | None = None
        flag: bool = False
        inner: Inner = field(default_factory=Inner)
        table: dict[str, int] = field(default_factory=dict)

    return Inner, Outer


DInner, DOuter = _classes(dataclasses.dataclass(frozen=True), dataclasses.field)
RInner, ROuter = _classes(records.record, records.field)


PAIRS: list[tuple[Any, Any]] = [(DInner, RInner), (DOuter, ROuter)]
CALLS: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = [
    (0, (), {}), (0, (5,), {}), (0, (5, ("x",)), {}), (0, (), {"b": ("y", "z")}), (0, (1, 2, 3), {}),
    (0, (), {"c": 1}), (0, (5,), {"a": 6}),
    (1, ("m",), {}), (1, (), {"name": "m", "size": 3, "flag": True}), (1, (), {}), (1, ("m", 1, True, 2, 3, 4), {}),
    (1, (), {"name": "m", "nope": 1}),
]


def _outcome(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
    try:
        obj = cls(*args, **kwargs)
    except TypeError:
        return "TypeError", None
    return "ok", [getattr(obj, f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) \
        else [getattr(obj, f.name) for f in records.fields(obj)]


@pytest.mark.parametrize(("which", "args", "kwargs"), CALLS)
def test_construction_and_its_errors_match(which: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    dcls, rcls = PAIRS[which]
    d, r = _outcome(dcls, args, kwargs), _outcome(rcls, args, kwargs)
    if d[0] == "ok" and which == 1:  # (the nested record differs only by class)
        d = (d[0], [v if not isinstance(v, DInner) else ("inner", v.a, v.b) for v in d[1]])
        r = (r[0], [v if not isinstance(v, RInner) else ("inner", v.a, v.b) for v in r[1]])
    assert d == r


def test_fields_match() -> None:
    for dcls, rcls in PAIRS:
        d = [(f.name, f.type, f.default is dataclasses.MISSING) for f in dataclasses.fields(dcls)]
        r = [(f.name, f.type, f.default is records.MISSING) for f in records.fields(rcls)]
        assert d == r
    assert records.fields(ROuter("m")) == records.fields(ROuter)
    with pytest.raises(TypeError):
        records.fields(object())


def test_frozen_equal_hashable_and_shown_alike() -> None:
    d, r = DInner(2, ("x",)), RInner(2, ("x",))
    for obj in (d, r):
        with pytest.raises(AttributeError):
            obj.a = 3
        with pytest.raises(AttributeError):
            del obj.a
    with pytest.raises(records.FrozenInstanceError):
        r.a = 3
    assert repr(r) == repr(d)
    other: object = d
    assert r == RInner(2, ("x",)) and r != RInner(3, ("x",)) and r != other and r.__eq__(1) is NotImplemented
    assert hash(r) == hash(RInner(2, ("x",))) and len({r, RInner(2, ("x",)), RInner()}) == 2
    with pytest.raises(TypeError):  # (as a dataclass: a dict field makes it unhashable)
        hash(ROuter("m"))
    with pytest.raises(TypeError):
        hash(DOuter("m"))


def test_default_factories_make_a_new_object_each_time() -> None:
    one, two = ROuter("a"), ROuter("b")
    assert one.table == {} and one.table is not two.table and one.inner == RInner()
    assert "table" not in ROuter.__dict__ and RInner.__dict__["a"] == 1  # (the class keeps plain defaults)


def test_replace_matches() -> None:
    r = ROuter("m", size=2, inner=RInner(4))
    new = records.replace(r, flag=True, inner=records.replace(r.inner, b=("q",)))
    assert new == ROuter("m", 2, True, RInner(4, ("q",))) and r.flag is False
    with pytest.raises(TypeError):
        records.replace(r, nope=1)
    with pytest.raises(TypeError):
        dataclasses.replace(DOuter("m"), nope=1)


def test_a_required_field_after_a_default_is_refused() -> None:
    with pytest.raises(TypeError):
        @records.record
        class Bad:
            a: int = 1
            b: str  # type: ignore[misc]
    with pytest.raises(ValueError):
        records.field(default=1, default_factory=list)


def test_the_settings_load_without_dataclasses() -> None:
    """What every start, status and set-limit reads: no dataclasses, no inspect."""
    code = ("import sys; from machined import config, netconfig; "
            "print(sorted(m for m in ('dataclasses', 'inspect', 're') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": ":".join(sys.path)})
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
