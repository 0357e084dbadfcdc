"""Limits before and after login, with real sockets."""
import time

import gevent

from tests.wire import Client


def test_max_clients_refuses_with_bye_and_keeps_listening(make_proxy):
    proxy = make_proxy(max_clients=2)
    first, second = Client(proxy.server_port), Client(proxy.server_port)
    with Client(proxy.server_port, timeout=5) as third:
        assert third.greeting == b'* BYE Too many connections, try again later.\r\n'
        assert third.read_eof() == b''
    first.close()
    gevent.sleep(0.2)
    with Client(proxy.server_port) as fourth:          # a slot is free again
        assert fourth.greeting.startswith(b'* OK')
    second.close()
    assert proxy.counters['clients_refused'] == 1


def test_preauth_timeout(make_proxy):
    proxy = make_proxy(preauth_timeout=1)
    with Client(proxy.server_port) as client:
        started = time.monotonic()
        client.send(b'a NOOP\r\n')                    # activity does not extend it
        assert client.read_eof() == b'a OK NOOP completed.\r\n* BYE Login timeout.\r\n'
        assert 0.8 < time.monotonic() - started < 5


def test_idle_timeout_after_login(backend, make_proxy):
    proxy = make_proxy(idle_timeout=1)
    user, password = backend.users[0]
    with Client(proxy.server_port) as client:
        client.login(user, password)
        assert client.command(b'a', b'NOOP')[1].startswith(b'a OK')
        started = time.monotonic()
        assert client.read_eof() == b'* BYE Idle timeout.\r\n'
        assert 0.8 < time.monotonic() - started < 5


def test_prelogin_line_and_literal_limits(make_proxy):
    proxy = make_proxy(max_line_length=512, max_literal_size=100)
    with Client(proxy.server_port) as client:
        client.send(b'a LOGIN {101}\r\n')               # synchronizing, too big: NO, no +
        assert client.readline() == b'a NO Literal too large.\r\n'
        assert client.command(b'b', b'NOOP')[1] == b'b OK NOOP completed.\r\n'
        client.send(b'c LOGIN {101+}\r\n' + b'x' * 101 + b' y\r\n')   # non-sync: BYE
        assert client.read_eof() == b'* BYE Literal too large.\r\n'
    with Client(proxy.server_port) as client:
        client.send(b'd NOOP ' + b'x' * 600 + b'\r\n')
        assert client.read_eof() == b'* BYE Input line too long.\r\n'
    assert proxy.cache.total == 0
