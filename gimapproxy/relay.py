"""After login: move bytes between a client and its backend connection until one ends.

The session's greenlet carries both directions. It waits on both sockets at once
(gimapproxy.duplex), and its reads and writes never block. What cannot be written at
once waits in the destination's queue, and a source is not read while its
destination's queue is over QUEUE_LIMIT, so a peer that stops reading stops only the
direction that feeds it, and the other goes on, as two greenlets would. A round trip
costs one wake-up per direction and no greenlet switch beyond it.

Neither direction reads IMAP itself: the client's bytes go through the command tracker
(gimapproxy.tracker), which frames them as the server does and says what each is, and
the first line of every server response is handed to it too. The relay answers two
commands itself: LOGOUT, when the connection is clean (once every earlier command has
its reply), and COMPRESS (refused). A session's first command that changes state may
move it to a cached connection of the profile it asks for (an ENABLE, or a command that
turns CONDSTORE on). The proxy's own words go into the client's queue only between two
responses, so they never land inside one.

`run()` returns an End; what becomes of the backend connection is the session's and the
lease's business.
"""
from __future__ import annotations

import enum
import logging
import time
from typing import Optional

from .duplex import CLIENT_IN, CLIENT_OUT, SERVER_IN, SERVER_OUT, Duplex
from .lease import describe
from .logfmt import ProtocolTrace
from .protocol import LiteralData, ProtocolError
from .tracker import Held, Hold, Tracker

__all__ = ['Relay', 'End', 'EndedBy', 'Phase']

log = logging.getLogger('gimapproxy.relay')

LOGOUT_WAIT = 60.0            # for replies to commands pipelined before LOGOUT,
LOGOUT_SILENCE = 2.0          # while the server says something at least this often
QUEUE_LIMIT = 256 * 1024      # bytes waiting for one side before its source is not read

_monotonic = time.monotonic


class EndedBy(enum.Enum):
    """Which side ended a relay: LOGOUT (the client's LOGOUT is to be answered by the
    proxy), CLIENT (the client left or must go; its commands may still be finished) or
    SERVER (the backend connection failed or closed)."""
    LOGOUT = 'logout'
    CLIENT = 'client'
    SERVER = 'server'


class Phase(enum.Enum):
    """Where the relay's loop is: RELAYING both ways; LOGGING_OUT, a LOGOUT held until
    the replies owed before it have reached the client (the client is not read);
    ENDING, the client is owed what was read and the proxy's last words, then the End
    (the client is not read, the server only until those words can follow a whole
    response)."""
    RELAYING = 'relaying'
    LOGGING_OUT = 'logging out'
    ENDING = 'ending'


# The loop tests its phase several times a turn: module names cost less than an enum's
# attribute lookups.
RELAYING, LOGGING_OUT, ENDING = Phase.RELAYING, Phase.LOGGING_OUT, Phase.ENDING


class End:
    """How a relay ended: `side` (an EndedBy), `reason` for the log, and for LOGOUT the
    `tag` to answer it under."""
    __slots__ = ('side', 'reason', 'tag')

    def __init__(self, side: EndedBy, reason: str, tag: Optional[bytes] = None) -> None:
        self.side, self.reason, self.tag = side, reason, tag


