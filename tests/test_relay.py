"""The relay's two directions against a real Dovecot: each goes on while the other is
blocked, and a client that stops reading is cut off after write_timeout with bounded
memory, its connection finished and cached. A server that stops reading (scripted) is
cut off after write_timeout too."""
import time

import gevent
import pytest

from gimapproxy import duplex, relay
from gimapproxy.duplex import RECV_SIZE
from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, require_dovecot
from tests.conftest import Backend, start_proxy, wait_cached, wait_until
from tests.fakeimap import FakeImap
from tests.wire import Client

USER, PASSWORD = 'big', 'secret-big'
BIG = 4 * 1024 * 1024           # one message of 4 MiB
FETCHES = 5                     # 20 MiB of FETCH responses: more than the socket buffers
UPLOAD = 24 * 1024 * 1024       # an APPEND literal bigger than the socket buffers too


def big_message() -> bytes:
    line = b'x' * 998 + b'\r\n'
    return (b'From: a@example.org\r\nTo: b@example.org\r\nSubject: big\r\n\r\n'
            + line * (BIG // len(line)))


@pytest.fixture(scope='module')
def big():
    require_dovecot()
    with Dovecot(users={USER: PASSWORD}, messages=1, extra_conf=NO_AUTH_PENALTY_CONF) as server:
        server.add_message(USER, big_message())
        yield server


def full_duplex_session(port: int) -> int:
    """Log in, then write pipelined FETCHes of the big message and a big APPEND while
    reading at the same time, as an asynchronous client does. The server answers the
    FETCHes before it reads the APPEND, so the upload waits for the downloads to be
    read. Returns the bytes received."""
    with Client(port, timeout=30) as client:
        assert client.login(USER, PASSWORD).startswith(b'L1 OK')
        client.command(b's', b'SELECT INBOX')
        received = []

        def read():
            with gevent.Timeout(60, AssertionError('no answer to the last command')):
                while True:
                    line = client.readline()
                    received.append(len(line))
                    if line.startswith(b'n1 '):
                        assert line.startswith(b'n1 OK'), line
                        return
        reader = gevent.spawn(read)
        fetches = b''.join(b'f%d FETCH 2 BODY.PEEK[]\r\n' % i for i in range(FETCHES))
        client.send(fetches + b'a1 APPEND INBOX {%d+}\r\n' % UPLOAD)
        chunk = b'y' * 65534 + b'\r\n'
        for _ in range(UPLOAD // len(chunk)):
            client.send(chunk)
        client.send(b'z' * (UPLOAD % len(chunk)) + b'\r\nn1 NOOP\r\n')
        reader.get()
        client.logout()
        return sum(received)


def test_upload_and_download_at_once(big):
    """Direct to Dovecot this works; through the proxy too. A relay that stopped
    reading the server while a write to it waited would hang here: the server does not
    read the upload until its FETCH answers are read."""
    direct = full_duplex_session(big.port)
    assert direct > FETCHES * len(big_message())
    proxy = start_proxy(big_backend(big))
    try:
        started = time.monotonic()
        assert full_duplex_session(proxy.server_port) > FETCHES * len(big_message())
        assert time.monotonic() - started < 30
    finally:
        proxy.stop(2)


def test_client_that_stops_reading_is_cut_off(big, proxy_log, monkeypatch):
    """Pipelined FETCHes whose answers the client never reads: after write_timeout the
    proxy ends the session. What it held for the client stays within a queue's limit,
    and the server connection is finished (the rest of the answers read) and cached."""
    sides = []

    class Side(duplex.Side):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            sides.append(self)
    monkeypatch.setattr(duplex, 'Side', Side)
    proxy = start_proxy(big_backend(big), write_timeout=1)
    try:
        with Client(proxy.server_port, timeout=30) as client:
            assert client.login(USER, PASSWORD).startswith(b'L1 OK')
            client.command(b's', b'SELECT INBOX')
            client.send(b''.join(b'f%d FETCH 2 BODY.PEEK[]\r\n' % i for i in range(FETCHES)))
            started = time.monotonic()

            def ended() -> bool:
                if not len(proxy.pool):
                    return True
                assert max(side.queued for side in sides) < relay.QUEUE_LIMIT + RECV_SIZE
                return False
            wait_until(ended, 'the session to be ended', 15)
            assert 1 <= time.monotonic() - started
        wait_cached(proxy)
        assert 'reason=client gone: write failed: write timeout' in '\n'.join(proxy_log.lines)
        with Client(proxy.server_port) as client:
            assert client.login(USER, PASSWORD).startswith(b'L1 OK')
            lines, status = client.command(b's', b'SELECT INBOX')
            assert status.startswith(b's OK')
            client.logout()
        assert proxy.counters['login_reused'] == 1
    finally:
        proxy.stop(2)


def big_backend(server) -> Backend:
    return Backend('dovecot', server, [(USER, PASSWORD)])


def test_server_that_stops_reading_is_cut_off(proxy_log):
    """A server that stops reading in the middle of a session (a scripted fault): once
    the proxy's writes to it have made no progress for write_timeout, the client gets a
    BYE and the connection is closed, not cached."""
    # STALL: the scripted server stops reading, on purpose, for longer than the test.
    fake = FakeImap({b'STALL': lambda tag: gevent.sleep(20) or b''}).start()
    proxy = start_proxy(Backend('fake', fake, []), write_timeout=1)
    try:
        with Client(proxy.server_port, timeout=30) as client:
            assert client.login('u', 'p').startswith(b'L1 OK')
            client.send(b'a STALL\r\n')
            started = time.monotonic()

            def flood():
                try:
                    while True:
                        client.send(b'n NOOP\r\n' * 8192)
                except OSError:
                    pass                  # the proxy closed the connection
            writer = gevent.spawn(flood)
            wait_until(lambda: not len(proxy.pool), 'the session to be ended', 10)
            assert 1 <= time.monotonic() - started
            writer.kill()
            # The BYE went out; whether the client reads it depends on its unread input
            # at the close (the kernel then resets the connection).
            client.sock.settimeout(5)
            try:
                assert client.read_eof() == b'* BYE Server connection lost.\r\n'
            except ConnectionResetError:
                pass
        log = '\n'.join(proxy_log.lines)
        assert 'reason=backend ended: send failed: write timeout' in log
        assert proxy.cache.total == 0
    finally:
        proxy.stop(2)
        fake.stop()


def test_commands_pipelined_behind_a_profile_switch_go_to_the_new_connection(
        dovecot, proxy_log):
    """A SELECT with CONDSTORE moves the session to a cached CONDSTORE connection; the
    EXAMINE written in the same packet behind it must go there too, not to the
    connection just given back to the cache (found by the differential fuzz)."""
    proxy = start_proxy(dovecot)
    user, password = dovecot.users[5]
    try:
        with Client(proxy.server_port) as client:
            client.login(user, password)
            assert client.command(b'a', b'SELECT INBOX (CONDSTORE)')[1].startswith(b'a OK')
            client.logout()
        wait_cached(proxy)
        with Client(proxy.server_port, timeout=5) as client:
            client.login(user, password)
            client.send(b't0 SELECT INBOX (CONDSTORE)\r\nt1 EXAMINE INBOX\r\n')
            lines, status = client.read_until_tagged(b't1')
            assert [line for line in lines if line.startswith(b't0 ')][0].startswith(b't0 OK')
            assert status.startswith(b't1 OK')
            client.logout()
        wait_cached(proxy, 2)
        log = '\n'.join(proxy_log.lines)
        assert 'profile=CONDSTORE' in log and 'server closed cached connection' not in log
        assert proxy.counters['cached_died'] == 0
    finally:
        proxy.stop(2)
