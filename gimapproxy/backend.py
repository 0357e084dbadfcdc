"""Backend connections: a server socket and the proxy's own commands on it.

A BackendConnection connects, reads the greeting, runs the proxy's own commands with
proxy-owned tags (the login's, in gimapproxy.login), resets itself for the next session
and logs out. After login a client session's bytes go through the relay
(gimapproxy.relay, on gimapproxy.duplex's non-blocking sockets), which shares the
connection's server-side framer. Every close has a reason; every wait has a deadline.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import Optional

import gevent
from gevent import socket

from .logfmt import printable
from .protocol import (Framer, Line, LiteralData, ProtocolError, Response,
                       code_capabilities, filter_capabilities, parse_response,
                       untagged_capabilities)
from .sockio import readable, recv_when_ready, send_all

__all__ = ['BackendConnection', 'BackendError', 'BackendUnavailable', 'BackendDesync',
           'LoginRefused']

log = logging.getLogger('gimapproxy.backend')

# Server lines can be long: a SEARCH result over a million messages is several MB on one
# line. The relay holds at most one such line per session.
MAX_SERVER_LINE = 16 * 1024 * 1024
# Untagged data the proxy reads and drops while it runs its own command.
MAX_DISCARD = 4 * 1024 * 1024
RECV_SIZE = 65536
LOGOUT_TIMEOUT = 2.0


class BackendError(Exception):
    """The backend connection cannot be used; `reason` says why, for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackendUnavailable(BackendError):
    """Connect, greeting or timeout failure: the client gets NO [UNAVAILABLE]."""


class BackendDesync(BackendError):
    """The server said something the proxy did not ask for."""


