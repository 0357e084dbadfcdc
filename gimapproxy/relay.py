"""After login: relay a client and its backend connection both ways until LOGOUT.

The session's greenlet frames the client's commands and forwards them; a second greenlet,
the pump, streams the server's responses back. Each command is tracked from its first
line to its tagged reply (R3), so the proxy knows when the backend connection is clean:
nothing in flight, no literal owed, no response half written. LOGOUT is answered by the
proxy once every earlier command has its reply (R23).

Only the pump writes to the client while the relay runs, except for the proxy's own few
replies, which take `client_lock` first. The pump holds that lock from the first byte of a
response to its last, so nothing the proxy says can land inside a response.
"""
from __future__ import annotations

import errno
import logging
import re
import time
from typing import Optional

import gevent
from gevent import socket
from gevent.event import Event
from gevent.lock import Semaphore

from .backend import BackendConnection, BackendDesync, BackendError
from .logfmt import printable
from .protocol import (Line, LiteralData, ProtocolError, command_head, parse_response,
                       rewrite_capabilities)
from .sockio import recv_when_ready, send_all

__all__ = ['Relay']

log = logging.getLogger('gimapproxy.relay')

# After login: Dovecot's imap_max_line_length is 64 KiB; leave room above it.
MAX_COMMAND_LINE = 128 * 1024
LOGOUT_WAIT = 60.0            # for replies to commands pipelined before LOGOUT
RECV_SIZE = 65536

# Commands after which the connection is never cached (R14, R31): identity changes, and
# state that cannot be undone and is too rare to give its own place in the cache.
# NOTIFY is one: NOTIFY NONE (R28) is not the state of a fresh login. Dovecot 2.3 then
# stops even the FETCH replies to STORE, which a fresh session gets (RFC 5465 section
# 3.1; tests/test_isolation.py shows it).
_STICKY_COMMANDS = frozenset((b'NOTIFY', b'LANGUAGE', b'COMPARATOR', b'LOGIN',
                              b'AUTHENTICATE', b'PROXYAUTH', b'UNAUTHENTICATE', b'STARTTLS',
                              b'COMPRESS'))
# RFC 7162 section 3.1: CONDSTORE enabling commands (SELECT/EXAMINE (CONDSTORE), STATUS
# HIGHESTMODSEQ, FETCH or SEARCH MODSEQ, CHANGEDSINCE, UNCHANGEDSINCE) turn it on without
# ENABLE. A false match (a mailbox of that name) only costs the connection.
_IMPLICIT_CONDSTORE = re.compile(
    rb'\((?:CONDSTORE|QRESYNC)|\b(?:HIGHESTMODSEQ|MODSEQ|CHANGEDSINCE|UNCHANGEDSINCE)\b',
    re.IGNORECASE)
_SELECTING = frozenset((b'SELECT', b'EXAMINE'))
_DESELECTING = frozenset((b'CLOSE', b'UNSELECT'))


def enable_profile(names) -> frozenset:
    """The sticky state that ENABLE of `names` asks for, upper-cased; QRESYNC implies
    CONDSTORE (RFC 7162 section 3.2.3)."""
    profile = {name.upper() for name in names}
    if b'QRESYNC' in profile:
        profile.add(b'CONDSTORE')
    return frozenset(profile)


