"""username_case: one account under one name, as the server compares names.

Dovecot's default auth_username_format (%Lu) lower-cases the whole name, so USER1 and
user1 are one account there: one per-user cap, one cache, one flush. With
username_case = exact they are two names to the proxy (for servers that compare names
exactly; Dovecot still lets both in). The server and the log see the client's spelling.
"""
import json
import time
import urllib.request

import pytest

from tests.backends import free_port
from tests.conftest import start_proxy, wait_cached
from tests.wire import Client

USER, PASSWORD = 'user1', 'secret1'
SHOUTED = 'USER1'
BUSY = b'L1 NO [UNAVAILABLE] Too many connections, try again later.\r\n'


@pytest.fixture
def make_proxy(dovecot):
    """Proxies in front of the test Dovecot, stopped after the test."""
    servers = []

    def make(**settings):
        servers.append(start_proxy(dovecot, **settings))
        return servers[-1]
    yield make
    for server in servers:
        server.stop(2)


def session(proxy, user: str, password: str = PASSWORD) -> Client:
    client = Client(proxy.server_port)
    assert client.login(user, password).startswith(b'L1 OK [CAPABILITY '), user
    return client


def logins(proxy_log, user: str) -> list:
    """The results (new, reused) of the proxy's logins of `user`, as logged."""
    return [line.split(' result=')[1].split()[0] for line in proxy_log.lines
            if line.startswith('login: ') and ' user=%s ' % user in line]


def test_another_spelling_waits_at_the_per_user_cap(dovecot, make_proxy, proxy_log):
    """At max_connections_per_user, USER1 gets no second server connection: it waits
    for user1's, as user1 would, and gets NO [UNAVAILABLE] past busy_timeout."""
    proxy = make_proxy(max_connections_per_user=1, busy_timeout=0.5)
    with session(proxy, USER) as active:               # the one connection, in use
        before = dovecot.settled_logins()
        for spelling in (USER, SHOUTED):
            with Client(proxy.server_port) as other:
                started = time.monotonic()
                assert other.login(spelling, PASSWORD) == BUSY, spelling
                assert time.monotonic() - started >= 0.4   # it waited for a free one
        assert proxy.cache.user_count((b'', USER.encode())) == 1
        assert proxy.cache.total == 1
        assert active.command(b'a', b'NOOP')[1].startswith(b'a OK')
        active.logout()
    assert dovecot.settled_logins() == before, 'USER1 got a server connection of its own'
    # The log names the login as the client spelled it.
    assert any(line.startswith('login failed: ') and ' user=USER1 ' in line
               and 'reason=' in line for line in proxy_log.lines)


def test_another_spelling_reuses_the_cached_connection(dovecot, make_proxy, proxy_log):
    """user1 logs out; USER1 with the same password gets user1's cached connection."""
    proxy = make_proxy()
    with session(proxy, USER) as client:
        client.logout()
    wait_cached(proxy)
    before = dovecot.settled_logins()
    with session(proxy, SHOUTED) as client:
        assert client.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
        client.logout()
    assert logins(proxy_log, USER) == ['new']
    assert logins(proxy_log, SHOUTED) == ['reused']
    assert dovecot.settled_logins() == before
    assert proxy.cache.user_count((b'', USER.encode())) == 1
    assert proxy.cache.user_count((b'', SHOUTED.encode())) == 0


def test_a_new_password_under_another_spelling_retires_the_old_one(dovecot, make_proxy,
                                                                    proxy_log):
    """A login as USER1 with user1's new password closes user1's cached connection made
    with the old one, and the old password is not accepted from the cache any more."""
    proxy = make_proxy()
    try:
        with session(proxy, USER) as client:
            client.logout()
        wait_cached(proxy)
        dovecot.server.set_password(USER, 'changed1')
        with session(proxy, SHOUTED, 'changed1') as client:
            client.logout()
        proxy_log.wait_for('reason=password changed')
        with Client(proxy.server_port) as client:
            assert client.login(USER, PASSWORD).startswith(b'L1 NO [AUTHENTICATIONFAILED]')
    finally:
        dovecot.server.set_password(USER, PASSWORD)


def test_exact_keeps_the_spellings_apart(dovecot, make_proxy, proxy_log):
    """With username_case = exact, USER1 is another user to the proxy: its own cap and
    its own connections (Dovecot, which lower-cases, lets both in)."""
    proxy = make_proxy(username_case='exact', max_connections_per_user=1, busy_timeout=0.5)
    with session(proxy, USER) as active:
        before = dovecot.settled_logins()
        with session(proxy, SHOUTED) as other:         # not held back by user1's cap
            assert other.command(b'a', b'NOOP')[1].startswith(b'a OK')
            other.logout()
        active.logout()
    assert dovecot.wait_logins(before + 1) == before + 1
    wait_cached(proxy, 2)
    with session(proxy, SHOUTED) as client:             # USER1's own connection back
        client.logout()
    assert logins(proxy_log, USER) == ['new']
    assert logins(proxy_log, SHOUTED) == ['new', 'reused']
    assert proxy.cache.user_count((b'', USER.encode())) == 1
    assert proxy.cache.user_count((b'', SHOUTED.encode())) == 1


def test_admin_flush_of_another_spelling(dovecot, make_proxy, proxy_log):
    """POST /admin/flush?user=USER1 logs out user1's cached connection."""
    port = free_port()
    proxy = make_proxy(stats_listen='127.0.0.1:%d' % port)
    with session(proxy, USER) as client:
        client.logout()
    wait_cached(proxy)
    request = urllib.request.Request('http://127.0.0.1:%d/admin/flush?user=%s'
                                     % (port, SHOUTED), method='POST')
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read()) == {'flushed': 1}
    assert proxy.cache.total == 0
    assert any(line.startswith('admin flush: ') and ' user=USER1 ' in line
               for line in proxy_log.lines)
    with session(proxy, USER) as client:                 # a new server login
        client.logout()
    assert logins(proxy_log, USER) == ['new', 'new']
