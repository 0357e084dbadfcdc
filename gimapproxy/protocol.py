"""Pure IMAP framing and parsing: bytes in, values out. No sockets, clocks or logging.

The proxy needs two things from the wire format (RFC 3501 section 4, RFC 7888, RFC 3516):

* cut a byte stream into lines and literal payloads, in either direction, so that a literal
  is passed on by count and never scanned for tags or commands (`Framer`);
* classify server responses (untagged, continuation, tagged with status and code) and edit
  capability lists (`parse_response`, `filter_capabilities`, `rewrite_capabilities`).
"""
from __future__ import annotations

import re
from typing import Optional, Union

__all__ = [
    'ProtocolError', 'LineTooLong', 'BadLiteral',
    'Line', 'LiteralData', 'Framer', 'literal_of', 'literal_size',
    'Response', 'parse_response',
    'quote', 'astring', 'login_command', 'code_capabilities', 'untagged_capabilities',
    'filter_capabilities', 'rewrite_capabilities',
    'MAX_LITERAL',
]

# RFC 3501 section 9: number = unsigned 32-bit integer.
MAX_LITERAL = 0xFFFFFFFF

# A line ends in a literal announcement: `{n}`, `{n+}` (RFC 7888), `~{n}` (RFC 3516). The
# size may have any number of digits, leading zeros included, or none (`{}`, `{+}`: size
# 0), as Dovecot reads it.
_LITERAL_RE = re.compile(rb'(~?)\{([0-9]*)(\+?)\}\r?\n\Z')
# Significant digits of the largest size worth reading (MAX_LITERAL has ten).
_MAX_DIGITS = 10


class ProtocolError(Exception):
    """The peer broke the IMAP syntax in a way that ends the stream."""


class LineTooLong(ProtocolError):
    """A line grew past the framer's limit before its end was seen."""


class BadLiteral(ProtocolError):
    """A literal announcement is out of range."""


# The framer makes an event for every line and literal piece in both directions: the
# events are plain slotted classes (a frozen dataclass costs four times as much to build).
# Treat them as read-only. The slots are written out (not `dataclass(slots=True)`, which
# needs Python 3.10); _Slotted gives them a dataclass's equality and repr.

class _Slotted:
    __slots__ = ()
    __hash__ = None                   # mutable, compared by value: unhashable, as a dataclass

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self) -> str:
        return '%s(%s)' % (self.__class__.__name__, ', '.join(
            '%s=%r' % (name, getattr(self, name)) for name in self.__slots__))


class Line(_Slotted):
    """One line of the stream, CRLF included.

    `first` is True when the line starts a new command or response (the previous line did
    not announce a literal). `literal` is the size of the literal the line announces, or
    None; `sync` tells whether that literal is synchronizing (`{n}`, the sender waits for
    a `+` continuation before sending it).
    """
    __slots__ = ('data', 'first', 'literal', 'sync')

    def __init__(self, data: bytes, first: bool, literal: Optional[int] = None,
                 sync: bool = False) -> None:
        self.data, self.first, self.literal, self.sync = data, first, literal, sync


class LiteralData(_Slotted):
    """A piece of a literal payload; `last` is True on the piece that completes it."""
    __slots__ = ('data', 'last')

    def __init__(self, data: bytes, last: bool) -> None:
        self.data, self.last = data, last


def literal_of(line: bytes) -> Optional[tuple[int, bool, bool]]:
    """Return (size, synchronizing, literal8) of the literal that `line` announces, or
    None.

    Raises:
        BadLiteral: the size does not fit an IMAP number (RFC 3501 section 9: number).
    """
    if not line.endswith(b'}\r\n') and not line.endswith(b'}\n'):
        return None
    match = _LITERAL_RE.search(line)
    if match is None:
        return None
    return literal_size(match.group(2)), not match.group(3), bool(match.group(1))


