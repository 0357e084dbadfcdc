"""The lease through every path, with a fake clock, against a scripted server.

Each test drives gimapproxy.lease.Lease (the owner of a backend connection's fate) the
way a session does: acquire (reused, fresh, refused, unavailable, busy; a cached one
checked and found dead), keep (finish, reset, cache) or drop. After every step it checks
the cache's books: the slots in use equal the entries in the states that hold one, each
entry is in the list of its state, no cached entry is locked, and no connection outside
the cache is left open. The GreenletExit tests kill the greenlet that holds the lease
while it waits at each step (the scripted server holds that reply back), as a shutdown
does, and check the same: whatever the lease held is closed, with a reason.
"""
import gevent
import pytest
from gevent.event import Event

from gimapproxy import make_config
from gimapproxy.backend import BackendConnection
from gimapproxy.cache import ConnectionCache, State
from gimapproxy.lease import BackendPool, Failure, Lease, LoginFailed, ServerChoice
from gimapproxy.stats import Stats
from gimapproxy.tracker import Tracker, new_prefix
from tests.conftest import wait_until
from tests.fakeimap import FakeImap
from tests.test_cache import Clock, books

KEY = (b'', b'alice')
CREDENTIALS = (b'', b'alice', b'pw')


class Books:
    """A BackendPool in front of `server`, whose connections are all remembered."""

    def __init__(self, port: int, **settings) -> None:
        values = {'server_hostname': '127.0.0.1', 'server_port': str(port),
                  'busy_timeout': '0.3', 'connect_timeout': '2', 'login_timeout': '2',
                  'reset_timeout': '2', 'server_check_delay': '60'}
        values.update({key: str(value) for key, value in settings.items()})
        self.config = config = make_config(values)
        self.clock = Clock()
        cache = ConnectionCache(config.cache_size, config.cache_expiration_time,
                                config.max_connections_per_user, config.max_auth_age,
                                clock=self.clock)
        self.conns = []
        self.closes = []
        cache.on_closed = lambda entry, reason: self.closes.append(reason)
        self.pool = BackendPool(config, cache, ServerChoice(config.servers),
                                Stats(cache, lambda: 0), self.new_backend)

    def new_backend(self, address):
        conn = BackendConnection(address, 'b%d' % (len(self.conns) + 1))
        self.conns.append(conn)
        return conn

    @property
    def cache(self) -> ConnectionCache:
        return self.pool.cache

    def acquire(self, password=b'pw') -> Lease:
        return Lease.acquire(self.pool, 'c1', KEY, self.cache.verifier(password),
                             CREDENTIALS[:2] + (password,))

    def check(self) -> None:
        """The books balance, and nothing outside the cache is open."""
        cache = self.cache
        wait_until(lambda: not cache.count(State.CLOSING), 'the LOGOUTs under way to end')
        books(cache)
        live = cache.entries()
        for entry in live:
            assert entry in cache._states[entry.state]
        for entry in live:
            if entry.state is State.CACHED:
                assert not entry.lock.locked(), entry
        held = {id(entry.conn) for entry in live}
        for conn in self.conns:
            if id(conn) not in held:
                assert conn.closed and (conn.sock is None or conn.sock.fileno() == -1), conn.id
        assert cache.created == len(live) + len(self.closes)


@pytest.fixture
def server():
    fake = FakeImap({}).start()
    yield fake
    fake.stop()


def keep(books, lease):
    """The session logged out with nothing in flight: the lease keeps its connection."""
    tracker = Tracker(lease.conn.profile, lease.conn.replay, new_prefix())
    lease.keep('logout', tracker)


def test_fresh_then_reused_then_dropped(server):
    books = Books(server.port)
    with books.acquire() as lease:
        assert lease.result == 'new' and lease.entry.state is State.ACTIVE
        books.check()
        keep(books, lease)
        assert lease.entry is None
    books.check()
    assert books.cache.count(State.CACHED) == 1
    with books.acquire() as lease:
        assert lease.result == 'reused'
        books.check()
        lease.drop('test: dropped')
    books.check()
    assert books.closes == ['test: dropped'] and books.cache.total == 0


def test_a_lease_that_ends_without_a_verdict_drops_its_connection(server):
    books = Books(server.port)
    with pytest.raises(RuntimeError):
        with books.acquire():
            raise RuntimeError('a bug in the session')
    books.check()
    assert books.closes == ['session ended: RuntimeError'] and books.cache.total == 0


