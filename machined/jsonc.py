"""JSON through CPython's C codec alone.

The json package compiles regular expressions at import (it imports re, and with it enum,
functools and collections): about 8 ms of each mctl call, which reads or writes state as JSON.
Its C half, _json, encodes and scans by itself; this drives it the way json does, with json's
defaults, and the same results (tests/test_jsonc.py compares the two).
"""

from __future__ import annotations

import _json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

WHITESPACE = " \t\n\r"


def _unserialisable(obj: object) -> NoReturn:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: object, sort_keys: bool = False) -> str:
    """As json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys): ASCII, no circular references."""
    encode = _json.make_encoder({}, _unserialisable, _json.encode_basestring_ascii, None, ":", ",",
                                sort_keys, False, True)
    return "".join(encode(obj, 0))


class _Context:
    """What the C scanner reads from json's JSONDecoder: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # the stub wants the scanner type


def loads(text: str | bytes) -> Any:
    """As json.loads; a malformed document raises ValueError (json's JSONDecodeError, a subclass)."""
    if isinstance(text, bytes):
        text = text.decode()
    body = text.strip(WHITESPACE)
    try:
        obj, end = _scan(body, 0)
    except StopIteration:
        raise ValueError("Expecting value") from None
    if end != len(body):
        raise ValueError(f"Extra data at {end}")
    return obj


def load(path: str) -> Any:
    with open(path, "rb") as f:
        return loads(f.read())


def save(path: str, obj: object, sort_keys: bool = False) -> None:
    """dumps(obj) into path through a temporary file, so that a reader sees the old or the new."""
    with open(path + ".tmp", "w") as f:
        f.write(dumps(obj, sort_keys))
    os.replace(path + ".tmp", path)
