"""Client commands before login, read whole: the proxy answers them itself.

Pure, like gimapproxy.protocol: bytes in, values out. A malformed command becomes a
BadCommand that still carries the tag when one was readable, to be answered `tag BAD`.
After login the proxy does not parse commands: gimapproxy.tracker follows them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .protocol import BadLiteral, literal_size

__all__ = ['BadCommand', 'Command', 'parse_command', 'command_head', 'tag_of', 'MAX_DEPTH']

# RFC 3501 section 9: tag = 1*<any ASTRING-CHAR except "+">; atoms exclude these.
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]\r\n') | frozenset(range(0, 32)) | {127}
_TAG_RE = re.compile(rb'([^\x00-\x20(){%*"\\+\x7f]+) ')
_NAME_RE = re.compile(rb'([A-Za-z0-9-]+)(?=[ \r\n]|\Z)')


class BadCommand(Exception):
    """The client sent a malformed command; answer `<tag> BAD <message>`.

    `tag` is the command's tag when one was readable, else None (answer `* BAD`).
    """

    def __init__(self, tag: Optional[bytes], message: str) -> None:
        super().__init__(message)
        self.tag = tag
        self.message = message


@dataclass(frozen=True)
class Command:
    """A complete client command: tag, upper-case name and parsed arguments.

    Arguments are bytes (atoms, quoted strings and literals, decoded), None (NIL) or lists
    (parenthesized lists).
    """
    tag: bytes
    name: bytes
    args: list = field(default_factory=list)


def tag_of(line: bytes) -> Optional[bytes]:
    """Return the tag at the start of a command line, or None when there is no valid one."""
    match = _TAG_RE.match(line)
    return match.group(1) if match else None


def command_head(line: bytes) -> tuple[Optional[bytes], Optional[bytes]]:
    """Return (tag, upper-case command name) of a command's first line.

    Either part is None when it is missing or malformed. `UID FETCH` gives `UID`; callers
    that care read further themselves.
    """
    match = _TAG_RE.match(line)
    if not match:
        return None, None
    name = _NAME_RE.match(line, match.end())
    return match.group(1), (name.group(1).upper() if name else None)


# Parenthesized lists may nest this deep in a pre-login command; deeper is refused.
MAX_DEPTH = 100
_ARG_LITERAL_RE = re.compile(rb'\{([0-9]+)\+?\}\r?\n')


class _Parser:
    """Reader of command arguments over one complete command's bytes. Lists are read
    with an explicit stack, so hostile nesting costs no recursion."""

    def __init__(self, data: bytes, tag: bytes) -> None:
        self.data = data
        self.pos = 0
        self.tag = tag

    def fail(self, message: str) -> BadCommand:
        return BadCommand(self.tag, message)

    def at_end(self) -> bool:
        return self.data[self.pos:] in (b'\r\n', b'\n')

    def expect_space(self) -> None:
        if self.data[self.pos:self.pos + 1] != b' ':
            raise self.fail('Missing space between arguments')
        self.pos += 1

    def value(self):
        """Read one argument: bytes, None (NIL) or a list of arguments."""
        stack: list[list] = []       # the lists being read, innermost last
        while True:
            if self.data[self.pos:self.pos + 1] == b'(':
                if len(stack) >= MAX_DEPTH:
                    raise self.fail('Lists nested too deep')
                self.pos += 1
                stack.append([])
                if self.data[self.pos:self.pos + 1] != b')':
                    continue                 # read the list's first item
            else:
                item = self.scalar()
                if not stack:
                    return item
                stack[-1].append(item)
            # In a list, after an item (or the "(" of an empty list): close what ends
            # here, then a space before the next item.
            while self.data[self.pos:self.pos + 1] == b')':
                self.pos += 1
                done = stack.pop()
                if not stack:
                    return done
                stack[-1].append(done)
            if self.pos >= len(self.data) or self.at_end():
                raise self.fail('Unterminated list')
            self.expect_space()

    def scalar(self):
        data, pos = self.data, self.pos
        char = data[pos:pos + 1]
        if char == b'"':
            return self.quoted()
        if char == b'{':
            return self.literal()
        if char == b'~' and data[pos + 1:pos + 2] == b'{':
            # RFC 3516: literal8 only where the grammar says so (APPEND); Dovecot's
            # pre-login parser refuses it too.
            raise self.fail('literal8 not allowed here')
        end = pos
        while end < len(data) and data[end] not in _ATOM_SPECIALS:
            end += 1
        if end == pos:
            raise self.fail('Invalid argument')
        self.pos = end
        atom = data[pos:end]
        return None if atom.upper() == b'NIL' else atom

    def quoted(self) -> bytes:
        # RFC 3501 section 4.3: only \" and \\ may be escaped; 8-bit octets are tolerated
        # as Dovecot does.
        data, pos = self.data, self.pos + 1
        out = bytearray()
        while pos < len(data):
            char = data[pos]
            if char == 0x22:
                self.pos = pos + 1
                return bytes(out)
            if char == 0x5C:
                pos += 1
                if pos >= len(data) or data[pos] not in (0x22, 0x5C):
                    raise self.fail('Invalid escape in quoted string')
            elif char in (0x0D, 0x0A, 0x00):
                raise self.fail('Invalid character in quoted string')
            out.append(data[pos])
            pos += 1
        raise self.fail('Unterminated quoted string')

    def literal(self) -> bytes:
        match = _ARG_LITERAL_RE.match(self.data, self.pos)
        if not match:
            raise self.fail('Invalid literal')
        start = match.end()
        try:
            end = start + literal_size(match.group(1))
        except BadLiteral:
            raise self.fail('Invalid literal') from None
        if end > len(self.data):
            raise self.fail('Literal shorter than announced')
        self.pos = end
        return self.data[start:end]


def parse_command(data: bytes) -> Command:
    """Parse one complete command: its lines and literal payloads exactly as received.

    Returns:
        The Command with all its arguments.
    Raises:
        BadCommand: malformed; carries the tag when one was readable.
    """
    tag, name = command_head(data)
    if tag is None:
        raise BadCommand(None, 'Invalid tag')
    if name is None:
        raise BadCommand(tag, 'Missing or invalid command name')
    parser = _Parser(data, tag)
    parser.pos = len(tag) + 1 + len(name)
    args = []
    while not parser.at_end():
        if parser.pos >= len(data):
            raise BadCommand(tag, 'Missing line end')
        parser.expect_space()
        args.append(parser.value())
    return Command(tag, name, args)