def literal_size(digits: bytes) -> int:
    """The value of a literal's size digits. Raises BadLiteral past MAX_LITERAL."""
    digits = digits.lstrip(b'0') or b'0'
    size = int(digits) if len(digits) <= _MAX_DIGITS else MAX_LITERAL + 1
    if size > MAX_LITERAL:
        raise BadLiteral('literal size %s out of range' % digits[:20].decode())
    return size


class Framer:
    """Cuts an IMAP byte stream into `Line` and `LiteralData` events (RFC 3501 section 4.3).

    Feed bytes with `feed()`, then call `next_event()` until it returns None (more bytes
    needed). A line is returned only when complete; literal payloads are returned in the
    pieces they arrived in, never scanned. Lines end in CRLF; a bare LF is accepted as a
    line end, as Dovecot does.

    `literal8` says whether `~{n}` announces a literal (RFC 3516); where the grammar has
    no literal8 the line is an ordinary line. With `auto_literals` False the framer only
    reports what a line announces (`Line.literal`) and reads the payload only after
    `expect_literal()`: the command tracker decides, as the server would, whether an
    announced literal is read at all.

    The buffered, incomplete line is capped at `max_line` bytes (LineTooLong). The cap can
    be changed between calls (for example when a session logs in).
    """

    def __init__(self, max_line: int, literal8: bool = True,
                 auto_literals: bool = True) -> None:
        self.max_line = max_line
        self.literal8 = literal8
        self.auto_literals = auto_literals
        self._buf = bytearray()
        self._pos = 0
        self._scanned = 0       # bytes after _pos already searched for a line end
        self._literal_left = 0
        self._first = True

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._buf) - self._pos

    @property
    def at_boundary(self) -> bool:
        """True when every event returned so far ended a whole command or response."""
        return self._first and not self._literal_left

    @property
    def in_literal(self) -> bool:
        """True while literal bytes are still owed."""
        return self._literal_left > 0

    def take_buffered(self) -> bytes:
        """Remove and return the bytes received but not yet returned as events."""
        data = bytes(self._buf[self._pos:])
        self._buf, self._pos, self._scanned = bytearray(), 0, 0
        return data

    def expect_literal(self, size: int) -> None:
        """Read the next `size` bytes as a literal payload; the line after it goes on the
        same command (for `auto_literals` False, after a Line that announced one)."""
        self._literal_left = size
        self._first = False

    def cancel_literal(self) -> None:
        """Forget an announced literal the peer will not send.

        A synchronizing literal that the other side refused (a tagged NO or BAD instead of
        `+`) is never sent (RFC 3501 section 7.5); the command ends there.
        """
        self._literal_left = 0
        self._first = True

    def next_event(self) -> Union[Line, LiteralData, None]:
        """Return the next complete event, or None when more bytes are needed.

        Raises:
            LineTooLong: the current line passed `max_line` without an end.
            BadLiteral: a literal announcement out of range.
        """
        buf, pos = self._buf, self._pos
        if self._literal_left:
            avail = len(buf) - pos
            if not avail:
                return None
            size = min(avail, self._literal_left)
            self._pos = pos + size
            self._literal_left -= size
            return LiteralData(bytes(buf[pos:pos + size]), self._literal_left == 0)
        # A long line arrives in many pieces: search only the bytes not searched yet.
        end = buf.find(b'\n', pos + self._scanned)
        if end < 0:
            self._scanned = len(buf) - pos
            if self._scanned > self.max_line:
                raise LineTooLong('line longer than %d bytes' % self.max_line)
            return None
        if end + 1 - pos > self.max_line:
            raise LineTooLong('line longer than %d bytes' % self.max_line)
        data = bytes(buf[pos:end + 1])
        return self._take(data, literal_of(data))

    def next_lines(self) -> Union[Line, LiteralData, None]:
        """Like `next_event`, but a Line event holds every whole line buffered, up to and
        including the first that announces a literal: one event for a run of lines, to
        pass a stream on without a Python step per line. `first` tells whether the first
        of them starts a command or response, `literal` and `sync` describe the last.

        Raises:
            LineTooLong: an unfinished line passed `max_line`.
            BadLiteral: a literal announcement out of range.
        """
        buf, pos = self._buf, self._pos
        end = buf.rfind(b'\n', pos) if not self._literal_left else -1
        if end < 0:
            return self.next_event()
        match = _ANNOUNCEMENT_RE.search(buf, pos, end + 1)
        if match is None:
            return self._take(bytes(buf[pos:end + 1]), None)
        return self._take(bytes(buf[pos:match.end()]), literal_of(match.group(0)))

    def _take(self, data: bytes, announced: Optional[tuple[int, bool, bool]]) -> Line:
        """Consume `data`, whole lines at the read position, as one Line event;
        `announced` is what `literal_of` says of its last line. An empty literal ({0})
        carries no bytes: the command goes on on the next line."""
        self._pos += len(data)
        self._scanned = 0
        first = self._first
        self._first = True
        if announced is None or (announced[2] and not self.literal8):
            return Line(data, first)
        size, sync, _ = announced
        if self.auto_literals:
            self.expect_literal(size)
        return Line(data, first, size, sync)


