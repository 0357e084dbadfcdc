"""The connection cache: the only module that touches the dict and its semaphores.

Every backend connection the proxy holds, active or cached, is an Entry in one plain dict,
keyed by the identity it is logged in as. An Entry's semaphore is held by whoever uses it:
a client session, or the expiry sweep while it logs the connection out. So two logins can
never get the same connection, and a connection being expired is never handed out.

A cached entry is handed out only to a login whose password verifier matches (R16-R18):
HMAC-SHA256 under a random key made when the cache is created, compared in constant time
(R17). A wrong password finds no match and leaves the cached entries alone (R19).
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
from gevent.lock import BoundedSemaphore

__all__ = ['ConnectionCache', 'Entry', 'CacheFull']

log = logging.getLogger('gimapproxy.cache')


class CacheFull(Exception):
    """Every slot holds an active connection; no new backend connection may be opened."""


class Entry:
    """One backend connection in the cache.

    `logout_time` is None while a session uses the connection, else the monotonic time
    its last session ended.
    """
    __slots__ = ('key', 'verifier', 'conn', 'lock', 'logout_time', 'watcher')

    def __init__(self, key: Hashable, verifier: bytes, conn) -> None:
        self.key = key
        self.verifier = verifier
        self.conn = conn
        self.lock = BoundedSemaphore(1)
        self.logout_time: Optional[float] = None
        self.watcher = None

    @property
    def cached(self) -> bool:
        return self.logout_time is not None


class ConnectionCache:
    """Backend connections by identity, with a global size limit and idle expiry.

    `size` counts active plus cached connections plus logins in progress. `expiration`
    is how long (seconds) a cached connection may wait for reuse. `on_dead(entry)` is
    called when a cached connection's socket becomes readable (a BYE or EOF from the
    server): the entry has already been removed, the callee closes the connection.
    """

    def __init__(self, size: int, expiration: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.expiration = expiration
        self.clock = clock
        self._hmac_key = os.urandom(32)
        self._entries: dict[Hashable, list[Entry]] = {}
        # Cached entries in the order their sessions ended: the front is the least
        # recently used one, which both expiry and eviction take first.
        self._idle: dict[Entry, None] = {}
        self._slots = 0
        self.on_dead: Callable[[Entry], None] = lambda entry: entry.conn.close('dead')

    # -- counting ----------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Slots in use: active, cached and reserved."""
        return self._slots

    @property
    def cached_count(self) -> int:
        return len(self._idle)

    def verifier(self, secret: bytes) -> bytes:
        """HMAC-SHA256 of the length-prefixed secret under this cache's random key (R17)."""
        return hmac.new(self._hmac_key, struct.pack('>I', len(secret)) + secret,
                        hashlib.sha256).digest()

    # -- the login path ----------------------------------------------------------------

    def checkout(self, key: Hashable, verifier: bytes) -> Optional[Entry]:
        """Take a cached connection for `key` whose verifier matches, or return None.

        The entry's semaphore is held by the caller until `release` or `discard`.
        """
        for entry in self._entries.get(key, ()):
            if not entry.cached or not hmac.compare_digest(entry.verifier, verifier):
                continue
            if not entry.lock.acquire(blocking=False):
                continue
            self._unwatch(entry)
            del self._idle[entry]
            entry.logout_time = None
            return entry
        return None

    def reserve(self) -> list[Entry]:
        """Take a slot for a new backend connection.

        Returns the cached entries evicted to make room (least recently used first); the
        caller closes their connections.

        Raises:
            CacheFull: every slot is active or reserved.
        """
        # Every entry in _idle is unlocked (whoever locks one removes it at once), so
        # each idle entry can be evicted.
        if self._slots - len(self._idle) >= self.size:
            raise CacheFull('all %d backend connections are in use' % self.size)
        victims = []
        while self._slots >= self.size:
            victims.append(self._pop_oldest_idle())
        self._slots += 1
        return victims

    def unreserve(self) -> None:
        """Give back a slot taken by `reserve` whose connection never came to be."""
        self._slots -= 1

    def add(self, key: Hashable, verifier: bytes, conn) -> Entry:
        """Register a freshly logged-in connection in a reserved slot; it is active."""
        entry = Entry(key, verifier, conn)
        entry.lock.acquire()
        self._entries.setdefault(key, []).append(entry)
        return entry

    def release(self, entry: Entry) -> None:
        """Cache an active entry whose connection is clean (its session ended)."""
        entry.logout_time = self.clock()
        self._idle[entry] = None
        self._watch(entry)
        entry.lock.release()

    def discard(self, entry: Entry) -> None:
        """Forget an entry (active or cached); the caller closes its connection."""
        self._unwatch(entry)
        self._idle.pop(entry, None)
        siblings = self._entries.get(entry.key)
        if siblings is not None and entry in siblings:
            siblings.remove(entry)
            if not siblings:
                del self._entries[entry.key]
            self._slots -= 1

    # -- maintenance ---------------------------------------------------------------------

    def expire_idle(self, now: Optional[float] = None) -> list[Entry]:
        """Remove and return every cached entry idle for at least `expiration` seconds.

        A pure step over the cache with an injectable clock; the caller logs the
        returned connections out.
        """
        now = self.clock() if now is None else now
        expired = []
        for entry in list(self._idle):
            if now - entry.logout_time < self.expiration:
                break               # _idle is in logout order: the rest are younger
            if entry.lock.acquire(blocking=False):
                self.discard(entry)
                expired.append(entry)
        return expired

    def drain(self) -> list[Entry]:
        """Remove and return every cached entry (shutdown, flush)."""
        entries = []
        for entry in list(self._idle):
            if entry.lock.acquire(blocking=False):
                self.discard(entry)
                entries.append(entry)
        return entries

    def _pop_oldest_idle(self) -> Entry:
        entry = next(iter(self._idle))
        entry.lock.acquire(blocking=False)
        self.discard(entry)
        return entry

    # -- watching cached sockets (R30) -----------------------------------------------------

    def _watch(self, entry: Entry) -> None:
        # A cached connection must stay silent. Anything readable (an autologout BYE, a
        # server restart's EOF) means it is dead: drop it now, not at the next login.
        try:
            watcher = gevent.get_hub().loop.io(entry.conn.sock.fileno(), 1)
        except (OSError, ValueError):
            return
        entry.watcher = watcher
        watcher.start(self._readable, entry)

    def _unwatch(self, entry: Entry) -> None:
        if entry.watcher is not None:
            entry.watcher.stop()
            entry.watcher.close()
            entry.watcher = None

    def _readable(self, entry: Entry) -> None:
        if entry.cached and entry.lock.acquire(blocking=False):
            self.discard(entry)
            self.on_dead(entry)
