"""The cache as a plain object: a fake clock, fake connections, no network."""
import socket

import gevent
import pytest

from gimapproxy.cache import CacheFull, ConnectionCache


class FakeConn:
    def __init__(self, name):
        self.name = name
        self.sock, self.peer = socket.socketpair()
        self.closed = None
        self.profile = frozenset()

    def close(self, reason):
        self.closed = reason
        self.sock.close()
        self.peer.close()


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def login(cache, key, password, name):
    """What a session does on a miss: reserve, connect (faked), add."""
    victims = cache.reserve(key)
    entry, retired = cache.add(key, cache.verifier(password), FakeConn(name))
    assert retired == []
    return entry, victims


def test_verifier_is_keyed_and_length_prefixed():
    one, two = ConnectionCache(5, 60), ConnectionCache(5, 60)
    assert one.verifier(b'pw') == one.verifier(b'pw')
    assert one.verifier(b'pw') != two.verifier(b'pw')      # random key per cache
    assert one.verifier(b'pw') != one.verifier(b'pw\0')
    assert len(one.verifier(b'')) == 32


def test_checkout_needs_key_and_verifier(clock):
    cache = ConnectionCache(5, 60, clock=clock)
    entry, _ = login(cache, ('', b'alice'), b'pw', 'a')
    assert cache.checkout(('', b'alice'), cache.verifier(b'pw')) is None   # still active
    cache.release(entry)
    assert cache.checkout(('', b'alice'), cache.verifier(b'wrong')) is None
    assert cache.checkout(('', b'Alice'), cache.verifier(b'pw')) is None   # exact octets
    assert cache.checkout(('x', b'alice'), cache.verifier(b'pw')) is None  # authzid counts
    # The wrong password left the entry alone.
    assert cache.checkout(('', b'alice'), cache.verifier(b'pw')) is entry
    assert cache.checkout(('', b'alice'), cache.verifier(b'pw')) is None   # one user only
    assert cache.total == 1


def test_two_entries_for_one_user(clock):
    cache = ConnectionCache(5, 60, clock=clock)
    first, _ = login(cache, 'k', b'pw', 'a')
    second, _ = login(cache, 'k', b'pw', 'b')
    cache.release(first)
    cache.release(second)
    taken = {cache.checkout('k', cache.verifier(b'pw')), cache.checkout('k', cache.verifier(b'pw'))}
    assert taken == {first, second}
    assert cache.total == 2 and cache.cached_count == 0


def test_expire_idle_with_a_fake_clock(clock):
    cache = ConnectionCache(5, 60, clock=clock)
    old, _ = login(cache, 'old', b'pw', 'a')
    cache.release(old)
    clock.now += 30
    young, _ = login(cache, 'young', b'pw', 'b')
    cache.release(young)
    active, _ = login(cache, 'active', b'pw', 'c')
    assert cache.expire_idle(clock.now + 29) == []
    assert cache.expire_idle(clock.now + 30) == [old]      # at least 60 s idle
    assert cache.expire_idle(clock.now + 60) == [young]
    assert cache.expire_idle(clock.now + 1000) == []       # the active one stays
    assert cache.total == 1 and cache.checkout('old', cache.verifier(b'pw')) is None
    cache.discard(active)
    assert cache.total == 0


def test_size_limit_evicts_least_recently_used(clock):
    cache = ConnectionCache(2, 60, clock=clock)
    first, _ = login(cache, 'a', b'pw', 'a')
    second, _ = login(cache, 'b', b'pw', 'b')
    cache.release(first)
    clock.now += 1
    cache.release(second)
    third, victims = login(cache, 'c', b'pw', 'c')
    assert victims == [first]
    assert cache.total == 2
    # Both remaining slots are active or reserved: no room.
    assert cache.checkout('b', cache.verifier(b'pw')) is second
    with pytest.raises(CacheFull):
        cache.reserve('d')
    cache.discard(third)
    cache.reserve('d')
    cache.unreserve('d')
    assert cache.total == 1


