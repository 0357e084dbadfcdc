"""One client's whole story: greeting, login, relay, logout.

A ClientSession runs in the greenlet the server spawned for the client. Before login it
answers the client itself (R6). LOGIN or AUTHENTICATE takes a cached backend connection
when the same user logs in with the same password, or opens a new one. After login it
relays both ways: this greenlet frames the client's commands and forwards them, a second
greenlet (the pump) streams the server's responses back. LOGOUT is answered by the proxy
once every earlier command has its reply; the backend connection is then reset and cached.
"""
from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from typing import Optional

import gevent
from gevent import socket
from gevent.event import Event
from gevent.lock import Semaphore

from .backend import (BackendConnection, BackendDesync, BackendError, LoginRefused)
from .cache import CacheFull, Entry
from .logfmt import printable
from .protocol import (BadCommand, Framer, Line, LiteralData, ProtocolError,
                       command_head, parse_command, parse_response, rewrite_capabilities,
                       tag_of)

__all__ = ['ClientSession', 'PRELOGIN_CAPABILITIES']

log = logging.getLogger('gimapproxy.session')

# R38: the proxy's own pre-login list. LITERAL+ only (never with LITERAL-, RFC 7888 §5).
PRELOGIN_CAPABILITIES = b'IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN'

# Limits before login (R46), as Dovecot's imap-login applies them.
PRELOGIN_MAX_LINE = 8192
PRELOGIN_MAX_LITERAL = 8192
PRELOGIN_MAX_COMMAND = 3 * 8192
PRELOGIN_TIMEOUT = 60.0
MAX_BAD_COMMANDS = 3
# After login: Dovecot's imap_max_line_length is 64 KiB; leave room above it.
MAX_COMMAND_LINE = 128 * 1024
IDLE_TIMEOUT = 30 * 60.0      # silence on both sides, as the original's hard-coded limit
LOGOUT_WAIT = 60.0            # for replies to commands pipelined before LOGOUT
WRITE_TIMEOUT = 60.0
RECV_SIZE = 65536

# Commands that leave state on the server connection that the next session must not
# inherit (R14, R31): the connection is not cached after any of them.
_STICKY_COMMANDS = frozenset((b'ENABLE', b'NOTIFY', b'LANGUAGE', b'COMPARATOR',
                              b'LOGIN', b'AUTHENTICATE', b'PROXYAUTH', b'UNAUTHENTICATE',
                              b'STARTTLS', b'COMPRESS'))
# RFC 7162 section 3.1: these turn CONDSTORE on implicitly.
_IMPLICIT_CONDSTORE = re.compile(rb'CONDSTORE|QRESYNC|MODSEQ|CHANGEDSINCE', re.IGNORECASE)
_SELECTING = frozenset((b'SELECT', b'EXAMINE'))
_DESELECTING = frozenset((b'CLOSE', b'UNSELECT'))
# Sending these texts would tell the client about the backend's reasons; the proxy
# relays only the status and response code (R12).
_REFUSAL_TEXT = {b'NO': b'Authentication failed.', b'BAD': b'Authentication failed.'}


