"""The hot-path socket helpers, on real sockets (descriptors above 1023 included), with
gevent's socket read watcher (private API) and with the public fallback."""
import os
import resource
import socket as stdsocket

import gevent
import pytest
from gevent import socket

from gimapproxy import sockio
from gimapproxy.sockio import Reader, readable, recv_when_ready, send_all


@pytest.fixture(params=['socket watcher', 'public'])
def gevent_api(request, monkeypatch):
    """Run the test on each path: gevent's own read watcher, and public API only."""
    if request.param == 'socket watcher' and not sockio._has_socket_watcher():
        pytest.skip('this gevent has no socket read watcher')
    monkeypatch.setattr(sockio, 'SOCKET_WATCHER', request.param == 'socket watcher')
    return request.param


@pytest.fixture(params=['low', 'high'])
def pair(request):
    """A connected gevent socket pair; 'high' puts one end above descriptor 1023, where
    select() cannot go."""
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
    gevent.sleep(0.01)
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

    def read():
        try:
            return recv_when_ready(a, 100)
        except OSError as exc:
            return exc
    reader = gevent.spawn(read)
    gevent.sleep(0.01)
    a.close()                              # in another greenlet: the wait ends
    assert isinstance(reader.get(timeout=2), OSError)
    with pytest.raises(OSError):
        recv_when_ready(a, 100)            # closed already: no wait at all
    b.close()


def read_in_greenlet(reader, size=100, wait_first=True):
    def read():
        try:
            return reader.recv(size, wait_first)
        except OSError as exc:
            return exc
    return gevent.spawn(read)


@pytest.mark.parametrize('wait_first', [True, False])
def test_reader_reads_and_is_woken(pair, gevent_api, wait_first):
    a, b = pair
    reader = Reader(a)
    try:
        later = gevent.spawn_later(0.05, b.sendall, b'hello')
        assert reader.recv(100, wait_first) == b'hello'
        later.join()
        reader.wake(OSError('nobody reads: nothing happens'))
        gevent.sleep(0.01)
        waiting = read_in_greenlet(reader, wait_first=wait_first)
        gevent.sleep(0.05)
        assert not waiting.ready()                  # nothing sent: it waits
        reader.wake(OSError('woken'))
        assert str(waiting.get(timeout=2)) == 'woken'
        b.sendall(b'still usable')                  # the socket survives the wake
        assert reader.recv(100, wait_first) == b'still usable'
        a.sendall(b'both ways')
        assert b.recv(100) == b'both ways'
        b.close()
        assert reader.recv(100, wait_first) == b''
    finally:
        reader.close()


def test_reader_honours_the_socket_timeout(pair, gevent_api):
    a, _ = pair
    a.settimeout(0.1)
    reader = Reader(a)
    try:
        with pytest.raises(stdsocket.timeout):
            reader.recv(100)
    finally:
        reader.close()


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