# A literal announcement at the end of any line in a run of lines.
_ANNOUNCEMENT_RE = re.compile(rb'\{[0-9]*\+?\}\r?\n')


# ---------------------------------------------------------------------------------------
# Server responses

_STATUS = frozenset((b'OK', b'NO', b'BAD', b'BYE', b'PREAUTH'))
_CODE_RE = re.compile(rb'\[([^\]\r\n]*)\]')


class Response(_Slotted):
    """The head of a server response line.

    `kind` is 'untagged', 'continuation' or 'tagged'. For status responses (OK, NO, BAD,
    BYE, PREAUTH) `status` is set, `code` holds the bracketed response code without its
    brackets (or None) and `text` the human text. For other untagged data `status` is None
    and `name` is the upper-case keyword (CAPABILITY, EXISTS, FETCH, ...).
    """
    __slots__ = ('kind', 'tag', 'status', 'code', 'text', 'name')

    def __init__(self, kind: str, tag: Optional[bytes] = None, status: Optional[bytes] = None,
                 code: Optional[bytes] = None, text: bytes = b'',
                 name: Optional[bytes] = None) -> None:
        self.kind, self.tag, self.status, self.code = kind, tag, status, code
        self.text, self.name = text, name


def parse_response(line: bytes) -> Response:
    """Classify the first line of a server response.

    Raises:
        ProtocolError: the line is not a response at all (no tag, or a tagged line
            without a status).
    """
    body = line.rstrip(b'\r\n')
    if body[:1] == b'+':
        return Response('continuation', text=body[2:])
    tag, sep, rest = body.partition(b' ')
    if not sep or not tag:
        raise ProtocolError('malformed response line')
    word, _, after = rest.partition(b' ')
    upper = word.upper()
    kind = 'untagged' if tag == b'*' else 'tagged'
    if upper in _STATUS:
        code = None
        if after[:1] == b'[':
            match = _CODE_RE.match(after)
            if match:
                code = match.group(1)
                after = after[match.end():].lstrip(b' ')
        return Response(kind, None if kind == 'untagged' else tag, upper, code, after)
    if kind == 'tagged':
        raise ProtocolError('tagged response without status')
    if word.isdigit():
        # `* 23 EXISTS`, `* 5 FETCH (...)`
        return Response(kind, name=after.partition(b' ')[0].upper())
    return Response(kind, name=upper)


# Capabilities the proxy must never pass on: it cannot splice compression or security
# layers into a cached connection (RFC 4978 section 3), it handles authentication
# itself, and a reused connection cannot be logged out of or referred.
_DROP_EXACT = frozenset((b'STARTTLS', b'SASL-IR', b'LOGINDISABLED', b'LOGIN-REFERRALS',
                         b'UNAUTHENTICATE'))
_DROP_PREFIX = (b'AUTH=', b'COMPRESS=')


