"""plaintoml: its fast path reads exactly what tomllib reads, or hands the text to tomllib."""

from __future__ import annotations

import random
import tomllib

import pytest

from machined import config, plaintoml


def same_as_tomllib(text: str) -> dict[str, object] | None:
    """plain(text), checked against tomllib: equal where plain reads it, and plain never reads what
    tomllib refuses."""
    fast = plaintoml.plain(text)
    try:
        slow = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert fast is None, repr(text)
        return None
    assert fast is None or (fast == slow and _types(fast) == _types(slow)), repr(text)
    return fast


def _types(value: object) -> object:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


def _configs() -> list[config.MachineConfig]:
    base = config.MachineConfig(name="m", id="0123456789abcdef0123456789abcdef")
    return [
        base,
        config.MachineConfig(name="m", id=base.id, template="debian", release="bookworm", created="2026-11-28",
                             read_only=True, kill_timeout=2.5, bind=("/srv:/srv:ro", "/a b#c"), nesting=True,
                             network=config.Network(mode="bridge:br0", address="10.0.0.5", ports=("80", "udp:53:5353"),
                                                    pod="p1"),
                             resources=config.Resources(memory_max=64 << 20, cpu_quota="50%", tasks_max=100),
                             devices=config.Devices(allow=("/dev/fuse rw",), hotplug=("subsystem=usb vendor=046d",))),
        config.MachineConfig(name="m", id=base.id, template='quo"te', release="tab\there", created="ü → ✓",
                             bind=("/back\\slash",)),
    ]


def test_what_mctl_writes_is_read_fast_and_the_same() -> None:
    for cfg in _configs():
        text = config.to_toml(cfg)
        fast = same_as_tomllib(text)
        escaped = any(c in text for c in '\\')
        assert fast is not None or escaped, text  # only escapes need tomllib
        assert config.from_dict("m", plaintoml.loads(text), "test") == cfg


SAMPLES = [
    "", "\n\n", "# only a comment\n", "a = 1", "a = -0\nb = 0\nc = 12345678901234567890", "a = 1.5\nb = -0.25",
    'a = "x" # comment', 'a = "x"# comment', "a = true#c", "[t] # c\nk = false", "[a.b]\nx = 1\n[a]\ny = 2",
    'a = ["x", "y",]', "a = [ ]", 'a = [\n"x"]', 'a = ["x" "y"]', "a = [,]", 'a = ["x"]]', "a = [1, 2]",
    'a = "x\\ny"', 'a = "say \\"hi\\""', "a = 'literal'", 'a = """multi"""', "a = 0x1F", "a = 1_000", "a = 01",
    "a = +1", "a = 1e3", "a = inf", "a = nan", "a = 1.", "a = .5", "a = 1979-05-27", "a = True", "a =", "= 1",
    "a = 1\na = 2", "[t]\n[t]", "a = 1\n[a]", "[a]\nb = 1\n[a.b]", "[[t]]", "[ t ]", "[t.]", "[]", "a.b = 1",
    '"a" = 1', "a = {b = 1}", "a = 1 2", "a = 1\r\nb = 2\r\n", "a = 1\r", "a = 1\rb = 2", "# c\r", "a = \"x\ty\"",
    'a = "x\x01"', "# \x01", "\ufeffa = 1", "a\t=\t1", "\ta = 1", "a = 1 # \x7f", 'a = "é ✓"',
    "[machine]\nid = \"x\"\n\n[network]\nmode = \"bridge\"\nports = [\"80\", \"udp:53\"]\n",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_samples(text: str) -> None:
    same_as_tomllib(text)


def test_mutated_documents() -> None:
    """Random edits of real documents: plain() still reads each one as tomllib does, or not at all."""
    rng = random.Random(4)
    pieces = ['"', "'", "\\", "#", "=", "[", "]", ",", ".", " ", "\t", "\n", "\r", "-", "0", "1", "x", "true",
              "\x00", "é", '"""', "{", "}"]
    docs = [config.to_toml(c) for c in _configs()] + SAMPLES
    read = 0
    for _ in range(4000):
        text = rng.choice(docs)
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(text))
            if rng.random() < 0.5:
                text = text[:i] + rng.choice(pieces) + text[i:]
            else:
                text = text[:i] + text[i + rng.randint(1, 3):]
        read += same_as_tomllib(text) is not None
    assert read > 250  # the fast path is exercised, not only the fallback


def test_loads_raises_what_tomllib_raises() -> None:
    with pytest.raises(tomllib.TOMLDecodeError):
        plaintoml.loads("a = 1\na = 2\n")
    assert plaintoml.loads("a = 'x'") == {"a": "x"}  # the fallback reads what plain() does not