def test_cached_socket_that_speaks_is_dropped(clock):
    cache = ConnectionCache(5, 60, clock=clock)
    dead = []
    cache.on_dead = dead.append
    entry, _ = login(cache, 'k', b'pw', 'a')
    cache.release(entry)
    entry.conn.peer.sendall(b'* BYE Autologout\r\n')     # the server talks to a cached conn
    with gevent.Timeout(2):
        while not dead:
            gevent.sleep(0.01)
    assert dead == [entry]
    assert cache.total == 0 and cache.checkout('k', cache.verifier(b'pw')) is None


def test_checked_out_socket_is_not_watched(clock):
    cache = ConnectionCache(5, 60, clock=clock)
    dead = []
    cache.on_dead = dead.append
    entry, _ = login(cache, 'k', b'pw', 'a')
    cache.release(entry)
    assert cache.checkout('k', cache.verifier(b'pw')) is entry
    entry.conn.peer.sendall(b'* 3 EXISTS\r\n')           # normal traffic for its session
    gevent.sleep(0.1)
    assert dead == []


def test_profile_is_part_of_the_key(clock):
    cache = ConnectionCache(5, 60, clock=clock)
    entry, _ = login(cache, 'k', b'pw', 'a')
    entry.conn.profile = frozenset({b'QRESYNC', b'CONDSTORE'})
    cache.release(entry)
    assert cache.checkout('k', cache.verifier(b'pw')) is None            # plain login
    assert cache.checkout('k', cache.verifier(b'pw'), frozenset({b'CONDSTORE'})) is None
    assert cache.checkout('k', cache.verifier(b'pw'),
                          frozenset({b'QRESYNC', b'CONDSTORE'})) is entry


def test_per_user_limit_evicts_the_users_oldest(clock):
    cache = ConnectionCache(100, 60, per_user=2, clock=clock)
    first, _ = login(cache, 'k', b'pw', 'a')
    second, _ = login(cache, 'k', b'pw', 'b')
    other, _ = login(cache, 'other', b'pw', 'c')
    with pytest.raises(CacheFull, match='user'):
        cache.reserve('k')                        # both active
    cache.release(other)
    cache.release(second)
    clock.now += 1
    cache.release(first)
    third, victims = login(cache, 'k', b'pw', 'd')
    assert victims == [second]                    # the user's least recently used one
    assert cache.user_count('k') == 2 and cache.user_count('other') == 1


def test_login_in_progress_counts_for_the_user(clock):
    cache = ConnectionCache(100, 60, per_user=1, clock=clock)
    cache.reserve('k')
    with pytest.raises(CacheFull):
        cache.reserve('k')
    cache.unreserve('k')
    cache.reserve('k')


def test_new_password_retires_the_old_ones(clock):
    cache = ConnectionCache(100, 60, clock=clock)
    cached, _ = login(cache, 'k', b'old', 'a')
    active, _ = login(cache, 'k', b'old', 'b')
    cache.release(cached)
    cache.reserve('k')
    entry, retired = cache.add('k', cache.verifier(b'new'), FakeConn('c'))
    assert retired == [cached]                    # the caller closes it
    assert cache.release(active) is False         # not cached again
    assert cache.release(entry) is True
    assert cache.total == 1


def test_max_auth_age_is_not_extended_by_reuse(clock):
    cache = ConnectionCache(100, 10000, max_auth_age=100, clock=clock)
    entry, _ = login(cache, 'k', b'pw', 'a')
    for _ in range(3):
        clock.now += 30
        cache.release(entry)
        assert cache.checkout('k', cache.verifier(b'pw')) is entry
    clock.now += 10                               # 100 s since the password check
    assert cache.release(entry) is False
    entry, _ = login(cache, 'k', b'pw', 'b')
    cache.release(entry)
    clock.now += 100
    assert cache.checkout('k', cache.verifier(b'pw')) is None
    assert cache.expire_idle() == [entry]
