"""The lease: one owner for a backend connection's fate, from the login to its close.

A session asks `Lease.acquire` for a logged-in server connection: a cached one of the
same identity, password and profile, one whose reset is under way (waited for, bounded),
or a new login on the user's server. The lease then owns it until `keep` (reset and
cache) or `drop` (close with a reason). It never writes to the client: it returns, or
raises `LoginFailed` with a kind, and the session words the reply.

The lease is the only code that moves a connection through its states (backend.State):

    connecting -> logging_in -> active -> resetting -> cached -> active -> ... -> closed

and every close, wherever it happens, goes through BackendConnection.close, which logs
the state it ended in and the reason, and tells the server's registry.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable, Optional

import gevent

from .backend import (BackendConnection, BackendDesync, BackendError, BackendUnavailable,
                      LoginRefused, State)
from .cache import CacheFull, Entry
from .logfmt import printable
from .login import identify, login as login_as
from .protocol import LiteralData, ProtocolError, Response, parse_response
from .tracker import CONDSTORE, Tracker

__all__ = ['Lease', 'LoginFailed', 'ServerChoice']

log = logging.getLogger('gimapproxy.lease')

# A client that leaves mid-command: how much of the rest the proxy reads and drops to keep
# the connection. A 10 MB FETCH fits; a bigger one costs a new login instead.
FINISH_BUDGET = 32 * 1024 * 1024
FINISH_TIMEOUT = 10.0


class LoginFailed(Exception):
    """No connection for this login. `kind` is 'refused' (the server said no; `response`
    is its tagged reply, `backend` the connection's id), 'unavailable' (no server
    answered) or 'busy' (every slot is in use). `reason` is for the log."""

    def __init__(self, kind: str, reason: str, response: Optional[Response] = None,
                 backend: str = '-') -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.response = response
        self.backend = backend           # the connection that was refused, for the log


class ServerChoice:
    """Which server a user's new connection goes to: rendezvous hashing gives each user
    a stable order, so a user's sessions stay on one server while it is up; a server
    that failed comes last until its retry time (1, 2, 4 ... up to 60 seconds)."""

    def __init__(self, servers: list) -> None:
        self.servers = servers
        self._down: dict[tuple, tuple] = {}    # server: (failures in a row, retry time)

    def order(self, user: bytes) -> list:
        def score(server):
            return hashlib.sha256(user + b'\0' + ('%s:%d' % server).encode()).digest()
        ordered = sorted(self.servers, key=score, reverse=True)
        now = time.monotonic()
        up = [server for server in ordered if self._down.get(server, (0, 0))[1] <= now]
        return up + [server for server in ordered if server not in up]

    def failed(self, server: tuple) -> None:
        failures = self._down.get(server, (0, 0))[0] + 1
        self._down[server] = (failures, time.monotonic() + min(60, 2 ** (failures - 1)))

    def ok(self, server: tuple) -> None:
        if self._down.pop(server, None) is not None:
            log.info('server back: server=%s:%d', *server)


class Lease:
    """A session's hold on one logged-in backend connection.

    Attributes:
        entry: the cache Entry (its semaphore is held while the lease holds it).
        conn: the BackendConnection.
        result: 'reused' or 'new'.
    """

    def __init__(self, server, session_id: str, entry: Entry, result: str) -> None:
        self.server = server
        self.id = session_id
        self.entry = entry
        self.result = result

    @property
    def conn(self) -> BackendConnection:
        return self.entry.conn

    # -- getting one ----------------------------------------------------------------------

    @classmethod
    def acquire(cls, server, session_id: str, key, verifier: bytes, credentials: tuple,
                id_fields: Optional[Callable[[], list]] = None) -> 'Lease':
        """A logged-in connection for `key` (authzid, user[, origin]) with an empty
        profile: a cached one whose password verifier matches, or a new login with
        `credentials` (authzid, user, password), sending the ID fields that `id_fields`
        returns first, if given (called only for a new login).

        When the user (max_connections_per_user) or the proxy (cache_size) has no place
        free, it waits up to busy_timeout for one: a connection being reset or closed,
        or another login given up, frees one; a session that left without LOGOUT is
        still being finished, say, as the server still counts its session too.

        Raises:
            LoginFailed: refused, unavailable, or busy after busy_timeout.
        """
        deadline = None
        while True:
            entry = checkout(server, key, verifier, frozenset())
            if entry is not None:
                return cls(server, session_id, entry, 'reused')
            try:
                return cls(server, session_id, login(server, session_id, key, verifier,
                                                     credentials, id_fields), 'new')
            except LoginFailed as failed:
                if failed.kind != 'busy':
                    raise
                now = time.monotonic()
                deadline = deadline or now + server.config.busy_timeout
                if now >= deadline:
                    failed.reason += ' (waited %gs)' % server.config.busy_timeout
                    raise
                server.cache.wait_freed(deadline - now)

    def checkout(self, profile: frozenset,
                 enabled_by: Optional[bytes] = None) -> Optional[Entry]:
        """A cached connection of this lease's identity and password with `profile`
        (set by the command bytes `enabled_by`, when given)."""
        return checkout(self.server, self.entry.key, self.entry.verifier, profile,
                        enabled_by)

    def switch(self, entry: Entry, unclean: Optional[str]) -> None:
        """Hold `entry` (from `checkout`) instead. Nothing was sent on the current
        connection, which goes back to the cache unless `unclean` says why not."""
        old, self.entry = self.entry, entry
        if unclean is not None:
            self.server.metrics.not_reusable(unclean)
            self.server.cache.discard(old)
            old.conn.close('not reusable after switch: %s' % unclean)
        else:
            release(self.server, old, self.id)

    # -- letting go -----------------------------------------------------------------------

    def keep(self, why: str, tracker: Tracker,
             farewell: Optional[Callable[[], None]] = None) -> None:
        """The session ended (`why`): finish what its client left in flight, reset the
        connection and cache it; or close it when `tracker` says it is not clean, or the
        finish or the reset fails. `farewell` (LOGOUT's answer) is called as soon as the
        reset commands are sent, or once the connection is closed instead: the client
        does not wait for the reset, and the same user's next login waits for it in
        `checkout` rather than log in anew."""
        conn, entry = self.conn, self.entry
        reason = tracker.settle()
        if reason is None and (tracker.inflight or not conn.framer.at_boundary):
            try:
                if tracker.idle is not None:
                    conn.send(b'DONE\r\n')           # RFC 2177 section 3
                finish(conn, set(tracker.inflight))
            except BackendError as exc:
                reason = 'could not finish the commands in flight: %s' % exc.reason
        if reason is not None:
            self.drop_unclean(why, reason)
            _call(farewell)
            return
        conn.profile, conn.replay = tracker.profile, tracker.replay
        implicit = tracker.condstore and not CONDSTORE <= conn.profile
        if implicit:
            # Turned on without ENABLE (or so it seemed): the reset makes sure of it.
            conn.profile, conn.replay = conn.profile | CONDSTORE, None
        conn.state = State.RESETTING
        timeout = self.server.config.reset_timeout
        try:
            sent = conn.start_reset(timeout, implicit)
            if farewell is not None:
                self.server.cache.returning(entry)
                farewell()
                farewell = None
            conn.finish_reset(sent, timeout)
        except BackendError as exc:
            self.drop('reset failed: %s' % exc.reason)
            _call(farewell)
            return
        if conn.framer.buffered:
            self.drop('unsolicited data after reset')
            return
        release(self.server, entry, self.id)

    def drop_unclean(self, why: str, unclean: str) -> None:
        """Close the connection instead of caching it: after `why` (how the session
        ended), it is not clean for the reason `unclean`, which is also counted."""
        self.server.metrics.not_reusable(unclean)
        self.drop('not reusable after %s: %s' % (why, unclean))

    def drop(self, reason: str) -> None:
        """Forget and close the connection, logging `reason`."""
        self.server.cache.discard(self.entry)
        self.conn.close(reason)


def finish(conn: BackendConnection, tags: set) -> None:
    """Read and drop responses until every tag in `tags` has its tagged reply and no
    response is half read: the rest of what a departed client started.

    Raises:
        BackendError: more than FINISH_BUDGET bytes or FINISH_TIMEOUT seconds, a
            continuation request (the server wants input nobody will send), a BYE, an
            untagged BAD, a foreign tag, EOF.
    """
    budget = FINISH_BUDGET
    with gevent.Timeout(FINISH_TIMEOUT, BackendUnavailable('finish timeout')):
        while tags or not conn.framer.at_boundary:
            event = conn.read_event()
            budget -= len(event.data)
            if budget < 0:
                raise BackendError('more than %d bytes to finish' % FINISH_BUDGET)
            if isinstance(event, LiteralData) or not event.first:
                continue
            try:
                response = parse_response(event.data)
            except ProtocolError:
                raise BackendDesync('malformed response') from None
            if response.kind == 'tagged':
                if response.tag not in tags:
                    raise BackendDesync('reply to a tag not in flight')
                tags.discard(response.tag)
            elif response.kind == 'continuation':
                raise BackendError('server waits for input')
            elif response.status in (b'BYE', b'BAD'):
                raise BackendError('server said %s' % response.status.decode())


def _call(farewell: Optional[Callable[[], None]]) -> None:
    if farewell is not None:
        farewell()


def checkout(server, key, verifier: bytes, profile: frozenset,
             enabled_by: Optional[bytes] = None) -> Optional[Entry]:
    """A cached connection of `key` with a matching verifier and exactly `profile` (set
    by `enabled_by`, when given), made active; or None. Waits (reset_timeout at most)
    for one whose reset is under way."""
    cache, waited = server.cache, False
    while True:
        entry = cache.checkout(key, verifier, profile, enabled_by)
        if entry is None and not waited:
            waited = cache.wait_returning(key, verifier, profile, server.config.reset_timeout,
                                          enabled_by)
            if waited:
                continue
        if entry is None:
            return None
        conn = entry.conn
        if conn.has_input():
            # Not one stale byte may reach the new client: the server spoke while the
            # connection sat in the cache (a BYE, most likely) and the watcher has not run.
            cache.discard(entry)
            conn.close('server spoke while cached')
            continue
        if entry.idle >= server.config.server_check_delay:
            # A firewall or NAT between here and the server may have forgotten it
            # without a word: better a NOOP now than a client that hangs.
            try:
                conn.check(server.config.server_check_timeout)
            except BackendError as exc:
                cache.discard(entry)
                conn.close('server check failed: %s' % exc.reason)
                continue
        conn.state = State.ACTIVE
        return entry


def login(server, session_id: str, key, verifier: bytes, credentials: tuple,
          id_fields: Optional[Callable[[], list]]) -> Entry:
    """Connect and log in a new backend connection in a reserved cache slot.

    Raises:
        LoginFailed: busy (no slot), unavailable (no server), refused (credentials).
    """
    cache, config = server.cache, server.config
    try:
        victims = cache.reserve(key)
    except CacheFull as exc:
        raise LoginFailed('busy', str(exc)) from None
    for victim in victims:
        gevent.spawn(victim.conn.logout, 'evicted: %s' % (
            'user limit' if victim.key == key else 'cache full'))
    authzid, user, password = credentials
    conn = None
    try:
        conn = connect(server, session_id, key[1])    # the name as the server compares it
        conn.state = State.LOGGING_IN
        if id_fields is not None:
            identify(conn, id_fields(), config.login_timeout)
        login_as(conn, authzid, user, password, config.login_timeout)
    except LoginRefused as refused:
        cache.unreserve(key)
        conn.close('login refused')
        raise LoginFailed('refused', 'server refused the login', refused.response,
                          conn.id) from None
    except BackendError as exc:
        cache.unreserve(key)
        if conn is not None:
            conn.close(exc.reason)
        raise LoginFailed('unavailable', exc.reason) from None
    except BaseException:
        cache.unreserve(key)
        if conn is not None:
            conn.close('login interrupted')
        raise
    conn.state = State.ACTIVE
    entry, retired = cache.add(key, verifier, conn)
    for old in retired:
        # The server accepted another password, so the old one may be wrong now.
        gevent.spawn(old.conn.logout, 'password changed')
    return entry


def connect(server, session_id: str, user: bytes) -> BackendConnection:
    """Connect to the first server that answers, in the user's order.

    Raises:
        BackendError: none answered; the last server's reason.
    """
    failure = None
    for address in server.choice.order(user):
        conn = server.new_backend(address)
        config = server.config
        keepalive = ((config.tcp_keepidle, config.tcp_keepintvl, config.tcp_keepcnt)
                     if config.send_tcp_keepalives else None)
        try:
            conn.connect(config.connect_timeout, server.backend_tls, keepalive)
        except BackendError as exc:
            conn.close(exc.reason)
            log.warning('server failed: id=%s server=%s:%d reason=%s', session_id,
                        address[0], address[1], exc.reason)
            server.choice.failed(address)
            failure = exc
            continue
        except BaseException:
            conn.close('connect interrupted')
            raise
        server.choice.ok(address)
        return conn
    raise failure


def release(server, entry: Entry, session_id: str) -> None:
    """Put a clean connection back in the cache, or log it out when it may not be reused
    any more (its password changed, or its password check is older than max_auth_age)."""
    entry.conn.state = State.CACHED
    if server.cache.release(entry):
        log.debug('backend cached: id=%s backend=%s', session_id, entry.conn.id)
    else:
        entry.conn.logout('password changed' if entry.retired else 'max_auth_age reached')


def describe(conn: BackendConnection) -> str:
    """The connection's profile for the log: its ENABLEd extensions, or 'plain'."""
    return printable(b','.join(sorted(conn.profile))) if conn.profile else 'plain'
