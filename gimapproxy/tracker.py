"""The command tracker: what a logged-in session has asked of the server, and whether
its connection is still fit for another session. No sockets, clocks or logging.

The relay feeds it the client's bytes (`feed`, `next_event`) and the first line of each
server response (`on_response`), and asks it:

* what is in flight (`inflight`, `quiet`), and who owns a `+` continuation request;
* whether a mailbox may be selected (`selected`);
* the ENABLE and CONDSTORE profile (`profile`, `enabled`, `condstore`);
* whether the connection is still clean (`unclean` is None), and if not, why.

It reads the client's commands the way the server does, so that both agree on where each
command and each literal ends: Dovecot 2.3's rules for tags, command names and literal
sizes, which arguments each command reads, and literal8 only where the grammar has it.
Whatever it is not sure of, it passes on unchanged (the client gets the server's
answer) and marks the connection unclean. docs/isolation.md lists the rules.
"""
from __future__ import annotations

from typing import Optional, Union

from .command import (ALL, COMMANDS, CONDSTORE, CONDSTORE_RE, DESELECTING, LITERAL8,
                      NONE, SEARCHING, SELECTING, SERVER_NAME_RE, SERVER_TAG_RE, STATELESS,
                      STICKY, TOKEN_AFTER, TOKEN_RE, UPDATE_RE)
from .protocol import (Framer, Line, LiteralData, ProtocolError, parse_response,
                       rewrite_capabilities)

__all__ = ['Tracker', 'Held', 'enable_profile', 'MAX_COMMAND_LINE']

# After login: Dovecot's imap_max_line_length is 64 KiB; leave room above it.
MAX_COMMAND_LINE = 128 * 1024
# Dovecot counts a command's literals into its line length, except APPEND's; past this
# it refuses the command or disconnects, and a literal may go unread.
SERVER_LINE_LIMIT = 64 * 1024
# Literals this small are read for keywords (a search key sent as a literal).
SMALL_LITERAL = 64


def enable_profile(names) -> frozenset:
    """The sticky state that ENABLE of `names` asks for, upper-cased; QRESYNC implies
    CONDSTORE (RFC 7162 section 3.2.3)."""
    profile = {name.upper() for name in names}
    if b'QRESYNC' in profile:
        profile.add(b'CONDSTORE')
    return frozenset(profile)


class Held:
    """A command the relay may answer itself, or send on another connection: `kind` is
    'logout', 'compress', or 'profile': the session's first command that changes
    state asks for `profile` (an ENABLE of `names`, or one that turns CONDSTORE on), and
    a cached connection of that profile may serve the session instead. Nothing is
    recorded until the relay calls `Tracker.forward` (or `answered`); a refused one
    leaves no trace."""
    __slots__ = ('kind', 'tag', 'name', 'data', 'names', 'profile')

    def __init__(self, kind: str, tag: bytes, name: bytes, data: bytes, names=(),
                 profile: frozenset = frozenset()) -> None:
        self.kind, self.tag, self.name, self.data = kind, tag, name, data
        self.names, self.profile = names, profile


class Command:
    """A command sent to the server and not yet answered."""
    __slots__ = ('tag', 'name', 'reads', 'depth', 'args', 'literals', 'size', 'names',
                 'copies', 'keyword')

    def __init__(self, tag: bytes, name: bytes, reads: Optional[int]) -> None:
        self.tag = tag
        self.name = name
        self.reads = reads           # from COMMANDS; None: the server may not know it
        self.depth = 0               # open parentheses
        self.args = 0                # whole arguments read at the top level
        self.literals = 0
        self.size = 0
        self.names = ()              # ENABLE: the names asked for
        self.copies = 0              # more commands in flight under the same tag
        self.keyword = b''           # a small literal's bytes, read for keywords


