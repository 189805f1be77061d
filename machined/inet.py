"""IP addresses and subnets as integers, parsed and printed by the C library (inet_pton, inet_ntop).

What a start needs of addresses: parse a subnet, a gateway or a fixed address strictly, test
membership, count and step through a subnet, print. The standard library's ipaddress does that
too, but importing it (with functools and collections, which nothing else on a start loads) took
2.5-4 ms of the 8-9 ms that bridged networking added to `mctl start`. inet_pton is strict: four
decimal parts without leading zeros for IPv4, no spaces, no zone, no prefix.
"""

from __future__ import annotations

import _socket

from machined.records import record

_FAMILY = {4: _socket.AF_INET, 6: _socket.AF_INET6}
_BITS = {4: 32, 6: 128}


@record
class Address:
    version: int
    value: int

    @classmethod
    def parse(cls, text: str, version: int = 4) -> Address:
        """ValueError unless text is an IPv4 (or, with version 6, IPv6) address in its usual notation."""
        try:
            packed = _socket.inet_pton(_FAMILY[version], text)
        except (OSError, ValueError, TypeError):
            raise ValueError(f"{text!r} is not an IPv{version} address") from None
        return cls(version, int.from_bytes(packed, "big"))

    def __str__(self) -> str:
        return _socket.inet_ntop(_FAMILY[self.version], self.value.to_bytes(_BITS[self.version] // 8, "big"))

    def __int__(self) -> int:
        return self.value

    def __add__(self, offset: int) -> Address:
        value = self.value + offset
        if not 0 <= value < 1 << _BITS[self.version]:
            raise ValueError(f"{self} + {offset} is not an IPv{self.version} address")
        return Address(self.version, value)

    @property
    def is_loopback(self) -> bool:
        return self.value >> 24 == 127 if self.version == 4 else self.value == 1


@record
class Network:
    version: int
    value: int  # the network address: host bits zero
    prefixlen: int

    @classmethod
    def parse(cls, text: str, version: int = 4, strict: bool = True) -> Network:
        """ValueError unless text is ADDRESS/PREFIX, with no host bits set if strict (else they are
        cleared), as ipaddress's networks."""
        addr, slash, prefix = text.partition("/")
        bits = _BITS[version]
        if not slash or not prefix.isdigit() or not prefix.isascii() or not 0 <= int(prefix) <= bits:
            raise ValueError(f"{text!r} is not an IPv{version} network (ADDRESS/PREFIX, the prefix 0-{bits})")
        value, host = Address.parse(addr, version).value, (1 << (bits - int(prefix))) - 1
        if value & host and strict:
            raise ValueError(f"{text} has host bits set")
        return cls(version, value & ~host, int(prefix))

    @property
    def num_addresses(self) -> int:
        return 1 << (_BITS[self.version] - self.prefixlen)

    @property
    def network_address(self) -> Address:
        return Address(self.version, self.value)

    @property
    def broadcast_address(self) -> Address:
        return Address(self.version, self.value + self.num_addresses - 1)

    def __contains__(self, addr: Address) -> bool:
        return addr.version == self.version and self.value <= addr.value < self.value + self.num_addresses

    def overlaps(self, other: Network) -> bool:
        return self.network_address in other or other.network_address in self

    def __str__(self) -> str:
        return f"{self.network_address}/{self.prefixlen}"


def is_loopback(text: str) -> bool | None:
    """Whether text (an IPv4 or IPv6 address, an IPv6 one perhaps with a %zone) is a loopback
    address; None if it is not an address."""
    for version in (4, 6):
        try:
            return Address.parse(text.split("%")[0], version).is_loopback
        except ValueError:
            pass
    return None
