"""Limits before and after login, with real sockets."""
import time

import pytest

from tests.conftest import start_proxy, wait_until
from tests.wire import Client


def test_max_clients_refuses_with_bye_and_keeps_listening(make_proxy):
    proxy = make_proxy(max_clients=2)
    first, second = Client(proxy.server_port), Client(proxy.server_port)
    with Client(proxy.server_port, timeout=5) as third:
        assert third.greeting == b'* BYE Too many connections, try again later.\r\n'
        assert third.read_eof() == b''
    first.close()
    wait_until(lambda: len(proxy.pool) == 1, "the first client's session to end")
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


def small_literals(scale: int) -> bytes:
    """A NOOP whose one argument is a list of 270 * `scale` one-byte literals."""
    return b'a NOOP (' + b' '.join([b'{1+}\r\nx'] * (270 * scale)) + b')\r\n'


def atom_lines(scale: int) -> bytes:
    """A NOOP whose one argument is a list over three lines of 320 * `scale` one-byte
    atoms, each line ending in a literal of 80 * `scale` bytes."""
    piece = b' '.join([b'x'] * (320 * scale)) + b' {%d+}\r\n' % (80 * scale) \
        + b'y' * (80 * scale) + b' '
    return b'a NOOP (' + piece * 3 + b'z)\r\n'


def answer_time(port: int, data: bytes, count: int) -> float:
    """Seconds from sending `data` (`count` NOOPs) to the last answer: the best of five."""
    best = None
    for _ in range(5):
        with Client(port) as client:
            started = time.perf_counter()
            client.send(data)
            for _ in range(count):
                assert client.readline() == b'a OK NOOP completed.\r\n'
            took = time.perf_counter() - started
        best = took if best is None else min(best, took)
    return best


@pytest.mark.parametrize('shape', [small_literals, atom_lines])
def test_prelogin_command_cost_is_linear(dovecot, shape):
    """A command as long as the pre-login limits allow (about 216 KB) costs per byte what
    one a hundredth of its size costs: the framer, the session's gathering of lines and
    literals, and the parser do a bounded amount of work per byte, however many
    arguments there are (a parser that copies the rest of the command once per argument
    makes the 216 KB of one-byte atoms cost 3 to 4 times as much per byte)."""
    whole = shape(100)
    assert 2000 < len(shape(1)) < 2500
    # A hundred small commands, pipelined, so that the fixed cost of a command and its
    # round trip is shared out over as many bytes as in the big one.
    pieces = shape(1) * 100
    proxy = start_proxy(dovecot)        # any server: nothing reaches it
    try:
        assert 200000 < len(whole) < 3 * (proxy.config.max_line_length
                                          + proxy.config.max_literal_size)
        per_byte_big = answer_time(proxy.server_port, whole, 1) / len(whole)
        per_byte_small = answer_time(proxy.server_port, pieces, 100) / len(pieces)
    finally:
        proxy.stop(2)
    ratio = per_byte_big / per_byte_small
    print('cost per byte: %.0f ns (%d bytes), %.0f ns (%d bytes), ratio %.2f'
          % (per_byte_big * 1e9, len(whole), per_byte_small * 1e9, len(shape(1)), ratio))
    # Linear work gives a ratio of about 1 (0.9 to 1.1 measured).
    assert ratio < 2, 'a long pre-login command costs %.1f times as much per byte' % ratio
