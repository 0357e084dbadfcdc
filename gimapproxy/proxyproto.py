"""The HAProxy PROXY protocol header, versions 1 and 2: bytes in, values out.

A TCP load balancer sends this header first on each connection it opens to the proxy,
before any IMAP byte, to say where the client really connected from (HAProxy's
doc/proxy-protocol.txt). `parse_header(data)` looks at the bytes received so far and
returns one of three values, never raising for any input:

- `NEED_MORE`: `data` is a valid beginning, and every byte of it belongs to the header;
- a `ProxyHeader`: the header is complete; it took `length` bytes of `data`, and what
  follows them is the client's own;
- a `HeaderError` with a reason: this is not a valid header, the connection must be
  closed (the spec: any sequence that does not exactly match must cause an abort).

No sockets, clocks, logging or gevent. The caller accumulates bytes and asks again;
inputs are bounded (107 bytes for version 1, `max_size` for version 2), so asking again
from the start costs little.
"""
from __future__ import annotations

import ipaddress
import re
import struct
from typing import NamedTuple, Optional, Union

__all__ = ['parse_header', 'NEED_MORE', 'NeedMore', 'ProxyHeader', 'HeaderError',
           'V1_MAX_LENGTH', 'V2_SIGNATURE', 'V2_MAX_LENGTH']

# Section 2.1: the longest version 1 line, CRLF included ("PROXY UNKNOWN" with two full
# IPv6 addresses and ports).
V1_MAX_LENGTH = 107
_V1_PREFIX = b'PROXY '
# Section 2.2: the 12-byte signature that starts a version 2 header, then a byte of
# version and command, a byte of family and protocol, and a 16-bit length of what follows.
V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
_V2_FIXED = 16
# A version 2 header may say it is up to 16 + 65535 bytes long. Addresses take at most
# 216 bytes; the rest is TLVs (SSL details, a unique id up to 128 bytes, the SNI). This
# cap is far above what HAProxy sends without a client certificate in it, and keeps a
# hostile length from making the proxy buffer 64 KiB per connection.
V2_MAX_LENGTH = 2048

_IPV4 = re.compile(rb'(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}\Z')
_IPV6 = re.compile(rb'[0-9A-Fa-f:.]{2,45}\Z')
_PORT = re.compile(rb'(?:0|[1-9][0-9]{0,4})\Z')


class NeedMore(NamedTuple):
    """The bytes so far are a valid beginning of a header, and all belong to it."""


NEED_MORE = NeedMore()


class ProxyHeader(NamedTuple):
    """A complete, valid header.

    `source` and `destination` are (address, port) as the load balancer saw the client's
    connection, or None when the header carries no usable address: version 2 LOCAL (the
    balancer's own connection, such as a health check), version 1 UNKNOWN, or a family
    other than TCP over IPv4 or IPv6. The spec says the real connection's addresses are
    then used, as if there were no header.
    """
    version: int                    # 1 or 2
    command: str                    # 'PROXY' or 'LOCAL' (version 2 only)
    family: str                     # 'TCP4', 'TCP6', 'UNKNOWN', 'UDP4', 'UNIX', ...
    source: Optional[tuple]
    destination: Optional[tuple]
    length: int                     # bytes of `data` the header took


class HeaderError(NamedTuple):
    """Not a valid header (the peer did wrong); `reason` says what, for the log."""
    reason: str


Result = Union[NeedMore, ProxyHeader, HeaderError]


def parse_header(data: bytes, max_size: int = V2_MAX_LENGTH) -> Result:
    """Parse the PROXY protocol header at the start of `data`.

    Args:
        data: the bytes received on the connection so far (may run past the header).
        max_size: the longest version 2 header accepted, in bytes, its 16 fixed bytes
            included.

    Returns:
        NEED_MORE when `data` is a valid but incomplete beginning (every byte of it is
        then header, so a reader may consume all of it); a ProxyHeader when complete;
        a HeaderError when `data` cannot begin a valid header. A given prefix of the
        bytes always gets the same answer, so feeding them in any split ends the same.
    """
    start = data[:len(V2_SIGNATURE)]
    if V2_SIGNATURE.startswith(start) and start:
        return _parse_v2(data, max_size)
    if _V1_PREFIX.startswith(data[:len(_V1_PREFIX)]):
        return _parse_v1(data) if data else NEED_MORE
    return HeaderError('not a PROXY protocol header')


# -- version 1: one line of text (section 2.1) --------------------------------------------

def _parse_v1(data: bytes) -> Result:
    window = data[:V1_MAX_LENGTH]
    ends = [i for i in (window.find(b'\r'), window.find(b'\n')) if i >= 0]
    if not ends:
        if len(data) >= V1_MAX_LENGTH:
            return HeaderError('version 1 line longer than %d bytes' % V1_MAX_LENGTH)
        return NEED_MORE
    end = min(ends)
    # A single CR or LF must not end the line: only CRLF does.
    if window[end] == 0x0a:
        return HeaderError('version 1 line ends in a bare LF')
    if end + 2 > V1_MAX_LENGTH:
        return HeaderError('version 1 line longer than %d bytes' % V1_MAX_LENGTH)
    if end + 1 == len(data):
        return NEED_MORE
    if data[end + 1] != 0x0a:
        return HeaderError('version 1 line has a CR without LF')
    return _v1_fields(data[:end], end + 2)


