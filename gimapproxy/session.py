"""One client's whole story: greeting, login, relay, logout.

A ClientSession runs in the greenlet the server spawned for the client. Before login it
answers the client itself. LOGIN or AUTHENTICATE takes a cached backend connection
when the same user logs in with the same password, or opens a new one. After login a
Relay (gimapproxy.relay) carries the session until LOGOUT; the backend connection is then
reset and cached when it is known to be clean, and closed otherwise.
"""
from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from typing import Optional

import gevent
from gevent import socket

from .forward import id_fields, is_trusted, originating_ip
from .lease import BackendPool, Failure, Lease, LoginFailed, describe
from .logfmt import printable
from .command import BadCommand, parse_command, tag_of
from .protocol import Framer, Line, LiteralData, ProtocolError
from .relay import EndedBy, Relay
from .tracker import Tracker, new_prefix
from .sockio import recv_when_ready, send_all

__all__ = ['ClientSession', 'PRELOGIN_CAPABILITIES']

log = logging.getLogger('gimapproxy.session')

# The proxy's own pre-login list. LITERAL+ only (never with LITERAL-, RFC 7888 section 5).
PRELOGIN_CAPABILITIES = b'IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN'

# Limits before login, as Dovecot's imap-login applies them.
# (max_line_length, max_literal_size, preauth_timeout and write_timeout are settings.)
MAX_BAD_COMMANDS = 3
MAX_ID_PAIRS = 100
FORWARDED_ID_PAIRS = 25         # the proxy adds five of its own: 30 in all
RECV_SIZE = 65536

# The server's own text could tell the client more than it should; the proxy relays only
# the status and response code, with this text.
_REFUSAL_TEXT = b'Authentication failed.'


