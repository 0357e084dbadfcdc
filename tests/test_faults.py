"""Faults a real server will not produce on demand, with the scripted fake server; and
hostile input from clients. Nothing may hang, spin or leak."""
import gc
import os
import time

import gevent
import greenlet

from gimapproxy.cache import State
from tests.backends import free_port
from tests.conftest import Backend, start_proxy, wait_cached, wait_until
from tests.fakeimap import FakeImap
from tests.wire import Client


def live_greenlets() -> int:
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, greenlet.greenlet) and not obj.dead)


def open_fds() -> int:
    return len(os.listdir('/proc/self/fd'))


def test_server_down_at_start_then_back(proxy_log):
    port = free_port()
    proxy = start_proxy(Backend('fake', FakeImap({}, port=port)), connect_timeout=1)
    try:
        proxy_log.wait_for('server check failed:')
        assert any(line.startswith('server check failed:') for line in proxy_log.lines)
        with Client(proxy.server_port) as client:
            started = time.monotonic()
            assert client.login('u', 'p') == \
                b'L1 NO [UNAVAILABLE] Server unavailable, try again later.\r\n'
            assert time.monotonic() - started < 2
        fake = FakeImap({}, port=port).start()              # the server comes back
        try:
            with Client(proxy.server_port) as client:
                assert client.login('u', 'p').startswith(b'L1 OK')
        finally:
            fake.stop()
    finally:
        proxy.stop(2)


def test_server_restart_while_connections_are_cached():
    fake = FakeImap({}).start()
    port = fake.port
    proxy = start_proxy(Backend('fake', fake))
    try:
        with Client(proxy.server_port) as client:
            client.login('u', 'p')
            client.logout()
        wait_cached(proxy, 1)
        fake.stop()                                        # the cached connection dies
        fake = FakeImap({}, port=port).start()
        wait_until(lambda: not proxy.cache.total, 'the dead cached connection to be closed')
        with Client(proxy.server_port) as client:          # no error for the client
            assert client.login('u', 'p').startswith(b'L1 OK')
            assert client.command(b'a', b'NOOP')[1].startswith(b'a OK')
    finally:
        proxy.stop(2)
        fake.stop()


def test_server_that_never_greets_is_bounded_and_leaks_nothing(proxy_log):
    fake = FakeImap({}, greeting=None).start()
    proxy = start_proxy(Backend('fake', fake), connect_timeout=0.5)
    try:
        proxy_log.wait_for('server check failed:')        # the start-up check is done
        wait_until(lambda: not fake.socks, 'the fake server to see the check go')
        gc.collect()
        greenlets, fds = live_greenlets(), open_fds()
        for _ in range(3):
            with Client(proxy.server_port) as client:
                started = time.monotonic()
                assert client.login('u', 'p').startswith(b'L1 NO [UNAVAILABLE]')
                assert time.monotonic() - started < 2
        wait_until(lambda: not len(proxy.pool) and not fake.socks,
                   'the sessions and their server connections to end')
        gc.collect()
        assert live_greenlets() <= greenlets and open_fds() <= fds
        assert proxy.cache.total == 0
    finally:
        proxy.stop(2)
        fake.stop()


MALFORMED = [
    b'x' * 70000 + b'\r\n',                          # a huge line
    b'a LOGIN {99999999999}\r\n',                     # a literal out of range
    b'a LOGIN {20000+}\r\n' + b'y' * 20000,           # too big, non-synchronizing
    b'a LOGIN {5}\r\n',                               # then silence: the login timeout
    b'\x00\x00\x00 NOOP\r\n' * 5,
    b'a NOOP\nb NOOP\n',                              # bare LF
    bytes(range(128, 256)) * 10 + b'\r\n',            # 8-bit garbage
    b'a AUTHENTICATE PLAIN\r\n*\r\n' * 4,
    b'a ID (' + b'"k" "v" ' * 40 + b')\r\n',          # too many ID pairs
    b'+ \r\n* OK\r\n',
]


