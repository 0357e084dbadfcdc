"""The command tracker: what a logged-in session has asked of the server, and whether
its connection is still fit for another session. No sockets, clocks or logging.

The relay feeds it the client's bytes (`feed`, `next_event`) and the first line of each
server response (`on_response`), and asks it:

* what is in flight (`inflight`, `quiet`), and who owns a `+` continuation request;
* whether a mailbox may be selected (`selected`);
* the ENABLE and CONDSTORE profile (`profile`, `condstore`, `replay`);
* whether the connection is still clean (`unclean` is None), and if not, why.

Every command it frames goes to the server under a tag of the proxy's own: `prefix`
(random per session, never shown to the client) and a counter. The server's tagged
reply is given back to the client under the client's tag, byte for byte otherwise. So
what the server ran is visible in what it answered: a reply to a tag the proxy never
sent means the server read as a command bytes the proxy took for something else, and a
tag still unanswered when the session ends means it read a command differently. Either
keeps the connection out of the cache, whatever the rules below said.

It reads the client's commands the way the server does, so that both agree on where each
command and each literal ends: Dovecot 2.3's rules for tags, command names and literal
sizes, which arguments each command reads, and literal8 only where the grammar has it.
Whatever it is not sure of, it passes on unchanged (the client gets the server's
answer) and marks the connection unclean; from then on it frames nothing, and the
client's bytes go to the server exactly as they came. docs/isolation.md lists the rules.
"""
from __future__ import annotations

import enum
import secrets
from typing import Optional, Union

from .command import (ALL, COMMANDS, CONDSTORE, CONDSTORE_RE, DESELECTING, LITERAL8,
                      NONE, SEARCHING, SELECT_CONDSTORE_RE, SELECTING, SERVER_NAME_RE,
                      SERVER_TAG_RE, STATELESS, STICKY, TOKEN_AFTER, TOKEN_RE, UPDATE_RE)
from .protocol import (Framer, Line, LiteralData, ProtocolError, parse_response,
                       rewrite_capabilities)

__all__ = ['Tracker', 'Held', 'Hold', 'Replay', 'enable_profile', 'new_prefix', 'MAX_COMMAND_LINE']

# After login: Dovecot's imap_max_line_length is 64 KiB; leave room above it. A longer
# line is not refused: the connection is doubted and the line goes on to the server,
# whose limits apply.
MAX_COMMAND_LINE = 128 * 1024
# Dovecot counts a command's literals into its line length, except APPEND's; past this
# it refuses the command or disconnects, and a literal may go unread.
SERVER_LINE_LIMIT = 64 * 1024
# Literals this small are read for keywords (a search key sent as a literal).
SMALL_LITERAL = 64


def new_prefix() -> bytes:
    """A prefix for a session's owned tags: 48 random bits no client can guess."""
    return b'P' + secrets.token_hex(6).encode() + b'.'


def enable_profile(names) -> frozenset:
    """The sticky state that ENABLE of `names` asks for, upper-cased; QRESYNC implies
    CONDSTORE (RFC 7162 section 3.2.3)."""
    profile = {name.upper() for name in names}
    if b'QRESYNC' in profile:
        profile.add(b'CONDSTORE')
    return frozenset(profile)


class Replay:
    """The command that gave a connection its profile, as the client wrote it after its
    tag (`command`), and the server's whole answer to it: the untagged lines and the
    tagged line after its tag. A later session whose first command that changes state is
    the same bytes gets this answer under its own tag instead of a server round trip."""
    __slots__ = ('command', 'untagged', 'tagged')

    def __init__(self, command: bytes, untagged: bytes, tagged: bytes) -> None:
        self.command, self.untagged, self.tagged = command, untagged, tagged

    def answer(self, tag: bytes) -> bytes:
        return self.untagged + tag + self.tagged


class Hold(enum.Enum):
    """What a held command is: see Held."""
    LOGOUT = 'logout'
    COMPRESS = 'compress'
    PROFILE = 'profile'


class Held:
    """A command the relay may answer itself, or send on another connection: `kind` is
    a Hold: LOGOUT, COMPRESS, or PROFILE: the session's first command that changes
    state asks for `profile`, and a cached connection of that profile may serve the
    session instead (an ENABLE, only one whose profile was set by the same bytes,
    `enabled_by`; a SELECT or EXAMINE with the CONDSTORE parameter, any). Nothing is
    recorded until the relay calls `Tracker.forward` (or `answered`); a refused one
    leaves no trace."""
    __slots__ = ('kind', 'tag', 'name', 'data', 'profile')

    def __init__(self, kind: Hold, tag: bytes, name: bytes, data: bytes,
                 profile: frozenset = frozenset()) -> None:
        self.kind, self.tag, self.name, self.data = kind, tag, name, data
        self.profile = profile

    @property
    def enabled_by(self) -> Optional[bytes]:
        """An ENABLE's bytes after its tag (what a Replay is kept under), else None."""
        return self.data[len(self.tag):] if self.name == b'ENABLE' else None


