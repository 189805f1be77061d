"""TOML reading with a fast path for the plain form mctl itself writes.

tomllib and what it loads (typing, datetime, its regular expressions) cost 5-10 ms, on the path of
every start of a named machine, to read a settings file of a few lines. plain() reads only a strict
subset: [bare.key] table headers, bare keys, basic strings without escapes, booleans, decimal
integers and floats, and one-line arrays of such strings, with whole-line comments. Any other
line, and anything TOML would refuse (a key or table defined twice), makes it return None, and
loads() hands the whole text to tomllib: so loads() always gives what tomllib would, and raises
what tomllib raises (a ValueError).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
_NO = object()  # not in the plain form


def loads(text: str) -> dict[str, Any]:
    """As tomllib.loads."""
    data = plain(text)
    if data is None:
        import tomllib

        data = tomllib.loads(text)
    return data


def load(path: str) -> dict[str, Any]:
    """The settings file at path; FileNotFoundError if there is none, a one-line error (die) if it
    cannot be read or is not TOML."""
    from machined.log import die

    try:
        with open(path, "rb") as f:
            return loads(f.read().decode())
    except FileNotFoundError:
        raise
    except ValueError as e:  # TOML's errors, and text that is not UTF-8
        die(f"Invalid configuration {path}: {e}")
    except OSError as e:
        die(f"Failed to read {path}: {e.strerror}")


def plain(text: str) -> dict[str, Any] | None:
    """text parsed if it is in the plain form, else None."""
    root: dict[str, Any] = {}
    table = root
    headers: set[tuple[str, ...]] = set()
    lines = text.split("\n")
    for n, raw in enumerate(lines):
        line = (raw.removesuffix("\r") if n < len(lines) - 1 else raw).lstrip(" \t")  # CRLF, not a lone CR
        if not line or line.startswith("#"):
            if not _ends_well(line):
                return None
            continue
        if line.startswith("["):
            end = line.find("]")
            parts = tuple(line[1:end].split("."))
            if end < 0 or not all(p and set(p) <= _BARE for p in parts) or parts in headers \
                    or not _ends_well(line[end + 1:]):
                return None
            headers.add(parts)
            table = root
            for part in parts:
                table = table.setdefault(part, {})
                if not isinstance(table, dict):
                    return None  # a key of that name is no table
            continue
        key, sep, rest = line.partition("=")
        key = key.rstrip(" \t")
        if not sep or not key or not set(key) <= _BARE or key in table:
            return None
        value, rest = _value(rest.lstrip(" \t"))
        if value is _NO or not _ends_well(rest):
            return None
        table[key] = value
    return root


def _ends_well(rest: str) -> bool:
    """Whether what follows a header or a value is nothing, or a comment TOML takes."""
    rest = rest.lstrip(" \t")
    return not rest or (rest.startswith("#") and not _controls(rest))


def _controls(text: str) -> bool:
    """Whether text has a control character other than tab (TOML allows none in strings and comments)."""
    return any((c < " " and c != "\t") or c == "\x7f" for c in text)


def _value(text: str) -> tuple[object, str]:
    """The value at the start of text, and the rest of text."""
    if text.startswith('"'):
        return _string(text)
    if text.startswith("["):
        return _array(text)
    token = text
    for stop in " \t#":
        token = token.partition(stop)[0]
    rest = text[len(token):]
    if token in ("true", "false"):
        return token == "true", rest
    whole, dot, fraction = token.removeprefix("-").partition(".")
    if not whole or not set(whole) <= _DIGITS or (len(whole) > 1 and whole.startswith("0")):
        return _NO, rest
    if not dot:
        return int(token), rest
    if not fraction or not set(fraction) <= _DIGITS:
        return _NO, rest
    return float(token), rest


def _string(text: str) -> tuple[object, str]:
    """A basic string without escapes or control characters at the start of text."""
    end = text.find('"', 1)
    body = text[1:end]
    if end < 0 or "\\" in body or _controls(body):
        return _NO, ""
    return body, text[end + 1:]


def _array(text: str) -> tuple[object, str]:
    """A one-line array of such strings at the start of text."""
    items: list[str] = []
    rest = text[1:].lstrip(" \t")
    while not rest.startswith("]"):
        item, rest = _string(rest) if rest.startswith('"') else (_NO, "")
        if item is _NO:
            return _NO, ""
        items.append(str(item))
        rest = rest.lstrip(" \t")
        if rest.startswith(","):
            rest = rest[1:].lstrip(" \t")
        elif not rest.startswith("]"):
            return _NO, ""
    return items, rest[1:]