def test_refused_and_unavailable(server):
    server.replies[b'AUTHENTICATE'] = lambda tag: tag + b' NO [AUTHENTICATIONFAILED] no\r\n'
    books = Books(server.port)
    with pytest.raises(LoginFailed) as failed:
        books.acquire()
    assert failed.value.kind is Failure.REFUSED
    books.check()
    assert books.closes == ['login refused']
    port = server.port
    server.stop()
    books = Books(port)
    with pytest.raises(LoginFailed) as failed:
        books.acquire()
    assert failed.value.kind is Failure.UNAVAILABLE
    books.check()


def test_busy_at_the_user_limit(server):
    books = Books(server.port, max_connections_per_user=1)
    with books.acquire() as first:
        with pytest.raises(LoginFailed) as failed:
            books.acquire()
        assert failed.value.kind is Failure.BUSY
        books.check()
        assert first.entry.state is State.ACTIVE
    books.check()


def test_a_cached_connection_checked_and_found_dead_costs_a_login(server):
    books = Books(server.port, server_check_delay=30)
    with books.acquire() as lease:
        keep(books, lease)
    books.clock.now += 31                      # cached long enough to be checked
    server.replies[b'NOOP'] = lambda tag: tag + b' NO not any more\r\n'
    with books.acquire() as lease:
        assert lease.result == 'new'
        books.check()
    assert books.closes[0].startswith('server check failed')
    books.check()


def test_a_password_change_retires_the_old_connection(server):
    books = Books(server.port)
    with books.acquire() as lease:
        keep(books, lease)
    with books.acquire(b'new-pw') as lease:
        assert lease.result == 'new'
        books.check()
        keep(books, lease)
    books.check()
    assert books.closes == ['password changed'] and books.cache.cached_count == 1


# -- killed at each step -------------------------------------------------------------

class Stall:
    """A scripted reply that waits until the test lets it go."""

    def __init__(self, reply=b' OK done\r\n') -> None:
        self.reached = Event()
        self.release = Event()
        self.reply = reply

    def __call__(self, tag):
        self.reached.set()
        self.release.wait(10)
        return tag + self.reply


@pytest.mark.parametrize('command, at', [
    (b'AUTHENTICATE', State.LOGGING_IN),        # the login
    (b'NOOP', State.CHECKING),                  # the check of a cached connection
    (b'FETCH', State.ACTIVE),                   # finishing what the client left
    (b'UNSELECT', State.RESETTING),             # the reset
])
def test_killed_at_each_step_leaves_nothing_open(server, command, at):
    books = Books(server.port, server_check_delay=30)
    if command == b'NOOP':
        with books.acquire() as lease:
            keep(books, lease)
        books.clock.now += 31
    stall = Stall()
    server.replies[command] = stall

    def session():
        with books.acquire() as lease:
            tracker = Tracker(lease.conn.profile, lease.conn.replay, new_prefix())
            if command == b'FETCH':
                tracker.feed(b'a FETCH 1 (FLAGS)\r\n')
                lease.conn.send(tracker.next_event())
            lease.keep('client closed', tracker)

    task = gevent.spawn(session)
    assert stall.reached.wait(5), 'the lease never got to %s' % command.decode()
    states = [entry.state for entry in books.cache.entries()]
    assert at in states, states
    task.kill()
    stall.release.set()
    assert task.dead and isinstance(task.value, gevent.GreenletExit)
    books.check()
    assert books.cache.total == books.cache.cached_count, books.cache.counts()
    assert any('session ended: GreenletExit' in reason or 'interrupted' in reason
               for reason in books.closes), books.closes


def test_killed_while_connecting(server):
    silent = FakeImap({}, greeting=None).start()
    try:
        books = Books(silent.port, connect_timeout=10)
        task = gevent.spawn(books.acquire)
        wait_until(lambda: books.cache.count(State.CONNECTING) == 1, 'a connect under way')
        task.kill()
        books.check()
        assert books.cache.total == 0 and books.closes == ['login interrupted']
    finally:
        silent.stop()


def test_a_session_killed_in_its_reset_leaves_no_connection_behind():
    """Through the whole proxy: the client logs out, its connection's reset stalls at
    UNSELECT, and the proxy stops (killing the session with GreenletExit). Nothing may
    stay locked in the cache or open to the server."""
    from tests.conftest import Backend, start_proxy
    stall = Stall()
    fake = FakeImap({b'UNSELECT': stall}).start()
    proxy = start_proxy(Backend('fake', fake))
    try:
        from tests.wire import Client
        with Client(proxy.server_port, timeout=5) as client:
            assert client.login('someone', 'pw').startswith(b'L1 OK')
            client.logout()                 # answered as soon as the reset is sent
        assert stall.reached.wait(5)
        proxy.stop(0.5)
        assert proxy.cache.total == 0
        # The server answers at last, and then finds the connection closed.
        stall.release.set()
        wait_until(lambda: not fake.socks, 'the server connection to be closed')
    finally:
        stall.release.set()
        fake.stop()