def test_hostile_clients_do_not_disturb_a_good_one(pymap):
    proxy = start_proxy(pymap, preauth_timeout=2, write_timeout=2)
    try:
        rss = int(open('/proc/self/statm').read().split()[1])
        hostile_done = []

        def hostile(round_):
            for data in MALFORMED:
                try:
                    with Client(proxy.server_port, timeout=5) as client:
                        client.send(data)
                        client.sock.settimeout(0.2)
                        try:
                            client.read_eof()
                        except OSError:
                            pass
                except OSError:
                    pass
            hostile_done.append(round_)

        def flood():
            # A great many pipelined NOOPs, never read: bounded by write_timeout.
            try:
                with Client(proxy.server_port, timeout=5) as client:
                    client.send(b'a NOOP\r\n' * 100000)
            except OSError:
                pass

        workers = [gevent.spawn(hostile, n) for n in range(100)] + [gevent.spawn(flood)]
        slowest = 0.0
        while not all(worker.dead for worker in workers):
            started = time.monotonic()
            with Client(pymap.port and proxy.server_port) as client:
                assert client.login('demouser', 'demopass').startswith(b'L1 OK')
                client.logout()
            slowest = max(slowest, time.monotonic() - started)
            # A pause, not a wait: it paces the good logins while the hostile clients
            # run, so that they measure the proxy under attack rather than load it.
            gevent.sleep(0.05)
        gevent.joinall(workers, timeout=30)
        assert len(hostile_done) == 100                  # 1,000 malformed inputs sent
        assert slowest < 2.0, 'a good client waited %.1fs' % slowest
        grown = (int(open('/proc/self/statm').read().split()[1]) - rss) * 4096
        assert grown < 100 * 1024 * 1024, 'memory grew by %d bytes' % grown
    finally:
        proxy.stop(2)


SECRET = 'S3cret-Pass!'


def test_secrets_never_logged_on_any_login_error(proxy_log):
    """Force an error at each login step; the password and its base64 forms must
    not reach the log (the proxy logs at debug level here)."""
    import base64
    plain = base64.b64encode(b'\0someone\0' + SECRET.encode()).decode()
    scripts = [
        ({}, b'* BYE go away\r\n'),                                     # greeting BYE
        ({b'AUTHENTICATE': lambda tag: tag + b' NO [AUTHENTICATIONFAILED] no\r\n'}, None),
        ({b'AUTHENTICATE': lambda tag: b'zz1 OK wrong tag\r\n'}, None),  # desync
        ({b'AUTHENTICATE': lambda tag: b''}, None),                      # never answers
        ({b'AUTHENTICATE': lambda tag: b'* BYE leaving\r\n'}, None),     # gone mid-login
    ]
    for replies, greeting in scripts:
        kwargs = {'greeting': greeting} if greeting else {}
        fake = FakeImap(replies, **kwargs).start()
        proxy = start_proxy(Backend('fake', fake), connect_timeout=1, login_timeout=1)
        try:
            with Client(proxy.server_port) as client:
                client.send(b'a AUTHENTICATE PLAIN ' + plain.encode() + b'\r\n')
                assert client.read_until_tagged(b'a')[1].startswith(b'a NO')
                client.send(b'b LOGIN someone "%s"\r\n' % SECRET.encode())
                assert client.read_until_tagged(b'b')[1].startswith(b'b NO')
        finally:
            proxy.stop(2)
            fake.stop()
    text = '\n'.join(proxy_log.lines)
    for secret in (SECRET, plain, base64.b64encode(SECRET.encode()).decode()):
        assert secret not in text
    assert text.count('login failed:') == 2 * len(scripts)