class Relay:
    """The logged-in part of one session. `run()` returns why it ended.

    When `run()` returns, the pump has stopped and the session's backend entry has been
    kept (reset and cached), dropped, or left to the session to drop (session.entry is
    then still set).
    """

    def __init__(self, session) -> None:
        self.session = session
        self.id = session.id
        self.sock = session.sock
        self.framer = session.framer                 # the client side
        self.conn: BackendConnection = session.entry.conn
        self.counters = session.server.counters
        self.idle_timeout = session.config.idle_timeout
        self.write_timeout = session.config.write_timeout
        user = (session.user or b'').decode('utf-8', 'replace')
        self.trace = user in session.config.trace_users     # protocol trace at debug
        self.masking = False              # the command being traced carries a secret
        self.inflight: dict[bytes, bytes] = {}        # client tag -> command name
        self.quiet = Event()                          # set while nothing is in flight
        self.quiet.set()
        self.sticky: Optional[str] = None             # why the backend cannot be cached
        self.enabling: dict[bytes, frozenset] = {}     # ENABLE tag -> names asked for
        self.listed: list[bytes] = []                  # names in `* ENABLED` replies
        self.forwarded = 0                             # commands sent to the server
        self.sending = False                           # a write to the server under way
        self.continuation_tag: Optional[bytes] = None  # IDLE/AUTHENTICATE owning lines
        self.literal_tag: Optional[bytes] = None      # command waiting for "+" to send
        self.client_lock = Semaphore()
        self.pump: Optional[gevent.Greenlet] = None
        self.pump_error: Optional[str] = None           # why the pump ended by itself
        self.backend_lost = False                      # ...and whether the server side
        self.server_bye = False                        # the server's BYE was relayed
        self.last_activity = time.monotonic()
        self.idle = False                             # idle_timeout passed: say BYE
        self.idle_timer = None

    def run(self) -> str:
        """Relay until LOGOUT or either side leaves; return the reason the session ended."""
        self.framer.max_line = MAX_COMMAND_LINE
        self.sock.settimeout(None)
        tick = self.idle_timeout / 4
        self.idle_timer = gevent.get_hub().loop.timer(tick, tick)
        self.idle_timer.start(self.check_idle)
        self.pump = gevent.spawn(self.pump_server)
        try:
            reason = self.pump_client()
            if self.backend_lost:
                return self.lost_backend()
            if self.pump_error:
                reason = 'client gone: %s' % self.pump_error
            if reason != 'logout':
                # The client left without LOGOUT (or timed out): finish what it started
                # and keep the backend if that leaves it clean (R24, R25). The client
                # does not wait for that.
                self.stop_pump()
                self.session.close_client()
                self.session.keep_backend(reason, self.settle())
            return reason
        except BackendError as exc:
            return 'backend ended: %s' % exc.reason
        finally:
            self.idle_timer.close()
            self.stop_pump()

    def lost_backend(self) -> str:
        """The server side ended under a live session: tell the client, give up."""
        if not self.server_bye:
            # The client must not wait for replies that will never come.
            self.send_local(b'* BYE Server connection lost.\r\n')
        return 'backend ended: %s' % self.pump_error

    def doubt(self) -> Optional[str]:
        """Why the backend connection is not known to be clean, or None (R3, R24)."""
        if self.sticky:
            return self.sticky
        if self.inflight:
            return 'command in flight'
        if not self.conn.framer.at_boundary:
            return 'response in progress'
        return None

    def settle(self) -> Optional[str]:
        """After the client left: finish its commands in flight, discarding their output,
        so that the connection can be kept. An IDLE gets its DONE (RFC 2177 section 3).
        Returns why the connection cannot be kept, or None."""
        if self.sticky:
            return self.sticky
        if self.sending:
            return 'client left while its command was being sent'
        if self.framer.in_literal or self.literal_tag is not None:
            return 'client left inside a literal'
        names = set(self.inflight.values())
        if b'AUTHENTICATE' in names or b'ENABLE' in names:
            return 'client left inside %s' % b'/'.join(sorted(names)).decode()
        if self.doubt() is None:
            return None
        try:
            if self.continuation_tag is not None:
                self.conn.send(b'DONE\r\n')
            if names & (_SELECTING | _DESELECTING):
                self.conn.selected = None
            self.conn.finish(set(self.inflight))
        except BackendError as exc:
            return 'could not finish the commands in flight: %s' % exc.reason
        self.inflight.clear()
        return None

    # -- client to server ---------------------------------------------------------------

    def pump_client(self) -> str:
        """Forward client commands to the server until LOGOUT or EOF."""
        framer = self.framer
        current: Optional[bytes] = None    # tag of the command being read
        out: list[bytes] = []
        while True:
            while True:
                try:
                    event = framer.next_event()
                except ProtocolError as exc:
                    self.flush(out)
                    self.send_local(b'* BYE Command line too long.\r\n')
                    self.sticky = self.sticky or 'oversized command'
                    return 'client protocol error: %s' % exc
                if event is None:
                    break
                if self.trace:
                    self.trace_client(event)
                if isinstance(event, LiteralData):
                    out.append(event.data)
                    continue
                if event.first:
                    if self.continuation_tag is not None:
                        # Lines that answer a continuation (IDLE's DONE, SASL data) belong
                        # to the command in progress; they are not commands.
                        if self.inflight.get(self.continuation_tag) == b'IDLE':
                            self.continuation_tag = None
                        out.append(event.data)
                        continue
                    current, name = command_head(event.data)
                    if name == b'LOGOUT' and event.data[len(current) + 7:] in (b'\r\n', b'\n'):
                        self.flush(out)
                        return self.logout(current)
                    if (name == b'ENABLE' and not self.forwarded and event.literal is None
                            and self.take_enabled(current, event.data)):
                        continue
                    if name == b'COMPRESS':
                        # R34: compression cannot be spliced into a cached connection.
                        self.flush(out)
                        self.send_local(current + b' NO Compression is not available.\r\n')
                        continue
                    if current is not None:
                        self.track(current, name, event.data)
                if event.literal is not None and event.sync:
                    self.literal_tag = current
                out.append(event.data)
            self.flush(out)
            data = self.recv_client()
            if not data:
                return 'client closed'
            framer.feed(data)

    def track(self, tag: bytes, name: Optional[bytes], line: bytes) -> None:
        """Record a command about to be forwarded (R3)."""
        if name == b'UID':
            name = b'UID ' + (command_head(line[len(tag) + 1:])[1] or b'')
        self.inflight[tag] = name or b''
        self.forwarded += 1
        self.quiet.clear()
        if name in (b'IDLE', b'AUTHENTICATE'):
            self.continuation_tag = tag
        if name == b'ENABLE':
            self.enabling[tag] = enable_profile(line.split()[2:])
        elif name in _STICKY_COMMANDS:
            self.sticky = self.sticky or name.decode().lower()
        elif (_IMPLICIT_CONDSTORE.search(line) and b'CONDSTORE' not in self.conn.profile):
            self.sticky = self.sticky or 'implicit condstore'

    def take_enabled(self, tag: bytes, line: bytes) -> bool:
        """Serve a session's first command, ENABLE, from a cached connection that has
        exactly that state (R32, R33). Returns False when there is none: the ENABLE then
        goes to the server as usual and the connection takes the state on."""
        profile = enable_profile(line.split()[2:])
        if self.conn.profile or not profile:
            return False
        entry = self.session.checkout(profile)
        if entry is None:
            return False
        self.stop_pump()
        old = self.conn.id
        self.session.swap_backend(entry, self.doubt())
        self.conn = entry.conn
        # Answer as the server answered this ENABLE on a fresh connection: the names
        # asked for that it turned on (QRESYNC brings CONDSTORE along).
        on = {name.upper() for name in self.conn.enabled}
        if b'QRESYNC' in on:
            on.add(b'CONDSTORE')
        names = [name for name in line.split()[2:] if name.upper() in on]
        self.session.send(b' '.join([b'* ENABLED'] + names) + b'\r\n'
                          + tag + b' OK Enabled.\r\n')
        log.info('enable: id=%s backend=%s result=reused replaced=%s', self.id,
                 self.conn.id, old)
        self.pump = gevent.spawn(self.pump_server)
        return True

    def flush(self, out: list) -> None:
        """Send the collected client bytes to the server in one write."""
        if out:
            data = b''.join(out) if len(out) > 1 else out[0]
            self.sending = True
            self.conn.send(data)
            self.sending = False
            self.counters['bytes_in'] += len(data)
            out.clear()
            self.last_activity = time.monotonic()

    def recv_client(self) -> bytes:
        """Read client bytes; b'' at EOF, error, or idle_timeout of silence both ways."""
        if self.pump_error is None and not self.idle:
            try:
                if self.framer.in_literal:
                    data = self.sock.recv(RECV_SIZE)        # an upload: more is on its way
                else:
                    data = recv_when_ready(self.sock, RECV_SIZE)
                self.last_activity = time.monotonic()
                return data
            except OSError:
                pass                     # gone, or woken by the pump or the idle timer
        if self.idle and self.pump_error is None:
            self.send_local(b'* BYE Idle timeout.\r\n')
        return b''

    def check_idle(self) -> None:
        """The idle timer's callback (in the hub): after idle_timeout of silence both
        ways, wake the session greenlet, which says BYE. The timer ticks four times per
        idle_timeout, so silence ends the session within 1.25 idle_timeout; the reads
        themselves carry no timeout, which would cost a timer per read."""
        if time.monotonic() - self.last_activity >= self.idle_timeout:
            self.idle = True
            self.idle_timer.stop()
            self.wake_session()

    # -- server to client ----------------------------------------------------------------

    def pump_server(self) -> None:
        """Stream server responses to the client (the pump greenlet's body).

        Writes whole batches in one send while holding `client_lock`, and keeps the lock
        while a response is only half written (a literal in progress). When it ends by
        itself it records why and wakes the session greenlet (see `wake_session`).
        """
        framer = self.conn.framer
        holding = False
        try:
            while True:
                out = []
                while True:
                    event = framer.next_event() if self.trace else framer.next_lines()
                    if event is None:
                        break
                    if isinstance(event, LiteralData):
                        out.append(event.data)
                    else:
                        if self.trace:
                            self.trace_event('S', event)
                        out.append(self.on_lines(event.data, event.first))
                if out:
                    if not holding:
                        self.client_lock.acquire()
                        holding = True
                    data = b''.join(out) if len(out) > 1 else out[0]
                    send_all(self.sock, data, self.write_timeout)
                    self.counters['bytes_out'] += len(data)
                    if framer.at_boundary:
                        self.client_lock.release()
                        holding = False
                    if not self.inflight:
                        self.quiet.set()
                data = self.conn.recv(expect=not framer.at_boundary)
                if not data:
                    raise BackendError('server closed the connection')
                self.last_activity = time.monotonic()
                framer.feed(data)
        except (BackendError, ProtocolError) as exc:
            self.pump_error = getattr(exc, 'reason', None) or str(exc)
            self.backend_lost = True
        except OSError as exc:
            # The client is gone; its commands may still be finished (R24).
            self.pump_error = 'write failed: %s' % (exc.strerror or exc)
        except Exception:
            self.pump_error = 'internal error'
            self.backend_lost = True
            log.exception('relay failed: id=%s', self.id)
        finally:
            if holding:
                self.client_lock.release()
        self.wake_session()

    def wake_session(self) -> None:
        """Make the session greenlet's client read return at once: gevent cancels the
        read it waits in, as it does when another greenlet closes a socket. The session
        sees `pump_error` and acts on it; nothing is thrown into its other work, and the
        client socket stays usable (a TLS one too) for a last BYE. When the session is
        not reading, `recv_client` sees `pump_error` before it waits."""
        watcher = getattr(self.sock, '_read_event', None)
        if watcher is not None:
            gevent.get_hub().cancel_wait(watcher, socket.error(errno.ECANCELED, 'woken'))

    def on_lines(self, data: bytes, first: bool) -> bytes:
        """Note what each response head among the whole lines in `data` means (the first
        line is the rest of a response unless `first`); return the bytes for the client."""
        lines = data.split(b'\n')            # ends in b'': data ends in a line end
        changed = False
        for i in range(0 if first else 1, len(lines) - 1):
            answer = self.on_response(lines[i])
            if answer is not lines[i]:
                lines[i] = answer
                changed = True
        return b'\n'.join(lines) if changed else data

    def on_response(self, line: bytes) -> bytes:
        """Note what the first line of a server response (without its LF) means; return
        it for the client, the same object unless a capability list was filtered.
        Untagged data costs a few slice compares.

        Raises:
            BackendDesync: a tagged reply to no command in flight (R4).
        """
        first = line[:1]
        if first == b'*':
            if line[2:6].upper() == b'BYE ':
                self.server_bye = True
            if self.enabling and line[2:10].upper() == b'ENABLED ':
                self.listed.extend(line.split()[2:])
            if b'CAPABILITY' in line[:60].upper():
                return rewrite_capabilities(line)
            return line
        if first == b'+':
            self.literal_tag = None
            return line
        response = parse_response(line)
        name = self.inflight.pop(response.tag, None)
        if name is None:
            raise BackendDesync('reply to a tag not in flight')
        if response.tag == self.literal_tag:
            # The server refused a synchronizing literal: the client will not send it.
            self.framer.cancel_literal()
            self.literal_tag = None
        if response.tag == self.continuation_tag:
            self.continuation_tag = None
        if name == b'ENABLE':
            self.record_enabled(self.enabling.pop(response.tag), response.status)
        if name in _SELECTING:
            # RFC 3501 section 6.3.1: a failed SELECT leaves no mailbox selected.
            self.conn.selected = {b'OK': True, b'NO': False}.get(response.status)
        elif name in _DESELECTING and response.status == b'OK':
            self.conn.selected = False
        if response.code and response.code[:11].upper() == b'CAPABILITY ':
            return rewrite_capabilities(line)
        return line

    def record_enabled(self, profile: frozenset, status: bytes) -> None:
        """Add what an answered ENABLE turned on to the connection's profile (R31)."""
        if status != b'OK':
            self.sticky = self.sticky or 'enable failed'
            return
        conn = self.conn
        conn.profile = conn.profile | profile
        conn.enabled = conn.enabled + [name for name in self.listed
                                       if name.upper() not in map(bytes.upper, conn.enabled)]
        if not self.enabling:
            self.listed = []

    # -- protocol trace (trace_users) ----------------------------------------------------

    def trace_client(self, event) -> None:
        """Log a client event; secrets of LOGIN and AUTHENTICATE are masked (R51)."""
        if isinstance(event, Line) and event.first:
            name = command_head(event.data)[1]
            if self.continuation_tag is not None and \
                    self.inflight.get(self.continuation_tag) == b'AUTHENTICATE':
                self.trace_text('C', '<SASL data masked>')
                return
            self.masking = name in (b'LOGIN', b'AUTHENTICATE')
            if self.masking:
                tag = event.data.split(b' ', 1)[0]
                self.trace_text('C', '%s %s <masked>' % (printable(tag), name.decode()))
                self.masking = event.literal is not None
                return
        elif isinstance(event, Line) and self.masking:
            self.trace_text('C', '<masked>')
            self.masking = event.literal is not None
            return
        self.trace_event('C', event)

    def trace_event(self, direction: str, event) -> None:
        if isinstance(event, LiteralData):
            self.trace_text(direction, '<literal data, %d bytes>' % len(event.data))
        else:
            self.trace_text(direction,
                            printable(event.data.rstrip(b'\r\n'), 300, spaces=True))

    def trace_text(self, direction: str, text: str) -> None:
        log.debug('trace: id=%s user=%s %s: %s', self.id, printable(self.session.user),
                  direction, text)

    # -- the end -----------------------------------------------------------------------------

    def logout(self, tag: bytes) -> str:
        """Answer LOGOUT after every earlier reply (R23), keeping the backend (R26-R29).

        The answer goes out as soon as the reset commands are sent: the client does not
        wait for the server's replies, and the same user's next login, which a webmail
        client sends right after, waits for the reset instead of opening a connection
        (see ClientSession.keep_backend and checkout).
        """
        if not self.quiet.is_set():
            gevent.wait([self.quiet, self.pump], count=1, timeout=LOGOUT_WAIT)
        if self.pump.dead:
            return 'logout: %s' % self.pump_error        # run() looks at why
        if not self.quiet.is_set():
            self.sticky = 'no reply to commands pipelined before LOGOUT'
            return 'logout timeout'
        # With the lock held the pump is between responses: stopping it loses no reply.
        if not self.client_lock.acquire(timeout=self.write_timeout):
            return 'logout timeout'
        try:
            self.stop_pump()
        finally:
            self.client_lock.release()
        log.info('logout: id=%s user=%s backend=%s', self.id,
                 printable(self.session.user), self.conn.id)
        self.session.keep_backend('logout', self.doubt(), farewell=b'* BYE Logging out\r\n'
                                  + tag + b' OK Logout completed.\r\n')
        return 'logout'

    def stop_pump(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None and not pump.dead:
            # The pump kills the session greenlet only when it ends by itself; a kill
            # from here ends it at its current wait (recv or the client lock).
            pump.kill(block=True)

    def send_local(self, data: bytes) -> None:
        """Write a response of the proxy's own while the pump may be writing too. When
        the pump holds the client for longer than write_timeout (a server that stalls in
        the middle of a response), the words are dropped rather than waited for."""
        if not self.client_lock.acquire(timeout=self.write_timeout):
            return
        try:
            self.session.send_quietly(data)
        finally:
            self.client_lock.release()
