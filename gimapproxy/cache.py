"""The connection cache: the only module that touches the dict and its semaphores.

Every backend connection the proxy holds is an Entry in one plain dict, keyed by the
identity it logs in as: (authzid, user), as the server compares names. An Entry is in
one State at a time, and `ConnectionCache.move` is the only code that changes it. Each
state is a list (an ordered dict of entries), as in PgBouncer: `move` takes the entry
off one and puts it on the other, and on the way keeps in step everything that depends
on the state: the slot counts (every state but closing and closed holds a slot, of the
proxy and of the user), the watcher on a cached socket, the wake-ups of logins that wait
for a reset under way or a free slot, and, on closing, the LOGOUT and the close with its
reason and log line. Nothing else counts, lists or closes.

    connecting -> logging_in -> active -> resetting -> cached -> checking -> active ...
    cached -> closing (its LOGOUT) -> closed;  any state -> closed

An Entry's semaphore is held by whoever uses it: a client session's lease, from reserve
or checkout until it is cached or closed. So two logins can never get the same
connection, and a connection being expired is never handed out.

A cached entry is handed out only to a login of the same identity whose password verifier
matches: HMAC-SHA256 under a random key made when the cache is created, compared
in constant time. A wrong password finds no match and leaves the entries alone.
An entry also carries the sticky state (`profile`) its connection has, such as ENABLEd
extensions; it is handed out only to a session that asks for exactly that state.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import time
from typing import Callable, Hashable, Optional

import gevent
from gevent.event import Event
from gevent.lock import BoundedSemaphore

__all__ = ['ConnectionCache', 'Entry', 'CacheFull', 'State', 'EMPTY_PROFILE']


EMPTY_PROFILE: frozenset = frozenset()


class State(enum.Enum):
    """Where a backend connection is in its life; see the module docstring."""
    CONNECTING = 'connecting'         # a slot is taken: TCP, TLS and the greeting
    LOGGING_IN = 'logging_in'
    ACTIVE = 'active'                 # a client session uses it
    CHECKING = 'checking'             # taken from the cache, checked before a session
    RESETTING = 'resetting'           # its session ended; the reset runs
    CACHED = 'cached'                 # clean, waiting for the same user's next login
    CLOSING = 'closing'               # out of the cache; its LOGOUT is under way
    CLOSED = 'closed'


# The states whose entries hold a slot (all but closing and closed).
_SLOTTED = frozenset(State) - {State.CLOSING, State.CLOSED}
# Before the login's password is known to be good.
_LOGGING_IN = frozenset((State.CONNECTING, State.LOGGING_IN))


class CacheFull(Exception):
    """Every slot, globally or for this user, holds an active connection."""


class Entry:
    """One backend connection and its place in the cache.

    `state` is a State (changed by `ConnectionCache.move` only) and `since` the
    monotonic time it got there. `conn` is None until the connection is made.
    `verifier` and `auth_time` are set by the login (`ConnectionCache.add`): the
    password's HMAC and when the server last checked it. `retired` is set when the
    user's password changed: the entry is not cached again. `cached_for` is how long it was
    cached before its last checkout.
    """
    __slots__ = ('key', 'verifier', 'conn', 'state', 'since', 'lock', 'auth_time',
                 'watcher', 'retired', 'settled', 'cached_for', 'closed_from')

    def __init__(self, key: Hashable, now: float) -> None:
        self.key = key
        self.verifier = b''
        self.conn = None
        self.state = State.CONNECTING
        self.since = now
        self.lock = BoundedSemaphore(1)
        self.auth_time = now
        self.watcher = None
        self.retired = False
        self.settled: Optional[Event] = None      # set when its reset ends, either way
        self.cached_for = 0.0
        self.closed_from = State.CONNECTING      # the state its closing started in

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

    def __repr__(self) -> str:
        return '<Entry %s %s>' % (getattr(self.conn, 'id', '-'), self.state.value)


class ConnectionCache:
    """Backend connections by identity, with global and per-user limits and expiry.

    Args:
        size: most connections in all that hold a slot (every state but closing).
        expiration: seconds a cached connection may wait for reuse.
        per_user: most connections of one identity.
        max_auth_age: seconds after its login that a connection may still be handed out.
        clock: the monotonic clock, injectable for tests.
        spawn: how a LOGOUT on its way out runs (gevent.spawn).

    Hooks, for the owner's numbers: `on_closed(entry, reason)` after an entry is closed,
    `on_dead(entry)` when a cached connection's socket became readable (a BYE or EOF
    from the server) and it is about to be closed for that.
    """

    def __init__(self, size: int, expiration: float, per_user: int = 10,
                 max_auth_age: float = 900.0,
                 clock: Callable[[], float] = time.monotonic,
                 spawn: Callable = gevent.spawn) -> None:
        self.size = size
        self.expiration = expiration
        self.per_user = per_user
        self.max_auth_age = max_auth_age
        self.clock = clock
        self.spawn = spawn
        self._hmac_key = os.urandom(32)
        # The entries that hold a slot, by identity.
        self._entries: dict[Hashable, list[Entry]] = {}
        # Each state's entries in the order they got there: the front of CACHED is the
        # least recently used connection, which expiry and eviction take first.
        self._states: dict[State, dict[Entry, None]] = {
            state: {} for state in State if state is not State.CLOSED}
        self._slots = 0
        self.created = 0                 # entries made, for the numbers
        # Set (and replaced) whenever a slot may have become free while a busy login
        # waits for one: a connection cached (it can be evicted), closed, or a login
        # given up. Without a waiter nothing is done on those paths.
        self._freed = Event()
        self._busy_waiters = 0
        self.on_closed: Callable[[Entry, str], None] = lambda entry, reason: None
        self.on_dead: Callable[[Entry], None] = lambda entry: None

    # -- counting ----------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Slots in use: every entry that is not closing or closed."""
        return self._slots

    @property
    def cached_count(self) -> int:
        return len(self._states[State.CACHED])

    def count(self, state: State) -> int:
        """How many entries are in `state` (closed ones are not kept)."""
        return len(self._states[state])

    def counts(self) -> dict:
        """{state name: entries in it} for every state but closed."""
        return {state.value: len(entries) for state, entries in self._states.items()}

    def user_count(self, key: Hashable) -> int:
        """Connections of one identity that hold a slot."""
        return len(self._entries.get(key, ()))

    def entries(self) -> list:
        """Every entry that is not closed, in no particular order."""
        return [entry for entries in self._states.values() for entry in entries]

    def verifier(self, secret: bytes) -> bytes:
        """HMAC-SHA256 of the length-prefixed secret under this cache's random key."""
        return hmac.new(self._hmac_key, struct.pack('>I', len(secret)) + secret,
                        hashlib.sha256).digest()

    # -- the one transition ------------------------------------------------------------

    def move(self, entry: Entry, state: State, reason: str = '') -> None:
        """Move `entry` to `state`, keeping every list and count in step (see the module
        docstring). Closing starts the connection's LOGOUT in its own greenlet, which
        closes it when done; closed closes it at once. `reason` says why, for a close.
        Moving a closed entry, or to the state it is in, does nothing."""
        old = entry.state
        if old is state or old is State.CLOSED:
            return
        now = self.clock()
        del self._states[old][entry]
        if old is State.CACHED:
            self._unwatch(entry)
            entry.cached_for = now - entry.since
        elif old is State.RESETTING:
            settled, entry.settled = entry.settled, None
            settled.set()
        entry.state, entry.since = state, now
        if state is State.CLOSING or state is State.CLOSED:
            if old in _SLOTTED:
                self._leave(entry)
                entry.closed_from = old
            if state is State.CLOSING:
                # The LOGOUT's greenlet is kept beside the entry, for close_all to wait
                # for (unless it already ran: a test's spawn may run it at once).
                closing = self._states[state]
                closing[entry] = None
                task = self.spawn(self._log_out, entry, reason)
                if entry in closing:
                    closing[entry] = task
            else:
                self._close(entry, reason)
            return
        self._states[state][entry] = None
        if state is State.CACHED:
            self._watch(entry)
            entry.lock.release()
            self._free()
        elif state is State.RESETTING:
            entry.settled = Event()

    def _leave(self, entry: Entry) -> None:
        """Give up the entry's slot and stop watching it for good."""
        self._unwatch(entry, done=True)
        siblings = self._entries[entry.key]
        siblings.remove(entry)
        if not siblings:
            del self._entries[entry.key]
        self._slots -= 1
        self._free()

    def _log_out(self, entry: Entry, reason: str) -> None:
        try:
            if entry.conn is not None:
                entry.conn.send_logout()
        finally:
            self.move(entry, State.CLOSED, reason)

    def _close(self, entry: Entry, reason: str) -> None:
        if entry.conn is not None:
            entry.conn.close(reason, entry.closed_from.value)
        self.on_closed(entry, reason)

    # -- the login path ----------------------------------------------------------------

    def checkout(self, key: Hashable, verifier: bytes, profile: frozenset = EMPTY_PROFILE,
                 enabled_by: Optional[bytes] = None) -> Optional[Entry]:
        """Take a cached connection of `key` with a matching verifier and exactly
        `profile`, whose password check is younger than max_auth_age, into checking; or
        return None. With `enabled_by`, only one whose profile was set by those command
        bytes (its connection's `replay`).

        The entry's semaphore is held by the caller until it is cached or closed.
        """
        oldest_auth = self.clock() - self.max_auth_age
        for entry in self._entries.get(key, ()):
            if (entry.state is not State.CACHED or not entry.serves(profile, enabled_by)
                    or entry.auth_time <= oldest_auth
                    or not hmac.compare_digest(entry.verifier, verifier)):
                continue
            if not entry.lock.acquire(blocking=False):
                continue
            self.move(entry, State.CHECKING)
            return entry
        return None

    def wait_returning(self, key: Hashable, verifier: bytes, profile: frozenset,
                       timeout: float, enabled_by: Optional[bytes] = None) -> bool:
        """Wait, at most `timeout` seconds, for an entry of `key` that is resetting and
        that `checkout` could then hand out (same verifier and profile). Returns False
        at once when there is none, else True once its reset ended, either way."""
        for entry in self._entries.get(key, ()):
            if (entry.state is State.RESETTING and entry.serves(profile, enabled_by)
                    and hmac.compare_digest(entry.verifier, verifier)):
                entry.settled.wait(timeout)
                return True
        return False

    def reserve(self, key: Hashable) -> Entry:
        """Take a slot for a new backend connection of `key`: a new Entry, connecting,
        whose semaphore the caller holds (set its `conn`, then `add` it once logged in,
        or move it to closed).

        Makes room by closing cached entries, least recently used first: the user's own
        when the user is at `per_user`, anybody's when the cache is at `size`.

        Raises:
            CacheFull: every slot, of the user or in all, is in use (not cached).
        """
        # Every cached entry is unlocked, so each can be evicted; what cannot be freed
        # is the ones in use.
        cached = self._states[State.CACHED]
        own = [entry for entry in cached if entry.key == key]
        if self.user_count(key) - len(own) >= self.per_user:
            raise CacheFull('user limit: %d connections in use' % self.per_user)
        if self._slots - len(cached) >= self.size:
            raise CacheFull('cache full: %d connections in use' % self.size)
        while self.user_count(key) >= self.per_user:
            self._evict(own.pop(0), 'evicted: user limit')
        while self._slots >= self.size:
            self._evict(next(iter(cached)), 'evicted: cache full')
        entry = Entry(key, self.clock())
        entry.lock.acquire()
        self._entries.setdefault(key, []).append(entry)
        self._states[State.CONNECTING][entry] = None
        self._slots += 1
        self.created += 1
        return entry

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

    def add(self, entry: Entry, verifier: bytes) -> None:
        """A reserved entry's connection logged in with the password of `verifier`: it
        is active. Entries of the same identity logged in with another password are
        retired: active ones will not be cached again; cached ones are closed."""
        entry.verifier, entry.auth_time = verifier, self.clock()
        for other in list(self._entries[entry.key]):
            if (other is entry or other.state in _LOGGING_IN
                    or hmac.compare_digest(other.verifier, verifier)):
                continue                 # (a login still under way has no password yet)
            other.retired = True
            if other.state is State.CACHED and other.lock.acquire(blocking=False):
                self.move(other, State.CLOSING, 'password changed')
        self.move(entry, State.ACTIVE)

    def release(self, entry: Entry) -> bool:
        """Cache an entry whose connection is clean (its session ended, its reset done).

        Returns False when it may not be reused (its password changed, or its password
        check is older than max_auth_age): it is closing then.
        """
        if entry.retired:
            self.move(entry, State.CLOSING, 'password changed')
            return False
        if self.clock() - entry.auth_time >= self.max_auth_age:
            self.move(entry, State.CLOSING, 'max_auth_age reached')
            return False
        self.move(entry, State.CACHED)
        return True

    # -- administration ------------------------------------------------------------------

    def flush(self, user: Optional[bytes] = None, reason: str = 'admin flush') -> int:
        """Close the cached entries of `user` (any authzid), or all of them, with a
        LOGOUT; the user's entries in use are retired so that they are not cached
        again. Returns how many were closed."""
        flushed = 0
        for key, entries in list(self._entries.items()):
            if user is not None and key[1] != user:
                continue
            for entry in list(entries):
                if entry.state is State.CACHED:
                    self._evict(entry, reason)
                    flushed += 1
                else:
                    entry.retired = True
        return flushed

    def listing(self) -> list[dict]:
        """Connections per identity, for the admin view: user, authzid, the counts of
        those in use (every state but cached) and cached, and the seconds each cached one
        has waited. No secrets."""
        now = self.clock()
        rows = []
        for key, entries in sorted(self._entries.items()):
            rows.append({
                'user': key[1].decode('utf-8', 'replace'),
                'authzid': key[0].decode('utf-8', 'replace'),
                'active': sum(1 for entry in entries if entry.state is not State.CACHED),
                'cached_idle_seconds': [round(now - entry.since, 1)
                                        for entry in entries
                                        if entry.state is State.CACHED]})
        return rows

    # -- maintenance ---------------------------------------------------------------------

    def expire_idle(self, now: Optional[float] = None) -> int:
        """Close, with a LOGOUT, every cached entry idle for at least `expiration`
        seconds, or whose password check is older than `max_auth_age`; return how many.

        A pure step over the cache with an injectable clock: the LOGOUTs run in their
        own greenlets, so that a stuck server cannot hold up the sweep.
        """
        now = self.clock() if now is None else now
        expired = []
        for entry in self._states[State.CACHED]:
            if now - entry.since >= self.expiration:
                expired.append((entry, 'expired: idle for %ds' % (now - entry.since)))
            elif now - entry.auth_time >= self.max_auth_age:
                expired.append((entry, 'expired: password checked %ds ago'
                                % (now - entry.auth_time)))
        for entry, reason in expired:
            self._evict(entry, reason)
        return len(expired)

    def close_all(self, reason: str, timeout: float) -> int:
        """Close every entry (shutdown): the cached ones with a LOGOUT, the others (their
        sessions were ended) at once; wait up to `timeout` seconds for the LOGOUTs, then
        close what is left. Returns how many cached ones were logged out."""
        cached = list(self._states[State.CACHED])
        for entry in cached:
            self._evict(entry, reason)
        for state in _SLOTTED:
            for entry in list(self._states[state]):
                self.move(entry, State.CLOSED, reason)
        closing = self._states[State.CLOSING]
        gevent.joinall([task for task in closing.values() if task is not None],
                       timeout=timeout)
        for entry in list(closing):
            self.move(entry, State.CLOSED, reason)
        return len(cached)

    def _evict(self, entry: Entry, reason: str) -> None:
        """Close a cached entry with a LOGOUT."""
        entry.lock.acquire(blocking=False)
        self.move(entry, State.CLOSING, reason)

    # -- watching cached sockets -----------------------------------------------------------

    def _watch(self, entry: Entry) -> None:
        # A cached connection must stay silent. Anything readable (an autologout BYE, a
        # server restart's EOF) means it is dead: drop it now, not at the next login.
        # The watcher is made once per entry and started each time it is cached.
        if entry.watcher is None:
            try:
                entry.watcher = gevent.get_hub().loop.io(entry.conn.sock.fileno(), 1)
            except (OSError, ValueError, AttributeError):
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
        if entry.state is State.CACHED and entry.lock.acquire(blocking=False):
            self.on_dead(entry)
            self.move(entry, State.CLOSED, 'server closed cached connection')
