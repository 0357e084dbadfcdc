"""Every login the server would accept succeeds, and reuse happens whenever it is safe:
per-user accounting, the CONDSTORE profile, sessions that start with commands that
change nothing, and cached connections that died silently. Against a real Dovecot with
its default per-user limit (mail_max_userip_connections = 10)."""
import socket as _socket
import time

import gevent
import pytest
from gevent import socket
from gevent.server import StreamServer

from tests.backends import NO_AUTH_PENALTY_CONF, Dovecot, require_dovecot
from tests.conftest import Backend, start_proxy, wait_cached
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


def fetch_modseq(answers) -> bool:
    """Whether any FETCH reply carries MODSEQ: only a session with CONDSTORE on gets
    one. (SELECT reports HIGHESTMODSEQ anyway once a mailbox has had CONDSTORE used.)"""
    return any(b' FETCH ' in line and b'MODSEQ' in line for lines in answers
               for line in lines)


def run_session(port, user, password, commands) -> list:
    """Log in, run `commands` (text without tags) and log out; return each command's
    lines (untagged and tagged)."""
    with Client(port, timeout=30) as client:
        assert client.login(user, password).startswith(b'L1 OK')
        out = []
        for i, text in enumerate(commands):
            lines, tagged = client.command(b'c%d' % i, text)
            assert tagged.startswith(b'c%d OK' % i), (text, tagged)
            out.append(lines + [tagged])
        client.logout()
    return out


def test_condstore_sessions_reuse_condstore_connections(server, proxy_log):
    """300 sessions over 10 users that start with SELECT (CONDSTORE): at most two server
    logins per user (one plain, one CONDSTORE); a plain session then sees no MODSEQ."""
    users = ['acct%d' % i for i in range(2, 12)]
    before = {user: server_logins(server, user) for user in users}
    proxy = start_proxy(server)
    try:
        def user_sessions(user):
            for _ in range(30):
                answers = run_session(proxy.server_port, user, USERS[user],
                                      [b'SELECT INBOX (CONDSTORE)', b'FETCH 1:5 (FLAGS MODSEQ)'])
                assert all(b'MODSEQ' in line for line in answers[1][:-1]), answers[1]
        gevent.joinall([gevent.spawn(user_sessions, user) for user in users],
                       timeout=120, raise_error=True)
        server.server.settled_login_count()
        for user in users:
            assert server_logins(server, user) - before[user] <= 2, user
            results = logins(proxy_log, user)
            assert len(results) == 30 and results.count('new') <= 2, results
            answers = run_session(proxy.server_port, user, USERS[user],
                                  [b'SELECT INBOX', b'STORE 1 +FLAGS (\\Seen)',
                                   b'FETCH 1:3 (FLAGS)', b'STORE 1 -FLAGS (\\Seen)'])
            assert not fetch_modseq(answers), answers
    finally:
        proxy.stop(2)


def test_a_session_that_turns_condstore_on_later_keeps_it_to_itself(server, proxy_log):
    user, password = 'acct12', USERS['acct12']
    proxy = start_proxy(server)
    try:
        answers = run_session(proxy.server_port, user, password,
                              [b'SELECT INBOX', b'FETCH 1 (FLAGS)',
                               b'FETCH 1:2 (FLAGS MODSEQ)'])
        assert b'MODSEQ' in answers[2][0]
        for _ in range(3):                       # plain sessions: never that connection
            answers = run_session(proxy.server_port, user, password,
                                  [b'SELECT INBOX', b'STORE 1 +FLAGS (\\Seen)',
                                   b'STORE 1 -FLAGS (\\Seen)'])
            assert not fetch_modseq(answers), answers
        # Nor does an ENABLE CONDSTORE session: the server never answered that ENABLE
        # there, so it is not answered from there; it goes to the server.
        for _ in range(2):
            answers = run_session(proxy.server_port, user, password,
                                  [b'ENABLE CONDSTORE', b'SELECT INBOX',
                                   b'STORE 1 +FLAGS (\\Seen)', b'STORE 1 -FLAGS (\\Seen)'])
            assert answers[0][0] == b'* ENABLED CONDSTORE\r\n'
            assert fetch_modseq(answers[2:3])
        lines = [line for line in proxy_log.lines if 'user=%s ' % user in line
                 and line.startswith('login:')]
        assert [line.split('result=')[1].split()[0] for line in lines] == \
            ['new', 'new', 'reused', 'reused', 'reused', 'new']
        # The second one moved to the connection the first one's ENABLE set up.
        moved = [line for line in proxy_log.lines if line.startswith('profile: ')]
        assert len(moved) == 1 and 'result=reused' in moved[0], moved
    finally:
        proxy.stop(2)