def test_client_half_close_at_every_step_no_spin_no_leak(pymap, proxy_log):
    import resource
    import socket
    proxy = start_proxy(pymap)
    # What the client sends, and the start of the reply that shows the proxy got there.
    steps = [
        (b'', None),                                      # right after the greeting
        (b'a LOGIN {8}\r\n', b'+'),                        # inside a LOGIN literal
        (b'a LOGIN demouser demopass\r\n', b'a OK'),       # logged in
        (b'a LOGIN demouser demopass\r\nb SELECT INBOX\r\nc IDLE\r\n', b'+'),    # in IDLE
        (b'a LOGIN demouser demopass\r\nb APPEND INBOX {50}\r\nhalf', b'+'),     # in a literal
    ]
    try:
        proxy_log.wait_for('server check: server=')      # the start-up check is done
        gc.collect()
        greenlets, fds = live_greenlets(), open_fds()
        for data, reached in steps:
            with Client(proxy.server_port) as client:
                client.send(data)
                while reached is not None and not client.readline().startswith(reached):
                    pass
                before = resource.getrusage(resource.RUSAGE_SELF)
                client.sock.shutdown(socket.SHUT_WR)          # half-close
                client.sock.settimeout(5)
                client.read_eof()                             # the proxy closes too
                # Time for a spin to show: a proxy that loops on the closed socket burns
                # CPU while this passes. There is no event for a spin that never starts.
                gevent.sleep(0.5)
                after = resource.getrusage(resource.RUSAGE_SELF)
                spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                assert spent < 0.3, 'the proxy spun for %.2fs after a half-close' % spent
        wait_until(lambda: not len(proxy.pool) and not proxy.cache.count(State.CLOSING)
                   and proxy.cache.total == proxy.cache.cached_count,
                   'every session to end and its connection to be cached or closed')
        gc.collect()
        assert live_greenlets() <= greenlets and open_fds() <= fds + 1   # + one cached
    finally:
        proxy.stop(2)


def test_server_that_stalls_mid_response_is_bounded():
    """A FETCH answered with half a literal, then silence: idle_timeout ends the session
    and the connection is not kept."""
    fake = FakeImap({b'FETCH': lambda tag: b'* 1 FETCH (BODY[] {100}\r\nonly part'}).start()
    proxy = start_proxy(Backend('fake', fake), idle_timeout=1, write_timeout=1)
    try:
        with Client(proxy.server_port) as client:
            client.login('u', 'p')
            client.send(b'a FETCH 1 BODY[]\r\n')
            started = time.monotonic()
            client.sock.settimeout(10)
            data = client.read_eof()
            assert data.startswith(b'* 1 FETCH (BODY[] {100}\r\nonly part')
            assert time.monotonic() - started < 8
        wait_until(lambda: not proxy.cache.total and not len(proxy.pool),
                   'the session to end and its server connection to be closed', 15)
    finally:
        proxy.stop(2)
        fake.stop()


def test_logout_is_answered_before_the_reset_and_the_next_login_waits_for_it():
    """LOGOUT's answer goes out once the reset is sent, not after a slow server answers
    it; the same user's next login, right behind, waits for that reset and gets the
    connection: no second server login."""
    def slow_noop(tag):
        gevent.sleep(1.0)                  # the scripted server's slow answer, on purpose
        return tag + b' OK done\r\n'
    fake = FakeImap({b'NOOP': slow_noop}).start()
    proxy = start_proxy(Backend('fake', fake))
    try:
        with Client(proxy.server_port) as client:
            client.login('u', 'p')
            started = time.monotonic()
            client.logout()
            assert time.monotonic() - started < 0.6
        assert proxy.cache.cached_count == 0                # the reset is still under way
        with Client(proxy.server_port) as client:
            assert client.login('u', 'p').startswith(b'L1 OK')
            assert time.monotonic() - started > 0.9        # it waited for the reset
        assert fake.logins == 1
        assert proxy.counters['login_reused'] == 1
    finally:
        proxy.stop(2)
        fake.stop()