class SessionEnd(Exception):
    """Stop the session; `reason` is logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ClientSession:
    """The story of one client connection; `run()` is the greenlet's body."""

    def __init__(self, pool: BackendPool, session_id: str, sock: socket.socket, address,
                 implicit_tls: bool = False) -> None:
        self.pool = pool
        self.config = pool.config
        self.cache = pool.cache
        self.counters = pool.metrics.counters
        self.id = session_id
        # Sent to the server as x-session-ext-id and logged with every login.
        self.session_id = secrets.token_hex(6)
        self.sock = sock
        self.address = address
        self.peer = '%s:%s' % (address[0], address[1]) if address else '-'
        self.trusted = bool(address) and is_trusted(address[0], self.config.trusted_networks)
        self.origin = address[0] if address else '-'  # the address the session stands for
        self.implicit_tls = implicit_tls
        self.tls = False
        self.client_id: list = []                 # the client's own pre-login ID fields
        self.framer = Framer(self.config.max_line_length, literal8=False)
        self.bad_commands = 0
        self.user: Optional[bytes] = None
        self.key: Optional[tuple] = None          # (authzid, user) once LOGIN is parsed
        self.lease: Optional[Lease] = None

    # -- the story -----------------------------------------------------------------------

    def run(self) -> None:
        """Serve the client until it leaves; never raises."""
        reason = 'client closed'
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log.info('client connected: id=%s peer=%s tls=%s', self.id, self.peer,
                     'implicit' if self.implicit_tls else 'no')
            if self.implicit_tls:
                self.start_tls(time.monotonic() + self.config.preauth_timeout)
            self.send(b'* OK [CAPABILITY ' + self.capabilities + b'] gimapproxy ready.\r\n')
            if self.authenticate():
                reason = self.relay()
        except SessionEnd as end:
            reason = end.reason
        except gevent.GreenletExit:
            reason = 'server shutdown'
            self.send_quietly(b'* BYE Server shutting down.\r\n')
            raise
        except Exception:
            reason = 'internal error'
            log.exception('session failed: id=%s', self.id)
            self.send_quietly(b'* BYE Internal error.\r\n')
        finally:
            if self.lease is not None:
                self.lease.end(reason)       # what was neither kept nor dropped
            self.close_client()
            log.info('client closed: id=%s reason=%s', self.id, reason)

    # -- before login ------------------------------------------------------------------

    @property
    def capabilities(self) -> bytes:
        """The pre-login capability list for this session's state."""
        caps = PRELOGIN_CAPABILITIES
        if not self.tls and self.config.offer_starttls:
            caps += b' STARTTLS'
            if self.config.require_client_tls:
                caps = b' '.join(cap for cap in caps.split()
                                 if not cap.startswith(b'AUTH=')) + b' LOGINDISABLED'
        if self.config.send_reuse_code:
            caps += b' XIMAPPROXY'
        return caps

    def start_tls(self, deadline: float) -> None:
        """Run the server side of a TLS handshake with the client, by `deadline`.

        Raises:
            SessionEnd: the handshake failed or took too long.
        """
        context = self.pool.client_tls
        try:
            with gevent.Timeout(max(0.1, deadline - time.monotonic()),
                                OSError('handshake timeout')):
                self.sock = context.wrap_socket(self.sock, server_side=True)
        except (OSError, ValueError) as exc:
            raise SessionEnd('client TLS handshake failed: %s' % exc) from None
        self.tls = True

    def handle_starttls(self, command, deadline) -> bool:
        if self.tls or not self.config.offer_starttls:
            self.refuse(command.tag, b'STARTTLS is not available.')
            return False
        self.send(command.tag + b' OK Begin TLS negotiation now.\r\n')
        # RFC 3501 section 6.2.1: bytes pipelined after STARTTLS came in clear
        # text and are thrown away; the TLS session starts from nothing.
        self.framer = Framer(self.config.max_line_length, literal8=False)
        self.start_tls(deadline)
        return False

    def tls_required(self, tag: bytes) -> bool:
        """Refuse a login in clear text when TLS is required; True if refused."""
        if self.tls or not self.config.require_client_tls:
            return False
        self.send(tag + b' NO [PRIVACYREQUIRED] Plaintext authentication disallowed on '
                        b'non-secure (SSL/TLS) connections.\r\n')
        return True

    def authenticate(self) -> bool:
        """Answer pre-login commands until a login succeeds (True) or the client leaves.

        Raises:
            SessionEnd: LOGOUT, timeout, too many bad commands, oversized input.
        """
        deadline = time.monotonic() + self.config.preauth_timeout
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
            if size > 3 * (self.config.max_line_length + self.config.max_literal_size):
                self.send_quietly(b'* BYE Command too long.\r\n')
                raise SessionEnd('pre-login command too long')
            if isinstance(event, LiteralData) or event.literal is None:
                if isinstance(event, Line):
                    return b''.join(parts)
                continue
            if event.literal > self.config.max_literal_size:
                # RFC 7888 section 4: refuse a synchronizing literal with NO and no
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
        self.send(b'* CAPABILITY ' + self.capabilities + b'\r\n'
                  + command.tag + b' OK Capability completed.\r\n')
        return False

    def handle_noop(self, command, deadline) -> bool:
        self.send(command.tag + b' OK NOOP completed.\r\n')
        return False

    def handle_logout(self, command, deadline) -> bool:
        self.send(b'* BYE Logging out\r\n' + command.tag + b' OK Logout completed.\r\n')
        raise SessionEnd('logout before login')

    def handle_id(self, command, deadline) -> bool:
        # RFC 2971 section 3.3: NIL or a list of field/value pairs. A client may send no
        # more than 30 pairs of at most 30 and 1024 octets; Dovecot takes more, and so
        # does the proxy (up to MAX_ID_PAIRS, within the line limit). What it passes on
        # to the server stays within the RFC's bounds, with room for its own fields.
        args = command.args
        fields = args[0] if len(args) == 1 else False
        if fields is not None and not (
                isinstance(fields, list) and len(fields) % 2 == 0
                and len(fields) <= 2 * MAX_ID_PAIRS
                and all(isinstance(v, bytes) or v is None for v in fields)):
            self.refuse(command.tag, b'Invalid ID arguments.')
            return False
        # Kept for the proxy's own ID to the server, where they are merged in.
        self.client_id = [(key, value) for key, value in zip(fields[::2], fields[1::2])
                          if key and len(key) <= 30 and len(value or b'') <= 1024
                          ][:FORWARDED_ID_PAIRS] if fields else []
        self.send(b'* ID NIL\r\n' + command.tag + b' OK ID completed.\r\n')
        return False

    def handle_login(self, command, deadline) -> bool:
        if self.tls_required(command.tag):
            return False
        args = command.args
        if len(args) != 2 or not all(isinstance(arg, bytes) for arg in args):
            self.refuse(command.tag, b'LOGIN needs a user name and a password.')
            return False
        return self.login(command.tag, b'', args[0], args[1], 'LOGIN')

    def handle_authenticate(self, command, deadline) -> bool:
        if self.tls_required(command.tag):
            return False
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

        Returns True when logged in; False after telling the client why not.
        """
        self.origin = originating_ip(self.client_id, self.address[0], self.trusted)
        # One account, one key: the names as the server compares them (username_case;
        # Dovecot's %Lu makes USER1 user1). The server and the log get the client's
        # spelling. The client's address is part of the key only where the server's
        # policy depends on it.
        fold = self.config.fold_username
        identity = (fold(authzid), fold(user))
        self.key = identity + (self.origin,) if self.config.cache_per_client_ip \
            else identity
        started = time.monotonic()
        # Only a new server login sends the ID fields: worked out then, not on every login.
        fields = (lambda: id_fields(self.client_id, self.address, self.sock.getsockname()[:2],
                                    self.session_id, self.trusted)) \
            if self.config.forward_client_ip else None
        try:
            self.lease = Lease.acquire(self.pool, self.id, self.key,
                                       self.cache.verifier(password),
                                       (authzid, user, password), fields)
        except LoginFailed as failed:
            self.counters['login_failed'] += 1
            self.pool.metrics.observe_login('failed', time.monotonic() - started)
            self.pool.metrics.login_failed(failed.kind.value, failed.reason)
            self.refuse_login(tag, user, failed)
            return False
        self.user = user
        conn, result = self.lease.conn, self.lease.result
        self.counters['login_' + result] += 1
        self.pool.metrics.observe_login(result, time.monotonic() - started)
        reuse = b''
        if result == 'reused' and self.config.send_reuse_code:
            # The connection has exactly the state its last session left: none.
            reuse = b'* OK [XPROXYREUSE] IMAP connection reused by gimapproxy\r\n'
        self.send(reuse + tag + b' OK [CAPABILITY ' + conn.client_capabilities() + b'] '
                  + conn.login_text + b'\r\n')
        log.info('login: id=%s user=%s method=%s backend=%s server=%s:%d result=%s peer=%s '
                 'origin=%s session=%s tls=%s profile=%s time=%.1fms', self.id,
                 printable(user), method, conn.id, conn.address[0], conn.address[1], result,
                 self.peer, printable(self.origin), self.session_id,
                 'yes' if self.tls else 'no', describe(conn),
                 (time.monotonic() - started) * 1000)
        return True

    def refuse_login(self, tag: bytes, user: bytes, failed: LoginFailed) -> None:
        """Word a failed login for the client and the log (with the client's address,
        for fail2ban)."""
        if failed.kind is Failure.REFUSED:
            response = failed.response
            code = b'[' + response.code + b'] ' if response.code else b''
            log.info('login failed: id=%s user=%s backend=%s status=%s code=%s peer=%s',
                     self.id, printable(user), failed.backend, printable(response.status),
                     printable(response.code), self.peer)
            # The server's own text could tell the client more than it should.
            self.send(tag + b' ' + response.status + b' ' + code + _REFUSAL_TEXT + b'\r\n')
            return
        log.warning('login failed: id=%s user=%s reason=%s peer=%s', self.id,
                    printable(user), failed.reason, self.peer)
        if failed.kind is Failure.BUSY:
            self.send(tag + b' NO [UNAVAILABLE] Too many connections, try again later.\r\n')
        else:
            self.send(tag + b' NO [UNAVAILABLE] Server unavailable, try again later.\r\n')

    # -- after login ---------------------------------------------------------------------

    def relay(self) -> str:
        """Relay until the session ends, then hand the backend connection to its fate:
        kept (reset and cached) when clean, closed otherwise. Returns why it ended."""
        conn = self.lease.conn
        tracker = Tracker(conn.profile, conn.replay, new_prefix())
        tracker.feed(self.framer.take_buffered())   # commands pipelined after the login
        fold = self.config.fold_username
        traced = any(fold(name.encode('utf-8')) == self.key[1]
                     for name in self.config.trace_users)
        end = Relay(self.id, self.sock, self.lease, tracker, self.config,
                    self.counters, self.user, trace=traced).run()
        # The lease stays the session's until it is kept or dropped: run() ends it on
        # any other way out (an error, or a GreenletExit in the reset).
        lease = self.lease
        if end.side is EndedBy.LOGOUT:
            log.info('logout: id=%s user=%s backend=%s profile=%s', self.id,
                     printable(self.user), lease.conn.id, describe(lease.conn))
            lease.keep('logout', tracker, lambda: self.farewell(end.tag))
        elif end.side is EndedBy.CLIENT:
            self.close_client()
            lease.keep(end.reason, tracker)
        elif tracker.unclean is not None:
            lease.drop_unclean(end.reason, tracker.unclean)
        else:
            lease.drop(end.reason)
        return end.reason

    def farewell(self, tag: bytes) -> None:
        """Answer LOGOUT (RFC 3501 section 6.1.3) and let the client go."""
        self.send_quietly(b'* BYE Logging out\r\n' + tag + b' OK Logout completed.\r\n')
        self.close_client()

    # -- client socket -----------------------------------------------------------------------

    def recv(self, deadline: float) -> bytes:
        """Read client bytes before login, by `deadline`. Raises SessionEnd at EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.send_quietly(b'* BYE Login timeout.\r\n')
            raise SessionEnd('login timeout')
        self.sock.settimeout(remaining)
        try:
            data = recv_when_ready(self.sock, RECV_SIZE)
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

    def send(self, data: bytes) -> None:
        """Write one whole response in one send. Raises SessionEnd if the client is gone."""
        try:
            send_all(self.sock, data, self.config.write_timeout)
        except OSError as exc:
            raise SessionEnd('client write failed: %s' % (exc.strerror or exc)) from None

    def send_quietly(self, data: bytes) -> None:
        try:
            self.send(data)
        except SessionEnd:
            pass

    def close_client(self) -> None:
        """Close the client socket; safe to call again."""
        try:
            self.sock.close()
        except OSError:
            pass
