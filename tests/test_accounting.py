"""Every login the server would accept succeeds, and reuse happens whenever it is safe:
per-user accounting, the CONDSTORE profile, sessions that start with commands that
change nothing, and cached connections that died silently. Against a real Dovecot with
its default per-user limit (mail_max_userip_connections = 10)."""
import socket as _socket
import threading
import time

import gevent
import pytest
from gevent import socket
from gevent.server import StreamServer

from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, free_port, require_dovecot
from tests.conftest import Backend, start_proxy
from tests.wire import Client

USERS = {'acct%d' % i: 'pw-acct%d' % i for i in range(1, 25)}


@pytest.fixture(scope='module')
def server():
    require_dovecot()
    conf = NO_AUTH_PENALTY_CONF + 'mail_max_userip_connections = 10\n'
    with Dovecot(users=USERS, messages=12, extra_conf=conf) as dovecot:
        yield Backend('dovecot', dovecot, sorted(USERS.items()))


def logins(proxy_log, user: str) -> list:
    """The results of the proxy's logins of `user`, in order: 'new' or 'reused'."""
    return [line.split(' result=')[1].split()[0] for line in proxy_log.lines
            if line.startswith('login: ') and ' user=%s ' % user in line]


def server_logins(server, user: str) -> int:
    return len(server.server.login_lines(user))


def test_dropped_sessions_do_not_lock_the_user_out(server, proxy_log):
    """20 sessions of one user leave mid-FETCH without LOGOUT; then 10 logins of that user
    at once all succeed: each waits for a connection still being finished, if need be,
    instead of being refused (Dovecot itself would take them all)."""
    user, password = 'acct1', USERS['acct1']
    body = b'x' * 76 + b'\r\n'
    for i in range(4):                   # finishing a dropped FETCH takes a while
        server.server.add_message(user, b'Subject: big %d\r\n\r\n' % i + body * 40000)
    proxy = start_proxy(server, busy_timeout=10)
    try:
        for _ in range(20):
            client = Client(proxy.server_port)
            assert client.login(user, password).startswith(b'L1 OK')
            client.command(b's', b'SELECT INBOX')
            client.send(b'f FETCH 1:* (BODY.PEEK[])\r\n')
            client.readline()
            client.close()                      # mid-response, no LOGOUT
        results = []

        def login():
            with Client(proxy.server_port, timeout=30) as client:
                results.append(client.login(user, password))
                client.logout()
        gevent.joinall([gevent.spawn(login) for _ in range(10)], timeout=60)
        assert len(results) == 10 and all(r.startswith(b'L1 OK') for r in results), results
        assert server.server.settled_login_count() <= 40
    finally:
        proxy.stop(2)
