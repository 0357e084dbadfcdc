"""The hot-path socket helpers, on real sockets (descriptors above 1023 included)."""
import os
import resource
import socket as stdsocket

import gevent
import pytest
from gevent import socket

from gimapproxy.sockio import readable, recv_when_ready, send_all


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


def test_recv_when_ready_waits_then_reads(pair):
    a, b = pair
    later = gevent.spawn_later(0.05, b.sendall, b'hello')
    assert recv_when_ready(a, 100) == b'hello'
    later.join()
    b.sendall(b'more')                      # already there: no wait needed
    assert recv_when_ready(a, 100) == b'more'


def test_recv_when_ready_is_woken_by_close():
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