class Relay:
    """The logged-in part of one session.

    Args:
        sock: the client socket. lease: the session's gimapproxy.lease.Lease.
        tracker: the session's Tracker (it outlives the relay: the lease reads it).
        trace: log the protocol of `user`'s session at debug level, secrets masked.
    """

    def __init__(self, session_id: str, sock, lease, tracker: Tracker, config, counters,
                 user: bytes, trace: bool = False) -> None:
        self.id = session_id
        self.sock = sock
        self.lease = lease
        self.tracker = tracker
        self.counters = counters
        self.idle_timeout = config.idle_timeout
        self.write_timeout = config.write_timeout
        self.trace = ProtocolTrace(log, session_id, user) if trace else None
        self.io: Optional[Duplex] = None
        self.last_activity = _monotonic()
        self.timed_out = False             # idle_timeout passed: say BYE
        self.idle_timer = None
        self.local: list[bytes] = []  # the proxy's words, waiting for a response's end
        self.phase = RELAYING         # the loop's state; what each phase waits with:
        self.logout: Optional[Held] = None      # LOGGING_OUT: the LOGOUT held
        self.logout_deadline = 0.0
        self.ending: Optional[End] = None       # ENDING: the End to return once the
        self.ending_deadline = 0.0              # client has what it is owed (end_with)

    def run(self) -> End:
        """Relay until LOGOUT or either side leaves; return how it ended."""
        self.io = io = Duplex(self.sock)
        try:
            io.attach(self.lease.conn.sock)
            tick = self.idle_timeout / 4
            self.idle_timer = io.hub.loop.timer(tick, tick)
            self.idle_timer.start(self.check_idle)
            return self.loop()
        finally:
            if self.idle_timer is not None:
                self.idle_timer.close()
            io.close()

    # -- the loop --------------------------------------------------------------------

    def loop(self) -> End:
        """Handle what is ready, then wait for more, until an End."""
        io = self.io
        client = io.client
        # Commands pipelined after the login, and a response already buffered.
        end = self.on_server(b'') or self.on_client(b'')
        while end is None:
            ready, io.ready = io.ready, 0
            if client.cross or io.server.cross:
                ready = io.crossed(ready)
            if ready & SERVER_IN and self.reading() & SERVER_IN:
                end = self.read_server()
            if end is None and ready & CLIENT_IN and self.reading() & CLIENT_IN:
                end = self.read_client()
            server = io.server                # after the reads: a profile switch moves it
            if end is None and server.queue and (server.stalled is None or ready & SERVER_OUT):
                try:
                    server.flush()
                except OSError as exc:
                    self.server_gone('send failed: %s' % (exc.strerror or exc))
            if end is None and client.queue and (client.stalled is None or ready & CLIENT_OUT):
                try:
                    client.flush()
                except OSError as exc:
                    end = self.client_gone(self.ending if self.phase is ENDING else End(
                        EndedBy.CLIENT, 'client gone: write failed: %s' % (exc.strerror or exc)))
            if end is None and (self.phase is not RELAYING or self.timed_out
                                or client.stalled or server.stalled):
                end = self.check_deadlines()
            if end is None and not io.ready and not (
                    client.queue and client.stalled is None
                    or server.queue and server.stalled is None):
                self.wait()
        return end

    def check_deadlines(self) -> Optional[End]:
        """After each turn: the LOGOUT and ending waits, idle time and write
        timeouts."""
        if self.phase is LOGGING_OUT:
            end = self.check_logout()
            if end is not None:
                return end
        client, server = self.io.client, self.io.server
        if self.phase is ENDING:
            if not self.local and not client.queue and not server.queue:
                return self.ending
            if _monotonic() >= self.ending_deadline:
                return self.client_gone(self.ending)
        elif self.timed_out:
            self.end_with(End(EndedBy.CLIENT, 'idle timeout'), b'* BYE Idle timeout.\r\n')
        now = None
        for side in (client, server):
            if side.stalled is not None:
                now = now or _monotonic()
                if now - side.stalled >= self.write_timeout:
                    if side is server:
                        self.server_gone('send failed: write timeout')
                        return None
                    return self.client_gone(End(EndedBy.CLIENT,
                                                'client gone: write failed: write timeout'))
        return None

    def reading(self) -> int:
        """The sides to read now (CLIENT_IN, SERVER_IN): each while its destination's
        queue has room; the client until LOGOUT or the end, the server until the end,
        or after it until the proxy's last words have followed a whole response."""
        io = self.io
        sides = 0
        phase = self.phase
        # (What the tracker holds behind a synchronizing literal waiting for its "+"
        # counts too; otherwise it holds at most an unfinished line, below the limit.)
        if (phase is RELAYING and io.server.queued < QUEUE_LIMIT
                and (self.tracker.held is None
                     or self.tracker.framer.buffered < QUEUE_LIMIT)):
            sides = CLIENT_IN
        if (phase is not ENDING or self.local) and io.client.queued < QUEUE_LIMIT:
            sides |= SERVER_IN
        return sides

    def settled(self) -> bool:
        """Every command sent has its reply, the client has it all, and nothing is
        queued either way."""
        io = self.io
        return (self.tracker.quiet and not io.client.queue and not io.server.queue
                and not self.local)

    def wait(self) -> None:
        """Wait for what the loop can go on with: input from a side that is read, room
        on a side with a queue, or a deadline (a write that cannot go on, the LOGOUT
        and ending waits)."""
        client, server = self.io.client, self.io.server
        want = (self.reading() | (CLIENT_OUT if client.queue else 0)
                | (SERVER_OUT if server.queue else 0) | client.cross | server.cross)
        deadline = None
        if client.stalled or server.stalled or self.phase is not RELAYING:
            times = [side.stalled + self.write_timeout
                     for side in (client, server) if side.stalled is not None]
            if self.phase is LOGGING_OUT:
                times.append(self.logout_due())
            elif self.phase is ENDING:
                times.append(self.ending_deadline)
            deadline = min(times)
        self.io.wait(want, deadline)

    def check_idle(self) -> None:
        """The idle timer's callback: after idle_timeout of silence both ways, wake the
        greenlet, which says BYE. The timer ticks four times per idle_timeout, so
        silence ends the session within 1.25 idle_timeout; the reads carry no timeout,
        which would cost a timer per read."""
        if _monotonic() - self.last_activity >= self.idle_timeout:
            self.timed_out = True
            self.idle_timer.stop()
            self.io.wake()

    # -- client to server ---------------------------------------------------------------

    def read_client(self) -> Optional[End]:
        client = self.io.client
        try:
            data = client.recv()
        except OSError:
            data = b''
        if data is None:
            return None
        if not data:
            return self.client_gone(End(EndedBy.CLIENT, 'client closed'))
        if client.more(data):
            self.io.ready |= CLIENT_IN
        self.last_activity = _monotonic()
        return self.on_client(data)

    def on_client(self, data: bytes) -> Optional[End]:
        """Feed client bytes to the tracker and queue what it frames for the server."""
        tracker = self.tracker
        tracker.feed(data)
        while self.phase is RELAYING:
            event = tracker.next_event()
            if event is None:
                break
            if self.trace:
                self.trace.client(*((event.data, 'first') if isinstance(event, Held)
                                    else (event, tracker.event_kind)))
            if event.__class__ is bytes:
                self.to_server(event)
            else:
                self.on_held(event)
        return None

    def to_server(self, data: bytes) -> None:
        self.io.server.put(data)
        self.counters['bytes_in'] += len(data)

    def on_held(self, held: Held) -> None:
        """Answer a command the proxy may answer itself, or forward it."""
        if held.kind is Hold.COMPRESS:
            # Compression cannot be spliced into a cached connection (RFC 4978 section 3).
            self.say(held.tag + b' NO Compression is not available.\r\n')
        elif held.kind is Hold.PROFILE and self.take_profile(held):
            pass
        elif held.kind is Hold.LOGOUT:
            # Answered once every earlier command has its reply: see check_logout.
            # (From here on only the server is read: `last_activity` is when it last
            # spoke, or when the LOGOUT came.)
            self.logout, self.phase = held, LOGGING_OUT
            self.logout_deadline = _monotonic() + LOGOUT_WAIT
        else:
            self.to_server(self.tracker.forward(held))

    def check_logout(self) -> Optional[End]:
        """LOGOUT on a clean connection: once every earlier command has its reply and
        the client has it, return the End that has the proxy answer it. When the
        connection is no longer clean by then, or the replies do not come within
        LOGOUT_WAIT, or the server falls silent for LOGOUT_SILENCE while they are owed,
        the LOGOUT goes to the server, which answers it; the relay goes on until the
        server closes. A server that read a command otherwise than the proxy (it took
        it for a literal, say) never answers its tag: it gets the LOGOUT at once."""
        tracker = self.tracker
        if tracker.unclean is None and not (self.settled()
                                            and self.lease.conn.framer.at_boundary):
            if _monotonic() < self.logout_due():
                return None
            tracker.doubt('no reply to commands pipelined before LOGOUT')
        held, self.logout, self.phase = self.logout, None, RELAYING
        if tracker.unclean is None:
            return End(EndedBy.LOGOUT, 'logout', held.tag)
        self.to_server(tracker.forward(held))
        return self.on_client(b'')            # commands pipelined after it

    def logout_due(self) -> float:
        """When a held LOGOUT stops waiting for the replies owed before it."""
        return min(self.logout_deadline, self.last_activity + LOGOUT_SILENCE)

    def take_profile(self, held: Held) -> bool:
        """Serve a session whose first command that changes state asks for a profile
        (an ENABLE, or a SELECT or EXAMINE with CONDSTORE) from a cached connection of
        that profile. The commands before it changed nothing (ID, CAPABILITY, NOOP,
        NAMESPACE) and have their replies, so the current connection goes back to the
        cache as it is. An ENABLE moves only to a connection whose profile was set by
        the same bytes, and gets the server's answer to them then, under its own tag;
        a SELECT or EXAMINE goes to the new connection. Returns False when there is
        none: the command then goes to the server as usual."""
        if not self.settled():
            return False
        enabled_by = held.enabled_by
        entry = self.lease.checkout(held.profile, enabled_by)
        if entry is None:
            return False
        old = self.lease.conn
        unclean = self.tracker.unclean or (None if old.framer.at_boundary
                                           else 'response in progress')
        self.io.detach()
        self.lease.switch(unclean)
        conn = self.lease.conn
        self.io.attach(conn.sock)
        log.info('profile: id=%s backend=%s result=reused replaced=%s profile=%s', self.id,
                 conn.id, old.id, describe(conn))
        if enabled_by is not None:
            self.tracker.answered(conn.profile, conn.replay)
            self.say(conn.replay.answer(held.tag))
        else:
            self.tracker.adopt(conn.profile, conn.replay)
            self.to_server(self.tracker.forward(held))
        return True

    # -- server to client ----------------------------------------------------------------

    def read_server(self) -> Optional[End]:
        server = self.io.server
        try:
            data = server.recv()
        except OSError as exc:
            self.server_gone('receive failed: %s' % (exc.strerror or exc))
            return None
        if data is None:
            return None
        if not data:
            self.server_gone('server closed the connection')
            return None
        if server.more(data):
            self.io.ready |= SERVER_IN
        self.last_activity = _monotonic()
        return self.on_server(data)

    def on_server(self, data: bytes) -> Optional[End]:
        """Frame server bytes, show the tracker the first line of every response, and
        queue them for the client."""
        framer = self.lease.conn.framer
        trace = self.trace
        framer.feed(data)
        out = []
        size = 0
        owed = bool(self.local)              # the proxy's words wait for a response's end
        try:
            while True:
                event = framer.next_event() if trace else framer.next_lines()
                if event is None:
                    break
                literal = isinstance(event, LiteralData)
                if trace:
                    trace.server(event.data, literal)
                data = event.data if literal else self.on_lines(event.data, event.first)
                out.append(data)
                size += len(data)
                if owed and framer.at_boundary:
                    out.extend(self.local)
                    self.local.clear()
                    owed = False
        except ProtocolError as exc:
            error = str(exc)
        else:
            error = None
        if out:
            self.io.client.put(b''.join(out) if len(out) > 1 else out[0])
            self.counters['bytes_out'] += size
        if error is not None:
            self.server_gone(error)
            return None
        if self.tracker.released:
            # A "+" or a refusal answered a synchronizing literal: the client's bytes
            # held behind it can be framed now.
            self.tracker.released = False
            return self.on_client(b'')
        return None

    def on_lines(self, data: bytes, first: bool) -> bytes:
        """Hand the tracker the first line of every response among the whole lines in
        `data` (the first line is the rest of a response unless `first`); return the
        bytes for the client."""
        lines = data.split(b'\n')            # ends in b'': data ends in a line end
        changed = False
        on_response = self.tracker.on_response
        for i in range(0 if first else 1, len(lines) - 1):
            answer = on_response(lines[i])
            if answer is not lines[i]:
                lines[i] = answer
                changed = True
        return b'\n'.join(lines) if changed else data

    # -- ending --------------------------------------------------------------------------

    def say(self, words: bytes) -> None:
        """Queue a response of the proxy's own for the client, at the end of the server
        response in progress, if any."""
        if self.lease.conn.framer.at_boundary and not self.local:
            self.io.client.put(words)
        else:
            self.local.append(words)

    def end_with(self, end: End, last_words: bytes) -> None:
        """End the session from the client's side with `last_words` (a BYE): stop
        reading the client, go on reading the server until its response in progress
        is whole, then send what the client is owed and return `end`, all within
        write_timeout."""
        self.ending, self.phase = end, ENDING
        self.ending_deadline = _monotonic() + self.write_timeout
        self.say(last_words)

    def client_gone(self, end: End) -> End:
        """The relay ends with the client (`end`); commands already framed for the
        server go to it now, or the connection is not reused (the lease then cannot
        tell which replies to wait for)."""
        server = self.io.server
        if server.queue:
            try:
                server.flush()
            except OSError:
                pass
            if server.queue:
                self.tracker.doubt('client commands not sent to the server')
        return end

    def server_gone(self, reason: str) -> None:
        """The backend connection failed or closed: the relay goes on until the client
        has what was read, then a BYE unless the server said one, within write_timeout
        (see `ending`), and ends then."""
        tracker = self.tracker
        self.io.server.discard()
        self.local.clear()
        if tracker.logging_out and tracker.server_bye:
            end = End(EndedBy.SERVER, 'logout by the server')
        else:
            end = End(EndedBy.SERVER, 'backend ended: %s' % reason)
            if not tracker.server_bye:
                # The client must not wait for replies that will never come.
                self.io.client.put(b'* BYE Server connection lost.\r\n')
        self.ending, self.phase = end, ENDING
        self.ending_deadline = _monotonic() + self.write_timeout
