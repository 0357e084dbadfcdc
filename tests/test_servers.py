"""Several servers: each user sticks to one (rendezvous hashing) and fails over."""
from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, require_dovecot
from tests.conftest import start_proxy, wait_until
from tests.wire import Client


def test_users_stick_to_a_server_and_fail_over(dovecot):
    require_dovecot()
    users = dovecot.users[:8]
    first = dovecot.server
    with Dovecot(users=dict(users), messages=2, extra_conf=NO_AUTH_PENALTY_CONF) as second:
        a, b = ('127.0.0.1', first.port), ('127.0.0.1', second.port)
        proxy = start_proxy(dovecot, server_hostname='127.0.0.1:%d 127.0.0.1:%d' % (a[1], b[1]),
                            connect_timeout=5)
        try:
            # A server that failed is tried last for a while (the start-up check can
            # meet a Dovecot that is still starting): wait until both are up again.
            wait_until(lambda: {proxy.servers_for(user.encode())[0] for user, _ in users}
                       == {a, b}, 'both servers up, the eight users hashed to both', 10)
            homes = {user: proxy.servers_for(user.encode())[0] for user, _ in users}
            for user, password in users:
                before = {first: first.login_count(user), second: second.login_count(user)}
                for _ in range(2):                     # a new login, then a reuse
                    with Client(proxy.server_port) as client:
                        assert client.login(user, password).startswith(b'L1 OK')
                        client.logout()
                server = first if homes[user] == a else second
                other = second if server is first else first
                assert server.wait_login_count(before[server] + 1, user=user) == \
                    before[server] + 1
                assert other.login_count(user) == before[other]
            # The second server goes away: its users fail over to the first.
            moved = [(u, p) for u, p in users if homes[u] == b]
            second.stop()
            wait_until(lambda: not any(entry for entry in proxy.cache.listing()
                                       if entry['user'] in dict(moved)
                                       and entry['cached_idle_seconds']),
                       "the second server's cached connections to be closed")
            for user, password in moved:
                with Client(proxy.server_port) as client:
                    assert client.login(user, password).startswith(b'L1 OK')
                    assert client.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
            assert proxy.servers_for(b'anyone')[-1] == b       # down: tried last
        finally:
            proxy.stop(2)
