"""The lease: one owner for a backend connection's fate, from the login to its close.

A session asks `Lease.acquire` for a logged-in server connection: a cached one of the
same identity, password and profile, one whose reset is under way (waited for, bounded),
or a new login on the user's server. The lease then owns it until `keep` (reset and
cache) or `drop` (close with a reason); whatever it holds when it ends otherwise (an
exception, a GreenletExit at any step) is dropped by `end`, which its owner calls on
every path (it is also a context manager). It never writes to the client: it returns,
or raises `LoginFailed` with a Failure, and the session words the reply.

Sessions reach the rest of the proxy through a BackendPool, and nothing else: the cache,
the server choice, the TLS context for servers, the connection factory, the settings and
the numbers. Every state change of a connection is the cache's `move`
(gimapproxy.cache); the lease says which, and why.
"""
from __future__ import annotations

import enum
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import gevent

from .backend import (BackendConnection, BackendDesync, BackendError, BackendUnavailable,
                      LoginRefused)
from .cache import CacheFull, ConnectionCache, Entry, State
from .logfmt import printable
from .login import identify, login as login_as
from .protocol import Response
from .tracker import CONDSTORE, Tracker

if TYPE_CHECKING:                    # for the annotations only: no import cycle
    import ssl

    from .config import ProxyConfig
    from .stats import Stats
    from .tls import BackendTLS

__all__ = ['Lease', 'LoginFailed', 'Failure', 'ServerChoice', 'BackendPool']

log = logging.getLogger('gimapproxy.lease')

# A client that leaves mid-command: how much of the rest the proxy reads and drops to keep
# the connection. A 10 MB FETCH fits; a bigger one costs a new login instead.
FINISH_BUDGET = 32 * 1024 * 1024
FINISH_TIMEOUT = 10.0


class Failure(enum.Enum):
    """Why a login got no connection: the server said no, no server answered, or every
    slot is in use."""
    REFUSED = 'refused'
    UNAVAILABLE = 'unavailable'
    BUSY = 'busy'


