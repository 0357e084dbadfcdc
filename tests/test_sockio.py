"""The hot-path socket helpers, on real sockets (descriptors above 1023 included), with
gevent's socket read watcher (private API) and with the public fallback."""
import os
import resource
import socket as stdsocket

import gevent
import pytest
from gevent import socket

from gimapproxy import duplex, sockio
from gimapproxy.duplex import Side
from gimapproxy.sockio import readable, recv_when_ready, send_all
from tests.conftest import wait_until


@pytest.fixture(params=['socket watcher', 'public'])
def gevent_api(request, monkeypatch):
    """Run the test on each path: gevent's own read watcher, and public API only."""
    if request.param == 'socket watcher' and not sockio._has_socket_watcher():
        pytest.skip('this gevent has no socket read watcher')
    monkeypatch.setattr(sockio, 'SOCKET_WATCHER', request.param == 'socket watcher')
    monkeypatch.setattr(duplex, 'RAW_SOCKET', request.param == 'socket watcher')
    return request.param


@pytest.fixture(params=['low', 'high'])
def pair(request):
    """A connected gevent socket pair; 'high' puts one end above descriptor 1023, where
    select() cannot go. A socket pair hands bytes over in the send itself: what sendall
    sent, or a close, is there to read when it returns, with no wait."""
    a, b = socket.socketpair()
    if request.param == 'high':
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1600:
            pytest.skip('open file limit %d too low for a descriptor above 1023' % soft)
        fd = os.dup2(a.fileno(), 1500)
        a.close()
        a = socket.socket(fileno=fd)
    yield a, b
    a.close()
    b.close()


def test_readable_sees_data_and_eof(pair):
    a, b = pair
    assert not readable(a)
    b.sendall(b'x')
    assert readable(a)
    assert a.recv(10) == b'x'
    assert not readable(a)
    b.close()
    assert readable(a)                     # EOF counts: the peer is gone


def test_readable_on_a_closed_socket_says_yes():
    a, b = socket.socketpair()
    a.close()
    b.close()
    assert readable(a)


def test_recv_when_ready_waits_then_reads(pair, gevent_api):
    a, b = pair
    later = gevent.spawn_later(0.05, b.sendall, b'hello')
    assert recv_when_ready(a, 100) == b'hello'
    later.join()
    b.sendall(b'more')                      # already there: no wait needed
    assert recv_when_ready(a, 100) == b'more'


def test_recv_when_ready_is_woken_by_close(gevent_api):
    a, b = socket.socketpair()
    reading = []

    def read():
        reading.append(True)               # it waits from here on, as nothing comes
        try:
            return recv_when_ready(a, 100)
        except OSError as exc:
            return exc
    reader = gevent.spawn(read)
    wait_until(lambda: reading, 'the reader to wait')
    a.close()                              # in another greenlet: the wait ends
    assert isinstance(reader.get(timeout=2), OSError)
    with pytest.raises(OSError):
        recv_when_ready(a, 100)            # closed already: no wait at all
    b.close()


def side_of(sock) -> Side:
    return Side(sock, gevent.get_hub().loop, 1, 2)


def test_side_reads_without_blocking(pair, gevent_api):
    a, b = pair
    side = side_of(a)
    assert (side.raw is not a) == (gevent_api == 'socket watcher')
    try:
        assert side.recv() is None                 # nothing there: no wait
        b.sendall(b'hello')
        assert side.recv() == b'hello'
        b.close()
        assert side.recv() == b''                  # EOF
    finally:
        side.close()
    assert a.gettimeout() is None                  # blocking (gevent-style) again


def test_side_queues_what_the_socket_does_not_take(pair, gevent_api):
    a, b = pair
    side = side_of(a)
    data = os.urandom(8 * 1024 * 1024)             # far more than the socket buffers hold
    try:
        side.put(data[:3])
        side.put(data[3:])
        side.flush()
        assert side.queue and 0 < side.queued < len(data)
        assert side.stalled is not None            # since when it could not go on
        received = bytearray()
        while side.queue:
            received += b.recv(1 << 20)
            side.flush()
        while len(received) < len(data):
            received += b.recv(1 << 20)
        assert bytes(received) == data and side.queued == 0 and side.stalled is None
        b.close()
        side.put(b'x' * (1 << 20))
        with pytest.raises(OSError):
            for _ in range(10):
                side.flush()
    finally:
        side.close()


def test_side_over_tls_retries_a_write_with_the_same_bytes(pki):
    """A TLS write the socket cannot take keeps the queue's first item as it is (OpenSSL
    wants the same bytes again), and the bytes arrive whole and in order. (Over a socket
    pair, what the peer sent is there to read when its sendall returns.)"""
    left, right = socket.socketpair()
    server = gevent.spawn(pki.server_context().wrap_socket, right, server_side=True)
    client = pki.client_context(check_hostname=False).wrap_socket(left)
    peer = server.get(timeout=5)
    side = side_of(client)
    try:
        first, second = os.urandom(4 << 20), os.urandom(1 << 20)
        side.put(first)
        side.flush()
        assert side.queue
        head = side.queue[0]
        side.put(second)
        side.flush()
        if side.retry:
            assert side.queue[0] is head           # not joined with what came after
        received = bytearray()
        while side.queue or len(received) < len(first) + len(second):
            received += peer.recv(1 << 20)
            side.flush()
        assert bytes(received) == first + second
        assert side.recv() is None
        peer.sendall(b'over tls')
        assert side.recv() == b'over tls'
        # Many records at once come back in one read, up to RECV_SIZE.
        data = os.urandom(100000)
        peer.sendall(data)
        first = side.recv()
        assert len(first) == duplex.RECV_SIZE and side.more(first)
        rest = side.recv()
        assert first + rest == data and not side.more(rest)
        assert side.recv() is None
        peer.close()
        assert side.recv() == b''
    finally:
        side.close()
        client.close()
        peer.close()


def test_send_all_sends_what_does_not_fit_at_once(pair):
    a, b = pair
    data = os.urandom(4 * 1024 * 1024)     # far more than a socket buffer holds
    received = bytearray()

    def drain():
        while len(received) < len(data):
            received.extend(b.recv(65536))
    reader = gevent.spawn(drain)
    send_all(a, data, 10)
    reader.join(timeout=10)
    assert bytes(received) == data


def test_send_all_times_out_on_a_peer_that_does_not_read(pair):
    a, b = pair
    with pytest.raises(stdsocket.timeout):
        send_all(a, b'x' * (16 * 1024 * 1024), 0.3)