class Tracker:
    """Follows one logged-in session; see the module docstring.

    `profile` is the ENABLE state the connection starts with. `unclean` is None while
    the connection may serve another session, else the first reason it may not.
    """

    def __init__(self, profile: frozenset = frozenset(), enabled=(),
                 max_line: int = MAX_COMMAND_LINE) -> None:
        self.framer = Framer(max_line, auto_literals=False)
        self.profile = profile
        self.enabled: list[bytes] = list(enabled)   # names the server said it turned on
        self.inflight: dict[bytes, Command] = {}
        self.unclean: Optional[str] = None
        self.selected: Optional[bool] = False
        self.selecting = 0
        self.current: Optional[Command] = None     # the command whose lines are read
        self.idle: Optional[Command] = None         # an IDLE whose ending line is due
        self.waiting: list[Command] = []            # commands owed a "+", in order
        self.listed: list[bytes] = []               # names in `* ENABLED` replies
        self.condstore = False       # CONDSTORE may have been turned on without ENABLE
        self.pinned = False          # a command that may change state was sent
        self.server_bye = False
        self.logging_out = False     # the client's LOGOUT went to the server
        self.event_kind = ''         # the last event: 'first' line, 'more' lines, 'literal'

    @property
    def quiet(self) -> bool:
        """True when every command sent has its tagged reply."""
        return not self.inflight

    def doubt(self, reason: str) -> None:
        """Mark the connection unfit for another session; the first reason stays."""
        if self.unclean is None:
            self.unclean = reason

    # -- the client's side ----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client."""
        self.framer.feed(data)

    def next_event(self) -> Union[bytes, Held, None]:
        """Return the next piece of client input: bytes to send to the server (recorded),
        a Held command, or None when more bytes are needed.

        Raises:
            ProtocolError: a line longer than the limit, or a literal size out of range.
        """
        event = self.framer.next_event()
        if event is None:
            return None
        if isinstance(event, LiteralData):
            self.event_kind = 'literal'
            self.on_literal(event)
            return event.data
        if not event.first:
            self.event_kind = 'more'
            return self.on_segment(self.current, event, 0)
        self.event_kind = 'first'
        if self.idle is not None:
            # RFC 2177 section 3: the line after IDLE ends it, whatever it says; the
            # server reads it as IDLE's and answers IDLE.
            self.idle = None
            if event.literal is not None:
                self.doubt('literal after IDLE')
            return event.data
        return self.on_command(event)

    def forward(self, held: Held) -> bytes:
        """Record a Held command as sent to the server; return its bytes."""
        self.keywords(self.record(held.tag, held.name, held.data), held.data)
        return held.data

    def answered(self, profile: frozenset, enabled) -> None:
        """The relay answered a Held ENABLE itself with a connection of `profile`."""
        self.pinned = True
        self.adopt(profile, enabled)

    def adopt(self, profile: frozenset, enabled) -> None:
        """The session goes on on another connection, of `profile`."""
        self.profile = profile
        self.enabled = list(enabled)

    def on_command(self, line: Line) -> Union[bytes, Held]:
        data = line.data
        tag = SERVER_TAG_RE.match(data)
        if tag is None:
            # Dovecot answers `* BAD` and skips the line: nothing to wait for.
            self.doubt('invalid tag')
            return data
        pos = tag.end()
        tag = tag.group(0)
        name = SERVER_NAME_RE.match(data, pos + 1) if data[pos:pos + 1] == b' ' else None
        if name is not None and name.group(0).upper() == b'UID':
            name = (SERVER_NAME_RE.match(data, name.end() + 1)
                    if data[name.end():name.end() + 1] == b' ' else None)
            if name is not None:
                name = (b'UID ' + name.group(0).upper(), name.end())
        elif name is not None:
            name = (name.group(0).upper(), name.end())
        if name is None:
            # A line that is not `tag SP command` (a late DONE, say): the server answers
            # it under that tag and reads nothing more.
            self.record(tag, b'', data)
            self.doubt('not a command: %s' % tag[:30].decode('ascii'))
            return data
        name, pos = name
        rest = data[pos:]
        if line.literal is None:
            if name == b'COMPRESS':
                return Held('compress', tag, name, data)
            if name == b'LOGOUT' and rest in (b'\r\n', b'\n') and self.unclean is None:
                return Held('logout', tag, name, data)
            if not self.pinned and not self.profile and self.unclean is None:
                held = self.profile_asked(tag, name, data, rest)
                if held is not None:
                    return held
        command = self.record(tag, name, data)
        return self.on_segment(command, line, pos)

    def profile_asked(self, tag: bytes, name: bytes, data: bytes,
                      rest: bytes) -> Optional[Held]:
        """The Held first state-changing command when it asks for a profile."""
        if name == b'ENABLE':
            names = rest.split()
            return Held('profile', tag, name, data, names, enable_profile(names)) \
                if names else None
        if name not in STATELESS and CONDSTORE_RE.search(rest):
            return Held('profile', tag, name, data, profile=CONDSTORE)
        return None

    def record(self, tag: bytes, name: bytes, data: bytes) -> Command:
        """Add a command to what is in flight and note what it does to the session."""
        command = Command(tag, name, COMMANDS.get(name))
        other = self.inflight.get(tag)
        if other is not None:
            other.copies += 1
            self.doubt('tag reused while in flight')
        else:
            self.inflight[tag] = command
        if not name:
            return command
        if name not in STATELESS:
            self.pinned = True
        if command.reads is None:
            self.doubt('unknown command: %s' % name[:30].decode('ascii'))
        elif name in STICKY:
            self.doubt(name.decode().lower())
            self.logging_out = self.logging_out or name == b'LOGOUT'
        elif name in SELECTING:
            self.selecting += 1
        elif name == b'ENABLE':
            command.names = data.split()[2:]
        elif name == b'IDLE':
            self.idle = command
            self.waiting.append(command)
        return command

    def on_segment(self, command: Optional[Command], line: Line, pos: int) -> bytes:
        """A line of `command` from `pos`: note its keywords and whether the server reads
        the literal it announces, if any."""
        data = line.data
        self.current = None
        if command is None:
            if line.literal is not None:
                self.doubt('literal after an unreadable line')
            return data
        self.keywords(command, data)
        command.size += len(data)
        if line.literal is None:
            return data
        if not self.reads_literal(command, data, pos):
            self.doubt('literal the server does not read: %s'
                       % (command.name.decode() or 'no command'))
            return data
        size = line.literal
        command.size += size
        if command.size > SERVER_LINE_LIMIT and command.name != b'APPEND':
            self.doubt('command longer than the server reads')
        command.literals += 1
        if line.sync:
            self.waiting.append(command)
        self.framer.expect_literal(size)
        self.current = command
        return data

    def reads_literal(self, command: Command, data: bytes, pos: int) -> bool:
        """Whether the server reads the literal announced at the end of `data`: the
        command reads its arguments that far, and everything before it on the line is
        what Dovecot's parser takes without an error."""
        reads = command.reads
        if reads is None or reads == NONE:
            return False
        after = 'name' if pos else 'literal'
        while True:
            token = TOKEN_RE.match(data, pos)
            if token is None:
                return False
            text = token.group(0)
            char = text[:1]
            kind = ('sp' if char == b' ' else 'open' if char == b'(' else
                    'close' if char == b')' else 'lit' if char in b'{~' and
                    text.endswith(b'\n') else 'atom')
            if kind not in TOKEN_AFTER[after].split():
                return False
            if kind == 'lit':
                if char == b'~' and command.name not in LITERAL8:
                    return False             # Dovecot: "literal8 not allowed here"
                return reads == ALL or command.depth > 0 or command.args < reads
            if kind == 'open':
                command.depth += 1
            elif kind == 'close':
                command.depth -= 1
                if command.depth < 0:
                    return False
                if not command.depth:
                    command.args += 1
            elif kind == 'atom' and not command.depth:
                command.args += 1
            after, pos = kind, token.end()

    def on_literal(self, event: LiteralData) -> None:
        command = self.current
        if command is None:
            return
        if command.size < SMALL_LITERAL + 1024 and len(command.keyword) < SMALL_LITERAL:
            command.keyword += event.data[:SMALL_LITERAL]
        if event.last:
            if not command.depth:
                command.args += 1
            if command.keyword and command.name != b'APPEND':
                self.keywords(command, command.keyword)
            command.keyword = b''

    def keywords(self, command: Command, text: bytes) -> None:
        # RFC 7162 section 3.1: these turn CONDSTORE on for the rest of the session, as
        # ENABLE CONDSTORE does. The connection is then cached under that profile (the
        # reset sends ENABLE CONDSTORE to make sure of it).
        if b'CONDSTORE' not in self.profile and CONDSTORE_RE.search(text):
            self.condstore = True
        if command.name in SEARCHING and UPDATE_RE.search(text):
            self.doubt('search updates')

    # -- the server's side --------------------------------------------------------------

    def on_response(self, line: bytes) -> bytes:
        """Note what the first line of a server response (without its LF) means; return
        it for the client, the same object unless a capability list was filtered."""
        first = line[:1]
        if first == b'*':
            return self.on_untagged(line)
        if first == b'+':
            if self.waiting:
                self.waiting.pop(0)
            else:
                self.doubt('continuation request nobody asked for')
            return line
        try:
            response = parse_response(line)
        except ProtocolError:
            self.doubt('malformed server response')
            return line
        command = self.inflight.get(response.tag)
        if command is None:
            self.doubt('reply to a tag never sent')
            return line
        if command.copies:
            command.copies -= 1
        else:
            del self.inflight[response.tag]
        self.on_reply(command, response.status)
        if response.code and response.code[:11].upper() == b'CAPABILITY ':
            return rewrite_capabilities(line)
        return line

    def on_untagged(self, line: bytes) -> bytes:
        word = line[2:10].upper()
        if word[:1].isdigit():
            if self.selected is False and not self.selecting:
                self.doubt('mailbox data with no mailbox selected')
            elif b'CONDSTORE' not in self.profile and b'MODSEQ (' in line:
                self.condstore = True
        elif word[:4] == b'BYE ':
            self.server_bye = True
        elif word[:4] == b'BAD ':
            self.doubt('untagged BAD')
        elif word[:7] == b'ENABLED' and word[7:8] in (b' ', b'\r', b''):
            if any(command.name == b'ENABLE' for command in self.inflight.values()):
                self.listed.extend(line.split()[2:])
            else:
                self.doubt('ENABLED without ENABLE')
        elif word == b'VANISHED' and b'QRESYNC' not in self.profile:
            self.doubt('implicit qresync')
        elif b'CAPABILITY' in line[:60].upper():
            return rewrite_capabilities(line)
        return line

    def on_reply(self, command: Command, status: bytes) -> None:
        if command in self.waiting:
            # The server refused a synchronizing literal: the client will not send it
            # (RFC 3501 section 7.5); or an IDLE ended without its continuation.
            self.waiting.remove(command)
            if command is self.current:
                self.framer.cancel_literal()
                self.current = None
        if command is self.idle:
            self.idle = None
        if status == b'BAD' and command.literals:
            # The server could not parse a command that had literals: it may not have
            # read them as we did.
            self.doubt('BAD reply to a command with literals')
        name = command.name
        if name in SELECTING:
            self.selecting -= 1
            # RFC 3501 section 6.3.1: a failed SELECT leaves no mailbox selected.
            self.selected = {b'OK': True, b'NO': False}.get(status)
        elif name in DESELECTING and status == b'OK':
            self.selected = False
        elif name == b'ENABLE':
            if status != b'OK':
                self.doubt('enable failed')
            else:
                self.profile = self.profile | enable_profile(command.names)
                known = {name.upper() for name in self.enabled}
                self.enabled += [name for name in self.listed if name.upper() not in known]
            self.listed = []

    # -- the end ---------------------------------------------------------------------

    def settle(self) -> Optional[str]:
        """Why the connection cannot be finished and kept after the client left, or
        None: then the commands in `inflight` only need their replies read (an IDLE
        still waiting for its DONE needs that line: see `idle`)."""
        if self.unclean is not None:
            return self.unclean
        if self.current is not None or not self.framer.at_boundary:
            return 'client left inside a command'
        if any(command is not self.idle for command in self.waiting):
            return 'client left inside a literal'
        if any(command.name == b'ENABLE' for command in self.inflight.values()):
            return 'client left inside ENABLE'
        return None