def code_capabilities(response: Response) -> list[bytes]:
    """The capabilities in a response's [CAPABILITY ...] code, or []."""
    code = response.code or b''
    return code[11:].split() if code[:11].upper() == b'CAPABILITY ' else []


def untagged_capabilities(lines: list[bytes]) -> list[bytes]:
    """The capabilities of the first `* CAPABILITY` line among `lines`, or []."""
    for line in lines:
        if line[:13].upper() == b'* CAPABILITY ':
            return line[13:].split()
    return []


def filter_capabilities(caps: list[bytes]) -> list[bytes]:
    """Return `caps` without the ones a client of the proxy must not see."""
    return [cap for cap in caps
            if cap.upper() not in _DROP_EXACT and not cap.upper().startswith(_DROP_PREFIX)]


_CAP_CODE_RE = re.compile(rb'\[CAPABILITY ([^\]\r\n]*)\]', re.IGNORECASE)
_CAP_LINE_RE = re.compile(rb'(\* CAPABILITY )([^\r\n]*)', re.IGNORECASE)


def rewrite_capabilities(line: bytes) -> bytes:
    """Filter the capability list inside an untagged CAPABILITY line or a [CAPABILITY] code.

    Returns the line unchanged when it carries no capability list.
    """
    def keep(caps: bytes) -> bytes:
        return b' '.join(filter_capabilities(caps.split()))

    if line[:13].upper() == b'* CAPABILITY ':
        return _CAP_LINE_RE.sub(lambda m: m.group(1) + keep(m.group(2)), line, count=1)
    if b'[' in line and b'CAPABILITY' in line.upper():
        return _CAP_CODE_RE.sub(lambda m: b'[CAPABILITY ' + keep(m.group(1)) + b']', line,
                                count=1)
    return line


# ---------------------------------------------------------------------------------------
# Output

_QUOTABLE_RE = re.compile(rb'[^\x00\r\n\x80-\xff]*\Z')


def quote(value: bytes) -> bytes:
    """Return `value` as an IMAP quoted string (RFC 3501 section 4.3).

    Raises:
        ValueError: the value holds CR, LF, NUL or 8-bit octets and needs a literal.
    """
    if not _QUOTABLE_RE.match(value):
        raise ValueError('value needs a literal')
    return b'"' + value.replace(b'\\', b'\\\\').replace(b'"', b'\\"') + b'"'


def astring(value: bytes, non_sync: bool) -> tuple[bytes, Optional[bytes]]:
    """Encode `value` for a command line: quoted when possible, else as a literal.

    Returns:
        (text for the line, literal payload or None). When a payload is returned the text
        is the announcement `{n}` (or `{n+}` when `non_sync`) and the payload must follow
        the CRLF that ends the line part.
    """
    try:
        return quote(value), None
    except ValueError:
        marker = b'{%d+}' % len(value) if non_sync else b'{%d}' % len(value)
        return marker, value


def login_command(tag: bytes, user: bytes, password: bytes,
                  caps) -> tuple[list[tuple[bytes, bytes, bool]], bytes]:
    """The LOGIN command for `user` and `password` in pieces: quoted strings where they
    can be, literals where not (RFC 7888 section 5: LITERAL+ allows any non-synchronizing
    literal, LITERAL- up to 4096 octets; otherwise the server's "+" comes before each).

    Returns:
        ([(text up to a literal, the literal, non-synchronizing)], the text after the
        last literal). Send each text, wait for "+" unless non-synchronizing, send its
        literal; then the rest.
    """
    parts = [tag + b' LOGIN']
    pieces = []
    for value in (user, password):
        non_sync = b'LITERAL+' in caps or (b'LITERAL-' in caps and len(value) <= 4096)
        text, literal = astring(value, non_sync)
        parts.append(b' ' + text)
        if literal is not None:
            pieces.append((b''.join(parts) + b'\r\n', literal, non_sync))
            parts = []
    return pieces, b''.join(parts) + b'\r\n'
