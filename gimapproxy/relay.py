"""After login: move bytes between a client and its backend connection until one ends.

The session's greenlet reads the client and forwards its commands; a second greenlet,
the pump, streams the server's responses back. Neither reads IMAP itself: the client's
bytes go through the command tracker (gimapproxy.tracker), which frames them as the
server does and says what each is, and the pump hands it the first line of every server
response. The relay answers two commands itself: LOGOUT, when the connection is clean
(once every earlier command has its reply), and COMPRESS (refused). A session's first
command that changes state may move it to a cached connection of the profile it asks
for (an ENABLE, or a command that turns CONDSTORE on).

Only the pump writes to the client while the relay runs, except for the proxy's own few
replies, which take `client_lock` first. The pump holds that lock from the first byte of a
response to its last, so nothing the proxy says can land inside a response.

`run()` returns an End; what becomes of the backend connection is the session's and the
lease's business.
"""
from __future__ import annotations

import errno
import logging
import time
from typing import Optional

import gevent
from gevent import socket
from gevent.event import Event
from gevent.lock import Semaphore

from .backend import BackendError
from .lease import describe
from .logfmt import ProtocolTrace
from .protocol import LiteralData, ProtocolError
from .sockio import Reader, send_all
from .tracker import Held, Tracker, enable_profile

__all__ = ['Relay', 'End']

log = logging.getLogger('gimapproxy.relay')

LOGOUT_WAIT = 60.0            # for replies to commands pipelined before LOGOUT
RECV_SIZE = 65536


