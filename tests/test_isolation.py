"""Session isolation: a reused connection behaves exactly like a fresh login.

Each test leaves state in one session, drops it or logs out, and checks the next session of
the same user. Every test runs twice in a row against one running proxy per server, so the
second run starts on the connections the first one cached.
"""
import re

import gevent
import pytest

from tests.conftest import start_proxy, wait_cached, wait_until
from tests.transcript import wait_settled
from tests.wire import Client

ROUNDS = pytest.mark.parametrize('round_', [1, 2])
_FOREIGN_TAGGED = re.compile(rb'^[^*+ ]+ (OK|NO|BAD)\b')


@pytest.fixture(scope='module', params=['dovecot', 'pymap'])
def iso(request):
    """(backend, proxy): one proxy per server for the whole module."""
    backend = request.getfixturevalue(request.param)
    proxy = start_proxy(backend)
    yield backend, proxy
    proxy.stop(2)


def account(backend, index):
    """A user of its own per test on Dovecot; pymap has only one."""
    return backend.users[index % len(backend.users)]


def session(proxy, user, password) -> Client:
    client = Client(proxy.server_port)
    assert client.login(user, password).startswith(b'L1 OK [CAPABILITY ')
    return client


def assert_fresh(client, backend):
    """What a fresh direct login would see: nothing selected, nothing enabled, no
    untagged data it did not cause, only its own tags."""
    lines, tagged = client.command(b'p1', b'NOOP')
    assert tagged.startswith(b'p1 OK') and lines == [], lines
    lines, tagged = client.command(b'p2', b'FETCH 1 (FLAGS)')
    assert tagged.startswith(b'p2 BAD') and lines == [], 'a mailbox is still selected'
    lines, tagged = client.command(b'p3', b'SELECT INBOX')
    assert tagged.startswith(b'p3 OK')
    assert not [line for line in lines if _FOREIGN_TAGGED.match(line)]
    # With CONDSTORE or QRESYNC on (RFC 7162), a flag change reports MODSEQ.
    lines = client.command(b'p4', b'STORE 1 +FLAGS (\\Flagged)')[0]
    lines += client.command(b'p5', b'STORE 1 -FLAGS (\\Flagged)')[0]
    assert lines and not [line for line in lines if b'MODSEQ' in line or b'VANISHED' in line]
    assert not [line for line in lines if _FOREIGN_TAGGED.match(line)]


@ROUNDS
def test_selected_mailbox_after_eof(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 3)
    with session(proxy, user, password) as client:
        assert client.command(b'a', b'SELECT INBOX')[1].startswith(b'a OK')
    wait_settled(proxy, user)          # the proxy is done with the departed client
    before = backend.settled_logins()
    with session(proxy, user, password) as client:
        assert_fresh(client, backend)
        client.logout()
    assert backend.logins() == before, 'the clean connection should have been reused'


@ROUNDS
def test_enable_qresync_stays_with_its_own_kind(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 4)
    with session(proxy, user, password) as client:
        lines, tagged = client.command(b'a', b'ENABLE QRESYNC')
        enabled = tagged.startswith(b'a OK')
        client.logout()
    with session(proxy, user, password) as client:     # a plain login: no QRESYNC
        assert_fresh(client, backend)
        client.logout()
    if not enabled:
        pytest.skip('%s has no ENABLE QRESYNC' % backend.name)
    assert lines == [b'* ENABLED QRESYNC\r\n']
    before = backend.settled_logins()
    with session(proxy, user, password) as client:     # asks for exactly that state
        again, answer = client.command(b'b', b'ENABLE QRESYNC')
        # The server's own answer to the same bytes, under the new tag.
        assert (again, answer) == (lines, b'b' + tagged[1:])
        client.command(b'c', b'SELECT INBOX')
        lines = client.command(b'd', b'STORE 1 +FLAGS (\\Flagged)')[0]
        lines += client.command(b'e', b'STORE 1 -FLAGS (\\Flagged)')[0]
        assert any(b'MODSEQ' in line for line in lines)
        client.logout()
    assert backend.logins() == before, 'the QRESYNC connection should have been reused'