class LoginFailed(Exception):
    """No connection for this login. `kind` is a Failure: REFUSED (`response` is the
    server's tagged reply, `backend` the connection's id), UNAVAILABLE or BUSY.
    `reason` is for the log."""

    def __init__(self, kind: Failure, reason: str, response: Optional[Response] = None,
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


@dataclass
class BackendPool:
    """What a session may use of the proxy, and nothing else. The server keeps one and
    replaces `config` and `backend_tls` on a reload; a session reads them when it
    starts."""
    config: ProxyConfig
    cache: ConnectionCache
    choice: ServerChoice
    metrics: Stats
    new_backend: Callable[[tuple], BackendConnection]
    backend_tls: Optional[BackendTLS] = None         # when server_tls is on
    client_tls: Optional[ssl.SSLContext] = None      # when clients get TLS


class Lease:
    """A session's hold on one logged-in backend connection.

    Attributes:
        entry: the cache Entry (its semaphore is held while the lease holds it); None
            once it was kept or dropped.
        conn: the entry's BackendConnection.
        result: 'reused' or 'new'.
    """

    def __init__(self, pool: BackendPool, session_id: str, entry: Entry,
                 result: str) -> None:
        self.pool = pool
        self.id = session_id
        self.entry: Optional[Entry] = entry
        self.spare: Optional[Entry] = None      # checked out for a switch, not yet used
        self.result = result

    @property
    def conn(self) -> BackendConnection:
        return self.entry.conn

    def __enter__(self) -> 'Lease':
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        self.end('session ended: %s' % (kind.__name__ if kind else 'no verdict'))

    def end(self, reason: str) -> None:
        """Drop, with `reason`, whatever connection the lease still holds: one neither
        kept nor dropped (the session failed or was killed on the way)."""
        for entry in (self.spare, self.entry):
            if entry is not None:
                self.pool.cache.move(entry, State.CLOSED, reason)
        self.entry = self.spare = None

    # -- getting one ----------------------------------------------------------------------

    @classmethod
    def acquire(cls, pool: BackendPool, session_id: str, key, verifier: bytes,
                credentials: tuple, id_fields: Optional[Callable[[], list]] = None
                ) -> 'Lease':
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
            entry = checkout(pool, key, verifier, frozenset())
            if entry is not None:
                return cls(pool, session_id, entry, 'reused')
            try:
                return cls(pool, session_id, login(pool, session_id, key, verifier,
                                                   credentials, id_fields), 'new')
            except LoginFailed as failed:
                if failed.kind is not Failure.BUSY:
                    raise
                now = time.monotonic()
                deadline = deadline or now + pool.config.busy_timeout
                if now >= deadline:
                    failed.reason += ' (waited %gs)' % pool.config.busy_timeout
                    raise
                pool.cache.wait_freed(deadline - now)

    def checkout(self, profile: frozenset,
                 enabled_by: Optional[bytes] = None) -> Optional[Entry]:
        """A cached connection of this lease's identity and password with `profile`
        (set by the command bytes `enabled_by`, when given), held as the lease's spare
        until `switch`."""
        self.spare = checkout(self.pool, self.entry.key, self.entry.verifier, profile,
                              enabled_by)
        return self.spare

    def switch(self, unclean: Optional[str]) -> None:
        """Hold the spare (from `checkout`) instead. Nothing was sent on the current
        connection, which goes back to the cache unless `unclean` says why not."""
        old, self.entry, self.spare = self.entry, self.spare, None
        if unclean is not None:
            self.pool.metrics.not_reusable(unclean)
            self.pool.cache.move(old, State.CLOSED, 'not reusable after switch: %s' % unclean)
        else:
            release(self.pool, old, self.id)

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
        reason = tracker.leftover()
        if reason is None and (tracker.inflight or not conn.framer.at_boundary):
            try:
                if tracker.idling is not None:
                    conn.send(b'DONE\r\n')           # RFC 2177 section 3
                finish(conn, set(tracker.inflight))
            except BackendError as exc:
                reason = 'could not finish the commands in flight: %s' % exc.reason
        if reason is not None:
            self.drop_unclean(why, reason)
            _call(farewell)
            return
        conn.profile, conn.replay = tracker.profile, tracker.replay
        if tracker.condstore:
            # Turned on without ENABLE (or so it seemed): the reset makes sure of it.
            conn.profile, conn.replay = conn.profile | CONDSTORE, None
        self.pool.cache.move(entry, State.RESETTING)
        timeout = self.pool.config.reset_timeout
        try:
            sent = conn.start_reset(timeout, tracker.condstore)
            if farewell is not None:
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
        self.entry = None
        release(self.pool, entry, self.id)

    def drop_unclean(self, why: str, unclean: str) -> None:
        """Close the connection instead of caching it: after `why` (how the session
        ended), it is not clean for the reason `unclean`, which is also counted."""
        self.pool.metrics.not_reusable(unclean)
        self.drop('not reusable after %s: %s' % (why, unclean))

    def drop(self, reason: str) -> None:
        """Close the connection, logging `reason`."""
        entry, self.entry = self.entry, None
        self.pool.cache.move(entry, State.CLOSED, reason)


def finish(conn: BackendConnection, tags: set) -> None:
    """Read and drop responses until every tag in `tags` has its tagged reply and no
    response is half read: the rest of what a departed client started.

    Raises:
        BackendError: more than FINISH_BUDGET bytes or FINISH_TIMEOUT seconds, a
            continuation request (the server wants input nobody will send), a BYE, an
            untagged BAD, a foreign tag, EOF.
    """
    with gevent.Timeout(FINISH_TIMEOUT, BackendUnavailable('finish timeout')):
        budget = conn.finish_response(FINISH_BUDGET)
        if not tags:
            return
        for response, _ in conn.responses(budget):
            if response.kind == 'tagged':
                if response.tag not in tags:
                    raise BackendDesync('reply to a tag not in flight')
                tags.discard(response.tag)
                if not tags:
                    return
            elif response.kind == 'continuation':
                raise BackendError('server waits for input')
            elif response.status in (b'BYE', b'BAD'):
                raise BackendError('server said %s' % response.status.decode())


def _call(farewell: Optional[Callable[[], None]]) -> None:
    if farewell is not None:
        farewell()


def checkout(pool: BackendPool, key, verifier: bytes, profile: frozenset,
             enabled_by: Optional[bytes] = None) -> Optional[Entry]:
    """A cached connection of `key` with a matching verifier and exactly `profile` (set
    by `enabled_by`, when given), made active; or None. Waits (reset_timeout at most)
    for one whose reset is under way. One cached for server_check_delay or longer is
    checked first; one that fails the check is closed, and another tried."""
    cache, config, waited = pool.cache, pool.config, False
    while True:
        entry = cache.checkout(key, verifier, profile, enabled_by)
        if entry is None and not waited:
            waited = cache.wait_returning(key, verifier, profile, config.reset_timeout,
                                          enabled_by)
            if waited:
                continue
        if entry is None:
            return None
        try:
            fault = check(entry, config)
        except BaseException:
            cache.move(entry, State.CLOSED, 'check interrupted')
            raise
        if fault is not None:
            cache.move(entry, State.CLOSED, fault)
            continue
        cache.move(entry, State.ACTIVE)
        return entry


def check(entry: Entry, config) -> Optional[str]:
    """Why a connection just taken from the cache may not serve a session, or None."""
    conn = entry.conn
    if conn.has_input():
        # Not one stale byte may reach the new client: the server spoke while the
        # connection sat in the cache (a BYE, most likely) and the watcher has not run.
        return 'server spoke while cached'
    if entry.cached_for >= config.server_check_delay:
        # A firewall or NAT between here and the server may have forgotten it without a
        # word: better a NOOP now than a client that hangs.
        try:
            conn.check(config.server_check_timeout)
        except BackendError as exc:
            return 'server check failed: %s' % exc.reason
    return None


def login(pool: BackendPool, session_id: str, key, verifier: bytes, credentials: tuple,
          id_fields: Optional[Callable[[], list]]) -> Entry:
    """Connect and log in a new backend connection in a new cache slot.

    Raises:
        LoginFailed: busy (no slot), unavailable (no server), refused (credentials).
    """
    cache, config = pool.cache, pool.config
    try:
        entry = cache.reserve(key)
    except CacheFull as exc:
        raise LoginFailed(Failure.BUSY, str(exc)) from None
    authzid, user, password = credentials
    try:
        entry.conn = connect(pool, session_id, key[1])  # the name as the server compares it
        cache.move(entry, State.LOGGING_IN)
        if id_fields is not None:
            identify(entry.conn, id_fields(), config.login_timeout)
        login_as(entry.conn, authzid, user, password, config.login_timeout)
    except LoginRefused as refused:
        cache.move(entry, State.CLOSED, 'login refused')
        raise LoginFailed(Failure.REFUSED, 'server refused the login', refused.response,
                          entry.conn.id) from None
    except BackendError as exc:
        cache.move(entry, State.CLOSED, exc.reason)
        raise LoginFailed(Failure.UNAVAILABLE, exc.reason) from None
    except BaseException:
        cache.move(entry, State.CLOSED, 'login interrupted')
        raise
    # The server accepted this password: the user's connections of another one are
    # retired (the old password may be wrong now).
    cache.add(entry, verifier)
    return entry


def connect(pool: BackendPool, session_id: str, user: bytes) -> BackendConnection:
    """Connect to the first server that answers, in the user's order. A server that
    does not answer has its connection closed here, with the reason.

    Raises:
        BackendError: none answered; the last server's reason.
    """
    failure = None
    config = pool.config
    keepalive = ((config.tcp_keepidle, config.tcp_keepintvl, config.tcp_keepcnt)
                 if config.send_tcp_keepalives else None)
    for address in pool.choice.order(user):
        conn = pool.new_backend(address)
        try:
            conn.connect(config.connect_timeout, pool.backend_tls, keepalive)
        except BackendError as exc:
            conn.close(exc.reason)
            log.warning('server failed: id=%s server=%s:%d reason=%s', session_id,
                        address[0], address[1], exc.reason)
            pool.choice.failed(address)
            failure = exc
            continue
        except BaseException:
            conn.close('connect interrupted')
            raise
        pool.choice.ok(address)
        return conn
    raise failure


def release(pool: BackendPool, entry: Entry, session_id: str) -> None:
    """Put a clean connection back in the cache; the cache logs it out instead when it
    may not be reused any more (its password changed, or its password check is older
    than max_auth_age)."""
    if pool.cache.release(entry):
        log.debug('backend cached: id=%s backend=%s', session_id, entry.conn.id)


def describe(conn: BackendConnection) -> str:
    """The connection's profile for the log: its ENABLEd extensions, or 'plain'."""
    return printable(b','.join(sorted(conn.profile))) if conn.profile else 'plain'
