"""The connection cache: the only module that touches the dict and its semaphores.

Every backend connection the proxy holds, active or cached, is an Entry in one plain dict,
keyed by the identity it is logged in as: (authzid, user), exact octets. An Entry's
semaphore is held by whoever uses it: a client session, or the sweep while it logs the
connection out. So two logins can never get the same connection, and a connection being
expired is never handed out.

A cached entry is handed out only to a login of the same identity whose password verifier
matches: HMAC-SHA256 under a random key made when the cache is created, compared
in constant time. A wrong password finds no match and leaves the entries alone.
An entry also carries the sticky state (`profile`) its connection has, such as ENABLEd
extensions; it is handed out only to a session that asks for exactly that state.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import time
from typing import Callable, Hashable, Optional

import gevent
from gevent.event import Event
from gevent.lock import BoundedSemaphore

__all__ = ['ConnectionCache', 'Entry', 'CacheFull', 'EMPTY_PROFILE']

log = logging.getLogger('gimapproxy.cache')

EMPTY_PROFILE: frozenset = frozenset()


class CacheFull(Exception):
    """Every slot, globally or for this user, holds an active connection."""


class Entry:
    """One backend connection in the cache.

    `logout_time` is None while a session uses the connection, else the monotonic time its
    last session ended. `auth_time` is when the server last checked the password.
    `retired` is set when the user's password changed: the entry is not cached again.
    """
    __slots__ = ('key', 'verifier', 'conn', 'lock', 'logout_time', 'auth_time', 'watcher',
                 'retired', 'returning', 'idle')

    def __init__(self, key: Hashable, verifier: bytes, conn, auth_time: float) -> None:
        self.key = key
        self.verifier = verifier
        self.conn = conn
        self.lock = BoundedSemaphore(1)
        self.logout_time: Optional[float] = None
        self.auth_time = auth_time
        self.watcher = None
        self.retired = False
        self.returning: Optional[Event] = None    # set when a reset under way ends
        self.idle = 0.0                  # seconds it was cached before its last checkout

    @property
    def cached(self) -> bool:
        return self.logout_time is not None

    @property
    def profile(self) -> frozenset:
        """The connection's sticky state (see BackendConnection.profile)."""
        return self.conn.profile

    def serves(self, profile: frozenset, enabled_by: Optional[bytes]) -> bool:
        """Whether the connection has exactly `profile`, set by the command bytes
        `enabled_by` when given."""
        conn = self.conn
        return conn.profile == profile and (enabled_by is None or (
            conn.replay is not None and conn.replay.command == enabled_by))


