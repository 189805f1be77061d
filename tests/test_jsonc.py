"""jsonc: the same documents and the same values as the json module, without importing it."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from machined import jsonc

VALUES: list[object] = [
    {}, [], "", 0, -1, 2**70, 1.5, -0.0, 1e300, True, False, None, "plain", "quo\"te", "back\\slash",
    "tab\tnew\nline\x00nul", "ü → ✓ \U0001f600", "\ud800", {"a": [1, {"b": None}], "": "", "ü": [[]]},
    {"state": "running", "leader": {"pid": 12345, "start": 987654321}, "argv": ["/bin/sh", "-c", "exit 7"]},
    {"z": 1, "a": 2, "m": {"y": 1, "b": 2}}, {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
    float("inf"), float("-inf"),
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_dumps_writes_what_json_writes(value: object) -> None:
    for sort_keys in (False, True):
        try:
            theirs = json.dumps(value, separators=(",", ":"), sort_keys=sort_keys)
        except TypeError:  # keys of types that do not sort together
            with pytest.raises(TypeError):
                jsonc.dumps(value, sort_keys=sort_keys)
            continue
        ours = jsonc.dumps(value, sort_keys=sort_keys)
        assert ours == theirs
        assert _same(jsonc.loads(ours), json.loads(ours))


def test_dumps_refuses_what_json_refuses() -> None:
    loop: list[object] = []
    loop.append(loop)
    for bad in ({"set": {1, 2}}, [b"bytes"], {(1, 2): "tuple key"}, loop):
        with pytest.raises((TypeError, ValueError)) as ours:
            jsonc.dumps(bad)
        with pytest.raises((TypeError, ValueError)) as theirs:
            json.dumps(bad, separators=(",", ":"))
        assert type(ours.value) is type(theirs.value)
    assert jsonc.dumps([1, 2]) == "[1,2]"  # a failed call leaves nothing behind for the next


TEXTS = [
    "", " ", "null", " 1 ", "\t[1, 2 ,3]\n", '{"a" : 1 , "b":[true,false,null]}', "1 2", "[1,]", "{,}", "{'a':1}",
    '"\\u00e9\\ud83d\\ude00"', '"\\ud800"', '"a\tb"', '"a\\tb"', "NaN", "-Infinity", "Infinity", "nan", "01", "-",
    "1e400", "-0", "0.0e+0", "[", "]", '{"a":1', '{"a":1}}', '{"a":1,"a":2}', "[1]x", "\ufeff1", "\u00a01", "tru",
    '"\\x41"', "[" * 50 + "]" * 50, "1.", ".5", "+1",
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_loads_reads_what_json_reads(text: str) -> None:
    _check(text)


def test_loads_on_thousands_of_mutated_documents() -> None:
    rng = random.Random(20261128)
    docs = [json.dumps(v, indent=rng.choice([None, 1])) for v in VALUES if _finite(v)]
    alphabet = ' \t\n{}[],:"\\-+.0123456789eEtruefalsn'
    for _ in range(4000):
        text = list(rng.choice(docs))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text) + 1)
            op = rng.random()
            if op < 0.4 and text:
                del text[min(i, len(text) - 1)]
            elif op < 0.8:
                text.insert(i, rng.choice(alphabet))
            elif text:
                text[min(i, len(text) - 1)] = rng.choice(alphabet)
        _check("".join(text))


def test_bytes_and_files(tmp_path: object) -> None:
    assert jsonc.loads(b'{"a": "\xc3\xbc"}') == {"a": "ü"}
    with pytest.raises(ValueError):
        jsonc.loads(b"\xff")
    path = f"{tmp_path}/state.json"
    jsonc.save(path, VALUES[19])
    assert jsonc.load(path) == VALUES[19]
    jsonc.save(path, VALUES[20], sort_keys=True)
    with open(path) as f:
        assert f.read() == json.dumps(VALUES[20], separators=(",", ":"), sort_keys=True)
    assert os.listdir(str(tmp_path)) == ["state.json"]  # no temporary file left


def test_importing_and_using_it_loads_neither_json_nor_re() -> None:
    code = ("import sys; from machined import jsonc; jsonc.loads(jsonc.dumps({'a': [1.5, None, 'x']})); "
            "print(sorted({'json', 're', 'enum'} & set(sys.modules)))")
    # -S: no site-packages, whose editable-install hooks import re themselves; machined from the checkout
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "[]"


def _check(text: str) -> None:
    """loads(text) equals json.loads(text), or both raise ValueError."""
    try:
        theirs = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            jsonc.loads(text)
        return
    assert _same(jsonc.loads(text), theirs), repr(text)


def _same(a: object, b: object) -> bool:
    """Equal, with the same types, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _finite(value: object) -> bool:
    return not (isinstance(value, float) and math.isinf(value))