@ROUNDS
def test_implicit_condstore(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 5)
    with session(proxy, user, password) as client:
        client.command(b'a', b'SELECT INBOX (CONDSTORE)')
        client.logout()
    with session(proxy, user, password) as client:
        assert_fresh(client, backend)
        client.logout()


@ROUNDS
def test_notify_set(iso, round_):
    # NOTIFY NONE would silence even STORE's FETCH replies on Dovecot, unlike a fresh
    # login, so a connection that saw NOTIFY is closed, not reset.
    backend, proxy = iso
    user, password = account(backend, 6)
    with session(proxy, user, password) as client:
        client.command(b'a', b'NOTIFY SET (personal (MessageNew MessageExpunge '
                             b'MailboxName))')
        client.logout()
    with session(proxy, user, password) as client, session(proxy, user, password) as other:
        # Another session makes news that NOTIFY would report to the first one.
        other.command(b'x', b'CREATE notify-test-%d' % round_)
        other.command(b'y', b'DELETE notify-test-%d' % round_)
        # Time for that news to come: what NOTIFY sends comes on its own, not as an
        # answer, and no event marks that none is coming.
        gevent.sleep(0.2)
        lines, tagged = client.command(b'b', b'NOOP')
        assert tagged.startswith(b'b OK') and lines == [], lines
        assert_fresh(client, backend)


@ROUNDS
def test_idle_then_eof(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 7)
    with session(proxy, user, password) as client:
        client.command(b'a', b'SELECT INBOX')
        client.send(b'b IDLE\r\n')
        assert client.readline().startswith(b'+')
    wait_settled(proxy, user)          # the proxy is done with the departed client
    before = backend.settled_logins()
    with session(proxy, user, password) as client:
        assert_fresh(client, backend)
        client.logout()
    assert backend.logins() == before, 'the IDLE connection should have been finished, kept'