class ConnectionCache:
    """Backend connections by identity, with global and per-user limits and expiry.

    Args:
        size: most connections in all, active plus cached plus logins in progress.
        expiration: seconds a cached connection may wait for reuse.
        per_user: most connections of one identity.
        max_auth_age: seconds after its login that a connection may still be handed out.
        clock: the monotonic clock, injectable for tests.

    `on_dead(entry)` is called when a cached connection's socket becomes readable (a BYE
    or EOF from the server): the entry has already been removed; the callee closes it.
    """

    def __init__(self, size: int, expiration: float, per_user: int = 10,
                 max_auth_age: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.expiration = expiration
        self.per_user = per_user
        self.max_auth_age = max_auth_age
        self.clock = clock
        self._hmac_key = os.urandom(32)
        self._entries: dict[Hashable, list[Entry]] = {}
        # Logins in progress per identity, counted against the per-user limit.
        self._pending: dict[Hashable, int] = {}
        # Cached entries in the order their sessions ended: the front is the least
        # recently used one, which both expiry and eviction take first.
        self._idle: dict[Entry, None] = {}
        self._slots = 0
        # Set (and replaced) whenever a slot may have become free while a busy login
        # waits for one: a connection cached (it can be evicted), closed, or a login
        # given up. Without a waiter nothing is done on those paths.
        self._freed = Event()
        self._busy_waiters = 0
        self.on_dead: Callable[[Entry], None] = lambda entry: entry.conn.close('dead')

    # -- counting ----------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Slots in use: active, cached and reserved."""
        return self._slots

    @property
    def cached_count(self) -> int:
        return len(self._idle)

    def user_count(self, key: Hashable) -> int:
        """Connections of one identity: active, cached and logins in progress."""
        return len(self._entries.get(key, ())) + self._pending.get(key, 0)

    def verifier(self, secret: bytes) -> bytes:
        """HMAC-SHA256 of the length-prefixed secret under this cache's random key."""
        return hmac.new(self._hmac_key, struct.pack('>I', len(secret)) + secret,
                        hashlib.sha256).digest()

    # -- the login path ----------------------------------------------------------------

    def checkout(self, key: Hashable, verifier: bytes, profile: frozenset = EMPTY_PROFILE,
                 enabled_by: Optional[bytes] = None) -> Optional[Entry]:
        """Take a cached connection of `key` with a matching verifier and exactly
        `profile`, whose password check is younger than max_auth_age; or return None.
        With `enabled_by`, only one whose profile was set by those command bytes (its
        connection's `replay`).

        The entry's semaphore is held by the caller until `release` or `discard`.
        """
        oldest_auth = self.clock() - self.max_auth_age
        for entry in self._entries.get(key, ()):
            if (not entry.cached or not entry.serves(profile, enabled_by)
                    or entry.auth_time <= oldest_auth
                    or not hmac.compare_digest(entry.verifier, verifier)):
                continue
            if not entry.lock.acquire(blocking=False):
                continue
            self._unwatch(entry)
            del self._idle[entry]
            entry.idle = self.clock() - entry.logout_time
            entry.logout_time = None
            return entry
        return None

    def returning(self, entry: Entry) -> None:
        """Note that an active entry is being reset to be cached, so that
        `wait_returning` can wait for it; `release` or `discard` ends that."""
        entry.returning = Event()

    def wait_returning(self, key: Hashable, verifier: bytes, profile: frozenset,
                       timeout: float, enabled_by: Optional[bytes] = None) -> bool:
        """Wait, at most `timeout` seconds, for an entry of `key` that is being reset to be
        cached and that `checkout` could then hand out (same verifier and profile).
        Returns False at once when there is none, else True once it is back or gone."""
        for entry in self._entries.get(key, ()):
            if (entry.returning is not None and entry.serves(profile, enabled_by)
                    and hmac.compare_digest(entry.verifier, verifier)):
                entry.returning.wait(timeout)
                return True
        return False

    def _returned(self, entry: Entry) -> None:
        if entry.returning is not None:
            entry.returning.set()
            entry.returning = None

    def reserve(self, key: Hashable) -> list[Entry]:
        """Take a slot for a new backend connection of `key`.

        Returns the cached entries evicted to make room, least recently used first: the
        user's own when the user is at `per_user`, anybody's when the cache is at `size`.
        The caller closes their connections, and calls `add` or `unreserve` later.

        Raises:
            CacheFull: every slot, of the user or in all, is active or in a login.
        """
        # Every entry in _idle is unlocked (whoever locks one removes it at once), so each
        # can be evicted; what cannot be freed is the active ones and logins in progress.
        own = [entry for entry in self._idle if entry.key == key]
        if self.user_count(key) - len(own) >= self.per_user:
            raise CacheFull('user limit: %d connections in use' % self.per_user)
        if self._slots - len(self._idle) >= self.size:
            raise CacheFull('cache full: %d connections in use' % self.size)
        victims = []
        while self.user_count(key) >= self.per_user:
            victims.append(self._evict(own.pop(0)))
        while self._slots >= self.size:
            victims.append(self._evict(next(iter(self._idle))))
        self._slots += 1
        self._pending[key] = self._pending.get(key, 0) + 1
        return victims

    def unreserve(self, key: Hashable) -> None:
        """Give back a slot taken by `reserve` whose connection never came to be."""
        self._slots -= 1
        self._unpend(key)
        self._free()

    def wait_freed(self, timeout: float) -> None:
        """Wait, at most `timeout` seconds, until a slot may have become free (then try
        `checkout` and `reserve` again)."""
        self._busy_waiters += 1
        try:
            self._freed.wait(timeout)
        finally:
            self._busy_waiters -= 1

    def _free(self) -> None:
        if self._busy_waiters:
            freed, self._freed = self._freed, Event()
            freed.set()

    def add(self, key: Hashable, verifier: bytes, conn) -> tuple[Entry, list[Entry]]:
        """Register a freshly logged-in connection in a reserved slot; it is active.

        Entries of the same identity logged in with another password are retired:
        active ones will not be cached again; cached ones are removed and returned, with
        the new entry, for the caller to close.
        """
        self._unpend(key)
        entry = Entry(key, verifier, conn, self.clock())
        entry.lock.acquire()
        siblings = self._entries.setdefault(key, [])
        retired = []
        for other in list(siblings):
            if hmac.compare_digest(other.verifier, verifier):
                continue
            other.retired = True
            if other.cached and other.lock.acquire(blocking=False):
                self.discard(other)
                retired.append(other)
        siblings.append(entry)
        return entry, retired

    def release(self, entry: Entry) -> bool:
        """Cache an active entry whose connection is clean (its session ended).

        Returns False, after removing the entry, when it may not be reused (its password
        changed, or its password check is older than max_auth_age); the caller then
        closes the connection.
        """
        if entry.retired or self.clock() - entry.auth_time >= self.max_auth_age:
            self.discard(entry)
            return False
        entry.logout_time = self.clock()
        self._idle[entry] = None
        self._watch(entry)
        entry.lock.release()
        self._returned(entry)
        self._free()
        return True

    def discard(self, entry: Entry) -> None:
        """Forget an entry (active or cached); the caller closes its connection."""
        self._returned(entry)
        self._unwatch(entry, done=True)
        self._idle.pop(entry, None)
        siblings = self._entries.get(entry.key)
        if siblings is not None and entry in siblings:
            siblings.remove(entry)
            if not siblings:
                del self._entries[entry.key]
            self._slots -= 1
            self._free()

    # -- administration ------------------------------------------------------------------

    def flush(self, user: Optional[bytes] = None) -> list[Entry]:
        """Remove and return the cached entries of `user` (any authzid), or all of them;
        the user's active entries are retired so that they are not cached again.
        The caller logs the returned connections out."""
        flushed = []
        for key, entries in list(self._entries.items()):
            if user is not None and key[1] != user:
                continue
            for entry in list(entries):
                if entry.cached:
                    flushed.append(self._evict(entry))
                else:
                    entry.retired = True
        return flushed

    def listing(self) -> list[dict]:
        """Connections per identity, for the admin view: user, authzid, active and cached
        counts, and the seconds each cached one has waited. No secrets."""
        now = self.clock()
        rows = []
        for key, entries in sorted(self._entries.items()):
            rows.append({
                'user': key[1].decode('utf-8', 'replace'),
                'authzid': key[0].decode('utf-8', 'replace'),
                'active': sum(1 for entry in entries if not entry.cached),
                'cached_idle_seconds': [round(now - entry.logout_time, 1)
                                        for entry in entries if entry.cached]})
        return rows

    # -- maintenance ---------------------------------------------------------------------

    def expire_idle(self, now: Optional[float] = None) -> list[Entry]:
        """Remove and return every cached entry idle for at least `expiration` seconds,
        or whose password check is older than `max_auth_age`.

        A pure step over the cache with an injectable clock; the caller logs the returned
        connections out.
        """
        now = self.clock() if now is None else now
        expired = [entry for entry in self._idle
                   if now - entry.logout_time >= self.expiration
                   or now - entry.auth_time >= self.max_auth_age]
        for entry in expired:
            self._evict(entry)
        return expired

    def drain(self) -> list[Entry]:
        """Remove and return every cached entry (shutdown, flush)."""
        return [self._evict(entry) for entry in list(self._idle)]

    def _evict(self, entry: Entry) -> Entry:
        entry.lock.acquire(blocking=False)
        self.discard(entry)
        return entry

    def _unpend(self, key: Hashable) -> None:
        left = self._pending.get(key, 0) - 1
        if left > 0:
            self._pending[key] = left
        else:
            self._pending.pop(key, None)

    # -- watching cached sockets -----------------------------------------------------------

    def _watch(self, entry: Entry) -> None:
        # A cached connection must stay silent. Anything readable (an autologout BYE, a
        # server restart's EOF) means it is dead: drop it now, not at the next login.
        # The watcher is made once per entry and started each time it is cached.
        if entry.watcher is None:
            try:
                entry.watcher = gevent.get_hub().loop.io(entry.conn.sock.fileno(), 1)
            except (OSError, ValueError):
                return
        entry.watcher.start(self._readable, entry)

    def _unwatch(self, entry: Entry, done: bool = False) -> None:
        """Stop watching a cached entry; with `done`, for good (it leaves the cache)."""
        if entry.watcher is not None:
            entry.watcher.stop()
            if done:
                entry.watcher.close()
                entry.watcher = None

    def _readable(self, entry: Entry) -> None:
        if entry.cached and entry.lock.acquire(blocking=False):
            self.discard(entry)
            self.on_dead(entry)
