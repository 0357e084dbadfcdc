"""The cache as a plain object: a fake clock, fake connections, no network.

A LOGOUT on the way out runs at once here (`spawn` calls it), so a connection closing is
closed by the time the call returns."""
import socket

import gevent
import pytest

from gimapproxy.cache import CacheFull, ConnectionCache, State
from tests.conftest import wait_until


class FakeConn:
    def __init__(self, name):
        self.id = name
        self.sock, self.peer = socket.socketpair()
        self.closed = None
        self.logged_out = False
        self.profile = frozenset()
        self.replay = None

    def send_logout(self):
        self.logged_out = True

    def close(self, reason, state):
        self.closed = (reason, state)
        self.sock.close()
        self.peer.close()


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def make(clock, size=5, expiration=60, **kw):
    return ConnectionCache(size, expiration, clock=clock, spawn=lambda f, *a: f(*a), **kw)


def login(cache, key, password, name):
    """What a session does on a miss: reserve, connect (faked), add."""
    entry = cache.reserve(key)
    entry.conn = FakeConn(name)
    cache.add(entry, cache.verifier(password))
    return entry


def books(cache):
    """Every entry is in its state's list, and the slots are the entries that hold one."""
    live = cache.entries()
    assert cache.total == sum(1 for entry in live if entry.state is not State.CLOSING)
    assert sum(cache.counts().values()) == len(live)


def test_verifier_is_keyed_and_length_prefixed():
    one, two = ConnectionCache(5, 60), ConnectionCache(5, 60)
    assert one.verifier(b'pw') == one.verifier(b'pw')
    assert one.verifier(b'pw') != two.verifier(b'pw')      # random key per cache
    assert one.verifier(b'pw') != one.verifier(b'pw\0')
    assert len(one.verifier(b'')) == 32


def test_checkout_needs_key_and_verifier(clock):
    cache = make(clock)
    entry = login(cache, ('', b'alice'), b'pw', 'a')
    assert cache.checkout(('', b'alice'), cache.verifier(b'pw')) is None   # still active
    cache.release(entry)
    assert cache.checkout(('', b'alice'), cache.verifier(b'wrong')) is None
    assert cache.checkout(('', b'Alice'), cache.verifier(b'pw')) is None   # the key's octets
    assert cache.checkout(('x', b'alice'), cache.verifier(b'pw')) is None  # authzid counts
    # The wrong password left the entry alone.
    assert cache.checkout(('', b'alice'), cache.verifier(b'pw')) is entry
    assert entry.state is State.CHECKING and entry.lock.locked()
    assert cache.checkout(('', b'alice'), cache.verifier(b'pw')) is None   # one user only
    assert cache.total == 1
    books(cache)


def test_every_move_keeps_the_books(clock):
    cache = make(clock)
    entry = cache.reserve('k')
    entry.conn = FakeConn('a')
    for state in (State.LOGGING_IN, State.ACTIVE, State.RESETTING, State.CACHED,
                  State.CHECKING, State.ACTIVE):
        cache.move(entry, state)
        assert entry.state is state and cache.count(state) == 1
        books(cache)
    cache.move(entry, State.CLOSED, 'test')
    assert entry.conn.closed == ('test', 'active') and cache.total == 0
    cache.move(entry, State.CACHED)                     # closed stays closed
    assert entry.state is State.CLOSED and cache.cached_count == 0
    books(cache)


def test_a_reset_under_way_is_waited_for(clock):
    cache = make(clock)
    entry = login(cache, 'k', b'pw', 'a')
    cache.move(entry, State.RESETTING)
    waiter = gevent.spawn(cache.wait_returning, 'k', cache.verifier(b'pw'), frozenset(), 5)
    gevent.sleep(0)
    assert not waiter.ready()
    cache.release(entry)
    assert waiter.get(timeout=1) is True
    assert cache.wait_returning('k', cache.verifier(b'pw'), frozenset(), 5) is False


def test_two_entries_for_one_user(clock):
    cache = make(clock)
    first = login(cache, 'k', b'pw', 'a')
    second = login(cache, 'k', b'pw', 'b')
    cache.release(first)
    cache.release(second)
    taken = {cache.checkout('k', cache.verifier(b'pw')), cache.checkout('k', cache.verifier(b'pw'))}
    assert taken == {first, second}
    assert cache.total == 2 and cache.cached_count == 0


def test_expire_idle_with_a_fake_clock(clock):
    cache = make(clock)
    old = login(cache, 'old', b'pw', 'a')
    cache.release(old)
    clock.now += 30
    young = login(cache, 'young', b'pw', 'b')
    cache.release(young)
    active = login(cache, 'active', b'pw', 'c')
    assert cache.expire_idle(clock.now + 29) == 0
    assert cache.expire_idle(clock.now + 30) == 1          # at least 60 s idle
    assert old.conn.logged_out and old.conn.closed == ('expired: idle for 60s', 'cached')
    assert cache.expire_idle(clock.now + 60) == 1
    assert cache.expire_idle(clock.now + 1000) == 0        # the active one stays
    assert cache.total == 1 and cache.checkout('old', cache.verifier(b'pw')) is None
    cache.move(active, State.CLOSED, 'test')
    assert cache.total == 0