class SessionEnd(Exception):
    """Stop the session; `reason` is logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _BackendLost(Exception):
    """Thrown into the session greenlet by the pump when the server side ends."""


class ClientSession:
    """The story of one client connection; `run()` is the greenlet's body."""

    def __init__(self, server, sock: socket.socket, address) -> None:
        self.server = server
        self.config = server.config
        self.cache = server.cache
        self.id = server.next_id('c')
        self.sock = sock
        self.peer = '%s:%s' % (address[0], address[1]) if address else '-'
        self.framer = Framer(PRELOGIN_MAX_LINE)
        self.bad_commands = 0
        self.user: Optional[bytes] = None
        self.entry: Optional[Entry] = None
        # Relay state, shared between this greenlet and the pump.
        self.inflight: dict[bytes, bytes] = {}   # client tag -> command name
        self.quiet = Event()                      # set while nothing is in flight
        self.quiet.set()
        self.sticky: Optional[str] = None        # why the backend cannot be cached
        self.continuation_tag: Optional[bytes] = None   # IDLE/AUTHENTICATE owning lines
        self.literal_tag: Optional[bytes] = None  # command waiting for "+" to send a literal
        self.client_lock = Semaphore()
        self.pump: Optional[gevent.Greenlet] = None
        self.pump_error: Optional[str] = None
        self.last_activity = time.monotonic()

    # -- the story -----------------------------------------------------------------------

    def run(self) -> None:
        """Serve the client until it leaves; never raises."""
        reason = 'client closed'
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log.info('client connected: id=%s peer=%s', self.id, self.peer)
            self.send(b'* OK [CAPABILITY ' + PRELOGIN_CAPABILITIES + b'] gimapproxy ready.\r\n')
            if self.authenticate():
                reason = self.relay()
        except SessionEnd as end:
            reason = end.reason
        except _BackendLost:
            reason = 'backend ended: %s' % self.pump_error
        except gevent.GreenletExit:
            reason = 'server shutdown'
            self.send_quietly(b'* BYE Server shutting down.\r\n')
            raise
        except Exception:
            reason = 'internal error'
            log.exception('session failed: id=%s', self.id)
            self.send_quietly(b'* BYE Internal error.\r\n')
        finally:
            self.stop_pump()
            if self.entry is not None:
                self.drop_backend(reason)
            self.close_client()
            log.info('client closed: id=%s reason=%s', self.id, reason)

    # -- before login ------------------------------------------------------------------

    def authenticate(self) -> bool:
        """Answer pre-login commands until a login succeeds (True) or the client leaves.

        Raises:
            SessionEnd: LOGOUT, timeout, too many bad commands, oversized input.
        """
        deadline = time.monotonic() + PRELOGIN_TIMEOUT
        while True:
            data = self.read_command(deadline)
            try:
                command = parse_command(data)
            except BadCommand as bad:
                self.refuse(bad.tag, bad.message.encode())
                continue
            handler = getattr(self, 'handle_' + command.name.decode('ascii').lower(), None)
            if handler is None:
                self.refuse(command.tag, b'Command not allowed before login.')
                continue
            if handler(command, deadline):
                return True

    def read_command(self, deadline: float) -> bytes:
        """Read one complete command, literals included, answering `+` to `{n}`.

        Raises:
            SessionEnd: EOF, timeout, oversized line or literal.
        """
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = self.framer.next_event()
            except ProtocolError as exc:
                self.send_quietly(b'* BYE Input line too long.\r\n')
                raise SessionEnd('pre-login input: %s' % exc) from None
            if event is None:
                self.framer.feed(self.recv(deadline))
                continue
            parts.append(event.data)
            size += len(event.data)
            if size > PRELOGIN_MAX_COMMAND:
                self.send_quietly(b'* BYE Command too long.\r\n')
                raise SessionEnd('pre-login command too long')
            if isinstance(event, LiteralData) or event.literal is None:
                if isinstance(event, Line):
                    return b''.join(parts)
                continue
            if event.literal > PRELOGIN_MAX_LITERAL:
                # R46, RFC 7888 section 4: refuse a synchronizing literal with NO and no
                # "+"; a non-synchronizing one is already on its way, so end the session.
                if not event.sync:
                    self.send_quietly(b'* BYE Literal too large.\r\n')
                    raise SessionEnd('pre-login literal too large')
                self.framer.cancel_literal()
                self.refuse(tag_of(parts[0]), b'Literal too large.', status=b'NO')
                parts, size = [], 0
                continue
            if event.sync:
                self.send(b'+ OK\r\n')

    def refuse(self, tag: Optional[bytes], text: bytes, status: bytes = b'BAD') -> None:
        """Answer a bad pre-login command; end the session after MAX_BAD_COMMANDS."""
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self.send_quietly(b'* BYE Too many invalid commands.\r\n')
            raise SessionEnd('too many invalid commands')
        self.send((tag or b'*') + b' ' + status + b' ' + text + b'\r\n')

    def handle_capability(self, command, deadline) -> bool:
        self.send(b'* CAPABILITY ' + PRELOGIN_CAPABILITIES + b'\r\n'
                  + command.tag + b' OK Capability completed.\r\n')
        return False

    def handle_noop(self, command, deadline) -> bool:
        self.send(command.tag + b' OK NOOP completed.\r\n')
        return False

    def handle_logout(self, command, deadline) -> bool:
        self.send(b'* BYE Logging out\r\n' + command.tag + b' OK Logout completed.\r\n')
        raise SessionEnd('logout before login')

    def handle_id(self, command, deadline) -> bool:
        # RFC 2971 section 3.3: NIL or up to 30 field/value pairs of bounded size (R43).
        args = command.args
        fields = args[0] if len(args) == 1 else False
        if fields is not None and not (
                isinstance(fields, list) and len(fields) % 2 == 0 and len(fields) <= 60
                and all(isinstance(v, bytes) or v is None for v in fields)
                and all(len(k or b'') <= 30 for k in fields[::2])
                and all(len(v or b'') <= 1024 for v in fields[1::2])):
            self.refuse(command.tag, b'Invalid ID arguments.')
            return False
        self.send(b'* ID NIL\r\n' + command.tag + b' OK ID completed.\r\n')
        return False

    def handle_login(self, command, deadline) -> bool:
        args = command.args
        if len(args) != 2 or not all(isinstance(arg, bytes) for arg in args):
            self.refuse(command.tag, b'LOGIN needs a user name and a password.')
            return False
        return self.login(command.tag, b'', args[0], args[1], 'LOGIN')

    def handle_authenticate(self, command, deadline) -> bool:
        args = command.args
        if not 1 <= len(args) <= 2 or not all(isinstance(arg, bytes) for arg in args):
            self.refuse(command.tag, b'AUTHENTICATE needs a mechanism.')
            return False
        mechanism = args[0].upper()
        initial = args[1] if len(args) == 2 else None
        if mechanism == b'PLAIN':
            message = self.sasl_response(command.tag, initial, b'', deadline)
            if message is None:
                return False
            parts = message.split(b'\0')
            if len(parts) != 3 or not parts[1]:
                self.refuse(command.tag, b'Invalid PLAIN message.')
                return False
            return self.login(command.tag, parts[0], parts[1], parts[2], 'PLAIN')
        if mechanism == b'LOGIN':
            user = self.sasl_response(command.tag, initial, b'VXNlcm5hbWU6', deadline)
            if user is None:
                return False
            password = self.sasl_response(command.tag, None, b'UGFzc3dvcmQ6', deadline)
            if password is None:
                return False
            return self.login(command.tag, b'', user, password, 'LOGIN')
        self.send(command.tag + b' NO Unsupported authentication mechanism.\r\n')
        return False

    def sasl_response(self, tag: bytes, initial: Optional[bytes], challenge: bytes,
                      deadline: float) -> Optional[bytes]:
        """Return one decoded SASL response, prompting with `challenge` unless `initial`
        came with the command (RFC 4959 section 3: `=` is an empty one). Returns None
        after answering BAD to a cancel (`*`) or bad base64 (RFC 3501 section 6.2.2)."""
        if initial is None:
            self.send(b'+ ' + challenge + b'\r\n')
            event = None
            while event is None:
                try:
                    event = self.framer.next_event()
                except ProtocolError:
                    self.send_quietly(b'* BYE Input line too long.\r\n')
                    raise SessionEnd('SASL response too long') from None
                if event is None:
                    self.framer.feed(self.recv(deadline))
            if isinstance(event, Line) and event.literal is not None:
                self.framer.cancel_literal()
            initial = event.data.rstrip(b'\r\n')
            if initial == b'*':
                self.refuse(tag, b'Authentication aborted.')
                return None
        if initial == b'=':
            return b''
        try:
            return base64.b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            self.refuse(tag, b'Invalid base64 data.')
            return None

    # -- login ------------------------------------------------------------------------

    def login(self, tag: bytes, authzid: bytes, user: bytes, password: bytes,
              method: str) -> bool:
        """Give the session a logged-in backend connection and tell the client.

        Returns True when logged in; False after relaying a refusal.
        """
        key = (authzid, user)
        verifier = self.cache.verifier(password)
        started = time.monotonic()
        entry = self.cache.checkout(key, verifier)
        while entry is not None and entry.conn.has_input():
            # Not one stale byte may reach the new client (R30): the server spoke while the
            # connection sat in the cache (a BYE, most likely) and the watcher has not run.
            self.cache.discard(entry)
            entry.conn.close('server spoke while cached')
            entry = self.cache.checkout(key, verifier)
        result = 'reused'
        if entry is None:
            entry = self.open_backend(tag, key, verifier, authzid, user, password)
            if entry is None:
                return False
            result = 'new'
        self.entry = entry
        self.user = user
        conn = entry.conn
        self.server.count('login_' + result)
        self.send(tag + b' OK [CAPABILITY ' + conn.client_capabilities() + b'] '
                  + conn.login_text + b'\r\n')
        log.info('login: id=%s user=%s method=%s backend=%s result=%s peer=%s time=%.1fms',
                 self.id, printable(user), method, conn.id, result, self.peer,
                 (time.monotonic() - started) * 1000)
        return True

    def open_backend(self, tag, key, verifier, authzid, user, password) -> Optional[Entry]:
        """Connect and log in a new backend connection; None after telling the client no."""
        try:
            victims = self.cache.reserve()
        except CacheFull as exc:
            self.server.count('login_failed')
            log.warning('login failed: id=%s user=%s reason=%s', self.id, printable(user), exc)
            self.send(tag + b' NO [UNAVAILABLE] Too many connections, try again later.\r\n')
            return None
        for victim in victims:
            gevent.spawn(victim.conn.logout, 'evicted: cache full')
        conn = None
        try:
            conn = BackendConnection.connect(self.config.server_hostname,
                                             self.config.server_port,
                                             self.config.connect_timeout,
                                             self.server.next_id('b'))
            conn.login(authzid, user, password)
        except LoginRefused as refused:
            self.cache.unreserve()
            conn.close('login refused', quiet=True)
            response = refused.response
            code = b'[' + response.code + b'] ' if response.code else b''
            self.server.count('login_failed')
            log.info('login failed: id=%s user=%s backend=%s status=%s code=%s', self.id,
                     printable(user), conn.id, printable(response.status),
                     printable(response.code))
            self.send(tag + b' ' + response.status + b' ' + code
                      + _REFUSAL_TEXT.get(response.status, b'Authentication failed.')
                      + b'\r\n')
            return None
        except BackendError as exc:
            self.cache.unreserve()
            if conn is not None:
                conn.close(exc.reason)
            self.server.count('login_failed')
            log.warning('login failed: id=%s user=%s reason=%s', self.id, printable(user),
                        exc.reason)
            self.send(tag + b' NO [UNAVAILABLE] Server unavailable, try again later.\r\n')
            return None
        except BaseException:
            self.cache.unreserve()
            if conn is not None:
                conn.close('login interrupted')
            raise
        return self.cache.add(key, verifier, conn)

    # -- after login: the relay ------------------------------------------------------------

    def relay(self) -> str:
        """Relay until LOGOUT or either side leaves; return the reason the session ended."""
        conn = self.entry.conn
        self.framer.max_line = MAX_COMMAND_LINE
        self.pump = gevent.spawn(self.pump_server, gevent.getcurrent())
        try:
            reason = self.pump_client(conn)
            if self.entry is not None:
                # The client left without LOGOUT: keep the backend only if it is clean
                # (R24).
                self.stop_pump()
                self.keep_backend(reason)
            return reason
        except _BackendLost:
            return 'backend ended: %s' % self.pump_error
        except BackendError as exc:
            return 'backend ended: %s' % exc.reason

    def pump_client(self, conn: BackendConnection) -> str:
        """Forward client commands to the server until LOGOUT or EOF."""
        framer = self.framer
        current: Optional[bytes] = None    # tag of the command being read
        while True:
            out = []
            while True:
                try:
                    event = framer.next_event()
                except ProtocolError as exc:
                    self.flush_to(conn, out)
                    self.send_local(b'* BYE Command line too long.\r\n')
                    self.sticky = self.sticky or 'oversized command'
                    return 'client protocol error: %s' % exc
                if event is None:
                    break
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
                        self.flush_to(conn, out)
                        return self.logout(conn, current)
                    if name == b'COMPRESS':
                        # R34: compression cannot be spliced into a cached connection.
                        self.flush_to(conn, out)
                        self.send_local(current + b' NO Compression is not available.\r\n')
                        continue
                    if current is not None:
                        self.track(current, name, event.data)
                if event.literal is not None and event.sync:
                    self.literal_tag = current
                out.append(event.data)
            self.flush_to(conn, out)
            data = self.recv_client()
            if not data:
                return 'client closed'
            framer.feed(data)

    def track(self, tag: bytes, name: Optional[bytes], line: bytes) -> None:
        """Record a command about to be forwarded (R3)."""
        if name == b'UID':
            name = b'UID ' + (command_head(line[len(tag) + 1:])[1] or b'')
        self.inflight[tag] = name or b''
        self.quiet.clear()
        if name in (b'IDLE', b'AUTHENTICATE'):
            self.continuation_tag = tag
        if name in _STICKY_COMMANDS:
            self.sticky = self.sticky or name.decode().lower()
        elif _IMPLICIT_CONDSTORE.search(line):
            self.sticky = self.sticky or 'implicit condstore'

    def flush_to(self, conn: BackendConnection, out: list) -> None:
        if out:
            conn.send(b''.join(out) if len(out) > 1 else out[0])
            out.clear()
            self.last_activity = time.monotonic()

    def pump_server(self, session: gevent.Greenlet) -> None:
        """Stream server responses to the client (the pump greenlet's body).

        Writes whole batches in one send while holding `client_lock`, and keeps the lock
        while a response is only half written (a literal in progress), so that nothing
        the proxy says itself can land inside a response.
        """
        conn = self.entry.conn
        framer = conn.framer
        holding = False
        try:
            while True:
                out = []
                while True:
                    event = framer.next_event()
                    if event is None:
                        break
                    if isinstance(event, LiteralData) or not event.first:
                        out.append(event.data)
                    else:
                        out.append(self.on_response(event.data))
                if out:
                    if not holding:
                        self.client_lock.acquire()
                        holding = True
                    with gevent.Timeout(WRITE_TIMEOUT, OSError('write timeout')):
                        self.sock.sendall(b''.join(out) if len(out) > 1 else out[0])
                    if framer.at_boundary:
                        self.client_lock.release()
                        holding = False
                    if not self.inflight:
                        self.quiet.set()
                data = conn.recv()
                if not data:
                    raise BackendError('server closed the connection')
                self.last_activity = time.monotonic()
                framer.feed(data)
        except (BackendError, ProtocolError) as exc:
            self.pump_error = getattr(exc, 'reason', None) or str(exc)
        except OSError as exc:
            self.pump_error = 'client write failed: %s' % (exc.strerror or exc)
        except Exception:
            self.pump_error = 'internal error'
            log.exception('relay failed: id=%s', self.id)
        finally:
            if holding:
                self.client_lock.release()
        # Reached only when the pump ends on its own: wake the session greenlet.
        gevent.kill(session, _BackendLost, block=False)

    def on_response(self, line: bytes) -> bytes:
        """Note what the first line of a server response means; return it for the client.

        Raises:
            BackendDesync: a tagged reply to no command in flight (R4).
        """
        first = line[:1]
        if first == b'*':
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
        conn = self.entry.conn
        if name in _SELECTING:
            # RFC 3501 section 6.3.1: a failed SELECT leaves no mailbox selected.
            conn.selected = {b'OK': True, b'NO': False}.get(response.status)
        elif name in _DESELECTING and response.status == b'OK':
            conn.selected = False
        if response.code and response.code[:11].upper() == b'CAPABILITY ':
            return rewrite_capabilities(line)
        return line

    def logout(self, conn: BackendConnection, tag: bytes) -> str:
        """Answer LOGOUT after every earlier reply (R23), keeping the backend (R26-R29).

        The reset runs before the answer, so that the same user's next login, which a
        webmail client sends right after, finds the connection in the cache.
        """
        if not self.quiet.wait(LOGOUT_WAIT):
            raise SessionEnd('no reply to commands pipelined before LOGOUT')
        # With the lock held the pump is between responses: stopping it loses no reply.
        if not self.client_lock.acquire(timeout=WRITE_TIMEOUT):
            raise SessionEnd('server response stuck before LOGOUT')
        try:
            self.stop_pump()
        finally:
            self.client_lock.release()
        log.info('logout: id=%s user=%s backend=%s', self.id, printable(self.user), conn.id)
        self.keep_backend('logout')
        self.send_quietly(b'* BYE Logging out\r\n' + tag + b' OK Logout completed.\r\n')
        return 'logout'

    def keep_backend(self, why: str) -> None:
        """Reset the backend and cache it, or close it when it is not known clean (R24)."""
        entry, conn = self.entry, self.entry.conn
        doubt = self.sticky or ('command in flight' if self.inflight else None) or (
            None if conn.framer.at_boundary else 'response in progress')
        if doubt is not None:
            self.drop_backend('not reusable after %s: %s' % (why, doubt))
            return
        try:
            conn.reset()
        except BackendError as exc:
            self.drop_backend('reset failed: %s' % exc.reason)
            return
        if conn.framer.buffered:
            self.drop_backend('unsolicited data after reset')
            return
        self.entry = None
        self.cache.release(entry)
        log.debug('backend cached: id=%s backend=%s', self.id, conn.id)

    def drop_backend(self, reason: str) -> None:
        entry, self.entry = self.entry, None
        self.cache.discard(entry)
        entry.conn.close(reason)

    def stop_pump(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None and not pump.dead:
            # The pump kills the session greenlet only when it ends by itself; a kill
            # from here ends it at its current wait (recv or the client lock).
            pump.kill(block=True)

    # -- client socket -----------------------------------------------------------------------

    def recv(self, deadline: float) -> bytes:
        """Read client bytes before login, by `deadline`. Raises SessionEnd at EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.send_quietly(b'* BYE Login timeout.\r\n')
            raise SessionEnd('login timeout')
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(RECV_SIZE)
        except socket.timeout:
            self.send_quietly(b'* BYE Login timeout.\r\n')
            raise SessionEnd('login timeout') from None
        except OSError as exc:
            raise SessionEnd('client read failed: %s' % (exc.strerror or exc)) from None
        finally:
            self.sock.settimeout(None)
        if not data:
            raise SessionEnd('client closed')
        return data

    def recv_client(self) -> bytes:
        """Read client bytes after login; b'' at EOF, error or idle timeout."""
        while True:
            self.sock.settimeout(max(1.0, self.last_activity + IDLE_TIMEOUT - time.monotonic()))
            try:
                data = self.sock.recv(RECV_SIZE)
            except socket.timeout:
                if time.monotonic() - self.last_activity >= IDLE_TIMEOUT:
                    self.send_local(b'* BYE Idle timeout.\r\n')
                    return b''
                continue
            except OSError:
                return b''
            self.last_activity = time.monotonic()
            return data

    def send(self, data: bytes) -> None:
        """Write one whole response in one send. Raises SessionEnd if the client is gone."""
        self.sock.settimeout(WRITE_TIMEOUT)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise SessionEnd('client write failed: %s' % (exc.strerror or exc)) from None
        finally:
            self.sock.settimeout(None)

    def send_local(self, data: bytes) -> None:
        """Write a response of the proxy's own while the pump may be writing too."""
        with self.client_lock:
            self.send_quietly(data)

    def send_quietly(self, data: bytes) -> None:
        try:
            self.send(data)
        except SessionEnd:
            pass

    def close_client(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