class LoginRefused(Exception):
    """The server refused the credentials; `response` is its tagged reply."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def set_keepalive(sock, idle: int, interval: int, count: int) -> None:
    """Turn TCP keepalives on: after `idle` seconds of silence, a probe every `interval`
    seconds, and the connection is dead after `count` unanswered ones (Linux names;
    where the system lacks one, its own default stays)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (('TCP_KEEPIDLE', idle), ('TCP_KEEPINTVL', interval),
                        ('TCP_KEEPCNT', count)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class BackendConnection:
    """One TCP connection to the IMAP server.

    Attributes:
        id: 'b<n>', unique in the process, used in every log line. Where the connection
            is in its life is its cache entry's state (gimapproxy.cache.State).
        capabilities: the server's capability list as sent, post-login once logged in.
        login_text: the text of the server's tagged OK to the login, replayed on reuse.
        profile: the sticky state the connection has, as the set of extension names
            ENABLEd on it (RFC 5161; QRESYNC implies CONDSTORE). Part of the cache key.
        replay: the tracker's Replay of the ENABLE that set `profile`, if one did: the
            command and the server's answer, given to a later session that sends it.
        framer: the server-side Framer; the relay and the proxy's own commands share it, so
            a response half-read by one is finished by the other.
    """

    def __init__(self, address: tuple, conn_id: str) -> None:
        self.id = conn_id
        self.sock = None
        self.address = address
        self.framer = Framer(MAX_SERVER_LINE)
        self.closed = False
        self.capabilities = []
        self.login_text = b'Logged in'
        self.profile: frozenset = frozenset()
        self.replay = None
        self.tls = None               # the BackendTLS it was wrapped with, if any
        self.created = time.monotonic()
        # Proxy-owned tags carry a random prefix that no client can guess, so a late
        # reply to a client command can never be taken for the proxy's own.
        self._tag_prefix = b'G' + secrets.token_hex(4).encode()
        self._tags = itertools.count(1)

    # -- connecting and logging in ------------------------------------------------------

    def connect(self, timeout: float, tls=None, keepalive: Optional[tuple] = None) -> None:
        """Connect and read the greeting, within `timeout` seconds in all. With `tls` (a
        gimapproxy.tls.BackendTLS) the connection is encrypted before the greeting
        (implicit) or right after it with STARTTLS, which fails closed: no STARTTLS
        means no login (RFC 3501 section 6.2.1). `keepalive` is (idle, interval, count)
        for TCP keepalives, or None for none.

        Raises:
            BackendUnavailable: refused, unreachable, timed out, BYE or PREAUTH greeting,
                no STARTTLS, or a TLS failure (the reason says which check failed). The
                caller closes the connection.
        """
        host, port = self.address
        with gevent.Timeout(timeout, BackendUnavailable('connect timeout after %gs' % timeout)):
            try:
                self.sock = socket.create_connection((host, port))
            except OSError as exc:
                raise BackendUnavailable('connect to %s:%d failed: %s'
                                         % (host, port, exc.strerror or exc)) from None
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if keepalive is not None:
                set_keepalive(self.sock, *keepalive)
            if tls is not None and tls.mode == 'implicit':
                self._start_tls(tls)
            self._read_greeting()
            if tls is not None and tls.mode == 'starttls':
                self._starttls(tls)
        log.debug('backend connected: id=%s server=%s:%d', self.id, host, port)

    def _read_greeting(self) -> None:
        line = self._read_line()
        try:
            greeting = parse_response(line)
        except ProtocolError:
            raise BackendUnavailable('malformed greeting') from None
        if greeting.kind != 'untagged' or greeting.status != b'OK':
            # PREAUTH would hand us some identity we did not ask for; BYE means go away.
            raise BackendUnavailable('server greeted with %s'
                                     % printable(greeting.status or b'data'))
        self.capabilities = code_capabilities(greeting)
        if not self.capabilities:
            self.capabilities = self.ask_capabilities()

    def _starttls(self, tls) -> None:
        # RFC 3501 section 6.2.1: no STARTTLS or a NO refuses the login, and what the
        # server said before TLS (capabilities, any extra bytes) is thrown away.
        if b'STARTTLS' not in self.capability_set():
            raise BackendUnavailable('server offers no STARTTLS')
        response, _ = self.command(b'STARTTLS')
        if response.status != b'OK':
            raise BackendUnavailable('server refused STARTTLS: %s'
                                     % printable(response.status))
        if self.framer.buffered:
            raise BackendUnavailable('data after the STARTTLS reply (injection?)')
        self._start_tls(tls)
        self.capabilities = self.ask_capabilities()

    def _start_tls(self, tls) -> None:
        from .tls import describe_error
        try:
            self.sock = tls.wrap(self.sock, self.address[0])
        except (OSError, ValueError) as exc:
            raise BackendUnavailable(describe_error(exc)) from None
        self.tls = tls

    # -- proxy-owned commands ----------------------------------------------------------

    def next_tag(self) -> bytes:
        """A new proxy-owned tag: a random prefix per connection that no client can
        guess, so a late reply to a client command is never taken for the proxy's own."""
        return self._tag_prefix + b'.%d' % next(self._tags)

    def ask_capabilities(self) -> list[bytes]:
        """Run CAPABILITY; return the list. Raises BackendUnavailable unless OK."""
        response, untagged = self.command(b'CAPABILITY')
        if response.status != b'OK':
            raise BackendUnavailable('CAPABILITY failed')
        return untagged_capabilities(untagged)

    def command(self, text: bytes) -> tuple[Response, list[bytes]]:
        """Send one proxy-owned command; return its tagged reply and the untagged lines
        before it (see read_tagged)."""
        tag = self.next_tag()
        self.send(tag + b' ' + text + b'\r\n')
        return self.read_tagged(tag)

    def start_reset(self, timeout: float, condstore: bool = False) -> list:
        """Start bringing the session back to "logged in, nothing selected" for the next
        client: send the reset commands and return what `finish_reset` needs to read
        their replies. The caller may do other work between the two (answer its client).

        Always deselects, whatever the session was thought to have selected: the reset
        does not trust the tracking. Without expunging: UNSELECT when the post-login
        capabilities list it (RFC 3691 section 2), else EXAMINE of a name that cannot
        exist, since a failed SELECT or EXAMINE leaves nothing selected (RFC 3501 section
        6.3.1); never CLOSE on a read-write mailbox, which expunges. Ends with a NOOP read
        to its tagged OK, so nothing of the previous session is left unread. The commands
        go in one write: one round trip. With `condstore`, ENABLE CONDSTORE comes between
        (RFC 5161: ENABLE only in the authenticated state), for a session that turned
        it on without ENABLE (RFC 7162 section 3.1), so that it is on for certain.

        Raises:
            BackendUnavailable: the send failed or took longer than `timeout`.
        """
        if self.can_unselect:
            deselect = b'UNSELECT'
        else:
            deselect = b'EXAMINE "gimapproxy-reset-' + self._tag_prefix + b'-no-such-mailbox"'
        commands = [deselect, b'NOOP']
        if condstore:
            commands.insert(1, b'ENABLE CONDSTORE')
        sent = [(self.next_tag(), command) for command in commands]
        self.send(b''.join(tag + b' ' + command + b'\r\n' for tag, command in sent), timeout)
        return sent

    def finish_reset(self, sent: list, timeout: float) -> None:
        """Read the replies to the commands `start_reset` sent, within `timeout`.

        Raises:
            BackendError: timeout, EOF, BYE, a foreign tag, or an unexpected answer.
        """
        with gevent.Timeout(timeout, BackendUnavailable('reset timeout after %gs' % timeout)):
            replies = {command: self.read_tagged(tag)[0].status for tag, command in sent}
            if replies[b'NOOP'] != b'OK':
                raise BackendError('NOOP answered %s' % printable(replies[b'NOOP']))
            if replies.get(b'ENABLE CONDSTORE', b'OK') != b'OK':
                raise BackendError('ENABLE CONDSTORE answered %s'
                                   % printable(replies[b'ENABLE CONDSTORE']))
            self._check_deselect(sent[0][1], replies[sent[0][1]])

    def _check_deselect(self, command: bytes, status: bytes) -> None:
        if command == b'UNSELECT':
            # BAD is Dovecot's "No mailbox selected": nothing was.
            if status not in (b'OK', b'BAD'):
                raise BackendError('UNSELECT answered %s' % printable(status))
        elif status == b'OK':
            # The name exists after all; it was opened read-only, so CLOSE expunges nothing.
            response, _ = self.command(b'CLOSE')
            if response.status != b'OK':
                raise BackendError('CLOSE answered %s' % printable(response.status))
        elif status != b'NO':
            raise BackendError('EXAMINE answered %s' % printable(status))

    def check(self, timeout: float) -> None:
        """One NOOP round trip within `timeout`: is a cached connection still alive?

        Raises:
            BackendError: no OK in time, EOF, BYE, or anything out of step.
        """
        with gevent.Timeout(timeout, BackendUnavailable('no answer in %gs' % timeout)):
            response, _ = self.command(b'NOOP')
        if response.status != b'OK':
            raise BackendError('NOOP answered %s' % printable(response.status))

    def send_logout(self) -> None:
        """Send LOGOUT and wait briefly for its reply; the caller closes. Never raises
        (but for GreenletExit)."""
        if self.closed or self.sock is None:
            return
        try:
            with gevent.Timeout(LOGOUT_TIMEOUT, BackendUnavailable('logout timeout')):
                self.command(b'LOGOUT')
        except (BackendError, OSError):
            pass

    def close(self, reason: str, state: str = 'connecting') -> None:
        """Close the socket and log `reason` with `state`, the one it ended in. Safe to
        call twice: only the first close counts."""
        if self.closed:
            return
        self.closed = True
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        log.info('backend closed: id=%s state=%s reason=%s age=%.1fs', self.id, state,
                 reason, time.monotonic() - self.created)

    def has_input(self) -> bool:
        """True when the server sent something that nobody has read yet."""
        return bool(self.framer.buffered) or readable(self.sock)

    # -- raw I/O for the relay ---------------------------------------------------------

    def send(self, data: bytes, timeout: Optional[float] = None) -> None:
        """Write all of `data`, within `timeout` seconds (None: the socket's own).
        Raises BackendUnavailable when the socket fails or the time is up."""
        try:
            send_all(self.sock, data, self.sock.timeout if timeout is None else timeout)
        except OSError as exc:
            raise BackendUnavailable('send failed: %s' % (exc.strerror or exc)) from None

    def recv(self, expect: bool = True) -> bytes:
        """Read what is there (b'' at EOF); with `expect` False, after a whole response,
        wait for more before trying (see sockio.recv_when_ready). Raises
        BackendUnavailable on a socket error."""
        try:
            if expect:
                return self.sock.recv(RECV_SIZE)
            return recv_when_ready(self.sock, RECV_SIZE)
        except OSError as exc:
            raise BackendUnavailable('receive failed: %s' % (exc.strerror or exc)) from None

    # -- reading responses -------------------------------------------------------------

    def read_event(self):
        """The next Line or LiteralData from the server, reading as needed.

        Raises:
            BackendDesync: bad framing. BackendUnavailable: EOF or a socket error.
        """
        while True:
            try:
                event = self.framer.next_event()
            except ProtocolError as exc:
                raise BackendDesync('framing error: %s' % exc) from None
            if event is not None:
                return event
            data = self.recv(expect=not self.framer.at_boundary)
            if not data:
                raise BackendUnavailable('server closed the connection')
            self.framer.feed(data)

    def _read_line(self) -> bytes:
        event = self.read_event()
        if not isinstance(event, Line) or event.literal is not None:
            raise BackendDesync('expected a plain line')
        return event.data

    def responses(self, budget: int):
        """Yield the server's responses from here on, each as (Response, its first line)
        once the whole of it is read (its literals and later lines are dropped); the
        caller stops when it has what it waits for. A response already half read is
        finished first. The one reader of responses for the proxy's own commands.

        Raises:
            BackendDesync: bad framing or a malformed response.
            BackendError: more than `budget` bytes.
            BackendUnavailable: EOF or a socket error.
        """
        left = self.finish_response(budget)
        while True:
            event, left = self._read_within(left)
            first = event.data
            try:
                response = parse_response(first)
            except ProtocolError as exc:
                raise BackendDesync('malformed response: %s' % exc) from None
            while isinstance(event, LiteralData) or event.literal is not None:
                event, left = self._read_within(left)
            yield response, first

    def finish_response(self, budget: int) -> int:
        """Read and drop the rest of a response half read, if any, within `budget`
        bytes; return what is left of the budget."""
        while not self.framer.at_boundary:
            _, budget = self._read_within(budget)
        return budget

    def _read_within(self, budget: int) -> tuple:
        """The next event, and what is left of `budget` after it (see read_event)."""
        event = self.read_event()
        budget -= len(event.data)
        if budget < 0:
            raise BackendError('more responses than the proxy reads and drops')
        return event, budget

    def read_tagged(self, tag: bytes, continuation: Optional[bytes] = None
                    ) -> tuple[Response, list[bytes]]:
        """Read to the tagged reply for `tag`, returning it and the untagged first lines.

        Untagged data (with its literals) is read and dropped, up to MAX_DISCARD bytes.
        A `+` continuation is answered with `continuation` once, when given.

        Raises:
            BackendDesync: a foreign tag, an unexpected continuation, or bad framing.
            BackendUnavailable: EOF, a socket error, or BYE.
            BackendError: more than MAX_DISCARD bytes before the reply.
        """
        untagged: list[bytes] = []
        for response, line in self.responses(MAX_DISCARD):
            if response.kind == 'tagged':
                if response.tag != tag:
                    raise BackendDesync('reply to a tag the proxy did not send')
                return response, untagged
            if response.kind == 'continuation':
                if continuation is None:
                    raise BackendDesync('unexpected continuation request')
                self.send(continuation)
                continuation = None
                continue
            if response.status == b'BYE':
                raise BackendUnavailable('server said BYE: %s' % printable(response.text))
            if len(untagged) < 100:
                untagged.append(line)

    def wait_continuation(self, tag: bytes) -> Optional[Response]:
        """Wait for `+`; return None on it, or the tagged reply that refused the literal.

        Raises:
            BackendDesync: a foreign tag or bad framing.
            BackendUnavailable: EOF, a socket error, or BYE.
        """
        for response, _ in self.responses(MAX_DISCARD):
            if response.kind == 'continuation':
                return None
            if response.kind == 'tagged':
                if response.tag != tag:
                    raise BackendDesync('reply to a tag the proxy did not send')
                return response
            if response.status == b'BYE':
                raise BackendUnavailable('server said BYE: %s' % printable(response.text))

    @property
    def capabilities(self) -> list[bytes]:
        return self._capabilities.split()

    @capabilities.setter
    def capabilities(self, capabilities: list[bytes]) -> None:
        # Kept as one string (a list of thirty small ones costs kilobytes per cached
        # connection); what every login and reset needs is worked out once, here.
        self._capabilities = b' '.join(capabilities)
        caps = self.capability_set()
        self.can_unselect = b'UNSELECT' in caps or b'IMAP4REV2' in caps
        self._client_capabilities = b' '.join(filter_capabilities(capabilities))

    def capability_set(self) -> frozenset[bytes]:
        """The capabilities, upper-cased for comparison (RFC 3501 section 7.2.1)."""
        return frozenset(self._capabilities.upper().split())

    def client_capabilities(self) -> bytes:
        """The post-login capability list as a client of the proxy may see it."""
        return self._client_capabilities