def test_size_limit_evicts_least_recently_used(clock):
    cache = make(clock, size=2)
    first = login(cache, 'a', b'pw', 'a')
    second = login(cache, 'b', b'pw', 'b')
    cache.release(first)
    clock.now += 1
    cache.release(second)
    third = login(cache, 'c', b'pw', 'c')
    assert first.state is State.CLOSED and first.conn.closed[0] == 'evicted: cache full'
    assert cache.total == 2
    # Both remaining slots are in use or reserved: no room.
    assert cache.checkout('b', cache.verifier(b'pw')) is second
    with pytest.raises(CacheFull):
        cache.reserve('d')
    cache.move(third, State.CLOSED, 'test')
    reserved = cache.reserve('d')
    cache.move(reserved, State.CLOSED, 'test')         # never connected: nothing to close
    assert cache.total == 1
    books(cache)


def test_cached_socket_that_speaks_is_dropped(clock):
    cache = make(clock)
    dead = []
    cache.on_dead = dead.append
    entry = login(cache, 'k', b'pw', 'a')
    cache.release(entry)
    entry.conn.peer.sendall(b'* BYE Autologout\r\n')     # the server talks to a cached conn
    wait_until(lambda: dead, 'the cached connection to be found dead', 2)
    assert dead == [entry] and entry.conn.closed[0] == 'server closed cached connection'
    assert cache.total == 0 and cache.checkout('k', cache.verifier(b'pw')) is None


def test_checked_out_socket_is_not_watched(clock):
    cache = make(clock)
    dead = []
    cache.on_dead = dead.append
    entry = login(cache, 'k', b'pw', 'a')
    cache.release(entry)
    assert cache.checkout('k', cache.verifier(b'pw')) is entry
    entry.conn.peer.sendall(b'* 3 EXISTS\r\n')           # normal traffic for its session
    # The hub runs its watchers before this greenlet goes on: had the watcher been
    # started, it would have fired by then.
    gevent.sleep(0)
    gevent.sleep(0)
    assert dead == []


def test_profile_is_part_of_the_key(clock):
    cache = make(clock)
    entry = login(cache, 'k', b'pw', 'a')
    entry.conn.profile = frozenset({b'QRESYNC', b'CONDSTORE'})
    cache.release(entry)
    assert cache.checkout('k', cache.verifier(b'pw')) is None            # plain login
    assert cache.checkout('k', cache.verifier(b'pw'), frozenset({b'CONDSTORE'})) is None
    assert cache.checkout('k', cache.verifier(b'pw'),
                          frozenset({b'QRESYNC', b'CONDSTORE'})) is entry


def test_per_user_limit_evicts_the_users_oldest(clock):
    cache = make(clock, size=100, per_user=2)
    first = login(cache, 'k', b'pw', 'a')
    second = login(cache, 'k', b'pw', 'b')
    other = login(cache, 'other', b'pw', 'c')
    with pytest.raises(CacheFull, match='user'):
        cache.reserve('k')                        # both active
    cache.release(other)
    cache.release(second)
    clock.now += 1
    cache.release(first)
    login(cache, 'k', b'pw', 'd')
    assert second.conn.closed[0] == 'evicted: user limit'   # the user's least recent
    assert first.state is State.CACHED
    assert cache.user_count('k') == 2 and cache.user_count('other') == 1


def test_login_in_progress_counts_for_the_user(clock):
    cache = make(clock, size=100, per_user=1)
    entry = cache.reserve('k')
    with pytest.raises(CacheFull):
        cache.reserve('k')
    cache.move(entry, State.CLOSED, 'login refused')
    cache.reserve('k')


def test_new_password_retires_the_old_ones(clock):
    cache = make(clock, size=100)
    cached = login(cache, 'k', b'old', 'a')
    active = login(cache, 'k', b'old', 'b')
    cache.release(cached)
    entry = login(cache, 'k', b'new', 'c')
    assert cached.conn.closed[0] == 'password changed'
    assert cache.release(active) is False         # not cached again
    assert active.conn.closed[0] == 'password changed'
    assert cache.release(entry) is True
    assert cache.total == 1


def test_max_auth_age_is_not_extended_by_reuse(clock):
    cache = make(clock, size=100, expiration=10000, max_auth_age=100)
    entry = login(cache, 'k', b'pw', 'a')
    for _ in range(3):
        clock.now += 30
        cache.release(entry)
        assert cache.checkout('k', cache.verifier(b'pw')) is entry
        cache.move(entry, State.ACTIVE)
    clock.now += 10                               # 100 s since the password check
    assert cache.release(entry) is False
    entry = login(cache, 'k', b'pw', 'b')
    cache.release(entry)
    clock.now += 100
    assert cache.checkout('k', cache.verifier(b'pw')) is None
    assert cache.expire_idle() == 1
    assert entry.conn.closed[0].startswith('expired: password checked')


def test_close_all_logs_out_the_cached_and_closes_the_rest(clock):
    cache = make(clock)
    cached = login(cache, 'a', b'pw', 'a')
    cache.release(cached)
    busy = login(cache, 'b', b'pw', 'b')
    assert cache.close_all('shutdown', 1) == 1
    assert cached.conn.logged_out and not busy.conn.logged_out
    assert cached.conn.closed == ('shutdown', 'cached')
    assert busy.conn.closed == ('shutdown', 'active')
    assert cache.total == 0 and cache.entries() == []


def test_a_login_under_way_is_not_retired_by_another_of_the_same_password(clock):
    cache = make(clock)
    slow = cache.reserve('k')                 # still connecting
    slow.conn = FakeConn('a')
    login(cache, 'k', b'pw', 'b')             # the same user's other login got in first
    cache.add(slow, cache.verifier(b'pw'))
    assert not slow.retired and cache.release(slow) is True