def test_roundcube_id_then_enable_qresync_mixed_with_plain(server, proxy_log):
    """Roundcube with its message cache: some sessions start ID, then ENABLE QRESYNC;
    others are plain. Once warm, no more server logins per user and profile."""
    user, password = 'acct13', USERS['acct13']
    proxy = start_proxy(server)
    qresync = [b'ID ("name" "Roundcube")', b'ENABLE QRESYNC', b'SELECT INBOX']
    plain = [b'ID ("name" "Roundcube")', b'SELECT INBOX', b'FETCH 1:2 (FLAGS)']
    before = server_logins(server, user)
    try:
        for _ in range(2):                      # warm: one connection of each profile
            run_session(proxy.server_port, user, password, qresync)
            run_session(proxy.server_port, user, password, plain)
        server.server.settled_login_count()
        warm = server_logins(server, user)
        for i in range(12):
            answers = run_session(proxy.server_port, user, password,
                                  qresync if i % 3 else plain)
            if i % 3:
                assert answers[1][0] == b'* ENABLED QRESYNC\r\n', answers[1]
            else:
                assert not fetch_modseq(answers), answers
        server.server.settled_login_count()
        assert server_logins(server, user) == warm
        assert warm - before == 2             # one of each profile
    finally:
        proxy.stop(2)


class StallingRelay:
    """A TCP relay to a server that can stop forwarding on the connections it has while
    keeping both their sockets open, as a firewall or NAT that forgot them does. New
    connections pass."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pairs = []                  # [stalled] per connection
        self.server = StreamServer(('127.0.0.1', 0), self.handle)

    @property
    def port(self) -> int:
        return self.server.server_port

    def start(self) -> 'StallingRelay':
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(1)

    def stall(self) -> None:
        for pair in self.pairs:
            pair[0] = True

    def handle(self, sock, address) -> None:
        upstream = socket.create_connection(('127.0.0.1', self.target_port))
        pair = [False]
        self.pairs.append(pair)

        def pump(source, sink):
            try:
                while True:
                    data = source.recv(65536)
                    if not data:
                        break
                    if not pair[0]:
                        sink.sendall(data)      # stalled: swallowed, nothing goes on
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    try:
                        end.shutdown(_socket.SHUT_RDWR)
                    except OSError:
                        pass
        other = gevent.spawn(pump, upstream, sock)
        pump(sock, upstream)
        other.join()
        sock.close()
        upstream.close()


def test_a_cached_connection_that_died_silently_costs_one_login(server, proxy_log):
    user, password = 'acct14', USERS['acct14']
    relay = StallingRelay(server.port).start()
    proxy = start_proxy(Backend('relay', relay), server_check_delay=0,
                        server_check_timeout=1)
    try:
        run_session(proxy.server_port, user, password, [b'SELECT INBOX'])
        wait_cached(proxy)
        relay.stall()
        started = time.monotonic()
        answers = run_session(proxy.server_port, user, password, [b'SELECT INBOX'])
        elapsed = time.monotonic() - started
        assert answers[0][-1].startswith(b'c0 OK')
        assert elapsed < 1 + 2, elapsed           # the check's timeout, plus one login
        assert logins(proxy_log, user) == ['new', 'new']
        assert any('backend closed:' in line and 'server check failed' in line
                   for line in proxy_log.lines)
        # A cached connection that answers its check is handed out as before.
        wait_cached(proxy)
        run_session(proxy.server_port, user, password, [b'NOOP'])
        assert logins(proxy_log, user) == ['new', 'new', 'reused']
    finally:
        proxy.stop(2)
        relay.stop()