class End:
    """How a relay ended. `side` is 'logout' (the client's LOGOUT is to be answered by
    the proxy: `tag`), 'client' (the client left or must go; its commands may still be
    finished) or 'server' (the backend connection failed or closed). `reason` is for
    the log."""
    __slots__ = ('side', 'reason', 'tag')

    def __init__(self, side: str, reason: str, tag: Optional[bytes] = None) -> None:
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
        self.quiet = Event()              # set while every reply has reached the client
        self.quiet.set()
        self.client_lock = Semaphore()
        self.pump: Optional[gevent.Greenlet] = None
        self.pump_end: Optional[End] = None       # why the pump ended by itself
        self.last_activity = time.monotonic()
        self.idle = False                         # idle_timeout passed: say BYE
        self.idle_timer = None
        self.reader: Optional[Reader] = None      # the client reads, which wake_session ends

    def run(self) -> End:
        """Relay until LOGOUT or either side leaves; return how it ended."""
        self.sock.settimeout(None)
        self.reader = Reader(self.sock)
        tick = self.idle_timeout / 4
        self.idle_timer = gevent.get_hub().loop.timer(tick, tick)
        self.idle_timer.start(self.check_idle)
        self.pump = gevent.spawn(self.pump_server)
        try:
            return self.pump_client()
        except BackendError as exc:
            return End('server', 'backend ended: %s' % exc.reason)
        finally:
            self.idle_timer.close()
            self.stop_pump()
            self.reader.close()

    # -- client to server ---------------------------------------------------------------

    def pump_client(self) -> End:
        """Forward the client's input until LOGOUT, EOF or the pump's end."""
        tracker = self.tracker
        out: list[bytes] = []
        while True:
            while True:
                try:
                    event = tracker.next_event()
                except ProtocolError as exc:
                    self.flush(out)
                    tracker.doubt('oversized command')
                    self.send_local(b'* BYE Command line too long.\r\n')
                    return End('client', 'client protocol error: %s' % exc)
                if event is None:
                    break
                if self.trace:
                    self.trace.client(*((event.data, 'first') if isinstance(event, Held)
                                        else (event, tracker.event_kind)))
                if event.__class__ is bytes:
                    out.append(event)
                    continue
                self.flush(out)
                end = self.on_held(event)
                if end is not None:
                    return end
            self.flush(out)
            data = self.recv_client()
            if not data:
                if self.pump_end is not None:
                    return self.pump_end
                return End('client', 'idle timeout' if self.idle else 'client closed')
            tracker.feed(data)

    def on_held(self, held: Held) -> Optional[End]:
        """Answer a command the proxy may answer itself, or forward it."""
        if held.kind == 'compress':
            # Compression cannot be spliced into a cached connection (RFC 4978 section 3).
            self.send_local(held.tag + b' NO Compression is not available.\r\n')
            return None
        if held.kind == 'profile' and self.take_profile(held):
            return None
        if held.kind == 'logout':
            return self.logout(held)
        self.flush([self.tracker.forward(held)])
        return None

    def flush(self, out: list) -> None:
        """Send the collected client bytes to the server in one write."""
        if out:
            data = b''.join(out) if len(out) > 1 else out[0]
            if not self.tracker.quiet:
                self.quiet.clear()
            self.lease.conn.send(data)
            self.counters['bytes_in'] += len(data)
            out.clear()
            self.last_activity = time.monotonic()

    def recv_client(self) -> bytes:
        """Read client bytes; b'' at EOF, error, or idle_timeout of silence both ways."""
        if self.pump_end is None and not self.idle:
            try:
                # In an upload more is on its way: read at once.
                data = self.reader.recv(RECV_SIZE, not self.tracker.framer.in_literal)
                self.last_activity = time.monotonic()
                return data
            except OSError:
                pass                     # gone, or woken by the pump or the idle timer
        if self.idle and self.pump_end is None:
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

    def take_profile(self, held: Held) -> bool:
        """Serve a session whose first command that changes state asks for a profile
        (ENABLE, or a command that turns CONDSTORE on) from a cached connection of that
        profile. The commands before it changed nothing (ID, CAPABILITY, NOOP,
        NAMESPACE) and have their replies, so the current connection goes back to the
        cache as it is. An ENABLE is then answered as the server answered it on a fresh
        connection; any other command goes to the new connection. Returns False when
        there is none: the command then goes to the server as usual."""
        if not self.quiet.is_set() or not self.tracker.quiet:
            return False
        entry = self.lease.checkout(held.profile)
        if entry is None:
            return False
        self.stop_pump()
        old = self.lease.conn
        unclean = self.tracker.unclean or (None if old.framer.at_boundary
                                           else 'response in progress')
        self.lease.switch(entry, unclean)
        conn = self.lease.conn
        log.info('profile: id=%s backend=%s result=reused replaced=%s profile=%s', self.id,
                 conn.id, old.id, describe(conn))
        if held.name == b'ENABLE':
            self.tracker.answered(conn.profile, conn.enabled)
            # The names asked for that the server turned on (QRESYNC brings CONDSTORE).
            on = enable_profile(conn.enabled)
            names = [name for name in held.names if name.upper() in on]
            self.send_local(b' '.join([b'* ENABLED'] + names) + b'\r\n' + held.tag
                            + b' OK Enabled.\r\n')
        else:
            self.tracker.adopt(conn.profile, conn.enabled)
            self.flush([self.tracker.forward(held)])
        self.pump = gevent.spawn(self.pump_server)
        return True

    def logout(self, held: Held) -> Optional[End]:
        """LOGOUT on a clean connection: once every earlier command has its reply, stop
        the pump and return the End that has the proxy answer it. When the connection
        is no longer clean by then, or the replies do not come, the LOGOUT goes to the
        server, which answers it; the relay goes on until the server closes."""
        if not self.quiet.is_set():
            gevent.wait([self.quiet, self.pump], count=1, timeout=LOGOUT_WAIT)
        if self.pump.dead:
            return self.pump_end
        if not self.quiet.is_set():
            self.tracker.doubt('no reply to commands pipelined before LOGOUT')
        if self.tracker.unclean is None:
            # With the lock held the pump is between responses: stopping it loses no reply.
            if self.client_lock.acquire(timeout=self.write_timeout):
                try:
                    self.stop_pump()
                finally:
                    self.client_lock.release()
                return End('logout', 'logout', held.tag)
            self.tracker.doubt('client not reading before LOGOUT')
        self.flush([self.tracker.forward(held)])
        return None

    # -- server to client ----------------------------------------------------------------

    def pump_server(self) -> None:
        """Stream server responses to the client (the pump greenlet's body).

        Writes whole batches in one send while holding `client_lock`, and keeps the lock
        while a response is only half written (a literal in progress). When it ends by
        itself it records why in `pump_end` and wakes the session greenlet.
        """
        conn = self.lease.conn
        framer = conn.framer
        holding = False
        try:
            while True:
                out = []
                while True:
                    event = framer.next_event() if self.trace else framer.next_lines()
                    if event is None:
                        break
                    literal = isinstance(event, LiteralData)
                    if self.trace:
                        self.trace.server(event.data, literal)
                    out.append(event.data if literal
                               else self.on_lines(event.data, event.first))
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
                    if self.tracker.quiet:
                        self.quiet.set()
                data = conn.recv(expect=not framer.at_boundary)
                if not data:
                    raise BackendError('server closed the connection')
                self.last_activity = time.monotonic()
                framer.feed(data)
        except (BackendError, ProtocolError) as exc:
            reason = getattr(exc, 'reason', None) or str(exc)
            if self.tracker.logging_out and self.tracker.server_bye:
                self.pump_end = End('server', 'logout by the server')
            else:
                self.pump_end = End('server', 'backend ended: %s' % reason)
                if not self.tracker.server_bye:
                    # The client must not wait for replies that will never come.
                    self.send_local(b'* BYE Server connection lost.\r\n', holding)
        except OSError as exc:
            # The client is gone; its commands may still be finished.
            self.pump_end = End('client', 'client gone: write failed: %s'
                                % (exc.strerror or exc))
        except Exception:
            self.pump_end = End('server', 'internal error')
            log.exception('relay failed: id=%s', self.id)
        finally:
            if holding:
                self.client_lock.release()
        self.wake_session()

    def wake_session(self) -> None:
        """Make the session greenlet's client read return at once: gevent cancels the
        read it waits in, as it does when another greenlet closes a socket. The session
        sees `pump_end` and acts on it; nothing is thrown into its other work, and the
        client socket stays usable (a TLS one too) for a last BYE. When the session is
        not reading, `recv_client` sees `pump_end` before it waits."""
        self.reader.wake(socket.error(errno.ECANCELED, 'woken'))

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

    def stop_pump(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None and not pump.dead:
            # Ends the pump at its current wait (a server read or the client lock).
            pump.kill(block=True)

    def send_local(self, data: bytes, locked: bool = False) -> None:
        """Write a response of the proxy's own while the pump may be writing too. When
        the pump holds the client for longer than write_timeout (a server that stalls in
        the middle of a response), the words are dropped rather than waited for."""
        if not locked and not self.client_lock.acquire(timeout=self.write_timeout):
            return
        try:
            send_all(self.sock, data, self.write_timeout)
        except OSError:
            pass
        finally:
            if not locked:
                self.client_lock.release()
