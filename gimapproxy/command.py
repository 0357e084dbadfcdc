"""Client commands: what the server reads of them, and before login, reading them whole.

Pure, like gimapproxy.protocol: bytes in, values out.

* Before login the proxy answers commands itself (`parse_command`). A malformed command
  becomes a BadCommand that still carries the tag when one was readable, to be answered
  `tag BAD`.
* After login gimapproxy.tracker follows the client's commands as Dovecot 2.3 reads
  them; the tables and patterns it reads them with are here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .protocol import BadLiteral, literal_size

__all__ = ['BadCommand', 'Command', 'parse_command', 'command_head', 'tag_of', 'MAX_DEPTH',
           'ALL', 'NONE', 'COMMANDS', 'LITERAL8', 'STICKY', 'STATELESS', 'CONDSTORE']

# How many arguments the server reads from each command (Dovecot 2.3 and its quota and
# ACL plugins): ALL of them, the first N (the rest of the line is skipped), or NONE (the
# whole line is skipped). A literal announced where the server reads nothing more is
# never read by it: its bytes are the next command.
ALL, NONE = 0, -1
COMMANDS = {
    b'CAPABILITY': NONE, b'LOGOUT': NONE, b'NOOP': NONE, b'CHECK': NONE, b'CLOSE': NONE,
    b'EXPUNGE': NONE, b'UNSELECT': NONE, b'IDLE': NONE, b'NAMESPACE': NONE,
    b'APPEND': ALL, b'SELECT': ALL, b'EXAMINE': ALL, b'LIST': ALL, b'LSUB': ALL,
    b'XLIST': ALL, b'FETCH': ALL, b'UID FETCH': ALL, b'SEARCH': ALL, b'UID SEARCH': ALL,
    b'STORE': ALL, b'UID STORE': ALL, b'SORT': ALL, b'UID SORT': ALL, b'THREAD': ALL,
    b'UID THREAD': ALL, b'ENABLE': ALL, b'ID': ALL, b'GETMETADATA': ALL, b'NOTIFY': ALL,
    b'CANCELUPDATE': ALL, b'GENURLAUTH': ALL, b'RESETKEY': ALL, b'URLFETCH': ALL,
    b'X-STATE': ALL, b'COMPRESS': ALL,
    b'CREATE': 1, b'DELETE': 1, b'SUBSCRIBE': 1, b'UNSUBSCRIBE': 1, b'UID EXPUNGE': 1,
    b'X-CANCEL': 1, b'GETQUOTAROOT': 1, b'GETQUOTA': 1, b'GETACL': 1, b'MYRIGHTS': 1,
    b'COPY': 2, b'UID COPY': 2, b'MOVE': 2, b'UID MOVE': 2, b'RENAME': 2, b'STATUS': 2,
    b'SETQUOTA': 2, b'LISTRIGHTS': 2, b'DELETEACL': 2, b'SETMETADATA': 2,
    b'SETACL': 3,
}
# RFC 3516 section 4.3 and RFC 5464: literal8 only in APPEND and SETMETADATA values.
LITERAL8 = frozenset((b'APPEND', b'SETMETADATA'))
# State a fresh login does not have and that no reset undoes: NOTIFY (RFC 5465; after
# NOTIFY NONE Dovecot even stops the FETCH replies to STORE), Dovecot's session state
# import, search result updates (RFC 5267 section 4), and the client's own LOGOUT.
STICKY = frozenset((b'NOTIFY', b'X-STATE', b'CANCELUPDATE', b'LOGOUT'))
# Commands that change nothing a later command could see: before the first other one,
# a session is not yet bound to its connection's profile.
STATELESS = frozenset((b'ID', b'CAPABILITY', b'NOOP', b'NAMESPACE'))
CONDSTORE = frozenset((b'CONDSTORE',))
SELECTING = frozenset((b'SELECT', b'EXAMINE'))
DESELECTING = frozenset((b'CLOSE', b'UNSELECT'))
SEARCHING = frozenset((b'SEARCH', b'UID SEARCH', b'SORT', b'UID SORT', b'THREAD',
                       b'UID THREAD'))

# Dovecot 2.3's tag: 1*<any ASTRING-CHAR except "+">, without "]" and 8-bit octets
# (RFC 3501 section 9); a command name is an atom, "+" allowed. Either ends at SP or the
# line end. 0x7F is refused here too: stricter than the server only costs a reuse.
SERVER_TAG_RE = re.compile(rb'[^\x00-\x20(){%*"\\\]+\x7f-\xff]+(?=[ \r\n])')
SERVER_NAME_RE = re.compile(rb'[^\x00-\x20(){%*"\\\]\x7f-\xff]+(?=[ \r\n])')
# Arguments, strictly: spaces, parentheses, quoted strings (RFC 3501 section 4.3: no CR,
# LF or NUL), a literal announcement at the line end (no digits is size 0, as Dovecot
# reads it), atoms.
TOKEN_RE = re.compile(rb' +|\(|\)|"(?:[^"\\\r\n\x00]|\\[^\r\n\x00])*"'
                      rb'|~?\{[0-9]*\+?\}\r?\n\Z|[^\x00-\x20(){"\x7f-\xff]+')
# What follows SELECT or EXAMINE when it turns CONDSTORE on for certain (RFC 7162
# section 3.1): a mailbox, an atom or a quoted string, and the one parameter CONDSTORE.
SELECT_CONDSTORE_RE = re.compile(rb' (?:[^\x00-\x20(){%*"\\\x7f-\xff]+'
                                 rb'|"(?:[^"\\\r\n\x00]|\\["\\])*")'
                                 rb' \((?i:CONDSTORE)\)\r?\n\Z')
# RFC 7162 section 3.1: what turns CONDSTORE on without ENABLE (QRESYNC's keywords need
# it on). A mailbox of such a name only costs a reuse.
CONDSTORE_RE = re.compile(rb'\b(?:CONDSTORE|QRESYNC|HIGHESTMODSEQ|MODSEQ|CHANGEDSINCE|'
                          rb'UNCHANGEDSINCE|VANISHED)\b', re.IGNORECASE)
UPDATE_RE = re.compile(rb'\bUPDATE\b', re.IGNORECASE)

# What may follow each kind of token in a strictly read argument list.
TOKEN_AFTER = {
    'name': 'sp', 'literal': 'sp close', 'sp': 'open atom lit', 'open': 'open atom lit close',
    'atom': 'sp close', 'close': 'sp close atom',
}

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
# Dovecot reads a literal's size as any digits, none included (`{}` and `{+}` are empty
# literals), then an optional "+", then "}": as the framer does.
_ARG_LITERAL_RE = re.compile(rb'\{([0-9]*)\+?\}\r?\n')
# The parser reads each byte a fixed number of times (a command may be as long as the
# pre-login limits allow, a few hundred KB): atoms and quoted strings in one match each,
# never a copy of the rest of the command.
_ATOM_RE = re.compile(b'[^' + re.escape(bytes(sorted(_ATOM_SPECIALS))) + b']+')
# The longest run of a quoted string's valid content; a '"' must come next.
_QUOTED_RE = re.compile(rb'"([^"\\\r\n\x00]*(?:\\["\\][^"\\\r\n\x00]*)*)')
_ESCAPE_RE = re.compile(rb'\\(["\\])')


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
        """True when only the command's line end is left."""
        rest = len(self.data) - self.pos
        return (rest == 2 and self.data.startswith(b'\r\n', self.pos)) or \
            (rest == 1 and self.data.startswith(b'\n', self.pos))

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
        match = _ATOM_RE.match(data, pos)
        if match is None:
            raise self.fail('Invalid argument')
        self.pos = match.end()
        atom = match.group()
        return None if len(atom) == 3 and atom.upper() == b'NIL' else atom

    def quoted(self) -> bytes:
        # RFC 3501 section 4.3: only \" and \\ may be escaped, and CR, LF and NUL may not
        # appear; 8-bit octets are tolerated as Dovecot does.
        match = _QUOTED_RE.match(self.data, self.pos)      # the opening '"' is there
        end = match.end()
        stop = self.data[end:end + 1]
        if stop != b'"':
            raise self.fail('Invalid escape in quoted string' if stop == b'\\' else
                            'Unterminated quoted string' if not stop else
                            'Invalid character in quoted string')
        self.pos = end + 1
        value = match.group(1)
        return _ESCAPE_RE.sub(rb'\1', value) if b'\\' in value else value

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