class Sent:
    """A command sent to the server and not yet answered: `tag` is the proxy's,
    `client_tag` the client's."""
    __slots__ = ('tag', 'client_tag', 'name', 'reads', 'depth', 'args', 'literals', 'size',
                 'names', 'keyword', 'sync')

    def __init__(self, tag: bytes, client_tag: bytes, name: bytes,
                 reads: Optional[int]) -> None:
        self.tag = tag
        self.client_tag = client_tag
        self.name = name
        self.reads = reads           # from COMMANDS; None: the server may not know it
        self.depth = 0               # open parentheses
        self.args = 0                # whole arguments read at the top level
        self.literals = 0
        self.size = 0
        self.names = ()              # ENABLE: the names asked for
        self.keyword = b''           # a small literal's bytes, read for keywords
        self.sync = 0                # the size of a synchronizing literal owed a "+"


class Tracker:
    """Follows one logged-in session; see the module docstring.

    `profile` is the ENABLE state the connection starts with, `replay` the Replay that
    set it, if known. `prefix` starts every owned tag (see new_prefix). `unclean` is
    None while the connection may serve another session, else the first reason it may
    not.
    """

    def __init__(self, profile: frozenset = frozenset(), replay: Optional[Replay] = None,
                 prefix: bytes = b'P.', max_line: int = MAX_COMMAND_LINE) -> None:
        self.framer = Framer(max_line, auto_literals=False)
        self.profile = profile
        self.replay = replay
        self.prefix = prefix
        self.sent = 0                # owned tags handed out
        self.inflight: dict[bytes, Sent] = {}      # by the proxy's tag
        self.unclean: Optional[str] = None
        self.selected: Optional[bool] = False
        self.selecting = 0
        self.current: Optional[Sent] = None     # the command whose lines are read
        self.idling: Optional[Sent] = None         # an IDLE whose ending line is due
        self.waiting: list[Sent] = []            # commands owed a "+", in order
        self.held: Optional[Sent] = None         # its literal waits for that "+"
        self.released = False        # a "+" or a refusal ended `held`: frame on
        self.listed: list[bytes] = []               # `* ENABLED` lines of an ENABLE
        # The ENABLE that may set the profile, and its bytes after the tag (see record).
        self.enabling: Optional[tuple[Sent, bytes]] = None
        self.condstore = False       # CONDSTORE may have been turned on without ENABLE
        self.pinned = False          # a command that may change state was sent
        self.server_bye = False
        self.logging_out = False     # the server said BYE, then OK to a command
        self.event_kind = ''         # the last event: 'first' line, 'more' lines, 'literal'
        self._tail = b''             # the last client bytes, for the prefix search
        self._keep = 1 - len(prefix)

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
        """Append bytes received from the client. A client that sends the owned tags'
        prefix learned it from the server (data it made the server store, say): its
        bytes may answer for the proxy's commands, so the connection is not reused."""
        seen = self._tail + data
        if self.prefix in seen:
            self.doubt("client sent the proxy's tag")
        self._tail = seen[self._keep:]
        self.framer.feed(data)

    def next_event(self) -> Union[bytes, Held, None]:
        """Return the next piece of client input: bytes to send to the server (recorded,
        with owned tags), a Held command, or None when more bytes are needed or a
        synchronizing literal waits for the server's "+" (see `released`).

        Once the connection is unclean, every byte received goes on as it came.
        """
        if self.unclean is not None:
            return self.raw()
        if self.held is not None:
            return None
        try:
            event = self.framer.next_event()
        except ProtocolError as exc:
            # Too long a line, or a literal size no IMAP number has: the server's
            # limits apply, not the proxy's.
            self.doubt('command the proxy does not frame: %s' % exc)
            return self.raw()
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
        if self.idling is not None:
            # RFC 2177 section 3: the line after IDLE ends it, whatever it says; the
            # server reads it as IDLE's and answers IDLE.
            self.idling = None
            if event.literal is not None:
                self.doubt('literal after IDLE')
            return event.data
        return self.on_command(event)

    def raw(self) -> Optional[bytes]:
        self.event_kind = 'raw'
        return self.framer.take_buffered() if self.framer.buffered else None

    def forward(self, held: Held) -> bytes:
        """Record a Held command as sent to the server; return its bytes."""
        data = held.data
        command = self.record(held.tag, held.name, data)
        self.keywords(command, data)
        return command.tag + data[len(held.tag):]

    def answered(self, profile: frozenset, replay: Replay) -> None:
        """The relay answered a Held ENABLE with `replay`, on a connection of
        `profile`."""
        self.pinned = True
        self.adopt(profile, replay)

    def adopt(self, profile: frozenset, replay: Optional[Replay]) -> None:
        """The session goes on on another connection, of `profile`."""
        self.profile = profile
        self.replay = replay

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
            self.doubt('not a command: %s' % tag[:30].decode('ascii'))
            return data
        name, pos = name
        reads = COMMANDS.get(name)
        if reads is None:
            self.doubt('unknown command: %s' % name[:30].decode('ascii'))
            return data
        rest = data[pos:]
        if line.literal is None:
            if name == b'COMPRESS':
                return Held(Hold.COMPRESS, tag, name, data)
            if name == b'LOGOUT' and rest in (b'\r\n', b'\n'):
                return Held(Hold.LOGOUT, tag, name, data)
            if not self.pinned and not self.profile:
                held = self.profile_asked(tag, name, data, rest)
                if held is not None:
                    return held
        if name in STICKY:
            self.doubt(name.decode().lower())
            return data
        command = self.record(tag, name, data)
        out = self.on_segment(command, line, pos)
        if self.unclean is not None:
            # Its first line says the server reads it otherwise: it goes as it came.
            del self.inflight[command.tag]
            return out
        return command.tag + out[len(tag):]

    def profile_asked(self, tag: bytes, name: bytes, data: bytes,
                      rest: bytes) -> Optional[Held]:
        """The Held first state-changing command when it asks for a profile for certain:
        an ENABLE, or a SELECT or EXAMINE with the CONDSTORE parameter (RFC 7162
        section 3.1). A command that only might turn CONDSTORE on (a mailbox named
        modseq, a FETCH of MODSEQ with nothing selected) stays on its connection."""
        if name == b'ENABLE':
            names = rest.split()
            return Held(Hold.PROFILE, tag, name, data,
                        enable_profile(names)) if names else None
        if name in SELECTING and SELECT_CONDSTORE_RE.match(rest):
            return Held(Hold.PROFILE, tag, name, data, CONDSTORE)
        return None

    def record(self, tag: bytes, name: bytes, data: bytes) -> Sent:
        """Add a command to what is in flight, under a new owned tag, and note what it
        does to the session."""
        self.sent += 1
        owned = self.prefix + b'%d' % self.sent
        command = Sent(owned, tag, name, COMMANDS.get(name))
        # The ENABLE that sets the profile, alone in flight: its answer can be replayed.
        if name == b'ENABLE' and not self.inflight and not self.profile and not self.pinned:
            self.enabling = (command, data[len(tag):])
        elif self.enabling is not None:
            self.enabling = None
        self.inflight[owned] = command
        if name not in STATELESS:
            self.pinned = True
        if name in SELECTING:
            self.selecting += 1
        elif name == b'ENABLE':
            command.names = data.split()[2:]
        elif name == b'IDLE':
            self.idling = command
            self.waiting.append(command)
        return command

    def on_segment(self, command: Optional[Sent], line: Line, pos: int) -> bytes:
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
        if line.sync:
            # RFC 3501 section 7.5: the literal comes after the server's "+", or never
            # (a tagged refusal): what the client sent meanwhile waits till then, and is
            # then framed as the server will read it.
            command.sync = size
            self.waiting.append(command)
            self.held = command
        else:
            self.start_literal(command, size)
        return data

    def release(self) -> None:
        """The held synchronizing literal got its "+" or its refusal: the client's bytes
        behind it can be framed (the relay sees `released`)."""
        self.held = None
        self.released = True

    def start_literal(self, command: Sent, size: int) -> None:
        self.framer.expect_literal(size)
        self.current = command
        command.literals += 1
        if not size and not command.depth:
            command.args += 1            # {0}: the argument is whole already

    def reads_literal(self, command: Sent, data: bytes, pos: int) -> bool:
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
                # A command that reads N arguments skips the rest of the line after
                # them, a list that opens there and the literal in it included.
                return reads == ALL or command.args < reads
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

    def keywords(self, command: Sent, text: bytes) -> None:
        # RFC 7162 section 3.1: these turn CONDSTORE on for the rest of the session, as
        # ENABLE CONDSTORE does. The connection is then cached under that profile (the
        # reset sends ENABLE CONDSTORE to make sure of it).
        # An ENABLE turns it on explicitly, with the profile, once the server says OK.
        if (b'CONDSTORE' not in self.profile and command.name != b'ENABLE'
                and CONDSTORE_RE.search(text)):
            self.condstore = True
        if command.name in SEARCHING and UPDATE_RE.search(text):
            self.doubt('search updates')

    # -- the server's side --------------------------------------------------------------

    def on_response(self, line: bytes) -> bytes:
        """Note what the first line of a server response (without its LF) means; return
        it for the client: a tagged reply under the client's tag, a capability list
        filtered, else the same object."""
        first = line[:1]
        if first == b'*':
            return self.on_untagged(line)
        if first == b'+':
            if self.waiting:
                command = self.waiting.pop(0)
                if command is self.held:
                    self.release()
                    self.start_literal(command, command.sync)
            else:
                self.doubt('continuation request nobody asked for')
            return line
        try:
            response = parse_response(line)
        except ProtocolError:
            self.doubt('malformed server response')
            return line
        if self.server_bye and response.status == b'OK':
            self.logging_out = True      # RFC 3501 section 6.1.3: LOGOUT's answer
        command = self.inflight.pop(response.tag, None)
        if command is None:
            self.doubt('server ran a command the proxy did not frame')
            return line
        self.on_reply(command, response.status, line)
        line = command.client_tag + line[len(command.tag):]
        if response.code and response.code[:11].upper() == b'CAPABILITY ':
            return rewrite_capabilities(line)
        return line

    def on_untagged(self, line: bytes) -> bytes:
        word = line[2:10].upper()
        if word[:1].isdigit():
            # (An ENABLE that may set the profile is sent with nothing selected: such
            # data beside it is doubted here.)
            if self.selected is False and not self.selecting:
                self.doubt('mailbox data with no mailbox selected')
            elif b'CONDSTORE' not in self.profile and b'MODSEQ (' in line:
                self.condstore = True
            return line
        if word[:4] == b'BYE ':
            self.server_bye = True
        elif word[:4] == b'BAD ':
            self.doubt('untagged BAD')
        elif word[:7] == b'ENABLED' and word[7:8] in (b' ', b'\r', b''):
            if any(command.name == b'ENABLE' for command in self.inflight.values()):
                self.listed.append(line)
                return line
            self.doubt('ENABLED without ENABLE')
        elif word == b'VANISHED' and b'QRESYNC' not in self.profile:
            self.doubt('implicit qresync')
        elif b'CAPABILITY' in line[:60].upper():
            line = rewrite_capabilities(line)
        self.enabling = None             # an ENABLE's answer has only ENABLED lines
        return line

    def on_reply(self, command: Sent, status: bytes, line: bytes) -> None:
        if command in self.waiting:
            # The server refused a synchronizing literal: the client will not send it
            # (RFC 3501 section 7.5); or an IDLE ended without its continuation.
            self.waiting.remove(command)
            if command is self.held:
                self.release()
        if command is self.idling:
            self.idling = None
        if status != b'OK' and command.literals:
            # The server refused a command that had literals: it may not have read
            # them as announced (Dovecot reads a refused APPEND's as arguments).
            self.doubt('%s reply to a command with literals' % status.decode('ascii'))
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
                profile = self.profile | enable_profile(command.names)
                if self.enabling is not None and command is self.enabling[0]:
                    self.replay = Replay(self.enabling[1], b''.join(
                        listed + b'\n' for listed in self.listed),
                        line[len(command.tag):] + b'\n')
                elif profile != self.profile:
                    self.replay = None
                self.profile = profile
            self.listed = []

    # -- the end ---------------------------------------------------------------------

    def leftover(self) -> Optional[str]:
        """Why the connection cannot be finished and kept after the client left, or
        None: then the commands in `inflight` only need their replies read (an IDLE
        still waiting for its DONE needs that line: see `idling`)."""
        if self.unclean is not None:
            return self.unclean
        if self.current is not None or not self.framer.at_boundary:
            return 'client left inside a command'
        if any(command is not self.idling for command in self.waiting):
            return 'client left inside a literal'
        if any(command.name == b'ENABLE' for command in self.inflight.values()):
            return 'client left inside ENABLE'
        return None