def _v1_fields(line: bytes, length: int) -> Result:
    parts = line.split(b' ')
    family = parts[1] if len(parts) > 1 else b''
    if family == b'UNKNOWN':
        # The sender may omit the rest; the receiver ignores it (section 2.1).
        return ProxyHeader(1, 'PROXY', 'UNKNOWN', None, None, length)
    if family not in (b'TCP4', b'TCP6'):
        return HeaderError('version 1 protocol is not TCP4, TCP6 or UNKNOWN')
    if len(parts) != 6:
        return HeaderError('version 1 line needs 6 fields separated by single spaces, '
                           'has %d' % len(parts))
    _, _, src, dst, sport, dport = parts
    version = 4 if family == b'TCP4' else 6
    addresses = []
    for text in (src, dst):
        address = _v1_address(text, version)
        if address is None:
            return HeaderError('version 1 address is not a canonical IPv%d address' % version)
        addresses.append(address)
    ports = []
    for text in (sport, dport):
        if not _PORT.match(text) or int(text) > 65535:
            return HeaderError('version 1 port is not a number from 0 to 65535')
        ports.append(int(text))
    return ProxyHeader(1, 'PROXY', family.decode(), (addresses[0], ports[0]),
                       (addresses[1], ports[1]), length)


def _v1_address(text: bytes, version: int) -> Optional[str]:
    """The address in canonical text, or None when it is not one of IP `version`.
    Leading zeros are refused (they could be read as octal)."""
    if not (_IPV4 if version == 4 else _IPV6).match(text):
        return None
    try:
        address = ipaddress.ip_address(text.decode('ascii'))
    except ValueError:
        return None
    return _text(address) if address.version == version else None


def _text(address) -> str:
    """An address as the proxy would see it on a socket: an IPv4-mapped IPv6 address
    keeps its dotted tail ('::ffff:192.0.2.7', as inet_ntop writes it)."""
    mapped = getattr(address, 'ipv4_mapped', None)
    return '::ffff:%s' % mapped if mapped is not None else str(address)


# -- version 2: binary (section 2.2) ------------------------------------------------------

# The family (high nibble of the 14th byte) and protocol (low nibble) names.
_FAMILIES = {0: 'UNSPEC', 1: 'INET', 2: 'INET6', 3: 'UNIX'}
_PROTOCOLS = {0: 'UNSPEC', 1: 'STREAM', 2: 'DGRAM'}
_NAMES = {(1, 1): 'TCP4', (2, 1): 'TCP6', (1, 2): 'UDP4', (2, 2): 'UDP6',
          (3, 1): 'UNIX', (3, 2): 'UNIX_DGRAM'}


def _parse_v2(data: bytes, max_size: int) -> Result:
    # Each byte is checked as soon as it is there, so a bad header is refused early.
    if len(data) <= 12:
        return NEED_MORE
    version, command = data[12] >> 4, data[12] & 0x0f
    if version != 2:
        return HeaderError('version 2 signature with version %d' % version)
    if command not in (0, 1):
        return HeaderError('version 2 command %d is neither LOCAL nor PROXY' % command)
    if len(data) <= 13:
        return NEED_MORE
    family, protocol = data[13] >> 4, data[13] & 0x0f
    # LOCAL ignores the family byte (section 2.2); for PROXY it must be a defined one.
    if command == 1 and (family not in _FAMILIES or protocol not in _PROTOCOLS):
        return HeaderError('version 2 family/protocol byte 0x%02x is not defined' % data[13])
    if len(data) < _V2_FIXED:
        return NEED_MORE
    length = _V2_FIXED + struct.unpack('!H', data[14:16])[0]
    if length > max_size:
        return HeaderError('version 2 header of %d bytes is over the limit of %d'
                           % (length, max_size))
    if len(data) < length:
        return NEED_MORE
    block = data[_V2_FIXED:length]
    if command == 0:
        # LOCAL: the balancer's own connection; family and addresses are ignored.
        return ProxyHeader(2, 'LOCAL', 'UNSPEC', None, None, length)
    name = _NAMES.get((family, protocol), 'UNSPEC')
    if name not in ('TCP4', 'TCP6'):
        # Families without an IP address for the client fall back to the real
        # connection's addresses, as for UNSPEC (section 2.2).
        return ProxyHeader(2, 'PROXY', name, None, None, length)
    size = 4 if name == 'TCP4' else 16
    if len(block) < 2 * size + 4:
        return HeaderError('version 2 %s address block is %d bytes, needs %d'
                           % (name, len(block), 2 * size + 4))
    make = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    source, destination = make(block[:size]), make(block[size:2 * size])
    sport, dport = struct.unpack('!HH', block[2 * size:2 * size + 4])
    # What follows the addresses is TLVs, which this proxy has no use for: skipped.
    return ProxyHeader(2, 'PROXY', name, (_text(source), sport), (_text(destination), dport),
                       length)