@ROUNDS
def test_eof_in_the_middle_of_a_big_fetch(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 8)
    size = 10 * 1024 * 1024 if backend.name == 'dovecot' else 1024 * 1024
    body = b'Subject: big\r\n\r\n' + (b'x' * 998 + b'\r\n') * (size // 1000)
    with session(proxy, user, password) as client:
        client.command(b'a', b'SELECT INBOX')
        lines, tagged = client.command(b'b', b'SEARCH SUBJECT big')
        found = lines[0].split()[2:]
        if not found:
            client.send(b'c APPEND INBOX {%d+}\r\n' % len(body) + body + b'\r\n')
            assert client.read_until_tagged(b'c')[1].startswith(b'c OK')
            found = client.command(b'd', b'SEARCH SUBJECT big')[0][0].split()[2:]
        client.send(b'e FETCH %s BODY.PEEK[]\r\n' % found[0])
        assert client.sock.recv(65536)               # the data is flowing; now vanish
    wait_settled(proxy, user)          # the proxy is done with the departed client
    before = backend.settled_logins()
    with session(proxy, user, password) as client:
        assert_fresh(client, backend)
        client.logout()
    assert backend.logins() == before, 'the rest of the FETCH should have been drained'


@ROUNDS
def test_eof_in_the_middle_of_an_append_literal(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 9)
    with session(proxy, user, password) as client:
        count = int([line for line in client.command(b'a', b'SELECT INBOX')[0]
                     if line.endswith(b'EXISTS\r\n')][0].split()[1])
        client.send(b'b APPEND INBOX {1000}\r\n')
        assert client.readline().startswith(b'+')
        client.send(b'c NOOP\r\n' * 30)             # 240 of the 1000 bytes, then vanish
    wait_settled(proxy, user)          # the proxy is done with the departed client
    with session(proxy, user, password) as client:
        assert_fresh(client, backend)
        lines = client.command(b'd', b'SELECT INBOX')[0]
        exists = [line for line in lines if line.endswith(b'EXISTS\r\n')]
        assert int(exists[0].split()[1]) == count, 'a partial message was stored'
        client.logout()


@ROUNDS
def test_command_pipelined_before_logout(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 10)
    with session(proxy, user, password) as client:
        client.send(b'a SELECT INBOX\r\nb FETCH 1 (FLAGS)\r\nc LOGOUT\r\n')
        assert client.read_until_tagged(b'a')[1].startswith(b'a OK')
        assert client.read_until_tagged(b'b')[1].startswith(b'b OK')
        lines, tagged = client.read_until_tagged(b'c')
        assert lines == [b'* BYE Logging out\r\n'] and tagged.startswith(b'c OK')
    with session(proxy, user, password) as client:
        assert_fresh(client, backend)


@ROUNDS
def test_commands_pipelined_after_login(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 11)
    with Client(proxy.server_port) as client:
        client.send(b'a LOGIN "%s" "%s"\r\nb SELECT INBOX\r\nc FETCH 1 (FLAGS)\r\n'
                    % (user.encode(), password.encode()))
        for tag in (b'a', b'b', b'c'):
            assert client.read_until_tagged(tag)[1].startswith(tag + b' OK')
        client.logout()


@ROUNDS
def test_wrong_password(iso, round_):
    backend, proxy = iso
    user, password = account(backend, 12)
    with session(proxy, user, password) as client:
        client.logout()
    wait_cached(proxy)
    before = backend.settled_logins()
    with Client(proxy.server_port) as client:
        assert client.login(user, 'wrongpass').startswith(b'L1 NO [AUTHENTICATIONFAILED]')
    with session(proxy, user, password) as client:
        assert_fresh(client, backend)
        client.logout()
    assert backend.logins() == before, 'a wrong password must not evict'


@pytest.fixture(scope='module')
def special_proxy(dovecot):
    """Proxies with special settings, one per setting, kept for the whole module."""
    proxies = {}

    def get(**settings):
        key = tuple(sorted(settings.items()))
        if key not in proxies:
            proxies[key] = start_proxy(dovecot, **settings)
        return proxies[key]
    yield get
    for proxy in proxies.values():
        proxy.stop(2)


@ROUNDS
def test_password_change_on_the_server(dovecot, special_proxy, proxy_log, round_):
    proxy = special_proxy()
    user = 'user13'
    try:
        with session(proxy, user, 'secret13') as client:
            client.logout()
        dovecot.server.set_password(user, 'changed13')
        with session(proxy, user, 'changed13') as client:   # a new server login...
            client.logout()
        # ...which closed the connection made with the old password, in the
        # background.
        proxy_log.wait_for('reason=password changed')
        with Client(proxy.server_port) as client:
            assert client.login(user, 'secret13').startswith(b'L1 NO [AUTHENTICATIONFAILED]')
    finally:
        dovecot.server.set_password(user, 'secret13')


@ROUNDS
def test_max_auth_age(dovecot, special_proxy, round_):
    proxy = special_proxy(max_auth_age=1)
    user, password = dovecot.users[13]
    # max_auth_age must pass: what an earlier round cached is too old now.
    gevent.sleep(1.1)
    before = dovecot.logins()
    for _ in range(3):                 # reuse within the age: one server login
        with session(proxy, user, password) as client:
            client.logout()
    assert dovecot.wait_logins(before + 1) == before + 1
    # It must pass again: reuse did not extend it, so the next login is a new one.
    gevent.sleep(1.1)
    with session(proxy, user, password) as client:
        client.logout()
    assert dovecot.wait_logins(before + 2) == before + 2


@ROUNDS
def test_per_user_cap(dovecot, special_proxy, proxy_log, round_):
    proxy = special_proxy(max_connections_per_user=2, busy_timeout=0.3)
    user, password = dovecot.users[14]
    with session(proxy, user, password) as client:
        client.command(b'a', b'ENABLE QRESYNC')
        client.logout()                # cached, but only for QRESYNC sessions
    active = session(proxy, user, password)
    with session(proxy, user, password) as third:     # over the cap: LRU evicted
        assert third.command(b'b', b'NOOP')[1].startswith(b'b OK')
        assert proxy.cache.user_count((b'', user.encode())) == 2
        with Client(proxy.server_port) as fourth:       # two active: refused
            assert fourth.login(user, password) == \
                b'L1 NO [UNAVAILABLE] Too many connections, try again later.\r\n'
        third.logout()
    active.logout()
    active.close()
    proxy_log.wait_for('reason=evicted: user limit')  # it logs out in the background
    # The next round starts once this one's connections are reset and cached.
    wait_settled(proxy, user)


def test_reuse_code_when_configured(dovecot):
    proxy = start_proxy(dovecot, send_reuse_code='yes')
    user, password = dovecot.users[15]
    try:
        with Client(proxy.server_port) as client:
            assert b' XIMAPPROXY]' in client.greeting
            client.login(user, password)
            client.logout()
        with Client(proxy.server_port) as client:
            client.send(b'a LOGIN %s %s\r\n' % (user.encode(), password.encode()))
            lines, tagged = client.read_until_tagged(b'a')
            assert lines == [b'* OK [XPROXYREUSE] IMAP connection reused by gimapproxy\r\n']
    finally:
        proxy.stop(2)


def test_reply_to_a_tag_never_sent_is_relayed_and_the_connection_not_reused(proxy_log):
    """A server reply with a tag the client never sent means the two readings of the
    streams differ: the client still gets what the server said, and the session goes on,
    but that connection is never cached. Only a fake server does this."""
    from tests.conftest import Backend
    from tests.fakeimap import FakeImap
    fake = FakeImap({b'FETCH': lambda tag: b'zz9 OK not yours\r\n' + tag + b' OK done\r\n'})
    fake.start()
    proxy = start_proxy(Backend('fake', fake))
    try:
        with session(proxy, 'someone', 'pw') as client:
            lines, tagged = client.command(b'a', b'FETCH 1 (FLAGS)')
            assert lines == [b'zz9 OK not yours\r\n'] and tagged == b'a OK done\r\n'
            assert client.command(b'b', b'NOOP')[1] == b'b OK done\r\n'
            # Not clean: the LOGOUT goes to the server, which answers it.
            lines, tagged = client.command(b'c', b'LOGOUT')
            assert lines == [b'* BYE bye\r\n'] and tagged == b'c OK done\r\n'
        wait_until(lambda: not proxy.cache.total, 'the connection to be closed')
        assert any('not reusable after' in line
                   and 'server ran a command the proxy did not frame' in line
                   for line in proxy_log.lines)
        with session(proxy, 'someone', 'pw') as client:
            client.logout()
        assert fake.logins == 2, 'the desynchronized connection must not be reused'
    finally:
        proxy.stop(2)
        fake.stop()


@ROUNDS
def test_identity_change_is_never_cached(iso, round_, proxy_log):
    backend, proxy = iso
    user, password = account(backend, 1)
    with session(proxy, user, password) as client:
        client.command(b'a', b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
        client.logout()
    # The server answers that LOGOUT itself: the connection is closed, never cached.
    wait_until(lambda: any('not reusable after' in line and 'unknown command: LOGIN' in line
                           for line in proxy_log.lines), 'the close line')


def test_relayed_capabilities_are_filtered(iso):
    backend, proxy = iso
    user, password = account(backend, 2)
    with session(proxy, user, password) as client:
        lines, tagged = client.command(b'a', b'CAPABILITY')
        caps = lines[0].split()[2:]
        assert caps and b'IMAP4rev1' in caps
        assert not [cap for cap in caps if cap.upper().startswith((b'AUTH=', b'COMPRESS'))
                    or cap.upper() in (b'STARTTLS', b'SASL-IR', b'LOGINDISABLED')]
        client.logout()
