"""Frozen records: what @dataclass(frozen=True) gives the settings (config, netconfig), without
importing dataclasses.

`import dataclasses` loads inspect and re: about 15 ms here, a third of a machine's start, for
every command that reads a machine's settings. The settings need only this: an __init__ from the
annotated fields (defaults, default factories), immutability, equality, hashing, a repr, replace()
and fields(). Type checkers see record() as dataclass(frozen=True) (PEP 681), and
tests/test_records.py holds the two to the same behaviour.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:
    def dataclass_transform(**_: object) -> object:
        return lambda f: f


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FrozenInstanceError(AttributeError):
    """An assignment to a field of a record (as dataclasses.FrozenInstanceError)."""


class Field:
    """One field: its name, its annotation (a string: the modules use postponed annotations), and
    its default or default factory (MISSING where it has none)."""

    __slots__ = ("default", "default_factory", "name", "type")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING) -> None:
        self.name = ""
        self.type: Any = None
        self.default = default
        self.default_factory = default_factory

    def __repr__(self) -> str:
        return f"Field(name={self.name!r}, type={self.type!r}, default={self.default!r})"


def field(*, default: Any = MISSING, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A field's default (as dataclasses.field): a factory for a mutable or record default."""
    if default is not MISSING and default_factory is not MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return Field(default, default_factory)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[T]) -> type[T]:
    """The class decorator: cls's annotated attributes become its fields, in order."""
    own: list[Field] = []
    # (inspect.get_annotations would import inspect: the cost this module is here to avoid)
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name, f.type = name, annotation
        if isinstance(value, Field):  # (the class keeps a plain default, as dataclasses does)
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        if own and f.default is MISSING and f.default_factory is MISSING and \
                (own[-1].default is not MISSING or own[-1].default_factory is not MISSING):
            raise TypeError(f"non-default argument {name!r} follows default argument")
        own.append(f)
    fields_ = tuple(own)
    names = tuple(f.name for f in fields_)
    qualname = cls.__qualname__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{qualname}.__init__() takes {len(names) + 1} positional arguments "
                            f"but {len(args) + 1} were given")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{qualname}.__init__() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{qualname}.__init__() got multiple values for argument {key!r}")
            values[key] = value
        for f in fields_:
            if f.name in values:
                value = values[f.name]
            elif f.default is not MISSING:
                value = f.default
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"{qualname}.__init__() missing 1 required positional argument: {f.name!r}")
            object.__setattr__(self, f.name, value)

    def _values(self: Any) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in names)

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _values(self) == _values(other)

    def __hash__(self: Any) -> int:
        return hash(_values(self))

    def __repr__(self: Any) -> str:
        return f"{qualname}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    def __setattr__(self: Any, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self: Any, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    for method in (__init__, __eq__, __hash__, __repr__, __setattr__, __delattr__):
        method.__qualname__ = f"{qualname}.{method.__name__}"
        setattr(cls, method.__name__, method)
    cls.__record_fields__ = fields_  # type: ignore[attr-defined]
    return cls


def fields(obj: object) -> tuple[Field, ...]:
    """A record's (or record class's) fields, in order."""
    try:
        found: tuple[Field, ...] = obj.__record_fields__  # type: ignore[attr-defined]
    except AttributeError:
        raise TypeError("must be called with a record type or instance") from None
    return found


def replace(obj: T, **changes: Any) -> T:
    """A copy of a record with some fields changed (as dataclasses.replace)."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj)}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{type(obj).__qualname__}.__init__() got an unexpected keyword argument "
                        f"{sorted(unknown)[0]!r}")
    values.update(changes)
    new: T = type(obj)(**values)
    return new
