"""reuse_port: several proxies share one listening port (SO_REUSEPORT), each serving
logins with its own cache, as several processes do under etc/gimapproxy@.service."""
import errno
import socket

import pytest

from gimapproxy import ProxyServer, make_config
from gimapproxy.server import LISTEN_BACKLOG, tcp_listener
from tests.backends import free_port
from tests.wire import Client


def config(dovecot, port, **extra):
    values = {'listen_port': str(port), 'server_hostname': '127.0.0.1',
              'server_port': str(dovecot.port), 'shutdown_timeout': '2'}
    values.update(extra)
    return make_config(values)


def login_logout(port, user, password):
    """One LOGIN and LOGOUT through `port`; return the LOGIN's tagged reply."""
    client = Client(port)
    client.send(b'a LOGIN %s %s\r\n' % (user.encode(), password.encode()))
    _, tagged = client.read_until_tagged(b'a')
    client.send(b'b LOGOUT\r\n')
    client.read_until_tagged(b'b')
    client.sock.close()
    return tagged


def test_two_proxies_share_the_port_and_both_serve_logins(dovecot):
    port = free_port()
    proxies = [ProxyServer(config(dovecot, port, reuse_port='yes')) for _ in range(2)]
    try:
        for proxy in proxies:
            proxy.start()
        assert [p.address[1] for p in proxies] == [port, port]
        # The kernel picks a socket per connection by a hash of its addresses; 40 clients
        # all landing on one of two sockets would happen once in 2**39 runs.
        for i in range(40):
            user, password = dovecot.users[i % 5]
            assert login_logout(port, user, password).startswith(b'a OK'), i
        served = [p.counters['clients'] for p in proxies]
        assert sum(served) == 40 and min(served) > 0, served
        assert all(p.cache.created > 0 for p in proxies)
    finally:
        for proxy in proxies:
            proxy.stop(2)


def test_without_reuse_port_the_second_proxy_cannot_bind(dovecot):
    port = free_port()
    first = ProxyServer(config(dovecot, port, reuse_port='yes'))
    first.start()
    try:
        second = ProxyServer(config(dovecot, port))
        with pytest.raises(OSError) as caught:
            second.start()
        assert caught.value.errno == errno.EADDRINUSE
        assert str(port) in caught.value.strerror
    finally:
        first.stop(2)


def test_a_listener_bound_by_the_embedder_is_used_as_it_is(dovecot):
    """An application that binds its own socket (here with SO_REUSEPORT, by the same
    helper) hands it over; reuse_port changes nothing about it."""
    sock = tcp_listener(('127.0.0.1', 0), LISTEN_BACKLOG, socket.AF_INET, reuse_port=True)
    port = sock.getsockname()[1]
    proxy = ProxyServer(config(dovecot, 0, reuse_port='yes'), listener=sock)
    proxy.start()
    try:
        assert proxy.address[1] == port
        user, password = dovecot.users[0]
        assert login_logout(port, user, password).startswith(b'a OK')
    finally:
        proxy.stop(2)
